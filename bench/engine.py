"""Engine speed: CtM on Llama-3-8B-shaped LoRA factors vs the authors' tensorly path.

    python bench/engine.py                      # 128 modules, T = 6, r = 16, + T sweep
    python bench/engine.py --layers 4 --no-sweep
    python bench/engine.py --workload shared --layers 32 --no-sweep --threads 1
    python bench/engine.py --workload suite --no-sweep   # the quality suite's trained LoRAs
    python bench/engine.py --device cuda        # ours on the GPU, tensorly on CPU as always

What is timed (float32 factors, 2 CPU threads unless --threads):
* ours      : ``merge_lora(method="ctm", base_rule="ties")`` once per module (128 calls), and
              one ``merge_lora_many`` call for all modules (batches of 4 equal-shape core
              problems, one worker per thread, each worker single-threaded).
* tensorly  : the way the CtM authors' code solves Problem 11 — thin SVDs of the stacked factors,
              the dense (Σr × Σr × T) core tensor, ``tensorly.decomposition.partial_tucker``
              (HOSVD init + HOOI, same tolerance semantics and value as ours), then the same
              projection, TIES merge and lift. Only the subspace solver differs.
Accuracy: the merged column spaces of both vs a tightly converged tensorly solve (tol 1e-14).
Factor generation is not timed. Workloads (``--workload``), Aₜ Gaussian / √m (LoRA's init) in
the three synthetic ones:
* structured: Bₜ = (½·S + Gₜ)/√n · diag(1/(1+i)) · normₜ, a component S shared by all tasks,
              a power-law column spectrum, task norms spread over 10×.
* shared    : Bₜ = (S + Gₜ)/√n · diag((1+i)^-½), equal task norms: the shared component and a
              mildly decaying spectrum of issue #9 (≈ 10–12 sweeps; the early HOOI updates
              have a small eigengap, which the structured factors lack).
* gaussian  : Bₜ Gaussian, task norms 0.5…5.5 (``--gaussian``): a flat spectrum, where HOOI
              converges slowest.
* suite     : the quality suite's trained PEFT LoRAs (bench/quality/suite.py, seed 0: 8 tasks,
              rank 8, q/k/v/o of a 2-layer 128-wide Llama = 8 modules), read from
              bench/quality/.cache; build them first (``python -m bench.quality.run --seeds 0``
              or ``bench.quality.suite.build``, ≈ 4 min on 2 cores). ``--layers`` repeats the 8
              modules to reach 4·layers modules (default 32 layers: 128 modules).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

from mergekit_ctm.engine import merge_lora, merge_lora_many
from mergekit_ctm.engine.linalg import canonical_signs
from mergekit_ctm.engine.pipelines import apply_rule, lift

SHAPES = {
    "q_proj": (4096, 4096),
    "k_proj": (1024, 4096),
    "v_proj": (1024, 4096),
    "o_proj": (4096, 4096),
}


WORKLOADS = ("structured", "shared", "gaussian", "suite")


def make_factors(n: int, m: int, T: int, r: int, seed: int, workload: str):
    g = torch.Generator().manual_seed(seed)
    As = [torch.randn(r, m, generator=g) / math.sqrt(m) for _ in range(T)]
    if workload == "gaussian":
        Bs = [torch.randn(n, r, generator=g) * (0.5 + t) / math.sqrt(n) for t in range(T)]
        return As, Bs, [1.0] * T
    shared = torch.randn(n, r, generator=g) / math.sqrt(n)
    if workload == "shared":
        decay = (1.0 + torch.arange(r, dtype=torch.float32)) ** -0.5
        Bs = [(shared + torch.randn(n, r, generator=g) / math.sqrt(n)) * decay for _ in range(T)]
        return As, Bs, [2.0] * T
    decay = 1.0 / (1.0 + torch.arange(r, dtype=torch.float32))
    norms = torch.logspace(-0.5, 0.5, T).tolist()
    Bs = [
        (0.5 * shared + torch.randn(n, r, generator=g) / math.sqrt(n)) * decay * norms[t]
        for t in range(T)
    ]
    return As, Bs, [2.0] * T


def suite_factors(T: int | None = None, seed: int = 0) -> list[tuple[list, list, list]]:
    """Per module (As, Bs, scalings) of the quality suite's cached LoRAs (first T tasks)."""
    import json
    import sys
    from pathlib import Path

    from safetensors.torch import load_file

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script
    from bench.quality.suite import SuiteConfig

    cfg = SuiteConfig()
    root = cfg.root() / f"seed{seed}" / "adapters"
    names = cfg.task_names()[:T]
    if not all((root / t / "adapter_model.safetensors").exists() for t in names):
        raise SystemExit(
            f"no trained suite adapters under {root}; build them first: python -c "
            "'from bench.quality.suite import SuiteConfig, build; import dataclasses; "
            "build(dataclasses.replace(SuiteConfig(), seeds=(0,)))'"
        )
    tensors, scale = [], []
    for t in names:
        conf = json.loads((root / t / "adapter_config.json").read_text())
        assert not conf.get("rank_pattern") and not conf.get("alpha_pattern")
        r = conf["r"]
        scale.append(conf["lora_alpha"] / (math.sqrt(r) if conf.get("use_rslora") else r))
        tensors.append(load_file(str(root / t / "adapter_model.safetensors")))
    keys = sorted(k[: -len(".lora_A.weight")] for k in tensors[0] if k.endswith(".lora_A.weight"))
    return [
        (
            [d[k + ".lora_A.weight"].float() for d in tensors],
            [d[k + ".lora_B.weight"].float() for d in tensors],
            list(scale),
        )
        for k in keys
    ]


def model_factors(layers: int, T: int, r: int, workload: str) -> list:
    """The benchmark's modules: 4 Llama-3-8B-shaped projections per layer, or the suite's."""
    if workload == "suite":
        mods = suite_factors(T)
        return [mods[i % len(mods)] for i in range(4 * layers)]
    return [
        make_factors(*SHAPES[name], T, r, seed=li * 10 + k, workload=workload)
        for li in range(layers)
        for k, name in enumerate(SHAPES)
    ]


def chordal(B1: torch.Tensor, B2: torch.Tensor) -> float:
    """Chordal distance between the column spaces of two merged B factors (float64)."""
    Q1 = torch.linalg.qr(B1.double()).Q
    Q2 = torch.linalg.qr(B2.double()).Q
    return float(torch.linalg.norm(Q1 @ Q1.T - Q2 @ Q2.T)) / math.sqrt(2)


def tensorly_ctm(As, Bs, s, r: int, beta: float, rule_params: dict, tol: float, iters: int):
    """CtM with the authors' solver: dense core tensor + tensorly partial_tucker."""
    import tensorly as tl
    from tensorly.decomposition import partial_tucker

    tl.set_backend("pytorch")
    B_cat = torch.cat([si * B for B, si in zip(Bs, s)], dim=1)
    A_cat = torch.cat(As, dim=0)
    U_B = torch.linalg.svd(B_cat, full_matrices=False).U
    V_A = torch.linalg.svd(A_cat, full_matrices=False).Vh.T
    M = torch.stack([(U_B.T @ (si * B)) @ (A @ V_A) for A, B, si in zip(As, Bs, s)]).double()
    norms = torch.linalg.matrix_norm(M)
    c = (beta * norms + (1 - beta) * norms.mean()) / norms
    X = (c.view(-1, 1, 1) * M).permute(1, 2, 0).contiguous()
    (_, (Uc, Vc)), _ = partial_tucker(X, rank=[r, r], modes=[0, 1], n_iter_max=iters, tol=tol)
    U, V = U_B @ Uc.float(), V_A @ Vc.float()
    su, sv = canonical_signs(U), canonical_signs(V)
    U, V, Uc, Vc = U * su, V * sv, Uc * su.double(), Vc * sv.double()
    O = Uc.T @ M @ Vc
    merged = apply_rule(O, "ties", rule_params, None)
    return lift(U, merged, V, r, 1.0, torch.float32, r, {})


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _to(f, device: str):
    As, Bs, s = f
    return [a.to(device) for a in As], [b.to(device) for b in Bs], s


def run_model(
    layers: int,
    T: int,
    r: int,
    workload: str,
    tol: float,
    iters: int,
    device: str = "cpu",
    reference: bool = True,
) -> dict:
    params = dict(
        rank=r,
        beta=0.5,
        base_rule="ties",
        rule_params={"density": 0.5},
        hooi_tol=tol,
        hooi_iters=iters,
    )
    rule = {"density": 0.5}
    synth = "structured" if workload == "suite" else workload
    warm = make_factors(64, 48, T or 8, r, seed=99, workload=synth)  # imports, LAPACK init
    merge_lora(*_to(warm, device), method="ctm", **params)
    merge_lora_many([_to(warm, device)] * 2, method="ctm", **params)
    tensorly_ctm(*warm, r, 0.5, rule, tol, iters)
    factors = model_factors(layers, T, r, workload)
    dev = [_to(f, device) for f in factors]
    _sync(device)
    t0 = time.perf_counter()
    outs = [merge_lora(*f, method="ctm", **params) for f in dev]
    _sync(device)
    t1 = time.perf_counter()
    merge_lora_many(dev, method="ctm", **params)
    _sync(device)
    t2 = time.perf_counter()
    refs = [tensorly_ctm(*f, r, 0.5, rule, tol, iters) for f in factors]
    t3 = time.perf_counter()
    res = {
        "modules": len(factors),
        "ours": t1 - t0,
        "ours_many": t2 - t1,
        "tensorly": t3 - t2,
        "sweeps": [o.info["hooi_sweeps"] for o in outs],
        "diffs": [
            float((o.delta().cpu() - ref.delta()).norm() / ref.delta().norm())
            for o, ref in zip(outs, refs)
        ],
        "dists": [chordal(o.B.cpu(), ref.B) for o, ref in zip(outs, refs)],
    }
    if reference:  # both solvers vs an independent, tightly converged solution
        tight = [tensorly_ctm(*f, r, 0.5, rule, 1e-14, 100_000) for f in factors]
        res["ours_to_opt"] = [chordal(o.B.cpu(), t.B) for o, t in zip(outs, tight)]
        res["tl_to_opt"] = [chordal(ref.B, t.B) for ref, t in zip(refs, tight)]
    return res


def sweep_T(
    Ts: list[int], r: int, n: int, workload: str, tol: float, iters: int, device: str = "cpu"
):
    """Total ctm time per T, and the time of one HOOI sweep alone (solve minus HOSVD)."""
    from mergekit_ctm.engine import build_core_space, tucker2

    rows = []
    for T in Ts:
        f = _to(make_factors(n, n, T, r, seed=T, workload=workload), device)
        merge_lora(*f, method="ctm", rank=r, hooi_tol=tol, hooi_iters=iters)  # warm-up
        times, out = [], None
        for _ in range(3 if T <= 64 else 1):
            _sync(device)
            t0 = time.perf_counter()
            out = merge_lora(*f, method="ctm", rank=r, hooi_tol=tol, hooi_iters=iters)
            _sync(device)
            times.append(time.perf_counter() - t0)
        Pp, Qp = build_core_space(*f, torch.float64).padded()
        _sync(device)
        t0 = time.perf_counter()
        tucker2(Pp, Qp, r, iters=0)
        _sync(device)
        t1 = time.perf_counter()
        sol = tucker2(Pp, Qp, r, iters=iters, tol=tol)
        _sync(device)
        t2 = time.perf_counter()
        per_sweep = max(t2 - t1 - (t1 - t0), 1e-9) / max(sol.sweeps, 1)
        rows.append((T, min(times), per_sweep))
        print(
            f"  T={T:4d}  total {min(times) * 1e3:9.1f} ms  sweeps={out.info['hooi_sweeps']:3d}"
            f"  one HOOI sweep {per_sweep * 1e3:8.2f} ms",
            flush=True,
        )
    xs = [math.log(T) for T, _, _ in rows]
    k = len(xs) // 2  # slope over the upper half, where the asymptotic term dominates
    slope = statistics.linear_regression(xs[k:], [math.log(t) for _, t, _ in rows][k:]).slope
    slope_sweep = statistics.linear_regression(xs[k:], [math.log(s) for _, _, s in rows][k:]).slope
    return rows, slope, slope_sweep


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--T", type=int, default=6)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--tol", type=float, default=1e-10)
    ap.add_argument("--iters", type=int, default=500)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workload", choices=WORKLOADS, default="structured")
    ap.add_argument("--gaussian", action="store_true", help="same as --workload gaussian")
    ap.add_argument("--device", default="cpu", help="device of our engine (tensorly: CPU)")
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--no-reference", action="store_true", help="skip the converged reference")
    ap.add_argument("--sweep-n", type=int, default=4096)
    ap.add_argument("--sweep-max", type=int, default=256)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    kind = "gaussian" if a.gaussian else a.workload
    T = None if kind == "suite" and a.T == 6 else a.T  # suite: every task unless --T says
    print(
        f"# ctm, {a.layers} layers x 4 modules, T={T or 'all'}, r={a.rank}, float32, {kind} "
        f"factors, tol={a.tol}, {a.threads} threads, ours on {a.device}"
    )
    res = run_model(a.layers, T, a.rank, kind, a.tol, a.iters, a.device, not a.no_reference)
    sw, n = res["sweeps"], res["modules"]
    print(f"ours, merge_lora per module : {res['ours']:8.3f} s for {n} modules")
    print(f"ours, merge_lora_many (all) : {res['ours_many']:8.3f} s")
    print(f"tensorly partial_tucker     : {res['tensorly']:8.3f} s")
    print(
        f"speed-up vs tensorly        : {res['tensorly'] / res['ours']:8.1f}x (per module), "
        f"{res['tensorly'] / res['ours_many']:.1f}x (merge_lora_many)"
    )
    print(f"HOOI sweeps                 : median {statistics.median(sw)}, max {max(sw)}")
    print(
        f"ours vs tensorly: chordal distance of the merged column spaces median "
        f"{statistics.median(res['dists']):.1e}, max {max(res['dists']):.1e}; relative ΔW "
        f"difference median {statistics.median(res['diffs']):.1e}, max {max(res['diffs']):.1e}"
    )
    if "ours_to_opt" in res:
        print(
            "distance to the converged optimum (tensorly, tol 1e-14), median / max: "
            f"ours {statistics.median(res['ours_to_opt']):.1e} / {max(res['ours_to_opt']):.1e}, "
            f"tensorly {statistics.median(res['tl_to_opt']):.1e} / {max(res['tl_to_opt']):.1e}"
        )
    if not a.no_sweep:
        Ts = [T for T in (2, 4, 8, 16, 32, 64, 128, 256) if T <= a.sweep_max]
        print(f"# one {a.sweep_n}x{a.sweep_n} module, r={a.rank}, T sweep")
        synth = "structured" if kind == "suite" else kind
        _, slope, slope_sweep = sweep_T(Ts, a.rank, a.sweep_n, synth, a.tol, a.iters, a.device)
        print(f"growth exponent of total time in T (upper half): {slope:.2f}")
        print(f"growth exponent of one HOOI sweep in T (upper half): {slope_sweep:.2f}")


if __name__ == "__main__":
    main()
