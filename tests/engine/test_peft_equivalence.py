"""`mtc` in full space reproduces PEFT's add_weighted_adapter(..., "<rule>_svd").

Conventions (measured in these tests, documented in docs/usage.md):
- "svd" == task_arithmetic with the same weights: identical.
- "ties_svd": PEFT elects the sign on the *unweighted* trimmed deltas and divides by the
  *count* of agreeing adapters; mergekit elects on weighted deltas and divides by the sum of
  agreeing weights. With one common weight w they coincide when mergekit runs with
  ``normalize: true`` and ``lambda: w``; with unequal weights they differ (measured below).
- Both trim to ⌊density·N⌋ entries per adapter.
"""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel

from mergekit_ctm.engine import merge_lora
from mergekit_ctm.examples import build_tiny_adapter, build_tiny_base

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


@pytest.fixture(scope="module")
def peft_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("peft_eq")
    base = root / "base"
    build_tiny_base(base, hidden=64, layers=2)
    names = []
    for t, (r, alpha) in enumerate([(4, 8), (8, 8), (6, 12)]):
        out = root / f"a{t}"
        build_tiny_adapter(
            base, out, r=r, alpha=alpha, target_modules=TARGETS, seed=t, scale=[1.0, 3.0, 0.3][t]
        )
        names.append(str(out))
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, torch_dtype=torch.float32)
    pm = PeftModel.from_pretrained(model, names[0], adapter_name="a0")
    for t in (1, 2):
        pm.load_adapter(names[t], adapter_name=f"a{t}")
    return pm


def _lora_layers(pm):
    from peft.tuners.lora import LoraLayer

    return [(n, m) for n, m in pm.named_modules() if isinstance(m, LoraLayer)]


def _factors(layer, names):
    As = [layer.lora_A[a].weight.detach() for a in names]
    Bs = [layer.lora_B[a].weight.detach() for a in names]
    return As, Bs, [layer.scaling[a] for a in names]


def _compare(pm, merged_name, rule, rule_params, lam, rank):
    names = ["a0", "a1", "a2"]
    worst = 0.0
    for _, layer in _lora_layers(pm):
        ref = layer.get_delta_weight(merged_name).double()
        out = merge_lora(
            *_factors(layer, names),
            method="mtc",
            space="full",
            rank=rank,
            base_rule=rule,
            rule_params=rule_params,
            lam=lam,
        )
        worst = max(worst, float((out.delta().double() - ref).norm() / ref.norm()))
    return worst


def test_svd_equals_mtc_full_task_arithmetic(peft_model):
    w = [1.0, 0.5, 2.0]
    peft_model.add_weighted_adapter(
        ["a0", "a1", "a2"], w, "m_svd", combination_type="svd", svd_rank=6
    )
    assert _compare(peft_model, "m_svd", "task_arithmetic", {"weight": w}, 1.0, 6) < 1e-5


@pytest.mark.parametrize("w", [1.0, 0.7])
def test_ties_svd_equals_mtc_full_ties_with_common_weight(peft_model, w):
    name = f"m_ties_{int(w * 10)}"
    peft_model.add_weighted_adapter(
        ["a0", "a1", "a2"], [w] * 3, name, combination_type="ties_svd", svd_rank=6, density=0.4
    )
    err = _compare(peft_model, name, "ties", {"density": 0.4, "normalize": True}, w, 6)
    assert err < 1e-5


def test_ties_svd_weight_convention_differs_for_unequal_weights(peft_model):
    """Documented difference: unequal weights give a different TIES merge (not a bug of ours)."""
    w = [1.0, 0.5, 2.0]
    peft_model.add_weighted_adapter(
        ["a0", "a1", "a2"], w, "m_ties_w", combination_type="ties_svd", svd_rank=6, density=0.4
    )
    err = _compare(peft_model, "m_ties_w", "ties", {"density": 0.4, "weight": w}, 1.0, 6)
    assert err > 1e-3
