"""Plan description (`validate`) and per-task energy retention (`inspect`)."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mergekit_ctm.adapters import AdapterError, load_factors, read_adapter
from mergekit_ctm.recipe import MergePlan, ModulePlan
from mergekit_ctm.recipe.full import ITEM_BYTES, FullPlan, shape_text


def output_rank(plan: MergePlan, module: ModulePlan) -> int:
    """Upper bound of the directions written for a module: rank, or Σ r_t when lossless."""
    total = sum(module.ranks)
    rank = module.param("rank")
    bound = min(total, module.n_out, module.m_in)
    return bound if rank is None else min(rank, bound)


def module_peak_bytes(plan: MergePlan, module: ModulePlan) -> int:
    """Rough peak working memory of one module's merge (factors, work space, output)."""
    item = 8 if plan.dtype == "float64" else 4
    n, m, total = module.n_out, module.m_in, sum(module.ranks)
    factors = total * (n + m) * item
    out = output_rank(plan, module) * (n + m) * item
    work = 2 * total * (n + m) * item + 8 * total * total * 4  # thin factorizations + core
    if plan.method == "mtc" and module.param("space", "full") in ("full", "knots"):
        work += (len(module.adapters) + 2) * n * m * item  # dense ΔW per task + merged
    if plan.method == "lora_lego":
        work += total * (n + m) * item
    return factors + out + work


def model_output_bytes(plan: MergePlan, *, streaming: bool = True) -> tuple[int, int, int]:
    """(largest tensor's working set, merged factors held, write buffer) of output: model.

    The Executor runs every module's merge before it reads base tensors (its schedule puts
    the chunks' labels first) and keeps the merged factors (B, A in the math dtype) until the
    base tensor they update is written: Σ k·(n + m) bytes. Then one base tensor at a time is
    in flight: read (its dtype), for a merged module also cast to the math dtype, B A and the
    sum in the math dtype, the cast back, and the cast to ``out_dtype``. The streaming writer
    holds nothing (``streaming=False``: mergekit's TensorWriter holds the whole output of a
    model below the default 5B shard size)."""
    from mergekit.common import dtype_from_name

    from mergekit_ctm.plan.run import base_tensors

    tensors = base_tensors(plan.base_path) if plan.output == "model" and plan.base_path else None
    if not tensors:
        return 0, 0, 0
    item = 8 if plan.dtype == "float64" else 4
    out = dtype_from_name(plan.recipe.out_dtype)
    merged = {m.weight_name for m in plan.modules} | {d.weight_name for d in plan.dense}
    largest, total = 0, 0
    for name, (dtype, shape) in tensors.items():
        numel = math.prod(shape)
        size = numel * dtype.itemsize
        cast = numel * out.itemsize if out is not None and out != dtype else 0
        work = size + cast
        if name in merged:
            work += 2 * numel * item + (numel * item if dtype.itemsize != item else 0)
            work += size if dtype.itemsize != item else 0
        largest = max(largest, work)
        total += numel * (out or dtype).itemsize
    factors = sum(output_rank(plan, m) * (m.n_out + m.m_in) * item for m in plan.modules)
    return largest, factors, 0 if streaming else total


def estimated_peak_bytes(plan: MergePlan, *, streaming: bool = True) -> int:
    """Peak working memory above the interpreter and torch: the largest module merge, or
    for output: model the larger of that and its largest tensor, plus the merged factors it
    holds and the write buffer (:func:`model_output_bytes`)."""
    merge = max((module_peak_bytes(plan, m) for m in plan.modules), default=0)
    largest, factors, buffer = model_output_bytes(plan, streaming=streaming)
    return max(merge, largest) + factors + buffer


def describe_plan(plan: MergePlan) -> str:
    """Human-readable plan: inputs, modules, ranks per adapter, output rank, peak memory."""
    lines = [
        f"recipe OK: merge_method {plan.method}"
        + (f", base_rule {plan.base_rule}" if plan.base_rule else "")
        + f", output {plan.output}, dtype {plan.dtype} -> {plan.out_dtype}",
        f"base model: {plan.base_model or '(unknown)'}{_base_detail(plan)}",
        f"adapters ({len(plan.adapters)}):",
    ]
    for i, info in enumerate(plan.adapters):
        rs = sorted({mod.r for mod in info.modules.values()})
        lines.append(
            f"  [{i}] {info.ref}: {len(info.modules)} LoRA modules, rank {'/'.join(map(str, rs))}"
            + (f", {len(info.full_tensors)} full tensors" if info.full_tensors else "")
        )
    lines.append(f"modules ({len(plan.modules)}):")
    width = max((len(m.name) for m in plan.modules), default=10)
    lines.append(f"  {'module'.ljust(width)}  ranks per adapter        -> out  peak MiB")
    for mod in plan.modules:
        ranks = " ".join(f"[{i}]={r}" for i, r in zip(mod.adapters, mod.ranks))
        b = module_peak_bytes(plan, mod)
        lines.append(
            f"  {mod.name.ljust(width)}  {ranks.ljust(24)} -> {output_rank(plan, mod):>3}"
            f"  {b / 2**20:8.2f}"
        )
    for d in plan.dense:
        who = ", ".join(f"[{i}]" for i, _ in d.sources)
        how = "pass through" if len(d.sources) == 1 else f"merged with {d.rule}"
        lines.append(f"  {d.weight_name} ({d.role}, {who}): {how}")
    largest, factors, _ = model_output_bytes(plan)
    what = "one module at a time"
    if largest:
        what += (
            f"; output: model: {largest / 2**20:.2f} MiB for its largest tensor in flight and "
            f"{factors / 2**20:.2f} MiB of merged factors held until applied, streamed to disk"
        )
    lines.append(
        f"estimated peak working memory: {estimated_peak_bytes(plan) / 2**20:.2f} MiB ({what}, "
        "plus the interpreter and torch)"
    )
    lines += [f"note: {n}" for n in plan.notes]
    return "\n".join(lines)


def _base_detail(plan: MergePlan) -> str:
    """What is known of the base: its layer count only when its config.json was read."""
    if not plan.base_model:
        return ""
    if plan.num_layers_from_base:
        return f" ({plan.num_layers} layers)"
    return {
        "hub": " (hub id, not checked offline)",
        "missing": " (not on this machine, not checked)",
    }.get(plan.base_status or "", " (no layer count in its config.json)")


_LAYER = re.compile(r"\.(\d+)\.")


def describe_full_plan(plan: FullPlan) -> str:
    """Human-readable report: inputs, which tensors take the low-rank path, peak memory."""
    rule = plan.base_rule
    size = sum(math.prod(t.shape) * ITEM_BYTES.get(t.dtype, 4) for t in plan.tensors)
    lines = [
        f"recipe OK: merge_method {plan.method}" + (f", base_rule {rule}" if rule else "")
        + f", output {plan.output}, dtype {plan.dtype or '(as stored)'} -> "
        f"{plan.out_dtype or plan.dtype or '(as stored)'}; full checkpoints, merged by "
        "mergekit's planner one tensor at a time",
        f"base model: {plan.base.ref} ({plan.architecture}"
        + (f", {plan.base.shards} shard(s), {len(plan.base.tensors)} tensors, "
           f"{size / 2**20:.2f} MiB)" if plan.base.tensors is not None else ", not checked)"),
        f"fine-tunes ({len(plan.models)}):",
    ]  # fmt: skip
    for i, m in enumerate(plan.models):
        state = (
            "not checked" if m.tensors is None
            else f"{m.shards} shard(s), every base tensor present with the base's shape"
        )  # fmt: skip
        lines.append(f"  [{i}] {m.label} {m.ref}: {state}")
    low = [t for t in plan.tensors if t.low_rank]
    k = plan.task_rank or plan.rank
    lines.append(
        f"tensors ({len(plan.tensors)}): {len(low)} low-rank (2-D, no vocabulary axis: each "
        f"ΔW_t compressed to rank {k or 'min(n, m)'}, merged to rank "
        f"{plan.rank or '(lossless)'}), {len(plan.tensors) - len(low)} dense "
        f"({'base rule ' + rule if rule else 'mean'} on ΔW_t)"
    )
    groups: dict[tuple[str, tuple[int, ...], bool], int] = {}
    for t in plan.tensors:
        key = (_LAYER.sub(".*.", t.name), t.shape, t.low_rank)
        groups[key] = groups.get(key, 0) + 1
    width = max((len(n) for n, _, _ in groups), default=10)
    for (name, shape, lr), count in groups.items():
        lines.append(
            f"  {name.ljust(width)}  {shape_text(shape):>11}  ×{count:<3} "
            + ("low-rank" if lr else "dense")
        )
    largest, peak = plan.largest()
    if largest is not None:
        lines.append(
            f"estimated peak working memory: {plan.peak_bytes() / 2**20:.2f} MiB "
            f"({peak / 2**20:.2f} MiB for its largest tensor in flight, {largest.name}, with "
            f"{len(plan.models)} fine-tunes; {plan.writer_bytes() / 2**20:.2f} MiB of "
            "mergekit's writer buffer, its shards capped at 64 MiB; plus "
            f"the interpreter and torch, and up to {plan.mapped_bytes() / 2**20:.2f} MiB of "
            "the inputs' file pages, which mergekit maps and the kernel may drop)"
        )
    lines += [f"note: {n}" for n in plan.notes]
    return "\n".join(lines)


@dataclass
class Retention:
    """ρ̄(t) for each input adapter: mean over its modules of ρ^(t),i (CtM paper,
    arXiv:2606.03723, App. D.1)."""

    inputs: list[str]
    per_module: list[dict[str, float]]

    def mean(self, t: int) -> float:
        vals = list(self.per_module[t].values())
        return sum(vals) / len(vals) if vals else float("nan")


def retention_ratio(
    merged_A: torch.Tensor,
    merged_B: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    scaling: float = 1.0,
) -> float:
    """ρ = ‖U Uᵀ ΔW_t V Vᵀ‖_F / ‖ΔW_t‖_F, (U, V) the singular subspaces of ΔW = B_m A_m.

    Factored, in float64: U spans range(B_m), V spans range(A_mᵀ) restricted to the nonzero
    singular values of ΔW, so ‖Uᵀ ΔW_t V‖_F = s ‖(Uᵀ B_t)(A_t V)‖_F.
    """
    bm, am = merged_B.double(), merged_A.double()
    qb, rb = torch.linalg.qr(bm)
    qa, ra = torch.linalg.qr(am.T)
    core = rb @ ra.T
    p, s, qh = torch.linalg.svd(core)
    keep = s > 1e-12 * (s[0] if s.numel() else 0)
    u = qb @ p[:, keep]
    v = qa @ qh.T[:, keep]
    b, a = B.double(), A.double()
    proj = (u.T @ b) @ (a @ v)
    num = torch.linalg.norm(proj)
    den = torch.sqrt(torch.clamp(torch.trace((b.T @ b) @ (a @ a.T)), min=0.0))
    if den == 0:
        return float("nan")
    return float(num / den)  # scaling cancels


def energy_retention(out_path: str, inputs: Sequence[str]) -> Retention:
    """ρ^(t),i for every input t and every module i it shares with the merged adapter."""
    merged = read_adapter(out_path)
    infos = [read_adapter(p) for p in inputs]
    per_module: list[dict[str, float]] = []
    for info in infos:
        rows: dict[str, float] = {}
        for name in info.modules:
            if name not in merged.modules:
                continue
            got, want = info.modules[name].delta_shape, merged.modules[name].delta_shape
            if got != want:
                raise AdapterError(
                    f"input adapter {info.ref!r}, module {name}: ΔW is {got[0]} × {got[1]} but "
                    f"the merged adapter {out_path!r} has {want[0]} × {want[1]}; pass the "
                    "adapters this merge was made from"
                )
            am, bm, sm = load_factors(merged, name, dtype=torch.float64)
            a, b, s = load_factors(info, name, dtype=torch.float64)
            rows[name] = retention_ratio(am * sm, bm, a, b, s)
        if not rows:
            raise AdapterError(
                f"adapter {info.ref!r} shares no module with merged adapter {out_path!r}"
            )
        per_module.append(rows)
    return Retention(inputs=[i.ref for i in infos], per_module=per_module)


def format_retention(table: Retention) -> str:
    width = max(len(x) for x in table.inputs)
    lines = [f"{'adapter'.ljust(width)}  modules  mean ρ̄   min     max"]
    for t, name in enumerate(table.inputs):
        vals = list(table.per_module[t].values())
        lines.append(
            f"{name.ljust(width)}  {len(vals):7d}  {table.mean(t):.4f}  {min(vals):.4f}  "
            f"{max(vals):.4f}"
        )
    return "\n".join(lines)


def plot_retention(table: Retention, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise click_error("--plot needs matplotlib: pip install matplotlib") from exc
    fig, ax = plt.subplots(figsize=(max(4, 0.8 * len(table.inputs) + 2), 3))
    means = [table.mean(t) for t in range(len(table.inputs))]
    labels = [x.rstrip("/").split("/")[-1] for x in table.inputs]
    ax.bar(range(len(means)), means)
    ax.set_xticks(range(len(means)), labels, rotation=30, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("energy retention ρ̄")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def click_error(msg: str) -> Exception:
    import click

    return click.ClickException(msg)
