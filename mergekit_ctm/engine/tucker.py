"""Tucker-2 solver for CtM's subspace problem (Problem 2 / Problem 11 of the CtM paper).

    min_{UᵀU = I, VᵀV = I, Cₜ}  Σₜ ‖Xₜ − U Cₜ Vᵀ‖²_F   ⇔   max  f(U, V) = Σₜ ‖Uᵀ Xₜ V‖²_F

i.e. a Tucker-2 decomposition of the stacked Xₜ with the task-mode factor fixed to I_T.
Every target is given factored, Xₜ = Pₜ Qₜᵀ (Pₜ: N₁ × k, Qₜ: N₂ × k). In core space k = rₜ,
which is what makes the solver cheap; the dense full-space variant is the special case
Pₜ = Xₜ, Qₜ = I.

* HOSVD (De Lathauwer 2000a): U₀ = top-r eigenvectors of Σₜ Xₜ Xₜᵀ = Σₜ Pₜ (QₜᵀQₜ) Pₜᵀ,
  V₀ likewise — O(T·N·k² + T·N²·k + N³) = O(T³r³) in core space instead of O(T⁴r³).
* HOOI (De Lathauwer 2000b) with the task mode fixed: alternately maximise f over U (V fixed)
  and over V. The exact U-update is the top-r eigenspace of G_U = Σₜ Yₜ Yₜᵀ, Yₜ = Pₜ(QₜᵀV).
  We never form G_U: each half-step is one Rayleigh–Ritz step on span[U, G_U U], costing
  O(T·N·k·r) = O(T²r³) per step instead of O(T³r³). Since the old U lies in that span,
  Ky Fan's maximum principle gives f(U_new, V) ≥ f(U_old, V): the objective is monotone.
  Fixed points are the same as exact HOOI's (U spans the top-r eigenspace of G_U(V)).
* Stopping: like tensorly, on the change of the relative error e = ‖X − X̂‖/‖X‖ between
  sweeps, |e_{k−1} − e_k| < tol, or after ``iters`` sweeps (one sweep = one U and one V update).
* The returned U, V are rotated inside their spans to the eigenvectors of G_U(V), G_V(U), so
  the basis (not just the span) is determined by the problem, up to column signs.

Everything runs in float64 on the device of the inputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from mergekit_ctm.engine.linalg import F64, top_eigh


@dataclass
class Tucker2Result:
    """U (N₁ × r), V (N₂ × r) orthonormal; ``errors`` = relative error after HOSVD and each sweep."""

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
    Pp: torch.Tensor, Qp: torch.Tensor, U: torch.Tensor, V: torch.Tensor, r: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """One Rayleigh–Ritz U-update for fixed V; returns (U_new, f(U_new, V))."""
    Y = Pp @ (Qp.mT @ V)  # (T, N1, r): Yₜ = Xₜ V
    GU = (Y @ (Y.mT @ U)).sum(0)
    K = torch.linalg.qr(torch.cat([U, GU], dim=1)).Q
    Z = Y.mT @ K  # (T, r, |K|)
    H = (Z.mT @ Z).sum(0)
    evals, W = top_eigh(H, r)
    return K @ W, evals.sum()


def _rotate_to_eigvecs(Pp: torch.Tensor, Qp: torch.Tensor, U: torch.Tensor, V: torch.Tensor):
    """Rotate U within span(U) to the eigenvectors of Uᵀ G_U(V) U (descending)."""
    Z = U.mT @ Pp @ (Qp.mT @ V)  # (T, r, r) = Uᵀ Xₜ V
    _, W = top_eigh((Z @ Z.mT).sum(0), U.shape[1])
    return U @ W


def tucker2(
    P: torch.Tensor,
    Q: torch.Tensor,
    rank: int,
    *,
    iters: int = 500,
    tol: float = 1e-10,
) -> Tucker2Result:
    """Solve max Σₜ‖Uᵀ Pₜ Qₜᵀ V‖² for P (T, N₁, k), Q (T, N₂, k); rank capped at min(N₁, N₂)."""
    Pp, Qp = P.to(F64), Q.to(F64)
    r = min(rank, Pp.shape[1], Qp.shape[1])
    PtP = Pp.mT @ Pp  # (T, k, k)
    QtQ = Qp.mT @ Qp
    total = float((PtP * QtQ).sum())  # Σₜ ‖Xₜ‖²_F = Σₜ tr(PₜᵀPₜ QₜᵀQₜ)
    _, U = top_eigh((Pp @ QtQ @ Pp.mT).sum(0), r)
    _, V = top_eigh((Qp @ PtP @ Qp.mT).sum(0), r)
    if total == 0.0:
        return Tucker2Result(U, V, [0.0], 0, True)

    def rel_error(f: torch.Tensor) -> float:
        return max(total - float(f), 0.0) ** 0.5 / total**0.5

    Z = U.mT @ Pp @ (Qp.mT @ V)
    errors = [rel_error((Z * Z).sum())]
    converged = errors[0] <= 1e-14
    sweeps = 0
    while not converged and sweeps < iters:
        U, _ = _ritz_step(Pp, Qp, U, V, r)
        V, f = _ritz_step(Qp, Pp, V, U, r)
        sweeps += 1
        errors.append(rel_error(f))
        converged = abs(errors[-2] - errors[-1]) < tol or errors[-1] <= 1e-14
    U = _rotate_to_eigvecs(Pp, Qp, U, V)
    V = _rotate_to_eigvecs(Qp, Pp, V, U)
    return Tucker2Result(U, V, errors, sweeps, converged)


def tucker2_dense(X: torch.Tensor, rank: int, *, iters: int = 500, tol: float = 1e-10):
    """Full-space variant of Problem 2 for dense targets X (T, n, m): Pₜ = Xₜ, Qₜ = I."""
    T, _, m = X.shape
    eye = torch.eye(m, dtype=F64, device=X.device).expand(T, m, m)
    return tucker2(X.to(F64), eye, rank, iters=iters, tol=tol)
