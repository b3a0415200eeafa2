"""Route recipes that name one of our methods to our planner; everything else to mergekit's.

``mergekit.merge.run_merge`` is replaced by a wrapper at the moment ``mergekit.merge`` finishes
executing (startup hook) or when ``mergekit_ctm`` is imported, whichever comes first. The
original stays reachable as ``run_merge.__mergekit_ctm_original__``. The wrapper passes every
argument through untouched (``*args, **kwargs``), so a new mergekit keyword never breaks it.

``mergekit-yaml``'s command callback is wrapped too, so a recipe that is not YAML, not a
mapping, names an unknown method, or fails anywhere in our planner ends in one line (exit 2
for bad input, 1 for an OS error) instead of a traceback (``errors.one_line_errors``).
"""

from __future__ import annotations

import functools
import inspect
import os
import sys
from typing import Any

from mergekit_ctm.engine.methods import METHOD_NAMES
from mergekit_ctm.recipe.model import load_yaml

_MARK = "__mergekit_ctm_original__"


def _model_refs(merge_config: Any) -> list[str]:
    """The input models of ``models:``, or of every ``slices:`` source."""
    if isinstance(merge_config, dict):
        models = merge_config.get("models")
        models = models if isinstance(models, list) else []
        slices = merge_config.get("slices")
        for s in slices if isinstance(slices, list) else []:
            sources = s.get("sources") if isinstance(s, dict) else None
            models += sources if isinstance(sources, list) else []
        return [str(m.get("model") if isinstance(m, dict) else m) for m in models]
    refs = [str(m.model) for m in getattr(merge_config, "models", None) or []]
    for s in getattr(merge_config, "slices", None) or []:
        refs += [str(src.model) for src in s.sources]
    return refs


def is_full_checkpoint(ref: str) -> bool:
    """A full model (config.json, no adapter_config.json): a local directory or a hub id in
    the local Hugging Face cache. Everything else (adapters, ``base+adapter``, unknown hub
    ids) is taken for an adapter, whose reader says what is wrong with it."""
    if "+" in ref and not os.path.isdir(ref):
        return False
    path = ref.split("@", 1)[0]
    if os.path.isdir(path):
        has = lambda f: os.path.isfile(os.path.join(path, f))  # noqa: E731
        return has("config.json") and not has("adapter_config.json")
    if path.count("/") != 1 or path.startswith((".", "/", "~")):
        return False
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = lambda f: isinstance(try_to_load_from_cache(path, f), str)  # noqa: E731
        return cached("config.json") and not cached("adapter_config.json")
    except Exception:
        return False


def is_adapter_recipe(merge_config: Any) -> bool:
    """True when the recipe merges PEFT adapters with one of our methods (our planner);
    False for other methods and for our methods over full checkpoints (mergekit's planner,
    our kernel per tensor). Mixing the two is refused."""
    if isinstance(merge_config, dict):
        method = merge_config.get("merge_method")
    else:
        method = getattr(merge_config, "merge_method", None)
    if method not in METHOD_NAMES:
        return False
    refs = _model_refs(merge_config)
    full = [is_full_checkpoint(r) for r in refs]
    if any(full) and not all(full):
        from mergekit_ctm.recipe.model import RecipeError

        i, j = full.index(True), full.index(False)
        raise RecipeError(
            f"models[{i}] ({refs[i]}) is a full checkpoint but models[{j}] ({refs[j]}) is a PEFT "
            f"adapter; merge_method {method} takes one kind per recipe. Merge the adapters into "
            "their base first (mergekit-ctm with output: model), or list only one kind"
        )
    return not any(full)


def _recipe_path_from_click() -> str | None:
    """The recipe file of the running mergekit command (its ``config_file`` argument)."""
    import click

    ctx = click.get_current_context(silent=True)
    path = ctx.params.get("config_file") if ctx is not None else None
    return path if isinstance(path, str) and os.path.isfile(path) else None


def wrap_run_merge(module: Any) -> None:
    """Replace ``module.run_merge`` (mergekit.merge) with the dispatching wrapper (idempotent)."""
    original = module.run_merge
    if hasattr(original, _MARK):
        return
    signature = inspect.signature(original)

    @functools.wraps(original)
    def run_merge(*args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(*args, **kwargs)
        merge_config = bound.arguments.get("merge_config")
        if not is_adapter_recipe(merge_config):
            return original(*args, **kwargs)
        from mergekit_ctm.plan.run import run_adapter_merge

        return run_adapter_merge(
            merge_config,
            bound.arguments["out_path"],
            options=bound.arguments.get("options"),
            config_source=bound.arguments.get("config_source"),
            recipe_path=_recipe_path_from_click(),
        )

    setattr(run_merge, _MARK, original)
    module.run_merge = run_merge
    # Modules that bound the name before we got here (imported mergekit before mergekit_ctm).
    for name in ("mergekit.scripts.run_yaml", "mergekit.scripts.multimerge"):
        other = sys.modules.get(name)
        if other is not None and getattr(other, "run_merge", None) is original:
            other.run_merge = run_merge


def check_recipe_text(text: str, where: str) -> None:
    """Refuse, with one clear line, a recipe mergekit cannot parse: bad YAML, empty, not a
    mapping, an unknown ``merge_method`` (nearest name suggested), or (for our methods) any
    structural error our strict model finds. Valid recipes of any method pass untouched."""
    from mergekit.merge_methods import registry

    from mergekit_ctm.recipe.model import RecipeError, parse_recipe, suggest

    raw = load_yaml(text, where)
    if raw is None:
        raise RecipeError(f"{where}: the recipe is empty; see recipes/ for examples")
    if not isinstance(raw, dict):
        raise RecipeError(f"{where}: a recipe must be a YAML mapping, got {type(raw).__name__}")
    method = raw.get("merge_method")
    known = sorted(m.spec.name for m in registry.registered_methods())
    if isinstance(method, str) and method not in known:
        raise RecipeError(
            f"{where}: merge_method {method!r} is not a registered method"
            f"{suggest(method, known)}; adapter merges use one of {', '.join(METHOD_NAMES)}"
        )
    if method in METHOD_NAMES and is_adapter_recipe(raw):
        parse_recipe(text)  # strict: duplicate keys, types, unknown keys
    elif method in METHOD_NAMES:
        from mergekit_ctm.recipe.validate import check_full_checkpoint_recipe

        load_yaml(text, where, unique_keys=True)
        check_full_checkpoint_recipe(raw)
    elif adapters := _plain_adapter_refs(raw):
        where_, ref = adapters[0]
        raise RecipeError(
            f"{where}: merge_method {method!r} merges full models, but {where_} ({ref}) is a "
            f"PEFT LoRA adapter; merge adapters with one of {', '.join(METHOD_NAMES)}, or write "
            "'base+adapter' to merge full copies"
        )


def _plain_adapter_refs(raw: dict[str, Any]) -> list[tuple[str, str]]:
    """(field, ref) of recipe models that are PEFT adapter directories, not full models."""
    refs = [("base_model", raw.get("base_model"))]
    models = raw.get("models")
    if isinstance(models, list):
        refs += [
            (f"models[{i}]", m.get("model") if isinstance(m, dict) else m)
            for i, m in enumerate(models)
        ]
    return [
        (field, ref)
        for field, ref in refs
        if isinstance(ref, str)
        and os.path.isfile(os.path.join(ref, "adapter_config.json"))
        and not os.path.isfile(os.path.join(ref, "config.json"))
    ]


def _run_adapter_recipe(text: str, path: str, kwargs: dict[str, Any]) -> Any:
    """What mergekit-yaml does, for our recipes, without MergeConfiguration: it refuses
    forms our recipe model accepts (``rank: null``, a bare string under ``models:``) and
    drops keys such as ``output:``. The options are built exactly as mergekit's
    ``add_merge_options`` builds them."""
    from mergekit.options import MergeOptions

    from mergekit_ctm.plan.run import run_adapter_merge

    options = MergeOptions(**{k: v for k, v in kwargs.items() if k in MergeOptions.model_fields})
    options.apply_global_options()
    return run_adapter_merge(
        text, kwargs["out_path"], options=options, config_source=text, recipe_path=path
    )


def wrap_run_yaml(module: Any) -> None:
    """Make ``mergekit-yaml`` (mergekit.scripts.run_yaml.main) fail in one line (idempotent)."""
    command = module.main
    original = command.callback
    if hasattr(original, _MARK):
        return

    @functools.wraps(original)
    def callback(*args: Any, **kwargs: Any) -> Any:
        import pydantic

        from mergekit_ctm.errors import one_line_errors

        path = kwargs.get("config_file")
        with one_line_errors("mergekit-yaml"):
            if isinstance(path, str):
                try:
                    with open(path, encoding="utf-8") as f:
                        text = f.read()
                except (OSError, UnicodeDecodeError) as exc:
                    from mergekit_ctm.recipe.model import RecipeError

                    raise RecipeError(f"cannot read recipe {path!r}: {exc}") from None
                check_recipe_text(text, path)
                if is_adapter_recipe(load_yaml(text, path)):
                    return _run_adapter_recipe(text, path, kwargs)
            try:
                return original(*args, **kwargs)
            except pydantic.ValidationError as exc:
                from mergekit_ctm.recipe.model import RecipeError

                first = exc.errors()[0]
                loc = ".".join(str(p) for p in first.get("loc", ())) or "recipe"
                raise RecipeError(
                    f"{path}: invalid recipe: {loc}: {first.get('msg')}"
                    + (f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else "")
                ) from None

    setattr(callback, _MARK, original)
    command.callback = callback
