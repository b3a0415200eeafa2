"""Recipe and adapter validation: errors name the field / adapter / module; nothing is written."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import run_cli, tool, write_recipe

from mergekit_ctm.recipe import RecipeError, build_plan, layer_t


def _err(recipe: dict) -> str:
    with pytest.raises(RecipeError) as info:
        build_plan(recipe)
    return str(info.value)


def _mut(good: dict, fn) -> dict:
    r = copy.deepcopy(good)
    fn(r)
    return r


CASES = [
    # (mutation, substrings the message must contain)
    (lambda r: r["parameters"].update(rnak=3), ["'rnak'", "did you mean 'rank'", "parameters"]),
    (lambda r: r.update(paramters={}), ["unknown key 'paramters'", "did you mean 'parameters'"]),
    (lambda r: r["parameters"].update(beta=1.5), ["'beta'", "less than or equal to 1"]),
    (lambda r: r["parameters"].update(beta=-0.1), ["'beta'", "greater than or equal to 0"]),
    (lambda r: r["parameters"].update(rank=0), ["'rank'", "greater than 0"]),
    (
        lambda r: r["parameters"].update(base_rule="tiess"),
        ["base_rule", "did you mean 'ties'", "dare_ties"],
    ),
    (
        lambda r: r["models"][1]["parameters"].update(densty=0.3),
        ["models[1]", "adapter_1", "'densty'", "did you mean 'density'"],
    ),
    (lambda r: r["models"][2]["parameters"].update(rank=3), ["models[2]", "recipe-wide", "'rank'"]),
    (
        lambda r: r["models"][3]["parameters"].update(density=1.5),
        ["models[3]", "adapter_3", "density", "[0, 1]"],
    ),
    (
        lambda r: r.update(merge_method="lora_lego", parameters={"rank": 4}),
        ["models[0]", "lora_lego takes no per-adapter parameters", "'weight'"],
    ),
    (lambda r: r["parameters"].update(density=0.5, space="full"), ["'space'", "ctm"]),
    (
        lambda r: r["models"][2].update(model="/nonexistent/x"),
        ["models[2]", "/nonexistent/x", "does not exist"],
    ),
    (lambda r: r.update(merge_method="ctmm"), ["merge_method", "did you mean 'ctm'"]),
    (lambda r: r.update(output="adpater"), ["output", "'adapter' or 'model'"]),
    (lambda r: r.update(models=[]), ["models"]),
    (
        lambda r: r["parameters"].update(beta={"value": 7, "filter": "mlp"}),
        ["'beta'", "mlp", "less than or equal to 1"],
    ),
]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_validation_errors_name_the_culprit(good, case):
    mutate, expected = CASES[case]
    msg = _err(_mut(good, mutate))
    for s in expected:
        assert s in msg, f"{s!r} not in: {msg}"


def test_broken_adapter_is_named(good, example, tmp_path):
    bad = tmp_path / "bad_adapter"
    shutil.copytree(example["adapters"][1], bad)
    cfg = json.loads((bad / "adapter_config.json").read_text())
    cfg["r"] = 5  # stored factors have rank 8
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    msg = _err(_mut(good, lambda r: r["models"][1].update(model=str(bad))))
    assert "models[1]" in msg and "bad_adapter" in msg and "rank" in msg


def test_conditional_and_gradient_parameters_resolve_per_module(good):
    recipe = _mut(
        good,
        lambda r: (
            r["parameters"].update(beta=[0.0, 1.0], rank=[2, 6]),
            r["models"][0]["parameters"].update(
                density=[{"filter": "mlp", "value": 0.9}, {"value": 0.2}]
            ),
        ),
    )
    plan = build_plan(recipe)
    for m in plan.modules:
        t = layer_t(m.name, 2)
        assert t == (1.0 if ".layers.1." in m.name else 0.0)
        assert m.param("beta") == pytest.approx(t)
        assert m.param("rank") == (6 if t == 1.0 else 2)  # int gradient: mergekit interpolates
        if 0 in m.adapters:
            density = dict(m.rule_params)["density"][m.adapters.index(0)]
            assert density == (0.9 if ".mlp." in m.name else 0.2)


def test_layer_t_matches_mergekit():
    assert layer_t("model.layers.0.self_attn.q_proj", 4) == 0.0
    assert layer_t("model.layers.3.self_attn.q_proj", 4) == 1.0
    assert layer_t("model.layers.1.mlp.up_proj", 5) == 0.25
    assert layer_t("model.layers.0.mlp.up_proj", 1) == 1.0
    assert layer_t("lm_head", 4) == 0.0


def test_mergekit_yaml_rejects_bad_recipe_and_leaves_nothing(example, tmp_path):
    recipe = write_recipe(tmp_path / "bad.yml", example, "ctm", parameters={"rank": 4, "bta": 0.3})
    out = tmp_path / "out"
    res = run_cli(tool("mergekit-yaml"), str(recipe), str(out), "--quiet", check=False)
    assert res.returncode != 0
    assert "'bta'" in res.stderr and "did you mean 'beta'" in res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yml"]


def test_failure_mid_merge_leaves_existing_output_untouched(example, tmp_path, monkeypatch):
    from mergekit.options import MergeOptions

    from mergekit_ctm.plan import run as run_mod
    from mergekit_ctm.plan import tasks

    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("previous result")
    recipe = write_recipe(tmp_path / "r.yml", example, "ctm", parameters={"rank": 4})

    calls = {"n": 0}
    original = tasks.MergeModule.execute

    def flaky(self, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("disk on fire")
        return original(self, **kw)

    monkeypatch.setattr(tasks.MergeModule, "execute", flaky)
    with pytest.raises(RuntimeError, match="disk on fire"):
        run_mod.run_adapter_merge(recipe.read_text(), str(out), MergeOptions(quiet=True))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "r.yml"]
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_full_model_recipe_still_goes_to_mergekit(example, tmp_path):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    text = yaml.safe_dump(
        {
            "merge_method": "linear",
            "models": [
                {"model": example["base"], "parameters": {"weight": 1.0}},
                {"model": example["base"], "parameters": {"weight": 1.0}},
            ],
            "dtype": "float32",
        }
    )
    # the same model twice is deduplicated by mergekit: use a copy
    copy_dir = tmp_path / "base_copy"
    shutil.copytree(example["base"], copy_dir)
    cfg = yaml.safe_load(text)
    cfg["models"][1]["model"] = str(copy_dir)
    text = yaml.safe_dump(cfg)
    out = tmp_path / "out"
    run_merge(
        MergeConfiguration.model_validate(cfg),
        str(out),
        MergeOptions(quiet=True),
        config_source=text,
    )
    assert (out / "model.safetensors").exists() and (out / "config.json").exists()
    assert not (out / "adapter_config.json").exists()
    assert Path(out / "mergekit_config.yml").read_text() == text


@pytest.mark.parametrize("rule,count", [("nuslerp", 3), ("model_stock", 1)])
def test_rule_that_cannot_take_the_adapter_count_is_refused_by_validate(example, rule, count):
    """model_stock and nuslerp carry input-count contracts; validate runs the rule once on
    tiny zeros per adapter count, so the merge never starts."""
    recipe = {
        "merge_method": "ctm",
        "base_model": example["base"],
        "models": [{"model": p} for p in example["adapters"][:count]],
        "parameters": {"base_rule": rule, "rank": 4},
    }
    msg = _err(recipe)
    assert f"base_rule {rule} cannot merge the" in msg and "adapter(s) of module" in msg, msg


def test_hooi_stopping_early_is_a_warning_naming_the_module(example, tmp_path, caplog):
    from mergekit.options import MergeOptions

    from mergekit_ctm.plan.run import run_adapter_merge

    recipe = write_recipe(
        tmp_path / "r.yml", example, "ctm", parameters={"rank": 4, "hooi_iters": 1}
    )
    with caplog.at_level("DEBUG", logger="mergekit_ctm"):
        run_adapter_merge(recipe.read_text(), str(tmp_path / "out"), MergeOptions(quiet=True))
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("HOOI stopped at hooi_iters=1" in m and "self_attn" in m for m in warned), warned
    assert any("HOOI sweeps, relative residual" in r.getMessage() for r in caplog.records)
    assert any("ranks [0] 4" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level("WARNING", logger="mergekit_ctm"):
        run_adapter_merge(
            recipe.read_text().replace("hooi_iters: 1", "hooi_iters: 500"),
            str(tmp_path / "out2"),
            MergeOptions(quiet=True),
        )
    assert not [r for r in caplog.records if "HOOI stopped" in r.getMessage()]
