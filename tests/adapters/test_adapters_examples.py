"""The tiny offline example: real base, heterogeneous real adapters, a recipe pointing at them."""

from __future__ import annotations

import warnings

import pytest
import torch
import yaml

from mergekit_ctm.adapters import load_delta, read_adapter
from mergekit_ctm.examples import main, make_tiny_example


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return make_tiny_example(tmp_path_factory.mktemp("ex"), n_adapters=4)


def test_example_adapters_heterogeneous(example):
    infos = [read_adapter(p) for p in example["adapters"]]
    assert [i.r for i in infos] == [4, 8, 6, 2]
    assert [i.use_rslora for i in infos] == [False, True, False, False]
    v0 = infos[2].modules["model.layers.0.self_attn.v_proj"]
    assert (v0.r, v0.alpha) == (2, 4.0)
    assert len(infos[3].modules) < len(infos[0].modules)  # fewer targets
    for i in infos:
        assert i.base_model_name_or_path == example["base"]
    # B is non-zero and the adapters have different norms
    norms = []
    for i in infos:
        q = load_delta(i, "model.layers.0.self_attn.q_proj", dtype=torch.float64)
        norms.append(float(q.norm()))
    assert min(norms) > 1e-3
    assert len({round(n, 3) for n in norms}) == 4


def test_example_recipe(example):
    recipe = yaml.safe_load(open(example["recipe"]))
    assert recipe["merge_method"] == "ctm"
    assert recipe["parameters"]["base_rule"] == "ties"
    assert recipe["parameters"]["rank"] == 8
    assert recipe["base_model"] == example["base"]
    assert [m["model"] for m in recipe["models"]] == example["adapters"]


def test_example_deterministic(example, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = make_tiny_example(tmp_path, n_adapters=2)
    a, b = read_adapter(example["adapters"][1]), read_adapter(again["adapters"][1])
    name = "model.layers.1.self_attn.o_proj"
    assert torch.equal(load_delta(a, name), load_delta(b, name))


def test_cli_prints_next_command(tmp_path, capsys):
    main([str(tmp_path / "ex"), "-n", "2"])
    out = capsys.readouterr().out
    assert f"mergekit-yaml {tmp_path / 'ex' / 'recipe.yml'} {tmp_path / 'ex' / 'out'}" in out
    assert len(list((tmp_path / "ex" / "adapters").iterdir())) == 2
