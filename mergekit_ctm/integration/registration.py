"""Register our methods in mergekit's own registry (one explicit place, idempotent).

- ``ctm``, ``core_space``, ``mtc``, ``lora_lego``: adapter-merging methods; adapter recipes are
  dispatched to our planner by the ``run_merge`` wrapper (:mod:`.dispatch`).
- ``iso_c``, ``tsv``, ``pcb``, ``iso_cts``, ``robustmerge``: matrix rules, usable as ordinary
  mergekit methods on full models as well as ``base_rule`` of the adapter methods.

A name already taken by someone else's method is left to its owner, with a warning: our
``base_rule`` of that name still runs our implementation, which the warning says.
"""

from __future__ import annotations

import warnings

from mergekit.merge_methods import registry
from mergekit.merge_methods.base import MergeMethod

from mergekit_ctm.engine import matrix_rules
from mergekit_ctm.engine.methods import METHOD_NAMES
from mergekit_ctm.integration.merge_methods import AdapterMergeMethod, MatrixRuleMethod


def our_methods() -> tuple[MergeMethod, ...]:
    return tuple(AdapterMergeMethod(n) for n in METHOD_NAMES) + tuple(
        MatrixRuleMethod(n) for n in matrix_rules.MATRIX_RULE_NAMES
    )


def register_methods() -> tuple[str, ...]:
    """Register every method of ours mergekit does not have; returns the names added now."""
    existing = {m.spec.name: m for m in registry.registered_methods()}
    added = []
    for method in our_methods():
        other = existing.get(method.spec.name)
        if other is None:
            registry.register(method)
            added.append(method.spec.name)
        elif not type(other).__module__.startswith("mergekit_ctm."):
            warnings.warn(
                f"mergekit already registers a method named {method.spec.name!r} "
                f"({type(other).__module__}); mergekit-ctm leaves it in place. As a merge method "
                f"the name means mergekit's; as base_rule of ctm/core_space/mtc it still means "
                "mergekit-ctm's.",
                RuntimeWarning,
                stacklevel=2,
            )
    return tuple(added)
