"""Plan and run an adapter merge on mergekit's Executor; stage the files and install them
into the output directory only when everything succeeded (:mod:`mergekit_ctm.plan.output`)."""

from __future__ import annotations

import logging
import os
import shutil
from typing import Any

import torch
from mergekit.common import ModelReference, dtype_from_name
from mergekit.graph import Executor, Task
from mergekit.io.tasks import FinalizeModel, LoadTensor, SaveTensor, TensorWriterTask
from mergekit.options import MergeOptions

from mergekit_ctm.adapters.peft_lora import stores_transposed
from mergekit_ctm.engine.linalg import tiny_cpu_ops
from mergekit_ctm.plan import card, output
from mergekit_ctm.plan.output import check_output_path
from mergekit_ctm.plan.tasks import (
    ApplyDelta,
    FinalizeAdapter,
    LoadDense,
    MergeChunk,
    MergeDense,
    MergeModule,
    ModuleRank,
    PeftFactor,
    cancel_queued_on_error,
)
from mergekit_ctm.recipe import MergePlan, build_plan

LOG = logging.getLogger(__name__)

ADAPTER_BUFFER = 2 * 2**20

TOKENIZER_FILES = (
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer.model",
    "added_tokens.json",
    "merges.txt",
    "vocab.json",
    "chat_template.jinja",
    "generation_config.json",
)


def recipe_source(merge_config: Any, config_source: str | None) -> str | dict[str, Any]:
    """The recipe to validate: the raw YAML when given (mergekit's model drops unknown keys)."""
    if config_source is not None:
        return config_source
    if isinstance(merge_config, (str, dict)):
        return merge_config
    return merge_config.model_dump(mode="json", exclude_none=True)


def solve_workers(options: MergeOptions) -> int:
    """Worker threads of each batched solve: ``-j/--num-threads`` when given, else the CPUs
    this process may use (``engine.api.available_cpus``); 1 on a GPU. Each worker runs on one
    intra-op thread, so the output bytes do not depend on this number."""
    from mergekit_ctm.engine.api import available_cpus

    if math_device(options) != "cpu":
        return 1
    return max(1, options.num_threads or available_cpus())


def math_device(options: MergeOptions) -> str:
    """The device the merge math runs on: ``--cuda`` / ``--device``, else the CPU."""
    return str(options.device or "cpu")


def merge_tasks(
    plan: MergePlan, workers: int | None = None, device: str = "cpu"
) -> dict[str, MergeModule]:
    """Module name -> its merge. Consecutive modules with identical parameters form a chunk of
    at most MAX_CHUNK, solved in batched engine calls on ``workers`` threads (None: the CPUs
    this process may use) on the math ``device``; each chunk is scheduled with the one before
    it, so memory stays two chunks' factors."""
    from mergekit_ctm.engine.api import MAX_CHUNK

    chunks: list[list[Any]] = []
    for module in plan.modules:
        key = (module.params, module.rule_params)
        last = chunks[-1] if chunks else None
        if last and len(last) < MAX_CHUNK and (last[0].params, last[0].rule_params) == key:
            last.append(module)
        else:
            chunks.append([module])
    out: dict[str, MergeModule] = {}
    after = None
    for k, members in enumerate(chunks):
        label = f"chunk:{k:06d}:{members[0].name}"  # the Executor orders groups by label
        chunk = MergeChunk(
            label=label,
            after=after,
            modules=tuple(m.name for m in members),
            adapters=tuple(tuple(plan.adapters[i].path for i in m.adapters) for m in members),
            method=plan.method,
            params=members[0].params,
            rule_params=members[0].rule_params,
            seeds=tuple(m.seed for m in members),
            dtype=plan.dtype,
            workers=workers,
            device=device,
        )
        out.update({m.name: MergeModule(chunk=chunk, index=j) for j, m in enumerate(members)})
        after = label
    return out


def _dense_task(plan: MergePlan, dense: Any, base_index: Any) -> MergeDense:
    base = None
    if base_index is not None and dense.weight_name in base_index:
        base = LoadTensor(
            model=ModelReference.parse(plan.base_path or plan.base_model),
            tensor=dense.weight_name,
            dtype=plan.dtype,
        )
    return MergeDense(
        key=dense.key,
        sources=tuple(
            LoadDense(adapter_path=plan.adapters[i].path, key=k, dtype=plan.dtype)
            for i, k in dense.sources
        ),
        base=base,
        rule=dense.rule,
        rule_params=dense.rule_params,
        seed=dense.seed,
    )


def _base_index(plan: MergePlan) -> set[str] | None:
    if not plan.base_model or not os.path.isdir(plan.base_model):
        return None
    from mergekit.io import ShardedTensorIndex

    try:
        return set(ShardedTensorIndex.from_disk(plan.base_model).tensor_paths)
    except Exception:
        return None


def plan_adapter_tasks(plan: MergePlan, out_path: str, options: MergeOptions) -> list[Task]:
    """Tasks writing a PEFT adapter into ``out_path``; the last one returns the produced ranks."""
    # Shards of at most ADAPTER_BUFFER bytes bound the writer's memory; FinalizeAdapter joins
    # them into the single adapter_model.safetensors that PEFT loads.
    writer = TensorWriterTask(
        out_path=out_path,
        max_shard_size=min(options.out_shard_size, ADAPTER_BUFFER),
        safe_serialization=True,
        override_basename="adapter_model",
    )
    saves: list[Task] = []
    ranks: list[ModuleRank] = []
    merges = merge_tasks(plan, solve_workers(options), math_device(options))
    for module in plan.modules:
        merge = merges[module.name]
        transposed = stores_transposed(module)
        for which, key in (("A", module.key_A), ("B", module.key_B)):
            saves.append(
                SaveTensor(
                    tensor_name=key,
                    tensor_task=PeftFactor(merge=merge, which=which, transposed=transposed),
                    writer_task=writer,
                    clone=options.clone_tensors,
                    dtype=plan.out_dtype,
                )
            )
        ranks.append(ModuleRank(merge=merge))
    base_index = _base_index(plan)
    for dense in plan.dense:
        saves.append(
            SaveTensor(
                tensor_name=dense.key,
                tensor_task=_dense_task(plan, dense, base_index),
                writer_task=writer,
                clone=options.clone_tensors,
                dtype=plan.out_dtype,
            )
        )
    rank = plan.modules[0].param("rank") if plan.modules else None
    finalize = FinalizeAdapter(
        writer_task=writer,
        save_tasks=tuple(saves),
        rank_tasks=tuple(ranks),
        adapter_paths=tuple(a.path for a in plan.adapters),
        rank=rank,
        base_model=plan.base_model,
        out_path=out_path,
    )
    return [*saves, finalize]


def base_tensors(base_path: str) -> dict[str, tuple[torch.dtype, tuple[int, ...]]] | None:
    """Base tensor name -> (dtype, shape), in the base's index order: from the safetensors
    headers, or from ``.bin`` shards loaded onto the meta device (no tensor data). None when a
    dtype has no safetensors code (then mergekit's TensorWriter writes the model)."""
    from mergekit.io import ShardedTensorIndex

    from mergekit_ctm.adapters.peft_lora import read_safetensors_header
    from mergekit_ctm.plan.stream import CODE, DTYPE

    index = ShardedTensorIndex.from_disk(base_path)
    found: dict[str, tuple[torch.dtype | None, tuple[int, ...]]] = {}
    for shard in dict.fromkeys(index.tensor_paths.values()):
        path = os.path.join(base_path, shard)
        if index.is_safetensors:
            for k, meta in read_safetensors_header(path, what="base model: ").items():
                found[k] = (DTYPE.get(meta["dtype"]), tuple(meta["shape"]))
        else:
            state = torch.load(path, map_location="meta", weights_only=True)
            state = state.get("state_dict", state)
            found.update({k: (v.dtype, tuple(v.shape)) for k, v in state.items()})
    out = {name: found[name] for name in index.tensor_paths}
    if any(dt not in CODE for dt, _ in out.values()):
        return None
    return out  # type: ignore[return-value]


def model_writer(
    plan: MergePlan,
    out_path: str,
    options: MergeOptions,
    names: list[str],
    base: dict[str, tuple[torch.dtype, tuple[int, ...]]] | None,
) -> TensorWriterTask:
    """The writer of output: model. Safetensors output streams (plan/stream.py): each tensor
    is written at its planned offset as it is produced, so memory does not grow with the
    shard size and --out-shard-size only sets how the files are split. ``--no-safe-
    serialization`` (torch.save needs a whole shard in memory) and a base with a dtype that
    safetensors has no code for use mergekit's TensorWriter, which holds up to
    --out-shard-size bytes. ``base``: :func:`base_tensors` of the base."""
    from mergekit_ctm.plan.stream import StreamingWriterTask, plan_layout

    if base is not None and options.safe_serialization:
        out = dtype_from_name(plan.recipe.out_dtype)
        specs = [(n, out or base[n][0], base[n][1]) for n in names]
        return StreamingWriterTask(
            out_path=out_path,
            max_shard_size=options.out_shard_size,
            layout=plan_layout(specs, options.out_shard_size),
        )
    LOG.info(
        "output: model is written with mergekit's TensorWriter, which holds up to "
        "--out-shard-size (%d) bytes in memory",
        options.out_shard_size,
    )
    return TensorWriterTask(
        out_path=out_path,
        max_shard_size=options.out_shard_size,
        safe_serialization=options.safe_serialization,
    )


def plan_model_tasks(plan: MergePlan, out_path: str, options: MergeOptions) -> list[Task]:
    """Tasks writing the base model with every merged ΔW = B A added, tensor by tensor.

    Each tensor is written in ``out_dtype``, else in the base tensor's dtype (merged
    modules_to_save / bias tensors too, which are computed in the math dtype)."""
    from mergekit.io import ShardedTensorIndex

    base_path = plan.base_path or plan.base_model
    base_ref = ModelReference.parse(base_path)
    index = ShardedTensorIndex.from_disk(base_path)
    names = list(index.tensor_paths)
    base = base_tensors(base_path)
    writer = model_writer(plan, out_path, options, names, base)
    by_weight: dict[str, Task] = {}
    merges = merge_tasks(plan, solve_workers(options), math_device(options))
    for module in plan.modules:
        merge = merges[module.name]
        by_weight[module.weight_name] = ApplyDelta(
            base=LoadTensor(model=base_ref, tensor=module.weight_name),
            merge=merge,
            dtype=plan.dtype,
        )
    base_names = set(names)
    missing = sorted(set(by_weight) - base_names)
    if missing:
        from mergekit_ctm.recipe import RecipeError

        raise RecipeError(
            f"output: model: base model {plan.base_model!r} has no tensor(s) {missing[:5]}; "
            "the adapters were trained on another base model"
        )
    dense_dtype: dict[str, str | None] = {}
    for dense in plan.dense:
        by_weight[dense.weight_name] = _dense_task(plan, dense, base_names)
        dt = (base or {}).get(dense.weight_name, (None,))[0]
        dense_dtype[dense.weight_name] = str(dt).removeprefix("torch.") if dt else None
    saves = []
    for name in names:
        task = by_weight.get(name) or LoadTensor(model=base_ref, tensor=name)
        saves.append(
            SaveTensor(
                tensor_name=name,
                tensor_task=task,
                writer_task=writer,
                clone=options.clone_tensors,
                dtype=plan.recipe.out_dtype or dense_dtype.get(name),
            )
        )
    return [*saves, FinalizeModel(tensor_save_tasks=tuple(saves), writer_task=writer)]


def _write_metadata(plan: MergePlan, out: str, result: dict[str, Any], ids: list[str]) -> None:
    """README.md and mergekit_config.yml; ``ids``: :func:`card.identities` of the inputs."""
    ranks = result.get("ranks")
    zero = [m for m in result.get("requested", {}) if m not in (ranks or {})]
    with open(os.path.join(out, "README.md"), "w", encoding="utf-8") as f:
        f.write(card.model_card(plan, ids, ranks, zero))
    with open(os.path.join(out, "mergekit_config.yml"), "w", encoding="utf-8") as f:
        f.write(card.config_text(plan, ids))


def _copy_model_files(plan: MergePlan, out: str, copy_tokenizer: bool = True) -> None:
    """config.json of the base (with the output dtype) and, unless --no-copy-tokenizer, its
    tokenizer files."""
    import json

    base = plan.base_path or plan.base_model
    with open(os.path.join(base, "config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    if plan.recipe.out_dtype:
        cfg["torch_dtype"] = plan.recipe.out_dtype
        cfg["dtype"] = plan.recipe.out_dtype
    with open(os.path.join(out, "config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2)
    for fname in TOKENIZER_FILES if copy_tokenizer else ():
        src = os.path.join(base, fname)
        if os.path.isfile(src):
            shutil.copy(src, os.path.join(out, fname))


def plan_inputs(plan: MergePlan, recipe_path: str | None = None) -> list[tuple[str, str]]:
    """(what, local path) of everything the merge reads: the output may not overwrite them."""
    inputs = [(f"input adapter models[{i}]", a.path) for i, a in enumerate(plan.adapters)]
    bases = {plan.base_model, plan.base_path, *(a.base_ref for a in plan.adapters)}
    inputs += [("base model", b) for b in sorted(b for b in bases if b and os.path.isdir(b))]
    if recipe_path:
        inputs.append(("recipe", recipe_path))
    return inputs


# mergekit options that change nothing in an adapter merge, and why (warned about, by name).
_NO_EFFECT = {
    "allow_crimes": "adapters of one base have one architecture",
    "unsafe_truncate_embeddings": "no embeddings are resized",
    "lora_merge_cache": "adapters are never merged into a full copy of the base",
    "lora_merge_dtype": "adapters are never merged into a full copy of the base",
    "trust_remote_code": "no model code is loaded",
    "lazy_unpickle": "adapter .bin files are always read lazily",
    "read_to_gpu": "factors are small; they move to the math device per module",
    "multi_gpu": "one module at a time runs on one device",
    "async_write": "the output is written in bounded shards as it is merged",
    "write_threads": "the output is written in bounded shards as it is merged",
}
_MODEL_ONLY = ("safe_serialization", "copy_tokenizer")


def warn_unused_options(options: MergeOptions, output_kind: str) -> list[str]:
    """One warning per mergekit option that was set but cannot apply here; returns them."""
    defaults = {k: f.default for k, f in MergeOptions.model_fields.items()}
    warned = []
    for name, why in _NO_EFFECT.items():
        if getattr(options, name, defaults.get(name)) != defaults.get(name):
            warned.append(f"--{name.replace('_', '-')} has no effect on an adapter merge: {why}")
    if output_kind == "adapter":
        for name in _MODEL_ONLY:
            if getattr(options, name) != defaults[name]:
                warned.append(
                    f"--{name.replace('_', '-')} applies to output: model only; this merge "
                    "writes an adapter"
                )
    for line in warned:
        LOG.warning(line)
    return warned


def _log_plan(plan: MergePlan) -> None:
    """-v: the plan; -vv: every module's ranks per adapter and output rank."""
    LOG.info(
        "mergekit-ctm: %s%s over %d adapters, %d modules, %d dense tensors, output %s",
        plan.method, f" ({plan.base_rule})" if plan.base_rule else "", len(plan.adapters),
        len(plan.modules), len(plan.dense), plan.output,
    )  # fmt: skip
    for m in plan.modules:
        ranks = ", ".join(f"[{i}] {r}" for i, r in zip(m.adapters, m.ranks))
        rank = m.param("rank")
        LOG.debug("%s: ranks %s -> %s", m.name, ranks, rank if rank is not None else sum(m.ranks))


_EXIT_HOOK = False


def skip_final_collection() -> None:
    """At interpreter exit, before Python's final garbage collection, move every object to
    the collector's permanent generation (``gc.freeze``): that collection then skips the
    ~430k objects of torch, transformers and mergekit, 1.1-1.3 s of every ``mergekit-yaml``
    run on a 2-core machine (bench/e2e.py, "shutdown"). Registered once per process by our
    merges; it changes nothing while the process runs."""
    global _EXIT_HOOK
    if not _EXIT_HOOK:
        import atexit
        import gc

        atexit.register(gc.freeze)
        _EXIT_HOOK = True


def check_device(options: MergeOptions) -> None:
    """--cuda (or --device cuda) on a machine without CUDA: one line, before any work."""
    import torch

    device = str(options.device or "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        from mergekit_ctm.recipe import RecipeError

        raise RecipeError(
            f"--cuda: no CUDA device is available (torch {torch.__version__}); run without "
            "--cuda to merge on the CPU"
        )


def execute_plan(
    plan: MergePlan, out_path: str, options: MergeOptions, recipe_path: str | None = None
) -> dict[str, Any]:
    """Run a validated plan; its files appear in ``out_path`` only on success (plan/output.py:
    a new directory appears whole, an existing one gets only our files, each replaced
    atomically)."""
    check_output_path(out_path, plan_inputs(plan, recipe_path))
    check_device(options)
    skip_final_collection()
    warn_unused_options(options, plan.output)
    _log_plan(plan)
    stage = output.stage(out_path)
    try:
        tmp = stage.path
        if plan.output == "adapter":
            targets = plan_adapter_tasks(plan, tmp, options)
        else:
            targets = plan_model_tasks(plan, tmp, options)
        # The last task depends on every other one, so it alone is the Executor's target:
        # mergekit tests each finished task for membership in the target *list* (a linear
        # scan), 695k comparisons with all 513 tasks as targets in a 128-module merge.
        executor = Executor(
            targets=targets[-1:],
            math_device=options.device or "cpu",
            storage_device=(options.device or "cpu") if options.low_cpu_memory else "cpu",
        )
        result: dict[str, Any] = {}
        # The card's input hashes read every weights file once: on a thread of its own, they
        # overlap the merge (hashlib releases the GIL) instead of following it.
        hashing = _Background(card.identities, plan) if options.write_model_card else None
        # Loads, finiteness checks, casts and writes are small memory-bound ops on this
        # thread: with several OpenMP threads on a busy machine they stall (a float64 sum of
        # one 16 x 4096 factor: 2-10 ms on 2 threads, 0.05 ms on 1; bench/e2e.py). The solves
        # run on solve_workers() one-thread workers.
        with tiny_cpu_ops(torch.device("cpu")), cancel_queued_on_error():
            for task, value in executor.run(quiet=options.quiet, desc="mergekit-ctm"):
                if isinstance(task, FinalizeAdapter):
                    result = value
        if plan.output == "model":
            _copy_model_files(plan, tmp, options.copy_tokenizer)
        if hashing is not None:
            _write_metadata(plan, tmp, result, hashing.result())
        result["files"] = stage.commit()
        return result
    except BaseException:
        stage.discard()
        raise


class _Background:
    """``fn(*args)`` on a daemon thread; ``result()`` joins it and returns or re-raises."""

    def __init__(self, fn: Any, *args: Any) -> None:
        import threading

        self._value: Any = None
        self._error: BaseException | None = None

        def run() -> None:
            try:
                self._value = fn(*args)
            except BaseException as exc:  # re-raised on the caller's thread
                self._error = exc

        self._thread = threading.Thread(target=run, name="mergekit-ctm-hash", daemon=True)
        self._thread.start()

    def result(self) -> Any:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._value


def run_adapter_merge(
    merge_config: Any,
    out_path: str,
    options: MergeOptions | None = None,
    config_source: str | None = None,
    recipe_path: str | None = None,
) -> dict[str, Any]:
    """Entry point behind ``run_merge``: validate everything, then plan and execute.

    merge_config: mergekit MergeConfiguration, a recipe dict, or YAML text. ``config_source``
    (the raw YAML) takes precedence, since MergeConfiguration drops keys such as ``output``.
    ``recipe_path``: the recipe file, which the output may not overwrite.
    """
    options = options or MergeOptions()
    plan = build_plan(
        recipe_source(merge_config, config_source),
        random_seed=options.random_seed,
        cache_dir=options.transformers_cache,
    )
    return execute_plan(plan, out_path, options, recipe_path=recipe_path)
