"""mergekit integration: method specs and registration, run_merge dispatch, Task graph, output.

from mergekit_ctm.plan import run_adapter_merge
run_adapter_merge(yaml_text, "out/", MergeOptions())
"""

from mergekit_ctm.plan.dispatch import is_adapter_recipe, wrap_run_merge
from mergekit_ctm.plan.registration import register_methods
from mergekit_ctm.plan.run import execute_plan, run_adapter_merge
from mergekit_ctm.plan.specs import METHOD_NAMES, method_spec

__all__ = [
    "METHOD_NAMES",
    "execute_plan",
    "is_adapter_recipe",
    "method_spec",
    "register_methods",
    "run_adapter_merge",
    "wrap_run_merge",
]
