"""Property-based fuzzing of recipes and adapter files through the stock ``mergekit-yaml``.

Whatever the input, the outcome is a clean error (exit 2 or 1, one line) or a valid merge
(exit 0, the output's files complete): never a traceback, never a changed or deleted input.
Derandomized, so CI runs the same examples every time; counts in docs/reliability.md.
"""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reliability import good_recipe, header_span, make_project, run_command, tree, write_yaml

OURS = {"README.md", "adapter_config.json", "adapter_model.safetensors", "mergekit_config.yml"}
OUTCOMES: Counter = Counter()

FUZZ = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 40),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, 0.5, 1.0, 1.5, -0.1, 1e-12, 1e300]),
    st.text(max_size=8),
    st.sampled_from(["ties", "dare_ties", "iso_c", "tsv", "linear", "full", "core", "ctm"]),
)
values = st.one_of(
    scalars,
    st.lists(scalars, max_size=3),
    st.fixed_dictionaries({"value": scalars, "filter": st.sampled_from(["mlp", "self_attn"])}),
)
param_names = st.sampled_from(
    [
        "rank",
        "beta",
        "lambda",
        "hooi_iters",
        "hooi_tol",
        "base_rule",
        "space",
        "density",
        "weight",
        "epsilon",
        "normalize",
        "int8_mask",
        "rnak",
        "select_topk",
    ]
)
model_refs = st.sampled_from(
    ["adapters/a0", "adapters/a1", "adapters/zz", "base", "recipe.yml", "base+adapters/a0", ""]
)


@st.composite
def plausible_recipes(draw: Any) -> dict[str, Any]:
    """Recipes a user might write: our methods, values in range; most of them merge."""
    r = good_recipe()
    method = r["merge_method"] = draw(st.sampled_from(["ctm", "core_space", "mtc", "lora_lego"]))
    p = r["parameters"] = {
        "base_rule": draw(st.sampled_from(["ties", "dare_ties", "task_arithmetic", "iso_c"])),
        "rank": draw(st.integers(1, 12)),
        "lambda": draw(st.floats(0.1, 2)),
    }
    if method == "ctm":
        p["beta"] = draw(st.floats(0, 1))
    if method == "mtc":
        p["space"] = draw(st.sampled_from(["full", "knots", "core"]))
    if method == "lora_lego":
        r["parameters"] = {"rank": p["rank"]}
        r["models"] = [{"model": m["model"]} for m in r["models"]]
    else:
        for m in r["models"]:
            m["parameters"] = {
                "weight": draw(st.floats(0.1, 2)),
                "density": draw(st.floats(0.1, 1)),
            }
    r["models"] = r["models"][: draw(st.integers(1, 2))]
    r["dtype"] = draw(st.sampled_from(["float32", "float64", "bfloat16"]))
    return r


@st.composite
def junk_recipes(draw: Any) -> dict[str, Any]:
    """Anything goes: typos, wrong types, NaN, unknown keys, missing and foreign inputs."""
    r = good_recipe()
    r["merge_method"] = draw(
        st.sampled_from(["ctm", "core_space", "mtc", "lora_lego", "ctmm", "linear", "ties"])
    )
    if draw(st.booleans()):
        r["parameters"] = draw(st.dictionaries(param_names, values, max_size=5))
    if draw(st.booleans()):
        r["models"] = [
            {"model": m, **({"parameters": p} if p else {})}
            for m, p in draw(
                st.lists(
                    st.tuples(model_refs, st.dictionaries(param_names, values, max_size=2)),
                    max_size=3,
                )
            )
        ]
    if r["merge_method"] in ("linear", "ties") and not any(
        isinstance(m, dict) and m.get("model") in ("adapters/a0", "adapters/a1")
        for m in r["models"]
    ):
        # Stock methods over full models are mergekit's business; over adapters, ours.
        r["models"].append({"model": "adapters/a0"})
    for key in draw(st.lists(st.sampled_from(["dtype", "out_dtype", "output", "extra"]))):
        r[key] = draw(st.sampled_from(["float32", "bfloat16", "int8", "adapter", "model", 3]))
    return r


def _check(root: Path, res: Any, before: dict[str, str], kind: str) -> None:
    assert not res.traceback, f"traceback: {res.exception!r}\n{res.stderr}"
    assert res.code in (0, 1, 2), (res.code, res.stderr)
    assert {k: v for k, v in tree(root).items() if not k.startswith("out/")} == before
    assert not [p for p in root.rglob("*") if ".tmp-" in p.name]
    out = root / "out"
    if res.code == 0:
        assert OURS <= {p.name for p in out.iterdir()}
    else:
        assert not out.exists(), "a failed merge left output"
        message = res.stderr[res.stderr.index("error: ") :].splitlines()[0]
        assert message.strip(), res.stderr
    OUTCOMES[(kind, res.code)] += 1


@pytest.fixture(scope="module")
def pristine(example, tmp_path_factory) -> Path:
    return make_project(example, tmp_path_factory.mktemp("fuzz") / "project")


def _fresh(pristine: Path, tmp_path: Path, n: int) -> Path:
    root = tmp_path / f"p{n}"
    shutil.copytree(pristine, root)
    return root


@pytest.mark.slow
@FUZZ
@given(recipe=st.one_of(plausible_recipes(), junk_recipes()))
def test_fuzzed_recipes(recipe, pristine, tmp_path_factory):
    root = _fresh(pristine, tmp_path_factory.mktemp("r"), 0)
    write_yaml(root / "recipe.yml", recipe)
    before = tree(root)
    res = run_command(["recipe.yml", "out"], root)
    _check(root, res, before, "recipe")


@pytest.mark.slow
@FUZZ
@given(data=st.data(), target=st.sampled_from(["recipe", "config", "header"]))
def test_fuzzed_bytes(data, target, pristine, tmp_path_factory):
    """Random byte flips in the recipe text, adapter_config.json or a safetensors header."""
    root = _fresh(pristine, tmp_path_factory.mktemp("b"), 0)
    if target == "recipe":
        path, span = root / "recipe.yml", None
    elif target == "config":
        path, span = root / "adapters" / "a0" / "adapter_config.json", None
    else:
        path = root / "adapters" / "a1" / "adapter_model.safetensors"
        span = header_span(path)
    raw = bytearray(path.read_bytes())
    lo, hi = span or (0, len(raw))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(lo, hi - 1))
        raw[i] = data.draw(st.integers(0, 255))
    path.write_bytes(bytes(raw))
    before = tree(root)
    res = run_command(["recipe.yml", "out"], root)
    _check(root, res, before, target)


def test_fuzz_outcomes_reported(capsys):
    """Print the outcome counts (docs/reliability.md quotes them); runs after the fuzzers."""
    if OUTCOMES:
        with capsys.disabled():
            print(
                "\nfuzz outcomes (input kind, exit code): "
                + ", ".join(f"{k[0]}/{k[1]}: {v}" for k, v in sorted(OUTCOMES.items()))
            )
    assert all(code in (0, 1, 2) for _, code in OUTCOMES)
