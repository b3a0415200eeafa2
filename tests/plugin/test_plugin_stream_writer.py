"""The streaming safetensors writer of output: model writes what safetensors and mergekit's
TensorWriter write, in any order of arrival, and refuses what it did not plan."""

from __future__ import annotations

import json
import random

import pytest
import torch
from mergekit.io.tensor_writer import TensorWriter
from safetensors import safe_open
from safetensors.torch import save_file

from mergekit_ctm.plan.stream import CODE, StreamingWriter, plan_layout


def _tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    out: dict[str, torch.Tensor] = {}
    for i, dt in enumerate(CODE):
        shape = [(3, 5), (7,), (0,), (2, 0, 3), ()][i % 5]
        x = torch.randn(shape, generator=gen, dtype=torch.float64) * 100
        out[f"layer.{i % 3}.t{i:02d}.weight"] = x.to(dt)
    out["a.big"] = torch.randn(64, 33, generator=gen).to(torch.bfloat16)
    out["z.big"] = torch.randn(17, 40, generator=gen)
    return out


def _write(path, tensors: dict[str, torch.Tensor], max_shard: int, seed: int) -> None:
    layout = plan_layout([(k, v.dtype, v.shape) for k, v in tensors.items()], max_shard)
    writer = StreamingWriter(str(path), layout)
    names = list(tensors)
    random.Random(seed).shuffle(names)  # arrival order does not matter
    for name in names:
        writer.save_tensor(name, tensors[name])
    writer.finalize()


def _assert_same_files(ref, got) -> list[str]:
    """``got`` holds the files of ``ref``: shards byte for byte, indexes with the same weight
    map and total size (their other metadata may differ). Returns the sorted file names."""
    names = sorted(p.name for p in ref.iterdir())
    assert sorted(p.name for p in got.iterdir()) == names
    for name in names:
        want, have = ref / name, got / name
        if name.endswith(".json"):
            w, g = json.loads(want.read_text()), json.loads(have.read_text())
            assert g["weight_map"] == w["weight_map"]
            assert g["metadata"]["total_size"] == w["metadata"]["total_size"]
        else:
            assert have.read_bytes() == want.read_bytes(), name
    return names


def test_one_shard_is_the_bytes_safetensors_writes(tmp_path):
    tensors = _tensors()
    save_file(tensors, str(tmp_path / "ref.safetensors"), metadata={"format": "pt"})
    for seed in (0, 1):
        _write(tmp_path / f"s{seed}", tensors, 0, seed)
        got = (tmp_path / f"s{seed}" / "model.safetensors").read_bytes()
        assert got == (tmp_path / "ref.safetensors").read_bytes()
    with safe_open(str(tmp_path / "s0" / "model.safetensors"), "pt") as f:
        for k, v in tensors.items():
            x = f.get_tensor(k)
            assert x.dtype == v.dtype and x.shape == v.shape, k
            assert torch.equal(x.reshape(-1).view(torch.uint8), v.reshape(-1).view(torch.uint8))


@pytest.mark.parametrize("max_shard", [1, 300, 10**6])
def test_shards_and_index_are_mergekits(tmp_path, max_shard):
    """Same shard split, file names and shard bytes as mergekit's TensorWriter given the
    tensors in the planned order; the index maps the same names to the same files."""
    tensors = _tensors()
    ref = TensorWriter(str(tmp_path / "ref"), max_shard_size=max_shard)
    for k, v in tensors.items():
        ref.save_tensor(k, v)
    ref.finalize()
    _write(tmp_path / "got", tensors, max_shard, 3)
    names = _assert_same_files(tmp_path / "ref", tmp_path / "got")
    assert len(names) > 2 if max_shard < 10**6 else names == ["model.safetensors"]


def test_unplanned_wrong_missing_and_twice_are_errors(tmp_path):
    layout = plan_layout([("a", torch.float32, (2, 2)), ("b", torch.bfloat16, (3,))], 0)
    writer = StreamingWriter(str(tmp_path), layout)
    with pytest.raises(RuntimeError, match="'c' is not in the planned layout"):
        writer.save_tensor("c", torch.zeros(2, 2))
    with pytest.raises(RuntimeError, match=r"'a' is F16 \[2, 2\], planned F32 \[2, 2\]"):
        writer.save_tensor("a", torch.zeros(2, 2, dtype=torch.float16))
    with pytest.raises(RuntimeError, match=r"'a' is F32 \[4\], planned F32 \[2, 2\]"):
        writer.save_tensor("a", torch.zeros(4))
    writer.save_tensor("a", torch.ones(2, 2))
    with pytest.raises(RuntimeError, match="'a' written twice"):
        writer.save_tensor("a", torch.ones(2, 2))
    with pytest.raises(RuntimeError, match=r"1 planned tensor\(s\) never written, e.g. \['b'\]"):
        writer.finalize()


def test_layout_hashes_by_content():
    specs = [("a", torch.float32, (2, 2)), ("b", torch.bfloat16, (3,))]
    one, two = plan_layout(specs, 0), plan_layout(list(specs), 0)
    assert one == two and hash(one) == hash(two) and one is not two
    assert plan_layout(specs, 1) != one


@pytest.mark.parametrize("target", [700, 3000, 10**6])
def test_reshard_joins_small_shards_into_mergekits_shards(tmp_path, target):
    """reshard: mergekit's small shards joined to ``target`` bytes equal mergekit's own shards
    at ``target`` when the tensors arrive in name order (one dtype: safetensors' file order is
    the name order, so the old shards keep the arrival order), tensor by tensor."""
    from mergekit_ctm.plan.stream import reshard

    gen = torch.Generator().manual_seed(1)
    tensors = {f"t{i:02d}": torch.randn(i % 7 + 1, 9, generator=gen) for i in range(30)}

    def mergekit_writes(path, max_shard: int) -> None:
        writer = TensorWriter(str(path), max_shard_size=max_shard)
        for k, v in tensors.items():
            writer.save_tensor(k, v)
        writer.finalize()

    mergekit_writes(tmp_path / "got", 300)
    assert len(list((tmp_path / "got").glob("*.safetensors"))) > 10
    assert reshard(str(tmp_path / "got"), target)
    mergekit_writes(tmp_path / "ref", target)
    names = _assert_same_files(tmp_path / "ref", tmp_path / "got")
    if names == ["model.safetensors"]:  # one shard, no index: nothing to join
        assert not reshard(str(tmp_path / "got"), target)
        assert sorted(p.name for p in (tmp_path / "got").iterdir()) == names
