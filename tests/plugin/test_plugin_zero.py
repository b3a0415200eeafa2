"""Modules whose merged update is zero (PEFT's untrained lora_B = 0, or updates that cancel):
left out of the adapter and named in the card; if every module is zero, a clear error."""

from __future__ import annotations

import json
import shutil

import torch
from conftest import assert_deltas_close, engine_deltas, peft_deltas, run_cli, tool, write_recipe
from safetensors.torch import load_file, save_file

ZEROED = "model.layers.0.self_attn.q_proj"


def _zero_lora_B(example, tmp_path, only: str | None) -> dict:
    """Copies of adapters 0 and 1 with lora_B zeroed (in ``only``, or everywhere)."""
    paths = []
    for i in (0, 1):
        dst = tmp_path / f"adapter_{i}"
        shutil.copytree(example["adapters"][i], dst)
        f = dst / "adapter_model.safetensors"
        sd = load_file(str(f))
        sd = {
            k: torch.zeros_like(v) if "lora_B" in k and (only is None or only in k) else v
            for k, v in sd.items()
        }
        save_file(sd, str(f), metadata={"format": "pt"})
        paths.append(str(dst))
    return {**example, "adapters": paths}


def test_zero_module_is_left_out_and_named(example, tmp_path):
    ex = _zero_lora_B(example, tmp_path, ZEROED)
    recipe = write_recipe(tmp_path / "r.yml", ex, "ctm", parameters={"rank": 4})
    out = tmp_path / "out"
    run_cli(tool("mergekit-yaml"), str(recipe), str(out), "--quiet")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert ZEROED not in cfg["target_modules"]
    assert "model.layers.1.self_attn.q_proj" in cfg["target_modules"]
    assert f"`{ZEROED}`" in (out / "README.md").read_text()
    _, got = peft_deltas(ex["base"], str(out))  # loads; the zero module is not adapted
    want = engine_deltas(recipe.read_text())
    assert not want.pop(ZEROED).any()
    assert_deltas_close(got, want)


def test_all_zero_updates_give_a_clear_error_and_no_output(example, tmp_path):
    ex = _zero_lora_B(example, tmp_path, None)
    recipe = write_recipe(tmp_path / "r.yml", ex, "ctm", parameters={"rank": 4})
    out = tmp_path / "out"
    res = run_cli(tool("mergekit-yaml"), str(recipe), str(out), "--quiet", check=False)
    assert res.returncode == 2
    assert "merged update is zero" in res.stderr and "Traceback" not in res.stderr
    assert not out.exists() and [p.name for p in tmp_path.iterdir() if "out" in p.name] == []
