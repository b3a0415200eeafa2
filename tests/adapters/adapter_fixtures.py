"""Helpers for the adapter tests: tiny real bases, real PEFT adapters, PEFT layer access."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import pytest
import torch

from mergekit_ctm.examples import build_tiny_adapter, build_tiny_base

LLAMA = dict(hidden=32, layers=2, vocab=64)

# name -> (base, build_tiny_adapter kwargs)
ADAPTERS: dict[str, tuple[str, dict]] = {
    "linear": ("llama", dict(r=4, alpha=8, target_modules=["q_proj", "v_proj"], scale=1.0)),
    "rslora": (
        "llama",
        dict(r=8, alpha=16, use_rslora=True, target_modules=["q_proj", "o_proj", "up_proj"]),
    ),
    "patterns": (
        "llama",
        dict(
            r=6,
            alpha=12,
            target_modules=["q_proj", "v_proj", "down_proj"],
            rank_pattern={"v_proj": 2, "layers.1.self_attn.q_proj": 3},
            alpha_pattern={"v_proj": 5, "down_proj": 3},
            scale=2.0,
        ),
    ),
    "regex": (
        "llama",
        dict(r=3, alpha=7, target_modules=r".*\.layers\.1\..*(q_proj|down_proj)", scale=0.5),
    ),
    "embedding": ("llama", dict(r=4, alpha=4, target_modules=["embed_tokens", "q_proj"])),
    "modules_to_save": (
        "llama",
        dict(r=2, alpha=4, target_modules=["k_proj"], modules_to_save=["lm_head"]),
    ),
    "gpt2_fifo_bias": (
        "gpt2",
        dict(
            r=3,
            alpha=6,
            target_modules=["c_attn", "c_fc"],
            fan_in_fan_out=True,
            bias="all",
            task_type=None,
        ),
    ),
}


def build_gpt2_base(path: Path) -> str:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        n_embd=32,
        n_layer=2,
        n_head=2,
        vocab_size=64,
        n_positions=32,
        bos_token_id=0,
        eos_token_id=1,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        model = GPT2LMHeadModel(cfg)
        # nonzero biases, so bias="all" tensors are distinguishable from zeros
        for n, p in model.named_parameters():
            if n.endswith(".bias"):
                torch.nn.init.normal_(p, std=0.1)
    model.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def bases(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("bases")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {
            "llama": build_tiny_base(root / "llama", **LLAMA),
            "gpt2": build_gpt2_base(root / "gpt2"),
        }


@pytest.fixture(scope="session")
def adapters(bases, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("adapters")
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i, (name, (base, kw)) in enumerate(ADAPTERS.items()):
            out[name] = build_tiny_adapter(bases[base], root / name, seed=10 + i, **kw)
    return out


def load_base(path: str):
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def load_peft(base_path: str, adapter_path: str):
    """(PeftModel, warnings raised while loading)."""
    from peft import PeftModel

    base = load_base(base_path)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        pm = PeftModel.from_pretrained(base, adapter_path)
    return pm, [str(w.message) for w in rec]


def lora_layers(pm) -> dict:
    """Base-model module name -> PEFT LoraLayer holding the adapter 'default'."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, mod in pm.named_modules():
        if isinstance(mod, LoraLayer) and (
            "default" in mod.lora_A or "default" in mod.lora_embedding_A
        ):
            out[name.removeprefix("base_model.model.")] = mod
    return out


Q0 = "model.layers.0.self_attn.q_proj"
KEY_A = f"base_model.model.{Q0}.lora_A.weight"
KEY_B = f"base_model.model.{Q0}.lora_B.weight"


@pytest.fixture
def copy(adapters, tmp_path):
    """A writable copy of a fixture adapter."""

    def make(name: str) -> Path:
        dst = tmp_path / name
        shutil.copytree(adapters[name], dst)
        return dst

    return make


def edit_tensors(path: Path, fn) -> None:
    """Rewrite an adapter's safetensors after ``fn`` edits its state dict in place."""
    from safetensors.torch import load_file, save_file

    f = path / "adapter_model.safetensors"
    sd = load_file(f)
    fn(sd)
    save_file(sd, f, metadata={"format": "pt"})


def edit_config(path: Path, **changes) -> None:
    """Update keys of an adapter's adapter_config.json (NaN / Infinity as JSON extensions)."""
    import json

    f = path / "adapter_config.json"
    cfg = json.loads(f.read_text())
    cfg.update(changes)
    f.write_text(json.dumps(cfg))
