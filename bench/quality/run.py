"""Run the merge-quality benchmark end to end and write results JSON (then ``report``).

    python -m bench.quality.run --seeds 0 1 2                 # full benchmark (see docs/quality.md)
    python -m bench.quality.run --smoke --out /tmp/q          # 2 tasks, seconds

Steps: build the suite (cached), measure each LoRA and the base model, search every method's
hyperparameters on validation at the main rank, report test; rank sweep for the TIES methods
(discrete hyperparameters from the main rank, λ re-searched on validation at each rank); energy
retention ρ̄(t) of the selected adapters.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch

from bench.quality import merge as mg
from bench.quality.evaluate import Evaluator, energy_retention, read_deltas, task_norms
from bench.quality.search import MethodRunner, SearchResult, mean_norm
from bench.quality.suite import SuiteConfig, build, smoke_config

RESULTS_DIR = Path(__file__).resolve().parent / "results"
SWEEP_METHODS = ("ctm/ties", "mtc-full/ties", "mtc-knots/ties", "mtc-core/ties", "core_space/ties")
ENERGY_METHODS = ("ctm/task_arithmetic", "mtc-full/task_arithmetic", "ctm/ties", "mtc-full/ties")
SMOKE_METHODS = ("ctm/ties", "mtc-full/ties", "peft/svd", "core_space-lossless/task_arithmetic")


def pick_backends(requested: str) -> tuple[str, str]:
    """(search backend, final backend): searches run in-process, finals through mergekit-yaml."""
    if requested in ("auto", "inprocess"):
        return "inprocess", "mergekit-yaml"
    return requested, requested


def individual_rows(ev: Evaluator, seed: int) -> dict[str, dict[str, float]]:
    """Test accuracy on every task of each single task LoRA (one table row per LoRA)."""
    return {t: ev.accuracies(ev.suite.adapter_dir(seed, t), "test")[0] for t in ev.names}


def start_run(args: argparse.Namespace) -> tuple[SuiteConfig, Path, Callable[[str], None]]:
    """What every benchmark run does first: torch threads, quiet HF, the suite config
    (``--smoke`` or ``--seeds``), the output folder, and ``log`` (stdout and log.txt)."""
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    cfg = smoke_config() if args.smoke else SuiteConfig(seeds=tuple(args.seeds))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    logf = open(out / "log.txt", "a")

    def log(msg: str) -> None:
        print(msg, flush=True)
        logf.write(msg + "\n")
        logf.flush()

    return cfg, out, log


def run(args: argparse.Namespace) -> dict:
    cfg, out, log = start_run(args)
    t0 = time.time()
    suite = build(cfg, cache_root=Path(args.cache) if args.cache else None, log=log)
    build_s = time.time() - t0
    search_backend, final_backend = pick_backends(args.backend)
    log(
        f"[run] suite {suite.root} built/loaded in {build_s:.0f}s; backends {search_backend} "
        f"(search) / {final_backend} (final)"
    )
    ev = Evaluator(suite)
    methods = (
        [mg.method_by_key(k) for k in args.methods]
        if args.methods
        else ([mg.method_by_key(k) for k in SMOKE_METHODS] if args.smoke else mg.all_methods())
    )
    summary: dict = {
        "config": json.loads((suite.root / "suite_config.json").read_text()),
        "suite_key": cfg.key(),
        "backends": [search_backend, final_backend],
        "rank": args.rank,
        "build_timings": json.loads((suite.root / "build_timings.json").read_text())
        if (suite.root / "build_timings.json").exists()
        else {},
        "seeds": {},
    }
    for seed in cfg.seeds:
        sd: dict = {}
        lora_val = {t: ev.accuracies(suite.adapter_dir(seed, t), "val")[0][t] for t in ev.names}
        lora_test = {t: ev.accuracies(suite.adapter_dir(seed, t), "test")[0][t] for t in ev.names}
        # each individual LoRA evaluated on every task (its row of normalized accuracies)
        sd["lora_val"], sd["lora_test"] = lora_val, lora_test
        base = ev.fresh_base()
        sd["base_val"] = ev.model_accuracies(base, "val")
        sd["base_test"] = ev.model_accuracies(base, "test")
        sd["individual_test"] = individual_rows(ev, seed)
        deltas = {t: read_deltas(suite.adapter_dir(seed, t)) for t in ev.names}
        sd["norms"] = task_norms(deltas)
        rounded = {k: round(v, 3) for k, v in lora_test.items()}
        log(f"[seed {seed}] LoRA test acc {json.dumps(rounded)}")
        log(f"[seed {seed}] base normalized test avg {mean_norm(sd['base_test'], lora_test):.4f}")
        runner = MethodRunner(
            ev,
            seed,
            out / "work",
            search_backend=search_backend,
            final_backend=final_backend,
            lora_val=lora_val,
            lora_test=lora_test,
            hooi_iters=args.hooi_iters,
            log=log,
        )
        main: dict[str, SearchResult] = {}
        for m in methods:
            main[m.key] = runner.run(m, args.rank)
        sd["main"] = {k: r.to_json() for k, r in main.items()}
        # energy retention of the selected rank-r adapters (Appendix D.1)
        sd["energy"] = {}
        for k in ENERGY_METHODS:
            r = main.get(k)
            if r is not None and not r.error:
                sd["energy"][k] = energy_retention(read_deltas(r.adapter_dir), deltas)
        # rank sweep (Figure 5): discrete hp fixed from the main rank, λ re-searched on val
        sd["sweep"] = {}
        if seed in args.sweep_seeds:
            for k in SWEEP_METHODS:
                r = main.get(k)
                if r is None or r.error:
                    continue
                m = mg.method_by_key(k)
                sd["sweep"][k] = {}
                for rank in args.sweep_ranks:
                    rr = main[k] if rank == args.rank else runner.run(m, rank, grid=[r.hp])
                    sd["sweep"][k][str(rank)] = {
                        "test_avg": rr.test_avg,
                        "val": rr.val_norm,
                        "lam": rr.lam,
                        "error": rr.error,
                    }
        summary["seeds"][str(seed)] = sd
        (out / "results.json").write_text(json.dumps(summary, indent=1))
    summary["total_s"] = time.time() - t0
    (out / "results.json").write_text(json.dumps(summary, indent=1))
    log(f"[run] done in {summary['total_s']:.0f}s -> {out / 'results.json'}")
    return summary


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.quality.run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--sweep-ranks", type=int, nargs="*", default=[4, 8, 16, 32, 64])
    p.add_argument("--sweep-seeds", type=int, nargs="*", default=[0, 1, 2])
    p.add_argument("--methods", nargs="*", default=None, help="method keys (default: all)")
    p.add_argument("--backend", default="auto", choices=["auto", "mergekit-yaml", "inprocess"])
    p.add_argument("--hooi-iters", type=int, default=None, help="default: the method's")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--smoke", action="store_true", help="2 tasks, tiny model (the test's setting)")
    p.add_argument("--cache", default=None, help="cache root (default bench/quality/.cache)")
    p.add_argument("--out", default=str(RESULTS_DIR / "latest"))
    return p


def main(argv: list[str] | None = None) -> None:
    run(parser().parse_args(argv))


if __name__ == "__main__":
    main()
