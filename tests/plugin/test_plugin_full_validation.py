"""Full-checkpoint recipes are validated as strictly as adapter recipes (issue #8 item 1), and
``mergekit-ctm validate`` / ``merge`` handle them.

Every bad recipe runs through the stock ``mergekit-yaml`` (and ``mergekit-ctm``) in-process:
exit 2, one line naming the level and the nearest valid name, no traceback, nothing written,
no input changed. The report of ``validate`` is checked against the checkpoints' own headers
and an independent computation of its memory estimate.
"""

from __future__ import annotations

import copy
import math
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from reliability import run_command, tree, write_yaml
from safetensors.torch import load_file, save_file
from test_plugin_full_checkpoints import checkpoints  # noqa: F401 (the fixture)

from mergekit_ctm.recipe import RecipeError
from mergekit_ctm.recipe.validate import check_full_checkpoint_recipe

Q = "model.layers.0.self_attn.q_proj.weight"


def _models_recipe(ck: dict) -> dict[str, Any]:
    return {
        "merge_method": "ctm",
        "base_model": str(ck["base"]),
        "models": [
            {"model": str(ck["tasks"][0]), "parameters": {"weight": 1.0}},
            {"model": str(ck["tasks"][1])},
        ],
        "parameters": {"base_rule": "task_arithmetic", "rank": 4, "task_rank": 6},
        "dtype": "float32",
    }


def _slices_recipe(ck: dict) -> dict[str, Any]:
    source = lambda p, **kw: {"model": str(p), "layer_range": [0, 2], **kw}  # noqa: E731
    return {
        "merge_method": "ctm",
        "base_model": str(ck["base"]),
        "slices": [
            {
                "sources": [
                    source(ck["base"]),
                    source(ck["tasks"][0], parameters={"weight": 1.0, "density": 0.5}),
                    source(ck["tasks"][1]),
                ]
            }
        ],
        "parameters": {"base_rule": "ties", "rank": 4},
        "dtype": "float32",
    }


def _modules_recipe(ck: dict) -> dict[str, Any]:
    """mergekit's ``modules:`` form (multi-module architectures); checked before mergekit
    plans, so the module name need not exist in the architecture."""
    recipe = _models_recipe(ck)
    recipe["modules"] = {"decoder": {"models": recipe.pop("models")}}
    return recipe


def _set(path: str, value: Any, drop: str | None = None):
    """Edit a recipe dict: ``path`` like 'slices.0.sources.1.layer_rnage'."""

    def edit(r: dict) -> None:
        *parents, last = path.split(".")
        node: Any = r
        for p in parents:
            node = node[int(p)] if isinstance(node, list) else node[p]
        node[last] = value
        if drop is not None:
            node.pop(drop)

    return edit


def _duplicate_first_model(r: dict) -> None:
    r["models"][1] = {"model": r["models"][0]["model"]}


# (id, recipe builder, edit, fragments of the one-line message)
CASES = [
    ("top-paramters", _models_recipe, _set("paramters", {"rank": 3}),
     ("recipe: unknown key 'paramters'", "did you mean 'parameters'?", "Valid keys: ")),
    ("top-base-modle", _models_recipe, _set("base_modle", "x", drop="base_model"),
     ("recipe: unknown key 'base_modle'", "did you mean 'base_model'?")),
    ("model-entry-paramters", _models_recipe, _set("models.1.paramters", {"weight": 2.0}),
     ("models[1]: unknown key 'paramters'", "did you mean 'parameters'?",
      "Valid keys: model, parameters")),
    ("source-layer-rnage", _slices_recipe, _set("slices.0.sources.2.layer_rnage", [0, 2]),
     ("slices[0].sources[2]: unknown key 'layer_rnage'", "did you mean 'layer_range'?",
      "Valid keys: model, layer_range, parameters")),
    ("slice-paramters", _slices_recipe, _set("slices.0.paramters", {"rank": 3}),
     ("slices[0]: unknown key 'paramters'", "did you mean 'parameters'?")),
    ("filter-typo", _models_recipe, _set("parameters.beta", {"value": 0.5, "fliter": "mlp"}),
     ("parameters.beta: unknown key 'fliter'", "did you mean 'filter'?",
      "Valid keys: value, filter")),
    ("tokenizer-typo", _models_recipe, _set("tokenizer", {"source": "base", "tokns": {}}),
     ("tokenizer: unknown key 'tokns'", "did you mean 'tokens'?")),
    ("random-seed-type", _models_recipe, _set("random_seed", "3"),
     ("random_seed:",)),
    ("dtype", _models_recipe, _set("dtype", "float8"), ("dtype:", "'float8'")),
    ("top-param-typo", _models_recipe, _set("parameters.rnak", 3),
     ("parameters: unknown parameter 'rnak'", "did you mean 'rank'?")),
    ("model-param-typo", _models_recipe, _set("models.0.parameters.weigth", 1.0),
     ("models[0] (", "unknown parameter 'weigth'", "did you mean 'weight'?")),
    ("source-param-typo", _slices_recipe, _set("slices.0.sources.1.parameters.densty", 0.3),
     ("slices[0].sources[1] (", ".parameters: unknown parameter 'densty'",
      "did you mean 'density'?")),
    ("source-recipe-wide", _slices_recipe, _set("slices.0.sources.1.parameters.rank", 2),
     ("slices[0].sources[1] (", "'rank' is a recipe-wide parameter, not a per-model one")),
    ("source-density-range", _slices_recipe, _set("slices.0.sources.1.parameters.density", 1.5),
     ("slices[0].sources[1] (", "'density'", "must be in [0, 1]", "1.5")),
    ("source-weight-type", _slices_recipe, _set("slices.0.sources.2.parameters", {"weight": "x"}),
     ("slices[0].sources[2] (", "'weight': must be a number, got 'x'")),
    ("slice-param-typo", _slices_recipe, _set("slices.0.parameters", {"betta": 0.5}),
     ("slices[0].parameters: unknown parameter 'betta'", "did you mean 'beta'?")),
    ("slice-base-rule", _slices_recipe, _set("slices.0.parameters", {"base_rule": "ties"}),
     ("slices[0].parameters: base_rule is set once", "top-level `parameters:`")),
    ("task-rank-zero", _models_recipe, _set("parameters.task_rank", 0),
     ("'task_rank'", "greater than 0")),
    ("filtered-density-range", _models_recipe,
     _set("models.0.parameters.density", [{"value": 1.5, "filter": "mlp"}, {"value": 0.5}]),
     ("models[0] (", "'density'", "must be in [0, 1]", "1.5")),
    ("gradient-density-range", _slices_recipe,
     _set("slices.0.sources.1.parameters.density", [0.2, 1.7]),
     ("slices[0].sources[1] (", "'density'", "must be in [0, 1]", "1.7")),
    ("duplicate-model", _models_recipe, _duplicate_first_model,
     ("models[1] (", "is listed twice (also models[0])", "larger `weight`")),
    ("modules-model-paramters", _modules_recipe,
     _set("modules.decoder.models.1.paramters", {"weight": 2.0}),
     ("modules.decoder.models[1]: unknown key 'paramters'", "did you mean 'parameters'?")),
]  # fmt: skip


def _project(ck: dict, root: Path, recipe: dict[str, Any]) -> Path:
    root.mkdir()
    write_yaml(root / "recipe.yml", recipe)
    return root


def _inputs_tree(ck: dict) -> dict[str, dict[str, str]]:
    return {str(p): tree(p) for p in (ck["base"], *ck["tasks"])}


def _one_line(res: Any, tool: str) -> str:
    assert not res.traceback, res.exception
    head = f"{tool}: error: "
    assert head in res.stderr, res.stderr
    message = res.stderr[res.stderr.index(head) :].rstrip("\n")
    assert "\n" not in message, f"not one line: {message!r}"
    return message


@pytest.mark.parametrize("tool", ["mergekit-yaml", "mergekit-ctm merge", "mergekit-ctm validate"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_full_recipe(checkpoints, tmp_path, case, tool):  # noqa: F811
    _, build, edit, fragments = case
    recipe = copy.deepcopy(build(checkpoints))
    edit(recipe)
    root = _project(checkpoints, tmp_path / "p", recipe)
    before = _inputs_tree(checkpoints), (root / "recipe.yml").read_bytes()
    prog, *sub = tool.split()
    argv = [*sub, "recipe.yml"] + ([] if sub == ["validate"] else ["out", "--quiet"])
    res = run_command(argv, root, prog)
    assert res.code == 2, res.stderr
    message = _one_line(res, prog)
    for frag in fragments:
        assert frag in message, f"{frag!r} not in {message!r}"
    assert not (root / "out").exists(), "a refused recipe wrote output"
    assert (_inputs_tree(checkpoints), (root / "recipe.yml").read_bytes()) == before


def test_duplicate_key_refused(checkpoints, tmp_path):  # noqa: F811
    text = yaml.safe_dump(_models_recipe(checkpoints), sort_keys=False)
    text += "parameters: {rank: 2}\n"
    root = tmp_path / "p"
    root.mkdir()
    (root / "recipe.yml").write_text(text)
    res = run_command(["recipe.yml", "out"], root)
    assert res.code == 2
    assert "'parameters' is given twice" in _one_line(res, "mergekit-yaml")
    assert not (root / "out").exists()


def test_modules_levels_checked():
    """``modules:`` (multi-module architectures) at every level, without files: keys,
    recipe-wide and per-model parameter names."""
    base = {"merge_method": "ctm", "base_model": "b", "parameters": {"rank": 4}}
    typo = {**base, "modules": {"text": {"models": [{"model": "x", "paramters": {}}]}}}
    with pytest.raises(RecipeError, match=r"modules\.text\.models\[0\]: unknown key 'paramters'"):
        check_full_checkpoint_recipe(typo)
    module_param = {**base, "modules": {"text": {"models": [{"model": "x"}],
                                                 "parameters": {"rnak": 2}}}}  # fmt: skip
    with pytest.raises(RecipeError, match=r"modules\.text\.parameters: unknown parameter 'rnak'"):
        check_full_checkpoint_recipe(module_param)
    per_model = {**base, "modules": {"text": {"slices": [{"sources": [
        {"model": "x", "layer_range": [0, 1], "parameters": {"beta": 0.5}}]}]}}}  # fmt: skip
    with pytest.raises(
        RecipeError, match=r"modules\.text\.slices\[0\]\.sources\[0\] \(x\)\.parameters: 'beta'"
    ):
        check_full_checkpoint_recipe(per_model)


def test_valid_keys_come_from_mergekit():
    """A field mergekit's MergeConfiguration declares is accepted without a change of ours."""
    from mergekit.config import MergeConfiguration

    from mergekit_ctm.recipe.model import unknown_keys

    raw = {"merge_method": "ctm", "models": [], "output": "model"}
    raw |= {name: None for name in MergeConfiguration.model_fields}
    assert unknown_keys(raw, MergeConfiguration, extra=("output",)) == []
    assert unknown_keys({**raw, "zz": 1}, MergeConfiguration) != []


def test_adapter_recipe_filter_typo_refused():
    """The {value, filter} check applies to adapter recipes too (pydantic dropped it)."""
    from mergekit_ctm.recipe.model import parse_recipe

    recipe = {"merge_method": "ctm", "models": [{"model": "a", "parameters": {
        "weight": [{"filtr": "q_proj", "value": 2.0}, {"value": 1.0}]}}]}  # fmt: skip
    with pytest.raises(RecipeError, match=r"models\[0\]\.parameters\.weight\[0\]: unknown key"):
        parse_recipe(recipe)


# --------------------------------------------------------------------------- validate


def _headers(model_dir: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Independent: safetensors' own reader (safe_open metadata, no data)."""
    from safetensors import safe_open

    out = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                sl = h.get_slice(k)
                out[k] = (sl.get_dtype(), tuple(sl.get_shape()))
    return out


def _validate(root: Path, *extra: str) -> Any:
    return run_command(["validate", "recipe.yml", *extra], root, "mergekit-ctm")


def test_validate_report(checkpoints, tmp_path, monkeypatch):  # noqa: F811
    ck = checkpoints
    root = _project(ck, tmp_path / "p", _models_recipe(ck))
    before = _inputs_tree(ck)
    import safetensors
    import safetensors.torch

    def no_data(*a: Any, **k: Any) -> Any:
        raise AssertionError("validate read tensor data")

    monkeypatch.setattr(safetensors, "safe_open", no_data)
    monkeypatch.setattr(safetensors.torch, "load_file", no_data)
    monkeypatch.setattr(torch, "load", no_data)
    report = _stdout(root, "100K")  # exit 0, no tensor data read
    monkeypatch.undo()
    assert report.startswith("recipe OK: merge_method ctm, base_rule task_arithmetic, output model")
    base = _headers(ck["base"])
    n_low = sum(
        len(s) == 2 and "embed" not in k and "lm_head" not in k for k, (_, s) in base.items()
    )
    assert f"tensors ({len(base)}): {n_low} low-rank" in report
    assert f"{len(base) - n_low} dense" in report
    assert "each ΔW_t compressed to rank 6, merged to rank 4" in report
    lines = [line.split() for line in report.splitlines()]
    rows = {
        w[0]: w for w in lines if w and w[0].endswith(".weight") and w[-1] in ("low-rank", "dense")
    }
    assert rows["model.layers.*.self_attn.q_proj.weight"][-1] == "low-rank"
    assert rows["model.layers.*.self_attn.q_proj.weight"][1:3] == ["48×48", "×2"]
    assert rows["model.layers.*.mlp.down_proj.weight"][1] == "48×96"
    assert rows["model.embed_tokens.weight"][-1] == "dense"
    assert rows["lm_head.weight"][-1] == "dense"
    assert rows["model.norm.weight"][-1] == "dense"
    assert "fine-tunes (2):" in report and str(ck["tasks"][1]) in report
    assert str(ck["tasks"][2]) not in report

    # the estimate, independently: the largest tensor in flight + the writer buffer
    T, c, s, k = 2, 4, 4, 6

    def work(name: str, shape: tuple[int, ...]) -> int:  # noqa: E306
        N = math.prod(shape)
        b = (T + 1) * N * s + (T + 1) * N * c + 2 * N * c + N * s
        if len(shape) == 2 and "embed" not in name and "lm_head" not in name:
            n, m = shape
            return b + N * c + min(n, m) * (n + m) * c + T * k * (n + m) * c
        return b + 2 * T * N * c

    largest = max(work(n, sh) for n, (_, sh) in base.items())
    model_bytes = sum(math.prod(sh) * 4 for _, sh in base.values())
    assert model_bytes > 100_000  # so the buffer is capped by --out-shard-size
    want = (largest + 100_000) / 2**20
    assert f"estimated peak working memory: {want:.2f} MiB" in report
    assert f"{largest / 2**20:.2f} MiB for its largest tensor" in report
    assert f"up to {3 * model_bytes / 2**20:.2f} MiB of the inputs' file pages" in report
    assert _inputs_tree(ck) == before and sorted(p.name for p in root.iterdir()) == ["recipe.yml"]


def _stdout(root: Path, shard: str) -> str:
    from click.testing import CliRunner

    from mergekit_ctm.cli.main import main

    old = os.getcwd()
    os.chdir(root)
    try:
        res = CliRunner().invoke(main, ["validate", "recipe.yml", "--out-shard-size", shard])
    finally:
        os.chdir(old)
    assert res.exit_code == 0, res.output
    return res.stdout


def _fine_tune_copy(ck: dict, dst: Path, change) -> Path:
    """A copy of task 1 with ``change`` applied to the shard holding the q_proj of layer 0."""
    shutil.copytree(ck["tasks"][1], dst)
    shard = next(f for f in dst.glob("*.safetensors") if Q in load_file(str(f)))
    tensors = load_file(str(shard))
    change(tensors)
    save_file(tensors, str(shard), metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize(
    "change,fragments",
    [
        (lambda t: t.update({Q: t[Q][:, :40].contiguous()}),
         (f"tensor '{Q}' has shape 48×40 but the base's is 48×48",)),
        (lambda t: t.pop(Q), (f"lacks tensor '{Q}' (shape 48×48 in the base)",)),
    ],
    ids=["shape", "missing"],
)  # fmt: skip
def test_validate_refuses_mismatched_fine_tune(checkpoints, tmp_path, change, fragments):  # noqa: F811
    ck = checkpoints
    bad = _fine_tune_copy(ck, tmp_path / "bad", change)
    recipe = _models_recipe(ck)
    recipe["models"][1]["model"] = str(bad)
    root = _project(ck, tmp_path / "p", recipe)
    res = _validate(root)
    assert res.code == 2
    message = _one_line(res, "mergekit-ctm")
    assert f"models[1] ({bad})" in message
    for frag in fragments:
        assert frag in message, message
    assert "fine-tuned from this base" in message


def test_validate_notes_extra_tensor(checkpoints, tmp_path):  # noqa: F811
    ck = checkpoints
    add = lambda t: t.update({"extra.weight": torch.ones(3)})  # noqa: E731
    extra = _fine_tune_copy(ck, tmp_path / "extra", add)
    recipe = _models_recipe(ck)
    recipe["models"][0]["model"] = str(extra)
    root = _project(ck, tmp_path / "p", recipe)
    report = _stdout(root, "5B")
    want = f"note: models[0] ({extra}): 1 tensor(s) the base lacks, not merged: extra.weight"
    assert want in report


def test_validate_bin_checkpoint(checkpoints, tmp_path):  # noqa: F811
    """A .bin fine-tune: shapes come from unpickling onto the meta device; a mismatch is found."""
    ck = checkpoints
    src = ck["tasks"][1]
    dst = tmp_path / "bin"
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    state = {}
    for f in src.glob("*.safetensors"):
        state.update(load_file(str(f)))
    state[Q] = state[Q][:40].clone()
    torch.save(state, dst / "pytorch_model.bin")
    recipe = _models_recipe(ck)
    recipe["models"][1]["model"] = str(dst)
    root = _project(ck, tmp_path / "p", recipe)
    res = _validate(root)
    assert res.code == 2
    assert f"models[1] ({dst}): tensor '{Q}' has shape 40×48" in _one_line(res, "mergekit-ctm")


def test_validate_slices_recipe(checkpoints, tmp_path):  # noqa: F811
    root = _project(checkpoints, tmp_path / "p", _slices_recipe(checkpoints))
    report = _stdout(root, "5B")
    assert "base_rule ties" in report and "fine-tunes (2):" in report
    assert "slices[0].sources[1]" in report


@pytest.mark.slow
def test_merge_command_runs_full_recipe_as_mergekit_yaml(checkpoints, tmp_path):  # noqa: F811
    """``mergekit-ctm merge`` on full checkpoints writes what ``mergekit-yaml`` writes."""
    root = _project(checkpoints, tmp_path / "p", _slices_recipe(checkpoints))
    a = run_command(["merge", "recipe.yml", "a", "--quiet"], root, "mergekit-ctm")
    b = run_command(["recipe.yml", "b", "--quiet"], root)
    assert a.code == 0 and b.code == 0, (a.stderr, b.stderr)
    for f in ("model.safetensors", "config.json", "mergekit_config.yml"):
        assert (root / "a" / f).read_bytes() == (root / "b" / f).read_bytes(), f
    merged, base = load_file(str(root / "a" / "model.safetensors")), {}
    for f in checkpoints["base"].glob("*.safetensors"):
        base.update(load_file(str(f)))
    s = torch.linalg.svdvals(merged[Q].double() - base[Q].double())
    assert (s > 1e-3 * s[0]).sum() <= 4  # the merge went through our kernel (rank 4)
