"""Compress a dense task vector ΔW (n × m) to rank k: truncated SVD as balanced LoRA factors.

Full fine-tuned checkpoints enter the engine this way: ΔWₜ = Wₜ − W_base is replaced by its
best rank-k approximation ΔW_k = B A with B = U_k √Σ_k (n × k), A = √Σ_k V_kᵀ (k × m) and
scaling 1, then merged like any adapter's factors.

Methods
-------
``exact``  ``torch.linalg.svd`` of ΔW (full_matrices=False) in the math dtype, truncated.
``krylov`` randomized block Krylov (Golub–Kahan block bidiagonalization with full
           reorthogonalization; Musco & Musco, NeurIPS 2015): start block Ω (m × b, b = k + p,
           Gaussian from a CPU generator seeded by ``seed``), then alternately ΔW·Pⱼ and ΔWᵀ·Qⱼ,
           each block orthonormalized against all earlier ones (block Gram–Schmidt twice, then
           Householder QR). After every step, Rayleigh–Ritz: the top singular triplets of the
           small projected matrix Qᵀ ΔW P (float64) are the Ritz triplets (= the truncated SVD
           of Q Qᵀ ΔW), and the next block's R factor gives each one's residual
           ‖ΔW vᵢ − σ̃ᵢ uᵢ‖ at no extra product. It stops when the error estimates below meet
           their targets, or at ``max_dim`` basis columns (``converged`` False).
``auto``   (default) ``exact`` when the Krylov cap does not fit (min(n, m) < 9·(k + p) with the
           default cap), where the full SVD is about as cheap and certain; else ``krylov``,
           falling back to ``exact`` if it has not converged at the cap (seen only on
           noise-like ΔW whose spectrum is flat around k, e.g. pure Gaussian 4096², k = 64).

Accuracy (what "converged" aims at; tests/engine/test_compress.py and bench/compress.py
measure it against an independent float64 reference):

1. ‖ΔW_k − ΔW_k*‖_F ≤ 1e-4 · ‖ΔW_k*‖_F, ΔW_k* the exact truncation, wherever the relative gap
   (σ_k − σ_{k+1}) / σ_k ≥ GAP_FLOOR = 1e-2. Below that the truncation itself is ill-posed
   (which of two nearly equal directions it keeps is arbitrary, and float32 rounding alone
   moves it); there only criterion 2 is promised, though Krylov usually meets 1 anyway.
2. ‖ΔW − ΔW_k‖_F ≤ (1 + 1e-6) · max(‖ΔW − ΔW_k*‖_F, 1e-3·‖ΔW‖_F): a near-optimal residual,
   always (the floor keeps a ΔW of numerical rank ≤ k from chasing rounding).

Both are steered by estimates from the Ritz residuals rᵢ (not bounds: the gap uses the Ritz
value σ̃_{k+1}). Ritz vector i is within ~rᵢ / gapᵢ of the exact top-k space, with
gapᵢ = max(σ̃ᵢ − σ̃_{k+1}, 1e-2·σ̃ᵢ), which moves ΔW_k by ~σ̃ᵢ rᵢ / gapᵢ: criterion 1's estimate,
stopped at ``tol`` = 1e-5 (10× margin; it is waived once the gap at k is certainly below
1e-2). Ritz values are low by at most min(rᵢ, rᵢ² / gapᵢ), and for Ritz triplets
‖ΔW − ΔW_k‖² = ‖ΔW‖² − Σ σ̃ᵢ², so that is criterion 2's estimate, stopped at 1e-7 (10×).
How close it comes, and how fast, is measured by bench/compress.py (docs/benchmarks.md).

Determinism: on the CPU every product with ΔW or with a tall basis is split into fixed
256-row blocks, each computed on one thread (from POOL_MIN entries, several blocks at once on
a pool of one-thread workers when torch has several threads), and everything else runs on
one thread, so the bits do not depend on the torch thread count. The start block is drawn on
the CPU and moved, so CPU and CUDA run the same algorithm (equal up to rounding). Signs are
canonical: each column of U has its largest-magnitude entry positive (``canonical_signs``).
``exact`` is as deterministic as the LAPACK/cuSOLVER SVD it calls (on the CPU it runs on one
thread for min(n, m) ≤ 512).

Math dtype: ``dtype`` if given, else float32 for float32 / low-precision inputs and float64
for float64 ones; factors come back in it, on ΔW's device.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import torch

from mergekit_ctm.engine.linalg import canonical_signs, tiny_cpu_ops

METHODS = ("auto", "exact", "krylov")
POOL_MIN = 1 << 20  # ΔW entries from which products run on a worker pool (same bits anyway)
ROWS = 256  # row block of the partitioned CPU products (fixed: the bits must not depend on it)
GAP_FLOOR = 1e-2  # relative gap below which criterion 1 is not promised (module docstring)
RESIDUAL_TOL = 1e-7  # target of the criterion-2 estimate (promise: 1e-6)
TAIL_FLOOR = 1e-3  # criterion 2 is relative to max(‖ΔW − ΔW_k‖, this·‖ΔW‖)
STEPS = 8  # Krylov blocks always allowed before the cap (realistic ΔW converge in 4–8)
F64 = torch.float64


class TruncatedSVD(NamedTuple):
    """ΔW ≈ U diag(S) Vᵀ, k ≤ rank columns, U's columns sign-canonical."""

    U: torch.Tensor  # n × k
    S: torch.Tensor  # k, descending
    V: torch.Tensor  # m × k
    method: str  # "exact" or "krylov": what actually ran
    steps: int  # Krylov block steps (0 for exact)
    basis: int  # Krylov basis columns (0 for exact)
    converged: bool  # False only for a "krylov" that hit max_dim
    error_estimate: float  # criterion-1 estimate (0 for exact, or where criterion 1 is waived)


def compress_delta(
    delta: torch.Tensor,
    rank: int,
    *,
    method: str = "auto",
    seed: int = 0,
    oversample: int | None = None,
    tol: float = 1e-5,
    max_dim: int | None = None,
    rtol: float | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-``rank`` approximation of ``delta`` as balanced LoRA factors (A, B), scaling 1.

    Args:
        delta: ΔW, n × m, any float dtype, CPU or CUDA (the result stays on its device).
        rank: target rank k ≥ 0. Fewer columns come back when ΔW has fewer singular values
            above ``rtol``·σ₁; an all-zero ΔW gives k = 0: A (0 × m), B (n × 0).
        method: "auto", "exact" or "krylov" (module docstring).
        seed: seed of the Krylov start block (drawn on the CPU, then moved to ΔW's device).
        oversample: p, Krylov block size k + p (default max(8, k // 4)).
        tol: criterion-1 estimate at which Krylov stops (relative to ‖ΔW_k‖_F).
        max_dim: cap on Krylov basis columns (default max(min(n, m) // 4, 8·(k + p))).
        rtol: singular values ≤ rtol·σ₁ are dropped (default 4·eps of the math dtype ·
            √max(n, m): the size of the rounding a zero singular value picks up).
        dtype: math dtype (default float32, or float64 for float64 input).

    Returns:
        (A, B): A = √Σ_k V_kᵀ (k × m), B = U_k √Σ_k (n × k), so BᵀB = AAᵀ = Σ_k and B A = ΔW_k.
    """
    svd = truncated_svd(
        delta,
        rank,
        method=method,
        seed=seed,
        oversample=oversample,
        tol=tol,
        max_dim=max_dim,
        rtol=rtol,
        dtype=dtype,
    )
    root = svd.S.sqrt()
    return root.unsqueeze(-1) * svd.V.mT, svd.U * root


def truncated_svd(
    delta: torch.Tensor,
    rank: int,
    *,
    method: str = "auto",
    seed: int = 0,
    oversample: int | None = None,
    tol: float = 1e-5,
    max_dim: int | None = None,
    rtol: float | None = None,
    dtype: torch.dtype | None = None,
) -> TruncatedSVD:
    """``compress_delta``'s truncated SVD ΔW ≈ U diag(S) Vᵀ, with what ran (``TruncatedSVD``).

    Same arguments as ``compress_delta``; U (n × k) and V (m × k) have orthonormal columns,
    signs canonical on U, S descending, all in the math dtype on ΔW's device.
    """
    if delta.dim() != 2:
        raise ValueError(f"compress_delta needs a 2-D ΔW, got shape {tuple(delta.shape)}")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: use one of {', '.join(METHODS)}")
    if rank < 0:
        raise ValueError(f"rank must be ≥ 0, got {rank}")
    if dtype is None:
        dtype = F64 if delta.dtype == F64 else torch.float32
    if not dtype.is_floating_point or torch.finfo(dtype).bits < 32:
        raise ValueError(f"math dtype must be float32 or float64, got {dtype}")
    n, m = delta.shape
    k = min(rank, n, m)
    X = delta.to(dtype)
    if rtol is None:
        rtol = 4 * torch.finfo(dtype).eps * math.sqrt(max(n, m, 1))
    p = max(8, k // 4) if oversample is None else oversample
    if p < 1:
        raise ValueError(f"oversample must be ≥ 1, got {p}")
    if k == 0:
        return _empty(X)
    b = k + p
    cap = max(min(n, m) // 4, STEPS * b) if max_dim is None else max(max_dim, b)
    room = min(n, m) - b  # the basis must leave room for the next block
    if room >= b and (method == "krylov" or (method == "auto" and room >= cap)):
        out = _krylov(X, k, b, tol, min(cap, room), seed, rtol)
        if out.converged or method == "krylov":
            return out
    with tiny_cpu_ops(X.device, min(n, m)):  # LAPACK on ≤ 512 columns: one thread
        return _exact(X, k, rtol)


def _empty(X: torch.Tensor) -> TruncatedSVD:
    n, m = X.shape
    z = X.new_zeros
    return TruncatedSVD(z(n, 0), z(0), z(m, 0), "exact", 0, 0, True, 0.0)


def _finish(U, S, V, k, rtol, method, steps, basis, converged, est) -> TruncatedSVD:
    """Truncate to k and to σ > rtol·σ₁, canonicalize signs."""
    k = min(k, int((S > rtol * S[:1].clamp_min(torch.finfo(S.dtype).tiny)).sum()))
    U, S, V = U[:, :k], S[:k], V[:, :k]
    if k:
        sign = canonical_signs(U)
        U, V = U * sign, V * sign
    return TruncatedSVD(U, S, V, method, steps, basis, converged, est)


def _exact(X: torch.Tensor, k: int, rtol: float) -> TruncatedSVD:
    if not bool(torch.isfinite(X).all()):
        raise ValueError("ΔW has NaN or infinite entries")
    U, S, Vh = torch.linalg.svd(X, full_matrices=False)
    return _finish(U, S, Vh.mT, k, rtol, "exact", 0, 0, True, 0.0)


class _Products:
    """Matrix products whose bits do not depend on the thread count (CPU) or plain (CUDA).

    ``mm(A, B)`` = A B split into fixed blocks of A's rows; ``tmm(A, B)`` = Aᵀ B for tall A and
    B, as fixed row chunks whose partial products are summed in order. Each block runs on one
    thread; ``pool`` runs several at once.
    """

    def __init__(self, device: torch.device, pool: ThreadPoolExecutor | None) -> None:
        self.cpu = device.type == "cpu"
        self.pool = pool

    def run(self, fn, starts) -> list:
        if self.pool is None:
            return [fn(i) for i in starts]
        return list(self.pool.map(fn, starts))

    def mm(self, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        if not self.cpu or A.shape[0] <= ROWS:
            return A @ B
        out = A.new_empty(A.shape[0], B.shape[1])

        def block(i: int) -> None:
            torch.mm(A[i : i + ROWS], B, out=out[i : i + ROWS])

        self.run(block, range(0, A.shape[0], ROWS))
        return out

    def tmm(self, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        if not self.cpu or A.shape[0] <= ROWS:
            return A.mT @ B
        parts = self.run(lambda i: A[i : i + ROWS].mT @ B[i : i + ROWS], range(0, A.shape[0], ROWS))
        out = parts[0]
        for part in parts[1:]:
            out += part
        return out


@contextlib.contextmanager
def _products(device: torch.device, size: int) -> Iterator[_Products]:
    """Products for one compression of a ΔW with ``size`` entries.

    On the CPU the calling thread runs on one thread until the end (its own work is tiny:
    QR of one block, the small eigh), and, from POOL_MIN entries on a multi-threaded torch,
    the blocks of each product go to a pool of one-thread workers. Smaller ΔW run the same
    blocks one after the other (same bits; handing tiny products to a pool costs more than
    it saves, more so on a busy machine).
    """
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1:
        yield _Products(device, None)
        return
    torch.set_num_threads(1)
    try:
        if size < POOL_MIN:
            yield _Products(device, None)
            return
        init = torch.set_num_threads
        with ThreadPoolExecutor(threads, initializer=init, initargs=(1,)) as pool:
            yield _Products(device, pool)
    finally:
        torch.set_num_threads(threads)


def _orthonormalize(
    ops: _Products, Y: torch.Tensor, basis: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Y = basis C + Qn R with Qn orthonormal and ⟂ basis (block Gram–Schmidt twice, QR).

    A block that lost most of its norm to the projection (the Krylov space is nearly
    invariant) is orthogonalized once more after the QR, so Qn stays ⟂ basis to rounding.
    """
    C = Y.new_zeros(basis.shape[1], Y.shape[1])
    before = torch.linalg.norm(Y)
    for _ in range(2):
        if basis.shape[1]:
            c = ops.tmm(basis, Y)
            Y = Y - ops.mm(basis, c)
            C += c
    Qn, R = torch.linalg.qr(Y)
    if basis.shape[1] and torch.linalg.norm(Y) < 0.5 * before:
        c = ops.tmm(basis, Qn)
        Qn, R2 = torch.linalg.qr(Qn - ops.mm(basis, c))
        C += c @ R
        R = R2 @ R
    return C, Qn, R


def _krylov(
    X: torch.Tensor, k: int, b: int, tol: float, cap: int, seed: int, rtol: float
) -> TruncatedSVD:
    n, m = X.shape
    dev, dt = X.device, X.dtype
    gen = torch.Generator().manual_seed(seed)
    omega = torch.randn(m, b, generator=gen, dtype=torch.float32).to(dev, dt)
    # Basis buffers (untouched columns cost nothing on the CPU); column views grow per step.
    Qb = X.new_empty(n, cap + b)
    Pb = X.new_empty(m, cap + 2 * b)
    rows: list[torch.Tensor] = []  # row blocks of M = Qᵀ ΔW P (float64), widths growing
    with _products(dev, n * m) as ops:
        fro2 = _fro2(ops, X) if ops.cpu else float(torch.linalg.vector_norm(X, dtype=F64) ** 2)
        if not math.isfinite(fro2):
            raise ValueError("ΔW has NaN or infinite entries")
        if fro2 == 0:
            return _empty(X)
        Pb[:, :b] = torch.linalg.qr(omega).Q
        dp = b  # columns of P
        _, Qj, _ = _orthonormalize(ops, ops.mm(X, Pb[:, :b]), Qb[:, :0])
        dq = steps = 0
        while True:
            steps += 1
            bq = Qj.shape[1]
            Qb[:, dq : dq + bq] = Qj
            C, Pn, Rn = _orthonormalize(ops, ops.mm(X.mT, Qj), Pb[:, :dp])
            rows.append(torch.cat([C.mT, Rn.mT], dim=1).to(F64))
            dq += bq
            Pb[:, dp : dp + Pn.shape[1]] = Pn
            dp_new = dp + Pn.shape[1]
            # Rayleigh–Ritz on span(Q) × span(P): the top Ritz triplets of M.
            Ut, St, Wt = _top_triplets(_assemble(rows, dq, dp_new), k + 1)
            # The next block: its R factor gives the residuals ‖ΔW vᵢ − σ̃ᵢ uᵢ‖ of these.
            _, Qn, Rq = _orthonormalize(ops, ops.mm(X, Pn), Qb[:, :dq])
            res = torch.linalg.norm(Rq.to(F64) @ Wt[dp:dp_new], dim=0)
            est, resid = _estimates(St, res, k, fro2, rtol)
            done = est <= tol and resid <= RESIDUAL_TOL
            if done or dq + b > cap:
                Ut, St, Wt = _top_triplets(_assemble(rows, dq, dp_new), k, exact=True)
                U = ops.mm(Qb[:, :dq], Ut[:, :k].to(dt))
                V = ops.mm(Pb[:, :dp_new], Wt[:, :k].to(dt))
                return _finish(U, St[:k].to(dt), V, k, rtol, "krylov", steps, dq, done, est)
            dp = dp_new
            Qj = Qn


def _assemble(rows: list[torch.Tensor], dq: int, dp: int) -> torch.Tensor:
    M = rows[0].new_zeros(dq, dp)
    i = 0
    for r in rows:
        M[i : i + r.shape[0], : r.shape[1]] = r
        i += r.shape[0]
    return M


def _top_triplets(
    M: torch.Tensor, k: int, exact: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k singular triplets (U, S, W) of a small float64 M (rows ≤ cols), W = Mᵀ U / S.

    For the per-step checks from eigh(M Mᵀ), half the cost of ``svd``: squaring in float64
    resolves the top vectors to ~1e-16 / relative gap² and σ down to ~1e-8·σ₁, which is all
    the estimates need. The result (``exact``) comes from ``svd``, which also resolves tiny
    σ, so that a rank-deficient ΔW in float64 math is cut at ``rtol`` as it should be.
    """
    if exact:
        U, S, Wh = torch.linalg.svd(M, full_matrices=False)
        return U[:, :k], S[:k], Wh[:k].mT
    evals, evecs = torch.linalg.eigh(M @ M.mT)
    k = min(k, evals.shape[0])
    S = evals.flip(0)[:k].clamp_min(0).sqrt()
    U = evecs.flip(1)[:, :k]
    W = (M.mT @ U) / S.clamp_min(torch.finfo(F64).tiny)
    return U, S, W


def _fro2(ops: _Products, X: torch.Tensor) -> float:
    """‖X‖_F² in fixed row blocks (same bits on any thread count), summed in float64.

    Each block's norm is accumulated in X's dtype (relative error ~1e-7 in float32; fro2
    only sizes the residual tail for criterion 2): converting every entry to float64 made
    this cost as much as two products with ΔW.
    """
    parts = ops.run(
        lambda i: torch.linalg.vector_norm(X[i : i + ROWS]).to(F64).square(),
        range(0, X.shape[0], ROWS),
    )
    return float(torch.stack(parts).sum())


def _estimates(
    St: torch.Tensor, res: torch.Tensor, k: int, fro2: float, rtol: float
) -> tuple[float, float]:
    """(criterion-1 estimate, criterion-2 estimate) from Ritz values St and residuals res.

    Only triplets the truncation keeps (σ̃ > rtol·σ̃₁) count. Criterion 1 is waived (0) when
    the gap at k is certainly below GAP_FLOOR: σ̃_k − σ̃_{k+1} + r_k + r_{k+1} < GAP_FLOOR·σ̃_k
    (each Ritz value is within its residual of a true singular value).
    """
    kk = int((St[:k] > rtol * St[0]).sum())
    if kk == 0:
        return 0.0, 0.0
    s, r = St[:kk], res[:kk]
    nxt = St[kk] if St.shape[0] > kk else St.new_zeros(())
    gap = torch.maximum(s - nxt, GAP_FLOOR * s)
    waived = kk == k and res.shape[0] > k and bool(s[-1] - nxt + r[-1] + res[k] < gap[-1])
    est1 = 0.0 if waived else float(torch.linalg.norm(s * r / gap) / torch.linalg.norm(s))
    tail2 = max(fro2 - float((s * s).sum()), TAIL_FLOOR**2 * fro2)
    excess = float((2 * s * torch.minimum(r, r * r / gap)).sum())
    return est1, excess / (2 * tail2)
