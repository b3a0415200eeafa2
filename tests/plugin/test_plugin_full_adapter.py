"""``output: adapter`` for full fine-tuned checkpoints, through the stock mergekit-yaml:

- the adapter loads with ``PeftModel.from_pretrained(base, out)`` and its forward equals the
  forward of the ``output: model`` merge of the same recipe and seed;
- each written B·A equals an independent float64 computation (exact truncated SVD of each
  ΔWₜ, then the engine) and W_model − W_base of the model merge;
- what a LoRA cannot hold (norms, embeddings, lm_head) is listed in the card with its size;
- the same recipe and seed give the same bytes; bad combinations fail in one line, first.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from reliability import run_command, tree, write_yaml
from test_plugin_full_checkpoints import _load, _reference

F64 = torch.float64
N_TASKS = 3
LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _build(root: Path, dense: bool) -> dict:
    """A tiny Llama base (shards) and three full fine-tunes: every linear weight moved by a
    task-specific low-rank update plus a small dense part; with ``dense`` the norms, the
    embeddings and lm_head move too, else they equal the base."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=64, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = LlamaForCausalLM(cfg)
        base.save_pretrained(root / "base", max_shard_size="60KB")
        g = torch.Generator().manual_seed(1)
        tasks = []
        for t in range(N_TASKS):
            state = {}
            for name, w in base.state_dict().items():
                linear = w.ndim == 2 and "embed_tokens" not in name and "lm_head" not in name
                if linear:
                    n, m = w.shape
                    low = torch.randn(n, 6, generator=g) @ torch.randn(6, m, generator=g)
                    dw = 0.02 * low / 6**0.5 + 0.002 * torch.randn(n, m, generator=g)
                else:
                    dw = 0.05 * torch.randn(w.shape, generator=g) * float(dense)
                state[name] = w + dw
            model = LlamaForCausalLM(cfg)
            model.load_state_dict(state)
            model.save_pretrained(root / f"task{t}", max_shard_size="80KB")
            tasks.append(root / f"task{t}")
    return {"root": root, "base": root / "base", "tasks": tasks}


@pytest.fixture(scope="module")
def linear_only(tmp_path_factory) -> dict:
    return _build(tmp_path_factory.mktemp("linear_only"), dense=False)


@pytest.fixture(scope="module")
def dense(tmp_path_factory) -> dict:
    return _build(tmp_path_factory.mktemp("dense"), dense=True)


def _recipe(ck: dict, params: dict, per_model: dict | None, output: str | None) -> dict:
    recipe = {
        "merge_method": "ctm",
        "base_model": str(ck["base"]),
        "models": [
            {"model": str(t), **({"parameters": dict(per_model)} if per_model else {})}
            for t in ck["tasks"]
        ],
        "parameters": params,
        "dtype": "float32",
    }
    if output:
        recipe["output"] = output
    return recipe


def _merge(ck: dict, tmp: Path, name: str, recipe: dict, *extra: str) -> Path:
    write_yaml(tmp / f"{name}.yml", recipe)
    res = run_command([str(tmp / f"{name}.yml"), str(tmp / name), "--quiet", *extra], tmp)
    assert res.code == 0 and not res.traceback, (res.stderr, res.exception)
    return tmp / name


def _assert_same_forward(peft_model, out_m: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The PEFT model (base + merged adapter) and the merged full model give the same logits;
    returns the input ids and the full model's logits."""
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        full = AutoModelForCausalLM.from_pretrained(out_m, dtype=torch.float32).eval()
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got, want = peft_model(input_ids=ids).logits, full(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    return ids, want


def _lora_deltas(base: Path, out: Path) -> tuple[object, dict[str, torch.Tensor]]:
    """PeftModel.from_pretrained(base, out) and each module's ΔW as PEFT computes it."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        model = PeftModel.from_pretrained(model, str(out)).eval()
    deltas = {}
    for name, mod in model.named_modules():
        if isinstance(mod, LoraLayer) and "default" in getattr(mod, "lora_A", {}):
            key = name.removeprefix("base_model.model.") + ".weight"
            deltas[key] = mod.get_delta_weight("default").detach().to(F64)
    return model, deltas


CASES = [
    ({"base_rule": "ties", "rank": 8, "beta": 0.5}, {"weight": 1.0, "density": 0.5}),
    ({"base_rule": "dare_ties", "rank": 6, "task_rank": 8}, {"weight": 1.0, "density": 0.7}),
]


@pytest.mark.slow
@pytest.mark.parametrize("params,per_model", CASES, ids=["ties", "dare_ties"])
def test_adapter_forward_equals_model_forward(linear_only, tmp_path, params, per_model):
    """The issue's check: the adapter's forward through PEFT equals the full model's."""
    ck = linear_only
    seed = ("--random-seed", "7")  # DARE draws: the same per-tensor seeds in both outputs
    out_a = _merge(ck, tmp_path, "adapter", _recipe(ck, params, per_model, "adapter"), *seed)
    out_m = _merge(ck, tmp_path, "model", _recipe(ck, params, per_model, "model"), *seed)

    files = sorted(p.name for p in out_a.iterdir())
    assert files == ["README.md", "adapter_config.json", "adapter_model.safetensors",
                     "mergekit_config.yml"]  # fmt: skip
    cfg = json.loads((out_a / "adapter_config.json").read_text())
    assert cfg["r"] == params["rank"] and cfg["lora_alpha"] == params["rank"]
    assert sorted(cfg["target_modules"]) == sorted(LINEAR)
    assert cfg["base_model_name_or_path"] == str(ck["base"]) and not cfg["use_rslora"]

    peft_model, deltas = _lora_deltas(ck["base"], out_a)
    base, model = _load(ck["base"]), _load(out_m)
    assert len(deltas) == 2 * len(LINEAR)
    for name, got in deltas.items():
        want = model[name].to(F64) - base[name].to(F64)
        err = (got - want).norm() / want.norm()
        assert err < 1e-5, f"{name}: B·A vs W_model − W_base, relative {err:.2e}"
    for name in set(base) - set(deltas):  # nothing else moved in these fine-tunes
        assert torch.equal(model[name], base[name]), name

    _assert_same_forward(peft_model, out_m)

    if params["base_rule"] == "ties":  # deterministic rule: an independent float64 check
        for name, got in deltas.items():
            ref = _reference(ck, "ctm", params, per_model, name) - base[name].to(F64)
            err = (got - ref).norm() / ref.norm()
            assert err < 1e-4, f"{name}: B·A vs float64 reference, relative {err:.2e}"


@pytest.mark.slow
def test_adapter_card_lists_what_a_lora_cannot_hold_and_bytes_repeat(dense, tmp_path):
    ck = dense
    params = {"base_rule": "task_arithmetic", "rank": 4, "beta": 0.5}
    recipe = _recipe(ck, params, None, "adapter")
    out = _merge(ck, tmp_path, "a1", recipe, "--random-seed", "1")
    again = _merge(ck, tmp_path, "a2", recipe, "--random-seed", "1")
    assert tree(out) == tree(again)

    card = (out / "README.md").read_text()
    assert "library_name: peft" in card and "## Not in this adapter" in card
    base = _load(ck["base"])
    # task_arithmetic, weight 1, lambda 1: the dense merged update is the sum of the deltas
    name = "model.norm.weight"
    delta = sum(_load(t)[name].to(F64) - base[name].to(F64) for t in ck["tasks"])
    rel = float(delta.norm() / base[name].to(F64).norm())
    assert f"| `{name}` | 1 | max {rel:.3g}, median {rel:.3g} |" in card, card
    for group, count in (("model.layers.*.input_layernorm.weight", 2),
                         ("model.embed_tokens.weight", 1), ("lm_head.weight", 1)):  # fmt: skip
        assert f"| `{group}` | {count} | max " in card, group
    written = (out / "mergekit_config.yml").read_text()
    assert "output: adapter" in written and "random seed: 1" in written
    assert "\nrandom_seed: 1\n" in written

    # the recorded recipe (seed included) redoes the merge byte for byte
    res = run_command([str(out / "mergekit_config.yml"), str(tmp_path / "a3"), "--quiet"],
                      tmp_path)  # fmt: skip
    assert res.code == 0, res.stderr
    assert tree(tmp_path / "a3") == tree(out)


@pytest.mark.slow
def test_full_adapter_through_run_merge_without_config_source(linear_only, tmp_path):
    """Python's run_merge with only MergeConfiguration: `output:` survives it."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    ck = linear_only
    recipe = _recipe(ck, {"base_rule": "task_arithmetic", "rank": 4}, None, "adapter")
    config = MergeConfiguration.model_validate(recipe)
    assert config.output == "adapter"
    run_merge(config, str(tmp_path / "out"), MergeOptions(quiet=True))
    cfg = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and not (tmp_path / "out" / "config.json").exists()


BAD = [
    ({"merge_method": "linear", "output": "adapter"}, "output: adapter needs merge_method"),
    ({"slices": "x"}, "`slices:` builds a model of another shape"),
    ({"tokenizer_source": "union"}, "keeps the base model's vocabulary"),
    ({"output": "lora"}, "output"),
]


@pytest.mark.parametrize("change,message", BAD, ids=["stock", "slices", "tokenizer", "value"])
def test_bad_output_adapter_recipes_fail_in_one_line_before_any_work(
    linear_only, tmp_path, change, message
):
    ck = linear_only
    recipe = _recipe(ck, {"base_rule": "task_arithmetic", "rank": 4}, {"weight": 1.0}, "adapter")
    if "slices" in change:
        n = 2
        recipe.pop("models")
        recipe["slices"] = [{"sources": [{"model": str(t), "layer_range": [0, n]}
                                         for t in ck["tasks"]]}]  # fmt: skip
    else:
        recipe.update(change)
    write_yaml(tmp_path / "r.yml", recipe)
    res = run_command([str(tmp_path / "r.yml"), str(tmp_path / "out")], tmp_path)
    assert res.code == 2 and not res.traceback, (res.stderr, res.exception)
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], res.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_gpt2_conv1d_layers_become_a_fan_in_fan_out_lora(tmp_path):
    """GPT-2's Conv1D stores W as (in, out): the LoRA is written for PEFT's fan_in_fan_out
    layout, and its forward equals the output: model forward."""
    from peft import PeftModel
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=32,
                     bos_token_id=0, eos_token_id=1)  # fmt: skip
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = GPT2LMHeadModel(cfg)
        base.save_pretrained(tmp_path / "base")
        for t in range(2):
            state = {}
            for n, w in base.state_dict().items():
                conv = w.ndim == 2 and not any(x in n for x in ("wte", "wpe", "lm_head"))
                state[n] = w + 0.02 * torch.randn(w.shape, generator=g) * float(conv)
            model = GPT2LMHeadModel(cfg)
            model.load_state_dict(state)
            model.save_pretrained(tmp_path / f"t{t}")
    ck = {"base": tmp_path / "base", "tasks": [tmp_path / "t0", tmp_path / "t1"]}
    params = {"base_rule": "task_arithmetic", "rank": 4}
    out_a = _merge(ck, tmp_path, "adapter", _recipe(ck, params, None, "adapter"))
    out_m = _merge(ck, tmp_path, "model", _recipe(ck, params, None, "model"))
    cfg_a = json.loads((out_a / "adapter_config.json").read_text())
    assert cfg_a["fan_in_fan_out"] and sorted(cfg_a["target_modules"]) == ["c_attn", "c_fc",
                                                                          "c_proj"]  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = PeftModel.from_pretrained(
            GPT2LMHeadModel.from_pretrained(ck["base"]), str(out_a)
        ).eval()
        full = GPT2LMHeadModel.from_pretrained(out_m).eval()
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got, want = peft_model(input_ids=ids).logits, full(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    base_logits = GPT2LMHeadModel.from_pretrained(ck["base"]).eval()(input_ids=ids).logits
    assert (base_logits - want).abs().max() > 1e-3  # the merge moved the model


def test_fine_tunes_equal_to_the_base_write_nothing(linear_only, tmp_path):
    """Every linear layer's merged update is zero: one error line, no output directory."""
    import shutil

    tasks = [tmp_path / "t0", tmp_path / "t1"]
    for t in tasks:
        shutil.copytree(linear_only["base"], t)
    ck = {"base": linear_only["base"], "tasks": tasks}
    recipe = _recipe(ck, {"base_rule": "task_arithmetic", "rank": 4}, None, "adapter")
    write_yaml(tmp_path / "r.yml", recipe)
    res = run_command([str(tmp_path / "r.yml"), str(tmp_path / "out"), "--quiet"], tmp_path)
    assert res.code == 2 and not res.traceback, (res.stderr, res.exception)
    assert "merged update is zero" in res.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yml", "t0", "t1"]  # no staging


@pytest.mark.slow
def test_modules_to_save_keeps_embeddings_lm_head_and_norms(dense, tmp_path):
    """modules_to_save: [embed_tokens, lm_head, norm] (PEFT's matching: every module whose
    path ends so): the adapter then carries the whole merge, and its forward equals the
    output: model forward even though norms and embeddings moved in the fine-tunes."""
    ck = dense
    params = {"base_rule": "ties", "rank": 8, "beta": 0.5}
    per = {"weight": 1.0, "density": 0.5}
    keep = ["embed_tokens", "lm_head", "norm"]
    out_a = _merge(
        ck, tmp_path, "a", {**_recipe(ck, params, per, "adapter"), "modules_to_save": keep}
    )
    out_m = _merge(ck, tmp_path, "m", _recipe(ck, params, per, "model"))
    cfg = json.loads((out_a / "adapter_config.json").read_text())
    assert sorted(cfg["modules_to_save"]) == sorted(keep)
    card = (out_a / "README.md").read_text()
    assert "Kept in full" in card and "## Not in this adapter" not in card
    assert "modules_to_save:" in (out_a / "mergekit_config.yml").read_text()

    peft_model, _ = _lora_deltas(ck["base"], out_a)
    ids, want = _assert_same_forward(peft_model, out_m)
    # without modules_to_save the same adapter misses the moved norms and embeddings
    out_b = _merge(ck, tmp_path, "b", _recipe(ck, params, per, "adapter"))
    lora_only, _ = _lora_deltas(ck["base"], out_b)
    with torch.no_grad():
        assert (lora_only(input_ids=ids).logits - want).abs().max() > 1e-3


@pytest.mark.parametrize(
    "keep,output,message",
    [
        (["q_proj"], "adapter", "which is (or holds) the linear layer"),
        (["layers"], "adapter", "which is (or holds) the linear layer"),
        (["embed_tokenz"], "adapter", "matches no module of the base"),
        (["embed_tokens"], "model", "applies to output: adapter only"),
        ("embed_tokens", "adapter", "must be a list of module names"),
    ],
    ids=["lora-target", "container", "unknown", "model", "not-a-list"],
)
def test_bad_modules_to_save_fail_in_one_line(linear_only, tmp_path, keep, output, message):
    recipe = {**_recipe(linear_only, {"rank": 4}, None, output), "modules_to_save": keep}
    write_yaml(tmp_path / "r.yml", recipe)
    res = run_command([str(tmp_path / "r.yml"), str(tmp_path / "out")], tmp_path)
    assert res.code == 2 and not res.traceback, (res.stderr, res.exception)
    lines = [line for line in res.stderr.splitlines() if line.strip() and "it/s" not in line]
    assert message in lines[-1] and lines[-1].startswith("mergekit-yaml: error:"), res.stderr
    assert not (tmp_path / "out").exists()


def test_modules_to_save_refuses_a_tied_lm_head(tmp_path):
    """A tied lm_head has no tensor of its own: keeping it would keep the base's."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, vocab_size=64, tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in ("base", "t0", "t1"):
            LlamaForCausalLM(cfg).save_pretrained(tmp_path / name)
    ck = {"base": tmp_path / "base", "tasks": [tmp_path / "t0", tmp_path / "t1"]}
    recipe = {**_recipe(ck, {"rank": 4}, None, "adapter"), "modules_to_save": ["lm_head"]}
    write_yaml(tmp_path / "r.yml", recipe)
    res = run_command([str(tmp_path / "r.yml"), str(tmp_path / "out")], tmp_path)
    assert res.code == 2 and not res.traceback, (res.stderr, res.exception)
    assert "lm_head.weight has no tensor of its own" in res.stderr, res.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_recipe_random_seed_for_full_checkpoints(linear_only, tmp_path):
    """`random_seed:` in a full-checkpoint recipe seeds the merge as --random-seed does (DARE
    draws), and --random-seed wins over it, as for adapter recipes."""
    ck = linear_only
    params = {"base_rule": "dare_ties", "rank": 6}
    per_model = {"weight": 1.0, "density": 0.5}
    by_flag = _merge(ck, tmp_path, "flag7", _recipe(ck, params, per_model, "model"),
                     "--random-seed", "7")  # fmt: skip
    keyed = _recipe(ck, params, per_model, "model") | {"random_seed": 7}
    by_key = _merge(ck, tmp_path, "key7", keyed)
    overridden = _merge(ck, tmp_path, "key7flag8", keyed, "--random-seed", "8")
    flag8 = _merge(ck, tmp_path, "flag8", _recipe(ck, params, per_model, "model"),
                   "--random-seed", "8")  # fmt: skip
    weights = lambda out: {k: v for k, v in tree(out).items() if k.endswith(".safetensors")}  # noqa: E731
    assert weights(by_key) == weights(by_flag)
    assert weights(overridden) == weights(flag8) != weights(by_flag)
