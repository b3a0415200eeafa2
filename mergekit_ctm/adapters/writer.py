"""Write merged LoRA factors as a PEFT adapter: PEFT key names, layout inversion, config.

The merged adapter has scaling exactly 1 in every module (lora_alpha = r per module, no
rsLoRA), so the factors the engine returns (ΔW = B @ A, base weight layout) are written as is,
up to PEFT's storage layout (transposes for Conv1D / Embedding).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

import torch

from mergekit_ctm.adapters.errors import AdapterError
from mergekit_ctm.adapters.peft_lora import (
    CONFIG_NAME,
    PEFT_PREFIX,
    SAFETENSORS_NAME,
    AdapterInfo,
    _natural_key,
    read_safetensors_header,
    stores_transposed,
    swap_layout,
)


class ModuleLike(Protocol):
    """What the writer needs to know of a module (LoraModule satisfies it)."""

    name: str
    kind: str  # "linear" | "embedding"
    fan_in_fan_out: bool


def peft_tensor_names(module: ModuleLike) -> tuple[str, str]:
    """(key of A, key of B) exactly as PeftModel.save_pretrained writes them (peft 0.21)."""
    base = PEFT_PREFIX + module.name
    if module.kind == "embedding":
        return f"{base}.lora_embedding_A", f"{base}.lora_embedding_B"
    if module.kind == "linear":
        return f"{base}.lora_A.weight", f"{base}.lora_B.weight"
    raise AdapterError(f"module {module.name!r}: unknown LoRA kind {module.kind!r}")


def to_peft_tensors(
    module: ModuleLike, A: torch.Tensor, B: torch.Tensor
) -> dict[str, torch.Tensor]:
    """PEFT tensors for ΔW = B @ A given in the base weight's layout (inverse of load_factors).

    A: (k × m_in), B: (n_out × k). Linear: lora_A = A, lora_B = B. Conv1D (fan_in_fan_out) and
    Embedding store the transpose: lora_A = Bᵀ (k × n_out), lora_B = Aᵀ (m_in × k).
    Scaling is not applied here: the config written by build_adapter_config makes it 1.
    """
    if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
        raise AdapterError(
            f"module {module.name!r}: need A (k × m) and B (n × k), got {tuple(A.shape)} and "
            f"{tuple(B.shape)}."
        )
    n_out, m_in = getattr(module, "n_out", None), getattr(module, "m_in", None)
    if n_out is not None and (B.shape[0], A.shape[1]) != (n_out, m_in):
        raise AdapterError(
            f"module {module.name!r}: B @ A would be {(B.shape[0], A.shape[1])} but the module's "
            f"ΔW is {(n_out, m_in)}."
        )
    key_a, key_b = peft_tensor_names(module)
    pa, pb = swap_layout(A, B, stores_transposed(module))
    # safetensors needs contiguous, non-shared storage.
    return {key_a: pa.contiguous().clone(), key_b: pb.contiguous().clone()}


def peft_full_tensor_key(weight_name: str, lora_modules: Iterable[str] = ()) -> str:
    """Adapter key for a full tensor (modules_to_save, bias, embedding copy) of base `weight_name`.

    PEFT saves tensors of a LoRA-wrapped module under `<module>.base_layer.<param>`.
    """
    owner, _, param = weight_name.rpartition(".")
    if owner in set(lora_modules):
        return f"{PEFT_PREFIX}{owner}.base_layer.{param}"
    return PEFT_PREFIX + weight_name


def target_modules_for(
    module_names: Iterable[str], base_module_names: Iterable[str] | None = None
) -> list[str]:
    """`target_modules` that make PEFT wrap exactly `module_names`.

    With the base model's module names known, the short suffix form (`["q_proj", "v_proj"]`) is
    used when it selects exactly those modules; otherwise the exact module paths.
    """
    names = set(module_names)
    if base_module_names is not None:
        suffixes = {n.rsplit(".", 1)[-1] for n in names}
        selected = {x for x in base_module_names if x.rsplit(".", 1)[-1] in suffixes}
        if selected == names:
            return sorted(suffixes)
    return sorted(names, key=_natural_key)


def _pattern_key(name: str, others: Sequence[str]) -> str:
    """A rank_pattern key that PEFT's get_pattern_key matches to `name` and to no other module."""
    plain = re.compile(rf"(.*\.)?({name})$")
    if any(o != name and plain.match(o) for o in others):
        return re.escape(name)
    return name


def build_adapter_config(
    ranks: Mapping[str, int],
    *,
    rank: int | None = None,
    inputs: Sequence[AdapterInfo] = (),
    base_module_names: Iterable[str] | None = None,
    modules_to_save: Sequence[str] | None = None,
    bias: str = "none",
    fan_in_fan_out: bool | None = None,
    base_model_name_or_path: str | None = None,
    task_type: str | None = None,
) -> dict[str, Any]:
    """adapter_config.json for the merged adapter, built through peft's LoraConfig.

    ranks: module name -> number of directions k written for it (k ≥ 1).
    rank: the config's `r` (default: the largest k); modules with k != rank go to rank_pattern.
    Every module gets lora_alpha = k (alpha_pattern), use_rslora False: scaling is exactly 1.
    inputs supply defaults: task_type and base_model_name_or_path when all inputs agree,
    fan_in_fan_out, and the union of their modules_to_save.
    """
    from peft import LoraConfig

    if not ranks:
        raise AdapterError("merged adapter has no LoRA modules; nothing to write.")
    bad = {m: k for m, k in ranks.items() if int(k) < 1}
    if bad:
        raise AdapterError(
            f"modules {sorted(bad)} got rank 0 (all inputs cancel out there); drop them from "
            "`ranks` before building the config."
        )
    r = int(rank if rank is not None else max(ranks.values()))
    names = sorted(ranks, key=_natural_key)
    deficient = [m for m in names if int(ranks[m]) != r]
    others = list(names) + ([] if base_module_names is None else list(base_module_names))
    rank_pattern = {_pattern_key(m, others): int(ranks[m]) for m in deficient}
    alpha_pattern = dict(rank_pattern)

    def agreed(attr: str) -> Any:
        vals = {getattr(i, attr) for i in inputs}
        return vals.pop() if len(vals) == 1 else None

    if task_type is None:
        task_type = agreed("task_type")
    if base_model_name_or_path is None:
        base_model_name_or_path = agreed("base_model_name_or_path")
    if fan_in_fan_out is None:
        fan_in_fan_out = any(i.fan_in_fan_out for i in inputs)
    if modules_to_save is None:
        mts = sorted({m for i in inputs for m in i.modules_to_save})
        modules_to_save = mts or None

    try:
        cfg = LoraConfig(
            r=r,
            lora_alpha=r,
            use_rslora=False,
            target_modules=target_modules_for(names, base_module_names),
            rank_pattern=rank_pattern,
            alpha_pattern=alpha_pattern,
            modules_to_save=list(modules_to_save) if modules_to_save else None,
            bias=bias,
            fan_in_fan_out=bool(fan_in_fan_out),
            base_model_name_or_path=base_model_name_or_path,
            task_type=task_type,
            lora_dropout=0.0,
            inference_mode=True,
        )
    except Exception as e:
        raise AdapterError(f"cannot build the merged adapter's LoraConfig: {e}") from e
    out = cfg.to_dict()
    for k, v in out.items():
        if isinstance(v, set):
            out[k] = sorted(v, key=_natural_key)
    out["peft_type"] = str(getattr(out["peft_type"], "value", out["peft_type"]))
    if out.get("task_type") is not None:
        out["task_type"] = str(getattr(out["task_type"], "value", out["task_type"]))
    # Keep the explicit order of target_modules (to_dict may hand back a set).
    out["target_modules"] = target_modules_for(names, base_module_names)
    return out


def write_adapter(
    out_dir: str | os.PathLike,
    tensors: Mapping[str, torch.Tensor],
    config: Mapping[str, Any],
    *,
    dtype: torch.dtype | None = None,
) -> None:
    """Write adapter_model.safetensors + adapter_config.json (small adapters, tests, examples).

    The planner streams large outputs through mergekit's TensorWriter instead.
    """
    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    data = {
        k: (v.to(dtype) if dtype else v).detach().cpu().contiguous() for k, v in tensors.items()
    }
    save_file(data, os.path.join(out_dir, SAFETENSORS_NAME), metadata={"format": "pt"})
    with open(os.path.join(out_dir, CONFIG_NAME), "w", encoding="utf-8") as f:
        json.dump(dict(config), f, indent=2, sort_keys=True)


def consolidate_shards(out_path: str, basename: str, chunk: int = 1 << 24) -> None:
    """Join ``basename-0000k-of-0000n.safetensors`` into one ``basename.safetensors``.

    PEFT loads single-file adapters only, while mergekit's writer flushes bounded shards so
    memory does not grow with the number of modules. Bytes are copied in ``chunk``-sized
    pieces; tensors keep their order within and across shards.
    """
    import struct

    index_path = os.path.join(out_path, f"{basename}.safetensors.index.json")
    if not os.path.exists(index_path):
        return
    with open(index_path, encoding="utf-8") as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
    entries = []  # (name, meta, shard path)
    for shard in shards:
        path = os.path.join(out_path, shard)
        header = read_safetensors_header(path, what="merged shard ")
        entries += [(k, m, path) for k, m in sorted(header.items(), key=lambda kv: kv[1]["start"])]
    header_out: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, meta, _ in entries:
        header_out[name] = {
            "dtype": meta["dtype"],
            "shape": list(meta["shape"]),
            "data_offsets": [offset, offset + meta["nbytes"]],
        }
        offset += meta["nbytes"]
    blob = json.dumps(header_out, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(os.path.join(out_path, f"{basename}.safetensors"), "wb") as out:
        out.write(struct.pack("<Q", len(blob)) + blob)
        for _, meta, path in entries:
            with open(path, "rb") as src:
                src.seek(meta["start"])
                length = meta["nbytes"]
                while length > 0:
                    data = src.read(min(chunk, length))
                    out.write(data)
                    length -= len(data)
    for shard in shards:
        os.remove(os.path.join(out_path, shard))
    os.remove(index_path)
