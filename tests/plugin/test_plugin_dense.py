"""modules_to_save tensors: merged with the base rule relative to the base weight, passed
through when a single adapter has them; PeftModel loads the result."""

from __future__ import annotations

import warnings

import torch
from conftest import load_base, write_recipe
from mergekit.options import MergeOptions
from safetensors.torch import load_file, save_file

from mergekit_ctm.examples import build_tiny_adapter
from mergekit_ctm.plan.run import run_adapter_merge

KEY = "base_model.model.lm_head.weight"


def _adapter_with_head(example, path, seed: int, noise: float):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        build_tiny_adapter(
            example["base"],
            path,
            r=2,
            alpha=2,
            target_modules=["q_proj"],
            modules_to_save=["lm_head"],
            seed=seed,
        )
    f = path / "adapter_model.safetensors"
    sd = load_file(str(f))
    gen = torch.Generator().manual_seed(seed)
    sd[KEY] = sd[KEY] + noise * torch.randn(sd[KEY].shape, generator=gen)  # "trained" head
    save_file(sd, str(f), metadata={"format": "pt"})
    return sd[KEY].double()


def test_modules_to_save_merged_relative_to_base(example, tmp_path):
    from peft import PeftModel

    heads = [_adapter_with_head(example, tmp_path / f"h{i}", 10 + i, 0.1) for i in range(2)]
    ex = {
        "base": example["base"],
        "adapters": [str(tmp_path / "h0"), str(tmp_path / "h1"), example["adapters"][0]],
    }
    weights = [1.0, 0.5, 1.0]
    recipe = write_recipe(
        tmp_path / "r.yml",
        ex,
        "core_space",
        parameters={"base_rule": "task_arithmetic"},
        per_adapter=[{"weight": w} for w in weights],
    )
    out = tmp_path / "out"
    run_adapter_merge(recipe.read_text(), str(out), MergeOptions(quiet=True))

    base_head = load_file(f"{example['base']}/model.safetensors")["lm_head.weight"].double()
    want = base_head + sum(w * (h - base_head) for w, h in zip(weights, heads))
    got = load_file(str(out / "adapter_model.safetensors"))[KEY].double()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PeftModel.from_pretrained(load_base(example["base"]), str(out))
    loaded = model.base_model.model.lm_head.modules_to_save["default"].weight.double()
    torch.testing.assert_close(loaded, want, rtol=1e-5, atol=1e-6)

    # a single owner passes through unchanged
    solo = write_recipe(tmp_path / "s.yml", ex, "ctm", parameters={"rank": 2}, adapters=[0, 2])
    out2 = tmp_path / "out2"
    run_adapter_merge(solo.read_text(), str(out2), MergeOptions(quiet=True))
    got2 = load_file(str(out2 / "adapter_model.safetensors"))[KEY].double()
    torch.testing.assert_close(got2, heads[0], rtol=0, atol=1e-7)
