"""Validate a whole recipe and every adapter before any tensor is read; build the merge plan.

Parameters are resolved per module exactly as mergekit resolves them per tensor
(``mergekit.parameter_resolver.resolve_parameter`` over the sources adapter > recipe, with
``filter:`` conditions matched against the base weight name and gradients evaluated at
t = layer / (num_layers − 1), t = 1 for a single layer, t = 0 outside the layer stack, as in
mergekit's ``MergePlanner``).
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import types
import typing
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pydantic
from mergekit.config import ConditionalParameter, evaluate_setting
from mergekit.merge_methods.base import ParameterScope, ParameterSpec
from mergekit.parameter_resolver import resolve_parameter

from mergekit_ctm.adapters.errors import AdapterError
from mergekit_ctm.adapters.peft_lora import AdapterInfo, read_adapter
from mergekit_ctm.engine import rules as rules_mod
from mergekit_ctm.engine.methods import DEFAULT_BASE_RULE, METHOD_NAMES, METHODS
from mergekit_ctm.engine.rules import RuleError, rule_names
from mergekit_ctm.recipe.model import (
    Recipe,
    RecipeError,
    drop_nulls,
    join_errors,
    parse_recipe,
    suggest,
)
from mergekit_ctm.recipe.params import rule_specs, rules_taking

_LAYER_RE = re.compile(r"\.(\d+)(?:\.|$)")


@dataclass(frozen=True)
class ModulePlan:
    """One LoRA target module: which adapters have it and the resolved parameters."""

    name: str
    kind: str
    n_out: int
    m_in: int
    fan_in_fan_out: bool
    adapters: tuple[int, ...]
    ranks: tuple[int, ...]
    params: tuple[tuple[str, Any], ...]  # the method's own, resolved (rank, beta, lambda, ...)
    rule_params: tuple[tuple[str, Any], ...]  # base-rule parameters; per-adapter ones as tuples
    seed: int
    t: float
    key_A: str  # PEFT tensor names of the output
    key_B: str

    @property
    def weight_name(self) -> str:
        return f"{self.name}.weight"

    def param(self, name: str, default: Any = None) -> Any:
        return dict(self.params).get(name, default)


@dataclass(frozen=True)
class DensePlan:
    """A modules_to_save / bias tensor saved by some adapters, merged with the dense rule."""

    key: str
    weight_name: str
    role: str
    shape: tuple[int, ...]
    sources: tuple[tuple[int, str], ...]  # (adapter index, key in that adapter)
    rule: str
    rule_params: tuple[tuple[str, Any], ...]
    seed: int


@dataclass
class MergePlan:
    recipe: Recipe
    recipe_text: str
    method: str
    base_rule: str | None
    adapters: tuple[AdapterInfo, ...]
    base_model: str | None
    num_layers: int
    modules: tuple[ModulePlan, ...]
    dense: tuple[DensePlan, ...]
    random_seed: int | None
    notes: list[str] = field(default_factory=list)
    # How base_model was found (see locate_base): "local", "cached", "hub", "missing", or None
    # without a base. Only "local" and "cached" were read; "hub" and "missing" are unchecked.
    base_status: str | None = None
    # num_layers was read from the base's config.json (else counted from the module names).
    num_layers_from_base: bool = False
    # The local directory holding the base's weights: base_model itself when it is a local
    # directory; for output: model with a hub id, its snapshot in the local Hugging Face cache
    # (resolved offline). None when the base's weights are not read.
    base_path: str | None = None

    @property
    def output(self) -> str:
        return self.recipe.output

    @property
    def dtype(self) -> str:
        return self.recipe.dtype or "float32"

    @property
    def out_dtype(self) -> str:
        return self.recipe.out_dtype or self.dtype


def _freeze(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


def module_seed(random_seed: int | None, name: str) -> int:
    """Per-module seed: CRC-32 of (random_seed, module name), stable across runs and orders."""
    return zlib.crc32(f"{0 if random_seed is None else int(random_seed)}:{name}".encode())


def layer_t(name: str, num_layers: int) -> float:
    """mergekit's gradient position: layer / (num_layers − 1); 1 for one layer; 0 outside."""
    m = _LAYER_RE.search(name)
    if m is None:
        return 0.0
    if num_layers <= 1:
        return 1.0
    return min(1.0, int(m.group(1)) / (num_layers - 1))


def _num_layers(base_config: str | None, module_names: Sequence[str]) -> tuple[int, bool]:
    """(number of layers, read from the base's config.json?) for gradients; without a readable
    base config, one more than the highest layer index among the module names."""
    if base_config and os.path.isfile(base_config):
        with open(base_config, encoding="utf-8") as f:
            cfg = json.load(f)
        for key in ("num_hidden_layers", "n_layer", "num_layers"):
            if isinstance(cfg.get(key), int):
                return cfg[key], True
    idx = [int(m.group(1)) for n in module_names if (m := _LAYER_RE.search(n))]
    return (max(idx) + 1 if idx else 1), False


def _where(model: int | None, adapters: Sequence[Any]) -> str:
    return "parameters" if model is None else f"models[{model}] ({adapters[model]}).parameters"


@dataclass(frozen=True)
class Level:
    """One ``parameters:`` mapping of a recipe: where it is (as the messages name it), its
    values, and whether it belongs to one input model (``models[i]``, a slice source) or is
    recipe-wide (the top level, a slice, a module)."""

    label: str
    scope: Mapping[str, Any] | None
    per_input: bool
    top: bool = False


def _adapter_levels(recipe: Recipe) -> list[Level]:
    return [Level("parameters", recipe.parameters, False, True)] + [
        Level(f"models[{i}] ({m.model}).parameters", m.parameters, True)
        for i, m in enumerate(recipe.models)
    ]


def _check_parameter_names(
    recipe: Recipe, method: str, rule: str | None, extra: Sequence[ParameterSpec] = ()
) -> None:
    _check_level_names(_adapter_levels(recipe), method, rule, extra)


def _check_level_names(
    levels: Sequence[Level],
    method: str,
    rule: str | None,
    extra: Sequence[ParameterSpec] = (),
    noun: str = "adapter",
) -> None:
    """Every parameter name at every level is one the method or its base rule takes there:
    recipe-wide levels take both, per-input levels only the rule's per-input ones (weight,
    density, ...); ``base_rule`` only at the top level. ``noun``: what an input is called."""
    own = {p.name: p for p in (*METHODS[method].parameters, *extra)}
    by_rule = {p.name: p for p in (rule_specs(rule) if rule else ())}
    per_input = {n for n, p in by_rule.items() if p.scope != ParameterScope.SHARED}
    errors = []

    def unknown(name: str, where: str, valid: Sequence[str]) -> str:
        msg = f"{where}: unknown parameter {name!r} for merge_method {method}"
        if rule:
            msg += f" with base_rule {rule}"
        msg += suggest(name, valid)
        if rule and name not in valid and (others := rules_taking(name)):
            msg += f"; base rules that take {name!r}: {', '.join(others)}"
        elif not METHODS[method].takes_base_rule and name in _all_rule_parameter_names():
            msg += f"; {method} has no base_rule, so rule parameters do not apply"
        return msg + f". Valid here: {', '.join(valid) or '(none)'}"

    for level in levels:
        where = level.label
        names = list(level.scope or {})
        if not level.per_input:
            for name in names:
                if name not in own and name not in by_rule:
                    errors.append(unknown(name, where, [*own, *by_rule]))
                elif name == "base_rule" and not level.top:
                    errors.append(
                        f"{where}: base_rule is set once for the whole recipe; move it to the "
                        "top-level `parameters:`"
                    )
            continue
        if names and not per_input:
            what = f"base_rule {rule}" if rule else f"merge_method {method}"
            errors.append(
                f"{where}: {what} takes no per-{noun} parameters (got "
                f"{', '.join(map(repr, names))}); remove the {noun}'s `parameters:`"
                + (
                    f" or pick a base_rule that has them (e.g. "
                    f"{', '.join(rules_taking('weight')[:3])})"
                    if METHODS[method].takes_base_rule
                    else ""
                )
            )
            continue
        for name in names:
            if name in per_input:
                continue
            if name in own or name in by_rule:
                errors.append(
                    f"{where}: {name!r} is a recipe-wide parameter, not a per-{noun} one; move "
                    "it to the top-level `parameters:`"
                )
            else:
                errors.append(unknown(name, where, sorted(per_input)))
    if errors:
        raise RecipeError(join_errors("invalid recipe parameters", errors))


def _all_rule_parameter_names() -> set[str]:
    return {p.name for r in rule_names() for p in rule_specs(r)}


def _base_rule(recipe: Recipe, method: str) -> str | None:
    return _base_rule_of(recipe.parameters, method)


def _base_rule_of(parameters: Mapping[str, Any] | None, method: str) -> str | None:
    """The top-level ``parameters.base_rule`` (default: DEFAULT_BASE_RULE), checked."""
    if not METHODS[method].takes_base_rule:
        return None
    value = (parameters or {}).get("base_rule", DEFAULT_BASE_RULE)
    if not isinstance(value, str):
        raise RecipeError(
            f"parameters.base_rule must be a single rule name for the whole recipe, got {value!r}"
        )
    valid = rule_names()
    if value not in valid:
        raise RecipeError(
            f"parameters.base_rule: unknown rule {value!r}{suggest(value, valid)}. "
            f"Valid rules: {', '.join(valid)}"
        )
    return value


def _read_adapters(recipe: Recipe, cache_dir: str | None) -> tuple[AdapterInfo, ...]:
    infos, errors = [], []
    for i, entry in enumerate(recipe.models):
        try:
            infos.append(read_adapter(entry.model, cache_dir=cache_dir))
        except AdapterError as exc:
            errors.append(f"models[{i}]: {exc}")
    if errors:
        raise RecipeError(join_errors("cannot read adapter(s)", errors))
    return tuple(infos)


# owner/name[@revision] as the Hugging Face hub spells repository ids; a bare name (legacy ids
# such as gpt2) counts as a hub id only when it is in the local cache.
_HUB_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+")
_LEGACY_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
BASE_FIX = (
    "set base_model to the base model's local directory or hub id, or leave it out to use "
    "the adapters' base_model_name_or_path"
)


def locate_base(ref: str, cache_dir: str | None = None) -> tuple[str, str | None]:
    """(status, path of its config.json or None) of a base model reference, offline.

    status: "local" (an existing directory), "cached" (a hub id ``owner/name[@rev]``, or a
    legacy bare id such as ``gpt2``, whose config.json is in the local Hugging Face cache),
    "hub" (an ``owner/name`` id not in the cache: not checked, since merging adapters needs no
    base on disk), "file" (an existing file, not a model directory) or "missing" (anything
    else that does not exist: an absolute or ./relative path, a path with more slashes, a bare
    name not in the cache).
    """
    if os.path.isdir(ref):
        return "local", os.path.join(ref, "config.json")
    if os.path.exists(ref):
        return "file", None
    repo, _, revision = ref.partition("@")
    hub_id = bool(_HUB_ID.fullmatch(repo))
    if not hub_id and not _LEGACY_ID.fullmatch(repo):
        return "missing", None
    try:
        import huggingface_hub

        hit = huggingface_hub.try_to_load_from_cache(
            repo, "config.json", cache_dir=cache_dir, revision=revision or None
        )
    except Exception:
        hit = None
    if isinstance(hit, str):
        return "cached", hit
    return ("hub", None) if hub_id else ("missing", None)


def _check_base_exists(
    ref: str, where: str, cache_dir: str | None, fix: str = BASE_FIX
) -> tuple[str, str | None]:
    """locate_base, refusing a base that is a file or does not exist."""
    status, config = locate_base(ref, cache_dir)
    if status == "file":
        raise RecipeError(f"{where}: {ref!r} is a file, not a model directory; {fix}")
    if status == "missing":
        raise RecipeError(f"{where}: {ref!r} does not exist; {fix}")
    return status, config


def _same_base(a: str, b: str) -> bool:
    if os.path.isdir(a) and os.path.isdir(b):
        return os.path.samefile(a, b)
    return a.rstrip("/") == b.rstrip("/")


def _base_model(
    recipe: Recipe,
    adapters: Sequence[AdapterInfo],
    cache_dir: str | None,
    given: tuple[str, str | None] | None,
) -> tuple[str | None, str | None, str | None, list[str]]:
    """(base model, status, its config.json or None, notes); ``given``: locate_base of the
    recipe's ``base_model``, already checked to exist.

    The recipe's ``base_model`` and the base of a ``base+adapter`` reference were written by
    the user: one that does not exist is an error (``build_plan`` checks the recipe's before
    reading any adapter), and a ``base+adapter`` base that differs from ``base_model`` is
    refused. A base taken from the adapters' ``base_model_name_or_path`` was written by the
    training machine: a local path that does not exist here is only a note; the output keeps
    it as its own ``base_model_name_or_path`` (what the inputs say), and the plan marks it
    ``"missing"`` (not read, no layer count, no shape check).
    """
    notes: list[str] = []
    for i, info in enumerate(adapters):
        if not info.base_ref:
            continue
        where = f"models[{i}] ({info.ref}): base"
        _check_base_exists(
            info.base_ref,
            where,
            cache_dir,
            "give the base model's local directory or hub id before the '+', or drop the base+",
        )
        if recipe.base_model and not _same_base(info.base_ref, recipe.base_model):
            raise RecipeError(
                f"{where} {info.base_ref!r} differs from base_model {recipe.base_model!r}; all "
                "adapters merge onto one base: make them the same, or drop the base+ prefix"
            )
    if recipe.base_model and given is not None:
        (status, config), base = given, recipe.base_model
    else:
        named = {a.base_ref for a in adapters if a.base_ref} or {
            a.base_model_name_or_path for a in adapters if a.base_model_name_or_path
        }
        if len(named) > 1:
            raise RecipeError(
                f"the adapters name different base models ({', '.join(sorted(named))}); set "
                "`base_model:` in the recipe to the one they were all trained on"
            )
        base = next(iter(named), None)
        if base is None:
            return None, None, None, notes
        status, config = locate_base(base, cache_dir)
        if status in ("missing", "file"):
            status, config = "missing", None
            notes.append(
                f"base model {base!r} (the adapters' base_model_name_or_path) is not on this "
                "machine: not checked; set base_model to check the adapters against it"
            )
    if status == "hub":
        notes.append(f"base model {base!r}: hub id, not checked offline")
    return base, status, config, notes


def _base_shapes(base_model: str) -> dict[str, tuple[int, ...]] | None:
    """Base tensor shapes from safetensors headers of a local base model (None if not local)."""
    if not os.path.isdir(base_model):
        return None
    from mergekit.io import ShardedTensorIndex

    from mergekit_ctm.adapters.peft_lora import read_safetensors_header

    try:
        index = ShardedTensorIndex.from_disk(base_model)
    except Exception:
        return None
    shapes: dict[str, tuple[int, ...]] = {}
    for shard in {os.path.join(base_model, p) for p in index.tensor_paths.values()}:
        if shard.endswith(".safetensors"):
            for k, meta in read_safetensors_header(shard, what="base model: ").items():
                shapes[k] = tuple(meta["shape"])
    return shapes or None


# --------------------------------------------------------------------------- parameter values

# YAML 1.1 (PyYAML, so mergekit) reads `1e-3` as a string; mergekit takes it as a number.
_SCIENTIFIC = re.compile(r"[-+]?(\d+(\.\d*)?|\.\d+)[eE][-+]?\d+")
_EXPECTED = {
    "int": "an integer",
    "float": "a number",
    "bool": "true or false",
    "str": "a string",
}


def _kind(value_type: Any) -> str | None:
    """'int' | 'float' | 'bool' | 'str' for a ParameterSpec value type; None if mixed/unknown."""
    origin = typing.get_origin(value_type)
    if origin is typing.Annotated:
        return _kind(typing.get_args(value_type)[0])
    if origin in (typing.Union, types.UnionType):
        kinds = {_kind(a) for a in typing.get_args(value_type) if a is not type(None)}
        return kinds.pop() if len(kinds) == 1 else None
    if origin is typing.Literal:
        args = typing.get_args(value_type)
        return "str" if all(isinstance(a, str) for a in args) else None
    return {bool: "bool", int: "int", float: "float", str: "str"}.get(value_type)


def _leaves(setting: Any) -> Iterator[tuple[str, Any]]:
    """(where inside the setting, value) for every scalar a parameter setting holds."""
    if isinstance(setting, ConditionalParameter):
        setting = [setting]
        single = True
    else:
        single = False
    if not isinstance(setting, list):
        yield "", setting
        return
    for k, item in enumerate(setting):
        if isinstance(item, ConditionalParameter):
            cond = f"filter {item.filter!r}" if item.filter is not None else "no filter"
            if not single:
                cond = f"entry {k + 1}, {cond}"
            for inner, value in _leaves(item.value):
                yield f"{cond}, {inner}" if inner else cond, value
        else:
            yield f"gradient value {k + 1} of {len(setting)}", item


def _shown(value: Any) -> str:
    """A value as the recipe spells it (true, 16.0, '16')."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)


def _value_error(p: ParameterSpec, value: Any) -> str | None:
    """Why one value written in the recipe is not valid for ``p``, or None when it is.

    No coercion: an integer parameter takes an integer (not true, 16.0 or "16"), a number
    parameter a number (an integer is fine; not true or "0.5"), and every number is finite.
    The rule's own range checks (density in [0, 1], ...) run per module in ``_check_rule``,
    with the other parameters' values for that module.
    """
    kind = _kind(p.value_type)
    v = value
    if kind == "float" and isinstance(v, str) and _SCIENTIFIC.fullmatch(v.strip()):
        v = float(v)
    ok = {
        "int": type(v) is int,
        "float": isinstance(v, (int, float)) and not isinstance(v, bool),
        "bool": isinstance(v, bool),
        "str": isinstance(v, str),
    }.get(kind or "", True)
    if not ok:
        what = {bool: "a boolean", int: "an integer", float: "a float", str: "a string"}
        fix = ""
        if isinstance(v, str) and kind in ("int", "float"):
            fix = "; write the number without quotes"
        elif kind == "int" and isinstance(v, float) and v.is_integer():
            fix = f"; write {int(v)}"
        got = what.get(type(value), type(value).__name__)
        return f"must be {_EXPECTED[kind]}, got {_shown(value)} ({got}){fix}"
    if kind == "float" and not math.isfinite(v):
        return f"must be a finite number, got {_shown(value)}"
    try:
        p.validate(v)
    except pydantic.ValidationError as exc:
        return f"{exc.errors()[0].get('msg')} (got {_shown(value)})"
    return None


def _check_values(recipe: Recipe, own_specs: Sequence[ParameterSpec], rule: str | None) -> None:
    """Every value written under ``parameters:`` (recipe and adapters), leaf by leaf, before any
    adapter is read: the error names the level where the value was set, never a module."""
    _check_level_values(_adapter_levels(recipe), own_specs, rule)


def _check_level_values(
    levels: Sequence[Level], own_specs: Sequence[ParameterSpec], rule: str | None
) -> None:
    by_name = {p.name: p for p in (*own_specs, *(rule_specs(rule) if rule else ()))}
    errors = []
    for level, scope in ((lv.label, lv.scope) for lv in levels):
        for name, setting in (scope or {}).items():
            p = by_name.get(name)
            if p is None or name == "base_rule":  # names and base_rule are checked already
                continue
            for inner, value in _leaves(setting):
                why = _value_error(p, value)
                if why is not None:
                    errors.append(f"{level}: {name!r}{f' ({inner})' if inner else ''}: {why}")
    if len(errors) == 1:
        raise RecipeError(errors[0])  # it names its level already
    if errors:
        raise RecipeError(join_errors("invalid parameter values", errors))


@dataclass(frozen=True)
class _Source:
    """Where a resolved value was set: the level's label, and whether it was one plain value
    (else a ``filter:`` list or a gradient, which can differ per module)."""

    level: str
    scalar: bool


Sources = Sequence[tuple[str, Mapping[str, Any] | None]]


def _source(p: ParameterSpec, sources: Sources, tensor_name: str, t: float) -> _Source | None:
    """The level whose setting mergekit's resolver takes for this tensor (None: the default)."""
    for level, scope in sources:
        if scope is None or p.name not in scope:
            continue
        setting = scope[p.name]
        scalar = not isinstance(setting, (list, ConditionalParameter))
        try:
            found = evaluate_setting(tensor_name, setting, t, validate=p.validate) is not None
        except (pydantic.ValidationError, RuntimeError):
            found = True  # it fails here: this level is to blame
        if found:
            return _Source(level, scalar)
    return None


def _resolve(p: ParameterSpec, sources: Sources, tensor_name: str, t: float) -> Any:
    """The value exactly as mergekit resolves it; every float must be finite. An error names
    the level that set the value (found only then: resolution stays one pass)."""

    def fail(why: str) -> RecipeError:
        src = _source(p, sources, tensor_name, t)
        level = src.level if src is not None else sources[-1][0]
        at = "" if src is None or src.scalar else f" at {tensor_name} (from a filter or gradient)"
        return RecipeError(f"{level}: {p.name!r}{at}: {why}")

    try:
        value = resolve_parameter(p, [scope for _, scope in sources], tensor_name=tensor_name, t=t)
    except pydantic.ValidationError as exc:
        err = exc.errors()[0]
        raise fail(f"{err.get('msg')} (got {err.get('input')!r})") from None
    except RuntimeError as exc:
        raise fail(str(exc)) from None
    if isinstance(value, float) and not math.isfinite(value):
        raise fail(f"must be a finite number, got {value}")
    return value


def _sources(recipe: Recipe, p: ParameterSpec, i: int) -> Sources:
    """Where adapter i's value of ``p`` may be set, in mergekit's precedence order."""
    top = ("parameters", recipe.parameters)
    if p.scope == ParameterScope.SHARED:
        return (top,)
    return (
        (f"models[{i}] ({recipe.models[i].model}).parameters", recipe.models[i].parameters),
        top,
    )


def _rule_values(
    rule_spec: Sequence[ParameterSpec],
    recipe: Recipe,
    adapters: Sequence[int],
    tensor_name: str,
    t: float,
) -> dict[str, Any]:
    """Shared values as scalars, per-adapter ones as tuples over ``adapters``."""
    out: dict[str, Any] = {}
    for p in rule_spec:
        if p.scope == ParameterScope.SHARED:
            out[p.name] = _resolve(p, _sources(recipe, p, -1), tensor_name, t)
        else:
            out[p.name] = tuple(
                _resolve(p, _sources(recipe, p, i), tensor_name, t) for i in adapters
            )
    return out


@functools.cache
def _rule_accepts(rule: str, count: int, values: tuple) -> str | None:
    """None if ``rule`` merges ``count`` inputs with these values, else why not: the rule run
    once on tiny zero matrices (input-count contracts such as model_stock's or nuslerp's live
    in the rule itself)."""
    import torch

    params = {k: list(v) if isinstance(v, tuple) else v for k, v in values}
    try:
        rules_mod.merge_matrices([torch.zeros(2, 2)] * count, rule, params, seed=0)
    except RuleError as exc:
        return str(exc)
    return None


def _check_rule_inputs(rule: str, count: int, values: tuple, module: str) -> None:
    if (why := _rule_accepts(rule, count, values)) is not None:
        raise RecipeError(
            f"base_rule {rule} cannot merge the {count} adapter(s) of module {module}: {why}. "
            "Pick another base_rule for this many adapters"
        )


def _check_rule(
    rule: str,
    values: dict[str, Any],
    recipe: Recipe,
    idx: Sequence[int],
    module: str,
    tensor_name: str,
    t: float,
) -> None:
    """The rule's own checks (ranges, density ± epsilon, ...) on one module's values.

    A failure names the level where the offending values were set (the recipe's
    ``parameters`` or ``models[i]``), and the module only when one of them came from a
    ``filter:`` list or a gradient, so it can differ between modules.
    """
    bind = rules_mod.check_rule_params
    rule_spec = {p.name: p for p in rule_specs(rule)}
    as_lists = {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}
    try:
        bind(rule, as_lists, len(idx))
        _check_rule_inputs(rule, len(idx), _freeze(tuple(sorted(values.items()))), module)
        return
    except RuleError as exc:
        whole = exc
    for j, i in enumerate(idx):
        one = {k: [v[j]] if isinstance(v, list) else v for k, v in as_lists.items()}
        try:
            bind(rule, one, 1)
            continue
        except RuleError as exc:
            msg = str(exc).replace(" (adapter 0)", "")
        used = {
            k: _source(rule_spec[k], _sources(recipe, rule_spec[k], i), tensor_name, t) for k in one
        }
        # The set values whose reset to the default makes the check pass are the culprits.
        culprits = []
        for k, src in used.items():
            if src is None:
                continue
            try:
                bind(rule, {**one, k: rule_spec[k].default}, 1)
                culprits.append(src)
            except RuleError:
                pass
        culprits = culprits or [s for s in used.values() if s is not None]
        own = [s for s in culprits if s.level != "parameters"]
        level = own[0].level if own else "parameters"
        at = "" if all(s.scalar for s in culprits) else f", module {module}"
        raise RecipeError(f"{level}{at}: {msg}") from None
    raise RecipeError(f"module {module}: {whole}") from None


def build_plan(
    source: str | dict[str, Any] | Recipe,
    *,
    random_seed: int | None = None,
    cache_dir: str | None = None,
) -> MergePlan:
    """Validate the recipe and every adapter (headers only) and resolve parameters per module.

    ``random_seed`` (``--random-seed``) wins over the recipe's ``random_seed:``."""
    if isinstance(source, Recipe):
        recipe, text = source, source.model_dump_json()
    else:
        recipe = parse_recipe(source)
        text = source if isinstance(source, str) else json.dumps(source)
    if random_seed is None:
        random_seed = recipe.random_seed
    method = recipe.merge_method
    if method not in METHOD_NAMES:
        raise RecipeError(
            f"merge_method: {method!r} is not an adapter-merging method"
            f"{suggest(method, METHOD_NAMES)}; "
            f"valid: {', '.join(METHOD_NAMES)}"
        )
    rule = _base_rule(recipe, method)
    _check_parameter_names(recipe, method, rule)
    _check_values(recipe, METHODS[method].parameters, rule)
    given = None
    if recipe.base_model:  # before any adapter is read (or downloaded)
        given = _check_base_exists(recipe.base_model, "base_model", cache_dir)
    adapters = _read_adapters(recipe, cache_dir)
    labels = [a.ref for a in adapters]
    base_model, base_status, base_config, notes = _base_model(recipe, adapters, cache_dir, given)
    base_path = _check_base_for(recipe, adapters, base_model, base_status, cache_dir)

    # Union of target modules, in natural order of first appearance.
    owners: dict[str, list[int]] = {}
    for i, info in enumerate(adapters):
        for name in info.modules:
            owners.setdefault(name, []).append(i)
    num_layers, layers_from_base = _num_layers(base_config, list(owners))
    modules = tuple(
        _module_plan(recipe, adapters, method, rule, name, idx, num_layers, random_seed)
        for name, idx in owners.items()
    )
    dense = _dense_plans(recipe, adapters, labels, method, rule, num_layers, random_seed)
    return MergePlan(
        recipe=recipe,
        recipe_text=text,
        method=method,
        base_rule=rule,
        adapters=adapters,
        base_model=base_model,
        num_layers=num_layers,
        modules=modules,
        dense=dense,
        random_seed=random_seed,
        notes=notes,
        base_status=base_status,
        num_layers_from_base=layers_from_base,
        base_path=base_path,
    )


def _check_base_for(
    recipe: Recipe,
    adapters: Sequence[AdapterInfo],
    base_model: str | None,
    status: str | None,
    cache_dir: str | None,
) -> str | None:
    """The base's local directory (see ``MergePlan.base_path``), after checking every
    adapter's shapes against it. output: model needs the base's weights: a local directory,
    or a hub id whose snapshot is in the local Hugging Face cache (never downloaded)."""
    path = base_model if base_model and status == "local" else None
    if recipe.output == "model":
        if base_model is None or status in ("missing", "file"):
            where = (
                "no base model is named"
                if base_model is None
                else (f"base model {base_model!r} is not on this machine")
            )
            raise RecipeError(
                f"output: model needs the base model's weights, but {where}. Set `base_model:` "
                "to a local copy of the base model, or to its hub id in the local cache"
            )
        if path is None:
            path = cached_base_snapshot(base_model, cache_dir)
        _check_base_weights(base_model, path)
    if path is not None and (shapes := _base_shapes(path)) is not None:
        from mergekit_ctm.adapters.peft_lora import check_against_base

        for i, info in enumerate(adapters):
            try:
                check_against_base(info, shapes)
            except AdapterError as exc:
                raise RecipeError(f"models[{i}]: {exc}") from None
    return path


def cached_base_snapshot(ref: str, cache_dir: str | None = None) -> str:
    """The snapshot directory of hub id ``owner/name[@revision]`` in the local Hugging Face
    cache (``huggingface_hub.snapshot_download(local_files_only=True)``: never the network).
    Not cached: RecipeError naming the id and the fix."""
    repo, _, revision = ref.partition("@")
    try:
        import huggingface_hub

        return huggingface_hub.snapshot_download(
            repo, revision=revision or None, cache_dir=cache_dir, local_files_only=True
        )
    except Exception:
        from huggingface_hub import constants

        raise RecipeError(
            f"output: model: base model {ref!r} is not in the local Hugging Face cache "
            f"({cache_dir or constants.HF_HUB_CACHE}); the merge never downloads it: download "
            f"it first (`hf download {repo}"
            + (f" --revision {revision}" if revision else "")
            + "`) or set `base_model:` to a local directory"
        ) from None


def _check_base_weights(ref: str, path: str) -> None:
    """The base directory has safetensors or .bin weights, every shard of its index present
    (a cache may hold only a model's config.json)."""
    from mergekit.io import ShardedTensorIndex

    fix = "download the whole model, or set `base_model:` to a local directory that has it"
    try:
        index = ShardedTensorIndex.from_disk(path)
    except Exception:
        raise RecipeError(
            f"output: model: base model {ref!r} has no weights at {path} (no model.safetensors, "
            f"pytorch_model.bin or their .index.json); {fix}"
        ) from None
    shards = set(index.tensor_paths.values())
    missing = sorted(f for f in shards if not os.path.isfile(os.path.join(path, f)))
    if missing:
        raise RecipeError(
            f"output: model: base model {ref!r} lacks shard(s) {', '.join(missing[:3])} at "
            f"{path}; {fix}"
        )


def _module_plan(
    recipe: Recipe,
    adapters: Sequence[AdapterInfo],
    method: str,
    rule: str | None,
    name: str,
    idx: Sequence[int],
    num_layers: int,
    random_seed: int | None,
) -> ModulePlan:
    """One module: the adapters that have it agree on its shape; its parameters resolved."""
    first = adapters[idx[0]].modules[name]
    for i in idx[1:]:
        other = adapters[i].modules[name]
        if (other.kind, other.n_out, other.m_in) != (first.kind, first.n_out, first.m_in):
            raise RecipeError(
                f"module {name!r}: adapter {adapters[idx[0]].ref!r} gives a {first.kind} ΔW of "
                f"shape {(first.n_out, first.m_in)} but adapter {adapters[i].ref!r} gives "
                f"{other.kind} {(other.n_out, other.m_in)}; the adapters must share one base model"
            )
    tensor_name = first.weight_name
    t = layer_t(name, num_layers)
    own = {
        p.name: _resolve(p, (("parameters", recipe.parameters),), tensor_name, t)
        for p in METHODS[method].parameters
    }
    rvals = _rule_values(rule_specs(rule) if rule else (), recipe, idx, tensor_name, t)
    if rule:
        _check_rule(rule, rvals, recipe, idx, name, tensor_name, t)
    return ModulePlan(
        name=name,
        kind=first.kind,
        n_out=first.n_out,
        m_in=first.m_in,
        fan_in_fan_out=first.fan_in_fan_out,
        adapters=tuple(idx),
        ranks=tuple(adapters[i].modules[name].r for i in idx),
        params=tuple((k, _freeze(v)) for k, v in own.items()),
        rule_params=tuple((k, _freeze(v)) for k, v in rvals.items()),
        seed=module_seed(random_seed, name),
        t=t,
        key_A=first.key_A,
        key_B=first.key_B,
    )


def dense_rule(method: str, rule: str | None) -> str:
    """Rule for modules_to_save / bias tensors: the base rule, or a plain average without one."""
    return rule if rule is not None else "linear"


def _dense_plans(
    recipe: Recipe,
    adapters: Sequence[AdapterInfo],
    labels: Sequence[str],
    method: str,
    rule: str | None,
    num_layers: int,
    random_seed: int | None,
) -> tuple[DensePlan, ...]:
    by_name: dict[str, list[tuple[int, Any]]] = {}
    for i, info in enumerate(adapters):
        for ft in info.full_tensors.values():
            if ft.role in ("modules_to_save", "bias"):
                by_name.setdefault(ft.weight_name, []).append((i, ft))
    out = []
    drule = dense_rule(method, rule)
    rule_spec = rule_specs(drule)
    for weight_name, items in by_name.items():
        first = items[0][1]
        for i, ft in items[1:]:
            if ft.shape != first.shape:
                raise RecipeError(
                    f"tensor {weight_name!r}: adapter {labels[items[0][0]]!r} saves shape "
                    f"{first.shape} but adapter {labels[i]!r} saves {ft.shape}"
                )
        idx = tuple(i for i, _ in items)
        t = layer_t(weight_name, num_layers)
        # Per-adapter values of the base rule apply to dense tensors too (weight, density, ...).
        rvals = _rule_values(rule_spec, recipe, idx, weight_name, t) if drule == rule else {}
        out.append(
            DensePlan(
                key=first.key,
                weight_name=weight_name,
                role=first.role,
                shape=first.shape,
                sources=tuple((i, ft.key) for i, ft in items),
                rule=drule,
                rule_params=tuple((k, _freeze(v)) for k, v in rvals.items()),
                seed=module_seed(random_seed, weight_name),
            )
        )
    return tuple(out)


def check_tensor_values(plan: MergePlan) -> None:
    """Read every tensor the merge will read (each adapter's LoRA factors and the
    modules_to_save / bias tensors the plan merges), one at a time, and raise RecipeError on
    the first NaN/Inf, or on a value the cast to the recipe's ``dtype`` overflows.

    ``build_plan`` reads headers only; this is the data check of ``mergekit-ctm validate``.
    The merge itself checks each tensor as it loads it (``adapters.loading``), so a merge
    never writes an output from non-finite input even without this call.
    """
    import torch

    from mergekit_ctm.adapters.loading import check_values

    dtype = torch.float64 if plan.dtype == "float64" else torch.float32  # the math dtype
    for i, info in enumerate(plan.adapters):
        keys = [k for d in plan.dense for j, k in d.sources if j == i]
        try:
            check_values(info, keys, dtype=dtype)
        except AdapterError as exc:
            raise RecipeError(f"models[{i}]: {exc}") from None


def check_full_checkpoint_recipe(raw: Mapping[str, Any]) -> None:
    """Check a recipe of ``ctm``/``core_space``/``mtc``/``lora_lego`` over full checkpoints
    before mergekit plans it, as strictly as adapter recipes and with the same messages:

    - every key mergekit's ``MergeConfiguration`` would silently drop (top level, ``models[i]``,
      ``slices[i]``, ``slices[i].sources[j]``, ``modules.<name>``, ``tokenizer``, the
      ``{value, filter}`` of a parameter), with the nearest valid name (:func:`unknown_keys`);
      ``random_seed:`` is an integer (``--random-seed`` wins over it, integration/dispatch.py);
    - the pydantic types of ``dtype``/``out_dtype``/``parameters`` of adapter recipes;
    - parameter names and values at every level (:class:`Level`): the top level, slices and
      modules (recipe-wide) and each model or slice source (per-model), plus ``task_rank``.

    What mergekit checks well itself (one of models/slices/modules, layer ranges) stays its."""
    from mergekit_ctm.engine.methods import CHECKPOINT_PARAMETERS

    output = raw.get("output")
    if output not in (None, "model", "adapter"):
        raise RecipeError(f"output: {output!r} is not one of adapter, model")
    keep = raw.get("modules_to_save")
    if keep is not None:
        if output != "adapter":
            raise RecipeError(
                "modules_to_save: applies to output: adapter only (it keeps whole modules, "
                "e.g. embed_tokens, lm_head, in the adapter); output: model writes every tensor"
            )
        if not isinstance(keep, list) or not all(isinstance(k, str) and k for k in keep):
            raise RecipeError(
                f"modules_to_save: must be a list of module names (got {keep!r}), e.g. "
                "[embed_tokens, lm_head]"
            )
    if output == "adapter":
        for key in ("slices", "modules"):
            if raw.get(key):
                raise RecipeError(
                    f"output: adapter: `{key}:` builds a model of another shape than the base, "
                    "but a LoRA adapter applies to the base itself; list the fine-tunes under "
                    "`models:`, or write output: model"
                )
        for key in ("tokenizer_source", "tokenizer"):
            if raw.get(key) not in (None, "base"):
                raise RecipeError(
                    f"output: adapter keeps the base model's vocabulary, so `{key}:` cannot "
                    f"apply; leave it out, or write output: model"
                )
    keys = ("merge_method", "models", "base_model", "parameters", "dtype", "out_dtype")
    levels = full_recipe_levels(raw, (*keys, "random_seed"))
    method = raw["merge_method"]
    slices = raw.get("slices") if isinstance(raw.get("slices"), list) else []
    if not raw.get("base_model") and not (
        slices and all(isinstance(s, dict) and s.get("base_model") for s in slices)
    ):
        raise RecipeError(
            f"merge_method {method} over full checkpoints needs `base_model:` (the model they "
            "were fine-tuned from): each task vector is W_t - W_base"
        )
    _check_no_duplicate_inputs(raw)
    top = levels[0].scope
    rule = _base_rule_of(top, method)
    _check_level_names(levels, method, rule, CHECKPOINT_PARAMETERS, noun="model")
    own = (*METHODS[method].parameters, *CHECKPOINT_PARAMETERS)
    _check_level_values(levels, own, rule)
    for p in own:
        _resolve(p, (("parameters", top),), "model.layers.0.weight", 0.0)
    if rule:
        _check_level_rule(levels, rule)


def _check_no_duplicate_inputs(raw: Mapping[str, Any]) -> None:
    """mergekit merges each input of a group once (a traceback from its planner otherwise):
    refuse a model listed twice in ``models:``, in one slice's sources or under one module."""
    groups: list[tuple[str, Any]] = [("models", raw.get("models"))]
    for i, s in enumerate(raw.get("slices") or []):
        groups.append((f"slices[{i}].sources", s.get("sources") if isinstance(s, dict) else None))
    modules = raw.get("modules")
    for name, m in (modules if isinstance(modules, dict) else {}).items():
        groups.append((f"modules.{name}.models", m.get("models") if isinstance(m, dict) else None))
    for label, entries in groups:
        seen: dict[str, int] = {}
        for j, entry in enumerate(entries if isinstance(entries, list) else []):
            ref = entry.get("model") if isinstance(entry, dict) else entry
            if not isinstance(ref, str):
                continue
            if ref in seen:
                raise RecipeError(
                    f"{label}[{j}] ({ref}) is listed twice (also {label}[{seen[ref]}]); "
                    "mergekit merges each input once: list it once and give it a larger "
                    "`weight` instead"
                )
            seen[ref] = j


def _check_level_rule(levels: Sequence[Level], rule: str) -> None:
    """The base rule's own checks (density in [0, 1], density ± epsilon, ...) on the values of
    each level over the top level's (the top level alone first, so the error names the level
    that set the offending value). A gradient or a filtered value is checked at each value it
    lists (a range holds between its points too), each with the other parameters' first."""
    specs = {p.name: p for p in rule_specs(rule)}

    def candidates(value: Any) -> list[Any]:
        if isinstance(value, ConditionalParameter):
            return candidates(value.value)
        if isinstance(value, list):
            return [c for v in value for c in candidates(v)]
        return [value]

    def options(scope: Mapping[str, Any] | None) -> dict[str, list[Any]]:
        found = {k: candidates(v) for k, v in (scope or {}).items() if k in specs}
        return {k: v for k, v in found.items() if v}

    def check(label: str, values: dict[str, Any]) -> None:
        one = {k: [v] if specs[k].scope != ParameterScope.SHARED else v for k, v in values.items()}
        try:
            rules_mod.check_rule_params(rule, one, 1)
        except RuleError as exc:
            raise RecipeError(f"{label}: {str(exc).replace(' (adapter 0)', '')}") from None

    top = options(levels[0].scope)
    for level in levels:
        here = {**top, **options(level.scope)}
        first = {k: v[0] for k, v in here.items()}
        check(level.label, first)
        for k, values in here.items():
            for v in values[1:]:
                check(level.label, {**first, k: v})


# Keys of ours that a full-checkpoint recipe may add to mergekit's MergeConfiguration.
FULL_RECIPE_KEYS = ("output", "modules_to_save", "random_seed")


def full_recipe_levels(raw: Mapping[str, Any], typed: Sequence[str]) -> list[Level]:
    """Refuse unknown keys anywhere in a full-checkpoint recipe; check the top-level fields
    ``typed`` against the adapter recipe model's types; return every ``parameters:`` mapping
    as a :class:`Level` (top level first), values parsed as mergekit parses them."""
    from mergekit.config import MergeConfiguration

    from mergekit_ctm.recipe.model import unknown_keys

    errors = unknown_keys(raw, MergeConfiguration, extra=FULL_RECIPE_KEYS)
    for key in typed:
        if key in raw and key not in ("models", "parameters"):
            errors += _type_errors(Recipe.model_fields[key].annotation, raw[key], key)
    levels: list[Level] = []

    def add(label: str, value: Any, per_input: bool, top: bool = False) -> None:
        errors.extend(
            _type_errors(Recipe.model_fields["parameters"].annotation, value, label)
            if value is not None
            else ()
        )
        if not errors:
            parsed = _parameters_adapter().validate_python(drop_nulls(value))
            levels.append(Level(label, parsed, per_input, top))

    def inputs(entries: Any, at: str) -> None:
        for i, m in enumerate(entries if isinstance(entries, list) else []):
            if isinstance(m, dict):
                add(f"{at}[{i}] ({m.get('model')}).parameters", m.get("parameters"), True)

    def part(node: Mapping[str, Any], at: str) -> None:
        inputs(node.get("models"), f"{at}models")
        for s, sl in enumerate(node.get("slices") or []):
            if isinstance(sl, dict):
                add(f"{at}slices[{s}].parameters", sl.get("parameters"), False)
                inputs(sl.get("sources"), f"{at}slices[{s}].sources")

    add("parameters", raw.get("parameters"), False, top=True)
    part(raw, "")
    modules = raw.get("modules")
    for name, module in modules.items() if isinstance(modules, dict) else ():
        if isinstance(module, dict):
            add(f"modules.{name}.parameters", module.get("parameters"), False)
            part(module, f"modules.{name}.")
    if errors:
        raise RecipeError(join_errors("invalid recipe", errors))
    return levels


@functools.cache
def _parameters_adapter() -> pydantic.TypeAdapter:
    return pydantic.TypeAdapter(Recipe.model_fields["parameters"].annotation)


def _type_errors(annotation: Any, value: Any, label: str) -> list[str]:
    """pydantic's first error for ``value`` as an ``annotation`` (nulls under a mapping
    dropped, as for adapter recipes; a union type reports one error per member, the first
    says enough), in parse_recipe's words: ``label.loc: msg (got input)``."""
    try:
        pydantic.TypeAdapter(annotation).validate_python(drop_nulls(value))
    except pydantic.ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join([label, *(str(p) for p in err.get("loc", ()))])
        return [f"{loc}: {err.get('msg')} (got {err.get('input')!r})"]
    return []
