"""Reading real PEFT adapters: every module's ΔW equals PEFT's own get_delta_weight."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
from adapter_fixtures import ADAPTERS, load_base, load_peft, lora_layers
from safetensors import safe_open

from mergekit_ctm.adapters import (
    AdapterError,
    check_against_base,
    load_delta,
    load_factors,
    load_full_tensor,
    peft_tensor_names,
    read_adapter,
    to_peft_tensors,
)


def _base_of(name: str, bases: dict[str, str]) -> str:
    return bases[ADAPTERS[name][0]]


@pytest.mark.parametrize("name", list(ADAPTERS))
def test_delta_matches_peft(name, adapters, bases):
    info = read_adapter(adapters[name])
    pm, _ = load_peft(_base_of(name, bases), adapters[name])
    layers = lora_layers(pm)
    # exactly the modules PEFT wrapped, under base-model names
    assert set(info.modules) == set(layers)
    base_sd = load_base(_base_of(name, bases)).state_dict()
    for mod_name, layer in layers.items():
        mod = info.modules[mod_name]
        assert mod.r == layer.r["default"]
        assert mod.alpha == layer.lora_alpha["default"]
        assert mod.scaling == pytest.approx(layer.scaling["default"], rel=1e-12)
        ref = layer.get_delta_weight("default").double()
        got = load_delta(info, mod_name, dtype=torch.float64)
        # ΔW has the base weight's layout (Linear out×in, Conv1D in×out, Embedding V×d)
        assert got.shape == base_sd[mod.weight_name].shape == ref.shape == mod.delta_shape
        assert torch.allclose(got, ref, atol=1e-6, rtol=0), mod_name
        assert ref.abs().max() > 1e-3  # B is not zero: the comparison is meaningful


def test_scaling_from_equations(adapters):
    """s = alpha/r, alpha/√r with rsLoRA, per module from rank_pattern / alpha_pattern."""
    rs = read_adapter(adapters["rslora"])
    for m in rs.modules.values():
        assert m.scaling == pytest.approx(16 / math.sqrt(8))
    pat = read_adapter(adapters["patterns"]).modules
    # PEFT's get_pattern_key: "v_proj" matches any *.v_proj; layer-1 q_proj has its own rank
    assert (
        pat["model.layers.0.self_attn.v_proj"].r,
        pat["model.layers.0.self_attn.v_proj"].alpha,
    ) == (2, 5)
    assert pat["model.layers.1.self_attn.q_proj"].r == 3
    assert pat["model.layers.1.self_attn.q_proj"].scaling == pytest.approx(12 / 3)
    assert pat["model.layers.0.self_attn.q_proj"].scaling == pytest.approx(12 / 6)
    assert pat["model.layers.0.mlp.down_proj"].scaling == pytest.approx(3 / 6)
    # regex target_modules: only layer-1 q_proj and down_proj
    assert sorted(read_adapter(adapters["regex"]).modules) == [
        "model.layers.1.mlp.down_proj",
        "model.layers.1.self_attn.q_proj",
    ]


def test_factors_independent_float64_reference(adapters):
    """ΔW = s·B@A against the PEFT equations applied to the raw stored tensors, in float64."""
    for name in ("linear", "embedding", "gpt2_fifo_bias"):
        info = read_adapter(adapters[name])
        cfg = json.loads(open(f"{adapters[name]}/adapter_config.json").read())
        with safe_open(f"{adapters[name]}/adapter_model.safetensors", "pt") as f:
            raw = {k: f.get_tensor(k).double() for k in f.keys()}
        for mod in info.modules.values():
            A, B, s = load_factors(info, mod.name, dtype=torch.float64)
            p = "base_model.model." + mod.name
            assert s == cfg["lora_alpha"] / cfg["r"]
            if mod.kind == "embedding":
                ref = (raw[p + ".lora_embedding_B"] @ raw[p + ".lora_embedding_A"]).T * s
            elif cfg["fan_in_fan_out"]:
                ref = (raw[p + ".lora_B.weight"] @ raw[p + ".lora_A.weight"]).T * s
            else:
                ref = raw[p + ".lora_B.weight"] @ raw[p + ".lora_A.weight"] * s
            assert A.shape == (mod.r, mod.m_in) and B.shape == (mod.n_out, mod.r)
            assert A.is_contiguous() and B.is_contiguous()
            torch.testing.assert_close(s * B @ A, ref, atol=1e-12, rtol=0)


@pytest.mark.parametrize("name", list(ADAPTERS))
def test_peft_names_and_inverse_layout(name, adapters):
    """to_peft_tensors inverts load_factors exactly and uses the keys PEFT wrote."""
    info = read_adapter(adapters[name])
    with safe_open(f"{adapters[name]}/adapter_model.safetensors", "pt") as f:
        for mod in info.modules.values():
            assert peft_tensor_names(mod) == (mod.key_A, mod.key_B)
            A, B, _ = load_factors(info, mod)
            out = to_peft_tensors(mod, A, B)
            assert set(out) == {mod.key_A, mod.key_B}
            for k, v in out.items():
                assert torch.equal(v, f.get_tensor(k))


def test_modules_to_save_and_embedding_copy(adapters, bases):
    info = read_adapter(adapters["modules_to_save"])
    assert info.modules_to_save == ("lm_head",)
    assert info.modules_to_save_tensors == {"base_model.model.lm_head.weight": "lm_head.weight"}
    pm, _ = load_peft(bases["llama"], adapters["modules_to_save"])
    saved = pm.base_model.model.lm_head.modules_to_save["default"].weight
    assert torch.equal(load_full_tensor(info, "base_model.model.lm_head.weight"), saved)
    # PEFT copies the whole embedding when embed_tokens is a LoRA target
    emb = read_adapter(adapters["embedding"])
    assert emb.embedding_layer_tensors == {
        "base_model.model.model.embed_tokens.base_layer.weight": "model.embed_tokens.weight"
    }
    assert emb.modules["model.embed_tokens"].kind == "embedding"


def test_bias_all(adapters, bases):
    info = read_adapter(adapters["gpt2_fifo_bias"])
    assert info.bias == "all"
    bias = info.bias_tensors
    # biases of LoRA-wrapped modules are saved under base_layer; base names have no base_layer
    assert bias["base_model.model.transformer.h.0.attn.c_attn.base_layer.bias"] == (
        "transformer.h.0.attn.c_attn.bias"
    )
    assert "base_model.model.transformer.ln_f.bias" in bias
    sd = load_base(bases["gpt2"]).state_dict()
    for key, base_name in bias.items():
        assert torch.equal(load_full_tensor(info, key), sd[base_name])
    assert info.modules["transformer.h.0.attn.c_attn"].delta_shape == (32, 96)


def test_fields_and_estimates(adapters, bases):
    info = read_adapter(adapters["linear"])
    assert info.base_model_name_or_path == bases["llama"]
    assert info.task_type == "CAUSAL_LM"
    assert info.target_modules == ("q_proj", "v_proj")
    q = info.modules["model.layers.0.self_attn.q_proj"]
    assert (q.kind, q.r, q.n_out, q.m_in, q.dtype) == ("linear", 4, 32, 32, "F32")
    assert q.estimated_bytes == 4 * (32 + 32) * 4
    assert info.estimated_bytes() == sum(m.estimated_bytes for m in info.modules.values())
    assert read_adapter(adapters["regex"]).target_modules == r".*\.layers\.1\..*(q_proj|down_proj)"
    # hashable and equal by value (mergekit Task fields)
    again = read_adapter(adapters["linear"])
    assert again == info and hash(again) == hash(info)
    with pytest.raises(AdapterError, match="no LoRA module 'model.nope'"):
        info.module("model.nope")


def test_base_plus_adapter_reference(adapters, bases):
    from mergekit.common import ModelReference

    ref = f"{bases['llama']}+{adapters['linear']}"
    for r in (ref, ModelReference.parse(ref)):
        info = read_adapter(r)
        assert info.base_ref == bases["llama"]
        assert info.path == adapters["linear"]
        assert info.ref == ref
        assert set(info.modules) == set(read_adapter(adapters["linear"]).modules)


def test_bin_adapter(adapters, bases, tmp_path):
    """adapter_model.bin (safe_serialization=False) reads and loads the same factors."""
    from peft import PeftModel

    base = load_base(bases["llama"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = PeftModel.from_pretrained(base, adapters["patterns"])
        pm.save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "adapter_model.bin").exists()
    a, b = read_adapter(tmp_path), read_adapter(adapters["patterns"])
    assert a.files == ("adapter_model.bin",)
    for name in b.modules:
        assert a.modules[name].r == b.modules[name].r
        torch.testing.assert_close(load_delta(a, name), load_delta(b, name), atol=0, rtol=0)


def test_check_against_base(adapters, bases, tmp_path):
    from safetensors import safe_open as so

    def shapes(path):
        with so(f"{path}/model.safetensors", "pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}

    check_against_base(read_adapter(adapters["gpt2_fifo_bias"]), shapes(bases["gpt2"]))
    check_against_base(read_adapter(adapters["embedding"]), shapes(bases["llama"]))
    with pytest.raises(AdapterError, match="no base weight"):
        check_against_base(read_adapter(adapters["linear"]), shapes(bases["gpt2"]))
    # same adapter with fan_in_fan_out switched off: c_attn ΔW (96×32) vs Conv1D weight (32×96)
    import shutil

    bad = tmp_path / "nofifo"
    shutil.copytree(adapters["gpt2_fifo_bias"], bad)
    cfg = json.loads((bad / "adapter_config.json").read_text())
    cfg["fan_in_fan_out"] = False
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterError, match=r"transformer.h.0.attn.c_attn.*fan_in_fan_out=True"):
        check_against_base(read_adapter(bad), shapes(bases["gpt2"]))


def test_hub_id_from_local_cache(adapters, tmp_path, monkeypatch):
    """A hub id resolves through huggingface_hub.snapshot_download (offline, from its cache)."""
    import shutil

    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    sha = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--someone--tiny-lora"
    shutil.copytree(adapters["linear"], repo / "snapshots" / sha)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    info = read_adapter("someone/tiny-lora", cache_dir=str(tmp_path / "hub"))
    assert info.ref == "someone/tiny-lora"
    assert info.path == str(repo / "snapshots" / sha)
    assert set(info.modules) == set(read_adapter(adapters["linear"]).modules)
    with pytest.raises(AdapterError, match="'someone/other-lora'.*hub"):
        read_adapter("someone/other-lora", cache_dir=str(tmp_path / "hub"))


def test_read_safetensors_tensor_equals_safetensors_for_every_dtype(tmp_path):
    """Tensors read at their offsets equal safetensors' own reader, for every dtype the
    format has (empty and 0-d tensors included), and a rewritten file is read anew."""
    from safetensors.torch import save_file

    from mergekit_ctm.adapters.loading import SAFETENSORS_DTYPES, read_safetensors_tensor

    g = torch.Generator().manual_seed(0)
    tensors = {
        f"t_{code}": (torch.randn(3, 5, generator=g) * 40).to(dt) for dt, code in SAFETENSORS_DTYPES
    }
    tensors["empty"] = torch.zeros(0, 4)
    tensors["scalar"] = torch.tensor(2.5, dtype=torch.bfloat16)
    path = str(tmp_path / "x.safetensors")
    save_file(tensors, path)
    with safe_open(path, framework="pt") as f:
        for key in tensors:
            want, got = f.get_tensor(key), read_safetensors_tensor(path, key)
            assert got.dtype == want.dtype and got.shape == want.shape, key
            assert torch.equal(
                got.reshape(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8)
            ), key
    save_file({"t_F32": torch.ones(2)}, path)  # same path, new content
    assert torch.equal(read_safetensors_tensor(path, "t_F32"), torch.ones(2))
