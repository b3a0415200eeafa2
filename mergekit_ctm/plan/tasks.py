"""mergekit Task graph nodes for adapter merging (streamed by mergekit's Executor).

Per target module::

    MergeChunk (≤ MAX_CHUNK modules: reads their factors, batched solve) ─► MergeModule
        ─► PeftFactor(A), PeftFactor(B) ─► SaveTensor
        └► ModuleRank ─► FinalizeAdapter

Every field hashes and compares by value (strings, numbers, tuples), and tasks return tuples,
so the Executor can deduplicate nodes and move tensors between devices. All tasks of one
module share its ``group_label``, so the scheduler finishes a module before the next and its
factors are freed once saved: memory does not grow with the number of layers.
"""

from __future__ import annotations

import contextlib
import logging
import os
import weakref
from collections.abc import Iterator
from contextvars import ContextVar
from functools import lru_cache, partial
from typing import Any

import torch
from mergekit.graph import Task
from mergekit.io.tasks import LoadTensor, TensorWriterTask

from mergekit_ctm.adapters import AdapterInfo, load_factors, load_full_tensor, read_adapter
from mergekit_ctm.adapters.peft_lora import swap_layout
from mergekit_ctm.adapters.writer import consolidate_shards

LOG = logging.getLogger(__name__)


def _stamp(path: str) -> tuple:
    """(name, mtime, size) of the adapter's files: a rewritten adapter is read again."""
    try:
        entries = sorted(os.scandir(path), key=lambda e: e.name)
        return tuple((e.name, e.stat().st_mtime_ns, e.stat().st_size) for e in entries)
    except OSError:
        return ()


@lru_cache(maxsize=256)
def _adapter_info(path: str, stamp: tuple) -> AdapterInfo:
    return read_adapter(path)


def adapter_info(path: str) -> AdapterInfo:
    """AdapterInfo of a resolved local adapter directory (headers only), cached per process
    and keyed by the files' mtimes and sizes, so long-lived Python sessions never see stale
    headers of an adapter rewritten in place."""
    return _adapter_info(path, _stamp(path))


def math_dtype(name: str | None) -> torch.dtype:
    """Engine math dtype: float64 when asked for, else float32 (SVDs never run in half)."""
    return torch.float64 if name == "float64" else torch.float32


def rule_kwargs(rule_params: tuple[tuple[str, Any], ...]) -> dict[str, Any]:
    """Base-rule parameters as the engine takes them: per-adapter values as lists."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in rule_params}


def log_solve(module: str, info: dict[str, Any], params: dict[str, Any]) -> None:
    """-vv: the module's HOOI sweeps and residual; always: a warning when HOOI stopped at
    hooi_iters before its change fell below hooi_tol (the subspace is then not converged)."""
    if "hooi_sweeps" not in info:
        return
    errors = info.get("hooi_errors") or [float("nan")]
    LOG.debug(
        "%s: %d HOOI sweeps, relative residual %.3e, converged %s",
        module, info["hooi_sweeps"], errors[-1], info["hooi_converged"],
    )  # fmt: skip
    if not info["hooi_converged"]:
        change = abs(errors[-1] - errors[-2]) / max(errors[-1], 1e-300) if len(errors) > 1 else 0
        LOG.warning(
            "%s: HOOI stopped at hooi_iters=%s sweeps without reaching hooi_tol=%s (last "
            "relative change %.2e); raise hooi_iters for the converged subspace",
            module, params.get("hooi_iters"), params.get("hooi_tol"), change,
        )  # fmt: skip


def load_module(
    adapter_paths: tuple[str, ...], module: str, dtype: str | None, device: str
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[float]]:
    """(As, Bs, scalings) of one module from each adapter that has it, in the base weight
    layout (ΔWₜ = sₜ·Bₜ·Aₜ), on ``device``; NaN/Inf raises AdapterError naming the adapter."""
    got = [
        load_factors(adapter_info(p), module, device=device, dtype=math_dtype(dtype))
        for p in adapter_paths
    ]
    return [a for a, _, _ in got], [b for _, b, _ in got], [float(s) for _, _, s in got]


_QUEUED: ContextVar[weakref.WeakSet | None] = ContextVar("mergekit_ctm_queued", default=None)


@contextlib.contextmanager
def cancel_queued_on_error() -> Iterator[None]:
    """Run a merge's Executor in this block: if it fails (or Ctrl-C), the chunks MergeChunk
    queued and no worker has started yet are dropped instead of running on in the
    background (the running ones finish)."""
    queued: weakref.WeakSet = weakref.WeakSet()  # not the results: the Executor frees those
    token = _QUEUED.set(queued)
    try:
        yield
    except BaseException:
        for pending in list(queued):
            pending.cancel()
        raise
    finally:
        _QUEUED.reset(token)


class MergeChunk(Task[Any]):
    """engine.submit_lora_many over modules that share every parameter: batched calls, the
    core problems on the process-wide solve threads (engine.solve_pool), each single-threaded
    (the bytes do not depend on the thread count). Each worker reads its own modules' factors
    just before solving them, so reading overlaps the other workers' solves and no factor is
    read ahead of its chunk. The task returns at once with the queued merge (PendingMerge),
    which the chunk's MergeModules wait on; it is scheduled with the chunk before it
    (``after``), so the workers go on with it while the Executor saves that one: at most two
    chunks are in memory. ΔW = B A per module, scaling 1."""

    label: str
    after: str | None = None  # the previous chunk's label: scheduled in that group
    modules: tuple[str, ...]
    adapters: tuple[tuple[str, ...], ...]  # per module, the adapter paths that have it
    method: str
    params: tuple[tuple[str, Any], ...]
    rule_params: tuple[tuple[str, Any], ...]
    seeds: tuple[int, ...]
    dtype: str | None = None
    workers: int | None = None  # solve threads (plan.run.solve_workers); bytes do not depend on it
    device: str = "cpu"  # the math device (--cuda); factors are read straight onto it

    def arguments(self) -> dict[str, Task]:
        return {}

    def uses_accelerator(self) -> bool:
        return True

    def group_label(self) -> str | None:
        return self.after or self.label

    def priority(self) -> int:
        return 1  # before the tasks of the group it joins, which wait on the chunk before

    def execute(self) -> Any:
        from mergekit_ctm.engine.api import available_cpus, solve_pool, submit_lora_many

        workers = self.workers or (available_cpus() if self.device == "cpu" else 1)
        sources = [
            partial(load_module, paths, module, self.dtype, self.device)
            for module, paths in zip(self.modules, self.adapters)
        ]
        pending = submit_lora_many(
            solve_pool(workers),
            sources,
            seeds=list(self.seeds),
            method=self.method,
            rule_params=rule_kwargs(self.rule_params),
            dtype=math_dtype(self.dtype),
            workers=workers,
            **dict(self.params),
        )
        queued = _QUEUED.get()
        if queued is not None:
            queued.add(pending)
        return pending


class MergeModule(Task[tuple]):
    """One module's (A, B, requested_rank) out of its chunk's batched merge."""

    chunk: MergeChunk
    index: int

    @property
    def module(self) -> str:
        return self.chunk.modules[self.index]

    def arguments(self) -> dict[str, Task]:
        return {"chunk": self.chunk}

    def group_label(self) -> str | None:
        return self.chunk.label

    def execute(self, chunk: Any) -> tuple:
        out = chunk.result()[self.index]
        log_solve(self.module, out.info, dict(self.chunk.params))
        return (out.A, out.B, int(out.requested_rank))


class PeftFactor(Task[torch.Tensor]):
    """lora_A or lora_B in PEFT's storage layout (Conv1D / Embedding store transposes)."""

    merge: MergeModule
    which: str  # "A" | "B"
    transposed: bool

    def arguments(self) -> dict[str, Task]:
        return {"merged": self.merge}

    def group_label(self) -> str | None:
        return self.merge.chunk.label

    def execute(self, merged: tuple) -> torch.Tensor:
        a, b = swap_layout(merged[0], merged[1], self.transposed)
        return (a if self.which == "A" else b).contiguous()


class ModuleRank(Task[tuple]):
    """(module, directions produced, requested rank): feeds the adapter config."""

    merge: MergeModule

    def arguments(self) -> dict[str, Task]:
        return {"merged": self.merge}

    def group_label(self) -> str | None:
        return self.merge.chunk.label

    def execute(self, merged: tuple) -> tuple:
        return (self.merge.module, int(merged[0].shape[0]), int(merged[2]))


class ApplyDelta(Task[torch.Tensor]):
    """W + B A for output: model, computed in the math dtype, in the base weight's layout."""

    base: LoadTensor
    merge: MergeModule
    dtype: str | None = None

    def arguments(self) -> dict[str, Task]:
        return {"weight": self.base, "merged": self.merge}

    def uses_accelerator(self) -> bool:
        return True

    def group_label(self) -> str | None:
        return self.merge.chunk.label

    def execute(self, weight: torch.Tensor, merged: tuple) -> torch.Tensor:
        dt = math_dtype(self.dtype)
        a, b = merged[0].to(weight.device, dt), merged[1].to(weight.device, dt)
        return (weight.to(dt) + b @ a).to(weight.dtype)


class LoadDense(Task[torch.Tensor]):
    """A modules_to_save / bias tensor saved in an adapter."""

    adapter_path: str
    key: str
    dtype: str | None = None

    def arguments(self) -> dict[str, Task]:
        return {}

    def execute(self) -> torch.Tensor:
        return load_full_tensor(
            adapter_info(self.adapter_path), self.key, dtype=math_dtype(self.dtype)
        )

    def group_label(self) -> str | None:
        return self.key

    def priority(self) -> int:
        return -1000


class MergeDense(Task[torch.Tensor]):
    """Merge full tensors with the rule: base + rule(x_t − base), or rule(x_t) without a base.

    One source passes through unchanged.
    """

    key: str
    sources: tuple[LoadDense, ...]
    base: LoadTensor | None = None
    rule: str
    rule_params: tuple[tuple[str, Any], ...]
    seed: int

    def arguments(self) -> dict[str, Task]:
        args: dict[str, Task] = {f"x{i}": s for i, s in enumerate(self.sources)}
        if self.base is not None:
            args["base"] = self.base
        return args

    def uses_accelerator(self) -> bool:
        return True

    def group_label(self) -> str | None:
        return self.key

    def execute(self, base: torch.Tensor | None = None, **kwargs: torch.Tensor) -> torch.Tensor:
        from mergekit_ctm.engine.rules import merge_matrices

        xs = [kwargs[f"x{i}"] for i in range(len(self.sources))]
        if len(xs) == 1:
            return xs[0]
        ref = base.to(xs[0].dtype) if base is not None else torch.zeros_like(xs[0])
        merged = merge_matrices(
            [x - ref for x in xs], self.rule, rule_kwargs(self.rule_params), seed=self.seed
        )
        return ref + merged


def finalize_arguments(
    writer: Task, saves: tuple[Task, ...], ranks: tuple[Task, ...], **more: tuple[Task, ...]
) -> dict[str, Task]:
    """Arguments of a task that closes an adapter: the writer, every save (so it runs last),
    every rank task as ``rank_i``, and each group of ``more`` as ``<name>_i``."""
    args: dict[str, Task] = {"writer": writer}
    args.update({f"_save_{i}": t for i, t in enumerate(saves)})
    args.update({f"rank_{i}": t for i, t in enumerate(ranks)})
    for name, tasks in more.items():
        args.update({f"{name}_{i}": t for i, t in enumerate(tasks)})
    return args


def close_adapter_files(
    writer: Any, out_path: str, produced: list[tuple[str, int, Any]], nothing: str
) -> dict[str, int]:
    """Close the writer and join its shards into adapter_model.safetensors; returns the ranks
    produced (module -> k > 0 of each (module, k, requested) in ``produced``), or raises
    RecipeError(``nothing``) when every module's update is zero."""
    writer.finalize()
    consolidate_shards(out_path, "adapter_model")
    ranks = {m: k for m, k, _ in produced if k > 0}
    if not ranks:
        from mergekit_ctm.recipe import RecipeError

        raise RecipeError(nothing)
    return ranks


class FinalizeAdapter(Task[dict]):
    """Close the writer, then write adapter_config.json from the ranks actually produced."""

    writer_task: TensorWriterTask
    save_tasks: tuple[Task, ...]
    rank_tasks: tuple[ModuleRank, ...]
    adapter_paths: tuple[str, ...]
    rank: int | None
    base_model: str | None
    out_path: str

    def arguments(self) -> dict[str, Task]:
        return finalize_arguments(self.writer_task, self.save_tasks, self.rank_tasks)

    def main_thread_only(self) -> bool:
        return True

    def execute(self, writer: Any, **kwargs: Any) -> dict:
        import json
        import os

        from mergekit_ctm.adapters import build_adapter_config

        produced = [kwargs[f"rank_{i}"] for i in range(len(self.rank_tasks))]
        ranks = close_adapter_files(
            writer,
            self.out_path,
            produced,
            "every module's merged update is zero (the adapters' updates are all zero, or "
            "they cancel): there is no LoRA to write",
        )
        requested = {m: r for m, _, r in produced}
        r = self.rank if self.rank is not None else max(ranks.values())
        config = build_adapter_config(
            ranks,
            rank=r,
            inputs=[adapter_info(p) for p in self.adapter_paths],
            base_model_name_or_path=self.base_model,
        )
        with open(os.path.join(self.out_path, "adapter_config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, sort_keys=True)
        return {"ranks": ranks, "requested": requested, "config": config}
