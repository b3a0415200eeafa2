"""Every pipeline × rule against an independent dense float64 reference.

The references are written from the equations (dense ΔW, textbook SVDs and HOOI, and
rule formulas re-derived here), sharing no code with the engine beyond the documented basis
convention: eigenvectors of the problem, canonical signs (largest |entry| positive).
"""

from __future__ import annotations

import math
from concurrent.futures import CancelledError

import pytest
import torch

from mergekit_ctm.engine import merge_lora, merge_lora_many

from .conftest import dense_updates, lora_factors
from .test_core_and_tucker import _dense_hooi


def canon(X: torch.Tensor) -> torch.Tensor:
    piv = X.gather(0, X.abs().argmax(0, keepdim=True))
    return X * torch.where(piv < 0, -1.0, 1.0)


def ref_rule(ts: torch.Tensor, rule: str, p: dict, rank: int | None = None) -> torch.Tensor:
    """Merge rules from their equations (mergekit semantics), float64."""
    T = ts.shape[0]
    w = torch.as_tensor(p.get("weight", 1.0), dtype=torch.float64).expand(T)
    if rule == "task_arithmetic":
        out = (w.view(-1, *[1] * (ts.ndim - 1)) * ts).sum(0)
        return out / w.sum() if p.get("normalize", False) else out
    if rule == "ties":
        dens = torch.as_tensor(p.get("density", 1.0), dtype=torch.float64).expand(T)
        trimmed = []
        for t in range(T):
            x = ts[t].flatten()
            k = max(1, int(float(dens[t]) * x.numel())) if dens[t] < 1 else x.numel()
            keep = torch.zeros_like(x)
            keep[x.abs().argsort(descending=True)[:k]] = 1
            trimmed.append((x * keep * w[t]).view_as(ts[t]))
        d = torch.stack(trimmed)
        elected = torch.where(d.sum(0) >= 0, 1.0, -1.0)
        mask = (d.sign() == elected).to(d.dtype)
        num = (d * mask).sum(0)
        den = (w.view(-1, *[1] * (ts.ndim - 1)) * mask).sum(0)
        den[den == 0] = 1
        return num / den if p.get("normalize", True) else num
    if rule == "iso_c":  # mean of the nonzero singular values (LoRA sums are rank-deficient)
        U, S, Vh = torch.linalg.svd(ts.sum(0), full_matrices=False)
        k = int((S > S[0] * 1e-10).sum())
        k = k if rank is None else min(k, rank)  # truncate the sum first, then whiten
        return S[:k].mean() * U[:, :k] @ Vh[:k]
    raise NotImplementedError(rule)


def truncate(X: torch.Tensor, r: int | None) -> torch.Tensor:
    U, S, Vh = torch.linalg.svd(X, full_matrices=False)
    r = S.numel() if r is None else r
    return U[:, :r] @ torch.diag(S[:r]) @ Vh[:r]


def ref_ctm(As, Bs, s, r, beta, rule, p, lam=1.0):
    dW = dense_updates(As, Bs, s)
    norms = torch.linalg.matrix_norm(dW)
    c = (beta * norms + (1 - beta) * norms.mean()) / norms
    # only Σ rₜ directions exist: the subspaces cannot be larger than that
    U, V, _ = _dense_hooi(c.view(-1, 1, 1) * dW, min(r, *dW.shape[1:], sum(a.shape[0] for a in As)))
    X = c.view(-1, 1, 1) * dW  # rotate to the eigenvectors of the converged problem
    GU = sum(x @ V @ V.T @ x.T for x in X)
    GV = sum(x.T @ U @ U.T @ x for x in X)
    U = U @ torch.linalg.eigh(U.T @ GU @ U).eigenvectors.flip(-1)
    V = V @ torch.linalg.eigh(V.T @ GV @ V).eigenvectors.flip(-1)
    U, V = canon(U), canon(V)
    O = U.T @ dW @ V
    return lam * U @ ref_rule(O, rule, p) @ V.T


def ref_core_space(As, Bs, s, r, rule, p, lam=1.0):
    dW = dense_updates(As, Bs, s)
    B_cat = torch.cat([si * B for B, si in zip(Bs, s)], dim=1)
    U = canon(torch.linalg.svd(B_cat, full_matrices=False).U)
    V = canon(torch.linalg.svd(torch.cat(As, 0), full_matrices=False).Vh.T)
    return truncate(lam * U @ ref_rule(U.T @ dW @ V, rule, p, r) @ V.T, r)


def ref_mtc_full(As, Bs, s, r, rule, p, lam=1.0):
    return truncate(lam * ref_rule(dense_updates(As, Bs, s), rule, p, r), r)


def ref_knots(As, Bs, s, r, rule, p, lam=1.0):
    dW = dense_updates(As, Bs, s)
    T, n, m = dW.shape
    U, S, Vh = torch.linalg.svd(torch.cat(list(dW), dim=1), full_matrices=False)
    k = int((S > S[0] * 1e-10).sum())
    U, S, Vh = U[:, :k], S[:k], Vh[:k]
    sign = torch.where(U.gather(0, U.abs().argmax(0, keepdim=True)) < 0, -1.0, 1.0)
    U, Vh = U * sign, Vh * sign.T
    Vt = torch.stack([Vh[:, t * m : (t + 1) * m].T for t in range(T)])
    return truncate(lam * U @ torch.diag(S) @ ref_rule(Vt, rule, p).T, r)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.norm(a.double() - b) / torch.linalg.norm(b))


def check(out, ref: torch.Tensor, rule: str, truncated: bool, tol: float) -> None:
    assert rel(out.delta(), ref) < tol
    if rule == "iso_c" and truncated:  # whitened after truncation: a flat spectrum of rank r
        S = torch.linalg.svdvals(out.delta().double())[: out.rank]
        assert torch.allclose(S, S[0].expand_as(S), rtol=1e-9)


RULES = [
    ("task_arithmetic", {}),
    ("task_arithmetic", {"weight": [1.0, 0.5, 2.0, 0.7, 1.3, 0.9] * 3, "normalize": True}),
    ("ties", {"density": 0.5}),
    ("ties", {"density": [0.3, 0.6, 0.9, 0.5, 0.4, 0.8] * 3, "weight": 0.8}),
    ("iso_c", {}),
]
CASES = [(1, 4), (2, 4), (2, [2, 5]), (6, [3, 4, 2, 4, 3, 1]), (16, 2)]


def _params(p: dict, T: int) -> dict:
    return {k: (v[:T] if isinstance(v, list) else v) for k, v in p.items()}


@pytest.mark.parametrize("T,ranks", CASES)
@pytest.mark.parametrize("rule,p", RULES)
def test_ctm_matches_reference(T, ranks, rule, p):
    As, Bs, s = lora_factors(T, n=48, m=40, ranks=ranks, seed=T)
    p = _params(p, T)
    out = merge_lora(
        As,
        Bs,
        s,
        method="ctm",
        rank=5,
        beta=0.25,
        base_rule=rule,
        rule_params=p,
        hooi_iters=5000,
        hooi_tol=1e-15,
        lam=1.3,
        dtype=torch.float64,
    )
    ref = ref_ctm(As, Bs, s, 5, 0.25, rule, p, lam=1.3)
    assert out.rank <= 5 and torch.linalg.matrix_rank(out.delta()) <= 5
    assert rel(out.delta(), ref) < 1e-6


@pytest.mark.parametrize("T,ranks", CASES)
@pytest.mark.parametrize("rule,p", RULES)
@pytest.mark.parametrize("rank", [None, 3])
def test_core_space_matches_reference(T, ranks, rule, p, rank):
    As, Bs, s = lora_factors(T, n=48, m=40, ranks=ranks, seed=T)
    p = _params(p, T)
    out = merge_lora(
        As,
        Bs,
        s,
        method="core_space",
        rank=rank,
        base_rule=rule,
        rule_params=p,
        lam=0.7,
        dtype=torch.float64,
    )
    ref = ref_core_space(As, Bs, s, rank, rule, p, lam=0.7)
    check(out, ref, rule, rank is not None, 1e-9)
    if rank is None and rule == "task_arithmetic" and not p:  # lossless: exactly Σ ΔWₜ
        assert rel(out.delta(), dense_updates(As, Bs, s).sum(0) * 0.7) < 1e-10


@pytest.mark.parametrize("T,ranks", CASES)
@pytest.mark.parametrize("rule,p", RULES)
@pytest.mark.parametrize("space", ["full", "knots", "core"])
def test_mtc_matches_reference(T, ranks, rule, p, space):
    As, Bs, s = lora_factors(T, n=48, m=40, ranks=ranks, seed=T)
    p = _params(p, T)
    out = merge_lora(
        As,
        Bs,
        s,
        method="mtc",
        space=space,
        rank=4,
        base_rule=rule,
        rule_params=p,
        dtype=torch.float64,
    )
    refs = {"full": ref_mtc_full, "knots": ref_knots, "core": ref_core_space}
    ref = refs[space](As, Bs, s, 4, rule, p)
    assert out.rank <= 4
    check(out, ref, rule, space != "knots", 1e-8)  # knots: Σ breaks the flat spectrum


@pytest.mark.parametrize("ranks", [[4], [3, 2, 5]])
def test_single_adapter_reproduced_exactly(ranks):
    """T = 1 (or summing): CtM with rank ≥ r₁ returns the adapter itself."""
    As, Bs, s = lora_factors(1, ranks=ranks[:1])
    for method in ("ctm", "core_space", "mtc", "lora_lego"):
        out = merge_lora(As, Bs, s, method=method, rank=6, dtype=torch.float64)
        assert rel(out.delta(), dense_updates(As, Bs, s)[0]) < 1e-10, method
        assert (
            out.rank == ranks[0] and out.rank_deficient and "nonzero directions" in out.info["note"]
        )


def test_lora_lego_properties():
    As, Bs, s = lora_factors(3, ranks=[2, 3, 2])
    dW = dense_updates(As, Bs, s)
    full = merge_lora(As, Bs, s, method="lora_lego", rank=7, dtype=torch.float64)
    assert rel(full.delta(), dW.sum(0)) < 1e-10  # one unit per cluster = concatenation = sum
    small = merge_lora(As, Bs, s, method="lora_lego", rank=3, seed=4, dtype=torch.float64)
    assert small.rank <= 3 and sum(small.info["cluster_sizes"]) == 7
    again = merge_lora(As, Bs, s, method="lora_lego", rank=3, seed=4, dtype=torch.float64)
    assert torch.equal(small.A, again.A) and torch.equal(small.B, again.B)
    # two copies of one adapter cluster pairwise: centroid = unit, weight 2 = sum
    dup = merge_lora(
        As[:1] * 2, Bs[:1] * 2, s[:1] * 2, method="lora_lego", rank=2, dtype=torch.float64
    )
    assert rel(dup.delta(), 2 * dW[0]) < 1e-10


@pytest.mark.parametrize("space", ["full", "core"])
@pytest.mark.parametrize("rule", ["iso_c", "iso_cts"])
def test_flat_spectrum_rules_scale_linearly_with_lambda(space, rule):
    """Regression: truncating Iso-C's flat spectrum picked an arbitrary subspace, so λ changed
    the direction of the merged update (cosine 0.5–0.7 between λ = 1 and 0.1)."""
    As, Bs, s = lora_factors(4, ranks=4)
    kw = dict(method="mtc", space=space, rank=6, base_rule=rule, dtype=torch.float64)
    one = merge_lora(As, Bs, s, lam=1.0, **kw)
    tenth = merge_lora(As, Bs, s, lam=0.1, **kw)
    assert one.rank <= 6
    assert rel(tenth.delta(), 0.1 * one.delta().double()) < 1e-9


def test_outputs_are_balanced_and_lambda_scales():
    As, Bs, s = lora_factors(4, ranks=4)
    one = merge_lora(As, Bs, s, method="ctm", rank=5, dtype=torch.float64)
    two = merge_lora(As, Bs, s, method="ctm", rank=5, lam=2.0, dtype=torch.float64)
    assert rel(two.delta(), 2 * one.delta()) < 1e-12
    # balanced: BᵀB = A Aᵀ = Σ (diagonal)
    BtB, AAt = one.B.T @ one.B, one.A @ one.A.T
    assert torch.allclose(BtB, AAt, atol=1e-10)
    assert torch.allclose(BtB, torch.diag(torch.diagonal(BtB)), atol=1e-10)


@pytest.mark.parametrize("method", ["ctm", "core_space", "mtc"])
def test_float32_and_float64_agree(method):
    As, Bs, s = lora_factors(6, n=64, m=48, ranks=4, norms=[0.2, 1, 3, 0.5, 2, 8])
    kw = dict(method=method, rank=8, base_rule="ties", rule_params={"density": 0.5}, hooi_tol=1e-12)
    o64 = merge_lora(As, Bs, s, dtype=torch.float64, **kw)
    o32 = merge_lora([a.float() for a in As], [b.float() for b in Bs], s, dtype=torch.float32, **kw)
    assert o32.A.dtype == torch.float32
    assert rel(o32.delta(), o64.delta().double()) < 1e-4


@pytest.mark.parametrize("rule", ["dare_ties", "dare_linear", "della"])
def test_random_rules_are_seeded(rule):
    As, Bs, s = lora_factors(4, ranks=4)
    kw = dict(method="ctm", rank=6, base_rule=rule, rule_params={"density": 0.5})
    a = merge_lora(As, Bs, s, seed=7, **kw)
    b = merge_lora(As, Bs, s, seed=7, **kw)
    c = merge_lora(As, Bs, s, seed=8, **kw)
    assert torch.equal(a.A, b.A) and torch.equal(a.B, b.B)
    assert not torch.equal(a.delta(), c.delta())


def test_dare_at_full_density_is_task_arithmetic():
    As, Bs, s = lora_factors(3, ranks=3)
    kw = dict(method="core_space", rank=None, dtype=torch.float64)
    dare = merge_lora(As, Bs, s, base_rule="dare_linear", rule_params={"density": 1.0}, **kw)
    ta = merge_lora(As, Bs, s, base_rule="task_arithmetic", **kw)
    assert rel(dare.delta(), ta.delta().double()) < 1e-12


def test_bf16_inputs_and_many_modules():
    As, Bs, s = lora_factors(3, ranks=4)
    As16, Bs16 = [a.bfloat16() for a in As], [b.bfloat16() for b in Bs]
    out = merge_lora(As16, Bs16, s, method="ctm", rank=4)
    assert out.A.dtype == torch.float32 and torch.isfinite(out.delta()).all()
    mods = [lora_factors(3, ranks=4, seed=k) for k in range(3)] + [lora_factors(2, ranks=[2, 3])]
    many = merge_lora_many(mods, method="ctm", rank=4, dtype=torch.float64, seeds=[1, 2, 3, 4])
    for (A_, B_, s_), o in zip(mods, many):
        single = merge_lora(A_, B_, s_, method="ctm", rank=4, dtype=torch.float64)
        assert rel(o.delta(), single.delta().double()) < 1e-9


@pytest.mark.parametrize("method", ["ctm", "mtc"])
def test_merge_lora_many_workers_do_not_change_the_result(method):
    """Threads give the same bits, DARE's seeded draws included (mergekit draws from the
    process-wide generator: unguarded, concurrent workers reseeded each other's masks)."""
    mods = [lora_factors(4, ranks=[3, 4, 2, 4], seed=k) for k in range(12)]
    kw = dict(method=method, rank=4, base_rule="dare_ties", rule_params={"density": 0.6})
    seeds = list(range(12))
    threads = torch.get_num_threads()
    two = merge_lora_many(mods, seeds=seeds, workers=2, **kw)
    try:
        for n, workers in ((threads, 3), (threads, 3), (2, 1), (1, 1), (2, 3)):
            torch.set_num_threads(n)
            other = merge_lora_many(mods, seeds=seeds, workers=workers, **kw)
            assert torch.get_num_threads() == n  # restored after the worker pool
            for a, b in zip(two, other):  # one thread per module, also with one worker
                assert torch.equal(a.A, b.A) and torch.equal(a.B, b.B), (n, workers)
    finally:
        torch.set_num_threads(threads)
    for a, (A_, B_, s_), seed in zip(two, mods, seeds):
        single = merge_lora(A_, B_, s_, seed=seed, **kw)  # GEMMs on all threads: rounding
        assert rel(a.delta(), single.delta()) < 1e-5
    with pytest.raises(ValueError, match="seeds"):
        merge_lora_many(mods, seeds=[1, 2], **kw)


@pytest.mark.parametrize("method", ["ctm", "mtc"])
def test_merge_lora_many_reads_sources_on_its_workers(method):
    """A module given as a callable is read by the worker that solves it, chunk by chunk:
    the same bytes as the triples themselves, for any worker count; a source's error
    reaches the caller unchanged, and bad factors from a source are refused as triples are."""
    import threading

    mods = [lora_factors(3, ranks=[3, 4, 2], seed=k) for k in range(10)]
    kw = dict(method=method, rank=4, base_rule="dare_ties", rule_params={"density": 0.6})
    seeds = list(range(10))
    direct = merge_lora_many(mods, seeds=seeds, workers=2, **kw)
    for workers in (1, 2, 3):
        threads: dict[int, str] = {}

        def source(k: int, seen: dict[int, str] = threads):
            def read():
                seen[k] = threading.current_thread().name
                return mods[k]

            return read

        got = merge_lora_many([source(k) for k in range(10)], seeds=seeds, workers=workers, **kw)
        assert sorted(threads) == list(range(10))
        if workers > 1:  # read on the pool's threads, not ahead on the caller's
            assert threading.current_thread().name not in threads.values()
        for a, b in zip(direct, got):
            assert torch.equal(a.A, b.A) and torch.equal(a.B, b.B), workers

    def broken():
        raise OSError("adapter 3: short read")

    with pytest.raises(OSError, match="adapter 3: short read"):
        merge_lora_many([lambda: mods[0], broken], seeds=[0, 1], workers=2, **kw)
    As, Bs, s = mods[0]
    with pytest.raises(ValueError, match="adapter 1"):
        merge_lora_many([lambda: (As, [Bs[0], Bs[1][:-1], Bs[2]], s)], **kw)


def test_submitted_merges_queue_on_one_pool_and_cancel_what_has_not_started(monkeypatch):
    """submit_lora_many returns at once; calls queued one after another on one pool give the
    bytes of merge_lora_many; cancel() drops the chunks no worker has started."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from mergekit_ctm.engine.api import submit_lora_many

    mods = [lora_factors(3, ranks=[3, 4, 2], seed=k) for k in range(8)]
    kw = dict(method="ctm", rank=4, base_rule="dare_ties", rule_params={"density": 0.6})
    want = merge_lora_many(mods, seeds=list(range(8)), workers=2, **kw)
    with ThreadPoolExecutor(2) as pool:
        first = submit_lora_many(pool, mods[:5], seeds=list(range(5)), workers=2, **kw)
        second = submit_lora_many(pool, mods[5:], seeds=list(range(5, 8)), workers=2, **kw)
        for a, b in zip(want, first.result() + second.result()):
            assert torch.equal(a.A, b.A) and torch.equal(a.B, b.B)

    gate, read = threading.Event(), []

    def source(k: int, seen: list = read):
        def get():
            seen.append(k)
            if k == 0:
                assert gate.wait(10)
            return mods[k]

        return get

    import mergekit_ctm.engine.api as api

    monkeypatch.setattr(api, "MAX_CHUNK", 4)
    with ThreadPoolExecutor(1) as pool:  # chunks [0..3], [4..7]
        pending = submit_lora_many(pool, [source(k) for k in range(8)], workers=1, **kw)
        pending.cancel()  # the first chunk is running (blocked at module 0), the second waits
        gate.set()
        with pytest.raises(CancelledError):
            pending.result()
    assert read == [0, 1, 2, 3]


def test_bad_inputs_raise_clear_errors():
    As, Bs, s = lora_factors(2, ranks=3)
    with pytest.raises(ValueError, match="adapter 1"):
        merge_lora(As, [Bs[0], Bs[1][:-1]], s)
    with pytest.raises(ValueError, match="beta"):
        merge_lora(As, Bs, s, beta=1.5)
    with pytest.raises(ValueError, match="rank"):
        merge_lora(As, Bs, s, rank=0)
    with pytest.raises(ValueError, match="unknown method"):
        merge_lora(As, Bs, s, method="nope")
    with pytest.raises(ValueError, match="only core_space"):
        merge_lora(As, Bs, s, method="ctm", rank=None)
    with pytest.raises(ValueError, match="task_arithmetic"):  # unknown rule lists valid ones
        merge_lora(As, Bs, s, base_rule="tiez")


@pytest.mark.parametrize(
    "method,kw",
    [
        ("ctm", {}),
        ("core_space", {"rank": None}),
        ("mtc", {"space": "full"}),
        ("mtc", {"space": "knots"}),
        ("mtc", {"space": "core"}),
        ("lora_lego", {}),
    ],
)
def test_all_zero_updates_merge_to_rank_zero(method, kw):
    """PEFT initialises lora_B to zero: untrained adapters have ΔW = 0 exactly."""
    As, Bs, s = lora_factors(3, ranks=[4, 2, 3])
    Bs = [torch.zeros_like(B) for B in Bs]
    out = merge_lora(As, Bs, s, method=method, **({"rank": 4} | kw))
    assert out.rank == 0 and out.A.shape == (0, 32) and out.B.shape == (40, 0)
    assert "zero" in out.info["note"] and not out.delta().any()


def test_cancelling_updates_merge_to_rank_zero():
    """Task negation of an identical adapter: the merged coordinates are zero, rank 0."""
    As, Bs, s = lora_factors(1, ranks=4)
    kw = dict(base_rule="task_arithmetic", rule_params={"weight": [1.0, -1.0]}, rank=4)
    for method in ("ctm", "mtc"):
        out = merge_lora(As * 2, Bs * 2, s * 2, method=method, dtype=torch.float64, **kw)
        assert out.rank == 0 and "only 0 nonzero directions" in out.info["note"]
    mods = [(As * 2, [torch.zeros_like(Bs[0])] * 2, s * 2), lora_factors(2, ranks=3)]
    zero, live = merge_lora_many(mods, method="ctm", rank=3)
    assert zero.rank == 0 and live.rank == 3


def test_zero_update_does_not_break_reweighting():
    As, Bs, s = lora_factors(3, ranks=3)
    Bs[1] = torch.zeros_like(Bs[1])
    out = merge_lora(As, Bs, s, method="ctm", rank=4, beta=0.0, dtype=torch.float64)
    assert math.isfinite(float(out.delta().norm())) and out.info["task_weights"][1] == 0.0
