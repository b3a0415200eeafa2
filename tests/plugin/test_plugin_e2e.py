"""End to end: stock mergekit-yaml, mergekit-ctm merge and mergekit's Python API on a tiny real
Llama with real PEFT adapters; the result loads with PeftModel and matches the engine."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from conftest import (
    assert_deltas_close,
    engine_deltas,
    load_base,
    peft_deltas,
    run_cli,
    tool,
    write_recipe,
)
from safetensors import safe_open
from safetensors.torch import load_file

METHODS = {
    "ctm": dict(
        parameters={"base_rule": "ties", "rank": 8, "beta": 0.5, "lambda": 1.2},
        per_adapter={"weight": 1.0, "density": 0.5},
    ),
    "core_space": dict(
        parameters={"base_rule": "task_arithmetic"},
        per_adapter=[{"weight": w} for w in (1.0, 0.5, 2.0, 1.0)],
    ),
    "mtc": dict(
        parameters={"base_rule": "ties", "rank": 6, "space": "full"},
        per_adapter={"density": 0.6},
    ),
    "lora_lego": dict(parameters={"rank": 6}),
}


@pytest.fixture(scope="module")
def yaml_outputs(example, tmp_path_factory):
    """Each method merged once by the unmodified `mergekit-yaml` command (a subprocess each)."""
    root = tmp_path_factory.mktemp("yaml")
    outs = {}
    for method, cfg in METHODS.items():
        recipe = write_recipe(root / f"{method}.yml", example, method, **cfg)
        out = root / f"out-{method}"
        run_cli(tool("mergekit-yaml"), str(recipe), str(out), "--quiet")
        outs[method] = (recipe, out)
    return outs


@pytest.mark.slow
@pytest.mark.parametrize("method", list(METHODS))
def test_mergekit_yaml_output_loads_in_peft_and_matches_engine(example, yaml_outputs, method):
    recipe, out = yaml_outputs[method]
    assert {p.name for p in out.iterdir()} == {
        "adapter_model.safetensors",
        "adapter_config.json",
        "README.md",
        "mergekit_config.yml",
    }
    model, got = peft_deltas(example["base"], str(out))
    want = engine_deltas(recipe.read_text())
    # every module of every adapter is present (union of heterogeneous target modules)
    assert len(want) == 2 * len({"q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"})
    assert_deltas_close(got, want)
    # scaling is exactly 1 in every module
    from peft.tuners.lora import LoraLayer

    for mod in model.modules():
        if isinstance(mod, LoraLayer) and "default" in mod.scaling:
            assert mod.scaling["default"] == 1.0
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == example["base"]
    assert cfg["use_rslora"] is False
    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    # a local base is no hub id: the card does not name it in its front matter
    assert front["library_name"] == "peft" and "base_model" not in front
    assert {"mergekit", "merge", method} <= set(front["tags"])
    written = yaml.safe_load((out / "mergekit_config.yml").read_text())
    given = yaml.safe_load(recipe.read_text())
    assert written["models"] == given["models"] and written["merge_method"] == method
    assert given["parameters"].items() <= written["parameters"].items()


def _independent_sum(example, weights) -> dict[str, torch.Tensor]:
    """float64 Σ_t w_t s_t B_t A_t straight from the adapter files and configs."""
    total: dict[str, torch.Tensor] = {}
    for path, w in zip(example["adapters"], weights):
        cfg = json.loads((Path(path) / "adapter_config.json").read_text())
        with safe_open(str(Path(path) / "adapter_model.safetensors"), "pt") as f:
            keys = [k for k in f.keys() if k.endswith("lora_A.weight")]
            for ka in keys:
                name = ka.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
                a = f.get_tensor(ka).double()
                b = f.get_tensor(ka.replace("lora_A", "lora_B")).double()
                r, alpha = cfg["r"], cfg["lora_alpha"]
                for key, val in (cfg.get("rank_pattern") or {}).items():
                    if name == key or name.endswith("." + key):
                        r = val
                for key, val in (cfg.get("alpha_pattern") or {}).items():
                    if name == key or name.endswith("." + key):
                        alpha = val
                s = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
                total[name] = total.get(name, 0) + w * s * (b @ a)
    return total


def test_core_space_lossless_equals_float64_weighted_sum(example, yaml_outputs):
    """Core space with task_arithmetic is lossless: ΔW = Σ w_t ΔW_t (independent reference)."""
    _, out = yaml_outputs["core_space"]
    _, got = peft_deltas(example["base"], str(out))
    want = _independent_sum(example, (1.0, 0.5, 2.0, 1.0))
    assert_deltas_close(got, want, rtol=1e-4)
    # lossless: each module keeps Σ r_t directions; r is the largest, the rest in rank_pattern
    from mergekit_ctm.recipe import build_plan

    cfg = json.loads((out / "adapter_config.json").read_text())
    plan = build_plan((yaml_outputs["core_space"][0]).read_text())
    expected = {m.name: sum(m.ranks) for m in plan.modules}
    assert cfg["r"] == max(expected.values())
    for name, k in expected.items():
        assert cfg["rank_pattern"].get(name, cfg["r"]) == k, name
        assert cfg["alpha_pattern"].get(name, cfg["lora_alpha"]) == k, name


def test_forward_equals_base_plus_engine_update(example, yaml_outputs):
    recipe, out = yaml_outputs["ctm"]
    model, _ = peft_deltas(example["base"], str(out))
    want = engine_deltas(recipe.read_text())
    ref = load_base(example["base"])
    with torch.no_grad():
        params = dict(ref.named_parameters())
        for name, delta in want.items():
            params[f"{name}.weight"].add_(delta.float())
        ids = torch.arange(1, 17).reshape(2, 8)
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=1e-4, atol=1e-5)


def test_python_api_run_merge_and_determinism(example, tmp_path):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    recipe = write_recipe(
        tmp_path / "dare.yml",
        example,
        "ctm",
        parameters={"base_rule": "dare_ties", "rank": 4, "beta": 1.0},
        per_adapter={"weight": 1.0, "density": 0.7},
    )
    text = recipe.read_text()
    blobs = []
    for i, seed in enumerate((7, 7, 8)):
        out = tmp_path / f"out{i}"
        cfg = MergeConfiguration.model_validate(yaml.safe_load(text))
        run_merge(cfg, str(out), MergeOptions(quiet=True, random_seed=seed), config_source=text)
        blobs.append((out / "adapter_model.safetensors").read_bytes())
    assert blobs[0] == blobs[1], "same seed must give byte-identical output"
    assert blobs[0] != blobs[2], "a different seed must change DARE's masks"
    _, got = peft_deltas(example["base"], str(tmp_path / "out0"))
    assert_deltas_close(got, engine_deltas(text, random_seed=7))

    # tiny write buffer: many shards joined back into one PEFT-loadable file, same tensors
    out = tmp_path / "sharded"
    opts = MergeOptions(quiet=True, random_seed=7, out_shard_size=4096)
    run_merge(
        MergeConfiguration.model_validate(yaml.safe_load(text)), str(out), opts, config_source=text
    )
    assert sorted(p.name for p in out.iterdir() if "safetensors" in p.name) == [
        "adapter_model.safetensors"
    ]
    a, b = (
        load_file(str(out / "adapter_model.safetensors")),
        load_file(str(tmp_path / "out0" / "adapter_model.safetensors")),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_mergekit_ctm_merge_command(example, tmp_path):
    recipe = write_recipe(
        tmp_path / "mtc.yml",
        example,
        "mtc",
        parameters={"base_rule": "task_arithmetic", "rank": 3, "space": "knots"},
        adapters=[0, 2],
    )
    out = tmp_path / "out"
    run_cli(tool("mergekit-ctm"), "merge", str(recipe), str(out), "--quiet")
    _, got = peft_deltas(example["base"], str(out))
    assert_deltas_close(got, engine_deltas(recipe.read_text()))


@pytest.mark.parametrize("merge", [True, False])
def test_a_merge_skips_pythons_final_collection_only_at_exit(example, tmp_path, merge):
    """After one of our merges, the interpreter's exit (not the merge) freezes the collector,
    so the final collection skips torch's, transformers' and mergekit's objects (1.2 s of
    every mergekit-yaml run, bench/e2e.py). Without a merge of ours nothing is frozen."""
    import subprocess
    import sys

    recipe = write_recipe(tmp_path / "r.yml", example, "ctm", parameters={"rank": 4})
    code = f"""
import atexit, gc, sys
atexit.register(lambda: print("frozen at exit", gc.get_freeze_count() > 0))  # runs last
import mergekit_ctm
from mergekit.options import MergeOptions
from mergekit_ctm.plan.run import run_adapter_merge
if {merge}:
    text = open({str(recipe)!r}).read()
    run_adapter_merge(text, {str(tmp_path / "out")!r}, MergeOptions(quiet=True))
print("frozen after the merge", gc.get_freeze_count() > 0)
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "frozen after the merge False" in res.stdout
    assert f"frozen at exit {merge}" in res.stdout
