"""`mergekit-yaml --cuda`: the same adapter as on CPU, up to float32 rounding (skipped without a
GPU). Random rules draw from the device's generator, so DARE is checked for determinism per
device, not for equality with the CPU draw (docs/usage.md, Options)."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_deltas_close, engine_deltas, peft_deltas, run_cli, tool, write_recipe
from safetensors.torch import load_file

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

DETERMINISTIC = {
    "ctm": dict(
        parameters={"base_rule": "ties", "rank": 8, "beta": 0.5},
        per_adapter={"weight": 1.0, "density": 0.5},
    ),
    "core_space": dict(parameters={"base_rule": "task_arithmetic"}),
    "mtc": dict(parameters={"base_rule": "ties", "rank": 6, "space": "full"}),
    "lora_lego": dict(parameters={"rank": 6}),
}


@pytest.mark.parametrize("method", list(DETERMINISTIC))
def test_cuda_adapter_equals_cpu_engine(example, tmp_path, method):
    recipe = write_recipe(tmp_path / "r.yml", example, method, **DETERMINISTIC[method])
    out = tmp_path / "out"
    run_cli(tool("mergekit-yaml"), str(recipe), str(out), "--cuda", "--quiet")
    _, got = peft_deltas(example["base"], str(out))
    assert_deltas_close(got, engine_deltas(recipe.read_text()), rtol=1e-4)


def test_cuda_full_model_output(example, tmp_path):
    recipe = write_recipe(
        tmp_path / "r.yml", example, "ctm", output="model", **DETERMINISTIC["ctm"]
    )
    outs = {}
    for flag in ("--cuda", None):
        out = tmp_path / f"out{flag}"
        run_cli(tool("mergekit-yaml"), str(recipe), str(out), "--quiet", *([flag] if flag else []))
        outs[flag] = {
            k: v for f in sorted(out.glob("*.safetensors")) for k, v in load_file(str(f)).items()
        }
    gpu, cpu = outs["--cuda"], outs[None]
    assert gpu.keys() == cpu.keys()
    for k in cpu:  # W + ΔW: ΔW agrees to float32 rounding of the merge, relative to its scale
        err = float((gpu[k].double() - cpu[k].double()).abs().max())
        assert err <= 1e-4 * float(cpu[k].abs().max()), f"{k}: max |Δ| {err:.3g}"


def test_cuda_random_rule_deterministic(example, tmp_path):
    recipe = write_recipe(
        tmp_path / "r.yml",
        example,
        "ctm",
        parameters={"base_rule": "dare_ties", "rank": 4},
        per_adapter={"weight": 1.0, "density": 0.7},
    )
    blobs = []
    for i in range(2):
        out = tmp_path / f"out{i}"
        run_cli(
            tool("mergekit-yaml"), str(recipe), str(out), "--cuda", "--random-seed", "3", "--quiet"
        )
        blobs.append((out / "adapter_model.safetensors").read_bytes())
    assert blobs[0] == blobs[1]


@pytest.mark.parametrize("output", ["model", "adapter"])
def test_cuda_full_checkpoints_equal_cpu(tmp_path, output):
    """Full fine-tuned checkpoints with --cuda (compression and merge on the GPU) give the
    CPU's tensors up to float32 rounding of the merged update, for both outputs."""
    from reliability import run_command, write_yaml
    from test_plugin_full_checkpoints import _build_checkpoints, _load, _recipe

    ck = _build_checkpoints(tmp_path / "ck")
    recipe = _recipe(ck, "ctm", {"base_rule": "ties", "rank": 4}, {"weight": 1.0,
                                                                  "density": 0.5})  # fmt: skip
    recipe["output"] = output
    write_yaml(tmp_path / "r.yml", recipe)
    outs = {}
    for flag in ("--cuda", None):
        out = tmp_path / f"out{flag}"
        res = run_command([str(tmp_path / "r.yml"), str(out), "--quiet", *([flag] if flag else [])],
                          tmp_path)  # fmt: skip
        assert res.code == 0 and not res.traceback, (res.stderr, res.exception)
        outs[flag] = _load(out)
    gpu, cpu = (_updates(outs[f], _load(ck["base"]), output) for f in ("--cuda", None))
    assert gpu.keys() == cpu.keys() and cpu
    for k in cpu:  # the merged update, to float32 rounding relative to its scale
        err = float((gpu[k] - cpu[k]).abs().max())
        assert err <= 1e-4 * float(cpu[k].abs().max()) + 1e-7, f"{k}: max |Δ| {err:.3g}"


def _updates(out: dict, base: dict, output: str) -> dict:
    """Merged update per tensor: W_out − W_base (model), or B·A per module (adapter; the
    factors themselves are defined up to a rotation)."""
    if output == "model":
        return {k: v.double() - base[k].double() for k, v in out.items()}
    return {
        k[: -len(".lora_A.weight")]: out[k[: -len("A.weight")] + "B.weight"].double() @ v.double()
        for k, v in out.items()
        if k.endswith(".lora_A.weight")
    }
