"""Core space (Theorem 4.1) and the Tucker-2 solver against independent references."""

from __future__ import annotations

import math

import pytest
import torch

from mergekit_ctm.engine import build_core_space, tucker2, tucker2_batch, tucker2_dense
from mergekit_ctm.engine.core import beta_weights, build_ctm_core_space
from mergekit_ctm.engine.linalg import canonical_signs
from mergekit_ctm.engine.tucker import _stacked_gram

from .conftest import dense_updates, lora_factors


@pytest.mark.parametrize("ranks", [[4, 4, 4], [2, 5, 3, 8], [6]])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_core_projection_is_lossless(ranks, dtype):
    """Theorem 4.1: ΔWₜ = U_B U_Bᵀ ΔWₜ V_A V_Aᵀ and U_B M⁽ᵗ⁾ V_Aᵀ = ΔWₜ, for any rₜ."""
    As, Bs, s = lora_factors(len(ranks), ranks=ranks, dtype=dtype)
    dW = dense_updates(As, Bs, s)
    cs = build_core_space(As, Bs, s, dtype)
    U, V = cs.U_B().double(), cs.V_A().double()
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    eye = torch.eye(U.shape[1], dtype=torch.float64)
    assert torch.allclose(U.T @ U, eye, atol=tol * 10)
    for t, M in enumerate(cs.core_matrices()):
        assert torch.linalg.norm(U @ U.T @ dW[t] @ V @ V.T - dW[t]) <= tol * dW[t].norm()
        assert torch.linalg.norm(U @ M @ V.T - dW[t]) <= tol * dW[t].norm()
        assert torch.allclose(M, U.T @ dW[t] @ V, atol=tol * dW[t].norm())


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ctm_core_space_is_lossless_and_diagonalises_hosvd(beta, dtype):
    """CtM's weighted core space: Theorem 4.1 for every task, the β weights of the true
    ‖ΔWₜ‖, and HOSVD factors equal to the leading coordinate vectors (so tucker2 may skip its
    HOSVD eigendecompositions). A rank-deficient Aₜ (two equal rows) is included."""
    As, Bs, s = lora_factors(4, ranks=[3, 5, 2, 4], norms=[1, 6, 2, 30], seed=3)
    As[1][4] = As[1][0]
    As, Bs = [a.to(dtype) for a in As], [b.to(dtype) for b in Bs]
    dW = dense_updates(As, Bs, s)
    cs, c = build_ctm_core_space(As, Bs, s, beta, dtype)
    assert torch.allclose(c, beta_weights(torch.linalg.matrix_norm(dW), beta), rtol=1e-6)
    U, V = cs.U_B().double(), cs.V_A().double()
    tol = 1e-11 if dtype == torch.float64 else 2e-5
    assert torch.allclose(U.T @ U, torch.eye(U.shape[1], dtype=torch.float64), atol=tol * 10)
    assert torch.allclose(V.T @ V, torch.eye(V.shape[1], dtype=torch.float64), atol=tol * 10)
    for t, M in enumerate(cs.core_matrices()):
        assert torch.linalg.norm(U @ M @ V.T - dW[t]) <= tol * dW[t].norm()
    Pp, Qp = cs.padded()
    P = c.view(-1, 1, 1) * Pp
    for X, Y in ((P, Qp), (Qp, P)):  # mode-1 and mode-2 HOSVD Grams are diagonal, descending
        G = _stacked_gram(X.unsqueeze(0), (Y.mT @ Y).unsqueeze(0))[0]
        d = G.diagonal()
        assert float((G - torch.diag(d)).norm()) <= 1e-10 * float(d.norm())
        assert bool((d[:-1] >= d[1:] * (1 - 1e-9)).all())
    fast = tucker2_batch(P.unsqueeze(0), Qp.unsqueeze(0), 4, tol=1e-14, hosvd_diagonal=True)[0]
    ref = tucker2(P, Qp, 4, tol=1e-14)
    assert fast.errors[0] == pytest.approx(ref.errors[0], abs=1e-12)
    assert _chordal(fast.U, ref.U) < 1e-6 and _chordal(fast.V, ref.V) < 1e-6


def test_core_space_drops_numerically_zero_directions():
    """A repeated adapter adds no direction: k_B = k_A = rank of the stacked factors."""
    As, Bs, s = lora_factors(2, ranks=[3, 4])
    cs = build_core_space(As + As[:1], Bs + Bs[:1], s + s[:1], torch.float64)
    assert cs.P.shape[0] == 7 and cs.Q.shape[0] == 7
    dW = dense_updates(As + As[:1], Bs + Bs[:1], s + s[:1])
    for t, M in enumerate(cs.core_matrices()):
        assert torch.allclose(cs.U_B() @ M @ cs.V_A().T, dW[t], atol=1e-10)


def test_core_bases_are_canonical_svd_vectors():
    """core_space uses the singular vectors of the stacked scaled factors, canonical signs."""
    As, Bs, s = lora_factors(3, ranks=[2, 3, 4])
    cs = build_core_space(As, Bs, s, torch.float64)
    U, V = cs.canonicalize()
    B_cat = torch.cat([si * B for B, si in zip(Bs, s)], dim=1)
    A_cat = torch.cat(As, dim=0)
    U_ref = torch.linalg.svd(B_cat, full_matrices=False).U
    V_ref = torch.linalg.svd(A_cat, full_matrices=False).Vh.T
    U_ref, V_ref = U_ref * canonical_signs(U_ref), V_ref * canonical_signs(V_ref)
    assert torch.allclose(U, U_ref, atol=1e-10) and torch.allclose(V, V_ref, atol=1e-10)
    pivots = U.gather(0, U.abs().argmax(0, keepdim=True))
    assert (pivots > 0).all()


def test_canonical_signs_tie_breaks_on_lowest_index():
    X = torch.tensor([[-1.0, 2.0], [1.0, -2.0], [0.5, 0.0]])
    assert canonical_signs(X).tolist() == [-1.0, 1.0]


def _dense_hooi(X: torch.Tensor, r: int, iters: int = 4000, tol: float = 1e-15):
    """Textbook HOSVD + HOOI with exact SVD updates on the dense tensor (independent)."""
    T, n, m = X.shape
    U = torch.linalg.svd(X.permute(1, 0, 2).reshape(n, T * m)).U[:, :r]
    V = torch.linalg.svd(X.permute(2, 0, 1).reshape(m, T * n)).U[:, :r]
    total = float((X * X).sum())
    prev = None
    for _ in range(iters):
        U = torch.linalg.svd((X @ V).permute(1, 0, 2).reshape(n, T * r)).U[:, :r]
        V = torch.linalg.svd((X.mT @ U).permute(1, 0, 2).reshape(m, T * r)).U[:, :r]
        err = math.sqrt(max(total - float(((U.T @ X @ V) ** 2).sum()), 0) / total)
        if prev is not None and abs(prev - err) < tol:
            break
        prev = err
    return U, V, err


def _chordal(U1: torch.Tensor, U2: torch.Tensor) -> float:
    """Chordal distance ‖U₁U₁ᵀ − U₂U₂ᵀ‖_F / √2 between equal-dimension subspaces."""
    return float(torch.linalg.norm(U1 @ U1.T - U2 @ U2.T)) / math.sqrt(2)


@pytest.mark.parametrize("T,ranks,r", [(2, 4, 3), (6, [2, 4, 3, 5, 4, 2], 5), (4, 3, 6)])
def test_core_space_solution_equals_full_space(T, ranks, r):
    """Theorem 4.2 in practice: core-space HOOI lifted == dense full-space HOOI."""
    As, Bs, s = lora_factors(T, ranks=ranks, norms=[1.0 + 3 * t for t in range(T)])
    X = dense_updates(As, Bs, s)
    cs = build_core_space(As, Bs, s, torch.float64)
    Pp, Qp = cs.padded()
    sol = tucker2(Pp, Qp, r, iters=4000, tol=1e-15)
    U, V = cs.U_B() @ sol.U, cs.V_A() @ sol.V
    U_ref, V_ref, err_ref = _dense_hooi(X, r)
    assert abs(sol.errors[-1] - err_ref) < 1e-9
    assert _chordal(U, U_ref) < 1e-5 and _chordal(V, V_ref) < 1e-5
    dense = tucker2_dense(X, r, iters=4000, tol=1e-15)
    assert abs(dense.errors[-1] - err_ref) < 1e-9
    assert _chordal(dense.U, U_ref) < 1e-5


@pytest.mark.parametrize("extrapolate", [True, False])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hooi_objective_monotone_and_orthonormal(seed, extrapolate):
    As, Bs, s = lora_factors(6, ranks=[4, 2, 6, 4, 3, 5], seed=seed)
    cs = build_core_space(As, Bs, s, torch.float64)
    Pp, Qp = cs.padded()
    sol = tucker2(Pp, Qp, 5, iters=300, tol=0.0, extrapolate=extrapolate)
    errs = sol.errors
    assert sol.sweeps == 300 and len(errs) == 301
    assert all(b <= a + 1e-14 for a, b in zip(errs, errs[1:])), "objective increased"
    assert errs[-1] < errs[0]
    eye = torch.eye(5, dtype=torch.float64)
    assert torch.allclose(sol.U.T @ sol.U, eye, atol=1e-12)
    assert torch.allclose(sol.V.T @ sol.V, eye, atol=1e-12)


def test_hooi_stops_on_tolerance_and_cap():
    As, Bs, s = lora_factors(4, ranks=4)
    Pp, Qp = build_core_space(As, Bs, s, torch.float64).padded()
    loose = tucker2(Pp, Qp, 3, iters=500, tol=1e-3)
    tight = tucker2(Pp, Qp, 3, iters=500, tol=1e-12)
    capped = tucker2(Pp, Qp, 3, iters=2, tol=0.0)
    assert loose.converged and loose.sweeps < tight.sweeps
    assert abs(loose.errors[-2] - loose.errors[-1]) < 1e-3
    assert capped.sweeps == 2 and not capped.converged
    assert tight.errors[-1] <= loose.errors[-1] + 1e-15


def _gaussian_core(T: int, n: int, r: int, seed: int):
    """Plain Gaussian factors: a flat spectrum, where HOOI converges slowest."""
    g = torch.Generator().manual_seed(seed)
    As = [torch.randn(r, n, generator=g, dtype=torch.float64) for _ in range(T)]
    Bs = [torch.randn(n, r, generator=g, dtype=torch.float64) * (0.5 + t) for t in range(T)]
    return build_core_space(As, Bs, [1.0] * T, torch.float64).padded()


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_extrapolation_reaches_the_plain_hooi_optimum_in_fewer_sweeps(seed):
    """The accelerated sweeps converge to the same stationary point as plain HOOI (both from
    HOSVD), with fewer sweeps on a slowly converging problem."""
    Pp, Qp = _gaussian_core(5, 60, 6, seed)
    plain = tucker2(Pp, Qp, 6, iters=20000, tol=1e-15, extrapolate=False)
    fast = tucker2(Pp, Qp, 6, iters=20000, tol=1e-15)
    assert plain.converged and fast.converged
    assert abs(plain.errors[-1] - fast.errors[-1]) < 1e-12
    assert _chordal(plain.U, fast.U) < 1e-5 and _chordal(plain.V, fast.V) < 1e-5
    assert fast.sweeps < 0.7 * plain.sweeps, (fast.sweeps, plain.sweeps)
    # same tolerance, closer to the optimum: a loose accelerated solve beats a loose plain one
    loose_plain = tucker2(Pp, Qp, 6, tol=1e-8, extrapolate=False)
    loose_fast = tucker2(Pp, Qp, 6, tol=1e-8)
    assert loose_fast.errors[-1] <= loose_plain.errors[-1] + 1e-12


def test_extrapolated_hooi_on_random_problems_matches_plain_hooi():
    """30 random CtM core problems (T 1–12, ranks 1–8, r 1–16, norms over 6 decades, duplicate
    adapters): the objective Σ‖UᵀXₜV‖² never drops by more than rounding, and converges to
    the plain-HOOI value (compared on e², since e = √(e²) magnifies rounding near 0)."""
    import random

    rng = random.Random(0)
    g = torch.Generator().manual_seed(0)
    for _ in range(30):
        T = rng.choice([1, 2, 3, 5, 8, 12])
        n, m = rng.choice([8, 20, 64]), rng.choice([8, 24, 64])
        ranks = [rng.choice([1, 2, 4, 8]) for _ in range(T)]
        As = [torch.randn(r, m, generator=g, dtype=torch.float64) for r in ranks]
        Bs = [
            torch.randn(n, r, generator=g, dtype=torch.float64) * 10 ** rng.uniform(-3, 3)
            for r in ranks
        ]
        if T > 1 and rng.random() < 0.3:
            As[1], Bs[1] = As[0].clone(), Bs[0].clone()
        r, beta = rng.choice([1, 2, 4, 8, 16]), rng.choice([0.0, 0.5, 1.0])
        cs, c = build_ctm_core_space(As, Bs, [1.0] * T, beta, torch.float64)
        Pp, Qp = cs.padded()
        P, Q = (c.view(-1, 1, 1) * Pp).unsqueeze(0), Qp.unsqueeze(0)
        fast = tucker2_batch(P, Q, r, tol=1e-13, iters=5000, hosvd_diagonal=True)[0]
        plain = tucker2_batch(P, Q, r, tol=1e-13, iters=5000, extrapolate=False)[0]
        sq = [e * e for e in fast.errors]
        assert all(b <= a + 1e-13 for a, b in zip(sq, sq[1:])), (T, ranks, r)
        assert abs(sq[-1] - plain.errors[-1] ** 2) < 1e-9, (T, ranks, r)


def test_objective_matches_tensorly_partial_tucker():
    """An independent solver reaches the same Problem-11 objective on the same targets."""
    tl = pytest.importorskip("tensorly")
    from tensorly.decomposition import partial_tucker

    tl.set_backend("pytorch")
    As, Bs, s = lora_factors(5, ranks=[4, 3, 4, 2, 4], norms=[1, 2, 4, 8, 16])
    cs = build_core_space(As, Bs, s, torch.float64)
    M = cs.core_matrices()  # (T, k, k)
    sol = tucker2(*cs.padded(), 4, iters=4000, tol=1e-15)
    X = M.permute(1, 2, 0).contiguous()  # k × k × T, task mode last (as the authors do)
    (core, factors), _ = partial_tucker(X, rank=[4, 4], modes=[0, 1], n_iter_max=4000, tol=1e-14)
    rec = torch.einsum("abt,ia,jb->ijt", core, factors[0], factors[1])
    err_tl = float(torch.linalg.norm(rec - X) / torch.linalg.norm(X))
    assert abs(sol.errors[-1] - err_tl) < 1e-7, (sol.errors[-1], err_tl)


def test_batched_solve_equals_single():
    probs = [build_core_space(*lora_factors(4, ranks=3, seed=k), torch.float64) for k in range(3)]
    P = torch.stack([cs.padded()[0] for cs in probs])
    Q = torch.stack([cs.padded()[1] for cs in probs])
    batch = tucker2_batch(P, Q, 3, iters=200, tol=1e-12)
    for k, cs in enumerate(probs):
        single = tucker2(*cs.padded(), 3, iters=200, tol=1e-12)
        assert batch[k].sweeps == single.sweeps
        assert torch.allclose(batch[k].U, single.U, atol=1e-10)


def test_hooi_follows_svd_based_hooi_on_a_flat_spectrum():
    """Regression: one Ritz step per half-sweep converged elsewhere on this problem
    (chordal distance 0.996 from tensorly's subspace); exact inner solves agree."""
    tl = pytest.importorskip("tensorly")
    from tensorly.decomposition import partial_tucker

    tl.set_backend("pytorch")
    g = torch.Generator().manual_seed(10)  # bench/engine.py's structured factors, seed 10
    As = [torch.randn(6, 80, generator=g) / math.sqrt(80) for _ in range(5)]
    shared = torch.randn(96, 6, generator=g) / math.sqrt(96)
    decay = 1.0 / (1.0 + torch.arange(6, dtype=torch.float32))
    norms = torch.logspace(-0.5, 0.5, 5).tolist()
    Bs = [
        (0.5 * shared + torch.randn(96, 6, generator=g) / math.sqrt(96)) * decay * norms[t]
        for t in range(5)
    ]
    cs = build_core_space(As, Bs, [2.0] * 5, torch.float64)
    sol = tucker2(*cs.padded(), 6, iters=2000, tol=1e-13)
    X = cs.core_matrices().permute(1, 2, 0).contiguous()
    (_, (Ut, Vt)), _ = partial_tucker(X, rank=[6, 6], modes=[0, 1], n_iter_max=2000, tol=1e-13)
    assert _chordal(sol.U, Ut) < 1e-4 and _chordal(sol.V, Vt) < 1e-4


def _random_factored(b: int, T: int, N: int, k: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    P = torch.randn(b, T, N, k, generator=g, dtype=torch.float64)
    Q = torch.randn(b, T, N, k, generator=g, dtype=torch.float64)
    P = P * torch.logspace(0, -1, k, dtype=torch.float64)  # a decaying spectrum
    return P, Q


def test_ritz_and_dense_updates_agree():
    """One HOOI U-update three ways: dense eigh of G_U (budget 0), Rayleigh–Ritz only (budget ≥
    INNER_STEPS), and Ritz with a dense fallback (budget 1, in one batch where some items
    converge by Ritz and some fall back): same top-r subspace and objective, never below the
    warm start's."""
    from mergekit_ctm.engine.tucker import INNER_STEPS, _update

    b, T, N, k, r = 6, 5, 40, 8, 6
    P, Q = _random_factored(b, T, N, k, seed=1)
    Pt, Qc = P.mT.contiguous(), Q.transpose(1, 2).reshape(b, N, T * k)
    g = torch.Generator().manual_seed(2)
    V = torch.linalg.qr(torch.randn(b, N, r, generator=g, dtype=torch.float64)).Q
    U0 = torch.linalg.qr(torch.randn(b, N, r, generator=g, dtype=torch.float64)).Q
    U0[:3] = _update(Pt[:3], Qc[:3], U0[:3], V[:3], r, rtol=1e-12, budget=0)[0]  # converged
    Y = (P @ (Q.mT @ V.unsqueeze(1))).permute(0, 2, 1, 3).reshape(b, N, -1)

    def f_of(U):
        return ((U.mT @ Y) ** 2).sum((-2, -1))

    outs = [_update(Pt, Qc, U0, V, r, rtol=1e-9, budget=s) for s in (0, INNER_STEPS, 1)]
    for U, f in outs:
        assert torch.allclose(U.mT @ U, torch.eye(r, dtype=torch.float64).expand(b, r, r))
        assert torch.allclose(f, f_of(U), rtol=1e-12)
        assert bool((f >= f_of(U0) * (1 - 1e-14)).all())
        for i in range(b):
            assert _chordal(U[i], outs[0][0][i]) < 1e-6  # residual 1e-9 · ‖G‖ / gap
        assert torch.allclose(f, outs[0][1], rtol=1e-13)


@pytest.mark.parametrize("budget", [0, 1, 3, 10**9])
def test_hooi_with_any_dense_budget_is_monotone_and_agrees(budget, monkeypatch):
    """Whichever mix of Ritz steps and dense solves the budget picks, HOOI is monotone and
    reaches the same optimum; batched items equal single solves."""
    import mergekit_ctm.engine.tucker as tk

    P, Q = _random_factored(3, 4, 30, 6, seed=3)
    ref = tk.tucker2_batch(P, Q, 5, iters=4000, tol=1e-15, extrapolate=False)
    monkeypatch.setattr(tk, "dense_after", lambda N, Tk, r: budget)
    tight = tk.tucker2_batch(P, Q, 5, iters=4000, tol=1e-15)
    batch = tk.tucker2_batch(P, Q, 5, iters=4000, tol=1e-12)
    for i, sol in enumerate(tight):
        sq = [e * e for e in sol.errors]
        assert all(b <= a + 1e-14 for a, b in zip(sq, sq[1:]))
        assert sol.converged and abs(sol.errors[-1] - ref[i].errors[-1]) < 1e-10
        assert _chordal(sol.U, ref[i].U) < 1e-5 and _chordal(sol.V, ref[i].V) < 1e-5
        single = tk.tucker2(P[i], Q[i], 5, iters=4000, tol=1e-12)
        assert single.sweeps == batch[i].sweeps
        su, sb = single.U * canonical_signs(single.U), batch[i].U * canonical_signs(batch[i].U)
        assert torch.allclose(su, sb, atol=1e-9)


def test_dense_after_prefers_ritz_only_when_it_pays():
    """Small cores solve densely from the start; at N = 96 (issue #9) a few Ritz steps come
    first; at N = 4096 (T = 256) the dense solve is never worth its O(N³)."""
    from mergekit_ctm.engine.tucker import INNER_STEPS, dense_after

    assert dense_after(48, 48, 16) == 0 and dense_after(24, 36, 5) == 0
    assert 1 <= dense_after(96, 96, 16) <= 4
    assert dense_after(4096, 4096, 16) > INNER_STEPS


def test_a_bad_extrapolation_costs_sweeps_not_objective(monkeypatch):
    """The safeguard: whatever the extrapolation proposes (here a random subspace every sweep),
    a U-update that loses objective is redone from the plain V, so HOOI stays monotone and
    still converges to the plain-HOOI optimum. Fails when the safeguard is removed."""
    import mergekit_ctm.engine.tucker as tk

    g = torch.Generator().manual_seed(5)

    def random_step(self, idx, V_in, V_out, restart):
        V = torch.linalg.qr(torch.randn(V_out.shape, generator=g, dtype=V_out.dtype)).Q
        return V, torch.ones(V.shape[0], dtype=torch.bool)

    P, Q = _random_factored(2, 4, 30, 6, seed=4)
    plain = tk.tucker2_batch(P, Q, 5, iters=4000, tol=1e-14, extrapolate=False)
    monkeypatch.setattr(tk._Anderson, "step", random_step)
    sols = tk.tucker2_batch(P, Q, 5, iters=4000, tol=1e-14)
    for sol, ref in zip(sols, plain):
        sq = [e * e for e in sol.errors]
        assert all(b <= a + 1e-14 for a, b in zip(sq, sq[1:]))
        assert sol.converged and abs(sol.errors[-1] - ref.errors[-1]) < 1e-10


def test_small_ctm_merges_do_not_depend_on_threads():
    """Modules with Σrₜ ≤ TINY merge on one thread end to end: merge_lora with 2 threads,
    with 1, and merge_lora_many give the same bytes."""
    from mergekit_ctm.engine import merge_lora, merge_lora_many

    mods = [lora_factors(5, n=300, m=200, ranks=[4, 6, 4, 8, 3], seed=k) for k in range(3)]
    kw = dict(method="ctm", rank=6, base_rule="ties", rule_params={"density": 0.5})
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        two = [merge_lora(*f, dtype=torch.float32, **kw) for f in mods]
        many = merge_lora_many([(a, b, s) for a, b, s in mods], workers=2, **kw)
        torch.set_num_threads(1)
        one = [merge_lora(*f, dtype=torch.float32, **kw) for f in mods]
    finally:
        torch.set_num_threads(saved)
    for x, y, z in zip(two, one, many):
        assert torch.equal(x.A, y.A) and torch.equal(x.B, y.B)
        assert torch.equal(x.A, z.A) and torch.equal(x.B, z.B)
