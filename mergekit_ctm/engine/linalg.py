"""Small linear-algebra kernels shared by the pipelines.

Everything here is dtype- and device-preserving unless stated: the callers decide which
tensors are float64 (the tiny core problems) and which stay in the math dtype (n × Σrₜ).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

F64 = torch.float64


TINY = 512  # matrices up to this order run single-threaded (see tiny_cpu_ops)


@contextlib.contextmanager
def tiny_cpu_ops(device: torch.device, size: int = 0) -> Iterator[None]:
    """Run a block of tiny CPU linear algebra on one thread, then restore the thread count.

    LAPACK/BLAS calls on (Σrₜ)-sized matrices take microseconds; with OpenMP they pay thread
    start-up and, on a busy machine, stall (measured in docs/benchmarks.md, "Engine speed").
    Large GEMMs outside the block keep every thread,
    and so does a block whose matrices have order ``size`` > TINY (Σrₜ at large T).
    ``pipelines.ctm_many`` runs a whole merge in one block when Σrₜ ≤ TINY.
    """
    if device.type != "cpu" or torch.get_num_threads() == 1 or size > TINY:
        yield
        return
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def mm_tall(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b for a tall, narrow result (rows ≫ columns), computed as (bᵀ aᵀ)ᵀ and returned as
    that transposed view. Same product; on the CPU, MKL's float64 GEMMs with 16–32 output
    columns ran at 10–14 GFLOP/s on the development machine (AMD EPYC), 2–2.5× slower than
    the transposed product with its wide output (docs/benchmarks.md, "Engine speed")."""
    return (b.mT @ a.mT).mT


def canonical_signs(X: torch.Tensor) -> torch.Tensor:
    """Return ±1 per column so that each column's largest-magnitude entry becomes positive.

    Ties in magnitude are broken by the lowest row index (``argmax`` returns the first
    maximum). Multiply the basis (and the coordinates that depend on it) by the result.
    """
    idx = X.abs().argmax(dim=-2, keepdim=True)
    pivot = torch.gather(X, -2, idx).squeeze(-2)
    return torch.where(pivot < 0, -1.0, 1.0).to(X.dtype)


def gram_basis(F: torch.Tensor, rtol: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Thin SVD of a tall F (N × R) through its float64 Gram matrix.

    Fᵀ F = W diag(σ²) Wᵀ, so F = U diag(σ) Wᵀ with U = F W diag(σ)⁻¹. Returns (W, σ) for the
    numerically nonzero directions only, σ descending. Cost N·R² (one GEMM) + R³; U itself is
    never formed here. Default cut: σ ≤ rtol·σ_max with rtol = max(R·eps(F.dtype), 1e-7). The
    Gram matrix resolves σ only down to ~√eps₆₄·σ_max ≈ 1.5e-8·σ_max, so directions below 1e-7
    are treated as zero; they change any ΔWₜ by less than that, relative to the largest.
    """
    return eigh_basis(gram64(F), default_rtol(F) if rtol is None else rtol)


def gram64(F: torch.Tensor) -> torch.Tensor:
    """Fᵀ F in float64 (products of float32 entries are exact there), for a tall F (N × R).

    Converted and accumulated in row blocks of ~64k entries: a float64 copy of all of F is a
    fresh multi-MB allocation per call whose first touch is slow (docs/benchmarks.md; the
    bits are the same either way).
    """
    N, R = F.shape[-2:]
    rows = min(max(65536 // max(R, 1), 64), 4096)
    if N <= rows:
        Fd = F.to(F64)
        return Fd.mT @ Fd
    G = F.new_zeros(R, R, dtype=F64)
    for i in range(0, N, rows):
        c = F[i : i + rows].to(F64)
        G.addmm_(c.mT, c)
    return G


def default_rtol(F: torch.Tensor) -> float:
    """gram_basis' cut for a tall F (N × R): max(R·eps(F.dtype), 1e-7)."""
    return max(max(F.shape[-1], 1) * torch.finfo(F.dtype).eps, 1e-7)


def eigh_basis(G: torch.Tensor, rtol: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(W, σ) with G = W diag(σ²) Wᵀ, σ descending, keeping σ > rtol·σ_max (G: PSD Gram)."""
    with tiny_cpu_ops(G.device, G.shape[-1]):
        evals, evecs = torch.linalg.eigh(G)
    evals, evecs = evals.flip(-1), evecs.flip(-1)
    sigma = evals.clamp_min(0).sqrt()
    smax = sigma[..., :1].clamp_min(torch.finfo(F64).tiny)
    keep = int((sigma > rtol * smax).sum())
    return evecs[..., :keep], sigma[..., :keep]


def psd_sqrt(G: torch.Tensor) -> torch.Tensor:
    """Symmetric square root of PSD matrices (batched): negative rounding clipped to 0."""
    with tiny_cpu_ops(G.device, G.shape[-1]):
        evals, evecs = torch.linalg.eigh(G)
    return (evecs * evals.clamp_min(0).sqrt().unsqueeze(-2)) @ evecs.mT


def top_eigh(H: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Largest-k eigenpairs of a symmetric H, eigenvalues descending."""
    evals, evecs = torch.linalg.eigh(H)
    return evals.flip(-1)[..., :k], evecs.flip(-1)[..., :k]


def balanced_svd_factors(
    C: torch.Tensor,
    rank: int | None,
    rtol: float = 1e-12,
    work_dtype: torch.dtype | None = F64,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVD C = P Σ Qᵀ truncated to ``rank`` nonzero directions, as balanced factors.

    Returns (P√Σ, √Σ Qᵀ, Σ), dropping singular values ≤ rtol·σ_max (never padded with zeros).
    Signs are canonicalized on P so equal inputs give equal factors on any device. The SVD runs
    in ``work_dtype`` (float64 for the small coordinate matrices; None keeps C's dtype, for the
    dense n × m matrices of full-space MtC).
    """
    P, S, Qh = torch.linalg.svd(C if work_dtype is None else C.to(work_dtype), full_matrices=False)
    k = S.shape[-1] if rank is None else min(rank, S.shape[-1])
    smax = S[:1].clamp_min(torch.finfo(S.dtype).tiny)
    k = min(k, int((S > rtol * smax).sum()))
    P, S, Qh = P[:, :k], S[:k], Qh[:k]
    if k == 0:  # C = 0 (e.g. updates that cancel): rank 0, nothing to sign
        return P, Qh, S
    sign = canonical_signs(P)
    P, Qh = P * sign, Qh * sign.unsqueeze(-1)
    root = S.sqrt()
    return P * root, root.unsqueeze(-1) * Qh, S
