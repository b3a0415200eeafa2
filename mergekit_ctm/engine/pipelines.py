"""The four merge pipelines: ctm, core_space, mtc, lora_lego.

Notation: ΔWₜ = sₜ Bₜ Aₜ (n × m), r the target rank, ℳ the base rule, λ the global scale.
Each pipeline returns a MergedLora with balanced factors of λ·(merged update).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from mergekit_ctm.engine.core import build_core_space, build_ctm_core_space
from mergekit_ctm.engine.linalg import (
    F64,
    balanced_svd_factors,
    canonical_signs,
    gram_basis,
    tiny_cpu_ops,
)
from mergekit_ctm.engine.tucker import tucker2_batch
from mergekit_ctm.engine.types import MergedLora


def apply_rule(
    tensors: torch.Tensor,
    rule: str,
    params: Mapping[str, Any] | None,
    seed: int | None,
    rank: int | None = None,
):
    """ℳ on T stacked matrices (T, a, b) → (a, b): the base rule through
    ``rules.merge_matrices`` (mergekit's rules on a zero base, or ours); ``params`` its
    mergekit-style parameters, ``seed`` for random rules, ``rank`` the truncation that follows
    (flat-spectrum rules). Public for benchmarks that reuse the merge step."""
    from mergekit_ctm.engine.rules import merge_matrices

    return merge_matrices(list(tensors.unbind(0)), rule, params, seed=seed, rank=rank)


def lift(
    U_left: torch.Tensor,
    C: torch.Tensor,
    V_right: torch.Tensor,
    rank: int | None,
    lam: float,
    out_dtype: torch.dtype,
    requested: int,
    info: dict,
) -> MergedLora:
    """λ·U C Vᵀ as balanced factors: B = U p√S, A = √S qᵀ Vᵀ from the SVD C = p S qᵀ.

    U_left (n × a), C (a × b), V_right (m × b); ``rank`` truncates the SVD (None: keep all
    nonzero directions), the factors are cast to ``out_dtype``, ``requested`` and ``info`` go
    into the MergedLora (``info`` gains the singular values). Public for benchmarks."""
    with tiny_cpu_ops(C.device, max(C.shape[-2:])):
        Bc, Ac, S = balanced_svd_factors(lam * C, rank)
    B = U_left @ Bc.to(U_left.dtype)
    A = Ac.to(V_right.dtype) @ V_right.mT
    info["singular_values"] = S.tolist()
    return MergedLora(A=A.to(out_dtype), B=B.to(out_dtype), requested_rank=requested, info=info)


def _ctm_prepare(As, Bs, scalings, beta: float, dtype):
    """Core space and β weights cₜ (Algorithm 1, steps 1–2); targets are cₜ Mₜ."""
    cs, c = build_ctm_core_space(As, Bs, scalings, beta, dtype)
    Pp, Qp = cs.padded()
    return cs, Pp, Qp, c


def _ctm_finish(
    cs, Pp, Qp, c, sol, *, rank, base_rule, rule_params, lam, seed, dtype
) -> MergedLora:
    """Lift U, V (step 4), coordinates Oₜ = UᵀΔWₜV (5), merge (6), lift back (7)."""
    U = cs.B_cat @ (cs.coef_B @ sol.U).to(dtype)  # n × r, U = U_B U_core
    V = ((cs.coef_A @ sol.V).to(dtype).mT @ cs.A_cat).mT  # m × r, as (Xᵀ A_cat)ᵀ: 2× faster
    su, sv = canonical_signs(U), canonical_signs(V)
    U, V = U * su, V * sv
    Uc, Vc = sol.U * su.to(F64), sol.V * sv.to(F64)
    with tiny_cpu_ops(Pp.device, Pp.shape[-2]):
        O = (Uc.mT @ Pp) @ (Qp.mT @ Vc)  # (T, r, r): Oₜ = U_coreᵀ Mₜ V_core
        merged = apply_rule(O, base_rule, rule_params, seed)
    info = {
        "method": "ctm",
        "hooi_errors": sol.errors,
        "hooi_sweeps": sol.sweeps,
        "hooi_converged": sol.converged,
        "core_dims": (cs.P.shape[0], cs.Q.shape[0]),
        "task_weights": c.tolist(),
    }
    return lift(U, merged, V, rank, lam, dtype, rank, info)


def ctm(
    As,
    Bs,
    scalings,
    *,
    rank: int,
    beta: float,
    base_rule: str,
    rule_params,
    hooi_iters: int,
    hooi_tol: float,
    lam: float,
    seed: int | None,
    dtype: torch.dtype,
) -> MergedLora:
    """Compress-then-Merge, Algorithm 1: learn U, V in core space, merge Oₜ = UᵀΔWₜV, lift."""
    return ctm_many(
        [(As, Bs, scalings)],
        [seed],
        rank=rank,
        beta=beta,
        base_rule=base_rule,
        rule_params=rule_params,
        hooi_iters=hooi_iters,
        hooi_tol=hooi_tol,
        lam=lam,
        dtype=dtype,
    )[0]


def ctm_many(
    modules, seeds, *, rank, beta, base_rule, rule_params, hooi_iters, hooi_tol, lam, dtype
) -> list[MergedLora]:
    """``ctm`` for many modules, solving the core problems of equal shape as one batch.

    On the CPU, modules whose core order Σrₜ is at most ``linalg.TINY`` merge on one thread
    from end to end: their largest products (the n × Σrₜ Grams) gain little from more threads
    on an idle machine, and on a busy one each OpenMP region can stall (docs/benchmarks.md,
    "Engine on the issue-#9 workloads"). Results then do not depend on the thread count.
    """
    if not modules:
        return []
    size = max(sum(int(A.shape[0]) for A in As) for As, _, _ in modules)
    with tiny_cpu_ops(modules[0][0][0].device, size):
        return _ctm_many(
            modules,
            seeds,
            rank=rank,
            beta=beta,
            base_rule=base_rule,
            rule_params=rule_params,
            hooi_iters=hooi_iters,
            hooi_tol=hooi_tol,
            lam=lam,
            dtype=dtype,
        )


def _ctm_many(
    modules, seeds, *, rank, beta, base_rule, rule_params, hooi_iters, hooi_tol, lam, dtype
) -> list[MergedLora]:
    preps = [_ctm_prepare(As, Bs, s, beta, dtype) for As, Bs, s in modules]
    groups: dict[tuple, list[int]] = {}
    for i, (_, Pp, Qp, _) in enumerate(preps):
        groups.setdefault((tuple(Pp.shape), tuple(Qp.shape), str(Pp.device)), []).append(i)
    sols: list = [None] * len(preps)
    for idx in groups.values():
        P = torch.stack([preps[i][1] * preps[i][3].view(-1, 1, 1) for i in idx])
        Q = torch.stack([preps[i][2] for i in idx])
        batch = tucker2_batch(P, Q, rank, iters=hooi_iters, tol=hooi_tol, hosvd_diagonal=True)
        for i, sol in zip(idx, batch):
            sols[i] = sol
    return [
        _ctm_finish(
            *prep,
            sol,
            rank=rank,
            base_rule=base_rule,
            rule_params=rule_params,
            lam=lam,
            seed=seed,
            dtype=dtype,
        )
        for prep, sol, seed in zip(preps, sols, seeds)
    ]


def core_space(As, Bs, scalings, *, rank, base_rule, rule_params, lam, seed, dtype) -> MergedLora:
    """Core Space: ℳ on Mₜ = U_Bᵀ ΔWₜ V_A (canonical SVD bases), lift; rank None = lossless."""
    cs = build_core_space(As, Bs, scalings, dtype)
    U_B, V_A = cs.canonicalize()
    M = cs.core_matrices()
    merged = apply_rule(M, base_rule, rule_params, seed, rank=rank)
    info = {"method": "core_space", "core_dims": tuple(M.shape[1:])}
    requested = rank if rank is not None else min(M.shape[1:])
    return lift(U_B, merged, V_A, rank, lam, dtype, requested, info)


def _factored_lift(
    Bf: torch.Tensor, Af: torch.Tensor, rank: int, lam: float, dtype, info: dict
) -> MergedLora:
    """Balanced rank-≤r factors of λ·Bf Af (Bf: n × k, Af: k × m) without forming n × m."""
    WB, sB = gram_basis(Bf)
    WA, sA = gram_basis(Af.mT)
    UB = Bf @ (WB / sB).to(Bf.dtype)
    VA = Af.mT @ (WA / sA).to(Af.dtype)
    C = (sB.unsqueeze(-1) * WB.mT) @ (WA * sA)  # U_Bᵀ Bf Af V_A
    return lift(UB, C, VA, rank, lam, dtype, rank, info)


def mtc(As, Bs, scalings, *, rank, space, base_rule, rule_params, lam, seed, dtype) -> MergedLora:
    """Merge-then-Compress: merge in ``space`` (full | knots | core), then truncated SVD to rank."""
    if space == "core":
        out = core_space(
            As,
            Bs,
            scalings,
            rank=rank,
            base_rule=base_rule,
            rule_params=rule_params,
            lam=lam,
            seed=seed,
            dtype=dtype,
        )
        out.info["method"] = "mtc/core"
        return out
    if space == "full":
        dW = torch.stack(
            [float(s) * (B.to(dtype) @ A.to(dtype)) for A, B, s in zip(As, Bs, scalings)]
        )
        merged = lam * apply_rule(dW, base_rule, rule_params, seed, rank=rank).to(dtype)
        B, A, S = balanced_svd_factors(  # the dense SVD stays in the math dtype
            merged, rank, rtol=max(merged.shape) * torch.finfo(dtype).eps, work_dtype=None
        )
        info = {"method": "mtc/full", "singular_values": S.tolist()}
        return MergedLora(A=A, B=B, requested_rank=rank, info=info)
    if space == "knots":
        return _knots(As, Bs, scalings, rank, base_rule, rule_params, lam, seed, dtype)
    raise ValueError(f"unknown mtc space {space!r}; expected one of: full, knots, core")


def _knots(As, Bs, scalings, rank, base_rule, rule_params, lam, seed, dtype) -> MergedLora:
    """KnOTS space: [ΔW₁ … ΔW_T] = U Σ [V⁽¹⁾; …; V⁽ᵀ⁾]ᵀ; ℳ on the V⁽ᵗ⁾ (m × k); ΔW = U Σ V_mergedᵀ.

    Computed in factored form: ΔWₜ = U_B Mₜ V_Aᵀ, so the concatenation's SVD is U_B times the
    SVD of [M₁ … M_T] (k_B × T·k_A), and V⁽ᵗ⁾ = V_A wₜ. U gets canonical signs.
    """
    cs = build_core_space(As, Bs, scalings, dtype)
    M = cs.core_matrices()  # (T, kB, kA)
    T, kB, kA = M.shape
    u, sig, wh = torch.linalg.svd(torch.cat(list(M.unbind(0)), dim=1), full_matrices=False)
    keep = int((sig > sig[:1].clamp_min(1e-300) * max(kB, T * kA) * 1e-15).sum())
    u, sig, wh = u[:, :keep], sig[:keep], wh[:keep]
    U = cs.U_B() @ u.to(dtype)  # n × keep
    sign = canonical_signs(U)
    U, wh = U * sign, wh * sign.to(F64).unsqueeze(-1)
    V_A = cs.V_A()
    Vt = torch.stack(
        [V_A @ wh[:, t * kA : (t + 1) * kA].mT.to(dtype) for t in range(T)]
    )  # (T, m, keep)
    V_merged = apply_rule(Vt.to(F64), base_rule, rule_params, seed).to(dtype)
    info = {"method": "mtc/knots", "knots_dims": keep}
    return _factored_lift(U * sig.to(dtype), V_merged.mT, rank, lam, dtype, info)
