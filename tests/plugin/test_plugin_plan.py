"""The task graph: chunks of modules with identical parameters, streamed chunk by chunk."""

from __future__ import annotations

import pytest
from conftest import write_recipe
from mergekit.options import MergeOptions

from mergekit_ctm.engine.api import MAX_CHUNK
from mergekit_ctm.plan.run import merge_tasks, plan_adapter_tasks
from mergekit_ctm.plan.tasks import MergeChunk
from mergekit_ctm.recipe import build_plan


def _walk(task, seen):
    if id(task) in seen:
        return
    seen[id(task)] = task
    for dep in task.arguments().values():
        _walk(dep, seen)


def test_chunks_group_equal_parameters_and_read_their_own_factors(example, tmp_path):
    text = write_recipe(
        tmp_path / "r.yml", example, "ctm", parameters={"rank": 4, "beta": [0.2, 0.8]}
    ).read_text()  # a gradient: beta differs between the two layers' modules
    plan = build_plan(text)
    merges = merge_tasks(plan)
    chunks = {id(m.chunk): m.chunk for m in merges.values()}.values()
    assert all(len(c.modules) <= MAX_CHUNK for c in chunks)
    for c in chunks:  # one parameter set per chunk, every module of the plan in one chunk
        params = {dict(m.params)["beta"] for m in plan.modules if m.name in c.modules}
        assert len(params) == 1
    assert sorted(n for c in chunks for n in c.modules) == sorted(m.name for m in plan.modules)
    assert len(chunks) >= 2
    by_name = {m.name: m for m in plan.modules}
    seen: dict = {}
    for task in plan_adapter_tasks(plan, str(tmp_path / "out"), MergeOptions()):
        _walk(task, seen)
    found = [t for t in seen.values() if isinstance(t, MergeChunk)]
    assert len(found) == len(chunks)
    for chunk in found:
        # a chunk depends on no task: it reads its modules' factors itself, on the workers
        # that solve them, so nothing is read ahead of its chunk (memory stays a chunk's)
        assert chunk.arguments() == {}
        assert chunk.adapters == tuple(
            tuple(plan.adapters[i].path for i in by_name[m].adapters) for m in chunk.modules
        )
        assert chunk.device == "cpu"


def test_solve_workers_come_from_j_or_the_cpus_this_process_may_use(example, tmp_path, monkeypatch):
    """-j/--num-threads sets the worker count; without it, os.sched_getaffinity (taskset,
    cpusets), else os.cpu_count(); one worker on a GPU. Every chunk of the plan carries it."""
    import os

    from mergekit_ctm.engine.api import available_cpus
    from mergekit_ctm.plan.run import solve_workers

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 2, 5}, raising=False)
    assert available_cpus() == 3 and solve_workers(MergeOptions()) == 3
    assert solve_workers(MergeOptions(num_threads=5)) == 5
    assert solve_workers(MergeOptions(device="cuda")) == 1
    monkeypatch.delattr(os, "sched_getaffinity")
    monkeypatch.setattr(os, "cpu_count", lambda: 7)
    assert available_cpus() == 7

    text = write_recipe(tmp_path / "r.yml", example, "ctm", parameters={"rank": 4}).read_text()
    plan = build_plan(text)
    seen: dict = {}
    for task in plan_adapter_tasks(plan, str(tmp_path / "out"), MergeOptions(num_threads=4)):
        _walk(task, seen)
    chunks = [t for t in seen.values() if isinstance(t, MergeChunk)]
    assert chunks and {c.workers for c in chunks} == {4}


def test_a_failing_chunk_stops_the_merge_and_later_chunks_are_never_read(
    example, tmp_path, monkeypatch
):
    """Chunks are queued one ahead of the Executor: an error in one reaches the caller
    unchanged, the chunks after the next one are never read, and nothing is written."""
    import mergekit_ctm.engine.api as api
    import mergekit_ctm.plan.tasks as tasks
    from mergekit_ctm.plan.run import run_adapter_merge

    monkeypatch.setattr(api, "MAX_CHUNK", 1)  # one module per chunk
    text = write_recipe(tmp_path / "r.yml", example, "ctm", parameters={"rank": 4}).read_text()
    plan = build_plan(text)
    assert len(plan.modules) >= 4
    real, read = tasks.load_module, []

    def load(paths, module, dtype, device):
        read.append(module)
        if module == plan.modules[0].name:
            raise OSError("adapter 0: short read")
        return real(paths, module, dtype, device)

    monkeypatch.setattr(tasks, "load_module", load)
    out = tmp_path / "out"
    with pytest.raises(OSError, match="adapter 0: short read"):
        run_adapter_merge(text, str(out), MergeOptions(quiet=True, num_threads=1))
    assert not out.exists()
    assert set(read) <= {m.name for m in plan.modules[:2]}  # the failing chunk and the next
