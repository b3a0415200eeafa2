"""Markdown tables of the full-fine-tune runs (``bench.quality.full``), for docs/quality.md.

    python -m bench.quality.full --report bench/quality/results

Reads every ``full*/full_results.json`` under the directory and combines the seeds (a later
directory name wins for a seed both hold). The file name differs from the LoRA runs'
``results.json`` so that ``bench.quality.report`` never mixes the two.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from bench.quality.report import ms

PRETTY_RULE = {"task_arithmetic": "TA", "ties": "TIES", "dare_ties": "DARE-TIES"}


def load(results_dir: Path) -> dict:
    combined: dict = {"seeds": {}}
    for p in sorted(results_dir.glob("full*/full_results.json")):
        d = json.loads(p.read_text())
        for k in ("rank", "lr_factor", "suite_key", "backends"):
            combined.setdefault(k, d.get(k))
        for seed, sd in d.get("seeds", {}).items():
            cur = combined["seeds"].setdefault(seed, {})
            for k, v in sd.items():
                if isinstance(v, dict) and k in ("main", "sweep"):
                    cur.setdefault(k, {}).update(v)
                else:
                    cur[k] = v
    return combined


def pretty(key: str) -> str:
    base, _, tr = key.partition("@tr")
    fam, _, rule = base.partition("/")
    r = PRETTY_RULE.get(rule, rule)
    name = {
        "mergekit": f"mergekit `{rule}` (dense)",
        "mtc-full": f"{r} MtC full",
        "core_space": f"{r} CoreSpace (truncated)",
        "ctm": f"**{r} CtM**",
        "core_space-lossless": f"{r} CoreSpace lossless (rank T·task_rank)",
    }.get(fam, key)
    return name + (f", task_rank {tr}" if tr else "")


def _hp(r: dict) -> str:
    d = dict(r.get("hp") or {})
    d["λ"] = round(r.get("lam", float("nan")), 3)
    return ", ".join(f"{k} {v}" for k, v in d.items())


def best_dense(sd: dict) -> str:
    """The mergekit dense method with the highest *validation* score of this seed."""
    dense = {k: r for k, r in sd["main"].items() if k.startswith("mergekit/") and not r["error"]}
    return max(dense, key=lambda k: dense[k]["val_norm"])


def _paired(S: dict, seeds: list[str], sweeps: set, ranks: list[int]) -> list[str]:
    """Rows: CtM at each rank minus the seed's best dense method (chosen on validation),
    test points, mean ± std over the seeds that have both."""
    rows = []
    for k in sorted(sweeps, key=lambda k: ("@" in k, k)):
        cells = []
        for r in ranks:
            xs = [
                S[s]["sweep"][k][str(r)]["test_avg"] - S[s]["main"][best_dense(S[s])]["test_avg"]
                for s in seeds
                if str(r) in S[s].get("sweep", {}).get(k, {})
            ]
            n = f" (n={len(xs)})" if 0 < len(xs) < len(seeds) else ""
            cells.append((f"{100 * xs[0]:+.2f}" if len(xs) == 1 else ms(xs)) + n if xs else "n/a")
        label = pretty(k) + ("" if "@tr" in k else ", task_rank = rank")
        rows.append(f"| {label} − best dense (by val) | " + " | ".join(cells) + " |")
    return rows


def report(results_dir: Path) -> str:
    res = load(results_dir)
    S = res["seeds"]
    seeds = sorted(S, key=int)
    if not seeds:
        return f"no full*/full_results.json under {results_dir}"
    tasks = list(S[seeds[0]]["full_test"])
    L: list[str] = []
    L.append(f"Seeds: {', '.join(seeds)}; rank {res['rank']}; lr factor {res['lr_factor']}.\n")
    # individual fine-tunes
    L.append("**Individual fine-tunes** (absolute test accuracy, %; update size per task)\n")
    L.append("| | " + " | ".join(tasks) + " | mean |")
    L.append("|---" * (len(tasks) + 2) + "|")

    def row(label: str, get) -> None:
        cells = [ms([get(S[s], t) for s in seeds]) for t in tasks]
        mean = ms([np.mean([get(S[s], t) for t in tasks]) for s in seeds])
        L.append(f"| {label} | " + " | ".join(cells) + f" | {mean} |")

    row("full fine-tune, test acc", lambda sd, t: sd["full_test"][t])
    if all(sd.get("lora", {}).get("test") for sd in S.values()):
        row("LoRA (rank 8), test acc", lambda sd, t: sd["lora"]["test"][t])
    row("base model (+ head), test acc", lambda sd, t: sd["base_test"][t])
    L.append(
        "| ‖ΔW(t)‖ (q/k/v/o, all layers) | "
        + " | ".join(ms([S[s]["norms"][t] for s in seeds], 1.0) for t in tasks)
        + " | |"
    )
    L.append(
        "| stable rank ‖ΔW‖²_F/‖ΔW‖²₂ (mean over matrices) | "
        + " | ".join(ms([S[s]["stable_rank"][t] for s in seeds], 1.0) for t in tasks)
        + " | |"
    )
    L.append("")
    # main table: normalized test accuracy
    keys = list(S[seeds[0]].get("main", {}))
    L.append(
        f"**Normalized test accuracy (%) at rank {res['rank']} (task_rank = rank)**, mean ± std "
        "over seeds; normalized by each full fine-tune's own accuracy\n"
    )
    L.append("| Method | " + " | ".join(tasks) + " | Avg | chosen (seed 0) |")
    L.append("|---" * (len(tasks) + 3) + "|")

    def norm_row(label: str, acc) -> None:
        per = [{t: acc(S[s], t) / S[s]["full_test"][t] for t in tasks} for s in seeds]
        cells = [ms([p[t] for p in per]) for t in tasks]
        avg = ms([float(np.mean(list(p.values()))) for p in per])
        L.append(f"| {label} | " + " | ".join(cells) + f" | {avg} | |")

    norm_row("Base model (+ task heads)", lambda sd, t: sd["base_test"][t])
    norm_row(
        "one fine-tune alone (mean over the T fine-tunes, own task included)",
        lambda sd, t: float(np.mean([sd["individual_test"][u][t] for u in tasks])),
    )
    for k in keys:
        rs = [S[s]["main"].get(k) for s in seeds]
        rs = [r for r in rs if r and not r.get("error", "").startswith(("Merge", "Runtime"))]
        if not rs:
            L.append(f"| {pretty(k)} | " + " | ".join("—" for _ in tasks) + " | — | |")
            continue
        cells = [ms([r["test_norm"][t] for r in rs]) for t in tasks]
        n = f" (n={len(rs)})" if len(rs) < len(seeds) else ""
        L.append(
            f"| {pretty(k)} | "
            + " | ".join(cells)
            + f" | {ms([r['test_avg'] for r in rs])}{n} | {_hp(rs[0])} |"
        )
    L.append("")
    # per-seed averages
    L.append("**Average normalized test accuracy per seed**\n")
    L.append("| seed | " + " | ".join(pretty(k) for k in keys) + " |")
    L.append("|---" * (len(keys) + 1) + "|")
    for s in seeds:
        vals = [S[s]["main"].get(k, {}).get("test_avg", float("nan")) for k in keys]
        L.append(f"| {s} | " + " | ".join(f"{100 * v:.2f}" for v in vals) + " |")
    L.append("")
    # rank sweep
    sweeps = {k for s in seeds for k in S[s].get("sweep", {})}
    if sweeps:
        ranks = sorted({int(r) for s in seeds for v in S[s].get("sweep", {}).values() for r in v})
        L.append(
            "**Rank sweep** (average normalized test accuracy, %; β and density from the main "
            "rank, λ re-searched on validation at each rank; n = seeds where fewer than all)\n"
        )
        L.append("| method | " + " | ".join(f"r={r}" for r in ranks) + " |")
        L.append("|---" * (len(ranks) + 1) + "|")
        for k in sorted(sweeps, key=lambda k: ("@" in k, k)):
            cells = []
            for r in ranks:
                xs = [
                    S[s]["sweep"][k][str(r)]["test_avg"]
                    for s in seeds
                    if str(r) in S[s].get("sweep", {}).get(k, {})
                ]
                n = f" (n={len(xs)})" if 0 < len(xs) < len(seeds) else ""
                cells.append(ms(xs) + n)
            label = pretty(k) + ("" if "@tr" in k else ", task_rank = rank")
            L.append(f"| {label} | " + " | ".join(cells) + " |")
        L += _paired(S, seeds, sweeps, ranks)
        for k in keys:
            if k.startswith("mergekit/"):
                v = ms([S[s]["main"][k]["test_avg"] for s in seeds if k in S[s]["main"]])
                L.append(f"| {pretty(k)} (no rank) | " + " | ".join(v for _ in ranks) + " |")
        L.append("")
    return "\n".join(L)


def section(results_dir: Path, findings: Path | None = None) -> str:
    """The "Full fine-tunes" section of docs/quality.md: written findings, then the tables."""
    if not any(results_dir.glob("full*/full_results.json")):
        return ""
    text = findings.read_text().strip() + "\n\n" if findings and findings.exists() else ""
    return "## Full fine-tunes\n\n" + text + "### Tables (generated)\n\n" + report(results_dir)
