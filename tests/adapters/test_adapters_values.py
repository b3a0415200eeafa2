"""Adapter values: factor dtypes and r / lora_alpha / patterns refused by name."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mergekit_ctm.adapters import AdapterError, read_adapter

Q0 = "model.layers.0.self_attn.q_proj"
KEY_A = f"base_model.model.{Q0}.lora_A.weight"
KEY_B = f"base_model.model.{Q0}.lora_B.weight"


@pytest.fixture
def copy(adapters, tmp_path):
    def make(name: str) -> Path:
        dst = tmp_path / name
        shutil.copytree(adapters[name], dst)
        return dst

    return make


def _edit_tensors(path: Path, fn) -> None:
    f = path / "adapter_model.safetensors"
    sd = load_file(f)
    fn(sd)
    save_file(sd, f, metadata={"format": "pt"})


def _edit_config(path: Path, **changes) -> None:
    f = path / "adapter_config.json"
    cfg = json.loads(f.read_text())
    cfg.update(changes)
    f.write_text(json.dumps(cfg))  # NaN / Infinity are written as JSON extensions


def _read_error(path: Path) -> str:
    with pytest.raises(AdapterError) as info:
        read_adapter(path)
    msg = str(info.value)
    assert str(path) in msg, msg
    return msg


@pytest.mark.parametrize(
    ("key", "dtype", "name"),
    [(KEY_A, torch.int32, "I32"), (KEY_B, torch.bool, "BOOL"), (KEY_A, torch.int8, "I8")],
)
def test_non_float_factors_are_refused(copy, key, dtype, name):
    p = copy("linear")
    _edit_tensors(p, lambda sd: sd.__setitem__(key, sd[key].to(dtype)))
    msg = _read_error(p)
    assert f"module {Q0!r}: tensor {key!r} has dtype {name}" in msg, msg
    assert "F16, BF16, F32, F64" in msg, msg


CONFIGS = [
    # (config change, expected text)
    ({"lora_alpha": 0}, "lora_alpha is 0 (scaling = lora_alpha / r would make every ΔW zero)"),
    ({"lora_alpha": -8}, "lora_alpha is -8; lora_alpha must be a positive finite number"),
    ({"lora_alpha": float("nan")}, "lora_alpha is nan;"),
    ({"lora_alpha": float("inf")}, "lora_alpha is inf;"),
    ({"lora_alpha": True}, "lora_alpha is True;"),
    ({"lora_alpha": "8"}, "lora_alpha is '8';"),
    ({"alpha_pattern": {"v_proj": 0}}, "alpha_pattern['v_proj'] is 0 (scaling"),
    ({"alpha_pattern": {"v_proj": -1.5}}, "alpha_pattern['v_proj'] is -1.5;"),
    ({"r": 0}, "r is 0; a LoRA rank must be a positive integer"),
    ({"r": -4}, "r is -4;"),
    ({"r": 4.0}, "r is 4.0;"),
    ({"r": True}, "r is True;"),
    ({"rank_pattern": {"v_proj": 0}}, "rank_pattern['v_proj'] is 0;"),
    ({"rank_pattern": {"v_proj": 2.0}}, "rank_pattern['v_proj'] is 2.0;"),
]


@pytest.mark.parametrize("case", range(len(CONFIGS)))
def test_rank_and_alpha_must_be_positive(copy, case):
    change, expected = CONFIGS[case]
    p = copy("patterns")
    _edit_config(p, **change)
    msg = _read_error(p)
    assert expected in msg, msg
    assert "adapter_config.json to the value the adapter was trained with" in msg, msg


def test_valid_patterns_still_read(adapters):
    info = read_adapter(adapters["patterns"])
    assert info.modules["model.layers.0.self_attn.v_proj"].alpha == 5
