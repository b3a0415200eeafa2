"""Matrix merge rules mergekit lacks: Iso-C, Iso-CTS, TSV-Merge, PCB-merging, RobustMerge.

Each rule maps T same-shape matrices Δ_t (n × m) to one merged matrix, following the authors'
reference code (repositories named per rule). Conventions shared by every rule here:

- ``weight`` (per adapter, default 1) scales Δ_t before the rule (w_t Δ_t), unless the rule's
  docstring says otherwise; ``lambda`` (default 1) scales the result.
- Math runs in float64 for float64 inputs and in float32 otherwise (SVD needs ≥ float32); the
  result is cast back to the input dtype.
- p = min(n, m). A singular direction is *numerically zero* when σ ≤ max(n, m)·eps·σ_max (the
  ``matrix_rank`` tolerance). The SVD rules drop such directions: the authors' code keeps them,
  but their singular vectors are an arbitrary basis of a null space, so keeping them would make
  the output depend on the LAPACK build. On full-rank inputs (the authors' setting, and the r × r
  coordinates of CtM) nothing is dropped and the result equals the authors'.
- Polar factor ("orthogonalization" in TSV/Iso-CTS): for X = P Σ Qᵀ (thin SVD), polar(X) = P Qᵀ,
  the orthonormal matrix closest to X (Procrustes; equals X (XᵀX)^{-1/2} for full column rank).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Annotated, Optional

import torch
from mergekit.merge_methods.base import ParameterScope, ParameterSpec
from pydantic import Field

from mergekit_ctm.engine.linalg import canonical_signs

Tensor = torch.Tensor

_Unit = Annotated[float, Field(gt=0.0, le=1.0)]
_Fraction = Annotated[float, Field(ge=0.0, le=1.0)]
_PosInt = Annotated[int, Field(ge=1)]


def _weight() -> ParameterSpec:
    return ParameterSpec(
        "weight", float, ParameterScope.NON_BASE, default=1.0, description="per-task scale w_t"
    )


def _lambda() -> ParameterSpec:
    return ParameterSpec(
        "lambda", float, ParameterScope.SHARED, default=1.0, description="scale of the result"
    )


# ---------------------------------------------------------------------------------- helpers


def _work_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _stack(tensors: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """(T, *shape) tensor of w_t Δ_t in the work dtype."""
    dtype = _work_dtype(tensors[0])
    w = torch.tensor(list(weights), dtype=dtype, device=tensors[0].device)
    xs = torch.stack([t.to(dtype) for t in tensors])
    return xs * w.reshape(-1, *([1] * (xs.ndim - 1)))


def _tol(x: Tensor, s: Tensor) -> Tensor:
    """Numerical-zero threshold for the singular values ``s`` of matrix ``x``."""
    smax = s.max() if s.numel() else torch.zeros((), dtype=s.dtype, device=s.device)
    return smax * max(x.shape[-2:]) * torch.finfo(s.dtype).eps


def _svd(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD x = U diag(s) Vh keeping only numerically nonzero directions."""
    u, s, vh = torch.linalg.svd(x, full_matrices=False)
    keep = s > _tol(x, s)
    return u[:, keep], s[keep], vh[keep]


def polar(x: Tensor) -> Tensor:
    """Orthonormal polar factor P Qᵀ of x = P Σ Qᵀ (Procrustes / SVD whitening)."""
    p, _, qh = torch.linalg.svd(x, full_matrices=False)
    return p @ qh


def _isotropic(u: Tensor, s: Tensor, vh: Tensor) -> Tensor:
    """mean(s) · polar(U) polar(Vᵀ)ᵀ: flat spectrum on the span of the given directions."""
    if s.numel() == 0:
        return u.new_zeros(u.shape[0], vh.shape[1])
    return s.mean() * (polar(u) @ polar(vh.mT).mT)


# ---------------------------------------------------------------------------------- Iso-C


def iso_c(
    tensors: Sequence[Tensor],
    *,
    weight: Sequence[float],
    lam: float = 1.0,
    rank: int | None = None,
) -> Tensor:
    """Iso-C (Marczak et al., ICML 2025, "No Task Left Behind"; github.com/danielm1405/iso-merging).

    Δ = Σ_t w_t Δ_t = U diag(σ) Vᵀ;  Iso-C(Δ) = λ · mean(σ) · U Vᵀ.

    Assumption: mean and directions over the numerically nonzero σ only (module docstring).
    ``rank`` (set by the pipelines when they truncate): keep the top-``rank`` σ of the sum before
    flattening, as the CtM paper (arXiv:2606.03723, C.2) does for MtC Iso-C; a flat spectrum
    cannot be truncated afterwards without choosing an arbitrary subspace.
    """
    x = _stack(tensors, weight).sum(0)
    u, s, vh = _svd(x)
    if rank is not None:
        u, s, vh = u[:, :rank], s[:rank], vh[:rank]
    out = s.mean() * (u @ vh) if s.numel() else torch.zeros_like(x)
    return (lam * out).to(tensors[0].dtype)


# ---------------------------------------------------------------------------------- Iso-CTS


def iso_cts_dims(p: int, T: int, common_space_fraction: float) -> tuple[int, int]:
    """(common dims k_c, dims per task d) as in the authors' code, with k_c + T·d = p.

    k_c = ⌊p·f⌋;  T·d = round((p − k_c)/T)·T, capped at ⌊p/T⌋·T (the authors' code would
    index past p there);  k_c = p − T·d.
    """
    k_c = int(p * common_space_fraction)
    d = min(round((p - k_c) / T), p // T)
    return p - T * d, d


def iso_cts(
    tensors: Sequence[Tensor],
    *,
    weight: Sequence[float],
    common_space_fraction: float = 0.8,
    cts_rank: int | None = None,
    lam: float = 1.0,
) -> Tensor:
    """Iso-CTS (Marczak et al., ICML 2025; the authors' ``iso_cts``, iso-merging repository).

    With Δ = Σ_t w_t Δ_t = U Σ Vᵀ and (k_c, d) = iso_cts_dims(p, T, f), p = min(n, m, cts_rank):
    common directions U_c, V_c, σ_c = top-k_c of Δ; task residuals R_t = w_t Δ_t − U_c U_cᵀ w_t Δ_t
    and their top-d directions (U_t, σ_t, V_t); then
    Iso-CTS = λ · mean(σ_c ∪ σ_1 … σ_T) · polar([U_c U_1 … U_T]) polar([V_c V_1 … V_T])ᵀ.

    ``cts_rank`` (our extension, default min(n, m) as the authors) caps the total number of
    directions so a rank-r output comes straight out; the CtM paper's setting (1 direction per
    task, r − T common) is ``cts_rank: r, common_space_fraction: (r − T)/r``.
    ``common_space_fraction: 1`` gives Iso-C; so does T = 1 (the residual's directions complete
    the SVD).
    """
    xs = _stack(tensors, weight)
    T = xs.shape[0]
    p = min(xs.shape[1:])
    if cts_rank is not None:
        p = min(p, cts_rank)
    k_c, d = iso_cts_dims(p, T, common_space_fraction)
    u, s, vh = _svd(xs.sum(0))
    us, ss, vhs = [u[:, :k_c]], [s[:k_c]], [vh[:k_c]]
    u_c = us[0]
    if d > 0:
        for x in xs:
            ut, st, vht = _svd(x - u_c @ (u_c.mT @ x))
            us.append(ut[:, :d])
            ss.append(st[:d])
            vhs.append(vht[:d])
    out = _isotropic(torch.cat(us, 1), torch.cat(ss), torch.cat(vhs, 0))
    return (lam * out).to(tensors[0].dtype)


# ---------------------------------------------------------------------------------- TSV-Merge


def tsv_k(p: int, T: int, fraction: float | None) -> int:
    """Directions kept per task: ⌊p·fraction⌋ (fraction default 1/T, the authors'), at least 1."""
    f = 1.0 / T if fraction is None else fraction
    return max(1, int(p * f))


def tsv(
    tensors: Sequence[Tensor],
    *,
    weight: Sequence[float],
    fraction: float | None = None,
    lam: float = 1.0,
) -> Tensor:
    """TSV-Merge (Gargiulo et al., CVPR 2025, "Task Singular Vectors"; authors'
    ``compute_and_sum_svd_mem_reduction`` in github.com/AntoAndGar/task_singular_vectors).

    Per task, w_t Δ_t = U_t Σ_t V_tᵀ truncated to k = ⌊p·fraction⌋ directions (fraction default
    1/T). Concatenate U = [U_1 … U_T], Σ = diag(Σ_1 … Σ_T), V = [V_1 … V_T]; decorrelate with the
    polar factors: TSV = λ · polar(U) Σ polar(V)ᵀ.

    With T·k > p the concatenation has more columns than rows; the polar factor P Qᵀ is then
    row-orthonormal (the authors' code would overwrite slots; we keep all directions). Assumption:
    w_t scales Δ_t before the SVD (the authors have no per-task weight). T = 1 with fraction 1
    returns w_1 Δ_1 · λ exactly.
    """
    xs = _stack(tensors, weight)
    T = xs.shape[0]
    k = tsv_k(min(xs.shape[1:]), T, fraction)
    us, ss, vhs = [], [], []
    for x in xs:
        u, s, vh = _svd(x)
        us.append(u[:, :k])
        ss.append(s[:k])
        vhs.append(vh[:k])
    s = torch.cat(ss)
    if s.numel() == 0:
        return torch.zeros_like(tensors[0])
    out = polar(torch.cat(us, 1)) @ torch.diag(s) @ polar(torch.cat(vhs, 0).mT).mT
    return (lam * out).to(tensors[0].dtype)


# ---------------------------------------------------------------------------------- PCB


def _minmax(x: Tensor) -> Tensor:
    """Row-wise (x − min)/(max − min); rows with max = min give 0 (the authors' code gives NaN)."""
    lo = x.min(dim=1, keepdim=True).values
    hi = x.max(dim=1, keepdim=True).values
    span = hi - lo
    return torch.where(span > 0, (x - lo) / torch.where(span > 0, span, 1), 0)


def _quantile_clamp(x: Tensor, low: Sequence[float], high: float) -> Tensor:
    """Authors' ``clamp``: row t clamped to [sorted[⌊d·low_t⌋], sorted[⌊d·(1 − high)⌋ − 1]]."""
    d = x.shape[1]
    srt = torch.sort(x, dim=1).values
    lo_idx = torch.tensor([min(int(d * f), d - 1) for f in low], device=x.device)
    hi_idx = max(int(d * (1 - high) - 1), 0)
    lo = srt.gather(1, lo_idx[:, None])
    hi = srt[:, hi_idx : hi_idx + 1]
    return torch.clamp(x, lo, hi)


PCB_CLAMP_RATIO = 1e-4


def pcb(
    tensors: Sequence[Tensor],
    *,
    weight: Sequence[float],
    density: Sequence[float],
    lam: float = 1.0,
) -> Tensor:
    """PCB-merging (Du et al., NeurIPS 2024, "Parameter Competition Balancing"; authors'
    ``PCB_merge`` in github.com/duguodong7/pcb-merging, ``pcb-merging.py``).

    On the flattened x_t = vec(Δ_t) (N entries, T tasks), following the code:
      a_t   = |x_t| clamped to its [q_{1e-4}, q_{1−1e-4}] quantiles;  x̃_t = sign(x_t)·a_t
      intra = exp(T · minmax(a_t)²)                       (intra-balancing)
      inter = tanh(x_t · Σ_s x_s)                         (inter-balancing)
      β_t   = intra ⊙ inter
      m_t   = minmax(clamp β_t below its (1 − density_t) quantile)   keeps ≈ density_t of entries
      PCB   = λ · Σ_t w_t m_t x̃_t / max(Σ_t m_t, 1e-12)
    ``density`` is the authors' ``pcb_ratio`` (fraction kept, default 0.1); ``weight`` is their
    per-task λ_t, applied to x̃_t after the scores (scores see the raw Δ_t, as in the code).
    Assumptions: one matrix at a time (the authors flatten the whole model into one vector);
    the quantile clamps use the root ``PCB_merge`` (1e-4), not the 0.01 of their vision script;
    constant score rows give 0 instead of NaN. Note the scores are not scale invariant
    (tanh of products), as in the original.
    """
    xs = _stack(tensors, [1.0] * len(tensors))
    T = xs.shape[0]
    flat = xs.reshape(T, -1)
    a = _quantile_clamp(flat.abs(), [PCB_CLAMP_RATIO] * T, PCB_CLAMP_RATIO)
    clamped = torch.sign(flat) * a
    intra = torch.exp(T * _minmax(a) ** 2)
    inter = torch.tanh(flat * flat.sum(0, keepdim=True))
    score = intra * inter
    m = _minmax(_quantile_clamp(score, [1.0 - d for d in density], 0.0))
    w = torch.tensor(list(weight), dtype=flat.dtype, device=flat.device)[:, None]
    out = (w * clamped * m).sum(0) / torch.clamp(m.sum(0), min=1e-12)
    return (lam * out).reshape(xs.shape[1:]).to(tensors[0].dtype)


# ---------------------------------------------------------------------------------- RobustMerge


def balanced_factors(x: Tensor) -> tuple[Tensor, Tensor]:
    """(A, B) with B A = x: B = U √Σ, A = √Σ Vᵀ over nonzero σ, signs canonical
    (``linalg.canonical_signs``)."""
    u, s, vh = _svd(x)
    sign = canonical_signs(u)
    root = s.sqrt()
    return (sign * root)[:, None] * vh, u * (sign * root)[None, :]


def robustmerge_factors(
    As: Sequence[Tensor],
    Bs: Sequence[Tensor],
    *,
    weight: Sequence[float],
    density: Sequence[float],
    att_ratio: float = 0.2,
    lam: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """RobustMerge on LoRA factors (Zeng et al., NeurIPS 2025; the authors'
    ``load_and_merge_pretrained_model`` in github.com/AuroraZengfh/RobustMerge, file
    llava/model/builder.py).

    A_t: (r × m), B_t: (n × r), same r (pad smaller ranks with zeros). Following the code:
      prune:  keep the entries of A_t (and of B_t) with |·| ≥ the ⌊N(1 − density_t)⌋-th smallest
      scale:  s_t[j] = ‖A_t[j,:]‖₁ / ‖Â_t[j,:]‖₁  (complementary: more pruned → larger), then
              raised to its own (1 − att_ratio) quantile over j (the authors' ``clamp``)
      merge:  A = Σ_t Â_t;  B[:, j] = λ Σ_t w_t s_t[j] B̂_t[:, j] / Σ_t s_t[j]  (cross-task norm.)
    Assumptions: the authors multiply both A and B by a fuse weight 2.0 (4× overall); here w_t
    and λ scale B only, so the product scales once. A rank component whose A row is pruned
    entirely (0/0 or x/0 in the code, NaN there) gets s = 0 (the direction is dropped); the
    cross-task normalization is clamped at 1e-12. density ≥ 1 keeps everything.
    """
    A = torch.stack(list(As))
    B = torch.stack(list(Bs))
    T, r, _ = A.shape

    def prune(x: Tensor) -> Tensor:
        flat = x.reshape(T, -1)
        n = flat.shape[1]
        keep = torch.ones_like(flat, dtype=torch.bool)
        for t in range(T):
            if density[t] < 1:
                k = max(1, int(n * (1 - density[t])))
                kth = flat[t].abs().kthvalue(k).values
                keep[t] = flat[t].abs() >= kth
        return (flat * keep).reshape(x.shape)

    A_hat, B_hat = prune(A), prune(B)
    full, kept = A.abs().sum(-1), A_hat.abs().sum(-1)  # (T, r)
    s = torch.where(kept > 0, full / torch.where(kept > 0, kept, 1), 0)
    s = _quantile_clamp(s, [1.0 - att_ratio] * T, 0.0) * (kept > 0)
    w = torch.tensor(list(weight), dtype=B.dtype, device=B.device)[:, None, None]
    merged_B = (w * s[:, None, :] * B_hat).sum(0) / torch.clamp(s.sum(0), min=1e-12)[None, :]
    return A_hat.sum(0), lam * merged_B


def robustmerge(
    tensors: Sequence[Tensor],
    *,
    weight: Sequence[float],
    density: Sequence[float],
    att_ratio: float = 0.2,
    lam: float = 1.0,
) -> Tensor:
    """RobustMerge on matrices: factor each Δ_t, run :func:`robustmerge_factors`, return B A.

    Assumption (the rule only sees Δ_t): Δ_t = B_t A_t with the balanced SVD factors
    B_t = U_t √Σ_t, A_t = √Σ_t V_tᵀ (canonical signs, numerically zero σ dropped, ranks padded
    to the largest with zeros). Row j of A_t then has L1 mass ∝ √σ_j, so pruning removes more of
    the small singular directions and the complementary scale s_t[j] lifts them: the paper's
    "compensating the gap between stark singular values". Pipelines that hold the real LoRA
    factors can call :func:`robustmerge_factors` on them instead (the paper's setting).
    T = 1 with density 1 returns λ w_1 Δ_1.
    """
    dtype = _work_dtype(tensors[0])
    factors = [balanced_factors(t.to(dtype)) for t in tensors]
    r = max(1, max(a.shape[0] for a, _ in factors))
    As = [torch.nn.functional.pad(a, (0, 0, 0, r - a.shape[0])) for a, _ in factors]
    Bs = [torch.nn.functional.pad(b, (0, r - b.shape[1])) for _, b in factors]
    A, B = robustmerge_factors(As, Bs, weight=weight, density=density, att_ratio=att_ratio, lam=lam)
    return (B @ A).to(tensors[0].dtype)


# ---------------------------------------------------------------------------------- registry

MATRIX_RULE_NAMES: tuple[str, ...] = ("iso_c", "iso_cts", "tsv", "pcb", "robustmerge")

RULES: dict[str, Callable[..., Tensor]] = {
    "iso_c": iso_c,
    "iso_cts": iso_cts,
    "tsv": tsv,
    "pcb": pcb,
    "robustmerge": robustmerge,
}

PARAMETER_SPECS: dict[str, tuple[ParameterSpec, ...]] = {
    "iso_c": (_weight(), _lambda()),
    "iso_cts": (
        _weight(),
        ParameterSpec(
            "common_space_fraction",
            _Fraction,
            ParameterScope.SHARED,
            default=0.8,
            description="fraction of the directions taken from the common subspace",
        ),
        ParameterSpec(
            "cts_rank",
            Optional[_PosInt],  # noqa: UP045 (pydantic needs a runtime type on py3.10)
            ParameterScope.SHARED,
            default=None,
            description="total directions kept (default min(n, m))",
        ),
        _lambda(),
    ),
    "tsv": (
        _weight(),
        ParameterSpec(
            "fraction",
            Optional[_Unit],  # noqa: UP045
            ParameterScope.SHARED,
            default=None,
            description="fraction of min(n, m) kept per task (default 1/T)",
        ),
        _lambda(),
    ),
    "pcb": (
        _weight(),
        ParameterSpec(
            "density",
            _Unit,
            ParameterScope.NON_BASE,
            default=0.1,
            description="fraction of entries kept per task (the authors' pcb_ratio)",
        ),
        _lambda(),
    ),
    "robustmerge": (
        _weight(),
        ParameterSpec(
            "density",
            _Unit,
            ParameterScope.NON_BASE,
            default=0.2,
            description="fraction of factor entries kept per task (the authors' mask_ratio)",
        ),
        ParameterSpec(
            "att_ratio",
            _Fraction,
            ParameterScope.SHARED,
            default=0.2,
            description="scales below the (1 − att_ratio) quantile are raised to it",
        ),
        _lambda(),
    ),
}

PRETTY_NAMES: dict[str, str] = {
    "iso_c": "Iso-C",
    "iso_cts": "Iso-CTS",
    "tsv": "TSV-Merge",
    "pcb": "PCB-merging",
    "robustmerge": "RobustMerge",
}

REFERENCE_URLS: dict[str, str] = {
    "iso_c": "https://arxiv.org/abs/2502.04959",
    "iso_cts": "https://arxiv.org/abs/2502.04959",
    "tsv": "https://arxiv.org/abs/2412.00081",
    "pcb": "https://arxiv.org/abs/2410.02396",
    "robustmerge": "https://arxiv.org/abs/2502.17159",
}
