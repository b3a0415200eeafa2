"""Session-wide tiny real Llama + real PEFT adapters, and helpers to run and check merges."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

import mergekit_ctm

mergekit_ctm.install()  # registers the methods in this process

BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    path = BIN / name
    return str(path) if path.exists() else (shutil.which(name) or name)


@pytest.fixture(scope="session")
def example(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """DIR/base (2-layer Llama), DIR/adapters/adapter_{0..3}: ranks 4/8(rsLoRA)/6(+pattern)/2,
    different target modules."""
    from mergekit_ctm.examples import make_tiny_example

    root = tmp_path_factory.mktemp("example")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return make_tiny_example(root, n_adapters=4)


@pytest.fixture(scope="module")
def good(example) -> dict:
    """A valid ctm/ties recipe over all example adapters, as a dict (tests mutate copies)."""
    return {
        "merge_method": "ctm",
        "base_model": example["base"],
        "models": [
            {"model": p, "parameters": {"weight": 1.0, "density": 0.5}} for p in example["adapters"]
        ],
        "parameters": {"base_rule": "ties", "rank": 4, "beta": 0.5},
    }


def write_recipe(
    path: Path,
    example: dict[str, Any],
    method: str,
    parameters: dict[str, Any] | None = None,
    per_adapter: list[dict[str, Any]] | dict[str, Any] | None = None,
    adapters: list[int] | None = None,
    **top: Any,
) -> Path:
    idx = adapters if adapters is not None else list(range(len(example["adapters"])))
    models = []
    for j, i in enumerate(idx):
        entry: dict[str, Any] = {"model": example["adapters"][i]}
        p = per_adapter[j] if isinstance(per_adapter, list) else per_adapter
        if p:
            entry["parameters"] = p
        models.append(entry)
    recipe = {"merge_method": method, "base_model": example["base"], "models": models}
    if parameters:
        recipe["parameters"] = parameters
    recipe.update(top)
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def run_cli(*args: str, env: dict[str, str] | None = None, check: bool = True, cwd: Any = None):
    full_env = {**os.environ, **(env or {})}
    res = subprocess.run(args, capture_output=True, text=True, env=full_env, timeout=300, cwd=cwd)
    if check and res.returncode != 0:
        raise AssertionError(f"{args} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
    return res


def load_base(base: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)


def peft_deltas(base: str, out: str) -> tuple[Any, dict[str, torch.Tensor]]:
    """PeftModel.from_pretrained(base, out) and each LoRA module's ΔW as PEFT computes it."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PeftModel.from_pretrained(load_base(base), out)
    deltas = {}
    for name, mod in model.named_modules():
        if isinstance(mod, LoraLayer) and "default" in getattr(mod, "lora_A", {}):
            key = re.sub(r"^base_model\.model\.", "", name)
            deltas[key] = mod.get_delta_weight("default").detach().double()
    return model, deltas


def engine_deltas(recipe_text: str, random_seed: int | None = None) -> dict[str, torch.Tensor]:
    """The engine's merged ΔW per module, called directly with the plan's resolved parameters."""
    from mergekit_ctm.adapters import load_factors
    from mergekit_ctm.engine import merge_lora
    from mergekit_ctm.plan.tasks import rule_kwargs
    from mergekit_ctm.recipe import build_plan

    plan = build_plan(recipe_text, random_seed=random_seed)
    out = {}
    for m in plan.modules:
        f = [load_factors(plan.adapters[i], m.name) for i in m.adapters]
        res = merge_lora(
            [x[0] for x in f],
            [x[1] for x in f],
            [x[2] for x in f],
            method=plan.method,
            rule_params=rule_kwargs(m.rule_params),
            seed=m.seed,
            dtype=torch.float32,
            **dict(m.params),
        )
        out[m.name] = (res.B @ res.A).double()
    return out


def assert_deltas_close(got: dict, want: dict, rtol: float = 1e-5) -> None:
    assert set(got) == set(want), sorted(set(got) ^ set(want))
    for name in want:
        scale = want[name].abs().max().item() + 1e-30
        err = (got[name] - want[name]).abs().max().item()
        assert err <= rtol * scale, f"{name}: max |Δ| {err:.3g} vs scale {scale:.3g}"
