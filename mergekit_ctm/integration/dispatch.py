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


def _field(obj: Any, key: str) -> Any:
    return obj.get(key) if isinstance(obj, dict) else getattr(obj, key, None)


def _items(value: Any) -> list[Any]:
    return list(value) if isinstance(value, list) else []


def _model_refs(merge_config: Any) -> list[str]:
    """The input models of ``models:``, of every ``slices:`` source, and of the same under
    each ``modules:`` entry; from a recipe dict or a MergeConfiguration (never modified)."""
    groups = [merge_config]
    modules = _field(merge_config, "modules")
    groups += list(modules.values()) if isinstance(modules, dict) else []
    entries: list[Any] = []
    for group in groups:
        entries += _items(_field(group, "models"))
        for s in _items(_field(group, "slices")):
            entries += _items(_field(s, "sources"))
    return [str(m if isinstance(m, str) else _field(m, "model")) for m in entries]


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


def check_output_kind(merge_config: Any, config_source: str | None = None) -> str | None:
    """The recipe's ``output:`` (None when unset). ``output: model`` is what every mergekit
    method writes, so any method takes it (a ``mergekit-multi`` stage may say it uniformly);
    ``output: adapter`` needs one of our methods: a stock method's merge is not low-rank."""
    from mergekit_ctm.integration.output_field import OUTPUT_KINDS, output_of
    from mergekit_ctm.recipe.model import RecipeError

    output = output_of(merge_config, config_source)
    if isinstance(merge_config, dict):
        keep = merge_config.get("modules_to_save")
    else:
        keep = getattr(merge_config, "modules_to_save", None)
    if keep is not None and output != "adapter":
        raise RecipeError(
            "modules_to_save: applies to output: adapter only (it keeps whole modules, e.g. "
            "embed_tokens, lm_head, in the adapter); output: model writes every tensor"
        )
    if output is None:
        return None

    if output not in OUTPUT_KINDS:
        raise RecipeError(f"output: {output!r} is not one of {', '.join(OUTPUT_KINDS)}")
    if isinstance(merge_config, dict):
        method = merge_config.get("merge_method")
    else:
        method = getattr(merge_config, "merge_method", None)
    if output == "adapter" and method not in METHOD_NAMES:
        raise RecipeError(
            f"output: adapter needs merge_method {' | '.join(METHOD_NAMES)}; merge_method "
            f"{method!r} writes a full model (its merged update is not low-rank). Remove "
            "`output:` or write `output: model`"
        )
    return output


def with_recipe_seed(options: Any, merge_config: Any) -> Any:
    """``options`` with the recipe's ``random_seed:`` when ``--random-seed`` was not given
    (the command line wins, as for adapter recipes); mergekit's ``run_merge`` seeds torch
    from ``options.random_seed``, and our per-tensor seeds derive from it."""
    seed = getattr(merge_config, "random_seed", None)
    if seed is None or options is None or getattr(options, "random_seed", None) is not None:
        return options
    return options.model_copy(update={"random_seed": seed})


def _recipe_path_from_click() -> str | None:
    """The recipe file of the running command (``config_file`` of mergekit-yaml and
    mergekit-multi, ``recipe`` of mergekit-ctm merge)."""
    import click

    ctx = click.get_current_context(silent=True)
    params = ctx.params if ctx is not None else {}
    path = params.get("config_file") or params.get("recipe")  # mergekit's, mergekit-ctm's
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
        config_source = bound.arguments.get("config_source")
        output = check_output_kind(merge_config, config_source)
        if not is_adapter_recipe(merge_config):
            if getattr(merge_config, "merge_method", None) not in METHOD_NAMES:
                return original(*args, **kwargs)  # a stock method: mergekit's, untouched
            from mergekit_ctm.integration import full_adapter

            # our method over full checkpoints: mergekit's planner, our kernel per tensor
            options = with_recipe_seed(bound.arguments.get("options"), merge_config)
            where = {
                "config_source": config_source,
                "recipe_path": _recipe_path_from_click(),
            }
            if output == "adapter":
                return full_adapter.run_full_adapter_merge(
                    merge_config, bound.arguments["out_path"], options=options, **where
                )
            return full_adapter.run_full_model_merge(
                original, merge_config, bound.arguments["out_path"], options, **where
            )
        from mergekit_ctm.plan.run import run_adapter_merge

        return run_adapter_merge(
            merge_config,
            bound.arguments["out_path"],
            options=bound.arguments.get("options"),
            config_source=config_source,
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


def invalid_recipe(path: Any, exc: Any) -> Exception:
    """mergekit's pydantic ValidationError as one RecipeError line: the first error's location
    and message, and how many more there are."""
    from mergekit_ctm.recipe.model import RecipeError

    first = exc.errors()[0]
    loc = ".".join(str(p) for p in first.get("loc", ())) or "recipe"
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return RecipeError(f"{path}: invalid recipe: {loc}: {first.get('msg')}{more}")


def _wrap_command(module: Any, prog: str, first: Any = None) -> None:
    """Wrap ``module.main``'s click callback (idempotent): errors end in one line
    (``errors.one_line_errors``), and a pydantic ValidationError from mergekit names the
    recipe file. ``first(path, kwargs)``, when given, runs before mergekit's callback and
    returns ``(True, result)`` to answer the command itself."""
    command = module.main
    original = command.callback
    if hasattr(original, _MARK):
        return

    @functools.wraps(original)
    def callback(*args: Any, **kwargs: Any) -> Any:
        import pydantic

        from mergekit_ctm.errors import one_line_errors

        path = kwargs.get("config_file")
        with one_line_errors(prog):
            if first is not None:
                done, result = first(path, kwargs)
                if done:
                    return result
            try:
                return original(*args, **kwargs)
            except pydantic.ValidationError as exc:
                raise invalid_recipe(path, exc) from None

    setattr(callback, _MARK, original)
    command.callback = callback


def _adapter_recipe_first(path: Any, kwargs: dict[str, Any]) -> tuple[bool, Any]:
    """mergekit-yaml: read and check the recipe; an adapter recipe goes to our planner."""
    if not isinstance(path, str):
        return False, None
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        from mergekit_ctm.recipe.model import RecipeError

        raise RecipeError(f"cannot read recipe {path!r}: {exc}") from None
    check_recipe_text(text, path)
    if is_adapter_recipe(load_yaml(text, path)):
        return True, _run_adapter_recipe(text, path, kwargs)
    return False, None


def wrap_run_yaml(module: Any) -> None:
    """Make ``mergekit-yaml`` (mergekit.scripts.run_yaml.main) fail in one line (idempotent)."""
    _wrap_command(module, "mergekit-yaml", _adapter_recipe_first)


def wrap_multimerge(module: Any) -> None:
    """Make ``mergekit-multi`` (mergekit.scripts.multimerge.main) end a bad stage in one line
    (idempotent): exit 2 for bad input (our recipe checks, mergekit's validation errors),
    1 for an OS error. Stages run through ``run_merge``, hence our dispatch."""
    _wrap_command(module, "mergekit-multi")
