"""Random LoRA factors for engine tests (float64 unless asked otherwise)."""

from __future__ import annotations

import pytest
import torch


def lora_factors(
    T: int,
    n: int = 40,
    m: int = 32,
    ranks: int | list[int] = 4,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    norms: list[float] | None = None,
):
    """Aₜ (rₜ × m), Bₜ (n × rₜ), sₜ with distinct scales and task norms."""
    g = torch.Generator().manual_seed(seed)
    ranks = [ranks] * T if isinstance(ranks, int) else ranks
    As, Bs, s = [], [], []
    for t, r in enumerate(ranks):
        As.append(torch.randn(r, m, generator=g, dtype=torch.float64).to(dtype))
        scale = norms[t] if norms else 0.5 + t
        Bs.append((scale * torch.randn(n, r, generator=g, dtype=torch.float64)).to(dtype))
        s.append([0.5, 1.0, 2.0, 0.25][t % 4])
    return As, Bs, s


def dense_updates(As, Bs, s) -> torch.Tensor:
    """ΔWₜ = sₜ Bₜ Aₜ in float64, stacked (T, n, m)."""
    return torch.stack([si * B.double() @ A.double() for A, B, si in zip(As, Bs, s)])


@pytest.fixture
def factors():
    return lora_factors
