"""Full fine-tuned checkpoints through the stock ``mergekit-yaml``: speed, memory, correctness.

    python bench/full_checkpoints.py                  # speed (1 layer) + memory (4 vs 8 layers)
    python bench/full_checkpoints.py --quick          # speed (1 layer, ctm only) + memory (2 vs 4)
    python bench/full_checkpoints.py --layers 2 --methods ctm core_space mtc
    python bench/full_checkpoints.py --skip-memory    # or --skip-speed
    python bench/full_checkpoints.py --workdir /tmp/fc --keep   # keep the checkpoints

Checkpoints (written tensor by tensor as sharded safetensors, one shard per layer, with
``config.json`` and ``model.safetensors.index.json``; no model is ever materialized): a base
and T = 3 full "fine-tunes" of a Llama-3-8B-shaped stack with few layers (hidden 4096,
intermediate 14336, 32 heads / 8 KV heads, so q/o 4096², k/v 1024 × 4096, gate/up 14336 × 4096,
down 4096 × 14336; vocabulary 1024 to keep embeddings cheap). float32 on disk by default
(``--dtype bfloat16`` halves the files; see the correctness check). Base weights are
N(0, 0.02²). Each task's ΔW of a 2-D projection is ``bench.compress.realistic_delta`` (a few
dominant directions, power-law decay σᵢ ∝ i^-0.75 over rank min(n, m) / 16, a noise bulk below),
scaled to ‖ΔW‖_F = 0.02 ‖W_base‖_F, independent bases per task; norms, embeddings and
``lm_head`` get a small dense Gaussian delta.

Speed, all in the same run, measured the way a user runs it: the ``mergekit-yaml`` console
script in a subprocess, default options (``--lazy-unpickle`` off, no ``--cuda``, default
threads) plus ``--quiet``; wall time and children's CPU time; interpreter and import start-up
separately (``mergekit-yaml --help``). (a) stock ``ties`` (density 0.5, weight 1), (b) ``ctm``
with ``base_rule: ties`` (same per-model density and weight), rank 16, task_rank 16, and
optionally ``core_space`` / ``mtc`` (base rule ties, rank 16, task_rank 16). Then our kernel
per tensor, in process: ``merge_full_tensor`` (what mergekit's planner calls) on each of layer
0's seven projections, and ``compress_delta`` alone (×T) on q_proj and gate_proj. The 32-layer
figure is an extrapolation: per-layer time × 32.

Memory: a narrower stack (hidden 1024, intermediate 3584, 8 / 2 heads) with L and 2L layers,
merged with ``ctm`` (same parameters) through mergekit's ``run_merge`` in a fresh child
process that records VmHWM after importing torch, mergekit and mergekit_ctm (baseline) and
after the merge, and samples RssAnon / RssFile every 10 ms (file-backed pages of the
memory-mapped safetensors inputs count in RSS too). Target: the 2L merge's peak above
baseline within 1.3× of the L merge's.

Correctness (after the ctm merge of the speed run): the output loads with
``LlamaForCausalLM.from_pretrained`` and a forward pass is finite; for every 2-D projection,
D = W_out − W_base (float64) has numerical rank ≤ 16: with U the top-16 left singular vectors
(``torch.svd_lowrank``), the residual R = D − U Uᵀ D satisfies σ₁(R) ≤ 1e-3 σ₁(D) (we also print
‖R‖_F / σ₁(D), a rigorous upper bound on σ₁₇ / σ₁). Embeddings and ``lm_head`` are merged
densely by design (docs/architecture.md, "Full checkpoints") and are not rank-checked.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.compress import realistic_delta  # noqa: E402
from bench.rss import CHILD_PRELUDE  # noqa: E402

N_TASKS = 3
REL_DELTA = 0.02  # ‖ΔW‖_F / ‖W_base‖_F of a projection
PROJ = (
    ("self_attn.q_proj", "q"),
    ("self_attn.k_proj", "kv"),
    ("self_attn.v_proj", "kv"),
    ("self_attn.o_proj", "o"),
    ("mlp.gate_proj", "up"),
    ("mlp.up_proj", "up"),
    ("mlp.down_proj", "down"),
)
CTM = {"base_rule": "ties", "rank": 16, "task_rank": 16}
PER_MODEL = {"weight": 1.0, "density": 0.5}


@dataclass
class Shape:
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    layers: int

    def proj_shape(self, kind: str) -> tuple[int, int]:
        kv = self.hidden // self.heads * self.kv_heads
        return {
            "q": (self.hidden, self.hidden),
            "o": (self.hidden, self.hidden),
            "kv": (kv, self.hidden),
            "up": (self.intermediate, self.hidden),
            "down": (self.hidden, self.intermediate),
        }[kind]

    def config(self, dtype: str):
        from transformers import LlamaConfig

        return LlamaConfig(
            hidden_size=self.hidden,
            intermediate_size=self.intermediate,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads,
            vocab_size=self.vocab,
            max_position_embeddings=256,
            tie_word_embeddings=False,
            architectures=["LlamaForCausalLM"],
            dtype=dtype,
        )


# ---------------------------------------------------------------------------------------------
# Checkpoints, tensor by tensor


def make_checkpoints(root: str, shape: Shape, dtype: torch.dtype, log=print) -> list[str]:
    """Write base + N_TASKS fine-tunes under root; one shard per layer (+ one for the rest).

    Each shard is generated for all T + 1 models, written and dropped before the next, so
    memory stays at one layer's tensors (about 0.9 GB per model per 8B-shaped layer, fp32)."""
    from safetensors.torch import save_file

    names = ["base"] + [f"task{t}" for t in range(N_TASKS)]
    paths = [os.path.join(root, n) for n in names]
    cfg = shape.config(str(dtype).removeprefix("torch."))
    for p in paths:
        os.makedirs(p, exist_ok=True)
        cfg.save_pretrained(p)
    weight_maps: list[dict[str, str]] = [{} for _ in paths]
    totals = [0] * len(paths)
    n_shards = shape.layers + 1

    def flush(idx: int, per_model: list[dict[str, torch.Tensor]]) -> None:
        fname = f"model-{idx + 1:05d}-of-{n_shards:05d}.safetensors"
        for j, (p, tensors) in enumerate(zip(paths, per_model, strict=True)):
            save_file({k: v.to(dtype) for k, v in tensors.items()}, os.path.join(p, fname),
                      metadata={"format": "pt"})  # fmt: skip
            for k, v in tensors.items():
                weight_maps[j][k] = fname
                totals[j] += v.numel() * dtype.itemsize

    g = torch.Generator().manual_seed(1234)
    for layer in range(shape.layers + 1):
        t0 = time.perf_counter()
        per_model: list[dict[str, torch.Tensor]] = [{} for _ in paths]
        if layer < shape.layers:
            items = []
            for j, (mod, kind) in enumerate(PROJ):
                items.append((f"model.layers.{layer}.{mod}.weight", shape.proj_shape(kind), j))
            for ln in ("input_layernorm", "post_attention_layernorm"):
                items.append((f"model.layers.{layer}.{ln}.weight", (shape.hidden,), None))
        else:
            items = [
                ("model.embed_tokens.weight", (shape.vocab, shape.hidden), None),
                ("lm_head.weight", (shape.vocab, shape.hidden), None),
                ("model.norm.weight", (shape.hidden,), None),
            ]
        for name, shp, j in items:
            if len(shp) == 1:
                base = 1.0 + 0.02 * torch.randn(shp, generator=g)
            else:
                base = 0.02 * torch.randn(shp, generator=g)
            per_model[0][name] = base
            scale = REL_DELTA * float(base.norm())
            for t in range(N_TASKS):
                if j is not None:
                    seed = 100_000 * (t + 1) + 100 * layer + j
                    dw = realistic_delta(*shp, seed=seed).W * scale
                else:
                    dw = torch.randn(shp, generator=g) * (scale / base.numel() ** 0.5)
                per_model[t + 1][name] = base + dw
        flush(layer, per_model)
        del per_model
        log(f"  wrote shard {layer + 1}/{n_shards} ({time.perf_counter() - t0:.1f} s)")
    for p, wm, total in zip(paths, weight_maps, totals, strict=True):
        with open(os.path.join(p, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": wm}, f, indent=1)
    return paths


def recipe(method: str, paths: list[str], dtype: str) -> dict:
    base, tasks = paths[0], paths[1:]
    out = {
        "merge_method": method,
        "base_model": base,
        "models": [{"model": t, "parameters": dict(PER_MODEL)} for t in tasks],
        "dtype": dtype,
    }
    if method != "ties":
        out["parameters"] = dict(CTM)
    return out


def write_recipe(path: str, data: dict) -> str:
    import yaml

    with open(path, "w") as f:
        yaml.safe_dump(data, f)
    return path


# ---------------------------------------------------------------------------------------------
# Speed


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def run_cli(args: list[str]) -> dict:
    exe = shutil.which("mergekit-yaml") or os.path.join(sys.prefix, "bin", "mergekit-yaml")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    load = loadavg()
    t = time.perf_counter()
    res = subprocess.run([exe, *args], capture_output=True, text=True)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if res.returncode != 0:
        raise RuntimeError(f"mergekit-yaml {' '.join(args)} failed:\n{res.stderr[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall_s": wall, "cpu_s": cpu, "load_before": load, "load_after": loadavg()}


def load_group(paths: list[str], name: str):
    from mergekit.merge_methods.base import TensorGroup
    from safetensors import safe_open

    tensors = []
    for p in paths:
        with open(os.path.join(p, "model.safetensors.index.json")) as f:
            shard = json.load(f)["weight_map"][name]
        with safe_open(os.path.join(p, shard), framework="pt") as f:
            tensors.append(f.get_tensor(name))
    return TensorGroup.from_tensors(tensors, ids=paths, base_index=0, name=name)


def kernel_times(paths: list[str], log=print) -> dict:
    """merge_full_tensor on each projection of layer 0 (ctm, the recipe's parameters), and
    compress_delta alone (×T) on q_proj and gate_proj; one call each (they take seconds)."""
    from mergekit_ctm.engine.compress import compress_delta
    from mergekit_ctm.integration.full_checkpoints import merge_full_tensor, tensor_seed

    params = {**CTM, **{k: [v] * N_TASKS for k, v in PER_MODEL.items()}}
    out = {}
    for mod, _ in PROJ:
        name = f"model.layers.0.{mod}.weight"
        group = load_group(paths, name)
        load = loadavg()
        t = time.perf_counter()
        merge_full_tensor("ctm", group, params)
        total = time.perf_counter() - t
        row = {"shape": list(group.base.tensor.shape), "merge_s": total, "load": load}
        if mod in ("self_attn.q_proj", "mlp.gate_proj"):
            base = group.base.tensor.float()
            deltas = [e.tensor.float() - base for e in group.non_base]
            t = time.perf_counter()
            for d in deltas:
                compress_delta(d, CTM["task_rank"], seed=tensor_seed(name), dtype=torch.float32)
            row["compress_s"] = time.perf_counter() - t
        out[mod] = row
        log(f"  {mod:18s} {tuple(row['shape'])}: merge_full_tensor {total:6.2f} s"
            + (f" (compress_delta ×{N_TASKS}: {row['compress_s']:.2f} s)"
               if "compress_s" in row else ""))  # fmt: skip
    return out


# ---------------------------------------------------------------------------------------------
# Correctness


def check_output(out_dir: str, base_dir: str, rank: int, tol: float, log=print) -> dict:
    from safetensors import safe_open
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(out_dir, dtype=torch.float32)
    with torch.no_grad():
        logits = model(torch.arange(8)[None]).logits
    finite = bool(torch.isfinite(logits).all())
    del model, logits

    def tensors(d: str) -> dict[str, str]:
        """tensor name -> shard file (mergekit writes an index only for several shards)."""
        files = {}
        for fname in sorted(os.listdir(d)):
            if fname.endswith(".safetensors"):
                with safe_open(os.path.join(d, fname), framework="pt") as f:
                    files.update(dict.fromkeys(f.keys(), os.path.join(d, fname)))
        return files

    out_files, base_files = tensors(out_dir), tensors(base_dir)
    assert set(out_files) == set(base_files), "output and base tensor names differ"
    worst_est, worst_bound, checked, dense = 0.0, 0.0, 0, []
    g = torch.Generator().manual_seed(0)
    for name in sorted(out_files):
        with safe_open(out_files[name], framework="pt") as f:
            w = f.get_tensor(name)
        if w.ndim != 2:
            continue
        if "embed_tokens" in name or "lm_head" in name:
            dense.append(name)
            continue
        with safe_open(base_files[name], framework="pt") as f:
            D = w.double() - f.get_tensor(name).double()
        del w
        torch.manual_seed(int(torch.randint(1 << 30, (1,), generator=g)))
        U, S, _ = torch.svd_lowrank(D, q=rank + 8, niter=6)
        s1 = float(S[0])
        U = U[:, :rank]
        R = D - U @ (U.mT @ D)
        bound = float(torch.linalg.norm(R)) / s1
        est = float(torch.svd_lowrank(R, q=4, niter=6)[1][0]) / s1
        worst_est, worst_bound = max(worst_est, est), max(worst_bound, bound)
        checked += 1
        del D, R
    ok = finite and worst_est <= tol
    log(f"  loads with transformers, finite forward: {finite}; {checked} projections: "
        f"max σ₁₇/σ₁ ≈ {worst_est:.1e} (≤ {tol:g}: {worst_est <= tol}), max ‖R‖_F/σ₁ "
        f"{worst_bound:.1e}; dense by design: {', '.join(dense)}")  # fmt: skip
    return {"finite_forward": finite, "checked": checked, "max_sigma17_over_sigma1": worst_est,
            "max_resid_fro_over_sigma1": worst_bound, "ok": ok}  # fmt: skip


def speed(args, log=print) -> dict:
    shape = Shape(4096, 14336, 32, 8, args.vocab, args.layers)
    dtype = getattr(torch, args.dtype)
    root = os.path.join(args.workdir, f"speed_{args.layers}L_{args.dtype}")
    res: dict = {"layers": args.layers, "dtype": args.dtype, "tasks": N_TASKS}
    if not os.path.exists(os.path.join(root, "task2", "model.safetensors.index.json")):
        log(f"writing base + {N_TASKS} fine-tunes, 8B-shaped, {args.layers} layer(s), "
            f"{args.dtype} -> {root}")  # fmt: skip
        t = time.perf_counter()
        paths = make_checkpoints(root, shape, dtype, log)
        res["generate_s"] = time.perf_counter() - t
    else:
        paths = [os.path.join(root, n) for n in ["base"] + [f"task{t}" for t in range(N_TASKS)]]
        log(f"reusing checkpoints in {root}")
    size = sum(os.path.getsize(os.path.join(paths[0], f)) for f in os.listdir(paths[0]))
    res["model_bytes"] = size

    helps = []
    for _ in range(2):
        helps.append(run_cli(["--help"])["wall_s"])
    res["startup_s"] = min(helps)
    log(f"start-up (mergekit-yaml --help, best of 2): {res['startup_s']:.2f} s")

    res["cli"] = {}
    for method in args.methods:
        rpath = write_recipe(os.path.join(root, f"{method}.yml"),
                             recipe(method, paths, args.dtype))  # fmt: skip
        out = os.path.join(root, f"out_{method}")
        shutil.rmtree(out, ignore_errors=True)
        r = run_cli([rpath, out, "--quiet"])
        res["cli"][method] = r
        log(f"mergekit-yaml {method:10s}: wall {r['wall_s']:7.1f} s, CPU {r['cpu_s']:7.1f} s "
            f"(load {r['load_before']} -> {r['load_after']})")  # fmt: skip
        if method == "ctm":
            res["check"] = check_output(out, paths[0], CTM["task_rank"], args.tol, log)
        if method != "ctm" or not args.keep:
            shutil.rmtree(out, ignore_errors=True)

    log("our kernel per tensor (ctm, ties, rank 16, task_rank 16, T = 3; in process):")
    res["kernel"] = kernel_times(paths, log)
    per_layer = sum(r["merge_s"] for r in res["kernel"].values())
    res["kernel_per_layer_s"] = per_layer
    startup = res["startup_s"]
    log(f"kernel per layer (sum of 7): {per_layer:.1f} s; x32 layers (extrapolation): "
        f"{32 * per_layer / 60:.1f} min")  # fmt: skip
    for method, r in res["cli"].items():
        pl = (r["wall_s"] - startup) / args.layers
        r["per_layer_s"] = pl
        log(f"  mergekit-yaml {method:10s}: (wall - start-up) / layers = {pl:6.1f} s per layer; "
            f"x32 (extrapolation) {32 * pl / 60:6.1f} min")  # fmt: skip
    return res


# ---------------------------------------------------------------------------------------------
# Memory

CHILD = (
    CHILD_PRELUDE
    + r"""
import json
import torch, yaml, mergekit_ctm, mergekit.merge  # noqa: F401
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions
recipe, out, shard = sys.argv[1], sys.argv[2], int(sys.argv[3])
text = open(recipe).read()
with PeakSampler(0.01) as s:
    run_merge(MergeConfiguration.model_validate(yaml.safe_load(text)), out,
              MergeOptions(quiet=True, **({"out_shard_size": shard} if shard else {})),
              config_source=text)
end = status()
print(json.dumps({"baseline_kib": s.base["VmHWM"], "peak_kib": end["VmHWM"],
                  "anon_base_kib": s.base["RssAnon"], "anon_peak_kib": s.peak["RssAnon"],
                  "file_base_kib": s.base["RssFile"], "file_peak_kib": s.peak["RssFile"]}))
"""
)


def memory_one(args, layers: int, log=print) -> dict:
    shape = Shape(args.mem_hidden, args.mem_hidden * 7 // 2, 8, 2, args.vocab, layers)
    root = os.path.join(args.workdir, f"mem_{layers}L_{args.dtype}")
    if not os.path.exists(os.path.join(root, "task2", "model.safetensors.index.json")):
        make_checkpoints(root, shape, getattr(torch, args.dtype), lambda *_: None)
    paths = [os.path.join(root, n) for n in ["base"] + [f"task{t}" for t in range(N_TASKS)]]
    rpath = write_recipe(os.path.join(root, "ctm.yml"), recipe("ctm", paths, args.dtype))
    out = os.path.join(root, "out")
    shutil.rmtree(out, ignore_errors=True)
    load = loadavg()
    t = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", CHILD, rpath, out, str(args.mem_shard_size)],
                         capture_output=True, text=True)  # fmt: skip
    if res.returncode != 0:
        raise RuntimeError(res.stderr[-3000:])
    stats = json.loads(res.stdout.strip().splitlines()[-1])
    stats["wall_s"] = time.perf_counter() - t
    stats["load"] = load
    stats["merge_mib"] = (stats["peak_kib"] - stats["baseline_kib"]) / 1024
    stats["anon_mib"] = (stats["anon_peak_kib"] - stats["anon_base_kib"]) / 1024
    stats["file_mib"] = (stats["file_peak_kib"] - stats["file_base_kib"]) / 1024
    stats["model_mib"] = (
        sum(os.path.getsize(os.path.join(paths[0], f)) for f in os.listdir(paths[0])) / 2**20
    )
    shutil.rmtree(out, ignore_errors=True)
    log(f"  {layers:3d} layers (model {stats['model_mib']:6.0f} MiB each): peak RSS "
        f"{stats['peak_kib'] / 1024:7.1f} MiB, baseline {stats['baseline_kib'] / 1024:7.1f} MiB, "
        f"merge {stats['merge_mib']:7.1f} MiB (sampled peaks above baseline: anon "
        f"{stats['anon_mib']:6.1f}, file {stats['file_mib']:6.1f}); {stats['wall_s']:.0f} s, "
        f"load {load}")  # fmt: skip
    return stats


def memory(args, log=print) -> dict:
    small, large = args.mem_layers, 2 * args.mem_layers
    log(f"memory: ctm through run_merge, hidden {args.mem_hidden}, {small} vs {large} layers")
    a, b = memory_one(args, small, log), memory_one(args, large, log)
    ratio = b["merge_mib"] / max(a["merge_mib"], 1e-9)
    log(f"  ratio (peak above baseline, {large} vs {small} layers): {ratio:.2f} "
        f"({'within' if ratio <= 1.3 else 'ABOVE'} 1.3)")  # fmt: skip
    return {"small": a, "large": b, "ratio": ratio}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=1, help="8B-shaped layers (speed)")
    ap.add_argument("--methods", nargs="+", default=None,
                    help="default: ties ctm (--quick: ctm only)")  # fmt: skip
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--mem-hidden", type=int, default=1024)
    ap.add_argument("--mem-layers", type=int, default=None, help="L (and 2L); default 4")
    ap.add_argument(
        "--mem-shard-size",
        type=int,
        default=0,
        help="--out-shard-size in bytes for the memory runs (0: mergekit's 5 GB)",
    )
    ap.add_argument("--tol", type=float, default=1e-3, help="σ₁₇ / σ₁ threshold")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--workdir", default=None, help="default: a temporary folder")
    ap.add_argument("--keep", action="store_true", help="keep checkpoints in --workdir")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args()
    args.methods = args.methods or (["ctm"] if args.quick else ["ties", "ctm"])
    args.mem_layers = args.mem_layers or (2 if args.quick else 4)
    tmp = None
    if args.workdir is None:
        tmp = args.workdir = tempfile.mkdtemp(prefix="fullbench_")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} CPUs, load {loadavg()}", flush=True)  # fmt: skip
    t0 = time.perf_counter()
    results: dict = {"threads": torch.get_num_threads(), "load_start": loadavg()}
    try:
        if not args.skip_speed:
            results["speed"] = speed(args, lambda *a: print(*a, flush=True))
        if not args.skip_memory:
            results["memory"] = memory(args, lambda *a: print(*a, flush=True))
    finally:
        if tmp is not None and not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    results["total_s"] = time.perf_counter() - t0
    results["load_end"] = loadavg()
    print(f"total {results['total_s']:.0f} s, load {results['load_end']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    failed = (results.get("memory", {}).get("ratio", 0) > 1.3
              or not results.get("speed", {}).get("check", {"ok": True})["ok"])  # fmt: skip
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
