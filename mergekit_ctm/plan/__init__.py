"""The merge plan as a mergekit Task graph, its run on mergekit's Executor, and the output.

from mergekit_ctm.plan.run import run_adapter_merge
run_adapter_merge(yaml_text, "out/", MergeOptions())
"""
