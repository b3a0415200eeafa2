"""Write docs/quality.md and its figures from the results JSON of ``bench.quality.run``.

    python -m bench.quality.report [--results bench/quality/results] [--docs docs]

Every ``results.json`` under ``--results`` is read; runs of the same seed are combined (a method
measured by a later run replaces an earlier failed entry of the same method).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from bench.quality.merge import RULE_LABEL, RULES

HERE = Path(__file__).resolve().parent
ENERGY_KEYS = ("ctm/task_arithmetic", "mtc-full/task_arithmetic", "ctm/ties", "mtc-full/ties")
REPO = HERE.parents[1]


def load_results(results_dir: Path) -> dict:
    combined: dict = {"seeds": {}}
    # runs whose directory name contains "rerun" come last and replace earlier entries
    paths = sorted(results_dir.rglob("results.json"), key=lambda p: ("rerun" in str(p), str(p)))
    for p in paths:
        override = "rerun" in str(p)
        d = json.loads(p.read_text())
        for k in ("config", "suite_key", "backends", "rank", "build_timings"):
            if combined.get(k) is None and d.get(k) is not None:
                combined[k] = d[k]
        for seed, sd in d.get("seeds", {}).items():
            cur = combined["seeds"].setdefault(seed, {})
            for k, v in sd.items():
                if k in ("main", "energy", "sweep"):
                    tgt = cur.setdefault(k, {})
                    for mk, mv in v.items():
                        failed = isinstance(tgt.get(mk), dict) and tgt[mk].get("error")
                        if mk not in tgt or failed or override:
                            tgt[mk] = mv
                else:
                    cur.setdefault(k, v)
    return combined


def ms(xs: list[float], scale: float = 100.0) -> str:
    """Mean ± sample std of ``scale``·xs over seeds, NaNs dropped ("n/a" if none)."""
    xs = [x for x in xs if x == x]
    if not xs:
        return "n/a"
    if len(xs) == 1:
        return f"{scale * xs[0]:.2f}"
    return f"{scale * np.mean(xs):.2f} ± {scale * np.std(xs, ddof=1):.2f}"


def _method_order(keys: set[str]) -> list[tuple[str, list[str]]]:
    groups = [
        ("Low-rank-aware (full space)", ["lora_lego", "robustmerge", "iso_cts"]),
        ("PEFT add_weighted_adapter (MtC, full space)", ["peft/svd", "peft/ties_svd"]),
    ]
    for rule in RULES:
        groups.append(
            (
                RULE_LABEL[rule],
                [
                    f"mtc-full/{rule}",
                    f"mtc-knots/{rule}",
                    f"mtc-core/{rule}",
                    f"core_space/{rule}",
                    f"ctm/{rule}",
                    f"core_space-lossless/{rule}",
                ],
            )
        )
    return [(g, [k for k in ks if k in keys]) for g, ks in groups]


PRETTY = {
    "lora_lego": "LoRA-LEGO",
    "robustmerge": "RobustMerge",
    "iso_cts": "Iso-CTS",
    "peft/svd": "PEFT `svd`",
    "peft/ties_svd": "PEFT `ties_svd`",
}


def pretty(k: str) -> str:
    if k in PRETTY:
        return PRETTY[k]
    fam, rule = k.split("/")
    r = RULE_LABEL.get(rule, rule)
    return (
        {
            "mtc-full": f"{r} MtC full",
            "mtc-knots": f"{r} MtC KnOTS",
            "mtc-core": f"{r} MtC core",
            "core_space": f"{r} CoreSpace (truncated)",
            "ctm": f"**{r} CtM**",
            "core_space-lossless": f"{r} CoreSpace lossless (rank Σrₜ, reference)",
        }[fam]
        if fam in ("mtc-full", "mtc-knots", "mtc-core", "core_space", "ctm", "core_space-lossless")
        else k
    )


MTC_KEYS = tuple(
    [f"mtc-{s}/{r}" for r in RULES for s in ("full", "knots", "core")]
    + [f"core_space/{r}" for r in RULES]
    + ["peft/svd", "peft/ties_svd"]
)


def figures(res: dict, img: Path, tasks: list[str], seeds: list[str]) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img.mkdir(parents=True, exist_ok=True)
    out = {}
    S = res["seeds"]
    # Figure 5: rank sweep
    fig, ax = plt.subplots(figsize=(6, 4))
    sweep_seeds = [s for s in seeds if S[s].get("sweep")]
    for k in ("ctm/ties", "mtc-full/ties", "mtc-knots/ties", "mtc-core/ties", "core_space/ties"):
        ranks = sorted({int(r) for s in sweep_seeds for r in S[s]["sweep"].get(k, {})})
        if not ranks:
            continue
        ys = [
            np.nanmean(
                [
                    S[s]["sweep"][k][str(r)]["test_avg"]
                    for s in sweep_seeds
                    if str(r) in S[s]["sweep"].get(k, {})
                ]
            )
            for r in ranks
        ]
        ax.plot(
            ranks,
            100 * np.array(ys),
            marker="o",
            label=pretty(k).replace("*", ""),
            lw=2.5 if k.startswith("ctm") else 1.2,
        )
    ax.set_xscale("log", base=2)
    ax.set_xlabel("target rank r")
    ax.set_ylabel("avg normalized test accuracy (%)")
    ax.set_title(f"Rank sweep, TIES (seeds {', '.join(sweep_seeds)})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(img / "quality_rank_sweep.png", dpi=120)
    plt.close(fig)
    out["sweep"] = "img/quality_rank_sweep.png"
    # Figure 3: energy retention per task
    ekeys = [k for k in ENERGY_KEYS if all(k in S[s].get("energy", {}) for s in seeds)]
    if ekeys:
        fig, ax = plt.subplots(figsize=(9, 4))
        w = 0.8 / len(ekeys)
        x = np.arange(len(tasks))
        for i, k in enumerate(ekeys):
            vals = np.array([[S[s]["energy"][k][t] for t in tasks] for s in seeds])
            ax.bar(x + i * w, vals.mean(0), w, yerr=vals.std(0), label=pretty(k).replace("*", ""))
        norms = np.array([[S[s]["norms"][t] for t in tasks] for s in seeds]).mean(0)
        ax.set_xticks(x + w * (len(ekeys) - 1) / 2)
        ax.set_xticklabels([f"{t}\n‖ΔW‖={n:.1f}" for t, n in zip(tasks, norms)], fontsize=7)
        ax.set_ylabel("energy retention ρ̄(t)")
        ax.set_ylim(0, 1.05)
        ax.set_title(f"Energy retention at rank {res['rank']} (mean ± std over seeds)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(img / "quality_energy_retention.png", dpi=120)
        plt.close(fig)
        out["energy"] = "img/quality_energy_retention.png"
    # Figure 2: norm vs drop after truncation
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, rule in zip(axes, ("iso_c", "ties")):
        ref = f"core_space-lossless/{rule}"
        for k, mk in ((f"mtc-full/{rule}", "o"), (f"ctm/{rule}", "s")):
            xs, ys = [], []
            for s in seeds:
                m = S[s].get("main", {})
                if m.get(ref, {}).get("error") or m.get(k, {}).get("error"):
                    continue
                if ref not in m or k not in m:
                    continue
                for t in tasks:
                    xs.append(S[s]["norms"][t])
                    ys.append(100 * (m[ref]["test_norm"][t] - m[k]["test_norm"][t]))
            if xs:
                ax.scatter(xs, ys, marker=mk, label=pretty(k).replace("*", ""), alpha=0.75)
        ax.axhline(0, color="k", lw=0.5)
        ax.set_xscale("log")
        ax.set_xlabel("task update norm ‖ΔW(t)‖ (log)")
        ax.set_title(f"{RULE_LABEL[rule]}: drop vs lossless merge, rank {res['rank']}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("drop of normalized test accuracy (points)")
    fig.tight_layout()
    fig.savefig(img / "quality_norm_vs_drop.png", dpi=120)
    plt.close(fig)
    out["drop"] = "img/quality_norm_vs_drop.png"
    return out


def setup_section(res: dict, tasks: list[str], seeds: list[str]) -> str:
    """The suite, the protocol and the commands, from the results' own config."""
    cfg = res["config"]
    S = res["seeds"]
    L = ["## Setup\n"]
    L.append(
        "Everything runs offline on CPU. Inputs are scikit-learn's bundled datasets turned into "
        "token sequences (8×8 digits → 16 tokens, one per 2×2 patch with 4 grey levels; tabular "
        "rows → one quantile-bin token per feature). The base model is a real "
        f"`transformers.LlamaForCausalLM` ({cfg['layers']} layers, hidden {cfg['hidden']}, "
        f"{cfg['heads']} heads, MLP {cfg['intermediate']}) pretrained by this suite with "
        f"next-token prediction for {cfg['pretrain_epochs']} epochs on the untransformed training "
        "inputs only. Each task has a fixed class-prototype head computed from the frozen base "
        "features (the analogue of CLIP's zero-shot heads in the paper; heads are never merged) "
        f"and one LoRA (rank {cfg['lora_rank']}, alpha {cfg['lora_alpha']}, on q/k/v/o of every "
        "layer) trained against it with `peft.get_peft_model`. Learning rates and epochs differ "
        "per task, as real fine-tunes do, so the update norms differ (×10 between the smallest "
        "and the largest).\n"
    )
    L.append("| task | input | label | classes | lr | epochs | ‖ΔW(t)‖ (mean over seeds) |")
    L.append("|---|---|---|---|---|---|---|")
    specs = {t["name"]: t for t in cfg["tasks"]}
    for t in tasks:
        sp = specs[t]
        inp = sp["source"] + ("" if sp["transform"] == "none" else f", {sp['transform']}")
        ncls = {"class": 10, "parity": 2, "ge5": 2, "loop": 2, "mod3": 3}.get(sp["label"], "")
        if sp["source"] == "breast_cancer":
            ncls = 2
        if sp["source"] == "wine":
            ncls = 3
        nrm = np.mean([S[s]["norms"][t] for s in seeds])
        L.append(
            f"| {t} | {inp} | {sp['label']} | {ncls} | {sp['lr']} | {sp['epochs']} | {nrm:.2f} |"
        )
    L.append(
        "\nSplits are fixed stratified 60/20/20 train/validation/test splits. Seeds change the "
        "LoRAs' initialization and data order (and DARE's random drops); the base model and the "
        "heads are the same for every seed.\n"
    )
    bt = res.get("build_timings") or {}
    L.append("### Protocol (Appendix C.2 of the paper)\n")
    L.append(
        "- Normalized accuracy = merged accuracy on task t / task t's own LoRA accuracy, on the "
        "same split.\n"
        "- For each method and seed, every discrete configuration (β ∈ {0, 0.25, 0.5, 0.75} for "
        "CtM; TIES / DARE-TIES / RobustMerge / PEFT ties_svd density ∈ {0.3, 0.6}) is merged once "
        "with λ = 1 and evaluated for λ ∈ {1/32, 1/16, …, 2} (λ scales the loaded adapter, the "
        "same function as merging with `lambda: λ` because λ is applied once after the rule); "
        "the best (configuration, λ) by average normalized validation accuracy is refined on "
        "λ·{0.71, 0.84, 1.19, 1.41}. The winner is merged again with `lambda` in the recipe by the "
        "stock `mergekit-yaml` CLI, its validation score re-checked, and only that directory is "
        "evaluated on the test split. No test number is used for any choice.\n"
        "- The validation search uses every other validation example for tasks with more than "
        "200 (digits tasks: 180 of 360) to halve its cost on a shared 2-core machine; test "
        "always uses the whole test split.\n"
        "- All merges except PEFT's run through the project's mergekit path: the search merges "
        "call `mergekit.merge.run_merge` in-process on the recipe (the code `mergekit-yaml` "
        "runs, dispatched to this plugin), the final adapters come from the `mergekit-yaml` "
        "subprocess. PEFT's `add_weighted_adapter(combination_type='svd' | 'ties_svd', "
        "svd_rank=r)` runs directly in PEFT, weight λ for every task.\n"
        "- Differences from the paper's grid, for CPU time: 2 density values instead of 21, a "
        "geometric λ grid instead of a 0.025 step; mergekit's `dare_ties` (random drop with "
        "keep-probability `density`, rescale, TIES sign election), not TIES top-K plus a separate "
        "drop rate; top-k keeps ⌊density·N⌋ entries (mergekit's count). RobustMerge and Iso-CTS "
        "run as `mtc` in the full space with those base rules; LoRA-LEGO with k = r clusters.\n"
    )
    if bt:
        L.append(
            "Build time of this run (shared machine, 3 seeds built in parallel, 1 thread each): "
            + ", ".join(f"{k} {v:.0f} s" for k, v in bt.items())
            + ". On an idle core the base model pretrains in about 70 s and the 8 LoRAs of one "
            "seed train in about 40 s (measured: 111 s for base + seed 0), so the full 3-seed "
            "build is about 3–4 minutes on one core, cached under `bench/quality/.cache/<hash>/`.\n"
        )
    L.append("### Commands\n")
    L.append(
        "```bash\n"
        "# build (cached) + search + test for one seed; the three seeds ran in parallel\n"
        "python -m bench.quality.run --seeds 0 --sweep-seeds 0 --out bench/quality/results/seed0\n"
        "python -m bench.quality.run --seeds 1 --sweep-seeds --out bench/quality/results/seed1\n"
        "python -m bench.quality.run --seeds 2 --sweep-seeds --out bench/quality/results/seed2\n"
        "# Iso-C / Iso-CTS under mtc re-run after the engine fix (the *rerun* dirs override)\n"
        "python -m bench.quality.run --seeds 0 1 2 --sweep-seeds --methods mtc-full/iso_c \\\n"
        "    mtc-core/iso_c core_space/iso_c iso_cts --out bench/quality/results/iso_rerun\n"
        "python -m bench.quality.run --seeds 0 1 2 --sweep-seeds --methods iso_cts \\\n"
        "    --out bench/quality/results/iso_rerun2   # Iso-CTS with the paper's (r − T)/r\n"
        "# rank sweep for seeds 1 and 2 (seed 0's ran inside its main run)\n"
        "python -m bench.quality.run --seeds 1 --sweep-seeds 1 --methods ctm/ties \\\n"
        "    mtc-full/ties mtc-knots/ties mtc-core/ties core_space/ties \\\n"
        "    --out bench/quality/results/sweep_seed1\n"
        "# single-LoRA rows: /tmp script equivalent to run.individual_rows for seeds 0-2\n"
        "# this page and its figures, from bench/quality/results/**/results.json\n"
        "python -m bench.quality.report --findings bench/quality/findings.md\n"
        "# smoke version (2 tasks, tiny model) in the test suite\n"
        "pytest tests/test_quality_smoke.py -q\n"
        "```\n"
    )
    return "\n".join(L)


def _main_table(res: dict, S: dict, seeds: list[str], tasks: list[str], keys: set) -> list[str]:
    """The table of normalized test accuracy per method (mean ± std over seeds)."""
    L: list[str] = []
    L.append(
        f"## Table: normalized test accuracy (%) at rank {res['rank']}, mean ± std over "
        f"seeds {', '.join(seeds)}\n"
    )
    L.append(
        "Normalized accuracy = merged accuracy on task t / task t's own LoRA accuracy "
        "(test split). Hyperparameters chosen on the validation split per seed.\n"
    )
    hdr = "| Method | " + " | ".join(tasks) + " | Avg | chosen (seed " + seeds[0] + ") |"
    L.append(hdr)
    L.append("|" + "---|" * (len(tasks) + 3))
    absr = [ms([S[s]["lora_test"][t] for s in seeds]) for t in tasks]
    L.append("| LoRA's absolute accuracy | " + " | ".join(absr) + " | | |")
    base = [[S[s]["base_test"][t] / S[s]["lora_test"][t] for s in seeds] for t in tasks]
    L.append(
        "| Base model (+ task heads) | "
        + " | ".join(ms(b) for b in base)
        + " | "
        + ms([np.mean([b[i] for b in base]) for i in range(len(seeds))])
        + " | |"
    )
    if all("individual_test" in S[s] for s in seeds):
        L.append("| *Single task LoRAs (each evaluated on every task)* |" + " |" * (len(tasks) + 2))
        for src in tasks:
            rows = [
                {t: S[s]["individual_test"][src][t] / S[s]["lora_test"][t] for t in tasks}
                for s in seeds
            ]
            L.append(
                f"| LoRA `{src}` alone | "
                + " | ".join(ms([r[t] for r in rows]) for t in tasks)
                + " | "
                + ms([float(np.mean(list(r.values()))) for r in rows])
                + " | |"
            )
    for group, ks in _method_order(keys):
        if not ks:
            continue
        L.append(f"| *{group}* |" + " |" * (len(tasks) + 2))
        for k in ks:
            rows = [S[s]["main"].get(k) for s in seeds]
            ok = [r for r in rows if r and not r.get("error") or (r and r.get("test_norm"))]
            if not ok:
                err = next((r["error"] for r in rows if r and r.get("error")), "not run")
                L.append(
                    f"| {pretty(k)} | "
                    + " | ".join("—" for _ in tasks)
                    + f" | failed | {err[:80].replace('|', '/')} |"
                )
                continue
            cells = [ms([r["test_norm"][t] for r in ok]) for t in tasks]
            r0 = rows[0] or {}
            hp = dict(r0.get("hp", {}))
            hp["λ"] = round(r0.get("lam", float("nan")), 3)
            L.append(
                f"| {pretty(k)} | "
                + " | ".join(cells)
                + " | "
                + ms([r["test_avg"] for r in ok])
                + f" | {hp} |"
            )
    L.append("")
    return L


def _headline(S: dict, seeds: list[str]) -> list[str]:
    """CtM-TIES against the best MtC chosen on validation, per seed."""
    L: list[str] = []
    L.append("## CtM-TIES vs the best MtC at the same rank, per seed\n")
    L.append(
        "Best MtC = the MtC variant (full / KnOTS / core space with any rule, CoreSpace "
        "truncated, PEFT svd / ties_svd) with the highest **validation** score in that seed; "
        "its test score is then compared (no test-split selection).\n"
    )
    L.append(
        "| seed | CtM-TIES test | best MtC (by val) | its test | Δ (points) "
        "| best MtC by test | Δ vs it |"
    )
    L.append("|---|---|---|---|---|---|---|")
    for s in seeds:
        m = S[s]["main"]
        c = m.get("ctm/ties")
        cands = [(k, m[k]) for k in MTC_KEYS if k in m and not m[k].get("error")]
        if not c or c.get("error") or not cands:
            continue
        bv = max(cands, key=lambda kv: kv[1]["val_norm"])
        bt = max(cands, key=lambda kv: kv[1]["test_avg"])
        ct, vt, tt = c["test_avg"], bv[1]["test_avg"], bt[1]["test_avg"]
        L.append(
            f"| {s} | {100 * ct:.2f} | {pretty(bv[0])} | {100 * vt:.2f} | {100 * (ct - vt):+.2f} "
            f"| {pretty(bt[0])} ({100 * tt:.2f}) | {100 * (ct - tt):+.2f} |"
        )
    L.append("")
    return L


def _sweep_section(S: dict, seeds: list[str], figs: dict) -> list[str]:
    """The rank sweep (Figure 5) and its table."""
    L: list[str] = []
    if "sweep" in figs:
        L.append("## Rank sweep (TIES), as Figure 5\n")
        L.append(f"![rank sweep]({figs['sweep']})\n")
        L.append(
            "Discrete hyperparameters (β, density) are those chosen at the main rank; λ is "
            "re-searched on validation at each rank.\n"
        )
        sw_seeds = [s for s in seeds if S[s].get("sweep")]
        ks = list(S[sw_seeds[0]]["sweep"]) if sw_seeds else []
        if ks:
            ranks = sorted({int(r) for k in ks for r in S[sw_seeds[0]]["sweep"][k]})
            L.append("| method | " + " | ".join(f"r={r}" for r in ranks) + " |")
            L.append("|---|" + "---|" * len(ranks))
            for k in ks:
                L.append(
                    f"| {pretty(k)} | "
                    + " | ".join(
                        ms(
                            [
                                S[s]["sweep"][k].get(str(r), {}).get("test_avg", float("nan"))
                                for s in sw_seeds
                            ]
                        )
                        for r in ranks
                    )
                    + " |"
                )
            L.append("")
    return L


def _energy_section(S: dict, seeds: list[str], tasks: list[str], figs: dict) -> list[str]:
    """Energy retention per task (Appendix D.1) and the task norms."""
    L: list[str] = []
    if "energy" in figs:
        L.append("## Energy retention ρ̄(t) (Appendix D.1, Figure 3)\n")
        L.append(f"![energy retention]({figs['energy']})\n")
        ek = [k for k in ENERGY_KEYS if all(k in S[s].get("energy", {}) for s in seeds)]
        L.append("| subspace of | " + " | ".join(tasks) + " | mean | worst | std over tasks |")
        L.append("|---|" + "---|" * (len(tasks) + 3))
        for k in ek:
            v = np.array([[S[s]["energy"][k][t] for t in tasks] for s in seeds])
            L.append(
                f"| {pretty(k)} | "
                + " | ".join(f"{100 * x:.1f}" for x in v.mean(0))
                + f" | {100 * v.mean():.1f} | {100 * v.min(1).mean():.1f} | "
                f"{100 * v.std(1).mean():.1f} |"
            )
        L.append("")
        L.append("| task | " + " | ".join(tasks) + " |")
        L.append("|---|" + "---|" * len(tasks))
        L.append(
            "| ‖ΔW(t)‖ (mean over seeds) | "
            + " | ".join(f"{np.mean([S[s]['norms'][t] for s in seeds]):.2f}" for t in tasks)
            + " |"
        )
        L.append("")
    return L


def _drop_section(figs: dict) -> list[str]:
    """Task norm vs accuracy drop after compression (Figure 2)."""
    L: list[str] = []
    if "drop" in figs:
        L.append("## Task norm vs accuracy drop after compression (Figure 2)\n")
        L.append(f"![norm vs drop]({figs['drop']})\n")
        L.append(
            "Drop = normalized test accuracy of the lossless (untruncated) CoreSpace merge "
            "with the same rule minus that of the rank-r merge; one point per task and "
            "seed.\n"
        )
    return L


def _failures(S: dict, seeds: list[str]) -> list[str]:
    """Warnings and failed merges recorded by the run."""
    L: list[str] = []
    notes = [
        f"- seed {s}, {pretty(k).replace('*', '')}: {r['error'][:300]}"
        for s in seeds
        for k, r in S[s].get("main", {}).items()
        if r.get("error")
    ]
    if notes:
        L.append("## Warnings and failures recorded by the run\n")
        L.append(
            "A 'warning' row still reports the test accuracy of the final `mergekit-yaml` adapter; "
            "a failed merge is shown as '—' in the table.\n"
        )
        L.extend(notes)
        L.append("")
    return L


def write_report(
    res: dict, docs: Path, preamble: str = "", findings: str = "", full: str = ""
) -> Path:
    """docs/quality.md (and its figures) from a run's results."""
    S = res["seeds"]
    seeds = sorted(S, key=int)
    tasks = list(S[seeds[0]]["lora_test"])
    figs = figures(res, docs / "img", tasks, seeds)
    keys = set().union(*[set(S[s].get("main", {})) for s in seeds])
    L = ["# Merge quality: CtM vs Merge-then-Compress on real trained adapters\n"]
    if preamble:
        L.append(preamble + "\n")
    if findings:
        L.append(findings + "\n")
    L.append(setup_section(res, tasks, seeds))
    L += _main_table(res, S, seeds, tasks, keys)
    L += _headline(S, seeds)
    L += _sweep_section(S, seeds, figs)
    L += _energy_section(S, seeds, tasks, figs)
    L += _drop_section(figs)
    L += _failures(S, seeds)
    if full:  # full fine-tunes (bench/quality/full.py), a section of their own
        L += ["", full]
    out = docs / "quality.md"
    out.write_text("\n".join(L) + "\n")
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.quality.report")
    p.add_argument("--results", default=str(HERE / "results"))
    p.add_argument("--docs", default=str(REPO / "docs"))
    p.add_argument("--preamble", default=None, help="markdown file inserted before the tables")
    p.add_argument(
        "--findings",
        default=str(HERE / "findings.md"),
        help="markdown file with the written findings (skipped when missing)",
    )
    a = p.parse_args(argv)
    res = load_results(Path(a.results))
    pre = Path(a.preamble).read_text() if a.preamble else ""
    fin = Path(a.findings).read_text() if a.findings and Path(a.findings).exists() else ""
    from bench.quality.full_report import section

    full = section(Path(a.results), HERE / "full_findings.md")
    print(write_report(res, Path(a.docs), pre, fin, full))


if __name__ == "__main__":
    main()
