"""Every shipped recipe runs on the tiny example; output: model; the mergekit-ctm subcommands;
docs/reference.md matches its generator."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import assert_deltas_close, engine_deltas, peft_deltas, write_recipe
from mergekit.options import MergeOptions
from safetensors.torch import load_file

from mergekit_ctm.cli.main import main as cli
from mergekit_ctm.plan.run import run_adapter_merge

REPO = Path(__file__).resolve().parents[2]
RECIPES = sorted((REPO / "recipes").glob("*.yml"))


def _localize(recipe: Path, example) -> str:
    root = str(Path(example["base"]).parent)
    return recipe.read_text().replace("tiny/", root + "/")


def test_there_are_documented_recipes():
    assert len(RECIPES) >= 8
    for r in RECIPES:
        header = r.read_text().split("merge_method")[0]
        assert header.count("#") >= 3 and "Tune first" in header, r.name


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_recipe_runs(example, tmp_path, recipe):
    text = _localize(recipe, example)
    out = tmp_path / "out"
    run_adapter_merge(text, str(out), MergeOptions(quiet=True, random_seed=1), config_source=text)
    want = engine_deltas(text, random_seed=1)
    if "output: model" in text:
        merged = load_file(str(out / "model.safetensors"))
        base = load_file(str(Path(example["base"]) / "model.safetensors"))
        assert set(merged) == set(base)
        for key, w in base.items():
            name = key.removesuffix(".weight")
            expected = w.double() + want[name] if name in want else w.double()
            torch.testing.assert_close(merged[key].double(), expected, rtol=1e-5, atol=1e-6)
        assert (out / "config.json").exists() and (out / "README.md").exists()
        assert not (out / "adapter_config.json").exists()
    else:
        _, got = peft_deltas(example["base"], str(out))
        assert_deltas_close(got, want)


def test_validate_prints_the_plan(example, tmp_path):
    recipe = write_recipe(
        tmp_path / "r.yml", example, "ctm", parameters={"rank": 4, "base_rule": "ties"}
    )
    res = CliRunner().invoke(cli, ["validate", str(recipe)])
    assert res.exit_code == 0, res.output
    assert "recipe OK: merge_method ctm, base_rule ties" in res.output
    assert "model.layers.1.mlp.down_proj" in res.output and "[2]=6" in res.output
    assert "estimated peak working memory" in res.output
    assert not (tmp_path / "out").exists()


def test_validate_rejects_with_nonzero_exit(example, tmp_path):
    recipe = write_recipe(tmp_path / "r.yml", example, "ctm", parameters={"rank": -1})
    res = CliRunner().invoke(cli, ["validate", str(recipe)])
    assert res.exit_code != 0 and "'rank'" in res.output


def test_inspect_energy_retention(example, tmp_path):
    """ρ = ‖U Uᵀ ΔW_t V Vᵀ‖_F / ‖ΔW_t‖_F (002 D.1): 1 for a lossless merge, checked in float64."""
    from mergekit_ctm.adapters import load_factors, read_adapter
    from mergekit_ctm.cli.report import energy_retention

    recipe = write_recipe(tmp_path / "r.yml", example, "ctm", parameters={"rank": 3})
    out = tmp_path / "out"
    text = recipe.read_text()
    run_adapter_merge(text, str(out), MergeOptions(quiet=True), config_source=text)
    table = energy_retention(str(out), example["adapters"])
    # independent dense float64 reference for one module of adapter 1
    name = "model.layers.1.self_attn.q_proj"
    am, bm, _ = load_factors(read_adapter(str(out)), name, dtype=torch.float64)
    u, s, vh = torch.linalg.svd(bm @ am)
    u, v = u[:, : (s > 1e-10 * s[0]).sum()], vh[: (s > 1e-10 * s[0]).sum()].T
    a, b, sc = load_factors(read_adapter(example["adapters"][1]), name, dtype=torch.float64)
    dw = sc * b @ a
    rho = torch.linalg.norm(u @ u.T @ dw @ v @ v.T) / torch.linalg.norm(dw)
    assert table.per_module[1][name] == pytest.approx(rho.item(), rel=1e-9)
    assert all(0.0 <= x <= 1.0 + 1e-9 for row in table.per_module for x in row.values())

    lossless = write_recipe(tmp_path / "l.yml", example, "core_space")
    out2 = tmp_path / "out2"
    run_adapter_merge(lossless.read_text(), str(out2), MergeOptions(quiet=True))
    table2 = energy_retention(str(out2), example["adapters"])
    for t in range(4):
        assert table2.mean(t) == pytest.approx(1.0, abs=1e-6)

    plot = tmp_path / "rho.png"
    res = CliRunner().invoke(
        cli, ["inspect", str(out), "--inputs", *example["adapters"], "--plot", str(plot)]
    )
    assert res.exit_code == 0, res.output
    assert "mean ρ̄" in res.output and "adapter_3" in res.output
    assert plot.exists() and plot.stat().st_size > 0


def test_reference_doc_matches_generator():
    from mergekit_ctm.cli.reference import reference_markdown

    committed = (REPO / "docs" / "reference.md").read_text()
    assert committed == reference_markdown(), (
        "docs/reference.md is stale: run `python -m mergekit_ctm.cli.main reference "
        "-o docs/reference.md`"
    )
