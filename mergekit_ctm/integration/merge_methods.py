"""Our methods as mergekit ``MergeMethod`` objects (what mergekit's registry holds).

- :class:`MatrixRuleMethod`: a matrix rule mergekit lacks (Iso-C, TSV, PCB, Iso-CTS,
  RobustMerge) as an ordinary mergekit method: merged = base + rule(inputs − base).
- :class:`AdapterMergeMethod`: ``ctm``, ``core_space``, ``mtc``, ``lora_lego``, on full
  checkpoints tensor by tensor (adapter recipes go to our planner instead).

``mergekit_ctm.engine.rules`` is imported where it is used: registration can run while it is
being imported (it imports mergekit's registry, whose import runs our registration).
"""

from __future__ import annotations

from dataclasses import replace
from functools import lru_cache
from typing import Any, Optional

import torch
from mergekit.merge_methods.base import (
    BasePolicy,
    GroupMergeMethod,
    InputContract,
    MergeMethodSpec,
    ParameterSpec,
    TensorGroup,
)

from mergekit_ctm.engine import matrix_rules
from mergekit_ctm.engine.methods import CHECKPOINT_PARAMETERS, METHODS


@lru_cache(maxsize=1)
def _rule_parameters() -> tuple[ParameterSpec, ...]:
    """Every base rule's parameters once, with mergekit's scopes (a full checkpoint's base is
    a real input), ``lambda`` left to the method. Optional, default null: rules differ in
    their defaults (``normalize`` is off for task_arithmetic, on for ties), so an unset
    value must reach the kernel as unset and take the chosen rule's own default. Computed
    once for the three methods that take a base rule (each copy builds pydantic validators:
    start-up time of every mergekit-yaml run)."""
    from mergekit_ctm.engine.rules import rule_names, rule_parameter_specs

    seen: dict[str, ParameterSpec] = {}
    for rule in rule_names():
        for p in rule_parameter_specs(rule):
            if p.name != "lambda" and p.name not in seen:
                seen[p.name] = replace(p, value_type=Optional[p.value_type], default=None)  # noqa: UP045
    return tuple(seen.values())


def method_spec(name: str) -> MergeMethodSpec:
    """The registered spec of one of our methods: its own parameters (engine/methods.py),
    ``task_rank`` for full checkpoints and every base rule's parameters."""
    method = METHODS[name]
    params = method.parameters + CHECKPOINT_PARAMETERS
    params += _rule_parameters() if method.takes_base_rule else ()
    return MergeMethodSpec(
        name=name,
        parameters=params,
        contract=InputContract(base=BasePolicy.REQUIRED, min_inputs=1),
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
        from mergekit_ctm.engine.rules import ANY_SHAPE_RULES, merge_matrices

        kwargs = per_input(parameters, entries)
        if base.ndim == 2 or self.name in ANY_SHAPE_RULES:
            delta = merge_matrices(deltas, self.name, kwargs)
        else:
            weights = kwargs["weight"]
            mean = sum(w * d for w, d in zip(weights, deltas, strict=True)) / len(deltas)
            delta = kwargs["lambda"] * mean
        return (base + delta).to(base.dtype)


class AdapterMergeMethod(GroupMergeMethod):
    """``ctm``, ``core_space``, ``mtc`` or ``lora_lego`` as a mergekit method.

    Adapter recipes never reach this kernel (the ``run_merge`` wrapper sends them to our
    planner); mergekit's planner and every other caller (``merge_state_dicts``,
    ``mergekit-multi``) use it on full checkpoints, tensor by tensor
    (:mod:`.full_checkpoints`).
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.spec = method_spec(name)

    def merge_group(self, group: TensorGroup, /, **parameters: Any) -> torch.Tensor:
        from mergekit_ctm.integration.full_checkpoints import merge_full_tensor

        return merge_full_tensor(self.name, group, parameters)
