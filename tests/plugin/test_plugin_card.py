"""A merge carries what someone else needs to redo it: the card and mergekit_config.yml."""

from __future__ import annotations

import hashlib

import pytest
import yaml
from conftest import run_cli, tool, write_recipe

from mergekit_ctm.engine.methods import METHODS


def _files(d) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


@pytest.mark.slow
def test_mergekit_config_reproduces_the_merge_byte_for_byte(example, tmp_path):
    """A random rule (DARE) and --random-seed: mergekit-yaml out/mergekit_config.yml out2/
    without the option gives the same bytes, and the seed matters (another seed differs)."""
    recipe = write_recipe(
        tmp_path / "r.yml", example, "ctm", parameters={"base_rule": "dare_ties", "rank": 4},
        per_adapter={"weight": 1.0, "density": 0.5},
    )  # fmt: skip
    out, out2, other = tmp_path / "out", tmp_path / "out2", tmp_path / "other"
    run_cli(tool("mergekit-yaml"), str(recipe), str(out), "--quiet", "--random-seed", "7")
    run_cli(tool("mergekit-yaml"), str(out / "mergekit_config.yml"), str(out2), "--quiet")
    assert _files(out) == _files(out2)
    run_cli(tool("mergekit-yaml"), str(recipe), str(other), "--quiet", "--random-seed", "8")
    assert _files(other)["adapter_model.safetensors"] != _files(out)["adapter_model.safetensors"]

    config = (out / "mergekit_config.yml").read_text()
    resolved = yaml.safe_load(config)
    assert resolved["random_seed"] == 7
    for p in METHODS["ctm"].parameters:  # every method parameter written out, defaults too
        assert p.name in resolved["parameters"], p.name
    for i, path in enumerate(example["adapters"]):
        digest = hashlib.sha256(open(f"{path}/adapter_model.safetensors", "rb").read())
        assert f"# models[{i}] {path}: sha256 {digest.hexdigest()}" in config
    card = (out / "README.md").read_text()
    for dist in ("mergekit-ctm", "mergekit", "peft", "torch"):
        assert f"{dist} " in card
    assert "Seed: 7" in card and "arXiv:2606.03723" in card
    assert str(out) not in card and str(out) not in config  # same bytes wherever written


@pytest.mark.parametrize("method", ["ctm", "mtc", "core_space"])
def test_same_bytes_for_any_thread_count(example, tmp_path, method):
    """The batched plugin path solves modules on one-thread workers and runs everything else
    on one thread: any torch thread count, any -j (MergeOptions.num_threads, the worker count)
    and the default (the CPUs this process may use) give the same file."""
    import torch
    from mergekit.options import MergeOptions

    from mergekit_ctm.plan.run import run_adapter_merge

    text = write_recipe(
        tmp_path / "r.yml", example, method, parameters={"base_rule": "ties", "rank": 4},
        per_adapter={"weight": 1.0, "density": 0.5},
    ).read_text()  # fmt: skip
    threads = torch.get_num_threads()
    got = {}
    try:
        for n, j in ((1, None), (2, None), (2, 1), (1, 2), (2, 3)):
            torch.set_num_threads(n)
            out = tmp_path / f"t{n}_j{j}"
            options = MergeOptions(quiet=True, num_threads=j)
            run_adapter_merge(text, str(out), options, config_source=text)
            assert torch.get_num_threads() == n  # restored after the merge
            got[n, j] = (out / "adapter_model.safetensors").read_bytes()
    finally:
        torch.set_num_threads(threads)
    assert len(set(got.values())) == 1, [k for k, v in got.items() if v != got[1, None]]


@pytest.mark.parametrize(
    ("rule", "per_adapter"),
    [
        ("ties", [{"density": 0.5}, {"density": [{"filter": "q_proj", "value": 0.3}]}, {}, {}]),
        ("della", [{"weight": 2.0}, {}, {}, {"epsilon": 0.05, "density": 0.6}]),
        ("tsv", None),  # fraction: default None (computed from the adapter count), left out
        ("iso_cts", None),  # cts_rank: default None, left out
    ],
)
def test_resolved_config_writes_rule_defaults_and_resolves_the_same(
    example, tmp_path, rule, per_adapter
):
    """mergekit_config.yml carries every base-rule parameter with a default (recipe-wide
    level), none whose default the rule computes, and resolves to the same per-module values:
    per-adapter settings (also filters that match only some modules) still win."""
    from mergekit_ctm.plan.card import resolved_recipe
    from mergekit_ctm.recipe import build_plan
    from mergekit_ctm.recipe.params import rule_specs

    recipe = write_recipe(
        tmp_path / "r.yml", example, "ctm", parameters={"base_rule": rule, "rank": 4},
        per_adapter=per_adapter,
    )  # fmt: skip
    plan = build_plan(recipe.read_text())
    resolved = resolved_recipe(plan)
    written = resolved["parameters"]
    for p in rule_specs(rule):
        if p.default is None:
            assert p.name not in written, p.name
        else:
            assert written[p.name] == p.default, p.name
    again = build_plan(yaml.safe_dump(resolved, sort_keys=False))
    assert [(m.name, m.params, m.rule_params) for m in again.modules] == [
        (m.name, m.params, m.rule_params) for m in plan.modules
    ]
    assert again.dense == plan.dense
    assert resolved_recipe(again) == resolved  # a fixed point: nothing more to write


@pytest.mark.slow
def test_mergekit_yaml_same_bytes_for_any_j(example, tmp_path):
    """Stock mergekit-yaml -j 1 / -j 3 (which also sets torch's threads) and the default give
    byte-identical adapters, DARE's seeded draws included."""
    recipe = write_recipe(
        tmp_path / "r.yml", example, "ctm", parameters={"base_rule": "dare_ties", "rank": 4},
        per_adapter={"weight": 1.0, "density": 0.5},
    )  # fmt: skip
    got = []
    for j in ((), ("-j", "1"), ("-j", "3")):
        out = tmp_path / f"out{len(got)}"
        run_cli(tool("mergekit-yaml"), str(recipe), str(out), "--quiet", "--random-seed", "3", *j)
        got.append(_files(out))
    assert got[0] == got[1] == got[2]


def test_sha256_file_streams_through_one_small_buffer(tmp_path):
    """The card's input hash equals hashlib's over the whole file, for sizes around the
    buffer (a fresh 16 MiB bytes object per read once kept 32 MiB alive while merging)."""
    import hashlib
    import os

    from mergekit_ctm.plan.card import sha256_file

    for size in (0, 1, 4095, 4096, 3 * 4096 + 7):
        path = tmp_path / f"f{size}"
        data = os.urandom(size)
        path.write_bytes(data)
        assert sha256_file(str(path), chunk=4096) == hashlib.sha256(data).hexdigest()
