"""Adapter values: factor dtypes, r / lora_alpha / patterns, and NaN/Inf refused by name."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from adapter_fixtures import KEY_A, KEY_B, Q0, edit_config, edit_tensors
from safetensors.torch import load_file

from mergekit_ctm.adapters import AdapterError, load_factors, load_full_tensor, read_adapter
from mergekit_ctm.adapters.loading import check_values


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
    edit_tensors(p, lambda sd: sd.__setitem__(key, sd[key].to(dtype)))
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
    edit_config(p, **change)
    msg = _read_error(p)
    assert expected in msg, msg
    assert "adapter_config.json to the value the adapter was trained with" in msg, msg


def test_valid_patterns_still_read(adapters):
    info = read_adapter(adapters["patterns"])
    assert info.modules["model.layers.0.self_attn.v_proj"].alpha == 5


def _one_nan(path: Path, key: str, value: float = float("nan"), count: int = 1) -> int:
    def fn(sd):
        flat = sd[key].view(-1)
        flat[:count] = value

    edit_tensors(path, fn)
    return load_file(path / "adapter_model.safetensors")[key].numel()


def test_load_factors_refuses_nan_naming_adapter_module_tensor(copy):
    p = copy("linear")
    n = _one_nan(p, KEY_B, count=3)
    info = read_adapter(p)  # headers only: reading still works
    with pytest.raises(AdapterError) as ei:
        load_factors(info, Q0)
    assert str(ei.value) == (
        f"adapter {str(p)!r}: module {Q0}: tensor {KEY_B} has 3 NaN/Inf values of {n}; the "
        "adapter is corrupt or its training diverged: retrain it or leave it out"
    )
    with pytest.raises(AdapterError, match=f"tensor {KEY_B} has 3 NaN/Inf"):
        check_values(info)
    # the other modules load
    load_factors(info, "model.layers.1.self_attn.q_proj")


def test_inf_in_embedding_factor_names_the_stored_key(copy):
    p = copy("embedding")
    key = "base_model.model.model.embed_tokens.lora_embedding_A"
    _one_nan(p, key, float("-inf"))
    info = read_adapter(p)
    with pytest.raises(AdapterError, match=f"module model.embed_tokens: tensor {key} has 1 NaN"):
        load_factors(info, "model.embed_tokens")


def test_full_tensor_nan(copy):
    p = copy("modules_to_save")
    info = read_adapter(p)
    key = next(iter(info.modules_to_save_tensors))
    _one_nan(p, key)
    info = read_adapter(p)
    with pytest.raises(AdapterError, match=f"modules_to_save lm_head.weight: tensor {key} has 1"):
        load_full_tensor(info, key)
    with pytest.raises(AdapterError, match=f"tensor {key} has 1 NaN/Inf"):
        check_values(info)
    check_values(info, full_tensors=())  # factors alone are clean


def test_float64_factor_that_overflows_float32(copy):
    p = copy("linear")

    def fn(sd):
        sd[KEY_A] = sd[KEY_A].double()
        sd[KEY_A][0, 0] = 1e300

    edit_tensors(p, fn)
    info = read_adapter(p)
    a, _, _ = load_factors(info, Q0, dtype=torch.float64)
    assert a[0, 0] == 1e300
    with pytest.raises(AdapterError, match=f"tensor {KEY_A} has 1 of 128 values beyond the range"):
        load_factors(info, Q0, dtype=torch.float32)
    with pytest.raises(AdapterError, match="dtype: float64"):
        check_values(info, dtype=torch.float32)
    check_values(info, dtype=torch.float64)
