"""Our methods as mergekit ``MergeMethod`` objects (what mergekit's registry holds).

- :class:`MatrixRuleMethod`: a matrix rule mergekit lacks (Iso-C, TSV, PCB, Iso-CTS,
  RobustMerge) as an ordinary mergekit method: merged = base + rule(inputs − base).
- :class:`AdapterMergeMethod`: ``ctm``, ``core_space``, ``mtc``, ``lora_lego``. Adapter recipes
  never reach its kernel (the ``run_merge`` wrapper sends them to our planner).
"""

from __future__ import annotations

from typing import Any

import torch
from mergekit.merge_methods.base import (
    BasePolicy,
    GroupMergeMethod,
    InputContract,
    MergeMethodSpec,
    TensorGroup,
)

from mergekit_ctm.engine import matrix_rules
from mergekit_ctm.engine.methods import METHODS
from mergekit_ctm.engine.rules import ANY_SHAPE_RULES, merge_matrices
from mergekit_ctm.recipe.params import union_rule_specs


def method_spec(name: str) -> MergeMethodSpec:
    """The registered spec of one of our methods: its own parameters (engine/methods.py)
    plus every base rule's, so mergekit-yaml and the reference docs know them all."""
    method = METHODS[name]
    params = method.parameters + (union_rule_specs() if method.takes_base_rule else ())
    return MergeMethodSpec(
        name=name,
        parameters=params,
        contract=InputContract(base=BasePolicy.IGNORED, min_inputs=1),
        pretty_name=method.pretty_name,
        reference_url=method.reference_url,
        uses_accelerator=True,
    )


def per_input(parameters: dict[str, Any], entries: Any) -> dict[str, Any]:
    """Resolved mergekit parameters with per-input values as lists in ``entries``' order."""
    return {
        k: (v.values_for(entries) if hasattr(v, "values_for") else v) for k, v in parameters.items()
    }


class MatrixRuleMethod(GroupMergeMethod):
    """A matrix rule as a mergekit method: merged = base + rule(inputs − base).

    2-D tensors go through the matrix rule. Other tensors (norms, biases) get λ · mean_t(w_t Δ_t),
    as the authors' code averages non-matrix parameters (Iso-C/CTS, TSV, RobustMerge); PCB works
    on flattened entries, so it takes every shape.
    """

    def __init__(self, name: str):
        self.name = name
        self.spec = MergeMethodSpec(
            name=name,
            parameters=matrix_rules.PARAMETER_SPECS[name],
            contract=InputContract(base=BasePolicy.REQUIRED),
            pretty_name=matrix_rules.PRETTY_NAMES[name],
            reference_url=matrix_rules.REFERENCE_URLS[name],
        )

    def merge_group(self, group: TensorGroup, /, **parameters: Any) -> torch.Tensor:
        base = group.base.tensor
        entries = group.non_base
        if not entries:
            return base
        if base.numel() == 0:
            # An empty weight merges to itself, as with mergekit's own methods (PCB's and
            # RobustMerge's top-k thresholds have no entry to rank and would raise).
            return base.clone()
        deltas = [e.tensor - base for e in entries]
        kwargs = per_input(parameters, entries)
        if base.ndim == 2 or self.name in ANY_SHAPE_RULES:
            delta = merge_matrices(deltas, self.name, kwargs)
        else:
            weights = kwargs["weight"]
            mean = sum(w * d for w, d in zip(weights, deltas, strict=True)) / len(deltas)
            delta = kwargs["lambda"] * mean
        return (base + delta).to(base.dtype)


class AdapterMergeMethod(GroupMergeMethod):
    """An adapter-merging method as mergekit sees it: spec for validation/docs.

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
