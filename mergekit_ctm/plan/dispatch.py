"""Route recipes that name one of our methods to our planner; everything else to mergekit's.

``mergekit.merge.run_merge`` is replaced by a wrapper at the moment ``mergekit.merge`` finishes
executing (startup hook) or when ``mergekit_ctm`` is imported, whichever comes first. The
original stays reachable as ``run_merge.__mergekit_ctm_original__``.
"""

from __future__ import annotations

import functools
import os
import sys
from typing import Any

from mergekit_ctm.plan.specs import METHOD_NAMES

_MARK = "__mergekit_ctm_original__"


def is_adapter_recipe(merge_config: Any) -> bool:
    """True when the recipe names an adapter-merging method (ctm, core_space, mtc, lora_lego)."""
    return getattr(merge_config, "merge_method", None) in METHOD_NAMES


def wrap_run_merge(module: Any) -> None:
    """Replace ``module.run_merge`` (mergekit.merge) with the dispatching wrapper (idempotent)."""
    original = module.run_merge
    if hasattr(original, _MARK):
        return

    @functools.wraps(original)
    def run_merge(merge_config, out_path, options, config_source=None):
        if is_adapter_recipe(merge_config):
            from mergekit_ctm.adapters import AdapterError
            from mergekit_ctm.engine.rules import RuleError
            from mergekit_ctm.plan.run import run_adapter_merge
            from mergekit_ctm.recipe import RecipeError

            try:
                return run_adapter_merge(
                    merge_config, out_path, options=options, config_source=config_source
                )
            except (RecipeError, AdapterError, RuleError) as exc:
                if os.path.basename(sys.argv[0]) != "mergekit-yaml":
                    raise
                # A bad recipe or adapter is the user's to fix: say what, not a traceback.
                print(f"mergekit-yaml: error: {exc}", file=sys.stderr)
                raise SystemExit(2) from None
        return original(merge_config, out_path, options, config_source=config_source)

    setattr(run_merge, _MARK, original)
    module.run_merge = run_merge
    # Modules that bound the name before we got here (imported mergekit before mergekit_ctm).
    for name in ("mergekit.scripts.run_yaml", "mergekit.merge_methods.api"):
        other = sys.modules.get(name)
        if other is not None and getattr(other, "run_merge", None) is original:
            other.run_merge = run_merge


def install_dispatch() -> None:
    """Wrap run_merge now if mergekit.merge is loaded; otherwise the import hook will."""
    import mergekit_ctm_hook

    mergekit_ctm_hook.install()
