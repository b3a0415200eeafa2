"""``merge_adapters``: the adapter merge as one call on a PeftModel that holds the adapters.

What PEFT's ``add_weighted_adapter`` users do, with our methods::

    import mergekit_ctm
    mergekit_ctm.merge_adapters(
        peft_model, ["a", "b", "c"], "merged",
        method="ctm", rank=16, base_rule="ties", density=0.5,
    )
    peft_model.set_adapter("merged")

The factors are read from the loaded LoRA layers (no files, no base weights read or copied),
merged module by module by the same engine call as ``mergekit-yaml`` (``merge_lora`` with the
same resolved parameters and per-module seed), and written into a new adapter added the PEFT
way (``add_adapter`` with the LoraConfig the file path writes). With the same adapters saved to
disk and the same ``--random-seed``, the new adapter equals ``mergekit-yaml``'s output.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

# Python spellings of recipe names: ``lambda`` is a keyword, PEFT users write ``weights``.
ALIASES = {"lam": "lambda", "weights": "weight"}
MATH_DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass(frozen=True)
class MergedAdapter:
    """What ``merge_adapters`` added to the model.

    adapter_name: the new adapter. config: its LoraConfig (scaling 1 in every module).
    ranks: module -> directions written there (< the requested rank when the inputs span
    fewer). zero_modules: modules left out because their merged update is zero.
    inputs: module -> the adapters merged there, in the order given.
    """

    adapter_name: str
    method: str
    base_rule: str | None
    config: Any
    ranks: dict[str, int]
    zero_modules: tuple[str, ...]
    inputs: dict[str, tuple[str, ...]]


@dataclass(frozen=True)
class _Module:
    """One LoRA module of the model, as the writer's ModuleLike needs it."""

    name: str
    kind: str  # "linear" | "embedding"
    fan_in_fan_out: bool


def merge_adapters(
    model: Any,
    adapters: Sequence[str],
    adapter_name: str,
    *,
    method: str = "ctm",
    random_seed: int | None = None,
    dtype: str | torch.dtype = "float32",
    **parameters: Any,
) -> MergedAdapter:
    """Merge LoRA adapters loaded in ``model`` into a new adapter ``adapter_name``.

    Args:
        model: a ``peft.PeftModel`` holding LoRA adapters (``load_adapter`` / ``from_pretrained``).
        adapters: names of the loaded adapters to merge, in the order of per-adapter values.
        adapter_name: name of the new adapter; must not exist yet.
        method: ``ctm`` | ``core_space`` | ``mtc`` | ``lora_lego``.
        random_seed: ``--random-seed`` of ``mergekit-yaml``: per-module seed for DARE/DELLA
            and LoRA-LEGO's k-means.
        dtype: math dtype, ``float32`` (default, as recipes) or ``float64``.
        parameters: the method's parameters (``rank``, ``beta``, ``hooi_iters``, ``hooi_tol``,
            ``space``, ``lambda`` spelt ``lam``, ``base_rule``) and the base rule's, named as in
            recipes. Per-adapter ones (``weight``, ``density``, ...) take a scalar for every
            adapter or a list with one value per adapter; ``weights`` is accepted for ``weight``.

    Returns:
        MergedAdapter. The model gains the adapter (scaling 1, balanced factors, each module's
        factors on the device and in the dtype of the first input adapter's factors there). The
        active adapter, the other adapters and every existing parameter's ``requires_grad``
        stay as they were; call ``model.set_adapter(adapter_name)`` to use it.

    Raises:
        RecipeError (``mergekit_ctm.errors.InputError``) before the model is touched: unknown
        adapter or parameter names, bad values, an existing ``adapter_name``, adapters this
        merge cannot represent (DoRA, conv LoRA, modules_to_save, bias, NaN/Inf factors), or
        a merged update that is zero everywhere. A rule that refuses its inputs while merging
        (e.g. ``nuslerp`` on a module held by three adapters) raises RuleError, also before
        the model is touched.
    """
    from mergekit_ctm.recipe import RecipeError

    _check_model(model)
    names = _check_names(model, adapters, adapter_name)
    for name in names:
        _check_config(name, model.peft_config[name])
    math_dtype = _math_dtype(dtype)
    rule, own, rule_values = _resolve_parameters(method, parameters, names)
    modules = _read_modules(model, names)
    if not modules:
        raise RecipeError(f"adapters {', '.join(map(repr, names))} have no LoRA modules to merge")

    merged, inputs = _merge(modules, names, method, own, rule_values, random_seed, math_dtype)
    ranks = {m: int(a.shape[0]) for m, (a, _) in merged.items() if a.shape[0] > 0}
    zero = tuple(m for m, (a, _) in merged.items() if a.shape[0] == 0)
    if not ranks:
        raise RecipeError(
            "every module's merged update is zero (the adapters' updates are all zero, or they "
            "cancel): there is no LoRA to add"
        )
    r = own.get("rank") or max(ranks.values())
    config = _merged_config(model, names, modules, ranks, r)
    _add_adapter(model, adapter_name, config, {m: merged[m] for m in ranks}, modules)
    return MergedAdapter(
        adapter_name=adapter_name,
        method=method,
        base_rule=rule,
        config=config,
        ranks=ranks,
        zero_modules=zero,
        inputs={m: inputs[m] for m in merged},
    )


# --------------------------------------------------------------------------- checks


def _check_model(model: Any) -> None:
    from peft import PeftModel
    from peft.utils import PeftType

    from mergekit_ctm.recipe import RecipeError

    if not isinstance(model, PeftModel):
        raise RecipeError(
            f"merge_adapters needs a peft.PeftModel with LoRA adapters loaded, got "
            f"{type(model).__name__}. Load them with PeftModel.from_pretrained(base, path, "
            "adapter_name=...) and model.load_adapter(path, adapter_name=...)."
        )
    if model.peft_type != PeftType.LORA:
        raise RecipeError(
            f"merge_adapters merges LoRA adapters; this model's adapters are "
            f"{getattr(model.peft_type, 'value', model.peft_type)}"
        )


def _check_names(model: Any, adapters: Sequence[str], adapter_name: str) -> tuple[str, ...]:
    from mergekit_ctm.recipe import RecipeError
    from mergekit_ctm.recipe.model import suggest

    loaded = list(model.peft_config)
    if isinstance(adapters, str) or not isinstance(adapters, Sequence) or not adapters:
        raise RecipeError(
            f"adapters must be a non-empty list of adapter names, got {adapters!r}; loaded "
            f"adapters: {', '.join(loaded)}"
        )
    errors = []
    for a in adapters:
        if not isinstance(a, str) or a not in model.peft_config:
            errors.append(f"{a!r}{suggest(a, loaded)}")
    if errors:
        raise RecipeError(
            f"unknown adapter(s) {', '.join(errors)}; loaded adapters: {', '.join(loaded)}"
        )
    dup = sorted({a for a in adapters if list(adapters).count(a) > 1})
    if dup:
        raise RecipeError(f"adapter(s) {', '.join(map(repr, dup))} listed more than once")
    if not isinstance(adapter_name, str) or not adapter_name:
        raise RecipeError(f"adapter_name must be a non-empty string, got {adapter_name!r}")
    if adapter_name in model.peft_config:
        raise RecipeError(
            f"adapter {adapter_name!r} already exists in the model (loaded: {', '.join(loaded)});"
            " choose a new name or model.delete_adapter() it first"
        )
    return tuple(adapters)


def _check_config(name: str, config: Any) -> None:
    """Refuse what the file path refuses (adapters.peft_lora), plus what only files can carry."""
    from mergekit_ctm.adapters.peft_lora import _UNSUPPORTED_FIELDS
    from mergekit_ctm.recipe import RecipeError

    for field, (default, what) in _UNSUPPORTED_FIELDS.items():
        value = getattr(config, field, default)
        if value not in (default, None, False, [], {}):
            raise RecipeError(
                f"adapter {name!r}: {what} is not supported yet (its config has {field}="
                f"{value!r}); only plain LoRA adapters can be merged"
            )
    if config.modules_to_save:
        raise RecipeError(
            f"adapter {name!r} has modules_to_save {list(config.modules_to_save)}: merging "
            "those needs full copies of the modules, which merge_adapters does not make. Merge "
            "the saved adapters with a recipe and mergekit-yaml, which merges them against the "
            "base weights"
        )
    if config.bias != "none":
        raise RecipeError(
            f"adapter {name!r}: bias={config.bias!r} trains the base layers' biases, which all "
            "adapters loaded in one PeftModel share, so they cannot be merged per adapter. Merge "
            "the saved adapters with a recipe and mergekit-yaml instead"
        )


def _math_dtype(dtype: Any) -> torch.dtype:
    from mergekit_ctm.recipe import RecipeError

    if isinstance(dtype, torch.dtype) and dtype in MATH_DTYPES.values():
        return dtype
    if dtype in MATH_DTYPES:
        return MATH_DTYPES[dtype]
    raise RecipeError(f"dtype: the math dtype is float32 or float64, got {dtype!r}")


# --------------------------------------------------------------------------- parameters


def _scalar(value: Any) -> Any:
    """Plain Python value of a numpy / torch scalar; anything else unchanged."""
    if hasattr(value, "item") and not isinstance(value, (bool, int, float, str)):
        try:
            return value.item()
        except (TypeError, ValueError):
            return value
    return value


def _resolve_parameters(
    method: str, parameters: Mapping[str, Any], names: Sequence[str]
) -> tuple[str | None, dict[str, Any], dict[str, Any]]:
    """(base rule, the method's own values, the rule's values) as the recipe path resolves
    them: mergekit's resolver over the same specs (defaults, types, ranges), then the rule's
    own check. Per-adapter values come back as tuples over ``names``."""
    import pydantic
    from mergekit.merge_methods.base import ParameterScope
    from mergekit.parameter_resolver import resolve_parameter

    from mergekit_ctm.engine.methods import DEFAULT_BASE_RULE, METHOD_NAMES, METHODS
    from mergekit_ctm.engine.rules import RuleError, check_rule_params, rule_names
    from mergekit_ctm.recipe import RecipeError
    from mergekit_ctm.recipe.model import suggest
    from mergekit_ctm.recipe.params import rule_specs as rule_specs_of
    from mergekit_ctm.recipe.params import rules_taking

    if method not in METHOD_NAMES:
        raise RecipeError(
            f"method: {method!r} is not an adapter-merging method"
            f"{suggest(method, METHOD_NAMES)}; valid: {', '.join(METHOD_NAMES)}"
        )
    params: dict[str, Any] = {}
    for key, value in parameters.items():
        canonical = ALIASES.get(key, key)
        if canonical in params:
            raise RecipeError(f"parameter {canonical!r} given twice (as {canonical!r} and {key!r})")
        params[canonical] = value

    rule = None
    if METHODS[method].takes_base_rule:
        rule = params.get("base_rule", DEFAULT_BASE_RULE)
        if not isinstance(rule, str) or rule not in rule_names():
            raise RecipeError(
                f"base_rule: unknown rule {rule!r}{suggest(rule, rule_names())}. Valid rules: "
                f"{', '.join(rule_names())}"
            )
    own_specs = METHODS[method].parameters
    rule_specs = rule_specs_of(rule) if rule else ()
    valid = [*(p.name for p in own_specs), *(p.name for p in rule_specs)]
    for key in params:
        if key in valid:
            continue
        msg = f"unknown parameter {key!r} for method {method}"
        msg += f" with base_rule {rule}" if rule else ""
        msg += suggest(key, [*valid, *(a for a, c in ALIASES.items() if c in valid)])
        if rule and (others := rules_taking(key)):
            msg += f"; base rules that take {key!r}: {', '.join(others)}"
        elif not rule and key in {p.name for r in rule_names() for p in rule_specs_of(r)}:
            msg += f"; {method} has no base_rule, so rule parameters do not apply"
        spelt = ["lam (lambda)" if v == "lambda" else v for v in valid]
        raise RecipeError(msg + f". Valid here: {', '.join(spelt)}")

    def resolve(p: Any, value: Any, where: str) -> Any:
        if isinstance(value, (list, tuple, dict)):
            raise RecipeError(
                f"{where}: parameter {p.name!r} takes one value here, got {value!r}; per-module "
                "settings (filters, gradients) are for recipes (mergekit-yaml)"
            )
        source = {} if value is None else {p.name: _scalar(value)}
        try:
            return resolve_parameter(p, (source,), tensor_name=p.name, t=0.0)
        except pydantic.ValidationError as exc:
            err = exc.errors()[0]
            raise RecipeError(
                f"{where}: parameter {p.name!r}: {err.get('msg')} (got {err.get('input')!r})"
            ) from None
        except RuntimeError as exc:
            raise RecipeError(f"{where}: {exc}") from None

    own = {p.name: resolve(p, params.get(p.name), "merge_adapters") for p in own_specs}
    values: dict[str, Any] = {}
    for p in rule_specs:
        given = params.get(p.name)
        if p.scope == ParameterScope.SHARED:
            values[p.name] = resolve(p, given, "merge_adapters")
            continue
        if isinstance(given, (list, tuple)):
            if len(given) != len(names):
                raise RecipeError(
                    f"parameter {p.name!r} has {len(given)} values for {len(names)} adapters "
                    f"({', '.join(names)}); give one value per adapter or a single scalar"
                )
            per = list(given)
        else:
            per = [given] * len(names)
        values[p.name] = tuple(
            resolve(p, v, f"adapter {n!r}") for n, v in zip(names, per, strict=True)
        )
    if rule:
        as_lists = {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}
        # As the recipe path: a RecipeError, naming the adapter when one value is at fault.
        try:
            check_rule_params(rule, as_lists, len(names))
        except RuleError as whole:
            for j, n in enumerate(names):
                one = {k: [v[j]] if isinstance(v, list) else v for k, v in as_lists.items()}
                try:
                    check_rule_params(rule, one, 1)
                except RuleError as exc:
                    msg = str(exc).replace(" (adapter 0)", "")
                    raise RecipeError(f"adapter {n!r}: {msg}") from None
            raise RecipeError(str(whole)) from None
    return rule, own, values


# --------------------------------------------------------------------------- factors


def _read_modules(model: Any, names: Sequence[str]) -> dict[str, dict[str, tuple]]:
    """module -> {adapter: (A, B, scaling, _Module)} in the BASE weight's layout, ΔW = s·B·A.

    Same mapping as ``adapters.loading.load_factors`` (which reads files): Linear stores
    A, B as is; Conv1D (fan_in_fan_out) and Embedding store the transposes.
    """
    from peft.tuners.lora import LoraLayer

    from mergekit_ctm.recipe import RecipeError

    out: dict[str, dict[str, tuple]] = {}
    for path, layer in model.base_model.model.named_modules():
        if not isinstance(layer, LoraLayer):
            continue
        for name in names:
            if name in layer.lora_A:
                a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
                kind = "linear"
                fifo = bool(getattr(layer, "fan_in_fan_out", False))
            elif name in layer.lora_embedding_A:
                a, b = layer.lora_embedding_A[name], layer.lora_embedding_B[name]
                kind, fifo = "embedding", False
            else:
                continue
            what = _variant(layer, name)
            if what is None and (a.dim() != 2 or b.dim() != 2):
                what = f"a {a.dim()}-D LoRA ({type(layer).__name__}; conv LoRA)"
            if what:
                raise RecipeError(
                    f"adapter {name!r}, module {path!r}: {what} is not supported; only plain "
                    "LoRA on Linear / Conv1D / Embedding layers can be merged"
                )
            for half, x in (("A", a), ("B", b)):
                # As the file reader: a diverged adapter must not merge into plausible output.
                if not x.is_floating_point() or not bool(torch.isfinite(x).all()):
                    raise RecipeError(
                        f"adapter {name!r}, module {path!r}: lora_{half} is not finite floats "
                        f"({x.dtype}); the adapter is corrupt or its training diverged: "
                        "retrain it or leave it out"
                    )
            if kind == "embedding" or fifo:
                a, b = b.T, a.T
            mod = _Module(name=path, kind=kind, fan_in_fan_out=fifo)
            out.setdefault(path, {})[name] = (
                a.detach(),
                b.detach(),
                float(layer.scaling[name]),
                mod,
            )
    return out


def _variant(layer: Any, name: str) -> str | None:
    if name in getattr(layer, "lora_magnitude_vector", {}):
        return "DoRA"
    if getattr(layer, "lora_bias", {}).get(name):
        return "a lora_B bias"
    variant = getattr(layer, "lora_variant", {}).get(name)
    if variant is not None:
        return f"the LoRA variant {type(variant).__name__}"
    return None


def _merge(
    modules: Mapping[str, Mapping[str, tuple]],
    names: Sequence[str],
    method: str,
    own: Mapping[str, Any],
    rule_values: Mapping[str, Any],
    random_seed: int | None,
    math_dtype: torch.dtype,
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, tuple[str, ...]]]:
    """engine.merge_lora per module, called exactly as the file path's MergeModule calls it."""
    from mergekit_ctm.engine import merge_lora
    from mergekit_ctm.plan.tasks import rule_kwargs
    from mergekit_ctm.recipe import module_seed

    merged, inputs = {}, {}
    params = tuple(own.items())
    for path, per in modules.items():
        idx = [j for j, n in enumerate(names) if n in per]
        rule_params = tuple(
            (k, tuple(v[j] for j in idx) if isinstance(v, tuple) else v)
            for k, v in rule_values.items()
        )
        loaded = [per[names[j]] for j in idx]
        out = merge_lora(
            [f[0].to(math_dtype) for f in loaded],
            [f[1].to(math_dtype) for f in loaded],
            [f[2] for f in loaded],
            method=method,
            rule_params=rule_kwargs(rule_params),
            seed=module_seed(random_seed, path),
            dtype=math_dtype,
            **dict(params),
        )
        merged[path] = (out.A, out.B)
        inputs[path] = tuple(names[j] for j in idx)
    return merged, inputs


# --------------------------------------------------------------------------- the new adapter


def _merged_config(
    model: Any,
    names: Sequence[str],
    modules: Mapping[str, Mapping[str, tuple]],
    ranks: Mapping[str, int],
    r: int,
) -> Any:
    """The LoraConfig the file path writes (adapters.build_adapter_config): r, lora_alpha = r,
    rank_pattern / alpha_pattern = k for modules with k < r directions, target_modules = the
    merged modules' paths, no rsLoRA, no modules_to_save."""
    from peft import LoraConfig

    from mergekit_ctm.adapters import build_adapter_config

    configs = [model.peft_config[n] for n in names]

    def agreed(attr: str) -> Any:
        vals = {getattr(getattr(c, attr), "value", getattr(c, attr)) for c in configs}
        return vals.pop() if len(vals) == 1 else None

    fifo = any(m.fan_in_fan_out for per in modules.values() for *_, m in per.values())
    data = build_adapter_config(
        ranks,
        rank=r,
        modules_to_save=(),
        fan_in_fan_out=fifo,
        base_model_name_or_path=agreed("base_model_name_or_path"),
        task_type=agreed("task_type"),
    )
    return LoraConfig.from_peft_type(**data)


def _add_adapter(
    model: Any,
    adapter_name: str,
    config: Any,
    merged: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    modules: Mapping[str, Mapping[str, tuple]],
) -> None:
    """model.add_adapter, then the merged factors into its lora_A / lora_B (PEFT's layout).

    On failure the new adapter is deleted again; requires_grad flags and the active adapter
    are restored either way (PEFT's injection may touch them).
    """
    from mergekit_ctm.adapters import peft_tensor_names, to_peft_tensors

    grads = {id(p): p.requires_grad for p in model.parameters()}
    active = list(model.base_model.active_adapters)
    try:
        model.add_adapter(adapter_name, config)
        tuner = model.base_model.model
        for path, (a, b) in merged.items():
            ref, _, _, mod = next(iter(modules[path].values()))
            stored = to_peft_tensors(mod, a, b)
            pa, pb = (stored[k] for k in peft_tensor_names(mod))
            layer = tuner.get_submodule(path)
            if mod.kind == "embedding":
                ta, tb = layer.lora_embedding_A[adapter_name], layer.lora_embedding_B[adapter_name]
            else:
                ta, tb = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
            if ta.shape != pa.shape or tb.shape != pb.shape:
                raise RuntimeError(
                    f"module {path!r}: PEFT created factors {tuple(ta.shape)} / {tuple(tb.shape)} "
                    f"for {adapter_name!r}, the merge produced {tuple(pa.shape)} / "
                    f"{tuple(pb.shape)} (rank_pattern not applied?)"
                )
            # The device and dtype of the first input's factors (add_adapter would upcast).
            ta.data = pa.to(device=ref.device, dtype=ref.dtype)
            tb.data = pb.to(device=ref.device, dtype=ref.dtype)
    except BaseException:
        if adapter_name in model.peft_config:
            model.delete_adapter(adapter_name)
        raise
    finally:
        if list(model.base_model.active_adapters) != active:
            model.base_model.set_adapter(active)
        for p in model.parameters():
            p.requires_grad_(grads.get(id(p), False))


__all__ = ["MergedAdapter", "merge_adapters"]
