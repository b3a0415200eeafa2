"""Public entry points of the engine: ``merge_lora`` and ``merge_lora_many``.

Method parameters, their defaults and constraints come from :mod:`.methods`, one description
per method; they arrive here under their declared names (``lambda`` too; ``lam`` is accepted
as its Python spelling).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any

import torch

from mergekit_ctm.engine.linalg import tiny_cpu_ops
from mergekit_ctm.engine.methods import (
    METHODS,
    MergeMethodDef,
    get_method,
    run_ctm_many,
)
from mergekit_ctm.engine.types import MergedLora


def _check_inputs(As, Bs, scalings) -> tuple[int, int]:
    if not (len(As) == len(Bs) == len(scalings)) or not As:
        raise ValueError(
            f"merge_lora needs equally many A factors, B factors and scalings (≥ 1); got "
            f"{len(As)}, {len(Bs)}, {len(scalings)}"
        )
    n, m = Bs[0].shape[0], As[0].shape[1]
    device = As[0].device
    for t, (A, B) in enumerate(zip(As, Bs)):
        if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1]:
            raise ValueError(
                f"adapter {t}: expected A (r × m) and B (n × r) with the same r; got A "
                f"{tuple(A.shape)}, B {tuple(B.shape)}"
            )
        if B.shape[0] != n or A.shape[1] != m:
            raise ValueError(
                f"adapter {t}: ΔW is {B.shape[0]} × {A.shape[1]} but adapter 0's is {n} × {m}"
            )
        if A.device != device or B.device != device:
            raise ValueError(f"adapter {t}: all factors must be on {device}")
        if not (A.is_floating_point() and B.is_floating_point()):
            raise ValueError(f"adapter {t}: factors must be floating point")
    return n, m


def _all_zero(As, Bs, scalings) -> bool:
    """Every ΔWₜ = sₜ Bₜ Aₜ is exactly zero (e.g. PEFT's untrained B = 0)."""
    return all(
        s == 0 or not bool(A.any()) or not bool(B.any()) for A, B, s in zip(As, Bs, scalings)
    )


def _zero_update(As, Bs, method: str, rank: int | None, dtype) -> MergedLora:
    """The merge of updates that are all zero: rank 0 (B n × 0, A 0 × m)."""
    n, m = Bs[0].shape[0], As[0].shape[1]
    dtype = torch.float64 if dtype == torch.float64 else torch.float32
    out = MergedLora(
        A=As[0].new_zeros(0, m, dtype=dtype),
        B=Bs[0].new_zeros(n, 0, dtype=dtype),
        requested_rank=rank if rank is not None else 0,
        info={"method": method, "zero_inputs": True},
    )
    out.info["note"] = "every input update is zero: the merged update is zero (rank 0)"
    return out


def _bind(method: str, params: Mapping[str, Any], dtype) -> tuple[MergeMethodDef, dict[str, Any]]:
    """The method and its parameters, validated against its description, defaults filled."""
    definition = get_method(method)
    params = dict(params)
    if "lam" in params:
        params["lambda"] = params.pop("lam")
    if "rank" in params and params["rank"] is None and method != "core_space":
        raise ValueError(f"method {method!r} needs a rank (only core_space can be lossless)")
    # A parameter of another method (beta for mtc, ...) is checked against its own
    # declaration and not used, so one set of keyword arguments serves every method.
    others = {p.name: (m, p) for m in METHODS.values() for p in m.parameters}
    for name in set(params) - set(definition.parameter_names):
        if name in others:
            m, _ = others[name]
            m.bind({name: params.pop(name)})
    bound = definition.bind(params)
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"math dtype must be torch.float32 or torch.float64, got {dtype}")
    return definition, bound


def _note_rank(out: MergedLora) -> MergedLora:
    if out.rank_deficient and "note" not in out.info:
        out.info["note"] = (
            f"only {out.rank} nonzero directions exist (requested {out.requested_rank}); "
            f"the output has rank {out.rank}, not padded with zeros"
        )
    return out


def merge_lora(
    As: Sequence[torch.Tensor],
    Bs: Sequence[torch.Tensor],
    scalings: Sequence[float],
    *,
    method: str = "ctm",
    rule_params: Mapping[str, Any] | None = None,
    seed: int | None = None,
    dtype: torch.dtype = torch.float32,
    **params: Any,
) -> MergedLora:
    """Merge T LoRA updates ΔWₜ = sₜ Bₜ Aₜ into one LoRA: ΔW = B A with rank ≤ ``rank``.

    Args:
        As, Bs, scalings: Aₜ (rₜ × m), Bₜ (n × rₜ), sₜ; ranks may differ. Any float dtype
            (bf16 is upcast: SVDs never run in half precision); all on one device.
        method: "ctm" | "core_space" | "mtc" | "lora_lego" (:data:`.methods.METHODS`).
        rule_params: the base rule's mergekit-style parameters (per-adapter ``weight``,
            ``density``, …); see ``engine.rules``.
        seed: per-module seed for random rules (DARE, DELLA) and LoRA-LEGO's k-means.
        dtype: math dtype (float32 | float64) of the n × Σrₜ work; the core is float64.
        **params: the method's own parameters by their declared names, e.g. ``rank``,
            ``beta``, ``base_rule``, ``space``, ``hooi_iters``, ``hooi_tol``, ``lambda``
            (or ``lam``); defaults and constraints as :mod:`.methods` declares them
            (``rank=None`` only for core_space: lossless, rank Σ rₜ).

    Returns:
        MergedLora with balanced factors, scaling 1, ``rank`` ≤ requested (fewer when the
        inputs span fewer directions; ``info`` says so).
    """
    _check_inputs(As, Bs, scalings)
    definition, p = _bind(method, params, dtype)
    if _all_zero(As, Bs, scalings):
        return _zero_update(As, Bs, method, p.get("rank"), dtype)
    out = definition.run(As, Bs, scalings, p, rule_params=rule_params, seed=seed, dtype=dtype)
    return _note_rank(out)


MAX_CHUNK = 16  # modules per batched solve; larger batches hold the GIL less per module

Factors = tuple[Sequence[torch.Tensor], Sequence[torch.Tensor], Sequence[float]]


def available_cpus() -> int:
    """CPUs this process may run on: ``os.sched_getaffinity(0)`` (taskset, cpusets), else
    ``os.cpu_count()``, at least 1. The plugin's default worker count (docs/usage.md)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not on Linux
        return max(1, os.cpu_count() or 1)


def merge_lora_many(
    modules: Sequence[Factors | Callable[[], Factors]],
    *,
    seeds: Sequence[int | None] | None = None,
    method: str = "ctm",
    workers: int | None = None,
    rule_params: Mapping[str, Any] | None = None,
    dtype: torch.dtype = torch.float32,
    **params: Any,
) -> list[MergedLora]:
    """``merge_lora`` over many modules (each an (As, Bs, scalings) triple), same parameters.

    Modules go in chunks (≤ ``MAX_CHUNK``, at least two per worker); for ``ctm`` a chunk's core
    problems of equal shape are solved as one batch, which amortises the per-call overhead of
    the many tiny HOOI steps.
    ``workers`` threads merge chunks concurrently, each on one intra-op thread (default: the
    torch thread count for CPU inputs, 1 on CUDA): the tiny core problems are sequential
    LAPACK calls, so this is how they use several cores. With one worker the calling thread
    runs the chunks, also on one intra-op thread, so any worker count gives the same bits
    (and so does any torch thread count); each problem stops on its own criterion, so results
    equal per-module ``merge_lora`` calls up to floating-point rounding (its GEMMs use every
    thread). ``seeds``: one per module.

    A module may also be given as a zero-argument callable returning its triple: it is called
    on the worker that merges the module, just before its chunk is solved, so reading one
    chunk's factors overlaps the other workers' solves (and only the chunks in flight are in
    memory). Its errors propagate unchanged, the first chunk's first.
    """
    run, chunks, workers = _many(modules, seeds, method, workers, rule_params, dtype, params)
    if workers == 1:
        with tiny_cpu_ops(torch.device("cpu")):  # the same one-thread kernels as the workers
            return [o for idx in chunks for o in run(idx)]
    with tiny_cpu_ops(torch.device("cpu")), ThreadPoolExecutor(workers) as pool:
        return PendingMerge([pool.submit(run, idx) for idx in chunks]).result()


def submit_lora_many(
    pool: ThreadPoolExecutor,
    modules: Sequence[Factors | Callable[[], Factors]],
    *,
    seeds: Sequence[int | None] | None = None,
    method: str = "ctm",
    workers: int | None = None,
    rule_params: Mapping[str, Any] | None = None,
    dtype: torch.dtype = torch.float32,
    **params: Any,
) -> PendingMerge:
    """``merge_lora_many`` queued on ``pool`` (:func:`solve_pool`), returning at once.

    The modules are cut into one chunk per worker (at most MAX_CHUNK modules each) and run
    in the order queued, so calls queued one after another keep every worker busy across
    calls (one call's last chunks overlap the next one's first); the bytes are
    merge_lora_many's, which do not depend on how modules are chunked. Parameter errors
    raise here; input errors (and a source's) from ``result()``.
    """
    run, chunks, _ = _many(modules, seeds, method, workers, rule_params, dtype, params, 1)
    return PendingMerge([pool.submit(run, idx) for idx in chunks])


class PendingMerge:
    """Queued chunks of a :func:`submit_lora_many` call."""

    def __init__(self, futures: list[Future]) -> None:
        self._futures = futures

    def result(self) -> list[MergedLora]:
        """One MergedLora per module, in order; waits for every chunk, then raises the first
        chunk's error if any failed (so no chunk is still running when it raises)."""
        wait(self._futures)
        return [o for f in self._futures for o in f.result()]

    def cancel(self) -> None:
        """Drop the chunks no worker has started (the running ones finish)."""
        for f in self._futures:
            f.cancel()


_POOLS: dict[int, ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()


def solve_pool(workers: int) -> ThreadPoolExecutor:
    """The process-wide pool of ``workers`` solve threads (one per count, made on first use);
    each runs on one intra-op thread, so the bytes do not depend on the pool."""
    with _POOLS_LOCK:
        pool = _POOLS.get(workers)
        if pool is None:
            pool = _POOLS[workers] = ThreadPoolExecutor(
                max(1, workers), thread_name_prefix="mergekit-ctm-solve"
            )
        return pool


def _many(modules, seeds, method, workers, rule_params, dtype, params, per_worker: int = 2):
    """(run, chunks, workers) of merge_lora_many: ``run(chunk)`` merges one chunk of module
    indices on the calling thread, single-threaded. Chunks: at most MAX_CHUNK modules, at
    least ``per_worker`` per worker (two balance the workers of one call; queued calls are
    balanced by the next call's chunks, and one bigger batch per worker is ~10 % faster)."""
    params = dict(params)
    default_seed = params.pop("seed", None)
    seeds = list(seeds) if seeds is not None else [default_seed] * len(modules)
    _, p = _bind(method, params, dtype)
    if len(seeds) != len(modules):
        raise ValueError(f"got {len(seeds)} seeds for {len(modules)} modules")
    for module in modules:
        if not callable(module):
            _check_inputs(*module)

    def factors(idx: range) -> dict[int, Factors]:
        got = {i: modules[i]() if callable(modules[i]) else modules[i] for i in idx}
        for i in idx:
            if callable(modules[i]):
                _check_inputs(*got[i])
        return got

    if method == "ctm":

        def run(idx: range) -> list[MergedLora]:
            mods = factors(idx)
            live = [i for i in idx if not _all_zero(*mods[i])]
            outs = run_ctm_many(
                [mods[i] for i in live],
                [seeds[i] for i in live],
                p,
                rule_params=rule_params,
                dtype=dtype,
            )
            done = dict(zip(live, outs))
            return [
                _note_rank(done[i])
                if i in done
                else _zero_update(mods[i][0], mods[i][1], "ctm", p["rank"], dtype)
                for i in idx
            ]
    else:

        def run(idx: range) -> list[MergedLora]:
            mods = factors(idx)
            return [
                merge_lora(
                    *mods[i],
                    method=method,
                    seed=seeds[i],
                    rule_params=rule_params,
                    dtype=dtype,
                    **params,
                )
                for i in idx
            ]

    if workers is None:  # sources (callables) count as CPU inputs
        on_cpu = all(
            t.device.type == "cpu"
            for module in modules
            if not callable(module)
            for t in (*module[0], *module[1])
        )
        workers = torch.get_num_threads() if on_cpu else 1
    size = min(MAX_CHUNK, max(1, -(-len(modules) // (per_worker * max(workers, 1)))))
    chunks = [range(i, min(i + size, len(modules))) for i in range(0, len(modules), size)]
    return _single_threaded(run), chunks, max(1, min(workers, len(chunks)))


def _single_threaded(fn):
    """Run fn with one intra-op thread in the calling (worker) thread.

    A new thread takes the global thread count only at its first parallel ATen op, and
    LAPACK calls made before that would use the OpenMP default: set it explicitly.
    """

    def wrapped(*args):
        torch.set_num_threads(1)
        return fn(*args)

    return wrapped
