"""Smoke version of the merge-quality benchmark (bench/quality): 2 tasks, tiny model, seconds.

Runs the same code path as the full benchmark: bundled scikit-learn data, a self-pretrained
LlamaForCausalLM, real PEFT LoRAs, recipes merged through mergekit's run_merge (the plugin's
dispatch), the λ search on validation and the test evaluation with each task's own head.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.quality import merge as mg  # noqa: E402
from bench.quality.evaluate import Evaluator, energy_retention, read_deltas  # noqa: E402
from bench.quality.search import MethodRunner, mean_norm  # noqa: E402
from bench.quality.suite import build, smoke_config  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    cfg = smoke_config()
    root = tmp_path_factory.mktemp("quality")
    suite = build(cfg, cache_root=root / "cache", log=lambda *_: None)
    ev = Evaluator(suite)
    lora_val = {t: ev.accuracies(suite.adapter_dir(0, t), "val")[0][t] for t in ev.names}
    lora_test = {t: ev.accuracies(suite.adapter_dir(0, t), "test")[0][t] for t in ev.names}
    return suite, ev, lora_val, lora_test, root


def _runner(smoke, backend="inprocess", final="inprocess"):
    suite, ev, lora_val, lora_test, root = smoke
    return MethodRunner(
        ev,
        0,
        root / "work",
        search_backend=backend,
        final_backend=final,
        lora_val=lora_val,
        lora_test=lora_test,
        hooi_iters=50,
        log=lambda *_: None,
    )


def test_suite_is_real_and_learns(smoke):
    suite, ev, lora_val, lora_test, _ = smoke
    assert list(suite.tasks) == ["digits", "invert"]
    # 10-way tasks: chance is 0.1; the LoRAs and even the linear probes must be far above it
    base = ev.model_accuracies(ev.fresh_base(), "test")
    for t in ev.names:
        assert lora_test[t] > 0.3, (t, lora_test[t])
        assert base[t] > 0.2, (t, base[t])
    # a LoRA changes its own task's predictions (the adapter is not a no-op)
    assert any(abs(lora_test[t] - base[t]) > 0.01 for t in ev.names)
    # the cache is reused: building again trains nothing
    again = build(suite.cfg, cache_root=suite.root.parent, log=lambda *_: None)
    assert again.root == suite.root


def test_ctm_ties_search_and_lambda_folding(smoke):
    suite, ev, lora_val, lora_test, _ = smoke
    m = mg.method_by_key("ctm/ties")
    res = _runner(smoke).run(m, rank=4, grid=[{"beta": 0.5, "density": 0.7}])
    assert not res.error, res.error
    # λ searched by scaling the λ=1 adapter == λ folded into the recipe (lambda applied once)
    assert res.val_at_final == pytest.approx(res.val_norm, abs=1e-9)
    assert 0.6 < res.test_avg < 1.4, res.test_avg
    # the search picked the best validation score among everything it tried
    assert res.val_norm == max(tr["val"] for tr in res.trace)
    # merging with λ = 0 gives the base model exactly
    model = ev.load(res.adapter_dir)
    zero = ev.peft_accuracies(model, "test", [0.0])[0]
    assert zero == ev.model_accuracies(ev.fresh_base(), "test")


def test_mtc_and_peft_baselines_run(smoke):
    suite, ev, *_ = smoke
    r = _runner(smoke)
    mtc = r.run(mg.method_by_key("mtc-full/ties"), rank=4, grid=[{"density": 0.7}])
    peft_svd = r.run(mg.method_by_key("peft/svd"), rank=4)
    for res in (mtc, peft_svd):
        assert not res.error, res.error
        assert np.isfinite(res.test_avg) and res.test_avg > 0.5


def test_iso_c_lambda_search_reproduces_in_the_final_merge(smoke):
    """Iso-C under MtC: λ scales the merge (engine fix), so the λ found by scaling one merge
    is reproduced by the final mergekit-yaml merge made with ``lambda: λ`` in the recipe."""
    m = mg.method_by_key("mtc-full/iso_c")
    assert m.lambda_is_scale
    res = _runner(smoke).run(m, rank=4)
    assert not res.error, res.error
    assert res.val_at_final == pytest.approx(res.val_norm, abs=1e-6)


def _rho_reference(merged: dict, tasks: dict) -> dict[str, float]:
    """ρ̄(t) from Appendix D.1, written out in float64 numpy."""
    out = {t: [] for t in tasks}
    for mod, dw in merged.items():
        w = dw.numpy().astype(np.float64)
        u, s, vt = np.linalg.svd(w, full_matrices=False)
        k = int((s > 1e-9 * s[0]).sum())
        U, V = u[:, :k], vt[:k].T
        for t, d in tasks.items():
            x = d[mod].numpy().astype(np.float64)
            out[t].append(np.linalg.norm(U @ U.T @ x @ V @ V.T) / np.linalg.norm(x))
    return {t: float(np.mean(v)) for t, v in out.items()}


def test_energy_retention(smoke):
    suite, ev, *_ = smoke
    r = _runner(smoke)
    tasks = {t: read_deltas(suite.adapter_dir(0, t)) for t in ev.names}
    lossless = r.run(mg.method_by_key("core_space-lossless/task_arithmetic"), rank=4)
    ctm = r.run(mg.method_by_key("ctm/task_arithmetic"), rank=2, grid=[{"beta": 0.0}])
    rho_l = energy_retention(read_deltas(lossless.adapter_dir), tasks)
    rho_c = energy_retention(read_deltas(ctm.adapter_dir), tasks)
    # the lossless merge spans every task update: nothing is lost
    for t in ev.names:
        assert rho_l[t] == pytest.approx(1.0, abs=1e-6)
    # rank 2 of two rank-4 LoRAs cannot keep everything
    assert all(0.0 < v < 0.999 for v in rho_c.values()), rho_c
    ref = _rho_reference(read_deltas(ctm.adapter_dir), tasks)
    for t in ev.names:
        assert rho_c[t] == pytest.approx(ref[t], rel=1e-9)


def test_normalized_accuracy():
    assert mean_norm({"a": 0.5, "b": 0.9}, {"a": 1.0, "b": 0.9}) == pytest.approx(0.75)


@pytest.mark.slow
def test_final_adapter_through_mergekit_yaml(smoke):
    """The report's path: the selected recipe re-merged by the stock ``mergekit-yaml`` CLI."""
    suite, ev, *_ = smoke
    res = _runner(smoke, final="mergekit-yaml").run(
        mg.method_by_key("ctm/ties"), rank=4, grid=[{"beta": 0.5, "density": 0.7}]
    )
    assert not res.error, res.error
    assert (Path(res.adapter_dir) / "adapter_config.json").exists()
    assert res.val_at_final == pytest.approx(res.val_norm, abs=1e-9)


# --------------------------------------------------------------------------------------------
# full fine-tunes (bench/quality/full.py): the same suite, q/k/v/o trained fully
# --------------------------------------------------------------------------------------------


# at the smoke tasks' LoRA lr a full fine-tune of the 32-wide smoke model overshoots
SMOKE_LR_FACTOR = 0.1


@pytest.fixture(scope="module")
def full_smoke(smoke):
    from bench.quality.full import FullEvaluator, build_full, full_dir

    suite, _, _, _, root = smoke
    build_full(suite, [0], SMOKE_LR_FACTOR, log=lambda *_: None)
    ev = FullEvaluator(suite)
    dirs = [full_dir(suite, 0, SMOKE_LR_FACTOR, t) for t in ev.names]
    val = {t: ev.accuracies(d, "val")[0][t] for t, d in zip(ev.names, dirs)}
    test = {t: ev.accuracies(d, "test")[0][t] for t, d in zip(ev.names, dirs)}
    return suite, ev, dirs, val, test, root


def _full_runner(full_smoke, final="inprocess"):
    from bench.quality.full import FullRunner

    suite, ev, dirs, val, test, root = full_smoke
    return FullRunner(
        ev, 0, root / "work_full", dirs, search_backend="inprocess", final_backend=final,
        lora_val=val, lora_test=test, hooi_iters=50, log=lambda *_: None,
    )  # fmt: skip


def _weights(d: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(d).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.mark.slow
def test_full_finetunes_train_only_qkvo(full_smoke):
    from bench.quality.suite import TARGET_MODULES

    suite, ev, dirs, val, test, _ = full_smoke
    base = _weights(suite.base_dir)
    base_acc = ev.model_accuracies(ev.fresh_base(), "test")
    for t, d in zip(ev.names, dirs):
        w = _weights(d)  # save_pretrained wrote safetensors
        assert w.keys() == base.keys()
        moved = {k for k in w if not torch.equal(w[k], base[k])}
        expect = {k for k in base if k.split(".")[-2] in TARGET_MODULES}
        assert moved == expect, (t, sorted(moved ^ expect))
        assert test[t] > base_acc[t] - 0.02, (t, test[t], base_acc[t])
    # the fine-tunes learn something (the smoke model is tiny and trains 3 epochs)
    assert any(test[t] > base_acc[t] + 0.02 for t in ev.names), (test, base_acc)
    # λ = 0 is the base model, λ = 1 the checkpoint itself
    m = ev.load(dirs[0])
    at0, at1 = ev.peft_accuracies(m, "test", [0.0, 1.0])
    assert at0 == base_acc
    assert at1 == ev.model_accuracies(ev.load(dirs[0]), "test")


def _svd_trunc(x: np.ndarray, k: int) -> np.ndarray:
    u, s, vt = np.linalg.svd(x, full_matrices=False)
    return (u[:, :k] * s[:k]) @ vt[:k]


@pytest.mark.slow
def test_full_mtc_ta_matches_float64_reference(full_smoke):
    """mtc (full space, TA) on real fine-tunes: W = W_base + λ·SVD_r(Σₜ SVD_k(ΔWₜ)), written
    out in float64 numpy; mergekit's own task_arithmetic: W_base + λ·Σₜ ΔWₜ."""
    from bench.quality.full import full_method, full_recipe
    from bench.quality.merge import run_inprocess

    suite, ev, dirs, *_, root = full_smoke
    base = _weights(suite.base_dir)
    tasks = [_weights(d) for d in dirs]
    lam, r, k = 0.7, 3, 5
    for key in ("mtc-full/task_arithmetic@tr5", "mergekit/task_arithmetic"):
        rec = full_recipe(full_method(key), dirs, suite.base_dir, rank=r, hp={}, lam=lam)
        out = root / "ref" / key.replace("/", "_")
        run_inprocess(rec, out, seed=0)
        merged = _weights(out)
        n_low = 0
        for name, w0 in base.items():
            b = w0.double().numpy()
            ds = [t[name].double().numpy() - b for t in tasks]
            if not any(np.any(d) for d in ds):
                assert torch.equal(merged[name], w0), name
                continue
            if key.startswith("mtc"):
                ref = b + lam * _svd_trunc(sum(_svd_trunc(d, k) for d in ds), r)
                n_low += 1
            else:
                ref = b + lam * sum(ds)
            got = merged[name].double().numpy()
            err = np.linalg.norm(got - ref) / np.linalg.norm(ref - b)
            assert err < 1e-4, (key, name, err)
        if key.startswith("mtc"):
            assert n_low == 4 * suite.cfg.layers


@pytest.mark.slow
def test_full_search_ctm_and_mergekit_ties(full_smoke):
    r = _full_runner(full_smoke, final="mergekit-yaml")
    from bench.quality.full import full_method

    ctm = r.run(full_method("ctm/ties"), rank=4, grid=[{"beta": 0.5, "density": 0.6}])
    dense = r.run(full_method("mergekit/ties"), rank=4, grid=[{"density": 0.6}])
    for res in (ctm, dense):
        assert not res.error, res.error
        # λ found by scaling the λ = 1 merge == λ folded into the recipe, via mergekit-yaml
        assert res.val_at_final == pytest.approx(res.val_norm, abs=1e-9)
        assert res.val_norm == max(tr["val"] for tr in res.trace)
        assert 0.5 < res.test_avg < 1.5
    # CtM at rank 4: every merged 2-D update has rank <= 4 (σ₅ at float32 rounding of W_base);
    # mergekit's dense ties does not
    base = _weights(full_smoke[0].base_dir)
    for res, low in ((ctm, True), (dense, False)):
        w = _weights(res.adapter_dir)
        tails = []
        for k in base:
            if base[k].ndim == 2 and not torch.equal(w[k], base[k]):
                sv = torch.linalg.svdvals(w[k].double() - base[k].double())
                floor = 1e-6 * float(base[k].abs().max()) * max(base[k].shape)
                tails.append(float(sv[4]) / max(float(sv[0]), floor))
        assert tails, res.adapter_dir
        assert (max(tails) < 1e-2) if low else (min(tails) > 1e-2), tails
