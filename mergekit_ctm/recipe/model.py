"""Strict pydantic model of an adapter-merging recipe (structure only, no files read).

mergekit's ``MergeConfiguration`` silently drops unknown keys; these models forbid them and
the error names the nearest valid key.
"""

from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Sequence
from typing import Any, Literal

import yaml
from mergekit.config import ConditionalParameter, ParameterSetting
from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, field_validator

from mergekit_ctm.errors import InputError

DTYPES = ("float32", "float16", "bfloat16", "float64")


class RecipeError(InputError):
    """An invalid recipe or adapter; the message names the field, adapter or module and the fix."""


def suggest(name: str, valid: Any) -> str:
    """' (did you mean 'x'?)' for the closest valid name, or ''."""
    close = difflib.get_close_matches(str(name), [str(v) for v in valid], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


class AdapterInput(BaseModel):
    """One entry of ``models``: a PEFT adapter directory, hub id, or ``base+adapter``."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="adapter directory, hub id (owner/name[@rev]) or base+adapter")
    parameters: dict[str, ParameterSetting] | None = Field(
        default=None, description="per-adapter parameters of the base rule (weight, density, ...)"
    )

    @field_validator("model", mode="before")
    @classmethod
    def _as_str(cls, value: Any) -> Any:
        # mergekit's ModelReference objects (Python API) and plain paths both become strings.
        if not isinstance(value, str) and hasattr(value, "model"):
            return str(value)
        return value


class Recipe(BaseModel):
    """Top-level recipe: mergekit's own keys plus ``output``."""

    model_config = ConfigDict(extra="forbid")

    merge_method: str = Field(description="ctm | core_space | mtc | lora_lego")
    models: list[AdapterInput] = Field(min_length=1, description="the LoRA adapters to merge")
    base_model: str | None = Field(
        default=None,
        description="base model (dir or hub id); default: the adapters' base_model_name_or_path",
    )
    parameters: dict[str, ParameterSetting] | None = Field(
        default=None, description="method parameters and recipe-wide base-rule parameters"
    )
    dtype: Literal["float32", "float16", "bfloat16", "float64"] | None = Field(
        default=None, description="math dtype (default float32)"
    )
    out_dtype: Literal["float32", "float16", "bfloat16", "float64"] | None = Field(
        default=None, description="dtype of the written tensors (default: dtype)"
    )
    output: Literal["adapter", "model"] = Field(
        default="adapter",
        description="adapter: a PEFT LoRA dir; model: the base model with the merged update added",
    )
    random_seed: StrictInt | None = Field(
        default=None,
        description="seed of random rules (DARE, DELLA) and LoRA-LEGO's k-means when "
        "--random-seed is not given (mergekit_config.yml of a merge records it)",
    )
    tokenizer_source: str | None = Field(
        default=None, description="accepted for mergekit compatibility; only 'base' or null"
    )
    chat_template: str | None = Field(default=None, description="not supported (must be null)")

    @field_validator("base_model", mode="before")
    @classmethod
    def _base_as_str(cls, value: Any) -> Any:
        if value is not None and not isinstance(value, str):
            return str(value)
        return value


_NESTED = {"models": AdapterInput, "": Recipe}


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key: Any, first: int, line: int):
        super().__init__(f"key {key!r} is given twice (line {first} and line {line})")
        self.key, self.first, self.line = key, first, line


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last).

    Still safe loading: only the standard tags, no Python objects.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *anchor` keys may be overridden on purpose
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                first = seen.get(key)
                seen.setdefault(key, line)
            except TypeError:
                continue  # unhashable key: the base constructor reports it
            if first is not None:
                raise _DuplicateKey(key, first, line)
        return super().construct_mapping(node, deep=deep)


def drop_nulls(parameters: Any) -> Any:
    """`name: null` in a `parameters:` mapping means "not set: use the default"."""
    if isinstance(parameters, dict):
        return {k: v for k, v in parameters.items() if v is not None}
    return parameters


def _format_error(err: dict[str, Any], raw: Any) -> str:
    loc = err.get("loc", ())
    path = ".".join(str(p) for p in loc)
    if err.get("type") == "extra_forbidden":
        key = loc[-1]
        if len(loc) >= 3 and loc[0] == "models":
            valid = list(AdapterInput.model_fields)
            where = f"models[{loc[1]}]"
        else:
            valid = list(Recipe.model_fields)
            where = "recipe"
        hint = suggest(key, valid)
        if key in ("slices", "modules"):
            hint = (
                " (adapter merges take a flat `models:` list; slices/modules are for full models)"
            )
        return f"{where}: unknown key {key!r}{hint}. Valid keys: {', '.join(valid)}"
    if err.get("type") == "missing":
        return f"{path}: required key is missing"
    return f"{path}: {err.get('msg')} (got {err.get('input')!r})"


def _unknown(where: str, key: Any, valid: Sequence[str]) -> str:
    return f"{where}: unknown key {key!r}{suggest(key, valid)}. Valid keys: {', '.join(valid)}"


def setting_keys(parameters: Any, where: str) -> list[str]:
    """Unknown keys of the ``{value: ..., filter: ...}`` entries of a ``parameters:`` mapping.

    pydantic ignores them in mergekit's ``ConditionalParameter``, so ``{value: 0.5, fliter:
    mlp}`` would apply 0.5 to every tensor; ``where`` labels the mapping (``parameters``)."""
    valid = list(ConditionalParameter.model_fields)
    errors: list[str] = []
    for name, setting in parameters.items() if isinstance(parameters, dict) else ():
        entries = setting if isinstance(setting, list) else [setting]
        for k, entry in enumerate(entries):
            if not isinstance(entry, dict):
                continue
            at = f"{where}.{name}" + (f"[{k}]" if isinstance(setting, list) else "")
            errors += [_unknown(at, key, valid) for key in entry if key not in valid]
    return errors


def _nested_model(annotation: Any) -> tuple[str, type[BaseModel]] | None:
    """("one" | "list" | "dict", M) when a field holds one pydantic model M (Optional allowed),
    a list of them or a str-keyed mapping of them; None otherwise (or when ambiguous)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        found = [n for a in args if a is not type(None) and (n := _nested_model(a)) is not None]
        return found[0] if len(found) == 1 else None
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "one", annotation
    if origin in (list, dict) and args:
        inner = _nested_model(args[-1])
        if inner is not None and inner[0] == "one":
            return ("list" if origin is list else "dict"), inner[1]
    return None


def unknown_keys(
    raw: Any, model: type[BaseModel], where: str = "recipe", extra: Sequence[str] = ()
) -> list[str]:
    """Every key of ``raw`` (a recipe mapping) that pydantic model ``model`` would silently
    drop, recursively through the nested models its fields declare (mergekit's
    ``MergeConfiguration``: ``models[i]``, ``slices[i]``, ``slices[i].sources[j]``,
    ``modules.<name>``, ``tokenizer``, ...) and the ``{value, filter}`` entries of every
    ``parameters:``. Valid keys are read from the model classes, so a field a new mergekit
    adds is accepted without a change here; ``extra`` adds top-level keys of ours.

    One message per key, in the style of adapter recipes: ``where: unknown key 'x' (did you
    mean 'y'?). Valid keys: ...``."""
    if not isinstance(raw, dict):
        return []
    fields = model.model_fields
    valid = [*fields, *(k for k in extra if k not in fields)]
    errors: list[str] = []
    for key, value in raw.items():
        if key not in valid:
            errors.append(_unknown(where, key, valid))
            continue
        if key not in fields:
            continue
        label = key if where == "recipe" else f"{where}.{key}"
        if key == "parameters":
            errors += setting_keys(value, label)
            continue
        nested = _nested_model(fields[key].annotation)
        if nested is None:
            continue
        shape, inner = nested
        if shape == "one":
            errors += unknown_keys(value, inner, label)
        elif shape == "list" and isinstance(value, list):
            for i, item in enumerate(value):
                errors += unknown_keys(item, inner, f"{label}[{i}]")
        elif shape == "dict" and isinstance(value, dict):
            for name, item in value.items():
                errors += unknown_keys(item, inner, f"{label}.{name}")
    return errors


def join_errors(head: str, errors: list[str]) -> str:
    """One line for one error; a head line and an indented list for several."""
    if len(errors) == 1:
        return f"{head}: {errors[0]}"
    return f"{head}:\n  " + "\n  ".join(errors)


def load_yaml(text: str, where: str = "recipe", *, unique_keys: bool = False) -> Any:
    """Safe-load recipe YAML; a syntax error becomes one RecipeError line with its position.

    unique_keys: refuse a key given twice in one mapping (PyYAML keeps the last), as
    parse_recipe does for adapter recipes; off by default so full-model recipes that mergekit
    accepts pass untouched.
    """
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader if unique_keys else yaml.SafeLoader)
    except _DuplicateKey as exc:
        raise RecipeError(
            f"{where}: key {exc.key!r} is given twice (line {exc.first} and line {exc.line}); "
            "YAML would silently keep the last one. Keep one of them"
        ) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise RecipeError(f"{where}: not valid YAML{at}: {problem}") from None


def parse_recipe(source: str | dict[str, Any]) -> Recipe:
    """YAML text or a dict -> Recipe; raises RecipeError naming every bad field."""
    if isinstance(source, str):
        raw = load_yaml(source, unique_keys=True)
    else:
        raw = source
    if not isinstance(raw, dict):
        raise RecipeError(f"recipe must be a YAML mapping, got {type(raw).__name__}")
    if "models" in raw and isinstance(raw["models"], list):
        # A bare string entry is shorthand for {model: ...}.
        raw = {**raw, "models": [{"model": m} if isinstance(m, str) else m for m in raw["models"]]}
        raw["models"] = [
            {**m, "parameters": drop_nulls(m["parameters"])}
            if isinstance(m, dict) and "parameters" in m
            else m
            for m in raw["models"]
        ]
    if "parameters" in raw:
        raw = {**raw, "parameters": drop_nulls(raw["parameters"])}
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as exc:
        lines = [_format_error(e, raw) for e in exc.errors()]
        raise RecipeError(join_errors("invalid recipe", lines)) from None
    where = [("parameters", raw.get("parameters"))] + [
        (f"models[{i}].parameters", m.get("parameters"))
        for i, m in enumerate(raw["models"])
        if isinstance(m, dict)
    ]
    if lines := [e for label, scope in where for e in setting_keys(scope, label)]:
        raise RecipeError(join_errors("invalid recipe", lines))
    if recipe.tokenizer_source not in (None, "base"):
        raise RecipeError(
            f"tokenizer_source: {recipe.tokenizer_source!r} is not supported for adapter merges; "
            "the tokenizer is the base model's (use 'base' or leave it out)"
        )
    if recipe.chat_template is not None:
        raise RecipeError("chat_template: not supported for adapter merges; leave it out")
    return recipe
