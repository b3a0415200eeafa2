"""base_model must exist (a local directory, or a hub id: checked in the local cache, else
noted as unchecked); the base of `base+adapter` is checked too; validate invents no layer count."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import write_recipe
from mergekit.options import MergeOptions

from mergekit_ctm.cli.report import describe_plan
from mergekit_ctm.recipe import RecipeError, build_plan

FIX = (
    "set base_model to the base model's local directory or hub id, or leave it out to use the "
    "adapters' base_model_name_or_path"
)


def _recipe(example: dict, **top) -> dict:
    recipe = {
        "merge_method": "ctm",
        "base_model": example["base"],
        "models": [{"model": p} for p in example["adapters"]],
        "parameters": {"rank": 4},
    }
    recipe.update(top)
    return {k: v for k, v in recipe.items() if v is not None}


def _err(recipe: dict, **kw) -> str:
    with pytest.raises(RecipeError) as info:
        build_plan(recipe, **kw)
    return str(info.value)


@pytest.mark.parametrize("base", ["/nonexistent/base", "./no/such/base", "a/b/c", "~x/y", "x"])
def test_missing_base_model_is_refused_before_reading_adapters(example, base, tmp_path):
    recipe = _recipe(example, base_model=base)
    recipe["models"].append({"model": str(tmp_path / "not-an-adapter")})  # never reached
    assert _err(recipe, cache_dir=str(tmp_path)) == f"base_model: {base!r} does not exist; {FIX}"


def test_base_model_that_is_a_file(example):
    cfg = str(Path(example["base"]) / "config.json")
    assert _err(_recipe(example, base_model=cfg)) == (
        f"base_model: {cfg!r} is a file, not a model directory; {FIX}"
    )


def test_local_base_reads_its_layer_count(example):
    plan = build_plan(_recipe(example))
    assert (plan.base_status, plan.num_layers, plan.num_layers_from_base) == ("local", 2, True)
    assert f"base model: {example['base']} (2 layers)" in describe_plan(plan)
    assert plan.notes == []


def test_hub_id_not_in_cache_is_accepted_unchecked(example, tmp_path):
    plan = build_plan(_recipe(example, base_model="someone/tiny-base"), cache_dir=str(tmp_path))
    assert plan.base_model == "someone/tiny-base"
    assert (plan.base_status, plan.num_layers_from_base) == ("hub", False)
    assert plan.notes == ["base model 'someone/tiny-base': hub id, not checked offline"]
    text = describe_plan(plan)
    assert "base model: someone/tiny-base (hub id, not checked offline)\n" in text, text
    assert "layers" not in text.split("\n")[1]
    assert text.endswith("note: base model 'someone/tiny-base': hub id, not checked offline")


def _fake_cache(root: Path, repo: str, config: dict) -> Path:
    sha = "0123456789abcdef0123456789abcdef01234567"
    d = root / f"models--{repo.replace('/', '--')}"
    (d / "snapshots" / sha).mkdir(parents=True)
    (d / "snapshots" / sha / "config.json").write_text(json.dumps(config))
    (d / "refs").mkdir()
    (d / "refs" / "main").write_text(sha)
    return d


def test_hub_id_in_local_cache_reads_its_config(example, tmp_path):
    cfg = json.loads((Path(example["base"]) / "config.json").read_text())
    cfg["num_hidden_layers"] = 6
    _fake_cache(tmp_path / "hub", "someone/tiny-base", cfg)
    recipe = _recipe(example, base_model="someone/tiny-base")
    recipe["parameters"]["beta"] = [0.0, 1.0]  # t = layer / 5 from the cached config
    plan = build_plan(recipe, cache_dir=str(tmp_path / "hub"))
    assert (plan.base_status, plan.num_layers, plan.num_layers_from_base) == ("cached", 6, True)
    assert plan.notes == []
    assert "base model: someone/tiny-base (6 layers)" in describe_plan(plan)
    betas = {m.name.split(".")[2]: m.param("beta") for m in plan.modules}
    assert betas == {"0": 0.0, "1": pytest.approx(0.2)}
    # a legacy bare id (gpt2) is a hub id when it is in the cache, else refused like "x" above
    _fake_cache(tmp_path / "hub", "tinybase", cfg)
    plan = build_plan(_recipe(example, base_model="tinybase"), cache_dir=str(tmp_path / "hub"))
    assert (plan.base_model, plan.base_status) == ("tinybase", "cached")


@pytest.fixture(scope="module")
def moved_base(example, tmp_path_factory) -> dict:
    """The example's adapters, their base_model_name_or_path pointing where nothing is."""
    root = tmp_path_factory.mktemp("moved")
    paths = []
    for p in example["adapters"]:
        dst = root / Path(p).name
        shutil.copytree(p, dst)
        cfg = json.loads((dst / "adapter_config.json").read_text())
        cfg["base_model_name_or_path"] = "/trainer/home/models/tiny-llama"
        (dst / "adapter_config.json").write_text(json.dumps(cfg))
        paths.append(str(dst))
    return {**example, "adapters": paths}


def test_missing_base_from_adapter_configs_is_a_note(moved_base, tmp_path):
    from mergekit_ctm.plan.run import run_adapter_merge

    recipe = _recipe(moved_base, base_model=None)
    plan = build_plan(recipe)
    assert plan.base_model == "/trainer/home/models/tiny-llama"
    assert (plan.base_status, plan.num_layers_from_base) == ("missing", False)
    assert plan.notes == [
        "base model '/trainer/home/models/tiny-llama' (the adapters' base_model_name_or_path) "
        "is not on this machine: not checked; set base_model to check the adapters against it"
    ]
    text = describe_plan(plan)
    assert "base model: /trainer/home/models/tiny-llama (not on this machine, not checked)" in text
    assert "layers" not in text.split("\n")[1]
    # merging adapters needs no base on disk
    out = tmp_path / "out"
    run_adapter_merge(yaml.safe_dump(recipe), str(out), MergeOptions(quiet=True))
    assert (out / "adapter_model.safetensors").exists()
    # a full model output does
    msg = _err({**recipe, "output": "model"})
    assert msg == (
        "output: model needs the base model's weights, but base model "
        "'/trainer/home/models/tiny-llama' is not on this machine. Set `base_model:` to a local "
        "copy of the base model, or to its hub id in the local cache"
    )


def test_base_of_base_plus_adapter_must_exist(example):
    recipe = _recipe(example)
    ref = f"/nonexistent/base+{example['adapters'][1]}"
    recipe["models"][1]["model"] = ref
    assert _err(recipe) == (
        f"models[1] ({ref}): base: '/nonexistent/base' does not exist; give the base model's "
        "local directory or hub id before the '+', or drop the base+"
    )


def test_base_plus_adapter_must_match_base_model(example, tmp_path):
    other = tmp_path / "other_base"
    shutil.copytree(example["base"], other)
    recipe = _recipe(example, base_model=str(other))
    ref = f"{example['base']}+{example['adapters'][2]}"
    recipe["models"][2]["model"] = ref
    assert _err(recipe) == (
        f"models[2] ({ref}): base {example['base']!r} differs from base_model {str(other)!r}; "
        "all adapters merge onto one base: make them the same, or drop the base+ prefix"
    )
    # the same base (also spelt with a trailing slash) is fine
    recipe["base_model"] = example["base"] + "/"
    plan = build_plan(recipe)
    assert plan.adapters[2].base_ref == example["base"]


def test_base_plus_adapter_shapes_are_checked_against_its_base(example, tmp_path):
    from mergekit_ctm.examples import build_tiny_base

    small = build_tiny_base(tmp_path / "small", hidden=16, layers=2, vocab=64)
    recipe = _recipe(example, base_model=None)
    recipe["models"] = [{"model": f"{small}+{p}"} for p in example["adapters"]]
    msg = _err(recipe)
    assert msg.startswith("models[0]: adapter ") and "base weight" in msg, msg


def test_recipe_writes_base_unchanged(example, tmp_path):
    """A valid recipe's plan keeps base_model as written (the output config carries it)."""
    recipe = write_recipe(tmp_path / "r.yml", example, "ctm", parameters={"rank": 4})
    assert build_plan(recipe.read_text()).base_model == example["base"]
