"""Recipe numbers are checked strictly: finite, no type coercion, null means "use the default",
no duplicate keys, and each error names the level where the value was set."""

from __future__ import annotations

import copy

import pytest
import yaml

from mergekit_ctm.recipe import RecipeError, build_plan, parse_recipe


def _mut(good: dict, fn) -> dict:
    r = copy.deepcopy(good)
    fn(r)
    return r


def _err(recipe: dict | str) -> str:
    with pytest.raises(RecipeError) as info:
        build_plan(recipe)
    return str(info.value)


def _top(**kw):
    return lambda r: r["parameters"].update(kw)


NAN, INF = float("nan"), float("inf")

NON_FINITE = [
    # (mutation, where, name)
    (_top(**{"lambda": NAN}), "parameters", "'lambda'"),
    (_top(**{"lambda": INF}), "parameters", "'lambda'"),
    (_top(beta=NAN), "parameters", "'beta'"),
    (_top(hooi_tol=INF), "parameters", "'hooi_tol'"),
    (_top(weight=INF), "parameters", "'weight'"),
    (_top(density=NAN), "parameters", "'density'"),
    (_top(beta=[0.0, NAN]), "parameters", "'beta' (gradient value 2 of 2)"),
    (lambda r: r["models"][1]["parameters"].update(weight=-INF), "models[1]", "'weight'"),
    (lambda r: r["parameters"].update(base_rule="della", epsilon=NAN), "parameters", "'epsilon'"),
]


@pytest.mark.parametrize("case", range(len(NON_FINITE)))
def test_non_finite_parameters_are_refused_by_name(good, case):
    mutate, where, name = NON_FINITE[case]
    msg = _err(_mut(good, mutate))
    assert msg.startswith(where), msg
    assert name in msg and "finite number" in msg, msg
    assert "model.layers" not in msg, msg  # a recipe value, not a per-module one


def test_yaml_nan_spelling_is_refused(good):
    text = yaml.safe_dump(good, sort_keys=False).replace("beta: 0.5", "beta: .nan")
    assert "beta: .nan" in text
    assert _err(text) == "parameters: 'beta': must be a finite number, got nan"
    text = yaml.safe_dump(good, sort_keys=False).replace("rank: 4", "rank: 4\n  lambda: -.inf")
    assert _err(text) == "parameters: 'lambda': must be a finite number, got -inf"


COERCED = [
    # (mutation, expected message)
    (_top(rank=True), "parameters: 'rank': must be an integer, got true (a boolean)"),
    (_top(rank=16.0), "parameters: 'rank': must be an integer, got 16.0 (a float); write 16"),
    (
        _top(rank="16"),
        "parameters: 'rank': must be an integer, got '16' (a string); write the number "
        "without quotes",
    ),
    (
        _top(beta="0.5"),
        "parameters: 'beta': must be a number, got '0.5' (a string); write the number "
        "without quotes",
    ),
    (_top(beta=True), "parameters: 'beta': must be a number, got true (a boolean)"),
    (_top(hooi_iters=[10, 20.5]), "must be an integer, got 20.5 (a float)"),
    (_top(normalize=1), "parameters: 'normalize': must be true or false, got 1 (an integer)"),
    (
        lambda r: r["models"][2]["parameters"].update(weight="1"),
        "'weight': must be a number, got '1' (a string)",
    ),
]


@pytest.mark.parametrize("case", range(len(COERCED)))
def test_no_type_coercion(good, case):
    mutate, expected = COERCED[case]
    msg = _err(_mut(good, mutate))
    assert expected in msg, msg


def _values(plan) -> list:
    return [(m.name, m.params, m.rule_params) for m in plan.modules]


def test_ints_are_numbers_and_scientific_strings_stay_numbers(good):
    """`beta: 1`, `lambda: 2` are fine; `hooi_tol: 1e-3` (a string to YAML 1.1, a number to
    mergekit) too. The plan equals the one written with floats."""
    floats = build_plan(_mut(good, _top(beta=1.0, hooi_tol=0.001, **{"lambda": 2.0})))
    ints = build_plan(_mut(good, _top(beta=1, hooi_tol="1e-3", **{"lambda": 2})))
    assert _values(ints) == _values(floats)
    text = yaml.safe_dump(good, sort_keys=False).replace(
        "beta: 0.5", "beta: 1\n  hooi_tol: 1e-3\n  lambda: 2"
    )
    assert "hooi_tol: 1e-3" in text
    assert _values(build_plan(text)) == _values(floats)


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


def _no_own_density(r):
    for m in r["models"]:
        m["parameters"].pop("density")


def test_recipe_level_value_is_blamed_on_parameters(good):
    """A recipe-wide density every adapter takes: `parameters`, not models[0], and no module."""
    msg = _err(_mut(good, lambda r: (_no_own_density(r), r["parameters"].update(density=1.5))))
    assert msg == "parameters: parameter 'density' of merge rule 'ties' must be in [0, 1]; got 1.5"
    # from a gradient it depends on the layer: the module is named
    msg = _err(
        _mut(good, lambda r: (_no_own_density(r), r["parameters"].update(density=[0.5, 1.5])))
    )
    assert msg.startswith("parameters, module model.layers.1."), msg
    assert "'density'" in msg and "got 1.5" in msg, msg
    # an adapter's own value is blamed on it
    msg = _err(_mut(good, lambda r: r["models"][3]["parameters"].update(density=1.5)))
    assert msg.startswith("models[3] (") and "adapter_3).parameters: " in msg, msg


def test_recipe_wide_scalar_names_no_module(good):
    msg = _err(_mut(good, _top(rank=0)))
    assert msg == "parameters: 'rank': Input should be greater than 0 (got 0)"


def test_per_module_failure_names_level_and_module(good):
    """della's density ± epsilon: density 0.02 from a filter on adapter 2, epsilon 0.05 from
    the recipe: only the mlp module fails, and the adapter's own `parameters` is named."""

    def mutate(r):
        r["parameters"].update(base_rule="della", epsilon=0.05)
        r["models"][2]["parameters"]["density"] = [
            {"filter": "mlp", "value": 0.02},
            {"value": 0.5},
        ]

    msg = _err(_mut(good, mutate))
    assert msg.startswith("models[2] (") and "adapter_2" in msg, msg
    assert ", module model.layers.0.mlp.down_proj:" in msg, msg
    assert "density=0.02, epsilon=0.05" in msg, msg
    # the same values set as plain scalars fail for every module: no module named
    msg = _err(_mut(good, lambda r: (mutate(r), r["models"][2]["parameters"].update(density=0.02))))
    assert msg.startswith("models[2] (") and "module" not in msg, msg


def test_interpolated_value_error_names_level_and_module(good, tmp_path):
    """rank: [2, 5] on a 6-layer base gives 2.6 at layer 1 (t = 0.2): not an integer. Only
    that module fails, so it is named, with the level that set the gradient."""
    import json
    import shutil
    from pathlib import Path

    base = tmp_path / "base6"
    shutil.copytree(good["base_model"], base)
    cfg = json.loads((base / "config.json").read_text())
    cfg["num_hidden_layers"] = 6  # layers 0 and 1 exist; t = layer / 5
    (Path(base) / "config.json").write_text(json.dumps(cfg))
    msg = _err(_mut(good, lambda r: (r.update(base_model=str(base)), _top(rank=[2, 5])(r))))
    assert msg.startswith("parameters: 'rank' at model.layers.1."), msg
    assert "(from a filter or gradient)" in msg and "fractional part" in msg, msg
    plan = build_plan(_mut(good, lambda r: (r.update(base_model=str(base)), _top(rank=[2, 7])(r))))
    assert {m.param("rank") for m in plan.modules} == {2, 3}
