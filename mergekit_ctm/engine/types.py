"""Result type shared by every engine pipeline."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class MergedLora:
    """Factors of one merged LoRA module: ΔW = B @ A (scaling 1, `lambda` folded in).

    A: (rank × m), B: (n × rank), balanced (B = U P √Σ, A = √Σ Qᵀ Vᵀ).
    `rank` is the number of directions actually produced; it is below
    `requested_rank` when the inputs span fewer directions (never padded with zeros).
    `info` carries diagnostics (HOOI objective per sweep, sweeps run, notes).
    """

    A: torch.Tensor
    B: torch.Tensor
    requested_rank: int
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    @property
    def rank_deficient(self) -> bool:
        return self.rank < self.requested_rank

    def delta(self) -> torch.Tensor:
        """Dense ΔW = B A (n × m); for tests and small modules only."""
        return self.B @ self.A
