"""Streaming safetensors writer for ``output: model``: memory O(tensors in flight), any shard size.

mergekit's ``TensorWriter`` holds a whole shard in RAM until it is full (at the default
``--out-shard-size`` of 5B bytes, the whole merged model of anything under 5 GB). Every output
tensor's name, dtype and shape are known from the base model's headers before the merge
starts, so the shards' headers are too: :func:`plan_layout` lays the tensors out, and
:class:`StreamingWriter` writes each shard's header once, then each tensor's bytes at its
offset (``os.pwrite``) as soon as it is produced, in any order. The files are the bytes that
``safetensors.torch.save_file`` writes for the same tensors (same header, same order: dtype
alignment descending, then name; metadata ``{"format": "pt"}``), split into shards by
mergekit's rule (a new shard when the next tensor would pass ``max_shard_size`` bytes), named
as mergekit and transformers name them (``model.safetensors``, or
``model-0000i-of-0000n.safetensors`` and ``model.safetensors.index.json``).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from mergekit.io.tasks import TensorWriterTask
from pydantic import ConfigDict

from mergekit_ctm.adapters.loading import SAFETENSORS_DTYPES as _CODES

# within a file, tensors are laid out by this rank descending, then by name (safetensors'
# own serializer order)
CODE = {dt: code for dt, code in _CODES}
DTYPE = {code: dt for dt, code in _CODES}
_RANK = {code: i for i, (_, code) in enumerate(_CODES)}
METADATA = {"format": "pt"}
# Shard size mergekit's own TensorWriter is given for full-checkpoint output: model (it holds a
# whole shard in memory); reshard() joins the shards to --out-shard-size afterwards.
MODEL_WRITE_BUFFER = 64 * 2**20


@dataclass(frozen=True)
class Slot:
    """Where one tensor's bytes go: shard index and byte range within its data section."""

    name: str
    dtype: str  # safetensors code
    shape: tuple[int, ...]
    shard: int
    begin: int
    end: int


@dataclass(frozen=True, eq=False)
class ShardLayout:
    """Every output tensor's slot, the shard file names and headers. Hashes and compares by a
    digest of its content (a Task field: mergekit hashes tasks often)."""

    slots: tuple[Slot, ...]
    files: tuple[str, ...]
    headers: tuple[bytes, ...]
    index_name: str | None
    digest: str = field(default="")

    def __hash__(self) -> int:
        return hash(self.digest)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ShardLayout) and other.digest == self.digest

    @property
    def total_size(self) -> int:
        """Bytes of tensor data over all shards (the index's ``total_size``)."""
        return sum(s.end - s.begin for s in self.slots)

    def shard_bytes(self, i: int) -> int:
        """Size of shard file i: 8-byte length, header, data."""
        data = max((s.end for s in self.slots if s.shard == i), default=0)
        return 8 + len(self.headers[i]) + data


def _nbytes(dtype: torch.dtype, shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n * torch.empty((), dtype=dtype).element_size()


def streamable(dtypes: Iterable[torch.dtype]) -> bool:
    """Whether every dtype has a safetensors code this writer knows."""
    return all(dt in CODE for dt in dtypes)


def plan_layout(
    tensors: Sequence[tuple[str, torch.dtype, Sequence[int]]],
    max_shard_size: int,
    basename: str = "model",
) -> ShardLayout:
    """Lay out (name, dtype, shape) in this order into shards of at most ``max_shard_size``
    bytes of data (a tensor larger than that gets a shard of its own; ``max_shard_size`` ≤ 0:
    one shard), exactly as mergekit's TensorWriter assigns tensors to shards."""
    groups: list[list[tuple[str, torch.dtype, tuple[int, ...]]]] = [[]]
    size = 0
    for name, dtype, shape in tensors:
        nbytes = _nbytes(dtype, shape)
        if groups[-1] and max_shard_size > 0 and size + nbytes > max_shard_size:
            groups.append([])
            size = 0
        groups[-1].append((name, dtype, tuple(int(d) for d in shape)))
        size += nbytes
    n = len(groups)
    if n == 1:
        files = (f"{basename}.safetensors",)
    else:
        files = tuple(f"{basename}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n))
    slots: list[Slot] = []
    headers: list[bytes] = []
    for i, group in enumerate(groups):
        order = sorted(group, key=lambda t: (-_RANK[CODE[t[1]]], t[0]))
        header: dict[str, Any] = {"__metadata__": METADATA}
        offset = 0
        for name, dtype, shape in order:
            end = offset + _nbytes(dtype, shape)
            slot = Slot(name, CODE[dtype], shape, i, offset, end)
            slots.append(slot)
            header[name] = {
                "dtype": slot.dtype,
                "shape": list(shape),
                "data_offsets": [offset, end],
            }
            offset = end
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        headers.append(text + b" " * (-len(text) % 8))
    digest = hashlib.sha256(repr((slots, files, headers)).encode()).hexdigest()
    return ShardLayout(
        slots=tuple(slots),
        files=files,
        headers=tuple(headers),
        index_name=f"{basename}.safetensors.index.json" if n > 1 else None,
        digest=digest,
    )


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        written = os.pwrite(fd, data, offset)
        data, offset = data[written:], offset + written


class StreamingWriter:
    """Writes tensors of a :class:`ShardLayout` into ``out_path``, each at its offset.

    ``save_tensor`` takes the tensors in any order, from any thread; a shard's file is
    created (header written, length set) on its first tensor and closed after its last, so at
    most the shards being filled are open. ``finalize`` checks that every tensor came and
    writes the index for several shards.
    """

    def __init__(self, out_path: str, layout: ShardLayout) -> None:
        os.makedirs(out_path, exist_ok=True)
        self.out_path = out_path
        self.layout = layout
        self._slots = {s.name: s for s in layout.slots}
        self._left = [0] * len(layout.files)
        for s in layout.slots:
            self._left[s.shard] += 1
        self._fds: dict[int, int] = {}
        self._done: set[str] = set()
        self._lock = threading.Lock()

    def _open(self, shard: int) -> int:
        fd = self._fds.get(shard)
        if fd is None:
            path = os.path.join(self.out_path, self.layout.files[shard])
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
            header = self.layout.headers[shard]
            _pwrite_all(fd, memoryview(struct.pack("<Q", len(header)) + header), 0)
            os.ftruncate(fd, self.layout.shard_bytes(shard))
            self._fds[shard] = fd
        return fd

    def save_tensor(self, name: str, tensor: torch.Tensor, clone: bool = False) -> None:
        """Write ``tensor`` (its planned dtype and shape, else RuntimeError) at its slot."""
        slot = self._slots.get(name)
        if slot is None:
            raise RuntimeError(f"streaming writer: tensor {name!r} is not in the planned layout")
        got = (CODE.get(tensor.dtype), tuple(tensor.shape))
        if got != (slot.dtype, slot.shape):
            raise RuntimeError(
                f"streaming writer: tensor {name!r} is {got[0]} {list(got[1])}, planned "
                f"{slot.dtype} {list(slot.shape)}"
            )
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        header = 8 + len(self.layout.headers[slot.shard])
        with self._lock:
            if name in self._done:
                raise RuntimeError(f"streaming writer: tensor {name!r} written twice")
            fd = self._open(slot.shard)
            if data.size:
                _pwrite_all(fd, memoryview(data).cast("B"), header + slot.begin)
            self._done.add(name)
            self._left[slot.shard] -= 1
            if self._left[slot.shard] == 0:
                os.close(self._fds.pop(slot.shard))

    def close(self) -> None:
        """Close open files (after an error: the staging directory is discarded anyway)."""
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def __del__(self) -> None:  # a failed merge drops the writer without finalize
        if getattr(self, "_fds", None):
            self.close()

    def finalize(self) -> None:
        missing = [s.name for s in self.layout.slots if s.name not in self._done]
        if missing:
            self.close()
            raise RuntimeError(
                f"streaming writer: {len(missing)} planned tensor(s) never written, e.g. "
                f"{missing[:3]}"
            )
        self.close()
        if self.layout.index_name:
            weight_map = {s.name: self.layout.files[s.shard] for s in self.layout.slots}
            index = {
                "metadata": {"total_size": self.layout.total_size},
                "weight_map": dict(sorted(weight_map.items())),
            }
            with open(
                os.path.join(self.out_path, self.layout.index_name), "w", encoding="utf-8"
            ) as f:
                json.dump(index, f, indent=2)


class StreamingWriterTask(TensorWriterTask):
    """mergekit's TensorWriterTask with a planned layout: it makes a :class:`StreamingWriter`,
    which mergekit's own SaveTensor and FinalizeModel use as they use a TensorWriter
    (``save_tensor``, ``finalize``). ``max_shard_size`` is the one the layout was planned with."""

    model_config = ConfigDict(arbitrary_types_allowed=True, frozen=True)

    layout: ShardLayout

    def execute(self, **_kwargs: Any) -> StreamingWriter:  # type: ignore[override]
        return StreamingWriter(self.out_path, self.layout)


def reshard(directory: str, max_shard_size: int, basename: str = "model") -> bool:
    """Join the safetensors shards ``basename-*-of-*.safetensors`` (and their index) in
    ``directory`` into shards of at most ``max_shard_size`` bytes, streaming one tensor at a
    time (memory: the largest tensor), with the naming and index of :func:`plan_layout`.

    Tensors keep the order they have in the old shards (shard by shard, by offset), so the
    result depends only on the old files. Returns False, changing nothing, when there is no
    index (one shard: nothing to join)."""
    from mergekit_ctm.adapters.loading import read_safetensors_tensor
    from mergekit_ctm.adapters.peft_lora import read_safetensors_header

    index_path = os.path.join(directory, f"{basename}.safetensors.index.json")
    if not os.path.isfile(index_path):
        return False
    with open(index_path, encoding="utf-8") as f:
        old_files = sorted(set(json.load(f)["weight_map"].values()))
    order: list[tuple[str, str, dict[str, Any]]] = []  # (file, tensor, header entry)
    for name in old_files:
        header = read_safetensors_header(os.path.join(directory, name))
        order += [(name, k, m) for k, m in sorted(header.items(), key=lambda kv: kv[1]["start"])]
    layout = plan_layout(
        [(k, DTYPE[m["dtype"]], m["shape"]) for _, k, m in order], max_shard_size, basename
    )
    staging = os.path.join(directory, f".{basename}.reshard")
    os.makedirs(staging)
    writer = StreamingWriter(staging, layout)
    try:
        for name, key, _ in order:
            writer.save_tensor(key, read_safetensors_tensor(os.path.join(directory, name), key))
        writer.finalize()
    finally:
        writer.close()
    for name in [*old_files, os.path.basename(index_path)]:
        os.remove(os.path.join(directory, name))
    for name in sorted(os.listdir(staging)):
        os.replace(os.path.join(staging, name), os.path.join(directory, name))
    os.rmdir(staging)
    return True
