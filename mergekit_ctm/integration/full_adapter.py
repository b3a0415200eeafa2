"""``output: adapter`` for full fine-tuned checkpoints: the merged update as one PEFT LoRA
(and, at the end, :func:`run_full_model_merge`: the staged ``output: model`` run with the
card both outputs share).

The merged update of every linear weight is rank ≤ ``rank`` by construction (each ΔWₜ cut
to ``task_rank``, then the engine's ``merge_lora``), so it is written as the LoRA factors
themselves, the smallest artifact such a merge has. mergekit's own planner plans the merge
exactly as for ``output: model`` (architecture, layers, per-tensor parameters with filters and
gradients, lazy sharded loading, ``--cuda``); only the last step differs:

    linear weight (nn.Linear, GPT-2 Conv1D), no vocabulary axis:
        full_update(...) ─► (A, B) ─► lora_A, lora_B   (scaling 1, same seed as output: model)
    everything else (norms, biases, embeddings, lm_head, other 2-D tensors):
        left out; the card lists ‖ΔW_merged‖_F / ‖W_base‖_F per group of tensors;
        or, for modules named in ``modules_to_save:``, the merged tensor itself, saved as
        PEFT saves modules_to_save (``base_model.model.<parameter path>``)

So ``PeftModel.from_pretrained(base, out)`` gives W_base + B A in every linear layer, the same
weights ``output: model`` writes there. Tasks stream tensor by tensor on mergekit's Executor;
the files are staged and installed by :mod:`mergekit_ctm.plan.output`.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from typing import Any

import torch
import yaml
from mergekit.common import ModelReference
from mergekit.graph import Executor, Task
from mergekit.io.tasks import SaveTensor, TensorWriterTask
from mergekit.merge_methods.task_adapter import ExecuteMergeMethodTask
from mergekit.options import MergeOptions

from mergekit_ctm.adapters.peft_lora import PEFT_PREFIX, stores_transposed, swap_layout
from mergekit_ctm.adapters.writer import (
    build_adapter_config,
    peft_tensor_names,
)
from mergekit_ctm.plan import card, output, stream
from mergekit_ctm.plan.tasks import close_adapter_files, finalize_arguments
from mergekit_ctm.recipe.model import RecipeError

LOG = logging.getLogger(__name__)

ADAPTER_BUFFER = 2 * 2**20  # bytes per writer shard; joined into one file at the end


@dataclass(frozen=True)
class LinearModule:
    """A LoRA-able module of the base (what the adapter writer needs to know)."""

    name: str
    fan_in_fan_out: bool
    kind: str = "linear"


@dataclass(frozen=True)
class BaseLayout:
    """What the adapter needs to know of the base architecture: its LoRA-able modules, every
    module path (PEFT's matching) and every parameter path (tied ones included)."""

    linear: dict[str, LinearModule]
    modules: tuple[str, ...]
    parameters: tuple[str, ...]


def base_layout(config: Any, trust_remote_code: bool = False) -> BaseLayout:
    """The base architecture built on the meta device (no weight is read or allocated):
    every nn.Linear / Conv1D, module and parameter path."""
    import transformers
    from transformers.pytorch_utils import Conv1D

    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    try:
        with torch.device("meta"):
            if cls is not None:
                model = cls(config)
            else:
                model = transformers.AutoModelForCausalLM.from_config(
                    config, trust_remote_code=trust_remote_code
                )
    except Exception as exc:
        raise RecipeError(
            f"output: adapter: cannot build the base architecture {arch!r} to find its linear "
            f"layers ({type(exc).__name__}: {exc}); use output: model"
        ) from None
    linear = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            linear[name] = LinearModule(name, False)
        elif isinstance(module, Conv1D):
            linear[name] = LinearModule(name, True)
    return BaseLayout(
        linear=linear,
        modules=tuple(n for n, _ in model.named_modules(remove_duplicate=False) if n),
        parameters=tuple(n for n, _ in model.named_parameters(remove_duplicate=False)),
    )


def kept_modules(keep: list[str], layout: BaseLayout, lora: set[str]) -> set[str]:
    """Module paths that PEFT's ``modules_to_save`` matching (a path ending in a listed name)
    selects; each listed name must select something, and nothing that is or holds one of the
    ``lora`` module paths."""
    kept = set()
    for name in keep:
        hits = {m for m in layout.modules if m.endswith(name)}
        if not hits:
            raise RecipeError(
                f"modules_to_save: {name!r} matches no module of the base; name modules such as "
                "embed_tokens, lm_head, norm"
            )
        for hit in sorted(hits):
            inner = sorted(n for n in lora if n == hit or n.startswith(hit + "."))
            if inner:
                raise RecipeError(
                    f"modules_to_save: {name!r} matches {hit}, which is (or holds) the linear "
                    f"layer {inner[0]} that the LoRA carries; name modules without linear "
                    "layers, such as embed_tokens, lm_head, norm"
                )
        kept |= hits
    return kept


def _by_path(weight: str, paths: Any) -> str | None:
    """The path in ``paths`` that the checkpoint name ``weight`` denotes: the same path, or the
    one path ending in it (checkpoints may lack the model's prefix, e.g. GPT-2's
    ``transformer.``)."""
    if weight in paths:
        return weight
    hits = [p for p in paths if p.endswith("." + weight)]
    return hits[0] if len(hits) == 1 else None


def module_of(weight: str, modules: dict[str, LinearModule]) -> LinearModule | None:
    """The linear module whose ``weight`` the checkpoint tensor ``weight`` is, if any."""
    if not weight.endswith(".weight"):
        return None
    owner = _by_path(weight.removesuffix(".weight"), modules)
    return modules[owner] if owner is not None else None


def bind_group(task: ExecuteMergeMethodTask, tensors: dict) -> tuple[Any, dict[str, Any]]:
    """The TensorGroup and parameters that ``task`` would hand our kernel (as mergekit's
    ExecuteMergeMethodTask.execute binds them, dtype aligned as GroupMergeMethod does)."""
    from mergekit.common import dtype_from_name
    from mergekit.merge_methods import get
    from mergekit.merge_methods.base import (
        ParameterScope,
        PerInputValues,
        TensorEntry,
        TensorGroup,
        TensorMetadata,
    )
    from mergekit.merge_methods.dtype import align_dtype, promoted_dtype

    entries = tuple(
        TensorEntry(id=model, tensor=tensor, is_base=model == task.base_model)
        for model in task.model_order
        if (tensor := tensors.get(model)) is not None
    )
    group = TensorGroup(
        entries=entries, metadata=TensorMetadata.from_weight_info(task.output_weight)
    )
    method = get(task.method_name)
    method.validate_inputs([e.id for e in entries], task.base_model, group_name=group.metadata.name)
    group.validate_tensors()
    parameters = dict(task.parameters.items())
    for p in method.spec.input_parameters:
        inputs = entries if p.scope == ParameterScope.INPUT else group.non_base
        parameters[p.name] = PerInputValues(
            [(e.id, task.input_parameters[e.id][p.name]) for e in inputs]
        )
    group = align_dtype(group, dtype_from_name(task.dtype) or promoted_dtype(group))
    return group, parameters


class FullFactors(Task[tuple]):
    """(A, B, requested rank) of one linear weight: ΔW_merged = B A, base weight layout,
    scaling 1; exactly the update output: model adds (integration.full_checkpoints)."""

    source: ExecuteMergeMethodTask

    def arguments(self) -> dict[str, Task]:
        return {"tensors": self.source.gather_tensors}

    def group_label(self) -> str | None:
        return self.source.group_label()

    def uses_accelerator(self) -> bool:
        return True

    def execute(self, tensors: dict) -> tuple:
        from mergekit_ctm.integration.full_checkpoints import full_update

        group, parameters = bind_group(self.source, tensors)
        with torch.autocast(device_type=group.entries[0].tensor.device.type, enabled=False):
            update = full_update(self.source.method_name, group, parameters)
        if update is None or update.A is None or update.B is None:
            shape = group.entries[0].tensor.shape
            zero = torch.zeros((0, shape[1]))
            return (zero, torch.zeros((shape[0], 0)), 0)
        return (update.A, update.B, int(update.requested_rank))


class LoraFactor(Task[torch.Tensor | None]):
    """lora_A or lora_B of one module in PEFT's storage layout; None when the merged update
    is zero (the module is left out)."""

    factors: FullFactors
    which: str  # "A" | "B"
    transposed: bool

    def arguments(self) -> dict[str, Task]:
        return {"factors": self.factors}

    def group_label(self) -> str | None:
        return self.factors.group_label()

    def execute(self, factors: tuple) -> torch.Tensor | None:
        if factors[0].shape[0] == 0:
            return None
        a, b = swap_layout(factors[0], factors[1], self.transposed)
        return (a if self.which == "A" else b).contiguous()


class FactorRank(Task[tuple]):
    """(module, directions produced, requested rank): feeds adapter_config.json."""

    factors: FullFactors
    module: str

    def arguments(self) -> dict[str, Task]:
        return {"factors": self.factors}

    def group_label(self) -> str | None:
        return self.factors.group_label()

    def execute(self, factors: tuple) -> tuple:
        return (self.module, int(factors[0].shape[0]), int(factors[2]))


class DroppedTensor(Task[tuple]):
    """(tensor name, ‖W_merged − W_base‖_F, ‖W_base‖_F) of a tensor a LoRA cannot hold,
    W_merged computed by the very task output: model writes."""

    source: ExecuteMergeMethodTask

    def arguments(self) -> dict[str, Task]:
        return {"tensors": self.source.gather_tensors, "merged": self.source}

    def group_label(self) -> str | None:
        return self.source.group_label()

    def execute(self, tensors: dict, merged: torch.Tensor | None) -> tuple:
        name = self.source.output_weight.name
        base = tensors.get(self.source.base_model)
        if merged is None or base is None or not base.is_floating_point():
            return (name, 0.0, 0.0)
        b = base.to(torch.float64)
        return (name, float((merged.to(torch.float64) - b).norm()), float(b.norm()))


class FinalizeFullAdapter(Task[dict]):
    """Close the writer, join its shards, write adapter_config.json from the ranks produced."""

    writer_task: TensorWriterTask
    save_tasks: tuple[Task, ...]
    rank_tasks: tuple[FactorRank, ...]
    dropped_tasks: tuple[DroppedTensor, ...]
    rank: int | None
    module_names: tuple[str, ...]
    modules_to_save: tuple[str, ...]
    kept: tuple[str, ...]
    fan_in_fan_out: bool
    base_model: str
    out_path: str

    def arguments(self) -> dict[str, Task]:
        return finalize_arguments(
            self.writer_task, self.save_tasks, self.rank_tasks, drop=self.dropped_tasks
        )

    def main_thread_only(self) -> bool:
        return True

    def execute(self, writer: Any, **kwargs: Any) -> dict:
        produced = [kwargs[f"rank_{i}"] for i in range(len(self.rank_tasks))]
        ranks = close_adapter_files(
            writer,
            self.out_path,
            produced,
            "output: adapter: every linear layer's merged update is zero (the fine-tunes "
            "equal the base there, or their updates cancel): there is no LoRA to write",
        )
        r = self.rank or max(ranks.values())  # core_space without rank: Σ task ranks
        config = build_adapter_config(
            ranks,
            rank=r,
            base_module_names=self.module_names,
            fan_in_fan_out=self.fan_in_fan_out,
            base_model_name_or_path=self.base_model,
            modules_to_save=self.modules_to_save,
        )
        with open(os.path.join(self.out_path, "adapter_config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, sort_keys=True)
        dropped = [kwargs[f"drop_{i}"] for i in range(len(self.dropped_tasks))]
        zero = [m for m, k, _ in produced if k == 0]
        return {
            "ranks": ranks,
            "zero": zero,
            "dropped": dropped,
            "kept": list(self.kept),
            "config": config,
        }


def _raw_recipe(merge_config: Any, config_source: str | None) -> dict[str, Any]:
    from mergekit_ctm.recipe.model import load_yaml

    if config_source is not None:
        raw = load_yaml(config_source)
        if isinstance(raw, dict):
            return raw
    if isinstance(merge_config, dict):
        return dict(merge_config)
    return merge_config.model_dump(mode="json", exclude_none=True)


def _local_dir(ref: ModelReference, cached: bool = False) -> str | None:
    """The model's local directory: a local path, or (``cached``, after mergekit's loader
    fetched it) its hub snapshot; None otherwise."""
    if os.path.isdir(ref.model.path):
        return ref.model.path
    if not cached:
        return None
    try:
        path = ref.local_path()
    except Exception:
        return None
    return path if os.path.isdir(path) else None


def plan_full_adapter_tasks(merge_config: Any, out_path: str, options: MergeOptions) -> list[Task]:
    """mergekit's own plan of the merge, its last step turned into LoRA factors (module
    docstring). The last task returns the produced ranks and what was kept or left out."""
    from mergekit.architecture import get_architecture_info
    from mergekit.io.tasks import LoaderCache
    from mergekit.merge import _model_out_config
    from mergekit.plan import MergePlanner

    arch_info = get_architecture_info(merge_config, options)
    cache = LoaderCache()
    cache.setup(options=options)
    for model in merge_config.referenced_models():
        cache.get(model)
    cfg_out = _model_out_config(merge_config, arch_info, options.trust_remote_code)
    # plan_to_disk is mergekit's public planning call (plan_in_memory fails in 0.1.5): its
    # SaveTensor tasks carry each tensor's merge; its writer is never run.
    planned = MergePlanner(
        merge_config.model_copy(deep=True), arch_info, options=options, out_model_config=cfg_out
    ).plan_to_disk(out_path=out_path)

    base_ref = merge_config.base_model
    layout = base_layout(base_ref.config(options.trust_remote_code), options.trust_remote_code)
    modules = layout.linear
    keep = list(getattr(merge_config, "modules_to_save", None) or [])
    items = []  # (planned merge, its weight, the linear module carrying it as a LoRA or None)
    for item in planned:
        task = getattr(item, "tensor_task", None) if isinstance(item, SaveTensor) else None
        if isinstance(task, ExecuteMergeMethodTask):
            weight = task.output_weight
            linear = module_of(weight.name, modules) if weight.vocabulary_axis is None else None
            items.append((task, weight, linear))
    lora = {m.name for _, _, m in items if m is not None}
    kept_paths = kept_modules(keep, layout, lora) if keep else set()
    kept: dict[str, str] = {}  # parameter path -> checkpoint tensor name
    writer = TensorWriterTask(
        out_path=out_path,
        max_shard_size=min(options.out_shard_size, ADAPTER_BUFFER),
        safe_serialization=True,
        override_basename="adapter_model",
    )
    out_dtype = merge_config.out_dtype or merge_config.dtype
    saves: list[Task] = []
    ranks: list[FactorRank] = []
    dropped: list[DroppedTensor] = []
    used: list[LinearModule] = []
    for task, weight, module in items:
        if module is None:
            param = _by_path(weight.name, layout.parameters)
            if param is not None and param.rpartition(".")[0] in kept_paths:
                # modules_to_save: the merged tensor exactly as output: model writes it
                kept[param] = weight.name
                saves.append(
                    SaveTensor(
                        tensor_name=PEFT_PREFIX + param,
                        tensor_task=task,
                        writer_task=writer,
                        clone=options.clone_tensors,
                        optional=weight.optional,
                        dtype=weight.force_dtype or out_dtype,
                    )
                )
            else:
                dropped.append(DroppedTensor(source=task))
            continue
        used.append(module)
        factors = FullFactors(source=task)
        transposed = stores_transposed(module)
        for which, key in zip(("A", "B"), peft_tensor_names(module)):
            saves.append(
                SaveTensor(
                    tensor_name=key,
                    tensor_task=LoraFactor(factors=factors, which=which, transposed=transposed),
                    writer_task=writer,
                    clone=options.clone_tensors,
                    optional=True,
                    dtype=out_dtype,
                )
            )
        ranks.append(FactorRank(factors=factors, module=module.name))
    if not ranks:
        raise RecipeError(
            f"output: adapter: base model {str(base_ref)!r} has no linear layer to hold a LoRA; "
            "use output: model"
        )
    for param in layout.parameters:
        if param.rpartition(".")[0] in kept_paths and param not in kept:
            raise RecipeError(
                f"modules_to_save: parameter {param} has no tensor of its own in the checkpoints "
                "(tied to another, e.g. lm_head to embed_tokens); list only the module that "
                "owns it"
            )
    rank = (merge_config.parameters or {}).get("rank")
    finalize = FinalizeFullAdapter(
        writer_task=writer,
        save_tasks=tuple(saves),
        rank_tasks=tuple(ranks),
        dropped_tasks=tuple(dropped),
        rank=rank if isinstance(rank, int) and not isinstance(rank, bool) else None,
        module_names=layout.modules,
        modules_to_save=tuple(keep),
        kept=tuple(kept.values()),
        fan_in_fan_out=any(m.fan_in_fan_out for m in used),
        base_model=str(base_ref),
        out_path=out_path,
    )
    return [*saves, *dropped, finalize]


def _group_name(name: str) -> str:
    return re.sub(r"\.\d+\.", ".*.", name)


def dropped_lines(dropped: list[tuple[str, float, float]]) -> list[str]:
    """Card lines for the tensors left out: per group of layers (index → *), count and the
    largest and median ‖ΔW_merged‖_F / ‖W_base‖_F."""
    groups: dict[str, list[float]] = {}
    for name, delta, base in dropped:
        groups.setdefault(_group_name(name), []).append(delta / base if base > 0 else 0.0)
    lines = []
    for group, rel in groups.items():
        rel = sorted(rel)
        median = rel[len(rel) // 2]
        size = "0 (unchanged)" if rel[-1] == 0 else f"max {rel[-1]:.3g}, median {median:.3g}"
        lines.append(f"| `{group}` | {len(rel)} | {size} |")
    return lines


def _identity(ref: ModelReference) -> str:
    path = _local_dir(ref, cached=True)
    if path is None:
        return "not local"
    return card.input_identity(str(ref), path, sorted(os.listdir(path)))


def resolved_recipe(
    raw: dict[str, Any], seed: int | None = None, output_kind: str = "adapter"
) -> dict[str, Any]:
    """The recipe as run: the user's keys, the method's parameters with defaults written out,
    ``output:`` and the seed the merge used (``--random-seed``, else the recipe's)."""
    from mergekit_ctm.engine.methods import METHODS

    recipe = {k: v for k, v in raw.items() if k != "random_seed"}
    if seed is not None:
        recipe["random_seed"] = seed
    params = dict(recipe.get("parameters") or {})
    for p in METHODS[recipe["merge_method"]].parameters:
        if p.name not in params and p.default is not None:
            params[p.name] = p.default
    recipe["parameters"] = params
    recipe["output"] = output_kind
    return recipe


def _inputs(merge_config: Any) -> list[ModelReference]:
    """The models merged: ``models:`` and every slice source, each once, in recipe order."""
    refs = [m.model for m in merge_config.models or []]
    for s in merge_config.slices or []:
        refs += [src.model for src in s.sources]
    base = merge_config.base_model
    return [r for r in dict.fromkeys(refs) if r != base]


def write_metadata(
    out: str,
    merge_config: Any,
    raw: dict[str, Any],
    result: dict,
    seed: int | None,
    output_kind: str = "adapter",
) -> None:
    """README.md (card) and mergekit_config.yml of a full-checkpoint merge (``output_kind``
    adapter: ``result`` holds the ranks and what was kept or left out; model: unused)."""
    from mergekit_ctm.engine.methods import METHODS

    method = METHODS[merge_config.merge_method]
    base = str(merge_config.base_model)
    inputs = _inputs(merge_config)
    ids = [_identity(m) for m in inputs]
    recipe = resolved_recipe(raw, seed, output_kind)
    head = ["Written by mergekit-ctm.", card.versions_line(), f"random seed: {seed}"]
    head += [f"models[{i}] {m}: {ident}" for i, (m, ident) in enumerate(zip(inputs, ids))]
    config_yaml = yaml.safe_dump(recipe, sort_keys=False)
    with open(os.path.join(out, "mergekit_config.yml"), "w", encoding="utf-8") as f:
        f.write("".join(f"# {line}\n" for line in head) + config_yaml)

    adapter = output_kind == "adapter"
    rule = (merge_config.parameters or {}).get("base_rule")
    how = (
        "merged with mergekit-ctm (a [mergekit](https://github.com/arcee-ai/mergekit) plugin) "
        f"using the `{merge_config.merge_method}` method"
        + (f" with base rule `{rule}`" if isinstance(rule, str) else "")
        + ". Each task vector ΔWₜ = Wₜ − W_base of a linear layer was cut to `task_rank` by a "
        "truncated SVD, then merged; the merged update of each layer has rank at most `rank`"
    )
    if adapter:
        title = (
            f"# {method.pretty_name} merge of {len(inputs)} full fine-tuned checkpoints, as a LoRA"
        )
        intro = (
            f"This LoRA adapter for `{base}` holds the merged update of every linear layer of "
            f"{len(inputs)} full fine-tunes, {how} and is stored exactly, with scaling 1."
        )
    else:
        title = f"# {method.pretty_name} merge of {len(inputs)} full fine-tuned checkpoints"
        intro = (
            f"This model is `{base}` plus the merged update of {len(inputs)} full fine-tunes, "
            f"{how}. Norms, biases, embeddings and `lm_head` take the base rule densely."
        )
    lines = card.card_head(base, adapter, merge_config.merge_method, title, intro)
    lines += [f"- `{m}` ({ident})" for m, ident in zip(inputs, ids)]
    if adapter:
        lines += _adapter_sections(result)
    seed_text = "none (neither `--random-seed` nor `random_seed:` given)" if seed is None else seed
    lines += card.reproduce_lines(
        seed_text,
        "With the same inputs: `mergekit-yaml mergekit_config.yml out/` (the seed is in it)."
        " The configuration:",
        config_yaml,
    )
    with open(os.path.join(out, "README.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines))


def _adapter_sections(result: dict) -> list[str]:
    """The card's lines on the adapter's ranks, and on what it keeps whole or leaves out."""
    ranks = result["ranks"]
    out_ranks = sorted(set(ranks.values()))
    lines = ["", f"Output rank: {', '.join(map(str, out_ranks))} over {len(ranks)} modules."]
    if result["zero"]:
        lines += ["", "Left out, their merged update is zero: "
                  + ", ".join(f"`{m}`" for m in result["zero"]) + "."]  # fmt: skip
    if result.get("kept"):
        lines += [
            "",
            "Kept in full (`modules_to_save`), merged exactly as `output: model` merges them: "
            + ", ".join(f"`{n}`" for n in result["kept"])
            + ".",
        ]
    if result["dropped"]:
        lines += [
            "",
            "## Not in this adapter",
            "",
            "A LoRA holds updates of linear layers only. These tensors were merged too "
            "(`output: model` writes them) but are not stored here, so the adapter applied to "
            "the base keeps the base's values. Relative size of what is lost, "
            "‖W_merged − W_base‖_F / ‖W_base‖_F:",
            "",
            "| tensors | count | relative size |",
            "| --- | --- | --- |",
            *dropped_lines(result["dropped"]),
        ]
    return lines


def run_full_adapter_merge(
    merge_config: Any,
    out_path: str,
    options: MergeOptions | None = None,
    config_source: str | None = None,
    recipe_path: str | None = None,
) -> dict[str, Any]:
    """``output: adapter`` of ``ctm``/``core_space``/``mtc``/``lora_lego`` over full
    checkpoints: validate, plan with mergekit's planner, write a PEFT LoRA into ``out_path``
    (staged; nothing appears unless everything succeeded)."""
    from mergekit.config import MergeConfiguration

    from mergekit_ctm.plan.run import check_device, skip_final_collection
    from mergekit_ctm.recipe.validate import check_full_checkpoint_recipe

    skip_final_collection()
    options = options or MergeOptions()
    raw = _raw_recipe(merge_config, config_source)
    check_full_checkpoint_recipe({**raw, "output": "adapter"})
    if not isinstance(merge_config, MergeConfiguration):
        merge_config = MergeConfiguration.model_validate(raw)
    output.check_output_path(out_path, full_inputs(merge_config, recipe_path))
    check_device(options)
    if options.random_seed is not None:
        import transformers

        transformers.trainer_utils.set_seed(options.random_seed)
    stage = output.stage(out_path)
    try:
        tasks = plan_full_adapter_tasks(merge_config, stage.path, options)
        executor = Executor(
            targets=tasks[-1:],  # depends on every other task (see plan.run.execute_plan)
            math_device=options.device or "cpu",
            storage_device=(options.device or "cpu") if options.low_cpu_memory else "cpu",
        )
        result: dict[str, Any] = {}
        for task, value in executor.run(quiet=options.quiet, desc="mergekit-ctm"):
            if isinstance(task, FinalizeFullAdapter):
                result = value
        if options.write_model_card:
            write_metadata(stage.path, merge_config, raw, result, options.random_seed)
        result["files"] = stage.commit()
        return result
    except BaseException:
        stage.discard()
        raise


def full_inputs(merge_config: Any, recipe_path: str | None) -> list[tuple[str, str]]:
    """(what, local directory) of everything a full-checkpoint merge reads: the output may
    not overwrite them (plan/output.py)."""
    inputs = [("base model", _local_dir(merge_config.base_model))]
    inputs += [(f"input model {ref}", _local_dir(ref)) for ref in _inputs(merge_config)]
    if recipe_path:
        inputs.append(("recipe", recipe_path))
    return [(what, path) for what, path in inputs if path]


def run_full_model_merge(
    original: Any,
    merge_config: Any,
    out_path: str,
    options: MergeOptions,
    config_source: str | None = None,
    recipe_path: str | None = None,
) -> None:
    """``output: model`` of our methods over full checkpoints: mergekit's ``run_merge``
    (``original``) writes into a staging directory, installed by plan/output.py, so an output
    that is an input is refused before any work, nothing appears unless the merge succeeded,
    and in an existing directory only the files the merge writes are replaced (mergekit alone
    writes into the output as it goes: ``mergekit-yaml r.yml base/`` overwrote the base).

    Memory: mergekit's writer holds a whole shard (``--out-shard-size``, default 5B: the
    whole model below 5 GB), so it writes shards of ``stream.MODEL_WRITE_BUFFER`` bytes, which
    :func:`plan.stream.reshard` then joins to ``--out-shard-size`` one tensor at a time (one
    more pass over the output on disk, the largest tensor in memory).

    The card and mergekit_config.yml are ours, as for every output of ours (versions, seed,
    the inputs' hashes, the recipe as resolved). mergekit's card is turned off: it asks the
    Hub whether a relative local path is a repository, a traceback when offline."""
    from mergekit.config import MergeConfiguration

    from mergekit_ctm.plan.run import skip_final_collection

    skip_final_collection()
    raw = _raw_recipe(merge_config, config_source)
    if not isinstance(merge_config, MergeConfiguration):
        merge_config = MergeConfiguration.model_validate(raw)
    output.check_output_path(out_path, full_inputs(merge_config, recipe_path))
    card_too = options.write_model_card
    update: dict[str, Any] = {"write_model_card": False}
    # mergekit's TensorWriter holds a shard in memory until it is full (the whole model, under
    # the default 5B): it writes small shards here, joined afterwards one tensor at a time.
    small = options.safe_serialization and options.out_shard_size > stream.MODEL_WRITE_BUFFER
    if small:
        update["out_shard_size"] = stream.MODEL_WRITE_BUFFER
    stage = output.stage(out_path)
    try:
        original(
            merge_config.model_copy(deep=True),  # mergekit's planner rewrites models: as slices
            stage.path,
            options=options.model_copy(update=update),
            config_source=config_source,
        )
        if small:
            stream.reshard(stage.path, options.out_shard_size)
        if card_too:
            meta = {**raw, "output": "model"}
            write_metadata(stage.path, merge_config, meta, {}, options.random_seed, "model")
        stage.commit()
    except BaseException:
        stage.discard()
        raise
