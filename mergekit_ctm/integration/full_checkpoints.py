"""``ctm``, ``core_space``, ``mtc`` and ``lora_lego`` on full fine-tuned checkpoints, one
tensor at a time, as mergekit's own planner calls any merge method.

For a 2-D weight (not an embedding or ``lm_head``: mergekit marks those with a vocabulary
axis):

    ΔWₜ = Wₜ − W_base,   ΔWₜ ≈ Bₜ Aₜ (truncated SVD to ``task_rank``, balanced, scaling 1),
    W = W_base + merge_lora(A, B, 1; method, rank, base_rule, ...)          (rank ≤ ``rank``)

i.e. exactly the engine code that merges adapter factors. If every ΔWₜ is zero the base comes
back unchanged. Every other tensor (norms, biases, embeddings, ``lm_head``) takes the base rule
densely, W = W_base + λ · rule(ΔW₁ … ΔW_T), with mergekit's semantics for that rule (its
``lambda`` is ours, applied once); ``lora_lego``, which has no base rule, averages the deltas.
Embeddings stay dense so that mergekit's vocabulary handling (``tokenizer_source``) keeps
working and nothing of a new token's row is lost to a truncation.

Seeds: random rules and LoRA-LEGO's k-means are seeded per tensor from (``--random-seed``,
tensor name), as for adapters, so the output does not depend on execution order.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from mergekit.merge_methods.base import TensorGroup

from mergekit_ctm.engine import matrix_rules
from mergekit_ctm.engine.methods import METHODS
from mergekit_ctm.engine.rules import ANY_SHAPE_RULES, merge_matrices, rule_parameter_specs
from mergekit_ctm.integration.merge_methods import per_input

TORCH_DEFAULT_SEED = 67280421310721  # torch's seed when nobody called manual_seed


def tensor_seed(name: str | None) -> int:
    """The per-module seed of the adapter path (``--random-seed`` and the module name).

    mergekit seeds torch's generator with ``--random-seed`` before planning (``set_seed``);
    an unseeded run counts as no seed, as for adapter merges."""
    from mergekit_ctm.recipe.validate import module_seed

    seed = torch.initial_seed()
    module = (name or "").removesuffix(".weight")
    return module_seed(None if seed == TORCH_DEFAULT_SEED else seed, module)


def dense_delta(
    deltas: list[torch.Tensor],
    rule: str,
    params: Mapping[str, Any],
    seed: int | None,
) -> torch.Tensor:
    """rule(Δ₁ … Δ_T) with the rule's own parameters (``lambda`` excluded: applied by the
    caller). Matrix rules that need 2-D input average other shapes: mean_t(wₜ Δₜ), as their
    authors' code does for norms and biases."""
    if rule in matrix_rules.MATRIX_RULE_NAMES and deltas[0].ndim != 2:
        if rule not in ANY_SHAPE_RULES:
            weights = params.get("weight") or [1.0] * len(deltas)
            return sum(w * d for w, d in zip(weights, deltas, strict=True)) / len(deltas)
    return merge_matrices(deltas, rule, dict(params), seed=seed)


def is_low_rank(base: torch.Tensor, metadata: Any) -> bool:
    """A 2-D weight without a vocabulary axis: merged through low-rank factors."""
    return base.ndim == 2 and getattr(metadata, "vocabulary_axis", None) is None


def merge_full_tensor(
    method: str, group: TensorGroup, parameters: Mapping[str, Any]
) -> torch.Tensor:
    """One output tensor of a full-checkpoint merge with one of our methods (module docstring)."""
    definition = METHODS[method]
    base = group.base.tensor
    entries = group.non_base
    if not entries or base.numel() == 0:
        return base.clone()
    values = per_input(parameters, entries)
    math = torch.float64 if base.dtype == torch.float64 else torch.float32
    deltas = [e.tensor.to(math) - base.to(math) for e in entries]
    seed = tensor_seed(group.metadata.name)
    own = {k: values[k] for k in definition.parameter_names if k in values}
    lam = own.get("lambda", 1.0)
    rule = own.get("base_rule") or "linear"
    # The registered spec lists every rule's parameters; keep the chosen rule's, as given.
    names = {p.name for p in rule_parameter_specs(rule)} - {"lambda"}
    rule_values = {
        k: v
        for k, v in values.items()
        if k in names and v is not None and not (isinstance(v, list) and None in v)
    }

    if not is_low_rank(base, group.metadata):
        delta = lam * dense_delta(deltas, rule, rule_values, seed)
        return (base.to(math) + delta).to(base.dtype)
    if not any(bool(d.any()) for d in deltas):
        return base.clone()

    from mergekit_ctm.engine.api import merge_lora
    from mergekit_ctm.engine.compress import compress_delta

    k = values.get("task_rank") or own.get("rank") or min(base.shape)
    factors = [compress_delta(d, int(k), seed=seed, dtype=math) for d in deltas]
    rule_params = rule_values if definition.takes_base_rule else None
    out = merge_lora(
        [a for a, _ in factors],
        [b for _, b in factors],
        [1.0] * len(factors),
        method=method,
        rule_params=rule_params,
        seed=seed,
        dtype=math,
        **own,
    )
    return (base.to(math) + out.B @ out.A).to(base.dtype)
