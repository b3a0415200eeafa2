"""``output:`` means the same through every caller (issue #10): mergekit's MergeConfiguration
keeps it, so the stock ``mergekit-multi`` and Python's ``run_merge`` without ``config_source``
write what the recipe asks for. Includes a mergekit-multi stage that merges full checkpoints
with ``ctm`` (issue #8)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from conftest import engine_deltas
from reliability import run_command, write_yaml
from test_plugin_full_checkpoints import _load

F64 = torch.float64


def test_merge_configuration_keeps_output_and_stock_dumps_are_unchanged():
    from mergekit.config import MergeConfiguration

    stock = {"merge_method": "linear", "models": [{"model": "a"}, {"model": "b"}]}
    cfg = MergeConfiguration.model_validate(stock)
    assert cfg.output is None and "output" not in cfg.to_yaml()
    assert cfg.model_dump(mode="json", exclude_none=True) == {
        "merge_method": "linear",
        "models": [{"model": "a"}, {"model": "b"}],
    }
    for kind in ("model", "adapter"):
        cfg = MergeConfiguration.model_validate({**stock, "output": kind})
        again = MergeConfiguration.model_validate(yaml.safe_load(cfg.to_yaml()))
        assert again.output == kind and f"output: {kind}" in cfg.to_yaml()
    with pytest.raises(ValueError, match="output"):
        MergeConfiguration.model_validate({**stock, "output": "lora"})


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["model", "adapter"])
def test_run_merge_without_config_source_writes_what_output_says(example, good, tmp_path, kind):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    config = MergeConfiguration.model_validate({**good, "output": kind, "dtype": "float32"})
    out = tmp_path / "out"
    run_merge(config, str(out), options=MergeOptions(quiet=True))
    if kind == "model":
        assert (out / "config.json").exists() and list(out.glob("*.safetensors"))
        assert not (out / "adapter_config.json").exists()
        base = _load(Path(example["base"]))
        got = _load(out)
        want = engine_deltas(yaml.safe_dump({**good, "output": kind}))
        for module, delta in want.items():
            name = module + ".weight"
            err = (got[name].to(F64) - base[name].to(F64) - delta).abs().max()
            assert err <= 1e-5 * delta.abs().max(), name
    else:
        cfg = json.loads((out / "adapter_config.json").read_text())
        assert cfg["r"] == good["parameters"]["rank"] and not (out / "config.json").exists()


def _multi(example: dict, adapters: list[str]) -> str:
    base = example["base"]
    per = {"weight": 1.0, "density": 0.5}
    docs = [
        {  # PEFT adapters -> a full model (output: model), our planner
            "name": "stage1",
            "merge_method": "ctm",
            "base_model": base,
            "models": [{"model": a, "parameters": per} for a in adapters[:2]],
            "parameters": {"base_rule": "ties", "rank": 4, "beta": 0.5},
            "dtype": "float32",
            "output": "model",
        },
        {
            "name": "stage1b",
            "merge_method": "core_space",
            "base_model": base,
            "models": [{"model": a} for a in adapters[2:]],
            "parameters": {"base_rule": "task_arithmetic"},
            "dtype": "float32",
            "output": "model",
        },
        {  # full checkpoints (the two stages above) with ctm, mergekit's planner + our kernel
            "name": "stage2",
            "merge_method": "ctm",
            "base_model": base,
            "models": [{"model": "stage1"}, {"model": "stage1b"}],
            "parameters": {"base_rule": "task_arithmetic", "rank": 4, "beta": 0.5},
            "dtype": "float32",
        },
        {  # a stock mergekit merge of the last stage with the base
            "merge_method": "linear",
            "models": [
                {"model": "stage2", "parameters": {"weight": 0.25}},
                {"model": base, "parameters": {"weight": 0.75}},
            ],
            "dtype": "float32",
        },
    ]
    return yaml.safe_dump_all(docs, sort_keys=False)


@pytest.mark.slow
def test_mergekit_multi_with_output_model_and_a_full_checkpoint_stage(example, tmp_path):
    from mergekit.scripts.multimerge import main

    (tmp_path / "multi.yml").write_text(_multi(example, example["adapters"]))
    inter, final = tmp_path / "inter", tmp_path / "final"
    res = CliRunner().invoke(
        main,
        [str(tmp_path / "multi.yml"), "--out-path", str(final), "-I", str(inter), "--quiet"],
        catch_exceptions=True,
    )
    assert res.exit_code == 0, (res.output, res.exception)

    base = _load(Path(example["base"]))
    for stage in ("stage1", "stage1b", "stage2"):
        assert (inter / stage / "config.json").exists(), stage
        assert not (inter / stage / "adapter_config.json").exists(), stage
    # stage 1 is W + ΔW with ΔW exactly what the adapter path's engine computes
    docs = list(yaml.safe_load_all((tmp_path / "multi.yml").read_text()))
    stage1 = _load(inter / "stage1")
    recipe1 = {k: v for k, v in docs[0].items() if k != "name"}
    want = engine_deltas(yaml.safe_dump(recipe1))
    assert want
    for module, delta in want.items():
        name = module + ".weight"
        err = (stage1[name].to(F64) - base[name].to(F64) - delta).abs().max()
        assert err <= 1e-5 * delta.abs().max(), name
    assert set(stage1) == set(base)

    # stage 2 (full checkpoints, ctm) equals the same recipe run alone by mergekit-yaml
    recipe2 = {k: v for k, v in docs[2].items() if k != "name"}
    recipe2["models"] = [{"model": str(inter / "stage1")}, {"model": str(inter / "stage1b")}]
    write_yaml(tmp_path / "stage2.yml", recipe2)
    res2 = run_command([str(tmp_path / "stage2.yml"), str(tmp_path / "alone"), "--quiet"], tmp_path)
    assert res2.code == 0, res2.stderr
    stage2, alone = _load(inter / "stage2"), _load(tmp_path / "alone")
    assert set(stage2) == set(alone)
    for name in stage2:
        assert torch.equal(stage2[name], alone[name]), name
    q = "model.layers.0.self_attn.q_proj.weight"
    s = torch.linalg.svdvals(stage2[q].double() - base[q].double())
    assert s[0] > 0 and (s > 1e-4 * s[0]).sum() <= 4

    # the final stock linear merge: 0.25 stage2 + 0.75 base
    out = _load(final)
    assert set(out) == set(base)
    for name, w in out.items():
        torch.testing.assert_close(w, 0.25 * stage2[name] + 0.75 * base[name], rtol=1e-6, atol=1e-7)


def test_mergekit_multi_bad_stage_fails_in_one_line(example, tmp_path):
    """output: adapter on a stock method, in a mergekit-multi stage: exit 2, one line."""
    from mergekit.scripts.multimerge import main

    doc = {
        "merge_method": "linear",
        "models": [{"model": example["base"], "parameters": {"weight": 1.0}}],
        "dtype": "float32",
        "output": "adapter",
    }
    write_yaml(tmp_path / "multi.yml", doc)
    res = CliRunner().invoke(
        main,
        [str(tmp_path / "multi.yml"), "--out-path", str(tmp_path / "final"), "-I",
         str(tmp_path / "inter")],
        catch_exceptions=True,
    )  # fmt: skip
    assert res.exit_code == 2 and isinstance(res.exception, SystemExit), res.exception
    # mergekit-multi's own progress bar ("Merging models") ignores --quiet; the rest is one line
    lines = [ln for ln in res.stderr.splitlines() if ln.strip() and "Merging models" not in ln]
    assert lines == [lines[0]] and "output: adapter needs merge_method" in lines[0], res.stderr
    assert lines[0].startswith("mergekit-multi: error: ")
    assert not (tmp_path / "final").exists()
