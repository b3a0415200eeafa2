"""Validate a recipe of our methods over full fine-tuned checkpoints without merging.

``build_full_plan`` runs the recipe checks ``mergekit-yaml`` runs (``check_recipe_text``, then
mergekit's ``MergeConfiguration``), then reads only the tensor headers of the base and of
every fine-tune (safetensors headers; ``.bin`` shards unpickled onto the meta device, no
tensor data) and checks that each fine-tune has exactly the base's tensor names and shapes.
Which tensors take the low-rank path is decided by the predicate the merge itself uses
(``integration.full_checkpoints.is_low_rank``) on mergekit's architecture description.

Peak memory (``FullPlan.peak_bytes``): mergekit's planner merges one output tensor at a time.
For a tensor of N entries (n × m), T fine-tunes, input item size s (the recipe's ``dtype``,
else the stored one) and math item size c (8 for float64, else 4):

    inputs     (T + 1) · N · s          base and fine-tunes as loaded
    deltas     (T + 1) · N · c          W_base and each ΔWₜ = Wₜ − W_base in the math dtype
    low-rank   N · c + min(n, m)(n + m) · c   one truncated SVD at a time (an exact SVD's
               copy of ΔWₜ and its thin factors; the Krylov path needs less)
               + T · k (n + m) · c      the compressed factors, k = task_rank or rank
    dense      2 · T · N · c            the rule's masks and stacked deltas
    result     2 · N · c + N · s        B A (or the dense merge), the sum, the cast back

plus mergekit's writer buffer: the output tensors it holds until a shard is full,
min(``--out-shard-size``, 64 MiB, the whole output) (its shards are capped at
``plan.stream.MODEL_WRITE_BUFFER`` and joined afterwards). It is an estimate of anonymous memory
above the interpreter and torch, not a bound (bench/full_validate.py: the measured anonymous
peak was 0.56-0.67 of it). mergekit's loader reads the inputs through mmap, so their file pages,
up to the inputs' total size, show in RSS on top (``FullPlan.mapped_bytes``); the kernel may
drop them under memory pressure.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from mergekit_ctm.adapters.peft_lora import DTYPE_BYTES
from mergekit_ctm.recipe.model import RecipeError, load_yaml

DEFAULT_SHARD_BYTES = 5_000_000_000  # mergekit's --out-shard-size default (bytes per shard)
ITEM_BYTES = DTYPE_BYTES  # bytes per element of each safetensors dtype code
_RECIPE_DTYPES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16"}


@dataclass(frozen=True)
class Checkpoint:
    """One model of the recipe: where it is named, its local directory and its tensors
    (name -> (safetensors dtype code, shape)); ``tensors`` is None when it is not on this
    machine (``note`` says so)."""

    label: str
    ref: str
    path: str | None
    tensors: dict[str, tuple[str, tuple[int, ...]]] | None
    shards: int = 0
    note: str | None = None


@dataclass(frozen=True)
class TensorPlan:
    name: str
    shape: tuple[int, ...]
    dtype: str
    low_rank: bool


@dataclass
class FullPlan:
    method: str
    base_rule: str | None
    output: str
    dtype: str | None
    out_dtype: str | None
    rank: int | None
    task_rank: int | None
    architecture: str
    base: Checkpoint
    models: tuple[Checkpoint, ...]
    tensors: tuple[TensorPlan, ...]
    out_shard_size: int = DEFAULT_SHARD_BYTES
    notes: list[str] = field(default_factory=list)

    @property
    def math_item(self) -> int:
        return 8 if self.dtype == "float64" else 4

    def in_item(self, t: TensorPlan) -> int:
        return ITEM_BYTES[_RECIPE_DTYPES[self.dtype]] if self.dtype else ITEM_BYTES.get(t.dtype, 4)

    def tensor_bytes(self, t: TensorPlan) -> int:
        """Working memory of one output tensor's merge (module docstring)."""
        n_in, c = len(self.models), self.math_item
        if self.dtype is None and t.dtype == "F64":
            c = 8
        numel, s = math.prod(t.shape), self.in_item(t)
        total = (n_in + 1) * numel * s + (n_in + 1) * numel * c + 2 * numel * c + numel * s
        if t.low_rank:
            n, m = t.shape
            k = min(self.task_rank or self.rank or min(n, m), n, m)
            total += numel * c + min(n, m) * (n + m) * c + n_in * k * (n + m) * c
        else:
            total += 2 * n_in * numel * c
        return total

    def output_bytes(self) -> int:
        out = _RECIPE_DTYPES.get(self.out_dtype or self.dtype or "", None)
        return sum(
            math.prod(t.shape) * (ITEM_BYTES[out] if out else self.in_item(t)) for t in self.tensors
        )

    def mapped_bytes(self) -> int:
        """The inputs' stored size: mergekit reads them through mmap, so up to this many bytes
        of file pages show in RSS beside the estimate (the kernel may drop them)."""
        stored = sum(math.prod(t.shape) * ITEM_BYTES.get(t.dtype, 4) for t in self.tensors)
        return (len(self.models) + 1) * stored

    def writer_bytes(self) -> int:
        """mergekit's writer buffer: our full-checkpoint output: model caps its shards at
        MODEL_WRITE_BUFFER (then joins them, plan/stream.reshard)."""
        from mergekit_ctm.plan.stream import MODEL_WRITE_BUFFER

        return min(self.out_shard_size, MODEL_WRITE_BUFFER, self.output_bytes())

    def largest(self) -> tuple[TensorPlan | None, int]:
        best = max(self.tensors, key=self.tensor_bytes, default=None)
        return best, (self.tensor_bytes(best) if best is not None else 0)

    def peak_bytes(self) -> int:
        return self.largest()[1] + self.writer_bytes()


def _local_dir(ref: str) -> str | None:
    """A local directory, or a hub id's snapshot in the local Hugging Face cache (offline);
    None when it is neither."""
    if os.path.isdir(ref):
        return ref
    from mergekit_ctm.recipe.validate import cached_base_snapshot

    try:
        return cached_base_snapshot(ref)
    except RecipeError:
        return None


def read_checkpoint(label: str, ref: str) -> Checkpoint:
    """Tensor names, dtypes and shapes of a full checkpoint, from its headers only."""
    import torch
    from mergekit.io import ShardedTensorIndex

    from mergekit_ctm.adapters.errors import AdapterError
    from mergekit_ctm.adapters.peft_lora import read_safetensors_header

    path = _local_dir(ref)
    if path is None:
        return Checkpoint(label, ref, None, None, note=f"{label} ({ref}): not on this machine "
                          "(mergekit downloads it when merging): not checked")  # fmt: skip
    try:
        index = ShardedTensorIndex.from_disk(path)
    except Exception:
        raise RecipeError(
            f"{label} ({ref}): no weights at {path} (no model*.safetensors, pytorch_model*.bin "
            "or their .index.json); a full checkpoint is saved with save_pretrained"
        ) from None
    found: dict[str, tuple[str, tuple[int, ...]]] = {}
    shards = list(dict.fromkeys(index.tensor_paths.values()))
    for shard in shards:
        file = os.path.join(path, shard)
        if not os.path.isfile(file):
            raise RecipeError(
                f"{label} ({ref}): shard {shard} named in its index is missing; download or "
                "save the model again"
            )
        if index.is_safetensors:
            try:
                header = read_safetensors_header(file)
            except AdapterError as exc:
                why = exc.__cause__ or "malformed header"
                raise RecipeError(
                    f"{label} ({ref}): {shard} is not a readable safetensors file ({why}); "
                    "download or save the model again"
                ) from None
            found.update({k: (m["dtype"], tuple(m["shape"])) for k, m in header.items()})
        else:  # unpickled onto the meta device: shapes and dtypes, no tensor data
            state = torch.load(file, map_location="meta", weights_only=True)
            state = state.get("state_dict", state)
            found.update({k: (_BIN_CODES.get(str(v.dtype), str(v.dtype)), tuple(v.shape))
                          for k, v in state.items()})  # fmt: skip
    return Checkpoint(label, ref, path, found, shards=len(shards))


_BIN_CODES = {"torch.float64": "F64", "torch.float32": "F32", "torch.float16": "F16",
              "torch.bfloat16": "BF16"}  # fmt: skip


def shape_text(shape: tuple[int, ...]) -> str:
    return "×".join(map(str, shape)) if shape else "scalar"


def compare_to_base(base: Checkpoint, other: Checkpoint) -> list[str]:
    """Refuse a fine-tune whose tensors differ from the base's in name or shape (one line:
    the first difference, with a count of the others); return notes on extra tensors."""
    if base.tensors is None or other.tensors is None:
        return []
    where = f"{other.label} ({other.ref})"
    problems = []
    for name, (_, shape) in base.tensors.items():
        got = other.tensors.get(name)
        if got is None:
            problems.append(f"lacks tensor {name!r} (shape {shape_text(shape)} in the base)")
        elif got[1] != shape:
            problems.append(
                f"tensor {name!r} has shape {shape_text(got[1])} but the base's is "
                f"{shape_text(shape)}"
            )
    if problems:
        more = f" (and {len(problems) - 1} more difference(s))" if len(problems) > 1 else ""
        raise RecipeError(
            f"{where}: {problems[0]}{more}; a full fine-tune must have its base's tensors and "
            f"shapes (base: {base.ref}). Check that it was fine-tuned from this base"
        )
    extra = [n for n in other.tensors if n not in base.tensors]
    if extra:
        shown = ", ".join(extra[:3]) + (", ..." if len(extra) > 3 else "")
        return [f"{where}: {len(extra)} tensor(s) the base lacks, not merged: {shown}"]
    return []


def build_full_plan(
    text: str, where: str = "recipe", *, out_shard_size: int = DEFAULT_SHARD_BYTES
) -> FullPlan:
    """The recipe checks of ``mergekit-yaml`` and the header checks above; no tensor data."""
    import pydantic
    import torch
    from mergekit.architecture import get_architecture_info
    from mergekit.config import MergeConfiguration
    from mergekit.options import MergeOptions

    from mergekit_ctm.integration.dispatch import check_recipe_text
    from mergekit_ctm.integration.full_checkpoints import is_low_rank

    check_recipe_text(text, where)
    raw = load_yaml(text, where)
    try:
        config = MergeConfiguration.model_validate(raw)
    except (pydantic.ValidationError, RuntimeError) as exc:
        if isinstance(exc, pydantic.ValidationError):
            first = exc.errors()[0]
            loc = ".".join(str(p) for p in first.get("loc", ())) or "recipe"
            exc = f"{loc}: {first.get('msg')}"
        raise RecipeError(f"{where}: invalid recipe: {exc}") from None
    # Without a top-level base_model every slice names its own (checked): take the first.
    base_ref_obj = config.base_model or config.slices[0].base_model
    base_ref = str(base_ref_obj)
    inputs = _inputs(raw)
    base = read_checkpoint("base_model", base_ref)
    models = tuple(read_checkpoint(label, ref) for label, ref in inputs if ref != base_ref)
    notes = [c.note for c in (base, *models) if c.note]
    for other in models:
        notes += compare_to_base(base, other)

    if any(c.tensors is None for c in (base, *models)):
        notes.append("tensors not classified (low-rank or dense): a model is not on this machine")
        return _plan(raw, base, models, (), "?", out_shard_size, notes)
    try:
        arch = get_architecture_info(config, MergeOptions())
        base_config = base_ref_obj.config()
        weights = arch.all_weights(base_config)
        arch_name = ", ".join(getattr(base_config, "architectures", None) or ()) or "?"
    except Exception as exc:  # mergekit cannot plan it: neither could the merge
        raise RecipeError(f"{where}: mergekit cannot plan this model: {exc}") from None
    tensors = []
    for w in weights:
        names = (w.name, *(w.aliases or ()), *(w.tied_names or ()))
        name = next((n for n in names if n in base.tensors), None)
        if name is None:
            continue  # optional, or tied to a tensor written once
        dtype, shape = base.tensors[name]
        meta = torch.empty(shape, device="meta")  # the merge's predicate takes a tensor
        tensors.append(TensorPlan(w.name, shape, dtype, is_low_rank(meta, w)))
    return _plan(raw, base, models, tuple(tensors), arch_name, out_shard_size, notes)


def _plan(
    raw: Mapping[str, Any],
    base: Checkpoint,
    models: tuple[Checkpoint, ...],
    tensors: tuple[TensorPlan, ...],
    architecture: str,
    out_shard_size: int,
    notes: list[str],
) -> FullPlan:
    from mergekit_ctm.recipe.validate import _base_rule_of

    params = raw.get("parameters") or {}
    return FullPlan(
        method=raw["merge_method"],
        base_rule=_base_rule_of(params, raw["merge_method"]),
        output=raw.get("output") or "model",
        dtype=raw.get("dtype"),
        out_dtype=raw.get("out_dtype"),
        rank=_plain(params.get("rank")),
        task_rank=_plain(params.get("task_rank")),
        architecture=architecture,
        base=base,
        models=models,
        tensors=tensors,
        out_shard_size=out_shard_size,
        notes=notes,
    )


def _plain(value: Any) -> Any:
    """A recipe-wide value when it is one plain value (not a filter list or a gradient)."""
    return value if isinstance(value, (int, float, str)) else None


def _inputs(raw: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(label, ref) of every input model, in recipe order, each model once."""
    out: dict[str, str] = {}
    for i, m in enumerate(raw.get("models") or []):
        ref = str(m.get("model") if isinstance(m, dict) else m)
        out.setdefault(ref, f"models[{i}]")
    for s, sl in enumerate(raw.get("slices") or []):
        for j, src in enumerate(sl.get("sources") or []):
            out.setdefault(str(src.get("model")), f"slices[{s}].sources[{j}]")
    return [(label, ref) for ref, label in out.items()]
