"""Lazy tensor loading from a read adapter, normalized to the base weight's layout.

Every tensor is checked finite as it is loaded (NaN/Inf in an adapter is refused naming the
adapter, module and tensor): no merge method may turn a diverged adapter into a finite,
plausible-looking output. ``check_values`` streams a whole adapter the same way, for
``validate``.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable
from functools import lru_cache

import torch

from mergekit_ctm.adapters.errors import AdapterError
from mergekit_ctm.adapters.peft_lora import (
    AdapterInfo,
    LoraModule,
    read_safetensors_header,
    stores_transposed,
    swap_layout,
)

# safetensors dtype codes, in the order of safetensors' Dtype enum (plan/stream.py lays
# tensors out by it).
SAFETENSORS_DTYPES: tuple[tuple[torch.dtype, str], ...] = (
    (torch.bool, "BOOL"),
    (torch.uint8, "U8"),
    (torch.int8, "I8"),
    (torch.float8_e5m2, "F8_E5M2"),
    (torch.float8_e4m3fn, "F8_E4M3"),
    (torch.int16, "I16"),
    (torch.uint16, "U16"),
    (torch.float16, "F16"),
    (torch.bfloat16, "BF16"),
    (torch.int32, "I32"),
    (torch.uint32, "U32"),
    (torch.float32, "F32"),
    (torch.complex64, "C64"),
    (torch.float64, "F64"),
    (torch.int64, "I64"),
    (torch.uint64, "U64"),
)
_TORCH_DTYPE = {code: dt for dt, code in SAFETENSORS_DTYPES}


@lru_cache(maxsize=64)
def _header(path: str, stamp: tuple[int, int, int]) -> dict[str, dict]:
    """A safetensors file's header, parsed once per version of the file (``stamp``: mtime,
    size, inode)."""
    return read_safetensors_header(path)


def read_safetensors_tensor(path: str, key: str) -> torch.Tensor:
    """One tensor of a safetensors file, read at its offset with one ``readinto``: the header
    is parsed once per file, not per tensor (``safe_open`` per tensor parsed it 1536 times in a
    6-adapter, 128-module merge), and no mapping outlives the call. Little-endian, as the
    format is."""
    st = os.stat(path)
    meta = _header(path, (st.st_mtime_ns, st.st_size, st.st_ino))[key]
    dtype = _TORCH_DTYPE[meta["dtype"]]
    buf = bytearray(meta["nbytes"])
    with open(path, "rb", buffering=0) as f:
        f.seek(meta["start"])
        if f.readinto(buf) != len(buf):
            raise OSError(f"short read of {key!r}: the file changed while it was read")
    if not buf:
        return torch.empty(meta["shape"], dtype=dtype)
    return torch.frombuffer(buf, dtype=dtype).reshape(meta["shape"])


# mergekit's LazyTensorLoader keeps one open shard per loader: the solve workers
# (engine.merge_lora_many sources) take turns on it.
_BIN_LOCK = threading.Lock()


@lru_cache(maxsize=16)
def _bin_loader(path: str):
    from mergekit.io import LazyTensorLoader, ShardedTensorIndex

    return LazyTensorLoader(ShardedTensorIndex.from_file(path), lazy_unpickle=True)


def _load_raw(info: AdapterInfo, file: str, key: str) -> torch.Tensor:
    path = os.path.join(info.path, file)
    try:
        if file.endswith(".safetensors"):
            return read_safetensors_tensor(path, key)
        with _BIN_LOCK:
            return _bin_loader(path).get_tensor(key)
    except Exception as e:
        raise AdapterError(
            f"adapter {info.ref!r}: cannot load tensor {key!r} from {path} ({type(e).__name__}: "
            f"{e}). The file changed or is corrupt since it was read; read the adapter again."
        ) from e


def _non_finite(x: torch.Tensor) -> bool:
    """True if ``x`` holds a NaN or ±Inf. Fast path: one float64 sum, which no finite float32
    tensor can overflow and any NaN/Inf spoils; the exact test runs only when it is spoilt."""
    if not x.is_floating_point() or x.numel() == 0:
        return False
    if bool(torch.isfinite(x.sum(dtype=torch.float64))):
        return False
    return not bool(torch.isfinite(x).all())


def _finite(
    info: AdapterInfo,
    where: str,
    key: str,
    x: torch.Tensor,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``x`` moved to (device, dtype), or AdapterError if it or its cast is not finite.

    where: "module NAME: " or "" (names what the tensor belongs to).
    """
    if _non_finite(x):
        bad = x.numel() - int(torch.isfinite(x).sum())
        raise AdapterError(
            f"adapter {info.ref!r}: {where}tensor {key} has {bad} NaN/Inf values of "
            f"{x.numel()}; the adapter is corrupt or its training diverged: retrain it or "
            "leave it out"
        )
    y = x.to(device=device, dtype=dtype or x.dtype)
    narrowed = (
        x.is_floating_point()
        and y.is_floating_point()
        and torch.finfo(y.dtype).max < torch.finfo(x.dtype).max
    )
    if narrowed and _non_finite(y):
        bad = y.numel() - int(torch.isfinite(y).sum())
        raise AdapterError(
            f"adapter {info.ref!r}: {where}tensor {key} has {bad} of {y.numel()} values "
            f"beyond the range of {y.dtype} (stored as {x.dtype}): merge with dtype: float64"
        )
    return y


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
    dtype None keeps the stored dtype. A factor holding NaN/Inf raises AdapterError naming the
    adapter, module and tensor.
    """
    mod = _resolve(info, module)
    a = _load_raw(info, mod.file, mod.key_A)
    b = _load_raw(info, mod.file, mod.key_B)
    transposed = stores_transposed(mod)
    a, b = swap_layout(a, b, transposed)
    key_a, key_b = (mod.key_B, mod.key_A) if transposed else (mod.key_A, mod.key_B)
    if tuple(a.shape) != (mod.r, mod.m_in) or tuple(b.shape) != (mod.n_out, mod.r):
        raise AdapterError(
            f"adapter {info.ref!r}: module {mod.name!r} factors have shapes {tuple(a.shape)} / "
            f"{tuple(b.shape)}, expected {(mod.r, mod.m_in)} / {(mod.n_out, mod.r)}. The file "
            "changed since it was read; read the adapter again."
        )
    where = f"module {mod.name}: "
    a = _finite(info, where, key_a, a, device=device, dtype=dtype).contiguous()
    b = _finite(info, where, key_b, b, device=device, dtype=dtype).contiguous()
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

    Its base tensor name is info.full_tensors[key].weight_name. NaN/Inf raises AdapterError.
    """
    t = info.full_tensors.get(key)
    if t is None:
        raise AdapterError(
            f"adapter {info.ref!r}: no saved full tensor {key!r}; known: "
            f"{list(info.full_tensors)[:5]}."
        )
    x = _load_raw(info, t.file, key)
    return _finite(info, f"{t.role} {t.weight_name}: ", key, x, device=device, dtype=dtype)


def check_values(
    info: AdapterInfo,
    full_tensors: Iterable[str] | None = None,
    *,
    dtype: torch.dtype | None = None,
) -> None:
    """Read every LoRA factor of ``info`` (and the full tensors named, default all), one tensor
    at a time, and raise AdapterError on the first NaN/Inf (or overflow of a cast to
    ``dtype``), naming the module and tensor. Nothing is kept in memory."""
    jobs = [
        (f"module {m.name}: ", m.file, k) for m in info.modules.values() for k in (m.key_A, m.key_B)
    ]
    keys = info.full_tensors if full_tensors is None else full_tensors
    for key in keys:
        t = info.full_tensors[key]
        jobs.append((f"{t.role} {t.weight_name}: ", t.file, key))
    for where, file, key in jobs:
        _finite(info, where, key, _load_raw(info, file, key), dtype=dtype)
