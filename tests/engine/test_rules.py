"""Merge rules: mergekit rules on a zero base and our matrix rules, against float64 references."""

from __future__ import annotations

import math

import pytest
import torch

from mergekit_ctm.engine.rules import (
    RuleError,
    adapter_seed,
    matrix_rule_methods,
    merge_matrices,
    rule_names,
    rule_parameter_specs,
)

F64 = torch.float64
TOL = dict(rtol=0, atol=1e-12)


def mats(T: int, shape=(16, 16), seed: int = 0, dtype=F64) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g, dtype=F64).to(dtype) for _ in range(T)]


# ---------------------------------------------------------------- references (from the equations)


def ref_topk_mask(x: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the k = max(1, ⌊density·N⌋) largest |x| (mergekit's count, not the paper's +1)."""
    if density >= 1:
        return torch.ones_like(x)
    n = x.numel()
    k = max(1, math.floor(density * n)) if density > 0 else 0
    mask = torch.zeros(n, dtype=x.dtype)
    mask[torch.topk(x.abs().reshape(-1), k).indices] = 1
    return mask.reshape(x.shape)


def ref_outlier_mask(x: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Breadcrumbs: drop the ⌊γN⌋ largest and the smallest, keep ⌊density·N⌋ in between."""
    if density >= 1:
        return torch.ones_like(x)
    n = x.numel()
    keep, top = math.floor(density * n), math.floor(gamma * n)
    bottom = max(0, n - keep - top)
    order = torch.argsort(x.abs().reshape(-1))
    mask = torch.zeros(n, dtype=x.dtype)
    mask[order[bottom : bottom + keep]] = 1
    return mask.reshape(x.shape)


def ref_l1_rescale(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    kept = x * mask
    a, b = x.abs().sum(), kept.abs().sum()
    return kept if (a < 1e-7 or b < 1e-7) else kept * (a / b)


def ref_combine(
    deltas: list[torch.Tensor],
    weights: list[float],
    *,
    consensus: bool,
    normalize: bool,
    lam: float = 1.0,
) -> torch.Tensor:
    """mergekit's GTA combination: weighted deltas, optional TIES sign election, normalization."""
    wd = [w * d for w, d in zip(weights, deltas, strict=True)]
    if consensus:
        elected = torch.where(sum(wd) >= 0, 1.0, -1.0).to(F64)
        masks = [(torch.sign(d) == elected).to(F64) for d in wd]
        merged = sum(m * d for m, d in zip(masks, wd, strict=True))
        divisor = sum(w * m for w, m in zip(weights, masks, strict=True))
        divisor = torch.where(divisor == 0, torch.ones_like(divisor), divisor)
    else:
        merged = sum(wd)
        divisor = torch.tensor(sum(weights), dtype=F64)
        if divisor.abs() < 1e-8:
            divisor = torch.ones_like(divisor)
    if normalize:
        merged = merged / divisor
    return merged * lam


def dare_mask(seed: int | None, t: int, shape, density: float) -> torch.Tensor:
    """The mask our scheme draws: CPU generator seeded with adapter_seed(seed, t), Bernoulli(p)."""
    g = torch.Generator().manual_seed(adapter_seed(seed, t))
    return torch.bernoulli(torch.full(shape, density, dtype=torch.float32), generator=g).to(F64)


def della_mask(seed: int | None, t: int, x: torch.Tensor, density: float, eps: float):
    """DELLA: per row, keep probability grows linearly with magnitude rank in [d-ε, d+ε]."""
    ranks = torch.argsort(torch.argsort(x.abs(), dim=1), dim=1).to(F64)  # 0 .. m-1
    probs = (density - eps) + ranks / (x.shape[1] - 1) * 2 * eps
    g = torch.Generator().manual_seed(adapter_seed(seed, t))
    return torch.bernoulli(probs.to(torch.float32), generator=g).to(F64)


# ---------------------------------------------------------------- registry / names


def test_rule_names_cover_mergekit_family_and_reject_the_rest():
    names = rule_names()
    for n in ("task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs",
              "breadcrumbs_ties", "della", "della_linear", "linear", "sce"):  # fmt: skip
        assert n in names
    for n in ("slerp", "nearswap", "arcee_fusion", "passthrough"):
        assert n not in names
        with pytest.raises(RuleError, match=rf"'{n}' cannot merge task deltas.*Valid rules: "):
            merge_matrices(mats(2), n)
    assert len(set(names)) == len(names)


def test_weight_defaults_to_one_in_specs():
    for rule in rule_names():
        specs = {p.name: p for p in rule_parameter_specs(rule)}
        if "weight" in specs:
            assert specs["weight"].default == 1.0, rule
        assert all(not p.required for p in specs.values()), rule


# ---------------------------------------------------------------- mergekit rules vs references


@pytest.mark.parametrize("T", [1, 2, 3, 6])
def test_task_arithmetic(T):
    xs = mats(T)
    w = [0.3 + 0.2 * t for t in range(T)]
    out = merge_matrices(xs, "task_arithmetic", {"weight": w, "lambda": 1.7})
    torch.testing.assert_close(out, 1.7 * sum(a * x for a, x in zip(w, xs, strict=True)), **TOL)
    out = merge_matrices(xs, "task_arithmetic", {"normalize": True})  # weight defaults to 1
    torch.testing.assert_close(out, sum(xs) / T, **TOL)


@pytest.mark.parametrize("T", [1, 2, 3, 6])
@pytest.mark.parametrize("density", [0.1, 0.45, 1.0])
def test_ties(T, density):
    xs = mats(T, seed=T)
    w = [1.0 - 0.1 * t for t in range(T)]
    out = merge_matrices(xs, "ties", {"weight": w, "density": density})
    trimmed = [x * ref_topk_mask(x, density) for x in xs]
    ref = ref_combine(trimmed, w, consensus=True, normalize=True)
    torch.testing.assert_close(out, ref, **TOL)
    # mergekit's count: exactly ⌊density·N⌋ entries survive for T = 1
    if T == 1:
        assert int((out != 0).sum()) == max(1, math.floor(density * 256))


def test_ties_per_adapter_density_and_no_normalize():
    xs = mats(3, seed=7)
    d, w = [0.2, 0.5, 0.9], [1.0, -0.5, 2.0]
    out = merge_matrices(xs, "ties", {"density": d, "weight": w, "normalize": False, "lambda": 2})
    trimmed = [x * ref_topk_mask(x, di) for x, di in zip(xs, d, strict=True)]
    torch.testing.assert_close(
        out, ref_combine(trimmed, w, consensus=True, normalize=False, lam=2.0), **TOL
    )


@pytest.mark.parametrize("rule,consensus", [("breadcrumbs", False), ("breadcrumbs_ties", True)])
def test_breadcrumbs(rule, consensus):
    xs = mats(3, seed=3)
    d, gamma = [0.6, 0.4, 0.8], 0.05
    out = merge_matrices(xs, rule, {"density": d, "gamma": gamma})
    trimmed = [x * ref_outlier_mask(x, di, gamma) for x, di in zip(xs, d, strict=True)]
    torch.testing.assert_close(
        out, ref_combine(trimmed, [1.0] * 3, consensus=consensus, normalize=False), **TOL
    )


@pytest.mark.parametrize("rule,consensus,normalize", [("dare_ties", True, False),
                                                      ("dare_linear", False, False)])  # fmt: skip
@pytest.mark.parametrize("T", [1, 3, 6])
def test_dare(rule, consensus, normalize, T):
    xs = mats(T, seed=11)
    w = [0.5 + 0.25 * t for t in range(T)]
    density = 0.3
    out = merge_matrices(xs, rule, {"density": density, "weight": w}, seed=42)
    kept = [ref_l1_rescale(x, dare_mask(42, t, x.shape, density)) for t, x in enumerate(xs)]
    ref = ref_combine(kept, w, consensus=consensus, normalize=normalize)
    torch.testing.assert_close(out, ref, **TOL)


def test_dare_without_rescale_keeps_values():
    xs = mats(2, seed=5)
    out = merge_matrices(xs, "dare_linear", {"density": 0.5, "rescale": False}, seed=3)
    ref = sum(x * dare_mask(3, t, x.shape, 0.5) for t, x in enumerate(xs))
    torch.testing.assert_close(out, ref, **TOL)


@pytest.mark.parametrize("rule,consensus,normalize", [("della", True, True),
                                                      ("della_linear", False, False)])  # fmt: skip
def test_della(rule, consensus, normalize):
    xs = mats(3, seed=13)
    d, eps = [0.5, 0.4, 0.6], 0.1
    out = merge_matrices(xs, rule, {"density": d, "epsilon": eps}, seed=9)
    kept = [
        ref_l1_rescale(x, della_mask(9, t, x, di, eps))
        for t, (x, di) in enumerate(zip(xs, d, strict=True))
    ]
    ref = ref_combine(kept, [1.0] * 3, consensus=consensus, normalize=normalize)
    torch.testing.assert_close(out, ref, **TOL)


def test_linear_is_weighted_mean_without_base():
    xs = mats(3, seed=2)
    w = [1.0, 2.0, 3.0]
    out = merge_matrices(xs, "linear", {"weight": w})
    torch.testing.assert_close(out, sum(a * x for a, x in zip(w, xs, strict=True)) / 6.0, **TOL)


@pytest.mark.parametrize("topk", [1.0, 0.3])
def test_sce(topk):
    xs = torch.stack(mats(3, seed=4))
    out = merge_matrices(list(xs), "sce", {"select_topk": topk})
    var = xs.var(dim=0, unbiased=False)
    keep = torch.ones_like(var)
    if topk < 1:
        k = int(int((var != 0).sum()) * topk)
        keep = torch.zeros(var.numel(), dtype=F64)
        keep[torch.topk(var.reshape(-1), k).indices] = 1
        keep = keep.reshape(var.shape)
    tv = xs * keep
    elected = torch.where(tv.sum(0) >= 0, 1.0, -1.0).to(F64)
    erase = (torch.sign(tv) == elected).to(F64)
    energy = tv.square().mean(dim=(1, 2))
    w = (energy / energy.sum())[:, None, None] * erase
    ref = (tv * w).sum(0) / w.sum(0).clamp(min=1e-6)
    torch.testing.assert_close(out, ref, **TOL)


def test_model_stock_scales_the_mean():
    xs = mats(3, seed=6)
    flat = [x.reshape(-1) for x in xs]
    cos = [
        torch.dot(flat[i], flat[j]) / (flat[i].norm() * flat[j].norm())
        for i in range(3)
        for j in range(i + 1, 3)
    ]
    c = sum(cos) / len(cos)
    t = 3 * c / (1 + 2 * c)
    torch.testing.assert_close(merge_matrices(xs, "model_stock"), t * sum(xs) / 3, **TOL)
    with pytest.raises(RuleError, match="model_stock.*at least 3 inputs"):
        merge_matrices(xs[:1], "model_stock")


def test_nuslerp_slerps_two_deltas():
    a, b = mats(2, seed=8)
    out = merge_matrices([a, b], "nuslerp", {"weight": [1.0, 3.0]})  # t = 3/4
    ua, ub = a.reshape(-1) / a.norm(), b.reshape(-1) / b.norm()
    theta = torch.arccos(torch.dot(ua, ub))
    ref = (torch.sin(0.25 * theta) * a + torch.sin(0.75 * theta) * b) / torch.sin(theta)
    torch.testing.assert_close(out, ref, **TOL)
    with pytest.raises(RuleError, match="nuslerp.*exactly 2 non-base"):
        merge_matrices(mats(3), "nuslerp")


def test_karcher_two_equal_norms_is_geodesic_midpoint():
    a, b = mats(2, seed=9)
    b = b * (a.norm() / b.norm())
    out = merge_matrices([a, b], "karcher")
    mid = (a + b) / (a + b).norm() * a.norm()
    torch.testing.assert_close(out, mid, **TOL)


def test_ram_overlap_mean_and_unique_sum():
    a, b = mats(2, seed=10)
    a[:8] = 0  # rows 0..7: only b contributes
    out = merge_matrices([a, b], "ram")
    ref = torch.where(a.abs() > 1e-5, (a + b) / 2, b)
    torch.testing.assert_close(out, ref, **TOL)


def test_multislerp_equals_tangent_space_formula():
    xs = mats(3, seed=12)
    w = torch.tensor([0.2, 0.3, 0.5], dtype=F64)
    out = merge_matrices(xs, "multislerp", {"weight": w.tolist()})
    flat = torch.stack([x.reshape(-1) for x in xs])
    norms = flat.norm(dim=1, keepdim=True)
    units = flat / (norms + 1e-8)
    mean = (units * w[:, None]).sum(0)
    mean = mean / mean.norm()
    tangent = ((units - (units @ mean)[:, None] * mean) * w[:, None]).sum(0)
    tn = tangent.norm() + 1e-8
    res = (mean * torch.cos(tn) + tangent * torch.sin(tn) / tn) * (norms[:, 0] * w).sum()
    torch.testing.assert_close(out, res.reshape(16, 16), **TOL)


# ---------------------------------------------------------------- broadcasting, dtypes


@pytest.mark.parametrize("rule", ["ties", "dare_ties", "breadcrumbs", "della_linear"])
def test_scalar_broadcast_equals_per_adapter_list(rule):
    xs = mats(3, seed=1)
    p = {"weight": 0.7, "density": 0.5}
    q = {"weight": [0.7] * 3, "density": [0.5] * 3}
    assert torch.equal(merge_matrices(xs, rule, p, seed=4), merge_matrices(xs, rule, q, seed=4))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, F64])
def test_dtype_and_shape_preserved(dtype):
    xs = mats(3, shape=(8, 12), dtype=dtype)
    for rule in ("task_arithmetic", "ties", "dare_ties", "della", "linear"):
        out = merge_matrices(xs, rule, {"density": 0.5} if rule != "linear" else None)
        assert out.dtype == dtype and out.shape == (8, 12)


def test_float32_inputs_follow_float64_reference_closely():
    xs = mats(3, seed=14)
    out = merge_matrices([x.float() for x in xs], "ties", {"density": 0.4})
    ref = merge_matrices(xs, "ties", {"density": 0.4})
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- determinism


@pytest.mark.parametrize("rule", ["dare_ties", "dare_linear", "della", "della_linear"])
def test_random_rules_deterministic_and_seed_sensitive(rule):
    xs = mats(3, seed=21)
    p = {"density": 0.5}
    a = merge_matrices(xs, rule, p, seed=123)
    assert torch.equal(a, merge_matrices(xs, rule, p, seed=123))
    assert not torch.equal(a, merge_matrices(xs, rule, p, seed=124))
    assert torch.equal(merge_matrices(xs, rule, p), merge_matrices(xs, rule, p, seed=0))


def test_random_rules_independent_of_execution_order_and_global_rng():
    xa, xb = mats(3, seed=1), mats(3, seed=2)
    p = {"density": 0.4}
    torch.manual_seed(0)
    a1 = merge_matrices(xa, "dare_ties", p, seed=1)
    b1 = merge_matrices(xb, "dare_ties", p, seed=2)
    torch.manual_seed(999)
    torch.rand(17)
    b2 = merge_matrices(xb, "dare_ties", p, seed=2)
    a2 = merge_matrices(xa, "dare_ties", p, seed=1)
    assert torch.equal(a1, a2) and torch.equal(b1, b2)
    # the caller's global RNG stream is untouched
    torch.manual_seed(5)
    expected = torch.rand(4)
    torch.manual_seed(5)
    merge_matrices(xa, "della", {"density": 0.5}, seed=3)
    assert torch.equal(torch.rand(4), expected)


def test_adapter_masks_depend_on_index_not_neighbours():
    xs = mats(3, seed=30)
    # adapter 0's DARE mask is the same whatever adapters 1, 2 are
    p = {"density": 0.5, "weight": [1.0, 0.0, 0.0]}
    a = merge_matrices(xs, "dare_linear", p, seed=8)
    b = merge_matrices([xs[0], xs[2] * 3, xs[1]], "dare_linear", p, seed=8)
    assert torch.equal(a, b)
    assert adapter_seed(8, 0) != adapter_seed(8, 1) != adapter_seed(9, 0)


# ---------------------------------------------------------------- errors


def test_unknown_rule_lists_valid_rules():
    with pytest.raises(RuleError, match=r"unknown merge rule 'tie'.*ties, dare_ties"):
        merge_matrices(mats(2), "tie")
    with pytest.raises(RuleError, match="unknown merge rule"):
        rule_parameter_specs("nope")


def test_parameter_errors_name_the_parameter():
    xs = mats(3)
    with pytest.raises(RuleError, match=r"unknown parameter\(s\) 'densty'.*valid parameters:.*"):
        merge_matrices(xs, "ties", {"densty": 0.5})
    with pytest.raises(RuleError, match="'density' of merge rule 'ties' has 2 values for 3"):
        merge_matrices(xs, "ties", {"density": [0.5, 0.2]})
    with pytest.raises(RuleError, match=r"'weight' \(adapter 1\).*valid number"):
        merge_matrices(xs, "ties", {"weight": [1.0, "x", 2.0]})
    with pytest.raises(RuleError, match=r"'density' \(adapter 0\).*\[0, 1\]"):
        merge_matrices(xs, "ties", {"density": 1.5})
    with pytest.raises(RuleError, match="'epsilon'.*density ± epsilon"):
        merge_matrices(xs, "della", {"density": 0.5, "epsilon": 0.6})
    with pytest.raises(RuleError, match="'normalize'"):
        merge_matrices(xs, "ties", {"normalize": "maybe"})
    with pytest.raises(RuleError, match="'weight'.*nan"):
        merge_matrices(xs, "ties", {"weight": float("nan")})


def test_tensor_errors():
    xs = mats(2)
    with pytest.raises(RuleError, match="at least one tensor"):
        merge_matrices([], "ties")
    with pytest.raises(RuleError, match=r"tensor 1 .* shape \(4, 4\)"):
        merge_matrices([xs[0], xs[1][:4, :4]], "ties")
    with pytest.raises(RuleError, match="tensor 1 .*float32"):
        merge_matrices([xs[0], xs[1].float()], "ties")


# ================================================================ matrix rules (ours)


def ref_polar(x: torch.Tensor) -> torch.Tensor:
    """X (XᵀX)^{-1/2} via an eigendecomposition (independent of the SVD route in the code)."""
    lam, q = torch.linalg.eigh(x.mT @ x)
    return x @ q @ torch.diag(lam.rsqrt()) @ q.mT


def ref_svd(x: torch.Tensor):
    u, s, vh = torch.linalg.svd(x, full_matrices=False)
    return u, s, vh


def low_rank(T: int, rank: int, shape=(16, 16), seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    n, m = shape
    return [
        torch.randn(n, rank, generator=g, dtype=F64) @ torch.randn(rank, m, generator=g, dtype=F64)
        for _ in range(T)
    ]


@pytest.mark.parametrize("T", [1, 2, 3, 6])
@pytest.mark.parametrize("shape", [(16, 16), (16, 12)])
def test_iso_c(T, shape):
    xs = mats(T, shape=shape, seed=40 + T)
    w = [1.0 + 0.5 * t for t in range(T)]
    out = merge_matrices(xs, "iso_c", {"weight": w, "lambda": 0.5})
    u, s, vh = ref_svd(sum(a * x for a, x in zip(w, xs, strict=True)))
    torch.testing.assert_close(out, 0.5 * s.mean() * u @ vh, **TOL)
    sv = torch.linalg.svdvals(out)
    torch.testing.assert_close(sv, torch.full_like(sv, float(sv[0])), **TOL)


def test_iso_c_rank_deficient_keeps_only_the_span():
    xs = low_rank(2, 2, seed=1)  # TA sum has rank 4 in a 16×16 matrix
    out = merge_matrices(xs, "iso_c")
    u, s, vh = ref_svd(sum(xs))
    ref = s[:4].mean() * u[:, :4] @ vh[:4]
    torch.testing.assert_close(out, ref, **TOL)
    assert int(torch.linalg.matrix_rank(out)) == 4


def ref_iso_cts(xs, f, cts_rank=None):
    T, p = len(xs), min(xs[0].shape)
    if cts_rank is not None:
        p = min(p, cts_rank)
    k_c = int(p * f)
    d = min(round((p - k_c) / T), p // T)
    k_c = p - T * d
    u, s, vh = ref_svd(sum(xs))
    U, S, V = [u[:, :k_c]], [s[:k_c]], [vh[:k_c].mT]
    for x in xs:
        r = x - u[:, :k_c] @ u[:, :k_c].mT @ x
        ut, st, vht = ref_svd(r)
        U.append(ut[:, :d])
        S.append(st[:d])
        V.append(vht[:d].mT)
    s_all = torch.cat(S)
    return s_all.mean() * ref_polar(torch.cat(U, 1)) @ ref_polar(torch.cat(V, 1)).mT


@pytest.mark.parametrize("T", [2, 3, 6])
@pytest.mark.parametrize("f", [0.8, 0.5, 0.0])
def test_iso_cts(T, f):
    xs = mats(T, shape=(16, 16), seed=50 + T)
    out = merge_matrices(xs, "iso_cts", {"common_space_fraction": f})
    torch.testing.assert_close(out, ref_iso_cts(xs, f), rtol=0, atol=1e-10)
    sv = torch.linalg.svdvals(out)
    torch.testing.assert_close(sv, torch.full_like(sv, float(sv[0])), rtol=0, atol=1e-10)


def test_iso_cts_special_cases():
    xs = mats(3, seed=60)
    iso_c = merge_matrices(xs, "iso_c")
    torch.testing.assert_close(
        merge_matrices(xs, "iso_cts", {"common_space_fraction": 1.0}), iso_c, **TOL
    )
    # T = 1: the residual's directions complete the SVD, so Iso-CTS is Iso-C
    torch.testing.assert_close(
        merge_matrices(xs[:1], "iso_cts"), merge_matrices(xs[:1], "iso_c"), rtol=0, atol=1e-10
    )
    # the CtM paper's low-rank setting: r = 8 directions, r − T common + 1 per task
    out = merge_matrices(xs, "iso_cts", {"cts_rank": 8, "common_space_fraction": 5 / 8})
    assert int(torch.linalg.matrix_rank(out)) == 8
    torch.testing.assert_close(out, ref_iso_cts(xs, 5 / 8, cts_rank=8), rtol=0, atol=1e-10)


def ref_tsv(xs, fraction=None):
    T, p = len(xs), min(xs[0].shape)
    k = max(1, int(p * (1 / T if fraction is None else fraction)))
    U, S, V = [], [], []
    for x in xs:
        u, s, vh = ref_svd(x)
        U.append(u[:, :k])
        S.append(s[:k])
        V.append(vh[:k].mT)
    return ref_polar(torch.cat(U, 1)) @ torch.diag(torch.cat(S)) @ ref_polar(torch.cat(V, 1)).mT


@pytest.mark.parametrize("T", [1, 2, 3, 6])
def test_tsv(T):
    xs = mats(T, seed=70 + T)
    w = [0.5 + 0.1 * t for t in range(T)]
    out = merge_matrices(xs, "tsv", {"weight": w})
    ref = ref_tsv([a * x for a, x in zip(w, xs, strict=True)])
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-10)


def test_tsv_properties():
    x = mats(1, seed=80)[0]
    # T = 1 with the full fraction reproduces the input
    torch.testing.assert_close(merge_matrices([x], "tsv", {"fraction": 1.0}), x, **TOL)
    # tasks on disjoint row and column blocks are already orthogonal: TSV is their sum
    a, b = torch.zeros(16, 16, dtype=F64), torch.zeros(16, 16, dtype=F64)
    a[:8, :8], b[8:, 8:] = mats(2, shape=(8, 8), seed=81)
    torch.testing.assert_close(merge_matrices([a, b], "tsv"), a + b, **TOL)
    # fraction: 2 of 16 directions per task
    xs = mats(3, seed=82)
    torch.testing.assert_close(
        merge_matrices(xs, "tsv", {"fraction": 0.125}), ref_tsv(xs, 0.125), rtol=0, atol=1e-10
    )


def ref_pcb(xs, density, weight, lam=1.0):
    T = len(xs)
    x = torch.stack([t.reshape(-1) for t in xs])
    N = x.shape[1]

    def qclamp(v, lo_ratio, hi_ratio):
        srt = v.sort(dim=1).values
        lo = torch.stack([srt[t, min(int(N * lo_ratio[t]), N - 1)] for t in range(T)])[:, None]
        hi = srt[:, int(N * (1 - hi_ratio) - 1)][:, None]
        return torch.minimum(torch.maximum(v, lo), hi)

    def minmax(v):
        lo, hi = v.min(1, keepdim=True).values, v.max(1, keepdim=True).values
        return (v - lo) / (hi - lo)

    a = qclamp(x.abs(), [1e-4] * T, 1e-4)
    xt = torch.sign(x) * a
    beta = torch.exp(T * minmax(a) ** 2) * torch.tanh(x * x.sum(0))
    m = minmax(qclamp(beta, [1 - d for d in density], 0.0))
    w = torch.tensor(weight, dtype=F64)[:, None]
    return (lam * (w * m * xt).sum(0) / m.sum(0).clamp(min=1e-12)).reshape(xs[0].shape)


@pytest.mark.parametrize("T", [1, 2, 3, 6])
def test_pcb(T):
    xs = [0.3 * x for x in mats(T, seed=90 + T)]
    d = [0.1 + 0.1 * t for t in range(T)]
    w = [1.2] * T
    out = merge_matrices(xs, "pcb", {"density": d, "weight": w, "lambda": 0.7})
    torch.testing.assert_close(out, ref_pcb(xs, d, w, 0.7), **TOL)


def test_pcb_identical_tasks_keep_the_top_scores():
    x = mats(1, seed=95)[0]
    out = merge_matrices([x, x, x], "pcb", {"density": 0.25})
    kept = out != 0
    # Σ m x̃ / Σ m = x̃ where any score survives; x̃ = x except the clamped extreme entry
    a = x.abs().reshape(-1).sort().values
    xt = torch.sign(x) * x.abs().clamp(max=float(a[-2]))
    torch.testing.assert_close(out[kept], xt[kept], **TOL)
    assert abs(int(kept.sum()) - 0.25 * 256) <= 1


def ref_robustmerge(xs, density, weight, att, lam=1.0):
    As, Bs = [], []
    for x in xs:
        u, s, vh = ref_svd(x)
        sign = torch.sign(u[u.abs().argmax(0), torch.arange(u.shape[1])])
        As.append((sign * s.sqrt())[:, None] * vh)
        Bs.append(u * (sign * s.sqrt()))
    r = As[0].shape[0]

    def prune(v, d):
        if d >= 1:
            return v
        flat = v.reshape(-1).abs()
        kth = flat.sort().values[max(1, int(flat.numel() * (1 - d))) - 1]
        return v * (v.abs() >= kth)

    A = sum(prune(a, d) for a, d in zip(As, density, strict=True))
    scales = []
    for a, d in zip(As, density, strict=True):
        kept = prune(a, d).abs().sum(1)
        # a rank component whose A row is pruned away entirely is dropped (s = 0)
        s = torch.where(kept > 0, a.abs().sum(1) / kept, 0.0)
        lo = s.sort().values[int(r * (1 - att))]
        scales.append(s.clamp(min=float(lo)) * (kept > 0))
    B = sum(
        w * sc[None, :] * prune(b, d)
        for w, sc, b, d in zip(weight, scales, Bs, density, strict=True)
    )
    B = B / sum(scales).clamp(min=1e-12)[None, :]
    return lam * B @ A


@pytest.mark.parametrize("T", [1, 2, 3, 6])
def test_robustmerge(T):
    xs = mats(T, seed=100 + T)
    d, w = [0.3 + 0.1 * t for t in range(T)], [1.0 + 0.2 * t for t in range(T)]
    out = merge_matrices(xs, "robustmerge", {"density": d, "weight": w, "att_ratio": 0.25})
    torch.testing.assert_close(out, ref_robustmerge(xs, d, w, 0.25), rtol=0, atol=1e-10)


def test_robustmerge_without_pruning_is_weighted_input_for_one_task():
    x = mats(1, seed=110)[0]
    out = merge_matrices([x], "robustmerge", {"density": 1.0, "weight": 2.0, "lambda": 0.5})
    torch.testing.assert_close(out, x, rtol=0, atol=1e-10)


@pytest.mark.parametrize("rule", ["iso_c", "iso_cts", "tsv", "pcb", "robustmerge"])
def test_matrix_rules_keep_dtype_and_are_deterministic(rule):
    xs = mats(3, shape=(12, 10), seed=120)
    out64 = merge_matrices(xs, rule)
    assert out64.dtype == F64 and out64.shape == (12, 10)
    assert torch.equal(out64, merge_matrices(xs, rule))
    out32 = merge_matrices([x.float() for x in xs], rule)
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32.double(), out64, rtol=1e-4, atol=1e-4)


def test_matrix_rule_errors():
    xs = mats(2)
    with pytest.raises(RuleError, match="merges 2-D matrices"):
        merge_matrices([x.reshape(-1) for x in xs], "tsv")
    with pytest.raises(RuleError, match="'fraction'.*greater than 0"):
        merge_matrices(xs, "tsv", {"fraction": 0.0})
    with pytest.raises(RuleError, match="'common_space_fraction'.*less than or equal to 1"):
        merge_matrices(xs, "iso_cts", {"common_space_fraction": 1.5})
    with pytest.raises(RuleError, match=r"'density' \(adapter 1\) of merge rule 'pcb'"):
        merge_matrices(xs, "pcb", {"density": [0.2, 0.0]})
    with pytest.raises(RuleError, match="'cts_rank'"):
        merge_matrices(xs, "iso_cts", {"cts_rank": 0})
    with pytest.raises(RuleError, match=r"unknown parameter\(s\) 'rank'.*cts_rank"):
        merge_matrices(xs, "iso_cts", {"rank": 4})


# ---------------------------------------------------------------- as mergekit methods


def test_matrix_rule_methods_merge_deltas_from_the_base():
    from mergekit.merge_methods.base import BasePolicy, TensorGroup

    methods = {m.spec.name: m for m in matrix_rule_methods()}
    assert set(methods) == {"iso_c", "iso_cts", "tsv", "pcb", "robustmerge"}
    g = torch.Generator().manual_seed(7)
    base = torch.randn(12, 10, generator=g, dtype=F64)
    models = [base + 0.1 * torch.randn(12, 10, generator=g, dtype=F64) for _ in range(3)]
    bias = torch.randn(10, generator=g, dtype=F64)
    biases = [bias + torch.randn(10, generator=g, dtype=F64) for _ in range(3)]
    params = {"weight": [1.0, 0.5, 2.0], "lambda": 0.8}
    for name, method in methods.items():
        assert method.spec.contract.base == BasePolicy.REQUIRED
        groups = [
            TensorGroup.from_tensors([base, *models], base_index=0),
            TensorGroup.from_tensors([bias, *biases], base_index=0),
        ]
        out_w, out_b = method(groups, parameters=params)
        deltas = [m - base for m in models]
        torch.testing.assert_close(out_w, base + merge_matrices(deltas, name, params), **TOL)
        bias_deltas = [b - bias for b in biases]
        if name == "pcb":
            ref_b = bias + merge_matrices(bias_deltas, name, params)
        else:
            mean = sum(w * d for w, d in zip(params["weight"], bias_deltas, strict=True)) / 3
            ref_b = bias + 0.8 * mean
        torch.testing.assert_close(out_b, ref_b, **TOL)


@pytest.mark.parametrize("shape", [(0,), (0, 4), (4, 0)])
@pytest.mark.parametrize("name", ["iso_c", "iso_cts", "tsv", "pcb", "robustmerge"])
def test_matrix_rule_methods_merge_empty_weights(name, shape):
    """mergekit's state-dict interface merges empty tensors like its own methods do (PCB and
    RobustMerge used to raise on their top-k thresholds)."""
    from mergekit.merge_methods import merge_state_dicts

    method = {m.spec.name: m for m in matrix_rule_methods()}[name]
    models = [{"w": torch.zeros(shape, dtype=F64)} for _ in range(3)]
    out = merge_state_dicts(models, method, base=0, parameters={"weight": 1.0})["w"]
    assert out.shape == shape and out.dtype == F64


# ---------------------------------------------------------------- CUDA


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.cuda
@cuda
def test_cuda_random_rules_deterministic_and_rng_untouched():
    xs = [x.cuda() for x in mats(3, seed=130)]
    torch.cuda.manual_seed(1)
    expected = torch.rand(4, device="cuda")
    torch.cuda.manual_seed(1)
    a = merge_matrices(xs, "dare_ties", {"density": 0.5}, seed=5)
    assert torch.equal(torch.rand(4, device="cuda"), expected)
    assert torch.equal(a, merge_matrices(xs, "dare_ties", {"density": 0.5}, seed=5))
    assert not torch.equal(a, merge_matrices(xs, "dare_ties", {"density": 0.5}, seed=6))
    assert a.device.type == "cuda" and a.dtype == F64


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("rule", ["ties", "task_arithmetic", "iso_c", "iso_cts", "tsv", "pcb",
                                  "robustmerge"])  # fmt: skip
def test_cuda_matches_cpu(rule):
    xs = mats(3, seed=131)
    cpu = merge_matrices(xs, rule, {"density": 0.4} if rule in ("ties", "pcb") else None)
    gpu = merge_matrices([x.cuda() for x in xs], rule,
                         {"density": 0.4} if rule in ("ties", "pcb") else None)  # fmt: skip
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=0, atol=1e-10)
