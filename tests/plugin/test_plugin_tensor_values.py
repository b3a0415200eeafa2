"""Non-finite adapter values are refused, naming adapter, module and tensor, by every method
(at load, before anything is written) and by check_tensor_values (`validate`'s data check)."""

from __future__ import annotations

import shutil

import pytest
from conftest import write_recipe
from mergekit.options import MergeOptions
from safetensors.torch import load_file, save_file

from mergekit_ctm.adapters import AdapterError
from mergekit_ctm.plan.run import run_adapter_merge
from mergekit_ctm.recipe import RecipeError, build_plan
from mergekit_ctm.recipe.validate import check_tensor_values

MODULE = "model.layers.1.self_attn.v_proj"
KEY_B = f"base_model.model.{MODULE}.lora_B.weight"


@pytest.fixture(scope="module")
def nan_example(example, tmp_path_factory) -> dict:
    """The example with adapter 1 copied and one NaN put into one lora_B."""
    bad = tmp_path_factory.mktemp("nan") / "adapter_nan"
    shutil.copytree(example["adapters"][1], bad)
    f = bad / "adapter_model.safetensors"
    sd = load_file(f)
    sd[KEY_B][3, 1] = float("nan")
    save_file(sd, f, metadata={"format": "pt"})
    adapters = list(example["adapters"])
    adapters[1] = str(bad)
    return {**example, "adapters": adapters, "numel": sd[KEY_B].numel()}


PARAMS = {
    "ctm": {"rank": 4, "base_rule": "ties", "density": 0.5},
    "core_space": {"base_rule": "task_arithmetic"},
    "mtc": {"rank": 4, "base_rule": "ties", "density": 0.5},
    "lora_lego": {"rank": 4},
}


@pytest.mark.parametrize("method", list(PARAMS))
def test_merge_refuses_nan_naming_adapter_module_tensor(nan_example, method, tmp_path):
    recipe = write_recipe(tmp_path / "r.yml", nan_example, method, parameters=PARAMS[method])
    out = tmp_path / "out"
    with pytest.raises((AdapterError, RecipeError)) as info:
        run_adapter_merge(recipe.read_text(), str(out), MergeOptions(quiet=True))
    msg = str(info.value)
    assert nan_example["adapters"][1] in msg, msg
    assert f"module {MODULE}:" in msg and f"tensor {KEY_B}" in msg, msg
    assert f"has 1 NaN/Inf values of {nan_example['numel']}" in msg, msg
    assert "retrain it or leave it out" in msg, msg
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yml"]


def test_check_tensor_values_finds_the_nan(nan_example, example, tmp_path):
    recipe = write_recipe(tmp_path / "r.yml", nan_example, "ctm", parameters={"rank": 4})
    plan = build_plan(recipe.read_text())  # headers only: the plan itself is fine
    with pytest.raises(RecipeError) as info:
        check_tensor_values(plan)
    msg = str(info.value)
    assert msg.startswith(f"models[1]: adapter {nan_example['adapters'][1]!r}: module {MODULE}:")
    assert f"tensor {KEY_B} has 1 NaN/Inf values of" in msg, msg
    good = write_recipe(tmp_path / "g.yml", example, "ctm", parameters={"rank": 4})
    check_tensor_values(build_plan(good.read_text()))  # the clean example passes
