"""output: model streams its tensors (the bytes of mergekit's own writer, any shard size),
writes every tensor in the base's dtype, and takes a hub-id base from the local Hugging Face
cache without the network."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from conftest import run_cli, tool
from mergekit.io.tasks import TensorWriterTask
from mergekit.options import MergeOptions
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mergekit_ctm.plan import stream
from mergekit_ctm.plan.run import run_adapter_merge
from mergekit_ctm.recipe import RecipeError, build_plan

REPO_ID = "someone/tiny-base"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def bf16(tmp_path_factory) -> dict:
    """A tiny bfloat16 Llama base and two LoRA adapters that also save lm_head
    (modules_to_save: merged densely in the math dtype, written in the base's dtype)."""
    from mergekit_ctm.examples import build_tiny_adapter, build_tiny_base

    root = tmp_path_factory.mktemp("bf16")
    build_tiny_base(root / "fp32")
    base = root / "base"
    base.mkdir()
    tensors = load_file(str(root / "fp32" / "model.safetensors"))
    save_file(
        {k: v.to(torch.bfloat16) for k, v in tensors.items()},
        str(base / "model.safetensors"),
        metadata={"format": "pt"},
    )
    cfg = json.loads((root / "fp32" / "config.json").read_text())
    cfg["torch_dtype"] = cfg["dtype"] = "bfloat16"
    (base / "config.json").write_text(json.dumps(cfg))
    (base / "tokenizer_config.json").write_text("{}")
    adapters = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i, (r, mods) in enumerate(((4, ["q_proj", "v_proj"]), (2, ["q_proj", "up_proj"]))):
            path = root / f"adapter_{i}"
            build_tiny_adapter(
                base, path, r=r, alpha=2 * r, target_modules=mods, seed=10 + i,
                modules_to_save=["lm_head"],
            )  # fmt: skip
            st = load_file(str(path / "adapter_model.safetensors"))  # a trained lm_head
            gen = torch.Generator().manual_seed(i)
            st = {k: v + 0.01 * torch.randn(v.shape, generator=gen) if "lm_head" in k else v
                  for k, v in st.items()}  # fmt: skip
            save_file(st, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
            adapters.append(str(path))
    return {"root": root, "base": str(base), "adapters": adapters}


def _recipe(bf16: dict, base: str) -> str:
    return yaml.safe_dump(
        {
            "merge_method": "ctm",
            "base_model": base,
            "models": [{"model": p, "parameters": {"density": 0.5}} for p in bf16["adapters"]],
            "parameters": {"base_rule": "ties", "rank": 3},
            "output": "model",
        },
        sort_keys=False,
    )


def _weights(out: Path) -> dict[str, bytes]:
    return {
        p.name: p.read_bytes()
        for p in sorted(out.iterdir())
        if p.name.endswith((".safetensors", ".index.json"))
    }


def _mergekit_writer(out_path: str, max_shard_size: int, layout: object) -> TensorWriterTask:
    return TensorWriterTask(out_path=out_path, max_shard_size=max_shard_size)


@pytest.mark.parametrize("shard", [None, 40_000])
def test_streamed_model_is_the_bytes_of_mergekits_writer(bf16, tmp_path, monkeypatch, shard):
    """Default (5B: one file) and a small --out-shard-size (several files + index): the
    streaming writer writes exactly what mergekit's TensorWriter writes, every tensor in the
    base's dtype (lm_head, merged in float32, too), and transformers loads it."""
    text = _recipe(bf16, bf16["base"])
    opts = MergeOptions(quiet=True, random_seed=0, **({"out_shard_size": shard} if shard else {}))
    run_adapter_merge(text, str(tmp_path / "stream"), opts, config_source=text)
    with monkeypatch.context() as m:  # the same plan with mergekit's TensorWriter
        m.setattr(stream, "StreamingWriterTask", _mergekit_writer)
        run_adapter_merge(text, str(tmp_path / "mergekit"), opts, config_source=text)
    got, want = _weights(tmp_path / "stream"), _weights(tmp_path / "mergekit")
    assert sorted(got) == sorted(want)
    if shard is None:
        assert list(got) == ["model.safetensors"]
    else:
        assert len(got) > 3 and "model.safetensors.index.json" in got
    for name in got:
        if name.endswith(".json"):
            assert json.loads(got[name])["weight_map"] == json.loads(want[name])["weight_map"]
        else:
            assert got[name] == want[name], name

    files = [p for p in (tmp_path / "stream").iterdir() if p.suffix == ".safetensors"]
    state = {}
    for p in files:
        with safe_open(str(p), "pt") as f:
            state.update({k: f.get_tensor(k) for k in f.keys()})
    base = load_file(str(Path(bf16["base"]) / "model.safetensors"))
    assert set(state) == set(base)
    assert {t.dtype for t in state.values()} == {torch.bfloat16}
    assert not torch.equal(state["lm_head.weight"], base["lm_head.weight"])  # merged
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "stream"))
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


def _hf_cache(root: Path, repo: str, src: str, files: list[str] | None = None) -> Path:
    """A Hugging Face hub cache as huggingface_hub writes it: blobs named by their hash,
    snapshots/<commit>/<file> symlinks into them, refs/main = the commit."""
    repo_dir = root / f"models--{repo.replace('/', '--')}"
    (repo_dir / "blobs").mkdir(parents=True)
    snap = repo_dir / "snapshots" / COMMIT
    snap.mkdir(parents=True)
    for name in files or sorted(os.listdir(src)):
        data = Path(src, name).read_bytes()
        blob = repo_dir / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snap / name).symlink_to(os.path.relpath(blob, snap))
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(COMMIT)
    return root


@pytest.mark.slow
def test_hub_id_base_from_the_local_cache_offline(bf16, tmp_path):
    """mergekit-yaml with HF_HUB_OFFLINE=1: base_model a hub id found in the cache gives the
    same tensors and config.json as the same merge from the local directory; the card records
    the hub id and the revision it read."""
    cache = _hf_cache(tmp_path / "hfcache", REPO_ID, bf16["base"])
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(tmp_path / "hf")}
    outs = {}
    for what, base in (
        ("local", bf16["base"]),
        ("hub", REPO_ID),
        ("pinned", f"{REPO_ID}@{COMMIT}"),
    ):
        recipe = tmp_path / f"{what}.yml"
        recipe.write_text(_recipe(bf16, base))
        outs[what] = tmp_path / what
        run_cli(tool("mergekit-yaml"), str(recipe), str(outs[what]), "--quiet", env=env)
    local = _weights(outs["local"])
    for what in ("hub", "pinned"):
        assert _weights(outs[what]) == local
        assert (outs[what] / "config.json").read_bytes() == (
            outs["local"] / "config.json"
        ).read_bytes()
        assert (outs[what] / "tokenizer_config.json").exists()
        config = (outs[what] / "mergekit_config.yml").read_text()
        base = REPO_ID if what == "hub" else f"{REPO_ID}@{COMMIT}"
        assert f"# base_model {base}: revision {COMMIT}\n" in config
        assert yaml.safe_load(config)["base_model"] == base
        card = (outs[what] / "README.md").read_text()
        assert f"base_model: {REPO_ID}\n" in card.split("---")[1]
        assert f"- base model `{base}` (revision {COMMIT})" in card
    assert "revision" not in (outs["local"] / "mergekit_config.yml").read_text().split("models")[0]

    # not in the cache: one line, exit 2, nothing written
    recipe = tmp_path / "absent.yml"
    recipe.write_text(_recipe(bf16, "someone/absent"))
    res = run_cli(
        tool("mergekit-yaml"), str(recipe), str(tmp_path / "absent"), env=env, check=False
    )
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "'someone/absent' is not in the local Hugging Face cache" in lines[0]
    assert "hf download someone/absent" in lines[0] and not (tmp_path / "absent").exists()


def test_hub_base_missing_or_incomplete_in_cache_is_refused(bf16, tmp_path):
    """build_plan with the cache given (as --transformers-cache does): an id not in the cache,
    and a cache that holds only the model's config.json, are one clear error each; a cached
    one resolves to its snapshot and gets the adapters' shape check."""
    cache = str(_hf_cache(tmp_path / "hub", REPO_ID, bf16["base"]))
    _hf_cache(tmp_path / "hub", "someone/config-only", bf16["base"], ["config.json"])

    def err(base: str) -> str:
        with pytest.raises(RecipeError) as info:
            build_plan(_recipe(bf16, base), cache_dir=cache)
        return str(info.value)

    msg = err("someone/absent@v2")
    assert msg.startswith("output: model: base model 'someone/absent@v2' is not in the local ")
    assert "`hf download someone/absent --revision v2`" in msg and "local directory" in msg
    msg = err("someone/config-only")
    assert msg.startswith("output: model: base model 'someone/config-only' has no weights at ")
    assert "download the whole model" in msg

    plan = build_plan(_recipe(bf16, REPO_ID), cache_dir=cache)
    assert plan.base_model == REPO_ID and plan.base_status == "cached"
    assert Path(plan.base_path) == Path(cache) / "models--someone--tiny-base" / "snapshots" / COMMIT

    # the shapes of a cached base are checked like a local one's
    other = tmp_path / "other"
    from mergekit_ctm.examples import build_tiny_base

    build_tiny_base(other, hidden=32)
    _hf_cache(tmp_path / "hub", "someone/other", str(other))
    assert "models[0]" in err("someone/other")


def test_bin_base_streams_and_unsafe_serialization_uses_mergekits_writer(bf16, tmp_path):
    """A pytorch_model.bin base is planned from its tensors on the meta device and streams
    the same bytes as its safetensors twin; --no-safe-serialization goes to mergekit's
    TensorWriter (torch.save), with the same values."""
    base = tmp_path / "binbase"
    shutil.copytree(bf16["base"], base)
    torch.save(load_file(str(base / "model.safetensors")), base / "pytorch_model.bin")
    (base / "model.safetensors").unlink()
    text = _recipe(bf16, str(base))
    opts = MergeOptions(quiet=True, random_seed=0)
    run_adapter_merge(text, str(tmp_path / "a"), opts, config_source=text)
    ref = _recipe(bf16, bf16["base"])
    run_adapter_merge(ref, str(tmp_path / "b"), opts, config_source=ref)
    assert _weights(tmp_path / "a") == _weights(tmp_path / "b")
    unsafe = MergeOptions(quiet=True, random_seed=0, safe_serialization=False)
    run_adapter_merge(ref, str(tmp_path / "c"), unsafe, config_source=ref)
    got = torch.load(tmp_path / "c" / "pytorch_model.bin")
    want = load_file(str(tmp_path / "b" / "model.safetensors"))
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_validate_estimate_counts_what_output_model_holds(bf16):
    """validate's estimate of output: model: nothing extra for an adapter; for a model, the
    largest tensor's working set (more for a merged tensor than a copied one, more with a
    cast to out_dtype) plus the merged factors; mergekit's writer would add the whole output."""
    from mergekit_ctm.cli.report import describe_plan, estimated_peak_bytes, model_output_bytes

    recipe = yaml.safe_load(_recipe(bf16, bf16["base"]))
    adapter = build_plan({**recipe, "output": "adapter"})
    model = build_plan(recipe)
    assert model_output_bytes(adapter) == (0, 0, 0)
    largest, factors, buffer = model_output_bytes(model)
    assert buffer == 0 and factors > 0
    numel = 128 * 64  # lm_head (merged densely) and up_proj (merged): the largest tensors
    assert largest == numel * 2 + numel * 2 + 3 * numel * 4  # bf16 read, cast back; f32 work
    assert estimated_peak_bytes(model) == max(estimated_peak_bytes(adapter), largest) + factors
    assert f"output: model: {largest / 2**20:.2f} MiB for its largest tensor" in (
        describe_plan(model)
    )

    copied = dataclasses.replace(model, modules=(), dense=())  # every tensor copied
    assert model_output_bytes(copied) == (numel * 2, 0, 0)
    wide = build_plan({**recipe, "out_dtype": "float32"})
    assert model_output_bytes(wide)[0] == largest + numel * 4
    _, _, whole = model_output_bytes(model, streaming=False)
    size = sum(
        t.numel() * t.element_size()
        for t in load_file(str(Path(bf16["base"]) / "model.safetensors")).values()
    )
    assert whole == size
    assert estimated_peak_bytes(model, streaming=False) == estimated_peak_bytes(model) + size


def test_failure_mid_write_leaves_no_output_and_no_open_file(bf16, tmp_path, monkeypatch):
    """A merge that fails after some tensors were streamed: no output directory, no staging
    left behind, and the shard files the writer had open are closed."""
    import gc

    from mergekit_ctm.plan.tasks import ApplyDelta

    calls = []
    real = ApplyDelta.execute

    def failing(self, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return real(self, **kw)

    monkeypatch.setattr(ApplyDelta, "execute", failing)
    fds = len(os.listdir("/proc/self/fd"))
    text = _recipe(bf16, bf16["base"])
    with pytest.raises(RuntimeError, match="boom"):
        run_adapter_merge(text, str(tmp_path / "out"), MergeOptions(quiet=True), config_source=text)
    gc.collect()
    assert os.listdir(tmp_path) == []
    assert len(os.listdir("/proc/self/fd")) == fds


def test_model_output_reproduces_from_its_config_byte_for_byte(bf16, tmp_path):
    """out/mergekit_config.yml (rule defaults written out) merged again gives every file of
    out/ byte for byte, the shards included."""
    text = _recipe(bf16, bf16["base"])
    opts = MergeOptions(quiet=True, random_seed=3, out_shard_size=40_000)
    run_adapter_merge(text, str(tmp_path / "a"), opts, config_source=text)
    again = (tmp_path / "a" / "mergekit_config.yml").read_text()
    assert "normalize: true" in again and "int8_mask: false" in again  # ties' defaults
    run_adapter_merge(again, str(tmp_path / "b"), MergeOptions(quiet=True, out_shard_size=40_000))
    files = {p.name: p.read_bytes() for p in sorted((tmp_path / "a").iterdir())}
    assert len([n for n in files if n.endswith(".safetensors")]) > 2
    assert files == {p.name: p.read_bytes() for p in sorted((tmp_path / "b").iterdir())}
