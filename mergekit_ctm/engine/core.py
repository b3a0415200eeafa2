"""Core space of T LoRA updates (Eq. 9–10 of CtM; Panariello et al. 2025).

With scaling folded in (B̃ₜ = sₜ Bₜ), stack B_cat = [B̃₁ … B̃_T] (n × R') and
A_cat = [A₁; …; A_T] (R' × m), R' = Σ rₜ. Their thin SVDs B_cat = U_B Σ_B W_Bᵀ and
A_cat = W_A Σ_A V_Aᵀ give orthonormal bases U_B (n × k_B), V_A (m × k_A) spanning every update,
and each update becomes a core matrix

    M⁽ᵗ⁾ = U_Bᵀ ΔW⁽ᵗ⁾ V_A = Pₜ Qₜᵀ,   Pₜ = U_Bᵀ B̃ₜ (k_B × rₜ),   Qₜ = V_Aᵀ Aₜᵀ (k_A × rₜ).

Theorem 4.1: ΔW⁽ᵗ⁾ = U_B M⁽ᵗ⁾ V_Aᵀ exactly. Numerically zero directions are dropped
(k_B, k_A ≤ R'), which the paper allows. Only two Gram matrices touch n or m; P, Q come from
them for free (P = Σ_B W_Bᵀ, Q = Σ_A W_Aᵀ), and U_B, V_A are formed only on request.

``build_ctm_core_space`` picks other orthonormal bases for CtM: the singular vectors of
the β-weighted updates, in which the HOSVD of Problem 11 is already diagonal.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mergekit_ctm.engine.linalg import (
    F64,
    canonical_signs,
    default_rtol,
    eigh_basis,
    gram64,
    gram_basis,
    psd_sqrt,
)


@dataclass
class CoreSpace:
    """Factored core space of T updates; see module docstring for the equations."""

    B_cat: torch.Tensor  # n × R', scaling folded in, math dtype
    A_cat: torch.Tensor  # R' × m, math dtype
    coef_B: torch.Tensor  # R' × k_B (float64): U_B = B_cat @ coef_B
    coef_A: torch.Tensor  # R' × k_A (float64): V_A = A_catᵀ @ coef_A
    P: torch.Tensor  # k_B × R' (float64): P[:, block t] = Pₜ
    Q: torch.Tensor  # k_A × R' (float64): Q[:, block t] = Qₜ
    ranks: tuple[int, ...]

    @property
    def offsets(self) -> list[int]:
        out = [0]
        for r in self.ranks:
            out.append(out[-1] + r)
        return out

    def blocks(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(Pₜ, Qₜ) per task."""
        o = self.offsets
        return [(self.P[:, o[t] : o[t + 1]], self.Q[:, o[t] : o[t + 1]]) for t in range(len(o) - 1)]

    def padded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Pₜ, Qₜ stacked as (T, k, r_max), zero-padded for heterogeneous ranks (Mₜ unchanged)."""
        rmax = max(self.ranks)
        T = len(self.ranks)
        Pp = self.P.new_zeros(T, self.P.shape[0], rmax)
        Qp = self.Q.new_zeros(T, self.Q.shape[0], rmax)
        for t, (Pt, Qt) in enumerate(self.blocks()):
            Pp[t, :, : Pt.shape[1]] = Pt
            Qp[t, :, : Qt.shape[1]] = Qt
        return Pp, Qp

    def core_matrices(self) -> torch.Tensor:
        """M⁽ᵗ⁾ = Pₜ Qₜᵀ stacked as (T, k_B, k_A), float64."""
        Pp, Qp = self.padded()
        return Pp @ Qp.mT

    def U_B(self) -> torch.Tensor:
        return self.B_cat @ self.coef_B.to(self.B_cat.dtype)

    def V_A(self) -> torch.Tensor:
        return (self.coef_A.to(self.A_cat.dtype).mT @ self.A_cat).mT  # row-major A_cat: 2× faster

    def canonicalize(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Form U_B, V_A with canonical column signs (linalg.canonical_signs) and flip P, Q."""
        U, V = self.U_B(), self.V_A()
        su, sv = canonical_signs(U), canonical_signs(V)
        U, V = U * su, V * sv
        su64, sv64 = su.to(F64), sv.to(F64)
        self.coef_B = self.coef_B * su64
        self.coef_A = self.coef_A * sv64
        self.P = self.P * su64.unsqueeze(-1)
        self.Q = self.Q * sv64.unsqueeze(-1)
        return U, V


def _stack(As, Bs, scalings, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"math dtype must be float32 or float64, got {dtype}")
    B_cat = torch.cat([B.to(dtype) * float(s) for B, s in zip(Bs, scalings)], dim=1)
    A_cat = torch.cat([A.to(dtype) for A in As], dim=0)
    return B_cat, A_cat


def build_core_space(
    As: Sequence[torch.Tensor],
    Bs: Sequence[torch.Tensor],
    scalings: Sequence[float],
    dtype: torch.dtype = torch.float32,
) -> CoreSpace:
    """Core space of ΔWₜ = sₜ Bₜ Aₜ (Aₜ: rₜ × m, Bₜ: n × rₜ); cost (n + m)·R'² + R'³."""
    B_cat, A_cat = _stack(As, Bs, scalings, dtype)
    W_B, sig_B = gram_basis(B_cat)
    W_A, sig_A = gram_basis(A_cat.mT)
    return CoreSpace(
        B_cat=B_cat,
        A_cat=A_cat,
        coef_B=W_B / sig_B,
        coef_A=W_A / sig_A,
        P=sig_B.unsqueeze(-1) * W_B.mT,
        Q=sig_A.unsqueeze(-1) * W_A.mT,
        ranks=tuple(int(A.shape[0]) for A in As),
    )


def _padded_index(ranks: Sequence[int], device: torch.device) -> torch.Tensor:
    """Position of each of the Σrₜ stacked columns in the (T · r_max) zero-padded layout."""
    rmax = max(ranks)
    return torch.cat([t * rmax + torch.arange(r, device=device) for t, r in enumerate(ranks)])


def _block_view(G: torch.Tensor, idx: torch.Tensor, T: int, rmax: int) -> torch.Tensor:
    """G (Σrₜ × Σrₜ) zero-padded into blocks: (s, t, a, b) = G[s-block, t-block][a, b]."""
    Gp = G.new_zeros(T * rmax, T * rmax)
    Gp[idx.unsqueeze(1), idx] = G
    return Gp.view(T, rmax, T, rmax).transpose(1, 2)


def _congruence(G4: torch.Tensor, R: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Mᵀ G M for M = blockdiag(Rₜ) (R: (T, r_max, r_max) zero-padded), blockwise."""
    T, rmax, _ = R.shape
    H = (R.mT.unsqueeze(1) @ G4 @ R.unsqueeze(0)).transpose(1, 2).reshape(T * rmax, -1)
    return H[idx.unsqueeze(1), idx]


def _block_apply(R: torch.Tensor, X: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """M X for M = blockdiag(Rₜ) (R: (T, r_max, r_max) zero-padded) and X: (Σrₜ × k)."""
    T, rmax, _ = R.shape
    Xp = X.new_zeros(T * rmax, X.shape[-1])
    Xp[idx] = X
    return (R @ Xp.view(T, rmax, -1)).reshape(T * rmax, -1)[idx]


def beta_weights(norms: torch.Tensor, beta: float) -> torch.Tensor:
    """cₜ = λₜ/‖ΔWₜ‖ with λₜ = β‖ΔWₜ‖ + (1−β)·mean‖ΔW‖ (Eq. 3–4 of CtM).

    An update below 1e-10 of the largest (zero up to the rounding of the core projection) gets
    cₜ = 0 rather than an enormous weight on rounding noise.
    """
    alive = norms > norms.max() * 1e-10
    lam = beta * norms + (1.0 - beta) * norms.mean()
    return torch.where(alive, lam / norms.clamp_min(torch.finfo(norms.dtype).tiny), 0.0)


def build_ctm_core_space(
    As: Sequence[torch.Tensor],
    Bs: Sequence[torch.Tensor],
    scalings: Sequence[float],
    beta: float,
    dtype: torch.dtype = torch.float32,
) -> tuple[CoreSpace, torch.Tensor]:
    """CtM's core space, with bases that diagonalise its HOSVD Grams; returns (space, c).

    cₜ are the β weights (Eq. 3–4), from ‖ΔWₜ‖² = tr(B̃ₜᵀB̃ₜ · AₜAₜᵀ) (the Gram blocks).
    HOSVD's mode-1 Gram is Σₜ cₜ² ΔWₜΔWₜᵀ = F Fᵀ with F = [cₜ B̃ₜ (AₜAₜᵀ)^½]ₜ, whose column
    space is Σₜ range(ΔWₜ) (for cₜ > 0). Taking U_B from F's SVD, F = U_B Σ Wᵀ (via FᵀF =
    Mᵀ(B_catᵀB_cat) M, M = blockdiag(cₜ(AₜAₜᵀ)^½)), makes U_Bᵀ F Fᵀ U_B = Σ² diagonal: the
    HOSVD factor is the leading coordinate vectors, and the eigendecomposition that finds the
    core basis is the one HOSVD needs (``tucker2_batch(..., hosvd_diagonal=True)``). V_A
    likewise from [cₜ Aₜᵀ (B̃ₜᵀB̃ₜ)^½]. Theorem 4.1 holds for every task with cₜ > 0, and
    Pₜ = U_BᵀB̃ₜ, Qₜ = V_AᵀAₜᵀ come from the Gram matrices: no extra pass over n or m.
    """
    B_cat, A_cat = _stack(As, Bs, scalings, dtype)
    ranks = tuple(int(A.shape[0]) for A in As)
    GB, GA = gram64(B_cat), gram64(A_cat.mT)
    T, rmax = len(ranks), max(ranks)
    idx = _padded_index(ranks, GB.device)
    GB4, GA4 = _block_view(GB, idx, T, rmax), _block_view(GA, idx, T, rmax)
    diag_B = GB4.diagonal(dim1=0, dim2=1).permute(2, 0, 1)  # (T, r_max, r_max): B̃ₜᵀB̃ₜ
    diag_A = GA4.diagonal(dim1=0, dim2=1).permute(2, 0, 1)  # AₜAₜᵀ
    norms = (diag_B * diag_A).sum((-2, -1)).clamp_min(0).sqrt()
    c = beta_weights(norms, beta)
    root_A, root_B = c.view(-1, 1, 1) * psd_sqrt(diag_A), c.view(-1, 1, 1) * psd_sqrt(diag_B)
    # M_B = blockdiag(root_Aₜ), M_A = blockdiag(root_Bₜ), applied block by block: O(T²r³)
    W_B, sig_B = eigh_basis(_congruence(GB4, root_A, idx), default_rtol(B_cat))
    W_A, sig_A = eigh_basis(_congruence(GA4, root_B, idx), default_rtol(A_cat.mT))
    coef_B = _block_apply(root_A, W_B / sig_B, idx)
    coef_A = _block_apply(root_B, W_A / sig_A, idx)
    space = CoreSpace(
        B_cat=B_cat,
        A_cat=A_cat,
        coef_B=coef_B,
        coef_A=coef_A,
        P=coef_B.mT @ GB,  # U_Bᵀ B_cat
        Q=coef_A.mT @ GA,  # V_Aᵀ A_catᵀ
        ranks=ranks,
    )
    return space, c
