"""The same engine code on CUDA: results equal the CPU ones (skipped without a GPU)."""

from __future__ import annotations

import pytest
import torch

from mergekit_ctm.engine import merge_lora

from .conftest import lora_factors

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize(
    "method,kw",
    [
        ("ctm", {"base_rule": "ties", "rule_params": {"density": 0.5}}),
        ("core_space", {"rank": None}),
        ("mtc", {"space": "full"}),
        ("mtc", {"space": "knots"}),
        ("lora_lego", {}),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_matches_cpu(method, kw, dtype):
    As, Bs, s = lora_factors(4, ranks=[4, 3, 4, 2], dtype=dtype)
    kw = {"rank": 5, **kw}
    cpu = merge_lora(As, Bs, s, method=method, dtype=dtype, hooi_tol=1e-12, **kw)
    gpu = merge_lora(
        [a.cuda() for a in As],
        [b.cuda() for b in Bs],
        s,
        method=method,
        dtype=dtype,
        hooi_tol=1e-12,
        **kw,
    )
    assert gpu.A.is_cuda and gpu.B.is_cuda
    ref = cpu.delta().double()
    tol = 1e-4 if dtype == torch.float32 else 1e-9
    assert float((gpu.delta().double().cpu() - ref).norm() / ref.norm()) < tol
