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
  We never form G_U (N₁ × N₁): the eigenspace is found by Rayleigh–Ritz steps on
  span[U, G_U U] warm-started at the previous U, each O(T·N·k·r) = O(T²r³) instead of the
  O(T³r³) of an SVD of the unfolding; near convergence one or two steps suffice. Since the old
  U lies in each search space, Ky Fan's maximum principle gives f(U_new, V) ≥ f(U_old, V): the
  objective is monotone. Steps repeat until U spans an invariant subspace (relative residual
  0.1·√tol, 1e-6 at the default tol: 1.1–1.6 steps per half-sweep on Llama-shaped modules),
  so each half-sweep is an exact HOOI update (with ``extrapolate=False`` the iteration follows
  the path of an SVD-based solver, tensorly's ``partial_tucker``). A single Ritz step per
  half-sweep also converges, but on flat spectra it can settle at a different stationary point
  (one direction apart, objective within 1e-4), and so does a loose residual (1e-3).
* Extrapolation (default): HOOI converges linearly, so each sweep after the second starts from
  V extrapolated along the last sweep's step (``_extrapolate``); when that start loses
  objective after the U-update, the U-update is redone from the plain V. f stays monotone and
  the fixed points are HOOI's; 11 → 7 sweeps on the Llama benchmark, 182 → 40 on flat spectra.
* Stopping: like tensorly, on the change of the relative error e = ‖X − X̂‖/‖X‖ between
  sweeps, |e_{k−1} − e_k| < tol, or after ``iters`` sweeps (one sweep = one U and one V update).
* The returned U, V are rotated inside their spans to the eigenvectors of G_U(V), G_V(U), so
  the basis (not just the span) is determined by the problem, up to column signs.

Everything runs in float64 on the device of the inputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from mergekit_ctm.engine.linalg import F64, tiny_cpu_ops, top_eigh

INNER_STEPS = 100  # cap on Rayleigh–Ritz steps per half-sweep (reached only with tiny gaps)
EXTRAP_RHO_MAX = 0.95  # cap on the estimated contraction rate of a HOOI sweep
EXTRAP_MAX = 10.0  # cap on the extrapolation factor ρ/(1−ρ)


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


def _ritz_step(
    Pp: torch.Tensor,
    Qp: torch.Tensor,
    U: torch.Tensor,
    V: torch.Tensor,
    r: int,
    *,
    rtol: float,
    inner: int = INNER_STEPS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact HOOI U-update for fixed V (batched): top-r eigenspace of G_U = Σₜ Yₜ Yₜᵀ, Yₜ = XₜV.

    Block Krylov / Rayleigh–Ritz on span[U, G_U U], warm-started at the previous U and repeated
    until U spans an invariant subspace (‖G_U U − U UᵀG_U U‖ ≤ rtol·‖G_U U‖) or ``inner`` steps.
    Each step costs O(T·N·k·r); every step keeps the old U in the search space, so f rises.
    Returns (U_new, f(U_new, V)).
    """
    b, T, N1, _ = Pp.shape
    # Y = [Y₁ … Y_T] (b, N1, T·r), Yₜ = Xₜ V: G_U = Y Yᵀ, so each product is one GEMM
    Y = (Pp @ (Qp.mT @ V.unsqueeze(1))).permute(0, 2, 1, 3).reshape(b, N1, -1)
    YtU = (U.mT @ Y).mT  # Yᵀ U; this operand order is 2x faster at large N
    f = theta2 = torch.zeros(b, dtype=Y.dtype, device=Y.device)
    todo = None  # None: every item still iterating (no masking needed)
    for step in range(inner):
        GU = Y @ YtU
        if step:  # items already invariant keep their U, so batching changes nothing
            # U holds Ritz vectors, UᵀG U = diag(θ): ‖G U − U UᵀG U‖² = ‖G U‖² − Σθ²
            g2 = (GU * GU).sum((-2, -1))
            left = (g2 - theta2).clamp_min(0) > rtol * rtol * g2
            todo = left if todo is None else todo & left
            if not bool(todo.any()):
                break
        K = torch.linalg.qr(torch.cat([U, GU], dim=-1)).Q
        Z = (K.mT @ Y).mT  # Yᵀ K (b, T·r, |K|)
        evals, W = torch.linalg.eigh(Z.mT @ Z)  # ascending; the top r in any order will do
        W, evals = W[..., -r:], evals[..., -r:]
        new = (K @ W, Z @ W, evals.sum(-1), (evals * evals).sum(-1))
        if todo is None or bool(todo.all()):
            U, YtU, f, theta2 = new
        else:
            keep = todo.view(-1, 1, 1)
            U, YtU = torch.where(keep, new[0], U), torch.where(keep, new[1], YtU)
            f, theta2 = torch.where(todo, new[2], f), torch.where(todo, new[3], theta2)
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
    b = Pp.shape[0]
    rtol = inner_rtol(tol)
    r = min(rank, Pp.shape[-2], Qp.shape[-2])
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
    step_prev = torch.zeros(b, dtype=F64, device=V.device)
    for _ in range(iters):
        if not bool(active.any()):
            break
        idx = None if bool(active.all()) else active.nonzero().flatten()
        Pa, Qa, Ua, Vi = _take(Pp, idx), _take(Qp, idx), _take(U, idx), _take(V_in, idx)
        U_new, f_u = _ritz_step(Pa, Qa, Ua, Vi, r, rtol=rtol)
        # safeguard: an extrapolated V must not lose objective, else redo from the plain V
        bad = _take(extrapolated, idx) & (f_u < _take(f_last, idx))
        if bool(bad.any()):
            j = bad.nonzero().flatten()
            Vi = Vi.clone()
            Vi[j] = _take(V, idx)[j]
            U_new[j], f_u[j] = _ritz_step(Pa[j], Qa[j], Ua[j], Vi[j], r, rtol=rtol)
        V_new, f = _ritz_step(Qa, Pa, Vi, U_new, r, rtol=rtol)
        U, V, f_last = _put(U, idx, U_new), _put(V, idx, V_new), _put(f_last, idx, f)
        new = rel_error(f, idx).tolist()
        for j, i in enumerate(range(b) if idx is None else idx.tolist()):
            prev = errors[i][-1]
            errors[i].append(new[j])
            sweeps[i] += 1
            if abs(prev - errors[i][-1]) < tol or errors[i][-1] <= 1e-14:
                active[i] = False
        V_next, ext = V_new, torch.zeros_like(f, dtype=torch.bool)
        if extrapolate:
            V_next, ext, step = _extrapolate(Vi, V_new, _take(step_prev, idx))
            step_prev = _put(step_prev, idx, step)
        V_in, extrapolated = _put(V_in, idx, V_next), _put(extrapolated, idx, ext)
    U = _rotate_to_eigvecs(Pp, Qp, U, V)
    V = _rotate_to_eigvecs(Qp, Pp, V, U)
    return [Tucker2Result(U[i], V[i], errors[i], sweeps[i], not bool(active[i])) for i in range(b)]


def _extrapolate(
    V_in: torch.Tensor, V_out: torch.Tensor, step_prev: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Extrapolate one sweep V_in ↦ V_out of HOOI along its step (Aitken-like acceleration).

    HOOI converges linearly, ‖Dₖ₊₁‖ ≈ ρ‖Dₖ‖ for the step Dₖ = (I − V_inV_inᵀ)V_out, so its
    limit lies near V_out + ρ/(1−ρ)·Dₖ. We start the next sweep there (ρ from the last two
    steps, factor ≤ EXTRAP_MAX); the caller keeps V_out and falls back to it when the
    extrapolated start loses objective, so f never decreases. Returns (V_next, used, ‖Dₖ‖).
    """
    D = V_out - V_in @ (V_in.mT @ V_out)
    step = torch.linalg.matrix_norm(D)
    use = step_prev > 0
    if not bool(use.any()):
        return V_out, use, step
    rho = (step / step_prev.clamp_min(torch.finfo(F64).tiny)).clamp(max=EXTRAP_RHO_MAX)
    a = torch.where(use, (rho / (1 - rho)).clamp(max=EXTRAP_MAX), 0.0)
    V_next = torch.linalg.qr(V_out + a.view(-1, 1, 1) * D).Q
    return torch.where(use.view(-1, 1, 1), V_next, V_out), use, step


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
