"""merge_adapters on a PeftModel equals the file path (mergekit-yaml on the same adapters).

Tiny real models: a 2-layer Llama with the example's heterogeneous adapters (ranks 4 / 8 with
rsLoRA / 6 with rank_pattern and alpha_pattern / 2, different target modules, so some modules
are merged among fewer adapters), one Llama adapter on embed_tokens, and GPT-2 (Conv1D,
fan_in_fan_out) adapters for the transposed storage layouts.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

import mergekit_ctm
from mergekit_ctm.errors import InputError
from mergekit_ctm.examples import build_tiny_adapter, build_tiny_base, example_adapter_specs
from mergekit_ctm.recipe import RecipeError

SEED = 7
# ΔW of every module, relative to its largest entry. Today the two paths make the very same
# engine call on the same float32 factors and agree bit for bit; the bound allows a later
# change of either path that keeps the numbers but not the bits.
RTOL = 1e-6
NAMES = ("a", "b", "c", "d")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny LAPACK calls stall with 2+ OpenMP threads on a busy machine (DESIGN.md, Threads).
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("peft_api")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = build_tiny_base(root / "base", hidden=32, vocab=64)
        model = load_base(base)
        paths = {
            n: build_tiny_adapter(base, root / n, base_model=model, **spec)
            for n, spec in zip(NAMES, example_adapter_specs(4))
        }
        paths["emb"] = build_tiny_adapter(
            base, root / "emb", base_model=model, r=3, alpha=6, target_modules=["embed_tokens"],
            seed=99,
        )  # fmt: skip
    return {"root": root, "base": base, "paths": paths}


def load_base(path: str):
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def load_peft(base: str, paths: dict[str, str], trainable: bool = False):
    """A PeftModel with every adapter in ``paths`` loaded under its key (the first active)."""
    from peft import PeftModel

    items = list(paths.items())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = PeftModel.from_pretrained(
            load_base(base), items[0][1], adapter_name=items[0][0], is_trainable=trainable
        )
        for name, path in items[1:]:
            pm.load_adapter(path, adapter_name=name)
    return pm


def lora_layers(model, adapter: str) -> dict[str, Any]:
    """Base-model module path -> the LoraLayer that holds ``adapter``."""
    from peft.tuners.lora import LoraLayer

    return {
        re.sub(r"^base_model\.model\.", "", n): m
        for n, m in model.named_modules()
        if isinstance(m, LoraLayer) and (adapter in m.lora_A or adapter in m.lora_embedding_A)
    }


def file_merge(tmp: Path, base: str, paths: list[str], method: str, params: dict[str, Any]):
    """The file path: a recipe through run_adapter_merge, loaded back with from_pretrained.

    Per-adapter lists in ``params`` go to each adapter's ``parameters:``, the rest to the top.
    """
    from mergekit.options import MergeOptions
    from peft import PeftModel

    from mergekit_ctm.plan.run import run_adapter_merge

    models = []
    for i, path in enumerate(paths):
        own = {k: v[i] for k, v in params.items() if isinstance(v, list)}
        models.append({"model": path, **({"parameters": own} if own else {})})
    top = {k: v for k, v in params.items() if not isinstance(v, list)}
    text = yaml.safe_dump(
        {"merge_method": method, "base_model": base, "models": models, "parameters": top}
    )
    out = tmp / f"out-{method}"
    run_adapter_merge(
        text, str(out), MergeOptions(quiet=True, random_seed=SEED), config_source=text
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PeftModel.from_pretrained(load_base(base), str(out))
    return model, json.loads((out / "adapter_config.json").read_text())


CASES = {
    # CtM with TIES, per-adapter weights and densities as lists, PEFT's plural spelling.
    "ctm-ties": (
        "ctm",
        dict(rank=6, beta=0.7, base_rule="ties", weights=[1.0, 0.5, 2.0, 1.0],
             density=[0.5, 0.4, 0.6, 0.5]),
    ),
    # Merge-then-Compress with a random rule: the per-module seeds must match too.
    "mtc-dare_ties": ("mtc", dict(rank=5, base_rule="dare_ties", density=0.6, lam=1.2)),
}  # fmt: skip


def recipe_params(params: dict[str, Any]) -> dict[str, Any]:
    alias = {"weights": "weight", "lam": "lambda"}
    return {alias.get(k, k): v for k, v in params.items()}


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tiny) -> dict[str, Any]:
    method, params = CASES[request.param]
    pm = load_peft(tiny["base"], {n: tiny["paths"][n] for n in NAMES})
    before = {n: (p.detach().clone(), p.requires_grad) for n, p in pm.named_parameters()}
    active = list(pm.active_adapters)
    result = mergekit_ctm.merge_adapters(
        pm, list(NAMES), "merged", method=method, random_seed=SEED, **params
    )
    # Snapshot now: later tests switch adapters (which PEFT lets touch requires_grad).
    after = {n: (p.detach().clone(), p.requires_grad) for n, p in pm.named_parameters()}
    after_active = list(pm.active_adapters)
    paths = [tiny["paths"][n] for n in NAMES]
    fm, fcfg = file_merge(tiny["root"], tiny["base"], paths, method, recipe_params(params))
    return dict(
        pm=pm, fm=fm, fcfg=fcfg, result=result, before=before, active=active, after=after,
        after_active=after_active,
    )  # fmt: skip


def test_factors_match_file_path(case):
    got, want = lora_layers(case["pm"], "merged"), lora_layers(case["fm"], "default")
    assert set(got) == set(want) == set(case["result"].ranks)
    for name in want:
        dw = want[name].get_delta_weight("default").double()
        dg = got[name].get_delta_weight("merged").double()
        err = (dg - dw).abs().max().item()
        assert err <= RTOL * dw.abs().max().item(), f"{name}: max |Δ| {err:.3g}"
        assert got[name].scaling["merged"] == want[name].scaling["default"] == 1.0
        assert got[name].r["merged"] == want[name].r["default"] == case["result"].ranks[name]


def test_config_matches_file_path(case):
    cfg = case["result"].config
    assert cfg is case["pm"].peft_config["merged"]
    mine = json.loads(json.dumps(cfg.to_dict(), default=lambda v: sorted(v)))
    mine["peft_type"], mine["task_type"] = cfg.peft_type.value, cfg.task_type
    mine["target_modules"] = sorted(mine["target_modules"])
    assert mine == {**case["fcfg"], "target_modules": sorted(case["fcfg"]["target_modules"])}


def test_forward_matches_file_path(case):
    x = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    case["pm"].set_adapter("merged")
    try:
        with torch.no_grad():
            got, want = case["pm"](x).logits, case["fm"](x).logits
            case["pm"].set_adapter("a")
            plain = case["pm"](x).logits
    finally:
        case["pm"].set_adapter(case["active"][0])
    assert (got - plain).abs().max() > 1e-3  # the merged adapter does something
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_model_otherwise_unchanged(case):
    """Existing adapters, base weights, requires_grad and the active adapter are as before."""
    assert case["after_active"] == case["active"]
    assert list(case["pm"].peft_config) == [*NAMES, "merged"]
    for name, (value, grad) in case["after"].items():
        if name in case["before"]:
            assert torch.equal(value, case["before"][name][0]), name
            assert grad == case["before"][name][1], name
        else:
            assert ".merged." in name and not grad, name


def test_inputs_and_requires_grad(tiny):
    """Modules held by some adapters merge those; trainable adapters stay trainable."""
    pm = load_peft(tiny["base"], {n: tiny["paths"][n] for n in ("a", "d")}, trainable=True)
    grads = {n: p.requires_grad for n, p in pm.named_parameters()}
    assert any(grads.values())
    res = mergekit_ctm.merge_adapters(pm, ["d", "a"], "m", rank=3, base_rule="task_arithmetic")
    assert {n: p.requires_grad for n, p in pm.named_parameters() if ".m." not in n} == grads
    q, k = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj"
    assert res.inputs[q] == ("d", "a") and res.inputs[k] == ("a",)
    assert res.ranks[q] == 3 and res.ranks[k] == 3


def test_embedding_layout(tiny):
    """Embedding LoRA (stored transposed) against the file path."""
    names = ["emb", "a"]
    pm = load_peft(tiny["base"], {n: tiny["paths"][n] for n in names})
    mergekit_ctm.merge_adapters(pm, names, "m", method="core_space", base_rule="ties", density=0.7)
    fm, _ = file_merge(
        tiny["root"],
        tiny["base"],
        [tiny["paths"][n] for n in names],
        "core_space",
        dict(base_rule="ties", density=0.7),
    )
    got, want = lora_layers(pm, "m"), lora_layers(fm, "default")
    assert "model.embed_tokens" in got and set(got) == set(want)
    for name in want:
        dw, dg = want[name].get_delta_weight("default"), got[name].get_delta_weight("m")
        torch.testing.assert_close(dg, dw, rtol=0, atol=RTOL * dw.abs().max().item())


def test_conv1d_layout(tmp_path):
    """GPT-2 Conv1D (fan_in_fan_out: PEFT stores ΔWᵀ's factors) against the file path."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=16)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "gpt2")
    base = str(tmp_path / "gpt2")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        paths = {
            n: build_tiny_adapter(
                base, tmp_path / n, r=r, alpha=2 * r, target_modules=["c_attn", "c_fc"],
                fan_in_fan_out=True, task_type=None, seed=s,
            )
            for n, r, s in (("x", 3, 1), ("y", 5, 2))
        }  # fmt: skip
    pm = load_peft(base, paths)
    mergekit_ctm.merge_adapters(pm, ["x", "y"], "m", rank=4, base_rule="ties", density=0.5)
    fm, _ = file_merge(
        tmp_path, base, list(paths.values()), "ctm", dict(rank=4, base_rule="ties", density=0.5)
    )
    got, want = lora_layers(pm, "m"), lora_layers(fm, "default")
    assert len(want) == 2 and set(got) == set(want)
    for name in want:
        assert got[name].fan_in_fan_out
        dw, dg = want[name].get_delta_weight("default"), got[name].get_delta_weight("m")
        torch.testing.assert_close(dg, dw, rtol=0, atol=RTOL * dw.abs().max().item())


def test_zero_module_left_out(tiny):
    """A module whose merged update is zero is not in the new adapter (as in the file path)."""
    pm = load_peft(tiny["base"], {n: tiny["paths"][n] for n in ("a", "b")})
    k = "model.layers.1.self_attn.k_proj"  # only adapter "a" has k_proj
    with torch.no_grad():
        pm.get_submodule(f"base_model.model.{k}").lora_B["a"].weight.zero_()
    res = mergekit_ctm.merge_adapters(pm, ["a", "b"], "m", rank=4)
    assert res.zero_modules == (k,)
    assert k not in lora_layers(pm, "m") and k not in res.config.target_modules
    assert "model.layers.0.self_attn.k_proj" in lora_layers(pm, "m")


@pytest.fixture(scope="module")
def loaded(tiny):
    return load_peft(tiny["base"], {n: tiny["paths"][n] for n in ("a", "b")})


@pytest.mark.parametrize(
    ("adapters", "name", "params", "error", "match"),
    [
        (["a", "bb"], "m", {}, RecipeError, r"unknown adapter\(s\) 'bb' \(did you mean 'b'\?\); "
         r"loaded adapters: a, b"),
        (["a", "a"], "m", {}, RecipeError, "listed more than once"),
        (["a", "b"], "b", {}, RecipeError, "adapter 'b' already exists"),
        (["a", "b"], "m", {"densty": 0.5, "base_rule": "ties"}, RecipeError,
         r"unknown parameter 'densty' .* \(did you mean 'density'\?\)"),
        (["a", "b"], "m", {"rnak": 4}, RecipeError, r"did you mean 'rank'\?"),
        (["a", "b"], "m", {"base_rule": "linear", "density": 0.5}, RecipeError,
         "base rules that take 'density': task_arithmetic, ties"),
        (["a", "b"], "m", {"base_rule": "tie"}, RecipeError, r"unknown rule 'tie' \(did you mean"),
        (["a", "b"], "m", {"method": "ctmm"}, RecipeError, r"did you mean 'ctm'\?"),
        (["a", "b"], "m", {"base_rule": "ties", "density": [0.5]}, RecipeError,
         "1 values for 2 adapters"),
        (["a", "b"], "m", {"base_rule": "ties", "density": [0.5, 1.5]}, RecipeError,
         r"adapter 'b': parameter 'density'"),
        (["a", "b"], "m", {"rank": 0}, RecipeError, "parameter 'rank'"),
        (["a", "b"], "m", {"rank": [4, 8]}, RecipeError, "takes one value here"),
        (["a", "b"], "m", {"weight": 1, "weights": 1}, RecipeError, "given twice"),
        (["a", "b"], "m", {"method": "lora_lego", "base_rule": "ties"}, RecipeError,
         "unknown parameter 'base_rule' for method lora_lego"),
        ("a", "m", {}, RecipeError, "non-empty list of adapter names"),
    ],
)  # fmt: skip
def test_errors(loaded, adapters, name, params, error, match):
    params = dict(params)
    method = params.pop("method", "ctm")
    state = {k: v.detach().clone() for k, v in loaded.state_dict().items()}
    with pytest.raises(error, match=match) as info:
        mergekit_ctm.merge_adapters(loaded, adapters, name, method=method, **params)
    assert isinstance(info.value, InputError)
    assert list(loaded.peft_config) == ["a", "b"]
    after = loaded.state_dict()
    assert set(after) == set(state) and all(torch.equal(after[k], state[k]) for k in state)


def test_refuses_non_peft_model(tiny):
    with pytest.raises(RecipeError, match="needs a peft.PeftModel"):
        mergekit_ctm.merge_adapters(load_base(tiny["base"]), ["a"], "m")


def test_peft_combinations_reproduced(tiny):
    """docs/usage.md: PEFT's `cat` = core_space lossless, `svd` = mtc, both task_arithmetic."""
    pm = load_peft(tiny["base"], {n: tiny["paths"][n] for n in ("a", "c", "d")})
    names, w = ["a", "c", "d"], [1.0, -0.5, 2.0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.add_weighted_adapter(names, w, "cat", combination_type="cat")
        pm.add_weighted_adapter(names, w, "svd", combination_type="svd", svd_rank=5)
    common = dict(base_rule="task_arithmetic", weights=w)
    mergekit_ctm.merge_adapters(pm, names, "our_cat", method="core_space", **common)
    mergekit_ctm.merge_adapters(pm, names, "our_svd", method="mtc", rank=5, **common)
    layers = lora_layers(pm, "our_cat")
    assert set(layers) == set(lora_layers(pm, "cat"))
    for layer in layers.values():
        for peft_name, ours in (("cat", "our_cat"), ("svd", "our_svd")):
            want, got = layer.get_delta_weight(peft_name), layer.get_delta_weight(ours)
            assert (got - want).norm() <= 1e-6 * want.norm()


def test_keeps_factor_dtype(tiny):
    """bf16 factors in, bf16 factors out (the math still runs in float32)."""
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = load_base(tiny["base"]).to(torch.bfloat16)
        pm = PeftModel.from_pretrained(
            base, tiny["paths"]["a"], adapter_name="a", autocast_adapter_dtype=False
        )
        pm.load_adapter(tiny["paths"]["c"], adapter_name="c", autocast_adapter_dtype=False)
    res = mergekit_ctm.merge_adapters(pm, ["a", "c"], "m", rank=4, base_rule="ties", density=0.5)
    for layer in lora_layers(pm, "m").values():
        assert layer.lora_A["m"].weight.dtype == torch.bfloat16
        assert layer.lora_B["m"].weight.dtype == torch.bfloat16
    assert res.ranks


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (dict(use_dora=True), "DoRA"),
        (dict(modules_to_save=["lm_head"]), "modules_to_save"),
        (dict(bias="lora_only"), "bias='lora_only'"),
    ],
)
def test_refuses_what_it_cannot_represent(tiny, extra, match):
    from peft import LoraConfig

    pm = load_peft(tiny["base"], {"a": tiny["paths"]["a"]})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.add_adapter("x", LoraConfig(r=2, target_modules=["q_proj"], **extra))
    with pytest.raises(RecipeError, match=match):
        mergekit_ctm.merge_adapters(pm, ["a", "x"], "m")
    assert list(pm.peft_config) == ["a", "x"]


def test_refuses_non_finite_factors(tiny):
    pm = load_peft(tiny["base"], {n: tiny["paths"][n] for n in ("a", "b")})
    with torch.no_grad():
        pm.get_submodule("base_model.model.model.layers.1.self_attn.v_proj").lora_A["b"].weight[
            0, 0
        ] = float("nan")
    with pytest.raises(RecipeError, match=r"adapter 'b', module '.*layers.1.self_attn.v_proj'"):
        mergekit_ctm.merge_adapters(pm, ["a", "b"], "m")
    assert list(pm.peft_config) == ["a", "b"]
