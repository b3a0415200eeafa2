"""Lazy tensor loading from a read adapter, normalized to the base weight's layout."""

from __future__ import annotations

import os
from functools import lru_cache

import torch

from mergekit_ctm.adapters.errors import AdapterError
from mergekit_ctm.adapters.peft_lora import AdapterInfo, LoraModule


@lru_cache(maxsize=16)
def _bin_loader(path: str):
    from mergekit.io import LazyTensorLoader, ShardedTensorIndex

    return LazyTensorLoader(ShardedTensorIndex.from_file(path), lazy_unpickle=True)


def _load_raw(info: AdapterInfo, file: str, key: str) -> torch.Tensor:
    path = os.path.join(info.path, file)
    try:
        if file.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(path, framework="pt", device="cpu") as f:
                return f.get_tensor(key)
        return _bin_loader(path).get_tensor(key)
    except Exception as e:
        raise AdapterError(
            f"adapter {info.ref!r}: cannot load tensor {key!r} from {path} ({type(e).__name__}: "
            f"{e}). The file changed or is corrupt since it was read; read the adapter again."
        ) from e


def _resolve(info: AdapterInfo, module: str | LoraModule) -> LoraModule:
    return info.module(module) if isinstance(module, str) else module


def load_factors(
    info: AdapterInfo,
    module: str | LoraModule,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(A, B, scaling) with ΔW = scaling · B @ A in the BASE weight's layout.

    A: (r × m_in), B: (n_out × r), contiguous. PEFT's stored factors (A_p, B_p) map as:
      nn.Linear:               A = A_p,  B = B_p          (ΔW = s B_p A_p, out × in)
      Conv1D (fan_in_fan_out): A = B_pᵀ, B = A_pᵀ          (ΔW = s (B_p A_p)ᵀ, in × out)
      nn.Embedding:            A = B_eᵀ, B = A_eᵀ          (ΔW = s (B_e A_e)ᵀ, num_emb × dim)
    dtype None keeps the stored dtype.
    """
    mod = _resolve(info, module)
    a = _load_raw(info, mod.file, mod.key_A)
    b = _load_raw(info, mod.file, mod.key_B)
    if mod.kind == "embedding" or mod.fan_in_fan_out:
        a, b = b.T, a.T
    if tuple(a.shape) != (mod.r, mod.m_in) or tuple(b.shape) != (mod.n_out, mod.r):
        raise AdapterError(
            f"adapter {info.ref!r}: module {mod.name!r} factors have shapes {tuple(a.shape)} / "
            f"{tuple(b.shape)}, expected {(mod.r, mod.m_in)} / {(mod.n_out, mod.r)}. The file "
            "changed since it was read; read the adapter again."
        )
    a = a.to(device=device, dtype=dtype or a.dtype).contiguous()
    b = b.to(device=device, dtype=dtype or b.dtype).contiguous()
    return a, b, mod.scaling


def load_delta(
    info: AdapterInfo,
    module: str | LoraModule,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Dense ΔW = scaling · B @ A (n_out × m_in). For tests and small modules only."""
    a, b, s = load_factors(info, module, device=device, dtype=dtype)
    return s * (b @ a)


def load_full_tensor(
    info: AdapterInfo,
    key: str,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """A modules_to_save / bias / embedding-layer tensor, by adapter key (see info.full_tensors).

    Its base tensor name is info.full_tensors[key].weight_name.
    """
    t = info.full_tensors.get(key)
    if t is None:
        raise AdapterError(
            f"adapter {info.ref!r}: no saved full tensor {key!r}; known: "
            f"{list(info.full_tensors)[:5]}."
        )
    x = _load_raw(info, t.file, key)
    return x.to(device=device, dtype=dtype or x.dtype)
