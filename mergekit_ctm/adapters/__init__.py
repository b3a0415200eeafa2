"""PEFT LoRA adapters in and out.

Reading touches adapter_config.json and safetensors headers only; factors are loaded per module
on demand, normalized so that ΔW = scaling · B @ A has the BASE weight's layout::

    from mergekit_ctm.adapters import read_adapter, load_factors
    info = read_adapter("path/to/adapter")            # or hub id, or "base+adapter"
    for name, mod in info.modules.items():            # name: model.layers.0.self_attn.q_proj
        A, B, s = load_factors(info, name)            # A (r × m), B (n × r)

Writing: to_peft_tensors(module, A, B) + build_adapter_config(ranks, ...) (scaling 1 everywhere).
"""

from mergekit_ctm.adapters.errors import AdapterError
from mergekit_ctm.adapters.loading import load_delta, load_factors, load_full_tensor
from mergekit_ctm.adapters.peft_lora import (
    PEFT_PREFIX,
    AdapterInfo,
    FrozenMap,
    FullTensor,
    LoraModule,
    check_against_base,
    read_adapter,
    read_safetensors_header,
    resolve_adapter_path,
    resolve_rank_alpha,
)
from mergekit_ctm.adapters.writer import (
    build_adapter_config,
    peft_full_tensor_key,
    peft_tensor_names,
    target_modules_for,
    to_peft_tensors,
    write_adapter,
)

__all__ = [
    "PEFT_PREFIX",
    "AdapterError",
    "AdapterInfo",
    "FrozenMap",
    "FullTensor",
    "LoraModule",
    "build_adapter_config",
    "check_against_base",
    "load_delta",
    "load_factors",
    "load_full_tensor",
    "peft_full_tensor_key",
    "peft_tensor_names",
    "read_adapter",
    "read_safetensors_header",
    "resolve_adapter_path",
    "resolve_rank_alpha",
    "target_modules_for",
    "to_peft_tensors",
    "write_adapter",
]
