"""Merge quality on *full* fine-tunes: the suite's tasks fine-tuned fully instead of with LoRA,
merged by ``ctm`` / ``core_space`` / ``mtc`` (the plugin's full-checkpoint path) and by
mergekit's own ``task_arithmetic`` / ``ties`` / ``dare_ties`` on the same checkpoints.

    python -m bench.quality.full --calibrate --seeds 0          # lr factor, on validation
    python -m bench.quality.full --seeds 0 --out bench/quality/results/full_seed0
    python -m bench.quality.full --report bench/quality/results  # markdown tables
    python -m bench.quality.full --smoke --out /tmp/qf           # 2 tasks, tiny model

Fine-tunes. Per task and seed, the q/k/v/o weights of every layer (the modules the LoRAs train,
so both kinds of fine-tune can change the same weights) are trained with AdamW against the
task's frozen class-prototype head, for the LoRA's number of epochs and batches, at
``lr_factor`` × the task's LoRA learning rate; everything else stays the base model's. Each is
saved with ``save_pretrained`` (safetensors) under ``<suite cache>/seed<k>/full_f<factor>/``.

Protocol (bench/quality/search.py, as for LoRAs): normalized accuracy = merged accuracy on task
t / task t's own full fine-tune's accuracy; discrete hyperparameters (β, density) times a λ grid
searched on validation (λ scales the λ = 1 merge's update W − W_base, which is what ``lambda``
does in every method here: mergekit's rules multiply the mixed delta once, ours the merged
update), the winner re-merged with ``lambda`` in the recipe by the stock ``mergekit-yaml`` and
evaluated once on test.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.quality import merge as mg
from bench.quality.evaluate import Evaluator
from bench.quality.run import start_run
from bench.quality.search import MethodRunner, SearchResult
from bench.quality.suite import (
    TARGET_MODULES,
    Suite,
    SuiteConfig,
    TaskData,
    build,
    fit,
    hash_str,
    load_heads,
)

FULL_VERSION = 1  # bump when the fine-tuning code changes in a way that changes outputs
RESULTS_DIR = Path(__file__).resolve().parent / "results"
LR_FACTORS = (0.1, 0.3, 1.0)  # --calibrate grid (× each task's LoRA lr)
DEFAULT_LR_FACTOR = 1.0  # the LoRA lr; best mean val of --calibrate on seed 0 (docs/quality.md)
FULL_RULES = ("task_arithmetic", "ties", "dare_ties")
SWEEP_RANKS = (4, 8, 16, 32, 64)


# --------------------------------------------------------------------------------------------
# full fine-tunes (cached)
# --------------------------------------------------------------------------------------------


def full_dir(suite: Suite, seed: int, lr_factor: float, task: str | None = None) -> Path:
    d = suite.root / f"seed{seed}" / f"full_v{FULL_VERSION}_f{lr_factor:g}"
    return d / task if task else d


def train_full(
    cfg: SuiteConfig,
    base_dir: Path,
    td: TaskData,
    head: dict[str, torch.Tensor],
    seed: int,
    lr_factor: float,
    out: Path,
) -> dict:
    """Fine-tune q/k/v/o of every layer against the frozen head; ``save_pretrained`` to ``out``.

    Same data order (generator seeded by ``seed``), batches and epochs as the task's LoRA;
    AdamW without weight decay at ``lr_factor`` × the LoRA's lr. Nothing is random but the data
    order (no dropout, no new parameters), so seeds differ by data order only.
    """
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed * 1000 + (hash_str(td.spec.name) % 1000))
    model = LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    for p in model.parameters():
        p.requires_grad_(False)
    params = [
        mod.weight
        for name, mod in model.named_modules()
        if name.rsplit(".", 1)[-1] in TARGET_MODULES
    ]
    for p in params:
        p.requires_grad_(True)
    losses = fit(cfg, model, params, td, head, seed, td.spec.lr * lr_factor)
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(str(tmp), safe_serialization=True)
    os.replace(tmp, out)
    return {
        "final_loss": float(np.mean(losses[-10:])),
        "steps": len(losses),
        "lr": td.spec.lr * lr_factor,
        "trained": len(params),
    }


def build_full(suite: Suite, seeds: list[int], lr_factor: float, log=print) -> dict:
    """Train (or reuse) every task's full fine-tune for each seed; returns build seconds."""
    torch.set_num_threads(suite.cfg.threads)
    heads = load_heads(suite.root, list(suite.tasks))
    timings = {}
    for seed in seeds:
        d = full_dir(suite, seed, lr_factor)
        meta_path = d / "full_meta.json"
        if meta_path.exists():
            continue
        t0 = time.time()
        meta = {}
        for n, td in suite.tasks.items():
            t1 = time.time()
            (d / n).parent.mkdir(parents=True, exist_ok=True)
            if not (d / n / "model.safetensors").exists():
                meta[n] = train_full(
                    suite.cfg, suite.base_dir, td, heads[n], seed, lr_factor, d / n
                )
                meta[n]["seconds"] = time.time() - t1
                log(f"[full] seed {seed} task {n}: {json.dumps(meta[n])}")
        meta_path.write_text(json.dumps(meta, indent=1))
        timings[f"full_seed{seed}_s"] = time.time() - t0
    return timings


# --------------------------------------------------------------------------------------------
# evaluation of full checkpoints
# --------------------------------------------------------------------------------------------


class FullEvaluator(Evaluator):
    """``Evaluator`` for full checkpoints: ``load`` gives a LlamaForCausalLM, and a scale λ maps
    each parameter to W_base + λ (W − W_base) (λ = 1 is the checkpoint itself, bit for bit)."""

    def __init__(self, suite: Suite, val_max: int = 200):
        super().__init__(suite, val_max)
        self._base = {n: p.detach().clone() for n, p in self.fresh_base().named_parameters()}

    def load(self, model_dir: Path | str) -> torch.nn.Module:
        from transformers import LlamaForCausalLM

        m = LlamaForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
        m.eval()
        return m

    @torch.no_grad()
    def peft_accuracies(
        self, model: torch.nn.Module, split: str, scales=(1.0,)
    ) -> list[dict[str, float]]:
        params = dict(model.named_parameters())
        own = {n: p.detach().clone() for n, p in params.items()}
        changed = [n for n in own if not torch.equal(own[n], self._base[n])]
        res = []
        for s in scales:
            for n in changed:
                if s == 1.0:
                    params[n].copy_(own[n])
                else:
                    params[n].copy_(self._base[n] + float(s) * (own[n] - self._base[n]))
            res.append(self.model_accuracies(model, split))
        for n in changed:
            params[n].copy_(own[n])
        return res

    def deltas(self, model_dir: Path | str) -> dict[str, torch.Tensor]:
        """W − W_base in float64 for every 2-D tensor that differs from the base."""
        m = dict(self.load(model_dir).named_parameters())
        return {
            n: (p.detach().double() - self._base[n].double())
            for n, p in m.items()
            if p.ndim == 2 and not torch.equal(p.detach(), self._base[n])
        }


# --------------------------------------------------------------------------------------------
# methods and recipes
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FullMethodSpec(mg.MethodSpec):
    """A merge of full checkpoints. family "mergekit": mergekit's own dense method ``rule``;
    otherwise one of ours with ``task_rank`` (None: = ``rank``, the plugin's default)."""

    task_rank: int | None = None


def full_methods() -> list[FullMethodSpec]:
    """Table order: mergekit's dense methods, then ours per base rule."""
    ms = [FullMethodSpec(f"mergekit/{r}", "mergekit", r) for r in FULL_RULES]
    for rule in FULL_RULES:
        ms += [
            FullMethodSpec(f"mtc-full/{rule}", "mtc", rule, "full"),
            FullMethodSpec(f"core_space/{rule}", "core_space", rule),
            FullMethodSpec(f"ctm/{rule}", "ctm", rule),
            FullMethodSpec(f"core_space-lossless/{rule}", "core_space", rule, lossless=True),
        ]
    return ms


def full_method(key: str) -> FullMethodSpec:
    """A method by key; ``<key>@tr<k>`` fixes ``task_rank`` to k."""
    base, _, tr = key.partition("@tr")
    for m in full_methods():
        if m.key == base:
            if not tr:
                return m
            return FullMethodSpec(key, m.family, m.rule, m.space, m.lossless, int(tr))
    raise KeyError(f"unknown method {key!r}; known: {[m.key for m in full_methods()]}")


def full_recipe(
    m: FullMethodSpec,
    models: list[Path],
    base_dir: Path,
    *,
    rank: int,
    hp: dict[str, Any],
    lam: float = 1.0,
    hooi_iters: int | None = None,
) -> dict[str, Any]:
    """The mergekit recipe of one full-checkpoint merge (docs/usage.md, full checkpoints)."""
    if m.family == "mergekit":
        per: dict[str, Any] = {"weight": 1.0}
        if "density" in hp:
            per["density"] = float(hp["density"])
        return {
            "merge_method": m.rule,
            "base_model": str(base_dir),
            "models": [{"model": str(d), "parameters": dict(per)} for d in models],
            "parameters": {"lambda": float(lam)},
            "dtype": "float32",
            "out_dtype": "float32",
        }
    r = mg.make_recipe(m, models, base_dir, rank=rank, hp=hp, lam=lam, hooi_iters=hooi_iters)
    r["parameters"]["task_rank"] = int(m.task_rank or rank)
    return r


class FullRunner(MethodRunner):
    """``MethodRunner`` over full fine-tunes: same search, recipes from ``full_recipe``; the
    λ = 1 merge of the last configuration is reused for the fine λ grid (one merge, not two)."""

    def __init__(self, ev: FullEvaluator, seed: int, workdir: Path, models: list[Path], **kw):
        super().__init__(ev, seed, workdir, **kw)
        self.adapters = models
        self._last: tuple | None = None

    def _build(self, m, rank, hp, lam, out, backend):
        recipe = full_recipe(
            m, self.adapters, self.ev.suite.base_dir, rank=rank, hp=hp, lam=lam,
            hooi_iters=self.hooi_iters,
        )  # fmt: skip
        mg.merge(recipe, out, backend=backend, seed=self.seed, workdir=self.workdir / "recipes")
        return self.ev.load(out)

    def _scores(self, m, rank, hp, lams, tmp):
        key = (m, rank, json.dumps(hp, sort_keys=True))
        if self._last is None or self._last[0] != key:
            self._last = (key, self._build(m, rank, hp, 1.0, tmp, self.search_backend))
        return self._val_scores(self._last[1], lams)

    def run(self, m, rank, grid=None, keep=False) -> SearchResult:
        self._last = None
        try:
            return super().run(m, rank, grid=grid, keep=keep)
        finally:
            self._last = None


# --------------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------------


def _lora_reference(seed: int) -> dict[str, dict[str, float]]:
    """The LoRA protocol's own-task accuracies of this seed (results/seed*/results.json)."""
    for p in sorted(RESULTS_DIR.glob("seed*/results.json")):
        sd = json.loads(p.read_text()).get("seeds", {}).get(str(seed))
        if sd and "lora_val" in sd:
            return {"val": sd["lora_val"], "test": sd["lora_test"]}
    return {}


def calibrate(args: argparse.Namespace, suite: Suite, log) -> dict:
    """Validation accuracy of each task's full fine-tune for every lr factor (vs the LoRA's)."""
    ev = FullEvaluator(suite)
    out: dict = {"factors": {}, "lora": {}}
    for seed in args.seeds:
        out["lora"][str(seed)] = _lora_reference(seed).get("val", {})
        for f in LR_FACTORS:
            t0 = time.time()
            build_full(suite, [seed], f, log=log)
            acc = {t: ev.accuracies(full_dir(suite, seed, f, t), "val")[0][t] for t in ev.names}
            out["factors"].setdefault(str(f), {})[str(seed)] = acc
            log(
                f"[calibrate] seed {seed} factor {f:g}: mean val {np.mean(list(acc.values())):.4f}"
                f" {json.dumps({k: round(v, 3) for k, v in acc.items()})} ({time.time() - t0:.0f}s)"
            )
    return out


def run(args: argparse.Namespace) -> dict:
    cfg, out, log = start_run(args)
    t0 = time.time()
    # base model and heads only: the full fine-tunes need no LoRA (seeds=() trains none)
    suite = build(
        dataclasses.replace(cfg, seeds=()),
        cache_root=Path(args.cache) if args.cache else None,
        log=log,
    )
    if args.calibrate:
        res = calibrate(args, suite, log)
        (out / "calibrate.json").write_text(json.dumps(res, indent=1))
        return res
    timings = build_full(suite, list(cfg.seeds), args.lr_factor, log=log)
    log(f"[full] suite {suite.root}, fine-tunes built/loaded in {time.time() - t0:.0f}s")
    ev = FullEvaluator(suite)
    keys = args.methods or (["mergekit/ties", "ctm/ties", "mtc-full/ties"] if args.smoke else None)
    methods = [full_method(k) for k in keys] if keys else full_methods()
    search_backend, final_backend = "inprocess", args.final_backend
    summary: dict = {
        "config": json.loads((suite.root / "suite_config.json").read_text()),
        "suite_key": cfg.key(),
        "full_version": FULL_VERSION,
        "lr_factor": args.lr_factor,
        "rank": args.rank,
        "backends": [search_backend, final_backend],
        "build_timings": timings,
        "seeds": {},
    }
    for seed in cfg.seeds:
        t_seed = time.time()
        dirs = [full_dir(suite, seed, args.lr_factor, t) for t in ev.names]
        sd: dict = {"lora": _lora_reference(seed)}
        sd["full_val"] = {t: ev.accuracies(d, "val")[0][t] for t, d in zip(ev.names, dirs)}
        indiv = {t: ev.accuracies(d, "test")[0] for t, d in zip(ev.names, dirs)}
        sd["full_test"] = {t: indiv[t][t] for t in ev.names}
        sd["individual_test"] = indiv
        base = ev.fresh_base()
        sd["base_val"] = ev.model_accuracies(base, "val")
        sd["base_test"] = ev.model_accuracies(base, "test")
        deltas = {t: ev.deltas(d) for t, d in zip(ev.names, dirs)}
        sd["norms"] = {
            t: float(sum(float(x.norm() ** 2) for x in d.values()) ** 0.5)
            for t, d in deltas.items()
        }
        sd["stable_rank"] = {
            t: float(np.mean([float(x.norm() ** 2 / torch.linalg.matrix_norm(x, 2) ** 2)
                              for x in d.values()]))
            for t, d in deltas.items()
        }  # fmt: skip
        rounded = {k: round(v, 3) for k, v in sd["full_test"].items()}
        log(f"[seed {seed}] full FT test acc {json.dumps(rounded)}")
        runner = FullRunner(
            ev,
            seed,
            out / "work",
            dirs,
            search_backend=search_backend,
            final_backend=final_backend,
            lora_val=sd["full_val"],
            lora_test=sd["full_test"],
            hooi_iters=args.hooi_iters,
            log=log,
        )
        main: dict[str, SearchResult] = {}
        for m in methods:
            main[m.key] = runner.run(m, args.rank)
            sd["main"] = {k: r.to_json() for k, r in main.items()}
            summary["seeds"][str(seed)] = sd
            (out / "full_results.json").write_text(json.dumps(summary, indent=1))
        # rank sweep: discrete hp from the main rank, λ re-searched on validation at each rank
        sd["sweep"] = {}
        for key in args.sweep_methods if seed in args.sweep_seeds else ():
            m = full_method(key)
            src = main.get(key.partition("@tr")[0])
            if src is None or src.error:
                continue
            sd["sweep"][key] = {}
            for rank in args.sweep_ranks:
                same = rank == args.rank and m.task_rank is None
                rr = src if same else runner.run(m, rank, grid=[src.hp])
                sd["sweep"][key][str(rank)] = {
                    "test_avg": rr.test_avg,
                    "test_norm": rr.test_norm,
                    "val": rr.val_norm,
                    "lam": rr.lam,
                    "error": rr.error,
                }
                (out / "full_results.json").write_text(json.dumps(summary, indent=1))
        sd["seconds"] = time.time() - t_seed
        (out / "full_results.json").write_text(json.dumps(summary, indent=1))
    summary["total_s"] = time.time() - t0
    (out / "full_results.json").write_text(json.dumps(summary, indent=1))
    log(f"[full] done in {summary['total_s']:.0f}s -> {out / 'full_results.json'}")
    return summary


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.quality.full",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--lr-factor", type=float, default=DEFAULT_LR_FACTOR)
    p.add_argument("--methods", nargs="*", default=None, help="method keys (default: all)")
    p.add_argument(
        "--sweep-methods",
        nargs="*",
        default=["ctm/ties", "ctm/task_arithmetic", "ctm/ties@tr128", "ctm/task_arithmetic@tr128"],
        help="key@tr<k> fixes task_rank = k while rank sweeps",
    )
    p.add_argument("--sweep-ranks", type=int, nargs="*", default=list(SWEEP_RANKS))
    p.add_argument("--sweep-seeds", type=int, nargs="*", default=[0, 1, 2])
    p.add_argument(
        "--final-backend", default="mergekit-yaml", choices=["mergekit-yaml", "inprocess"]
    )
    p.add_argument("--hooi-iters", type=int, default=None, help="default: the method's")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--smoke", action="store_true", help="2 tasks, tiny model")
    p.add_argument("--calibrate", action="store_true", help="only: val accuracy per lr factor")
    p.add_argument("--cache", default=None, help="cache root (default bench/quality/.cache)")
    p.add_argument("--out", default=str(RESULTS_DIR / "full"))
    p.add_argument("--report", default=None, help="print markdown tables from this results dir")
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    if args.report:
        from bench.quality.full_report import report

        print(report(Path(args.report)))
        return
    run(args)


if __name__ == "__main__":
    main()
