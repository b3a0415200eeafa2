"""Full fine-tuned checkpoints through the stock mergekit-yaml and mergekit's own planner:
every 2-D projection against an independent float64 computation (exact truncated SVD of
each ΔWₜ, then the engine), 1-D tensors against stock mergekit's merge with the same rule."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from reliability import run_command, write_yaml
from safetensors.torch import load_file

from mergekit_ctm.engine import merge_lora

F64 = torch.float64
N_TASKS = 3


def _load(model_dir: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict:
    return _build_checkpoints(tmp_path_factory.mktemp("full"))


def _build_checkpoints(root: Path) -> dict:
    """A tiny Llama base saved in shards and three full fine-tunes of it: each weight moved
    by a task-specific low-rank update plus a small dense part (every tensor changes)."""
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
            model = LlamaForCausalLM(cfg)
            state = {}
            for name, w in base.state_dict().items():
                if w.ndim == 2:
                    n, m = w.shape
                    low = torch.randn(n, 6, generator=g) @ torch.randn(6, m, generator=g)
                    dw = 0.02 * low / 6**0.5 + 0.002 * torch.randn(n, m, generator=g)
                else:
                    dw = 0.05 * torch.randn(w.shape, generator=g)
                state[name] = w + dw
            model.load_state_dict(state)
            model.save_pretrained(root / f"task{t}", max_shard_size="80KB")
            tasks.append(root / f"task{t}")
    return {"root": root, "base": root / "base", "tasks": tasks}


def _recipe(ck: dict, method: str, params: dict, per_model: dict | None = None) -> dict:
    return {
        "merge_method": method,
        "base_model": str(ck["base"]),
        "models": [
            {"model": str(t), **({"parameters": dict(per_model)} if per_model else {})}
            for t in ck["tasks"]
        ],
        "parameters": params,
        "dtype": "float32",
    }


def _reference(ck: dict, method: str, params: dict, rule_params: dict | None, name: str):
    """Independent float64: exact truncated SVD of each ΔWₜ, balanced factors, the engine."""
    base = _load(ck["base"])[name].to(F64)
    As, Bs = [], []
    k = params.get("task_rank") or params.get("rank")
    for t in ck["tasks"]:
        dw = _load(t)[name].to(F64) - base
        U, S, Vh = torch.linalg.svd(dw, full_matrices=False)
        r = S.sqrt()[:k]
        Bs.append(U[:, :k] * r)
        As.append(r[:, None] * Vh[:k])
    own = {k_: v for k_, v in params.items() if k_ != "task_rank"}
    out = merge_lora(As, Bs, [1.0] * len(As), method=method, rule_params=rule_params,
                     dtype=F64, seed=0, **own)  # fmt: skip
    return base + out.B @ out.A


CASES = [
    ("ctm", {"base_rule": "task_arithmetic", "rank": 8, "task_rank": 8, "beta": 0.5}, None),
    ("core_space", {"base_rule": "task_arithmetic", "rank": 8, "task_rank": 6}, None),
    ("mtc", {"base_rule": "task_arithmetic", "rank": 8, "space": "full", "task_rank": 8}, None),
    ("ctm", {"base_rule": "ties", "rank": 8, "beta": 0.5}, {"weight": 1.0, "density": 0.5}),
]


@pytest.mark.slow
@pytest.mark.parametrize("method,params,per_model", CASES, ids=[f"{c[0]}-{c[1]['base_rule']}"
                                                                for c in CASES])  # fmt: skip
def test_full_checkpoints_through_mergekit_yaml(checkpoints, tmp_path, method, params, per_model):
    ck = checkpoints
    write_yaml(tmp_path / "r.yml", _recipe(ck, method, params, per_model))
    res = run_command([str(tmp_path / "r.yml"), str(tmp_path / "out"), "--quiet"], tmp_path)
    assert res.code == 0 and not res.traceback, (res.stderr, res.exception)
    out = _load(tmp_path / "out")
    base = _load(ck["base"])
    assert set(out) == set(base)
    # a stock mergekit merge with the base rule, for the dense tensors
    rule = params["base_rule"]
    stock = {"merge_method": rule, "base_model": str(ck["base"]),
             "models": [{"model": str(t), "parameters": dict(per_model or {"weight": 1.0})}
                        for t in ck["tasks"]], "dtype": "float32"}  # fmt: skip
    write_yaml(tmp_path / "stock.yml", stock)
    res = run_command([str(tmp_path / "stock.yml"), str(tmp_path / "stock"), "--quiet"], tmp_path)
    assert res.code == 0, res.stderr
    ref_dense = _load(tmp_path / "stock")
    checked = 0
    for name, w in out.items():
        if w.ndim == 2 and "embed_tokens" not in name and "lm_head" not in name:
            want = _reference(ck, method, params, per_model, name)
            err = (w.to(F64) - want).norm() / (want - base[name].to(F64)).norm()
            assert err < 1e-4, f"{name}: relative error {err:.2e} of the merged ΔW"
            checked += 1
        else:
            torch.testing.assert_close(w, ref_dense[name], rtol=1e-5, atol=1e-6, msg=name)
    assert checked == 2 * 7


def test_registered_method_computes_through_mergekits_state_dict_interface(checkpoints):
    """mergekit's own Python interface (what its test suite calls) gets a tensor, not an error."""
    from mergekit.merge_methods import merge_state_dicts, registry

    ck = checkpoints
    states = [_load(ck["base"])] + [_load(t) for t in ck["tasks"]]
    keys = ["model.layers.0.self_attn.q_proj.weight", "model.norm.weight"]
    states = [{k: s[k] for k in keys} for s in states]
    for method in ("ctm", "core_space", "mtc", "lora_lego"):
        out = merge_state_dicts(states, registry.get(method), base=0, parameters={"rank": 4})
        for k in keys:
            assert out[k].shape == states[0][k].shape and torch.isfinite(out[k]).all(), method
        q = "model.layers.0.self_attn.q_proj.weight"
        s = torch.linalg.svdvals(out[q].double() - states[0][q].double())
        assert (s > 1e-3 * s[0]).sum() <= 4, (method, s[:6])  # the rest: float32 rounding


@pytest.mark.slow
def test_full_checkpoints_through_run_merge_without_config_source(checkpoints, tmp_path):
    """mergekit's Python entry point, with only the parsed configuration: our dispatch sends
    full checkpoints to mergekit's planner, which calls our kernel."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    ck = checkpoints
    recipe = _recipe(ck, "ctm", {"base_rule": "task_arithmetic", "rank": 4, "beta": 0.5})
    run_merge(MergeConfiguration.model_validate(recipe), str(tmp_path / "out"),
              MergeOptions(quiet=True))  # fmt: skip
    out, base = _load(tmp_path / "out"), _load(ck["base"])
    q = "model.layers.1.self_attn.q_proj.weight"
    s = torch.linalg.svdvals(out[q].double() - base[q].double())
    assert (s > 1e-3 * s[0]).sum() <= 4


def _outside(root: Path) -> dict[str, str]:
    """Every file under ``root`` with its sha256 (staging directories included)."""
    from reliability import tree

    return tree(root)


@pytest.mark.parametrize("tool", ["mergekit-yaml", "mergekit-ctm"])
@pytest.mark.parametrize("target", ["base", "task", "recipe-dir"])
def test_full_model_output_never_overwrites_an_input(checkpoints, tmp_path, target, tool):
    """mergekit writes into the output as it goes: without our check `mergekit-yaml r.yml
    base/` overwrote the base's weights with the merge. Refused in one line, nothing read."""
    ck = checkpoints
    write_yaml(tmp_path / "r.yml", _recipe(ck, "ctm", {"base_rule": "ties", "rank": 4}))
    out = {"base": ck["base"], "task": ck["tasks"][1], "recipe-dir": tmp_path}[target]
    before = {p: _outside(p) for p in (ck["base"], *ck["tasks"], tmp_path)}
    sub = ["merge"] if tool == "mergekit-ctm" else []
    res = run_command([*sub, str(tmp_path / "r.yml"), str(out), "--quiet"], tmp_path, tool)
    assert res.code == 2 and not res.traceback, (res.stderr, res.exception)
    assert "overwrit" in res.stderr and res.stderr.count("\n") == 1, res.stderr
    assert {p: _outside(p) for p in before} == before


def test_interrupted_full_model_merge_leaves_nothing(checkpoints, tmp_path, monkeypatch):
    """Ctrl-C in the middle of mergekit's planner: no output directory appears, an existing
    one keeps exactly its files, and no staging directory is left."""
    from mergekit_ctm.integration import full_checkpoints

    ck = checkpoints
    write_yaml(tmp_path / "r.yml", _recipe(ck, "ctm", {"base_rule": "ties", "rank": 4}))
    real, calls = full_checkpoints.full_update, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(full_checkpoints, "full_update", interrupted)
    res = run_command([str(tmp_path / "r.yml"), str(tmp_path / "new"), "--quiet"], tmp_path)
    assert res.code == 130 and len(calls) == 5, (res.stderr, res.exception)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yml"]

    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "notes.txt").write_text("mine")
    (existing / "model.safetensors").write_bytes(b"an older merge")
    before, calls[:] = _outside(existing), []
    res = run_command([str(tmp_path / "r.yml"), str(existing), "--quiet"], tmp_path)
    assert res.code == 130, (res.stderr, res.exception)
    assert _outside(existing) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing", "r.yml"]


@pytest.mark.slow
def test_full_model_card_and_config_reproduce_the_merge(checkpoints, tmp_path):
    """Our card for output: model of full checkpoints (mergekit's asks the Hub about local
    relative paths, a traceback offline): inputs with hashes, versions, seed; its
    mergekit_config.yml redoes the merge byte for byte."""
    from reliability import tree

    ck = checkpoints
    recipe = _recipe(ck, "ctm", {"base_rule": "dare_ties", "rank": 4}, {"weight": 1.0,
                                                                     "density": 0.6})  # fmt: skip
    write_yaml(tmp_path / "r.yml", recipe)
    res = run_command([str(tmp_path / "r.yml"), "out", "--quiet", "--random-seed", "5"], tmp_path)
    assert res.code == 0 and not res.traceback, (res.stderr, res.exception)
    out = tmp_path / "out"
    card = (out / "README.md").read_text()
    assert "merge of 3 full fine-tuned checkpoints" in card and "library_name" not in card
    assert card.count("(sha256 ") == 3 and "Seed: 5." in card
    config = (out / "mergekit_config.yml").read_text()
    assert "\nrandom_seed: 5\n" in config and "\noutput: model\n" in config
    res = run_command([str(out / "mergekit_config.yml"), "again", "--quiet"], tmp_path)
    assert res.code == 0, (res.stderr, res.exception)
    assert tree(tmp_path / "again") == tree(out)


@pytest.mark.slow
def test_full_model_output_is_written_in_small_shards_then_joined(checkpoints, tmp_path,
                                                                  monkeypatch):  # fmt: skip
    """mergekit's writer holds a whole --out-shard-size shard in memory; our full-checkpoint
    output: model has it write MODEL_WRITE_BUFFER-sized shards and joins them afterwards:
    the same tensors as mergekit's own sharding, the requested shard sizes, nothing left."""
    import json

    from mergekit_ctm.plan import stream

    ck = checkpoints
    write_yaml(tmp_path / "r.yml", _recipe(ck, "ctm", {"base_rule": "ties", "rank": 4}))
    monkeypatch.setattr(stream, "MODEL_WRITE_BUFFER", 10_000)
    runs = {"default": [], "big": ["--out-shard-size", "60K"], "small": ["--out-shard-size",
                                                                          "10000"]}  # fmt: skip
    for name, extra in runs.items():
        res = run_command([str(tmp_path / "r.yml"), name, "--quiet", *extra], tmp_path)
        assert res.code == 0 and not res.traceback, (res.stderr, res.exception)
    shards = {n: sorted(p.name for p in (tmp_path / n).glob("*.safetensors")) for n in runs}
    assert shards["default"] == ["model.safetensors"]  # joined: the model is < 5B
    assert 1 < len(shards["big"]) < len(shards["small"])  # joined to 60K, not 10K
    index = json.loads((tmp_path / "big" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards["big"])
    for p in (tmp_path / "big").glob("*.safetensors"):
        assert p.stat().st_size <= 60_000 + 4096  # data <= 60K, plus the header
    want = _load(tmp_path / "small")
    for name in ("default", "big"):
        got = _load(tmp_path / name)
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in want), name
        left = [p.name for p in (tmp_path / name).iterdir() if p.name.startswith(".")]
        assert not left, left
