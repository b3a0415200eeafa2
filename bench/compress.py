"""Full-checkpoint compression: truncated SVD of task vectors ΔW = W_ft − W_base.

    python bench/compress.py                    # 4096², 14336×4096; rank 16, 64; ~3 min, 2 cores
    python bench/compress.py --quick            # 4096² only, no full SVD (accuracy vs the
                                                # analytic truncation only)
    python bench/compress.py --full-svd-large   # also time the full SVD of 14336×4096 (slow)
    python bench/compress.py --shapes 14336x4096 --ranks 16 --niter 4
    python bench/compress.py --device cuda

What is timed, float32, per tensor (best of ``--repeats`` interleaved rounds, default 2; the
full SVD once; generation and accuracy are not timed):
* full SVD   : ``torch.linalg.svd(ΔW, full_matrices=False)``, the cost to beat (one call serves
               every rank);
* svd_lowrank: ``torch.svd_lowrank(ΔW, q=rank+oversample, niter=2 / 4 / 16)`` (subspace
               iteration with QR between steps; oversample as ours, max(8, k // 4); niter 16
               is about what k = 16 needs to reach criterion 1);
* ours       : ``truncated_svd(ΔW, rank)``, what ``compress_delta`` runs (method "auto":
               randomized block Krylov that stops on its own error estimates).

Accuracy, against the analytic rank-k truncation of the generator (float64, independent of
every method timed), for each method:
* crit. 1  ‖ΔW_k − ΔW_k*‖_F / ‖ΔW_k*‖_F          target ≤ 1e-4 (when the gap allows, below)
* crit. 2  ‖ΔW − ΔW_k‖_F / ‖ΔW − ΔW_k*‖_F − 1      target ≤ 1e-6 (always)
with the relative gap (σ_k − σ_{k+1}) / σ_k of the spectrum at k printed beside them.

The stand-in for a real task vector (``realistic_delta``): singular values of a full
fine-tune's ΔW decay slowly, with a few dominant directions on top and a noise bulk below.
We build exactly that, with a spectrum we know: a signal of rank s with σᵢ ∝ i^-α (α 0.5–1,
multiplicative jitter so that gaps vary rather than follow i^-α's smooth spacing, the first
three directions boosted 4×, 2.5×, 1.6×) on random orthonormal bases, plus a Gaussian noise
matrix projected off the signal's row and column spaces (so the SVD splits exactly into
signal ⊕ noise) and scaled so that its Marchenko–Pastur edge sits at 0.9·σ_s. The noise bulk
is the part of ΔW no low-rank method captures, as with SGD noise in real checkpoints (10 % of
‖ΔW‖² at α = 0.5, 0.06 % at α = 1; a rank-16 truncation leaves 22 % and 0.4 %). Because the
signal sits above the noise edge, the exact top-k (k < s) is the signal's own, known in
float64 without any SVD.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from dataclasses import dataclass

import torch

from mergekit_ctm.engine.compress import truncated_svd

BOOST = (4.0, 2.5, 1.6)


@dataclass
class Delta:
    """A synthetic ΔW with its exact top singular triplets (signal part, float64)."""

    W: torch.Tensor  # n × m, the stored delta (float32 unless asked otherwise)
    U: torch.Tensor  # n × s float64, orthonormal
    S: torch.Tensor  # s float64, descending
    V: torch.Tensor  # m × s float64, orthonormal

    def rel_gap(self, k: int) -> float:
        """(σ_k − σ_{k+1}) / σ_k of the whole spectrum (k < s)."""
        return float((self.S[k - 1] - self.S[k]) / self.S[k - 1])


def realistic_delta(
    n: int,
    m: int,
    *,
    alpha: float = 0.75,
    signal_rank: int | None = None,
    jitter: float = 0.05,
    noise_edge: float = 0.9,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> Delta:
    """A task-vector stand-in: power-law signal of rank s + a noise bulk below it (see above).

    ``alpha``: decay exponent of σᵢ ∝ i^-α; ``signal_rank`` s (default min(n, m) // 16, at
    least 64); ``jitter``: log-normal spread of each σᵢ before sorting; ``noise_edge``: top of
    the noise bulk as a fraction of σ_s (0 disables the noise). Frobenius norm ≈ 1.
    """
    s = signal_rank or max(min(n, m) // 16, 64)
    g = torch.Generator().manual_seed(seed)
    i = torch.arange(1, s + 1, dtype=torch.float64)
    S = i.pow(-alpha) * torch.exp(jitter * torch.randn(s, generator=g, dtype=torch.float64))
    S[: len(BOOST)] *= torch.tensor(BOOST, dtype=torch.float64)
    S = S.sort(descending=True).values
    U = torch.linalg.qr(torch.randn(n, s, generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(m, s, generator=g, dtype=torch.float64)).Q
    Uw, Vw = U.to(device, dtype), V.to(device, dtype)
    W = (Uw * S.to(device, dtype)) @ Vw.mT
    if noise_edge > 0:
        N = torch.randn(n, m, generator=g, dtype=torch.float32).to(device, dtype)
        N -= Uw @ (Uw.mT @ N)
        N -= (N @ Vw) @ Vw.mT
        W += N * (noise_edge * float(S[-1]) / (math.sqrt(n) + math.sqrt(m)))
    scale = float(torch.linalg.norm(W.double()))
    W /= scale
    return Delta(W, U, S / scale, V)


# ---------------------------------------------------------------------------------------------
# Measurement


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int):
    """(best wall time in s, last result) over ``repeats`` calls."""
    best, out = math.inf, None
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        out = fn()
        sync(device)
        best = min(best, time.perf_counter() - t)
    return best, out


class Accuracy:
    """Both criteria of a rank-k factorization B A against the generator's exact truncation.

    float64 throughout; ΔW_k* = U_k diag(σ_k) V_kᵀ is never formed: criterion 1 is
    ‖[B, −U_kΣ_k][A; V_kᵀ]‖_F, read off the R factors of the two thin stacks (no cancellation),
    and ‖ΔW − X‖² = ‖ΔW‖² − 2⟨ΔW, X⟩ + ‖X‖² for X = B A or ΔW_k* (one n × m × k product each).
    """

    def __init__(self, d: Delta) -> None:
        self.d = d
        self.Wd = d.W.double().cpu()
        self.fro2 = float(self.Wd.square().sum())

    def _resid2(self, B: torch.Tensor, A: torch.Tensor) -> float:
        inner = float(((self.Wd @ A.mT) * B).sum())
        return self.fro2 - 2 * inner + float(((B.mT @ B) * (A @ A.mT)).sum())

    def __call__(self, A: torch.Tensor, B: torch.Tensor) -> tuple[float, float]:
        k = A.shape[0]
        A, B = A.double().cpu(), B.double().cpu()
        Bs, As = self.d.U[:, :k] * self.d.S[:k], self.d.V[:, :k].mT
        Rg = torch.linalg.qr(torch.cat([B, -Bs], dim=1)).R
        Rh = torch.linalg.qr(torch.cat([A, As], dim=0).mT).R
        c1 = float(torch.linalg.norm(Rg @ Rh.mT) / torch.linalg.norm(self.d.S[:k]))
        opt2 = self._resid2(Bs, As)
        return c1, math.sqrt(max(self._resid2(B, A), 0.0) / opt2) - 1


def balanced(U: torch.Tensor, S: torch.Tensor, V: torch.Tensor, k: int):
    """(A, B) = (√Σ_k V_kᵀ, U_k √Σ_k) of a thin SVD (V: m × ≥k)."""
    root = S[:k].sqrt()
    return root.unsqueeze(-1) * V[:, :k].mT, U[:, :k] * root


def bench_shape(n, m, alpha, ranks, niters, device, repeats, with_full) -> None:
    d = realistic_delta(n, m, alpha=alpha, seed=0)
    acc = Accuracy(d)
    W = d.W.to(device)
    full = None
    if with_full:
        full = timed(lambda: torch.linalg.svd(W, full_matrices=False), device, 1)
    for k in ranks:
        q = k + max(8, k // 4)  # our default oversampling

        def lowrank(niter, q=q):
            torch.manual_seed(0)
            return torch.svd_lowrank(W, q=q, niter=niter)

        methods = {"ours (auto)": lambda k=k: truncated_svd(W, k)}
        for niter in niters:
            methods[f"svd_lowrank q={q} niter={niter}"] = lambda niter=niter: lowrank(niter)
        # Rounds interleave the methods, so a burst of load on a shared machine hits all alike.
        best, out = dict.fromkeys(methods, math.inf), {}
        for _ in range(repeats):
            for name, fn in methods.items():
                t, out[name] = timed(fn, device, 1)
                best[name] = min(best[name], t)
        svd = out["ours (auto)"]
        info = f"{svd.steps} / {svd.basis}" if svd.method == "krylov" else svd.method
        rows = [(name, best[name], balanced(*out[name][:3], k)) for name in methods]
        if full is not None:
            U, S, Vh = full[1]
            rows.append(("full SVD", full[0], balanced(U, S, Vh.mT, k)))
        t_ours = best["ours (auto)"]
        for name, t, (A, B) in rows:
            c1, c2 = acc(A, B)
            vs_full = f"{full[0] / t:.0f}×" if full is not None else "–"
            steps = info if name.startswith("ours") else ""
            print(
                f"| {n}×{m} | {alpha} | {k} | {name} | {t:.2f} s | {vs_full} | "
                f"{t / t_ours:.2f} | {c1:.1e} | {c2:.1e} | {d.rel_gap(k):.1e} | {steps} |",
                flush=True,
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="4096² only, no full SVD")
    ap.add_argument("--full-svd-large", action="store_true", help="also full SVD of 14336×4096")
    ap.add_argument("--shapes", nargs="+", default=None, help="e.g. 14336x4096 (default both)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--ranks", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--alpha", type=float, nargs="+", default=[0.5])
    ap.add_argument("--niter", type=int, nargs="+", default=[2, 4, 16], help="svd_lowrank's")
    ap.add_argument("--repeats", type=int, default=2, help="best of (full SVD: always 1)")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    shapes = [(4096, 4096)] if args.quick else [(4096, 4096), (14336, 4096)]
    if args.shapes:
        shapes = [tuple(int(x) for x in s.lower().split("x")) for s in args.shapes]
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    threads = torch.get_num_threads()
    print(f"device {device}, torch {torch.__version__}, {threads} threads, load {load}")
    print(
        "| shape | α | k | method | time | × vs full SVD | × vs ours | crit. 1 | crit. 2 | "
        "gap at k | steps / basis |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for n, m in shapes:
        with_full = not args.quick and (n == m or args.full_svd_large)
        for alpha in args.alpha:
            bench_shape(n, m, alpha, args.ranks, args.niter, device, args.repeats, with_full)


if __name__ == "__main__":
    main()
