"""Writing: PEFT key names, layout inversion and a config PEFT loads with scaling 1."""

from __future__ import annotations

import pytest
import torch
from adapter_fixtures import ADAPTERS, load_base, load_peft, lora_layers

from mergekit_ctm.adapters import (
    AdapterError,
    build_adapter_config,
    load_factors,
    load_full_tensor,
    peft_full_tensor_key,
    read_adapter,
    target_modules_for,
    to_peft_tensors,
    write_adapter,
)


def _module_names(base_path: str) -> list[str]:
    return [n for n, _ in load_base(base_path).named_modules() if n]


def _merged_like(info, drop_one: bool):
    """Factors with scaling folded in (ΔW = B@A); one module loses a direction when drop_one."""
    out, ranks = {}, {}
    for i, (name, mod) in enumerate(info.modules.items()):
        A, B, s = load_factors(info, name, dtype=torch.float64)
        B = s * B
        if drop_one and i == 0 and mod.r > 1:
            A, B = A[:-1], B[:, :-1]
        out[name] = (A, B)
        ranks[name] = A.shape[0]
    return out, ranks


@pytest.mark.parametrize(
    "name,short_targets",
    [
        ("patterns", True),
        ("rslora", False),
        ("embedding", True),
        ("modules_to_save", True),
        ("gpt2_fifo_bias", True),
        ("regex", True),
    ],
)
def test_round_trip_peft_loads(name, short_targets, adapters, bases, tmp_path):
    base_path = bases[ADAPTERS[name][0]]
    info = read_adapter(adapters[name])
    factors, ranks = _merged_like(info, drop_one=True)
    tensors = {}
    for mod_name, (A, B) in factors.items():
        tensors.update(to_peft_tensors(info.modules[mod_name], A, B))
    for key, t in info.full_tensors.items():
        if t.role == "modules_to_save":
            tensors[peft_full_tensor_key(t.weight_name, info.modules)] = load_full_tensor(info, key)
    names = _module_names(base_path) if short_targets else None
    cfg = build_adapter_config(
        ranks, rank=max(ranks.values()), inputs=[info], base_module_names=names
    )
    write_adapter(tmp_path, tensors, cfg, dtype=torch.float32)

    assert cfg["peft_type"] == "LORA" and cfg["use_rslora"] is False
    assert cfg["base_model_name_or_path"] == base_path
    assert cfg["task_type"] == info.task_type
    assert cfg["fan_in_fan_out"] == info.fan_in_fan_out
    pm, warns = load_peft(base_path, str(tmp_path))
    assert not [w for w in warns if "missing" in w.lower() or "unexpected" in w.lower()], warns
    layers = lora_layers(pm)
    assert set(layers) == set(factors)  # PEFT wrapped exactly the written modules
    for mod_name, (A, B) in factors.items():
        layer = layers[mod_name]
        assert layer.scaling["default"] == 1.0
        assert layer.r["default"] == A.shape[0]
        ref = (B @ A).float()
        torch.testing.assert_close(layer.get_delta_weight("default"), ref, atol=1e-6, rtol=0)
    if info.modules_to_save:
        w = pm.base_model.model.lm_head.modules_to_save["default"].weight
        torch.testing.assert_close(w, load_full_tensor(info, "base_model.model.lm_head.weight"))


def test_config_patterns_scaling_one():
    from peft import LoraConfig
    from peft.utils.other import get_pattern_key

    ranks = {"model.layers.0.self_attn.q_proj": 8, "model.layers.1.self_attn.q_proj": 5}
    cfg = build_adapter_config(ranks, rank=8)
    assert cfg["r"] == 8 and cfg["lora_alpha"] == 8
    assert cfg["rank_pattern"] == {"model.layers.1.self_attn.q_proj": 5}
    assert cfg["alpha_pattern"] == {"model.layers.1.self_attn.q_proj": 5}
    assert cfg["target_modules"] == sorted(ranks)  # exact names without the base's module list
    assert cfg["bias"] == "none" and cfg["modules_to_save"] is None
    lc = LoraConfig(**{k: v for k, v in cfg.items() if k not in ("peft_type",)})
    for name, k in ranks.items():
        r = lc.rank_pattern.get(get_pattern_key(lc.rank_pattern.keys(), name), lc.r)
        a = lc.alpha_pattern.get(get_pattern_key(lc.alpha_pattern.keys(), name), lc.lora_alpha)
        assert (r, a / r) == (k, 1.0)


def test_pattern_key_escaped_when_ambiguous():
    from peft.utils.other import get_pattern_key

    # "a.b" as a regex also matches "axb": the key must be escaped to stay exact
    ranks = {"m.a.b": 2, "m.axb": 4}
    cfg = build_adapter_config(ranks, rank=4)
    pat = cfg["rank_pattern"]
    assert get_pattern_key(pat.keys(), "m.axb") == "m.axb"  # no pattern applies: r = 4
    assert pat[get_pattern_key(pat.keys(), "m.a.b")] == 2


def test_target_modules_short_form_only_when_exact():
    all_names = ["model.layers.0.q_proj", "model.layers.1.q_proj", "model.layers.0.v_proj"]
    assert target_modules_for(all_names[:2], all_names) == ["q_proj"]
    # only one of two q_proj modules: suffix form would also wrap layer 1
    assert target_modules_for(all_names[:1], all_names) == ["model.layers.0.q_proj"]


def test_writer_errors():
    class M:
        name, kind, fan_in_fan_out, n_out, m_in = "x.q", "linear", False, 4, 3

    with pytest.raises(AdapterError, match="'x.q'"):
        to_peft_tensors(M(), torch.zeros(2, 3), torch.zeros(4, 3))
    with pytest.raises(AdapterError, match=r"x.q.*\(5, 3\)"):
        to_peft_tensors(M(), torch.zeros(2, 3), torch.zeros(5, 2))
    with pytest.raises(AdapterError, match="rank 0"):
        build_adapter_config({"x.q": 0})
    with pytest.raises(AdapterError, match="no LoRA modules"):
        build_adapter_config({})


def test_inputs_disagreeing_give_none(adapters):
    a, b = read_adapter(adapters["linear"]), read_adapter(adapters["gpt2_fifo_bias"])
    cfg = build_adapter_config({"model.layers.0.self_attn.q_proj": 2}, inputs=[a, b])
    assert cfg["task_type"] is None and cfg["base_model_name_or_path"] is None
