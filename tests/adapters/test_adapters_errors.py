"""Bad or unsupported adapters raise AdapterError naming the adapter, the module and the fix."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from adapter_fixtures import KEY_A, KEY_B, Q0, edit_config, edit_tensors, load_base

from mergekit_ctm.adapters import AdapterError, load_factors, read_adapter
from mergekit_ctm.examples import build_tiny_adapter


def _raises(path, *patterns: str) -> str:
    with pytest.raises(AdapterError) as ei:
        read_adapter(path)
    msg = str(ei.value)
    assert str(path) in msg, msg
    for p in patterns:
        assert p in msg, msg
    return msg


def test_dora_config(bases, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p = build_tiny_adapter(
            bases["llama"],
            tmp_path / "dora",
            r=2,
            alpha=2,
            target_modules=["q_proj"],
            use_dora=True,
        )
    _raises(p, "DoRA", "use_dora", "not supported yet")


def test_dora_magnitude_without_flag_names_module(bases, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p = Path(
            build_tiny_adapter(
                bases["llama"],
                tmp_path / "d",
                r=2,
                alpha=2,
                target_modules=["q_proj"],
                use_dora=True,
            )
        )
    edit_config(p, use_dora=False)
    _raises(p, "DoRA", Q0, "lora_magnitude_vector")


@pytest.mark.parametrize("kind", ["VERA", "LOHA", "IA3"])
def test_other_peft_types(kind, bases, tmp_path):
    from peft import IA3Config, LoHaConfig, VeraConfig, get_peft_model

    cfg = {
        "VERA": VeraConfig(r=2, target_modules=["q_proj", "v_proj"]),
        "LOHA": LoHaConfig(r=2, target_modules=["q_proj"]),
        "IA3": IA3Config(target_modules=["q_proj", "down_proj"], feedforward_modules=["down_proj"]),
    }[kind]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        get_peft_model(load_base(bases["llama"]), cfg).save_pretrained(tmp_path / kind)
    _raises(tmp_path / kind, f"peft_type '{kind}'", "not supported yet")


def test_conv_lora(tmp_path):
    from peft import LoraConfig, get_peft_model

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3)
            self.lin = torch.nn.Linear(4, 4)

    get_peft_model(Net(), LoraConfig(r=2, target_modules=["conv", "lin"])).save_pretrained(
        tmp_path / "conv"
    )
    _raises(tmp_path / "conv", "'conv'", "conv LoRA is not supported yet", "4-D")


def test_missing_files_and_bad_json(copy, tmp_path):
    p = copy("linear")
    (p / "adapter_model.safetensors").unlink()
    _raises(p, "no adapter_model.safetensors", "save_pretrained")
    p = copy("rslora")
    (p / "adapter_config.json").unlink()
    _raises(p, "no adapter_config.json")
    p = copy("patterns")
    (p / "adapter_config.json").write_text("{not json")
    _raises(p, "adapter_config.json is not valid JSON")
    with pytest.raises(AdapterError, match="does not exist"):
        read_adapter(str(tmp_path / "nowhere"))
    with pytest.raises(AdapterError, match="is a file"):
        read_adapter(str(p / "adapter_config.json"))


def test_truncated_safetensors(copy):
    p = copy("linear")
    f = p / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    _raises(p, "truncated")
    f.write_bytes(b"\x01")
    _raises(p, "not a readable safetensors file")


def test_rank_mismatch_between_A_and_B(copy):
    p = copy("linear")
    edit_tensors(p, lambda sd: sd.__setitem__(KEY_B, torch.zeros(32, 3)))
    _raises(p, Q0, "rank 4", "rank 3", "corrupt")


def test_rank_disagrees_with_config(copy):
    p = copy("linear")
    edit_config(p, r=5)
    _raises(p, Q0, "gives rank 5", "have rank 4", "rank_pattern")
    p = copy("patterns")
    edit_config(p, rank_pattern={"v_proj": 3, "layers.1.self_attn.q_proj": 3})
    _raises(p, "model.layers.0.self_attn.v_proj", "rank_pattern", "rank 3")


def test_missing_half(copy):
    p = copy("linear")
    edit_tensors(p, lambda sd: sd.pop(KEY_B))
    _raises(p, Q0, "no lora_B")


def test_unknown_tensor_and_prefix(copy):
    p = copy("linear")
    edit_tensors(p, lambda sd: sd.__setitem__("base_model.model.lm_head.weight", torch.zeros(2)))
    _raises(p, "base_model.model.lm_head.weight", "modules_to_save")
    p = copy("rslora")
    edit_tensors(p, lambda sd: sd.__setitem__("model.x.weight", torch.zeros(2)))
    _raises(p, "model.x.weight", "prefix")


def test_unsupported_config_fields(copy):
    p = copy("linear")
    edit_config(p, lora_bias=True)
    _raises(p, "lora_bias", "not supported yet")


def test_file_changed_after_read(copy):
    p = copy("linear")
    info = read_adapter(p)
    edit_tensors(p, lambda sd: sd.pop(KEY_A))
    with pytest.raises(AdapterError) as ei:
        load_factors(info, Q0)
    assert str(p) in str(ei.value) and KEY_A in str(ei.value)
