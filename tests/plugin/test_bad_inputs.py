"""The bad-input matrix: each case is a user's mistake or a failing environment, run through
the stock command as typed, with its exit code and a fragment of its one-line message.

Every case also checks what must never happen: a traceback, a changed or deleted input, a
file left in the output by a merge that failed, or a staging directory left behind.
Counts are reported in docs/reliability.md.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from reliability import (
    edit_config,
    edit_tensors,
    make_project,
    run_command,
    tree,
    write_yaml,
)


@dataclass
class Case:
    id: str
    setup: Callable[[Path], None] | None  # edits the project (recipe, adapters, ...)
    code: int
    fragments: tuple[str, ...]
    argv: tuple[str, ...] = ("recipe.yml", "out")
    tool: str = "mergekit-yaml"
    fault: Callable[[pytest.MonkeyPatch], None] | None = None
    protect: tuple[str, ...] = ("base", "adapters", "recipe.yml", "notes.txt")
    extra: dict[str, Any] = field(default_factory=dict)


def _edit_recipe(fn: Callable[[dict], None]) -> Callable[[Path], None]:
    def edit(root: Path) -> None:
        r = yaml.safe_load((root / "recipe.yml").read_text())
        fn(r)
        write_yaml(root / "recipe.yml", r)

    return edit


def recipe(**top: Any) -> Callable[[Path], None]:
    def fn(r: dict) -> None:
        for k, v in top.items():
            if v is _DROP:
                r.pop(k, None)
            else:
                r[k] = v

    return _edit_recipe(fn)


def params(**kw: Any) -> Callable[[Path], None]:
    return _edit_recipe(lambda r: r["parameters"].update(kw))


def adapter_params(i: int, **kw: Any) -> Callable[[Path], None]:
    return _edit_recipe(lambda r: r["models"][i]["parameters"].update(kw))


def raw(text: str | bytes) -> Callable[[Path], None]:
    def edit(root: Path) -> None:
        p = root / "recipe.yml"
        p.write_bytes(text if isinstance(text, bytes) else text.encode())

    return edit


def with_config(i: int, **changes: Any) -> Callable[[Path], None]:
    return lambda root: edit_config(root / "adapters" / f"a{i}", **changes)


def with_tensor(i: int, fn: Callable[[dict], None]) -> Callable[[Path], None]:
    return lambda root: edit_tensors(root / "adapters" / f"a{i}", fn)


def first_key(tensors: dict, suffix: str) -> str:
    return sorted(k for k in tensors if k.endswith(suffix))[0]


def poke(suffix: str, value: float) -> Callable[[dict], None]:
    def fn(t: dict) -> None:
        k = first_key(t, suffix)
        t[k] = t[k].clone()
        t[k].view(-1)[0] = value

    return fn


def as_int(suffix: str) -> Callable[[dict], None]:
    def fn(t: dict) -> None:
        k = first_key(t, suffix)
        t[k] = t[k].to(torch.int32)

    return fn


def drop(suffix: str) -> Callable[[dict], None]:
    def fn(t: dict) -> None:
        del t[first_key(t, suffix)]

    return fn


def file_bytes(i: int, name: str, fn: Callable[[bytes], bytes]) -> Callable[[Path], None]:
    def edit(root: Path) -> None:
        p = root / "adapters" / f"a{i}" / name
        p.write_bytes(fn(p.read_bytes()))

    return edit


def garble_header(data: bytes) -> bytes:
    start, end = 8, 8 + int.from_bytes(data[:8], "little")
    return data[:start] + b"{" * (end - start) + data[end:]


def both(*edits: Callable[[Path], None]) -> Callable[[Path], None]:
    def edit(root: Path) -> None:
        for e in edits:
            e(root)

    return edit


def mkdir_out(root: Path) -> None:
    (root / "out").mkdir()
    (root / "out" / "keep.txt").write_text("user file")


def fail_in(target: str, exc: BaseException) -> Callable[[pytest.MonkeyPatch], None]:
    """Make ``module:attr`` raise ``exc`` when called."""
    module, attr = target.split(":")

    def install(mp: pytest.MonkeyPatch) -> None:
        import importlib

        mod = importlib.import_module(module)

        def boom(*a: Any, **k: Any) -> Any:
            raise exc

        mp.setattr(mod, attr, boom)

    return install


def fail_writes(err: int) -> Callable[[pytest.MonkeyPatch], None]:
    """safetensors' writer fails with errno ``err`` (a full disk, a read-only mount)."""

    def install(mp: pytest.MonkeyPatch) -> None:
        import safetensors.torch

        def save_file(tensors: Any, filename: str, metadata: Any = None) -> None:
            with open(filename, "wb") as f:
                f.write(b"\0" * 16)
            raise OSError(err, os.strerror(err), filename)

        mp.setattr(safetensors.torch, "save_file", save_file)

    return install


_DROP = object()

CASES: list[Case] = [
    # ---- recipe files mergekit itself cannot parse
    Case("yaml-syntax", raw("merge_method: ctm\nmodels: [\n"), 2, ("not valid YAML", "line")),
    Case("yaml-tab", raw("merge_method: ctm\n\tmodels: []\n"), 2, ("not valid YAML",)),
    Case("empty-file", raw(""), 2, ("recipe is empty",)),
    Case("only-comment", raw("# nothing\n"), 2, ("recipe is empty",)),
    Case("top-level-list", raw("- ctm\n"), 2, ("must be a YAML mapping", "list")),
    Case("top-level-scalar", raw("ctm\n"), 2, ("must be a YAML mapping", "str")),
    Case("not-utf8", raw(b"\xff\xfe\x00bad"), 2, ("recipe",)),
    Case("python-tag", raw("!!python/object/apply:os.system ['echo hi']\n"), 2, ("YAML",)),
    Case("missing-recipe", None, 2, ("cannot read recipe", "nope.yml"), argv=("nope.yml", "o")),
    Case("method-typo", recipe(merge_method="ctmm"), 2, ("'ctmm'", "did you mean 'ctm'")),
    Case("method-typo-2", recipe(merge_method="core_spac"), 2, ("did you mean 'core_space'",)),
    Case("method-missing", recipe(merge_method=_DROP), 2, ("merge_method",)),
    Case("method-number", recipe(merge_method=3), 2, ("merge_method",)),
    Case("models-empty", recipe(models=[]), 2, ("models", "at least 1")),
    Case("models-missing", recipe(models=_DROP), 2, ("models",)),
    Case("models-scalar", recipe(models="adapters/a0"), 2, ("models",)),
    Case("models-entry-number", recipe(models=[3]), 2, ("models",)),
    Case("slices", recipe(slices=[]), 2, ("slices",)),
    Case("top-key-typo", recipe(paramters={}), 2, ("'paramters'", "did you mean 'parameters'")),
    Case("parameters-list", recipe(parameters=[1, 2]), 2, ("parameters",)),
    # ---- method and rule parameters
    Case("param-typo", params(rnak=3), 2, ("'rnak'", "did you mean 'rank'")),
    Case("rank-zero", params(rank=0), 2, ("'rank'", "greater than 0")),
    Case("rank-negative", params(rank=-4), 2, ("'rank'", "greater than 0")),
    Case("rank-string", params(rank="sixteen"), 2, ("'rank'",)),
    Case("rank-fraction", params(rank=2.5), 2, ("'rank'",)),
    Case("beta-high", params(beta=1.5), 2, ("'beta'", "less than or equal to 1")),
    Case("beta-low", params(beta=-0.1), 2, ("'beta'", "greater than or equal to 0")),
    Case("beta-string", params(beta="half"), 2, ("'beta'",)),
    Case("hooi-iters-zero", params(hooi_iters=0), 2, ("'hooi_iters'",)),
    Case("hooi-tol-negative", params(hooi_tol=-1.0), 2, ("'hooi_tol'",)),
    Case("base-rule-typo", params(base_rule="tiess"), 2, ("did you mean 'ties'",)),
    Case("base-rule-list", params(base_rule=["ties"]), 2, ("base_rule",)),
    Case("space-on-ctm", params(space="full"), 2, ("'space'", "ctm")),
    Case("density-high", adapter_params(1, density=1.5), 2, ("models[1]", "density")),
    Case("density-typo", adapter_params(0, densty=0.3), 2, ("'densty'", "did you mean")),
    Case("rank-per-adapter", adapter_params(0, rank=3), 2, ("models[0]", "recipe-wide")),
    Case(
        "lego-adapter-params",
        recipe(
            merge_method="lora_lego",
            parameters={"rank": 4},
            models=[
                {"model": "adapters/a0", "parameters": {"weight": 1.0}},
                {"model": "adapters/a1"},
            ],
        ),
        2,
        ("lora_lego takes no per-adapter parameters",),
    ),
    Case("filter-beta", params(beta={"value": 7, "filter": "mlp"}), 2, ("'beta'", "mlp")),
    Case("output-typo", recipe(output="adpater"), 2, ("output", "'adapter' or 'model'")),
    Case("dtype-bad", recipe(dtype="float8"), 2, ("dtype",)),
    Case("out-dtype-bad", recipe(out_dtype="int8"), 2, ("out_dtype",)),
    Case("tokenizer-source", recipe(tokenizer_source="union"), 2, ("tokenizer_source",)),
    Case("chat-template", recipe(chat_template="chatml"), 2, ("chat_template",)),
    Case("rule-weight-string", adapter_params(0, weight="heavy"), 2, ("weight",)),
    # ---- inputs that do not exist or are not adapters
    Case(
        "adapter-missing",
        recipe(models=[{"model": "adapters/zz"}, {"model": "adapters/a1"}]),
        2,
        ("models[0]", "adapters/zz", "does not exist"),
    ),
    Case(
        "adapter-is-file",
        recipe(models=[{"model": "recipe.yml"}, {"model": "adapters/a1"}]),
        2,
        ("recipe.yml", "is a file"),
    ),
    Case(
        "adapter-is-base",
        recipe(models=[{"model": "base"}, {"model": "adapters/a1"}]),
        2,
        ("models[0] (base) is a full checkpoint", "models[1] (adapters/a1) is a PEFT adapter"),
    ),
    Case(
        "config-missing",
        lambda r: (r / "adapters/a0/adapter_config.json").unlink(),
        2,
        ("models[0]", "adapter_config.json"),
    ),
    Case(
        "config-not-json", file_bytes(0, "adapter_config.json", lambda b: b[:-5]), 2, ("models[0]",)
    ),
    Case(
        "config-list", file_bytes(0, "adapter_config.json", lambda b: b"[1, 2]"), 2, ("models[0]",)
    ),
    Case("config-dora", with_config(0, use_dora=True), 2, ("DoRA",)),
    Case("config-prefix-tuning", with_config(1, peft_type="PREFIX_TUNING"), 2, ("models[1]",)),
    Case("config-r-disagrees", with_config(0, r=7), 2, ("models[0]",)),
    Case(
        "weights-missing",
        lambda r: (r / "adapters/a1/adapter_model.safetensors").unlink(),
        2,
        ("models[1]",),
    ),
    Case(
        "weights-truncated",
        file_bytes(0, "adapter_model.safetensors", lambda b: b[:-100]),
        2,
        ("models[0]", "truncated"),
    ),
    Case(
        "weights-header-garbage",
        file_bytes(1, "adapter_model.safetensors", garble_header),
        2,
        ("models[1]", "safetensors"),
    ),
    Case(
        "weights-header-huge",
        file_bytes(0, "adapter_model.safetensors", lambda b: (2**40).to_bytes(8, "little") + b[8:]),
        2,
        ("models[0]", "header length"),
    ),
    Case(
        "weights-empty",
        file_bytes(0, "adapter_model.safetensors", lambda b: b""),
        2,
        ("models[0]",),
    ),
    Case("lora-B-missing", with_tensor(0, drop("lora_B.weight")), 2, ("models[0]",)),
    Case(
        "lora-A-rank-off",
        with_tensor(
            1,
            lambda t: t.update(
                {first_key(t, "lora_A.weight"): t[first_key(t, "lora_A.weight")][:1].clone()}
            ),
        ),
        2,
        ("models[1]",),
    ),
    # ---- numbers and values (recipe and tensors)
    Case("lambda-nan", params(**{"lambda": float("nan")}), 2, ("'lambda'", "finite")),
    Case("lambda-inf", params(**{"lambda": float("inf")}), 2, ("'lambda'", "finite")),
    Case("weight-inf", adapter_params(1, weight=float("inf")), 2, ("weight", "finite")),
    Case("rank-true", params(rank=True), 2, ("'rank'", "integer")),
    Case("rank-float", params(rank=16.0), 2, ("'rank'", "write 16")),
    Case("beta-bool", params(beta=False), 2, ("'beta'",)),
    Case(
        "duplicate-key",
        raw("merge_method: ctm\nmerge_method: ctm\nmodels: []\n"),
        2,
        ("given twice", "line 1 and line 2"),
    ),
    Case(
        "density-recipe-level",
        both(
            recipe(models=[{"model": "adapters/a0"}, {"model": "adapters/a1"}]), params(density=1.5)
        ),
        2,
        ("parameters", "density", "[0, 1]"),
    ),
    Case(
        "base-missing", recipe(base_model="/nonexistent/base"), 2, ("base_model", "does not exist")
    ),
    Case(
        "nan-in-lora-B",
        with_tensor(0, poke("lora_B.weight", float("nan"))),
        2,
        ("adapters/a0", "lora_B.weight", "NaN/Inf"),
    ),
    Case(
        "inf-in-lora-A-lego",
        both(
            recipe(
                merge_method="lora_lego",
                parameters={"rank": 4},
                models=[{"model": "adapters/a0"}, {"model": "adapters/a1"}],
            ),
            with_tensor(1, poke("lora_A.weight", float("inf"))),
        ),
        2,
        ("lora_A.weight", "NaN/Inf"),
    ),
    Case("int-tensor", with_tensor(0, as_int("lora_A.weight")), 2, ("models[0]", "I32")),
    Case("lora-alpha-zero", with_config(1, lora_alpha=0), 2, ("lora_alpha is 0",)),
    Case(
        "validate-nan",
        with_tensor(1, poke("lora_B.weight", float("inf"))),
        2,
        ("models[1]", "NaN/Inf"),
        argv=("validate", "recipe.yml"),
        tool="mergekit-ctm",
    ),
    Case(
        "validate-base-missing",
        recipe(base_model="./nope"),
        2,
        ("does not exist",),
        argv=("validate", "recipe.yml"),
        tool="mergekit-ctm",
    ),
    # ---- output paths
    Case("out-is-cwd", None, 2, ("contains the input adapter",), argv=("recipe.yml", ".")),
    Case("out-is-adapter", None, 2, ("is the input adapter",), argv=("recipe.yml", "adapters/a0")),
    Case(
        "out-is-adapters-dir",
        None,
        2,
        ("contains the input adapter",),
        argv=("recipe.yml", "adapters"),
    ),
    Case("out-is-base", None, 2, ("is the base model",), argv=("recipe.yml", "base")),
    Case("out-is-file", None, 2, ("not a directory",), argv=("recipe.yml", "notes.txt")),
    Case(
        "out-holds-recipe",
        lambda r: (
            (r / "sub").mkdir() or (r / "sub" / "r.yml").write_text((r / "recipe.yml").read_text())
        ),
        2,
        ("contains the recipe",),
        argv=("sub/r.yml", "sub"),
    ),
    # ---- faults injected while the merge runs
    Case(
        "fault-writer-exception",
        mkdir_out,
        1,
        ("No space left on device",),
        fault=fail_writes(errno.ENOSPC),
    ),
    Case(
        "fault-read-only",
        mkdir_out,
        1,
        ("Read-only file system", "write the output elsewhere"),
        fault=fail_writes(errno.EROFS),
    ),
    Case(
        "fault-permission",
        None,
        1,
        ("Permission denied", "permissions"),
        fault=fail_in(
            "tempfile:mkdtemp", PermissionError(errno.EACCES, "Permission denied", "out")
        ),
    ),
    Case(
        "fault-interrupt",
        mkdir_out,
        130,
        ("interrupted",),
        fault=fail_in(
            "mergekit_ctm.engine.api:run_ctm_many", KeyboardInterrupt()
        ),  # on a solve worker
    ),
    Case(
        "fault-io-error-reading",
        None,
        1,
        ("Input/output error",),
        fault=fail_in(
            "mergekit_ctm.adapters.loading:_load_raw",
            OSError(errno.EIO, "Input/output error", "adapter_model.safetensors"),
        ),
    ),
    Case(
        "cuda-without-gpu",
        None,
        2,
        ("--cuda", "no CUDA device"),
        argv=("recipe.yml", "out", "--cuda"),
        extra={"no_cuda": True},
    ),
    # ---- mergekit-ctm's own commands
    Case(
        "ctm-merge-out-is-adapter",
        None,
        2,
        ("is the input adapter",),
        argv=("merge", "recipe.yml", "adapters/a1"),
        tool="mergekit-ctm",
    ),
    Case(
        "ctm-validate-method-typo",
        recipe(merge_method="ctmm"),
        2,
        ("did you mean 'ctm'",),
        argv=("validate", "recipe.yml"),
        tool="mergekit-ctm",
    ),
    Case(
        "ctm-inspect-not-adapter",
        None,
        2,
        ("adapter_config.json",),
        argv=("inspect", "base", "--inputs", "adapters/a0"),
        tool="mergekit-ctm",
    ),
    Case(
        "ctm-inspect-other-shapes",
        lambda r: (r / "out").mkdir(),
        2,
        ("ΔW", "pass the adapters this merge was made from"),
        argv=("inspect", "out", "--inputs", "adapters/a0"),
        tool="mergekit-ctm",
        extra={"merged_from_other_base": True},
    ),
]


@pytest.fixture(scope="module")
def other_shaped_adapter(tmp_path_factory) -> Path:
    """A real PEFT adapter of a base with another hidden size (for inspect)."""
    import warnings

    from mergekit_ctm.examples import build_tiny_adapter, build_tiny_base

    root = tmp_path_factory.mktemp("other")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = build_tiny_base(root / "base", hidden=48, layers=2, vocab=64)
        return Path(
            build_tiny_adapter(base, root / "adapter", r=4, alpha=8, target_modules=["q_proj"])
        )


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, example, tmp_path, monkeypatch, other_shaped_adapter):
    if case.extra.get("no_cuda") and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    root = make_project(example, tmp_path / "project")
    (root / "notes.txt").write_text("user notes")
    if case.setup is not None:
        case.setup(root)
    if case.extra.get("merged_from_other_base"):
        import shutil

        shutil.rmtree(root / "out")
        shutil.copytree(other_shaped_adapter, root / "out")
    before = {
        p: tree(root / p) if (root / p).is_dir() else (root / p).read_bytes()
        for p in case.protect
        if (root / p).exists()
    }
    out_before = tree(root / "out") if (root / "out").is_dir() else None
    if case.fault is not None:
        case.fault(monkeypatch)
    res = run_command(list(case.argv), root, case.tool)
    monkeypatch.undo()

    assert not res.traceback, f"{case.id}: traceback: {res.exception!r}"
    assert res.code == case.code, f"{case.id}: exit {res.code}, stderr: {res.stderr}"
    head = f"{case.tool}: error: "
    assert head in res.stderr, f"{case.id}: {res.stderr!r}"
    message = res.stderr[res.stderr.index(head) :].rstrip("\n")
    assert "\n" not in message, f"{case.id}: not one line: {message!r}"
    for frag in case.fragments:
        assert frag in message, f"{case.id}: {frag!r} not in {message!r}"
    after = {
        p: tree(root / p) if (root / p).is_dir() else (root / p).read_bytes()
        for p in case.protect
        if (root / p).exists()
    }
    assert after == before, f"{case.id}: an input changed"
    if not case.extra.get("merged_from_other_base"):
        now = tree(root / "out") if (root / "out").is_dir() else None
        assert now == out_before, f"{case.id}: the output changed"
    leftovers = [p for p in root.rglob("*") if ".tmp-" in p.name]
    assert not leftovers, leftovers


def test_matrix_size():
    assert len(CASES) >= 60 and len({c.id for c in CASES}) == len(CASES)


def test_null_means_omit_through_mergekit_yaml(example, tmp_path):
    """``rank: null`` takes the default (mergekit's own parser refuses null values)."""
    root = make_project(example, tmp_path / "project")
    params(rank=None, beta=None)(root)
    res = run_command(["recipe.yml", "out", "--quiet"], root)
    assert res.code == 0, res.stderr
    assert (root / "out" / "adapter_model.safetensors").exists()
