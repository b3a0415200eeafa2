"""Recipe validation: strict pydantic models, then a full check of every adapter (headers only).

plan = build_plan(yaml_text)        # raises RecipeError naming the field / adapter / module
"""

from mergekit_ctm.recipe.model import AdapterInput, Recipe, RecipeError, parse_recipe
from mergekit_ctm.recipe.validate import (
    DensePlan,
    MergePlan,
    ModulePlan,
    build_plan,
    layer_t,
    module_seed,
)

__all__ = [
    "AdapterInput",
    "DensePlan",
    "MergePlan",
    "ModulePlan",
    "Recipe",
    "RecipeError",
    "build_plan",
    "layer_t",
    "module_seed",
    "parse_recipe",
]
