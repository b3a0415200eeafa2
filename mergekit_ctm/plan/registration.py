"""Register our methods in mergekit's own registry (one explicit place, idempotent).

- ``ctm``, ``core_space``, ``mtc``, ``lora_lego``: adapter-merging methods. Their recipes are
  dispatched to our planner by the ``run_merge`` wrapper (:mod:`mergekit_ctm.plan.dispatch`);
  mergekit's per-tensor planner never runs them, so their kernel only explains that.
- ``iso_c``, ``tsv``, ``pcb``, ``iso_cts``, ``robustmerge``: matrix rules, usable as ordinary
  mergekit methods on full models as well as ``base_rule`` of the adapter methods.
"""

from __future__ import annotations

from typing import Any

import torch
from mergekit.merge_methods import registry
from mergekit.merge_methods.base import GroupMergeMethod, MergeMethod, TensorGroup

from mergekit_ctm.plan.specs import METHOD_NAMES, method_spec


class AdapterMergeMethod(GroupMergeMethod):
    """An adapter-merging method as mergekit sees it: spec for validation/docs, no tensor kernel.

    Recipes naming this method are planned by mergekit-ctm (LoRA factors in, LoRA factors out);
    reaching this kernel means mergekit's dense planner was handed the recipe.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.spec = method_spec(name)

    def merge_group(self, group: TensorGroup, /, **parameters: Any) -> torch.Tensor:
        raise RuntimeError(
            f"merge_method {self.name!r} merges PEFT LoRA adapters and is planned by mergekit-ctm; "
            "it cannot run inside mergekit's dense planner. Run the recipe with mergekit-yaml "
            "(with mergekit-ctm installed), `mergekit-ctm merge`, or mergekit.merge.run_merge "
            "after `import mergekit_ctm`."
        )


def _ours(method: MergeMethod) -> bool:
    return type(method).__module__.startswith("mergekit_ctm.")


def register_methods() -> tuple[str, ...]:
    """Register every method mergekit does not have yet; returns the names now registered.

    A name already taken by a foreign method is left alone (mergekit's own wins).
    """
    from mergekit_ctm.engine.rules import matrix_rule_methods

    existing = {m.spec.name: m for m in registry.registered_methods()}
    added = []
    candidates: list[MergeMethod] = [AdapterMergeMethod(n) for n in METHOD_NAMES]
    candidates += list(matrix_rule_methods())
    for method in candidates:
        if method.spec.name in existing:
            continue
        registry.register(method)
        added.append(method.spec.name)
    return tuple(added)


def registered_ours() -> tuple[str, ...]:
    return tuple(m.spec.name for m in registry.registered_methods() if _ours(m))
