"""Tucker-2 solver for CtM's subspace problem (Problem 2 / Problem 11 of the CtM paper).

    min_{UᵀU = I, VᵀV = I, Cₜ}  Σₜ ‖Xₜ − U Cₜ Vᵀ‖²_F   ⇔   max  f(U, V) = Σₜ ‖Uᵀ Xₜ V‖²_F

i.e. a Tucker-2 decomposition of the stacked Xₜ with the task-mode factor fixed to I_T.
Every target is given factored, Xₜ = Pₜ Qₜᵀ (Pₜ: N₁ × k, Qₜ: N₂ × k). In core space k = rₜ,
which is what makes the solver cheap; the dense full-space variant is the special case
Pₜ = Xₜ, Qₜ = I.

* HOSVD (De Lathauwer 2000a): U₀ = top-r eigenvectors of Σₜ Xₜ Xₜᵀ = Σₜ Pₜ (QₜᵀQₜ) Pₜᵀ,
  V₀ likewise — O(T·N·k² + T·N²·k + N³) = O(T³r³) in core space instead of O(T⁴r³); free
  (``hosvd_diagonal``) in CtM's weighted core basis, where both Grams are already diagonal.
* HOOI (De Lathauwer 2000b) with the task mode fixed: alternately maximise f over U (V fixed)
  and over V. The exact U-update is the top-r eigenspace of G_U = Σₜ Yₜ Yₜᵀ, Yₜ = Pₜ(QₜᵀV).
  Near convergence it is found by Rayleigh–Ritz steps on span[U, G_U U] warm-started at the
  previous U, each O(T·N·k·r) = O(T²r³) instead of the O(T³r³) of an SVD of the unfolding;
  one or two steps suffice there. Since the old U lies in each search space, Ky Fan's maximum
  principle gives f(U_new, V) ≥ f(U_old, V): the objective is monotone. Steps repeat until U
  spans an invariant subspace (relative residual 0.1·√tol, 1e-6 at the default tol), so each
  half-sweep is an exact HOOI update (with ``extrapolate=False`` the iteration follows the
  path of an SVD-based solver, tensorly's ``partial_tucker``). Far from convergence, or with a
  small eigengap, the steps converge slowly (13–20 in the first half-sweep of issue #9's
  factors, where λ₁₇/λ₁₆ = 0.87 at the HOSVD start): after as many steps as one dense solve
  costs (``dense_after``: 2 at N = 96, r = 16; 0 at N ≤ 48) the update takes the top-r
  eigenvectors of the N × N matrix G_U itself, the exact update; so does the first sweep from
  the HOSVD start where that costs at most FIRST_DENSE steps. A single Ritz step per
  half-sweep also converges, but on flat spectra it can settle at a different stationary point
  (one direction apart, objective within 1e-4), and so does a loose residual (1e-3).
* Extrapolation (default): HOOI converges linearly, so each sweep after the first starts from
  an Anderson extrapolation of the last sweeps' inputs and outputs (``_Anderson``, depth
  ANDERSON_DEPTH); when that start loses objective after the U-update, the U-update is redone
  from the plain V and the history restarts. f stays monotone and the fixed points are
  HOOI's. Sweeps for 16 modules of each bench/engine.py workload, plain HOOI / the one-step
  extrapolation this replaced / Anderson: issue #9's factors 335 / 188 / 155, structured
  181 / 125 / 116, the quality suite's LoRAs 326 / 204 / 168, flat Gaussian spectra
  3230 / 641 / 431; at the same tolerance each ends closer to the optimum.
* Stopping: like tensorly, on the change of the relative error e = ‖X − X̂‖/‖X‖ between
  sweeps, |e_{k−1} − e_k| < tol, or after ``iters`` sweeps (one sweep = one U and one V update).
* The returned U, V are rotated inside their spans to the eigenvectors of G_U(V), G_V(U), so
  the basis (not just the span) is determined by the problem, up to column signs.

Everything runs in float64 on the device of the inputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from mergekit_ctm.engine.linalg import F64, mm_tall, tiny_cpu_ops, top_eigh

INNER_STEPS = 100  # cap on Rayleigh–Ritz steps per half-sweep (reached only with tiny gaps)
OP_FLOPS = 40_000  # per-call overhead of a small torch op in flops (≈ 4 µs on one core)
FIRST_DENSE = 4  # the first sweep is dense when that costs at most this many Ritz steps
ANDERSON_DEPTH = 5  # past sweeps combined by the extrapolation (3: 2–20 % more sweeps)


def inner_rtol(tol: float) -> float:
    """Inner residual for an outer tolerance: a residual ε moves f by ~ε², so ε = 0.1·√tol
    keeps the inner error below what the stopping test resolves (1e-6 at the default 1e-10),
    clamped to [1e-9, 1e-4]."""
    return min(max(0.1 * tol**0.5, 1e-9), 1e-4)


@dataclass
class Tucker2Result:
    """U (N₁ × r), V (N₂ × r) orthonormal; ``errors``: relative error after HOSVD, each sweep."""

    U: torch.Tensor
    V: torch.Tensor
    errors: list[float] = field(default_factory=list)
    sweeps: int = 0
    converged: bool = False

    @property
    def objective(self) -> list[float]:
        """Problem-2 objective Σₜ‖Xₜ − U Cₜ Vᵀ‖²_F relative to Σₜ‖Xₜ‖²_F, per iteration."""
        return [e * e for e in self.errors]


def dense_after(N: int, Tk: int, r: int) -> int:
    """Rayleigh–Ritz steps that cost about one dense solve of the same U-update (ski rental).

    Dense: G = Y Yᵀ (N × N) and its full ``eigh``; a Ritz step: three GEMMs with Y (N × Tk),
    an N × 2r QR and a 2r × 2r ``eigh``. Flop counts plus a per-call overhead (``OP_FLOPS``),
    fitted on one CPU core (ratios 0.8–28 for N 32–512, r 8–32, within 2× of measured).
    Warm-started updates near convergence take one or two steps, far cheaper than the dense
    solve at N ≥ 96; early ones, or ones with a small eigengap, can take tens (13–20 in the
    first sweep of the issue-#9 factors, up to 24 on the quality suite's 48-dim problems). After
    this many steps the update switches to the dense solve, so it never costs more than about
    twice the cheaper of the two.
    """
    dense = 2 * N * N * Tk + 6 * N**3 + 6 * OP_FLOPS
    step = 8 * N * Tk * r + 20 * N * r * r + 12 * Tk * r * r + 48 * r**3 + 20 * OP_FLOPS
    return int(dense / step)


def _update(
    Pt: torch.Tensor,
    Qc: torch.Tensor,
    U: torch.Tensor,
    V: torch.Tensor,
    r: int,
    *,
    rtol: float,
    budget: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact HOOI U-update for fixed V (batched): top-r eigenspace of G_U = Σₜ Yₜ Yₜᵀ, Yₜ = XₜV.

    Pt (b, T, k, N₁) holds Pₜᵀ and Qc (b, N₂, T·k) = [Q₁ … Q_T], so Yᵀ = [Y₁ … Y_T]ᵀ is one
    batched GEMM away, already in the row-major layout the products below want.
    Block Krylov / Rayleigh–Ritz on span[U, G_U U], warm-started at the previous U and repeated
    until U spans an invariant subspace (‖G_U U − U UᵀG_U U‖ ≤ rtol·‖G_U U‖). Each step costs
    O(T·N·k·r); every step keeps the old U in the search space, so f rises. Items still
    iterating after ``budget`` steps (``dense_after``) take the top-r eigenvectors of the
    N₁ × N₁ Gram G_U instead, which is the exact update; with ``budget`` ≥ INNER_STEPS they stop
    at that cap. Returns (U_new, f(U_new, V)).
    """
    b, T, k, N1 = Pt.shape
    Yt = ((V.mT @ Qc).view(b, -1, T, k).transpose(1, 2) @ Pt).reshape(b, -1, N1)  # Yᵀ
    todo = None  # None: every item still iterating (no masking needed)
    if budget > 0:
        YtU = mm_tall(Yt, U)
        f = theta2 = torch.zeros(b, dtype=Yt.dtype, device=Yt.device)
        for step in range(min(budget, INNER_STEPS) + 1):
            GU = mm_tall(Yt.mT, YtU)
            if step:  # items already invariant keep their U, so batching changes nothing
                # U holds Ritz vectors, UᵀG U = diag(θ): ‖G U − U UᵀG U‖² = ‖G U‖² − Σθ²
                g2 = (GU * GU).sum((-2, -1))
                left = (g2 - theta2).clamp_min(0) > rtol * rtol * g2
                todo = left if todo is None else todo & left
                if not bool(todo.any()):
                    return U, f
                if step == budget or step == INNER_STEPS:
                    break
            K = torch.linalg.qr(torch.cat([U, GU], dim=-1)).Q
            Z = mm_tall(Yt, K)  # Yᵀ K (b, T·r, |K|)
            evals, W = torch.linalg.eigh(
                torch.bmm(Z.mT, Z)
            )  # ascending; the top r in any order will do
            W, evals = W[..., -r:], evals[..., -r:]
            new = (mm_tall(K, W), mm_tall(Z, W), evals.sum(-1), (evals * evals).sum(-1))
            if todo is None or bool(todo.all()):
                U, YtU, f, theta2 = new
            else:
                keep = todo.view(-1, 1, 1)
                U, YtU = torch.where(keep, new[0], U), torch.where(keep, new[1], YtU)
                f, theta2 = torch.where(todo, new[2], f), torch.where(todo, new[3], theta2)
        if budget >= INNER_STEPS:
            return U, f
    # the dense solve, for every item (budget 0) or for those still iterating
    idx = None if todo is None or bool(todo.all()) else todo.nonzero().flatten()
    Ys = _take(Yt, idx)
    evals, E = torch.linalg.eigh(torch.bmm(Ys.mT, Ys))
    if idx is None:
        return E[..., -r:], evals[..., -r:].sum(-1)
    U, f = U.clone(), f.clone()
    U[idx], f[idx] = E[..., -r:], evals[..., -r:].sum(-1)
    return U, f


def _stacked_gram(Pp: torch.Tensor, S: torch.Tensor) -> torch.Tensor:
    """Σₜ Pₜ Sₜ Pₜᵀ (b, N, N) as one GEMM of the stacked (N × T·k) factors.

    The HOSVD mode-1 Gram Σₜ XₜXₜᵀ with Xₜ = PₜQₜᵀ and Sₜ = QₜᵀQₜ; never forms the T
    separate N × N terms (30 GB at T = 256, N = 4096).
    """
    b, T, N, k = Pp.shape
    left = (Pp @ S).permute(0, 2, 1, 3).reshape(b, N, T * k)
    return left @ Pp.permute(0, 2, 1, 3).reshape(b, N, T * k).mT


def _rotate_to_eigvecs(Pp: torch.Tensor, Qp: torch.Tensor, U: torch.Tensor, V: torch.Tensor):
    """Rotate U within span(U) to the eigenvectors of Uᵀ G_U(V) U (descending)."""
    Z = U.mT.unsqueeze(1) @ Pp @ (Qp.mT @ V.unsqueeze(1))  # (b, T, r, r) = Uᵀ Xₜ V
    _, W = top_eigh((Z @ Z.mT).sum(1), U.shape[-1])
    return U @ W


def tucker2_batch(
    P: torch.Tensor,
    Q: torch.Tensor,
    rank: int,
    *,
    iters: int = 500,
    tol: float = 1e-10,
    extrapolate: bool = True,
    hosvd_diagonal: bool = False,
) -> list[Tucker2Result]:
    """Solve b independent problems at once: P (b, T, N₁, k), Q (b, T, N₂, k).

    ``extrapolate=False`` gives plain HOOI (the path of an SVD-based solver).
    ``hosvd_diagonal``: the caller's bases already diagonalise both HOSVD Grams with
    descending diagonals (``core.build_ctm_core_space``), so the HOSVD factors are the leading
    coordinate vectors and the two N × N eigendecompositions are skipped.
    Batching only amortises per-call overhead: each problem stops on its own criterion and its
    U, V are frozen afterwards, so it runs the same sweeps as it would alone.
    """
    with tiny_cpu_ops(P.device, max(P.shape[-2], Q.shape[-2])):
        return _tucker2_batch(P, Q, rank, iters, tol, extrapolate, hosvd_diagonal)


def _take(x: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
    return x if idx is None else x[idx]


def _put(x: torch.Tensor, idx: torch.Tensor | None, value: torch.Tensor) -> torch.Tensor:
    if idx is None:
        return value
    x[idx] = value
    return x


def _tucker2_batch(
    P, Q, rank: int, iters: int, tol: float, extrapolate: bool, hosvd_diagonal: bool
) -> list[Tucker2Result]:
    Pp, Qp = P.to(F64), Q.to(F64)
    b, T, N1, k = Pp.shape
    N2 = Qp.shape[-2]
    rtol = inner_rtol(tol)
    r = min(rank, N1, N2)
    # layouts for _update: Pₜᵀ stacked (b, T, k, N), and [P₁ … P_T] (b, N, T·k)
    Pt, Qt = Pp.mT.contiguous(), Qp.mT.contiguous()
    Pc, Qc = Pp.transpose(1, 2).reshape(b, N1, T * k), Qp.transpose(1, 2).reshape(b, N2, T * k)
    # the first sweep starts far from its fixed point (HOSVD): dense where that is cheap
    budget_U, budget_V = (
        n if n > FIRST_DENSE else 0 for n in (dense_after(N1, T * k, r), dense_after(N2, T * k, r))
    )
    PtP = Pp.mT @ Pp  # (b, T, k, k)
    QtQ = Qp.mT @ Qp
    total = (PtP * QtQ).sum((1, 2, 3))  # Σₜ ‖Xₜ‖²_F = Σₜ tr(PₜᵀPₜ QₜᵀQₜ)
    if hosvd_diagonal:
        U = torch.eye(Pp.shape[-2], r, dtype=F64, device=Pp.device).expand(b, -1, -1).clone()
        V = torch.eye(Qp.shape[-2], r, dtype=F64, device=Qp.device).expand(b, -1, -1).clone()
    else:
        _, U = top_eigh(_stacked_gram(Pp, QtQ), r)
        _, V = top_eigh(_stacked_gram(Qp, PtP), r)
    safe = total.clamp_min(torch.finfo(F64).tiny)

    def rel_error(f: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
        t, s = _take(total, idx), _take(safe, idx)
        return torch.where(t > 0, ((t - f).clamp_min(0) / s).sqrt(), 0.0)

    Z = U.mT.unsqueeze(1) @ Pp @ (Qp.mT @ V.unsqueeze(1))
    f_last = (Z * Z).sum((1, 2, 3))  # f after the last full sweep
    err = rel_error(f_last, None)
    errors = [[float(e)] for e in err]
    active = err > 1e-14
    sweeps = [0] * b
    V_in = V.clone()  # the V the next U-update starts from: V, or V extrapolated
    extrapolated = torch.zeros(b, dtype=torch.bool, device=V.device)
    acc = _Anderson(b, N2, r, ANDERSON_DEPTH, V) if extrapolate else None
    for sweep in range(iters):
        if not bool(active.any()):
            break
        if sweep == 1:
            budget_U, budget_V = dense_after(N1, T * k, r), dense_after(N2, T * k, r)
        idx = None if bool(active.all()) else active.nonzero().flatten()
        Pta, Qca, Ua, Vi = _take(Pt, idx), _take(Qc, idx), _take(U, idx), _take(V_in, idx)
        U_new, f_u = _update(Pta, Qca, Ua, Vi, r, rtol=rtol, budget=budget_U)
        # safeguard: an extrapolated V must not lose objective, else redo from the plain V
        bad = _take(extrapolated, idx) & (f_u < _take(f_last, idx))
        if bool(bad.any()):
            j = bad.nonzero().flatten()
            Vi = Vi.clone()
            Vi[j] = _take(V, idx)[j]
            U_new[j], f_u[j] = _update(Pta[j], Qca[j], Ua[j], Vi[j], r, rtol=rtol, budget=budget_U)
        Qta, Pca = _take(Qt, idx), _take(Pc, idx)
        V_new, f = _update(Qta, Pca, Vi, U_new, r, rtol=rtol, budget=budget_V)
        U, V, f_last = _put(U, idx, U_new), _put(V, idx, V_new), _put(f_last, idx, f)
        new = rel_error(f, idx).tolist()
        for j, i in enumerate(range(b) if idx is None else idx.tolist()):
            prev = errors[i][-1]
            errors[i].append(new[j])
            sweeps[i] += 1
            if abs(prev - errors[i][-1]) < tol or errors[i][-1] <= 1e-14:
                active[i] = False
        V_next, ext = V_new, torch.zeros_like(f, dtype=torch.bool)
        if acc is not None:
            V_next, ext = acc.step(idx, Vi, V_new, bad)  # a failed extrapolation restarts
        V_in, extrapolated = _put(V_in, idx, V_next), _put(extrapolated, idx, ext)
    U = _rotate_to_eigvecs(Pp, Qp, U, V)
    V = _rotate_to_eigvecs(Qp, Pp, V, U)
    return [Tucker2Result(U[i], V[i], errors[i], sweeps[i], not bool(active[i])) for i in range(b)]


class _Anderson:
    """Anderson extrapolation (type II, Walker & Ni 2011) of the sweep map F: V_in ↦ V_out.

    HOOI converges linearly to its fixed point, so F is nearly affine there and a combination
    of the last sweeps extrapolates to the limit (on a single mode, as Aitken's Δ² does; on
    several modes, which a one-step extrapolation cannot). A subspace span(X) becomes the
    matrix φ(X) = X XᵀR, the projection of a centre R (the first output since the last
    restart) onto it: every basis of the span maps to the same point, and φ is one-to-one near
    span(R). With xᵢ, gᵢ the images of the inputs and outputs of the last ``depth`` + 1 sweeps,
    fᵢ = gᵢ − xᵢ and k the newest, θ = argmin ‖f_k − Σⱼ θⱼ(f_k − f_j)‖ and the next sweep
    starts from span(g_k − Σⱼ θⱼ(g_k − g_j)). The caller falls back to V_out when that start
    loses objective (``restart``), so f never decreases.

    The history is a ring buffer written in place, and the least-squares problem is built from
    the Gram matrix of the fᵢ, updated by one row per sweep: each sweep reads the stored
    vectors twice (in batches of 16 modules, shifting and differencing a copied history cost
    as much as the extrapolation saved on the structured benchmark).
    """

    def __init__(self, b: int, N: int, r: int, depth: int, like: torch.Tensor):
        H = depth + 1
        self.R = like.new_zeros(b, N, r)  # centre of φ
        self.f = like.new_zeros(b, H, N * r)  # residuals fᵢ, in ring order
        self.g = like.new_zeros(b, H, N * r)  # outputs gᵢ
        self.M = like.new_zeros(b, H, H)  # Gram matrix of the fᵢ
        self.valid = torch.zeros(b, H, dtype=torch.bool, device=like.device)
        self.slot = 0  # where the next sweep goes; all active items advance together

    def step(self, idx, V_in, V_out, restart):
        """Record the sweep V_in ↦ V_out of items ``idx``; returns (V_next, extrapolated)."""
        s, H = self.slot, self.f.shape[1]
        self.slot = (s + 1) % H
        sel = slice(None) if idx is None else idx
        valid = _take(self.valid, idx) & ~restart.unsqueeze(-1)  # a restart forgets the past
        valid[:, s] = False
        fresh = ~valid.any(-1)  # nothing left to combine with: a new centre
        R = torch.where(fresh.view(-1, 1, 1), V_out, _take(self.R, idx))
        X = torch.stack([V_in, V_out], 1)  # (b, 2, N, r)
        x, g = (X @ (X.mT @ R.unsqueeze(1))).flatten(2).unbind(1)  # (b, N·r)
        f = g - x
        self.f[sel, s], self.g[sel, s] = f, g
        m = (_take(self.f, idx) @ f.unsqueeze(-1)).squeeze(-1)  # (b, H): fⱼ·f_k
        M = _take(self.M, idx).clone()
        M[:, s], M[:, :, s] = m, m
        valid[:, s] = True
        self.R, self.M, self.valid = (
            _put(self.R, idx, R),
            _put(self.M, idx, M),
            _put(self.valid, idx, valid),
        )
        w = valid.clone()
        w[:, s] = False  # the differences f_k − f_j, j ≠ k
        use = w.any(-1)
        if not bool(use.any()):
            return V_out, use
        w = w.to(F64)
        mk = m.unsqueeze(-1)  # f_k·fⱼ as a column
        A = (m[:, s].view(-1, 1, 1) - mk - mk.mT + M) * (w.unsqueeze(-1) * w.unsqueeze(-2))
        rhs = (m[:, s : s + 1] - m) * w  # (f_k − fⱼ)·f_k
        ridge = 1e-10 * A.diagonal(dim1=-2, dim2=-1).sum(-1) + torch.finfo(F64).tiny
        A = A + torch.diag_embed((1 - w) + ridge.unsqueeze(-1))  # unused j: θⱼ = 0
        theta = torch.linalg.solve(A, rhs.unsqueeze(-1)).squeeze(-1)  # (b, H)
        theta[:, s] = 1 - theta.sum(-1)  # g_k − Σ θⱼ(g_k − gⱼ) = Σ cⱼ gⱼ
        V_next = torch.linalg.qr((theta.unsqueeze(1) @ _take(self.g, idx)).view(V_out.shape)).Q
        return torch.where(use.view(-1, 1, 1), V_next, V_out), use


def tucker2(
    P: torch.Tensor,
    Q: torch.Tensor,
    rank: int,
    *,
    iters: int = 500,
    tol: float = 1e-10,
    extrapolate: bool = True,
) -> Tucker2Result:
    """Solve max Σₜ‖Uᵀ Pₜ Qₜᵀ V‖² for P (T, N₁, k), Q (T, N₂, k); rank capped at min(N₁, N₂)."""
    return tucker2_batch(
        P.unsqueeze(0), Q.unsqueeze(0), rank, iters=iters, tol=tol, extrapolate=extrapolate
    )[0]


def tucker2_dense(X: torch.Tensor, rank: int, *, iters: int = 500, tol: float = 1e-10):
    """Full-space variant of Problem 2 for dense targets X (T, n, m): Pₜ = Xₜ, Qₜ = I."""
    T, _, m = X.shape
    eye = torch.eye(m, dtype=F64, device=X.device).expand(T, m, m)
    return tucker2(X.to(F64), eye, rank, iters=iters, tol=tol)
