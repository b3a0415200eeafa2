"""Strict pydantic model of an adapter-merging recipe (structure only, no files read).

mergekit's ``MergeConfiguration`` silently drops unknown keys; these models forbid them and
the error names the nearest valid key.
"""

from __future__ import annotations

import difflib
from typing import Any, Literal

import yaml
from mergekit.config import ParameterSetting
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

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


def join_errors(head: str, errors: list[str]) -> str:
    """One line for one error; a head line and an indented list for several."""
    if len(errors) == 1:
        return f"{head}: {errors[0]}"
    return f"{head}:\n  " + "\n  ".join(errors)


def load_yaml(text: str, where: str = "recipe") -> Any:
    """Safe-load recipe YAML; a syntax error becomes one RecipeError line with its position."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise RecipeError(f"{where}: not valid YAML{at}: {problem}") from None


def parse_recipe(source: str | dict[str, Any]) -> Recipe:
    """YAML text or a dict -> Recipe; raises RecipeError naming every bad field."""
    if isinstance(source, str):
        raw = load_yaml(source)
    else:
        raw = source
    if not isinstance(raw, dict):
        raise RecipeError(f"recipe must be a YAML mapping, got {type(raw).__name__}")
    if "models" in raw and isinstance(raw["models"], list):
        # A bare string entry is shorthand for {model: ...}.
        raw = {**raw, "models": [{"model": m} if isinstance(m, str) else m for m in raw["models"]]}
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as exc:
        lines = [_format_error(e, raw) for e in exc.errors()]
        raise RecipeError(join_errors("invalid recipe", lines)) from None
    if recipe.tokenizer_source not in (None, "base"):
        raise RecipeError(
            f"tokenizer_source: {recipe.tokenizer_source!r} is not supported for adapter merges; "
            "the tokenizer is the base model's (use 'base' or leave it out)"
        )
    if recipe.chat_template is not None:
        raise RecipeError("chat_template: not supported for adapter merges; leave it out")
    return recipe
