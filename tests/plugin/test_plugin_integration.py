"""The mergekit glue: our methods as mergekit MergeMethods, registration, importing packages."""

from __future__ import annotations

import pytest
import torch

from mergekit_ctm.engine.matrix_rules import MATRIX_RULE_NAMES
from mergekit_ctm.engine.rules import merge_matrices
from mergekit_ctm.integration.merge_methods import MatrixRuleMethod

F64 = torch.float64
TOL = dict(rtol=0, atol=1e-12)


def test_matrix_rule_methods_merge_deltas_from_the_base():
    from mergekit.merge_methods.base import BasePolicy, TensorGroup

    methods = {n: MatrixRuleMethod(n) for n in MATRIX_RULE_NAMES}
    assert set(methods) == {"iso_c", "iso_cts", "tsv", "pcb", "robustmerge"}
    g = torch.Generator().manual_seed(7)
    base = torch.randn(12, 10, generator=g, dtype=F64)
    models = [base + 0.1 * torch.randn(12, 10, generator=g, dtype=F64) for _ in range(3)]
    bias = torch.randn(10, generator=g, dtype=F64)
    biases = [bias + torch.randn(10, generator=g, dtype=F64) for _ in range(3)]
    params = {"weight": [1.0, 0.5, 2.0], "lambda": 0.8}
    for name, method in methods.items():
        assert method.spec.contract.base == BasePolicy.REQUIRED
        groups = [
            TensorGroup.from_tensors([base, *models], base_index=0),
            TensorGroup.from_tensors([bias, *biases], base_index=0),
        ]
        out_w, out_b = method(groups, parameters=params)
        deltas = [m - base for m in models]
        torch.testing.assert_close(out_w, base + merge_matrices(deltas, name, params), **TOL)
        bias_deltas = [b - bias for b in biases]
        if name == "pcb":
            ref_b = bias + merge_matrices(bias_deltas, name, params)
        else:
            mean = sum(w * d for w, d in zip(params["weight"], bias_deltas, strict=True)) / 3
            ref_b = bias + 0.8 * mean
        torch.testing.assert_close(out_b, ref_b, **TOL)


@pytest.mark.parametrize("shape", [(0,), (0, 4), (4, 0)])
@pytest.mark.parametrize("name", ["iso_c", "iso_cts", "tsv", "pcb", "robustmerge"])
def test_matrix_rule_methods_merge_empty_weights(name, shape):
    """mergekit's state-dict interface merges empty tensors like its own methods do (PCB and
    RobustMerge used to raise on their top-k thresholds)."""
    from mergekit.merge_methods import merge_state_dicts

    models = [{"w": torch.zeros(shape, dtype=F64)} for _ in range(3)]
    out = merge_state_dicts(models, MatrixRuleMethod(name), base=0, parameters={"weight": 1.0})
    assert out["w"].shape == shape and out["w"].dtype == F64
