"""Correctness numbers quoted in docs/benchmarks.md (the tests assert bounds on the same).

    python bench/correctness.py

* Theorem 4.1: max_t ‖U_B U_Bᵀ ΔWₜ V_A V_Aᵀ − ΔWₜ‖ / ‖ΔWₜ‖ (float32 and float64 math), for
  the canonical core space and for CtM's β-weighted one.
* Core-space vs full-space CtM: chordal distance of U and V, and the relative ΔW gap.
* Extrapolated vs plain HOOI: sweeps and distance at convergence.
* Our Tucker-2 objective vs tensorly's ``partial_tucker`` on the same core targets.
* HOOI at the authors' tolerance (1e-6) vs at convergence (1e-12): relative ΔW change.
"""

from __future__ import annotations

import math

import torch

from mergekit_ctm.engine import build_core_space, merge_lora, tucker2, tucker2_dense
from mergekit_ctm.engine.core import build_ctm_core_space


def factors(T: int, n: int, m: int, r: int, seed: int = 0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    norms = torch.logspace(-0.5, 0.5, T).tolist()
    As = [torch.randn(r, m, generator=g, dtype=torch.float64).to(dtype) for _ in range(T)]
    Bs = [
        (norms[t] * torch.randn(n, r, generator=g, dtype=torch.float64)).to(dtype) for t in range(T)
    ]
    return As, Bs, [2.0] * T


def chordal(U1: torch.Tensor, U2: torch.Tensor) -> float:
    return float(torch.linalg.norm(U1 @ U1.T - U2 @ U2.T)) / math.sqrt(2)


def main() -> None:
    T, n, m, r = 6, 512, 384, 8
    for dtype in (torch.float32, torch.float64):
        As, Bs, s = factors(T, n, m, r, dtype=dtype)
        dW = torch.stack([si * B.double() @ A.double() for A, B, si in zip(As, Bs, s)])
        for name, cs in (
            ("canonical", build_core_space(As, Bs, s, dtype)),
            ("ctm β = 0.5", build_ctm_core_space(As, Bs, s, 0.5, dtype)[0]),
        ):
            U, V = cs.U_B().double(), cs.V_A().double()
            err = max(float((U @ U.T @ d @ V @ V.T - d).norm() / d.norm()) for d in dW)
            print(f"Theorem 4.1 ({name}, {str(dtype)[6:]} math): max relative error {err:.1e}")

    As, Bs, s = factors(T, n, m, r)
    dW = torch.stack([si * B @ A for A, B, si in zip(As, Bs, s)])
    norms = torch.linalg.matrix_norm(dW)
    c = (0.5 * norms + 0.5 * norms.mean()) / norms
    cs = build_core_space(As, Bs, s, torch.float64)
    Pp, Qp = cs.padded()
    core = tucker2(Pp * c.view(-1, 1, 1), Qp, 16, iters=5000, tol=1e-14)
    full = tucker2_dense(c.view(-1, 1, 1) * dW, 16, iters=5000, tol=1e-14)
    Uc, Vc = cs.U_B() @ core.U, cs.V_A() @ core.V
    print(
        f"core vs full space (T={T}, {n}x{m}, r_in={r}, r=16): chordal distance "
        f"U {chordal(Uc, full.U):.1e}, V {chordal(Vc, full.V):.1e}; "
        f"sweeps {core.sweeps} / {full.sweeps}; rel. error {core.errors[-1]:.12f} / "
        f"{full.errors[-1]:.12f}"
    )

    plain = tucker2(Pp * c.view(-1, 1, 1), Qp, 16, iters=5000, tol=1e-14, extrapolate=False)
    print(
        f"extrapolated vs plain HOOI at tol 1e-14: sweeps {core.sweeps} / {plain.sweeps}, "
        f"chordal distance U {chordal(core.U, plain.U):.1e}, V {chordal(core.V, plain.V):.1e}"
    )

    import tensorly as tl
    from tensorly.decomposition import partial_tucker

    tl.set_backend("pytorch")
    X = (cs.core_matrices() * c.view(-1, 1, 1)).permute(1, 2, 0).contiguous()
    (core_t, (Ut, Vt)), _ = partial_tucker(
        X, rank=[16, 16], modes=[0, 1], n_iter_max=5000, tol=1e-14
    )
    rec = torch.einsum("abt,ia,jb->ijt", core_t, Ut, Vt)
    err_tl = float(torch.linalg.norm(rec - X) / torch.linalg.norm(X))
    print(
        f"tensorly partial_tucker relative error {err_tl:.12f} vs ours "
        f"{core.errors[-1]:.12f} (gap {abs(err_tl - core.errors[-1]):.1e})"
    )

    loose = merge_lora(As, Bs, s, method="ctm", rank=16, hooi_tol=1e-6, dtype=torch.float64)
    tight = merge_lora(As, Bs, s, method="ctm", rank=16, hooi_tol=1e-12, dtype=torch.float64)
    gap = float((loose.delta() - tight.delta()).norm() / tight.delta().norm())
    print(
        f"HOOI tol 1e-6 ({loose.info['hooi_sweeps']} sweeps) vs 1e-12 "
        f"({tight.info['hooi_sweeps']} sweeps): relative ΔW change {gap:.1e}"
    )


if __name__ == "__main__":
    main()
