"""Recipe numbers are checked strictly: finite, no type coercion, null means "use the default",
no duplicate keys, and each error names the level where the value was set."""

from __future__ import annotations

import copy

import pytest
import yaml

from mergekit_ctm.recipe import RecipeError, build_plan, parse_recipe


@pytest.fixture(scope="module")
def good(example) -> dict:
    return {
        "merge_method": "ctm",
        "base_model": example["base"],
        "models": [
            {"model": p, "parameters": {"weight": 1.0, "density": 0.5}} for p in example["adapters"]
        ],
        "parameters": {"base_rule": "ties", "rank": 4, "beta": 0.5},
    }


def _mut(good: dict, fn) -> dict:
    r = copy.deepcopy(good)
    fn(r)
    return r


def _err(recipe: dict | str) -> str:
    with pytest.raises(RecipeError) as info:
        build_plan(recipe)
    return str(info.value)


def _values(plan) -> list:
    return [(m.name, m.params, m.rule_params) for m in plan.modules]


def test_null_means_default(good, example):
    base = build_plan(good)
    nulls = _mut(
        good,
        lambda r: (
            r["parameters"].update(hooi_iters=None, density=None),
            r["models"][1]["parameters"].update(gamma=None, weight=None),
        ),
    )
    without = _mut(good, lambda r: r["models"][1]["parameters"].pop("weight"))
    assert _values(build_plan(nulls)) == _values(build_plan(without))
    # rank: null in ctm is rank 16 (the default), in core_space the lossless Σ r_t (None)
    text = yaml.safe_dump(good, sort_keys=False).replace("rank: 4", "rank: null")
    assert {m.param("rank") for m in build_plan(text).modules} == {16}
    core = yaml.safe_dump(
        _mut(good, lambda r: (r.update(merge_method="core_space"), r["parameters"].pop("beta"))),
        sort_keys=False,
    ).replace("rank: 4", "rank: null")
    assert {m.param("rank") for m in build_plan(core).modules} == {None}
    assert base.modules  # the unchanged recipe still plans


DUPLICATES = [
    ("rank: 4", "rank: 4\n  rank: 8", "'rank'"),
    ("merge_method: ctm", "merge_method: ctm\nmerge_method: mtc", "'merge_method'"),
    ("density: 0.5", "density: 0.5\n    density: 0.7", "'density'"),
    ("parameters:\n  base_rule", "parameters: {}\nparameters:\n  base_rule", "'parameters'"),
]


@pytest.mark.parametrize("case", range(len(DUPLICATES)))
def test_duplicate_keys_are_refused_with_lines(good, case):
    old, new, key = DUPLICATES[case]
    text = yaml.safe_dump(good, sort_keys=False)
    assert old in text
    first = text[: text.index(old)].count("\n") + 1  # the repeated key is on the next line
    text = text.replace(old, new, 1)
    msg = _err(text)
    assert f"key {key} is given twice (line {first} and line {first + 1})" in msg, msg


def test_duplicate_key_in_flow_mapping_and_through_run_merge(good, tmp_path):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    with pytest.raises(RecipeError, match="key 'weight' is given twice"):
        parse_recipe("merge_method: ctm\nmodels: [{model: a, parameters: {weight: 1, weight: 2}}]")
    # mergekit-yaml hands the raw text to run_merge as config_source: the duplicate is caught
    text = yaml.safe_dump(good, sort_keys=False).replace("rank: 4", "rank: 4\n  rank: 2")
    out = tmp_path / "out"
    with pytest.raises(RecipeError, match="key 'rank' is given twice"):
        run_merge(
            MergeConfiguration.model_validate(yaml.safe_load(text)),
            str(out),
            MergeOptions(quiet=True),
            config_source=text,
        )
    assert not out.exists()


def test_yaml_stays_safe():
    with pytest.raises(RecipeError, match="not valid YAML"):
        parse_recipe("merge_method: !!python/object/apply:os.getcwd []\nmodels: [a]\n")
