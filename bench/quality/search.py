"""Validation search (Appendix C.2 protocol) and test evaluation of one method.

For every discrete configuration g (β, density) the adapter is merged once with λ = 1 and
evaluated on the validation split for each λ of a coarse geometric grid (λ scales the loaded
adapter; see ``evaluate``). The best (g, λ) by average *normalized* validation accuracy is then
refined on a finer λ grid around it. The winner is re-merged with ``lambda: λ*`` folded into the
recipe (through ``final_backend``, ``mergekit-yaml`` for the report) and only that directory is
evaluated on the test split. The test split is never looked at before the choice is made.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.quality.evaluate import Evaluator
from bench.quality.merge import MergeFailed, MethodSpec, make_recipe, merge, peft_weighted_adapter

COARSE_LAMBDAS = (0.03125, 0.0625, 0.125, 0.25, 0.5, 1.0, 2.0)
FINE_FACTORS = (0.71, 0.84, 1.19, 1.41)


def normalized(acc: dict[str, float], ref: dict[str, float]) -> dict[str, float]:
    """Normalized accuracy: merged accuracy on task t / task t's own LoRA accuracy."""
    return {t: acc[t] / ref[t] for t in ref}


def mean_norm(acc: dict[str, float], ref: dict[str, float]) -> float:
    return float(np.mean(list(normalized(acc, ref).values())))


@dataclass
class SearchResult:
    """Selected hyperparameters and accuracies of one method at one rank and seed."""

    method: str
    rank: int
    seed: int
    hp: dict[str, Any] = field(default_factory=dict)
    lam: float = 1.0
    val_norm: float = float("nan")
    test_acc: dict[str, float] = field(default_factory=dict)
    test_norm: dict[str, float] = field(default_factory=dict)
    val_at_final: float = float("nan")  # val score re-measured on the final (λ-folded) adapter
    adapter_dir: str = ""
    n_evals: int = 0
    seconds: float = 0.0
    error: str = ""
    trace: list = field(default_factory=list)

    @property
    def test_avg(self) -> float:
        return float(np.mean(list(self.test_norm.values()))) if self.test_norm else float("nan")

    def to_json(self) -> dict:
        d = dict(self.__dict__)
        d["test_avg"] = self.test_avg
        return d


class MethodRunner:
    """Runs the search for methods of one (suite, seed), caching nothing between calls."""

    def __init__(
        self,
        ev: Evaluator,
        seed: int,
        workdir: Path,
        *,
        search_backend: str,
        final_backend: str,
        lora_val: dict[str, float],
        lora_test: dict[str, float],
        hooi_iters: int = 500,
        log=print,
    ):
        self.ev = ev
        self.seed = seed
        self.workdir = workdir
        self.search_backend = search_backend
        self.final_backend = final_backend
        self.lora_val = lora_val
        self.lora_test = lora_test
        self.hooi_iters = hooi_iters
        self.log = log
        self.adapters = [ev.suite.adapter_dir(seed, t) for t in ev.names]

    # one merged model, as a PeftModel with the merged adapter active
    def _build(self, m: MethodSpec, rank: int, hp: dict, lam: float, out: Path, backend: str):
        if m.family == "peft":
            return peft_weighted_adapter(
                self.ev.fresh_base(), self.adapters, m.rule, rank=rank, hp=hp, lam=lam, out_dir=out
            )
        recipe = make_recipe(
            m,
            self.adapters,
            self.ev.suite.base_dir,
            rank=rank,
            hp=hp,
            lam=lam,
            hooi_iters=self.hooi_iters,
        )
        merge(recipe, out, backend=backend, seed=self.seed, workdir=self.workdir / "recipes")
        return self.ev.load(out)

    def _val_scores(self, model, lams) -> list[float]:
        accs = self.ev.peft_accuracies(model, "val", lams)
        return [mean_norm(a, self.lora_val) for a in accs]

    def _scores(self, m: MethodSpec, rank: int, hp: dict, lams, tmp: Path) -> list[float]:
        """Validation score at each λ: by scaling one λ=1 merge, or by one merge per λ."""
        if m.lambda_is_scale:
            return self._val_scores(self._build(m, rank, hp, 1.0, tmp, self.search_backend), lams)
        out = []
        for lam in lams:
            model = self._build(m, rank, hp, lam, tmp, self.search_backend)
            out.extend(self._val_scores(model, [1.0]))
        return out

    def run(
        self,
        m: MethodSpec,
        rank: int,
        grid: list[dict] | None = None,
        keep: bool = False,
    ) -> SearchResult:
        t0 = time.time()
        res = SearchResult(m.key, rank, self.seed)
        tag = f"{m.key.replace('/', '_')}_r{rank}_s{self.seed}"
        tmp = self.workdir / "tmp" / tag
        try:
            best = (-1.0, None, None)
            for hp in grid if grid is not None else m.grid():
                scores = self._scores(m, rank, hp, COARSE_LAMBDAS, tmp)
                res.n_evals += len(scores)
                for lam, sc in zip(COARSE_LAMBDAS, scores):
                    res.trace.append({"hp": hp, "lam": lam, "val": sc})
                    if sc > best[0]:
                        best = (sc, hp, lam)
            _, hp, lam0 = best
            fine = [lam0 * f for f in FINE_FACTORS]
            for lam, sc in zip(fine, self._scores(m, rank, hp, fine, tmp)):
                res.n_evals += 1
                res.trace.append({"hp": hp, "lam": lam, "val": sc})
                if sc > best[0]:
                    best = (sc, hp, lam)
            res.val_norm, res.hp, res.lam = best
            # final: λ folded into the recipe, merged through the final backend
            final = self.workdir / "adapters" / tag
            model = self._build(m, rank, res.hp, res.lam, final, self.final_backend)
            res.val_at_final = mean_norm(self.ev.peft_accuracies(model, "val")[0], self.lora_val)
            res.test_acc = self.ev.peft_accuracies(model, "test")[0]
            res.test_norm = normalized(res.test_acc, self.lora_test)
            res.adapter_dir = str(final)
            if abs(res.val_at_final - res.val_norm) > 0.02:
                res.error = (
                    f"warning: val score of the final adapter ({res.val_at_final:.4f}) differs "
                    "from "
                    f"the searched one ({res.val_norm:.4f})"
                )
        except (MergeFailed, NotImplementedError, ValueError, KeyError, RuntimeError) as e:
            res.error = f"{type(e).__name__}: {str(e)[-600:]}"
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        res.seconds = time.time() - t0
        status = f"test {res.test_avg:.4f}" if not res.error else res.error[:200]
        self.log(
            f"  [{m.key} r={rank} seed={self.seed}] hp={res.hp} λ={res.lam:.3f} "
            f"val {res.val_norm:.4f} {status} ({res.n_evals} evals, {res.seconds:.0f}s)"
        )
        torch.set_num_threads(1)
        return res


def save_results(path: Path, results: list[SearchResult]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([r.to_json() for r in results], indent=1))
