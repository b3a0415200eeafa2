"""The output path never loses a file the merge did not write (plan/output.py)."""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from conftest import run_cli, tool, write_recipe
from mergekit.options import MergeOptions
from reliability import tree

from mergekit_ctm.plan import output
from mergekit_ctm.plan.run import run_adapter_merge

OURS = ["README.md", "adapter_config.json", "adapter_model.safetensors", "mergekit_config.yml"]


@pytest.fixture()
def workdir(example, tmp_path) -> Path:
    """A user's project folder: base model, adapters and the recipe, side by side."""
    root = tmp_path / "project"
    shutil.copytree(Path(example["base"]), root / "base")
    for i, a in enumerate(example["adapters"][:2]):
        shutil.copytree(a, root / "adapters" / f"a{i}")
    local = {
        "base": str(root / "base"),
        "adapters": [str(root / "adapters" / "a0"), str(root / "adapters" / "a1")],
    }
    write_recipe(root / "recipe.yml", local, "ctm", parameters={"rank": 4})
    (root / "notes.txt").write_text("my notes")
    return root


@pytest.mark.slow
@pytest.mark.parametrize(
    "out, what",
    [
        (".", "contains the input adapter"),
        ("adapters", "contains the input adapter"),
        ("adapters/a0", "is the input adapter"),
        ("base", "is the base model"),
    ],
)
def test_mergekit_yaml_refuses_inputs_and_their_ancestors(workdir, out, what):
    before = tree(workdir)
    res = run_cli(tool("mergekit-yaml"), "recipe.yml", out, check=False, cwd=workdir)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and what in lines[0] and "Traceback" not in res.stderr, res.stderr
    assert tree(workdir) == before


def test_recipe_inside_the_output_is_refused(workdir, tmp_path):
    out = tmp_path / "merged"
    out.mkdir()
    recipe = out / "recipe.yml"
    shutil.copy(workdir / "recipe.yml", recipe)
    text = recipe.read_text()
    with pytest.raises(output.OutputPathError, match="is the recipe|contains the recipe"):
        run_adapter_merge(
            text, str(out), MergeOptions(quiet=True), config_source=text, recipe_path=str(recipe)
        )
    assert [p.name for p in out.iterdir()] == ["recipe.yml"]


def test_existing_directory_keeps_other_files_and_gets_ours(workdir, tmp_path):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("user file")
    (out / "README.md").write_text("old card")
    text = (workdir / "recipe.yml").read_text()
    result = run_adapter_merge(text, str(out), MergeOptions(quiet=True), config_source=text)
    assert sorted(result["files"]) == OURS
    assert sorted(p.name for p in out.iterdir()) == sorted([*OURS, "keep.txt"])
    assert (out / "keep.txt").read_text() == "user file"
    assert (out / "README.md").read_text() != "old card"
    # nothing left beside or inside: no staging directories, normal permissions
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged", "project"]
    mask = os.umask(0o022)
    os.umask(mask)
    for name in OURS:
        assert (out / name).stat().st_mode & 0o777 == 0o666 & ~mask, name
    assert out.stat().st_mode & 0o777 == 0o777 & ~mask
    # a second run into the same directory gives the same bytes
    first = tree(out)
    run_adapter_merge(text, str(out), MergeOptions(quiet=True), config_source=text)
    assert tree(out) == first


def test_new_directory_appears_whole(workdir, tmp_path):
    out = tmp_path / "new" / "merged"
    text = (workdir / "recipe.yml").read_text()
    run_adapter_merge(text, str(out), MergeOptions(quiet=True), config_source=text)
    assert sorted(p.name for p in out.iterdir()) == OURS
    assert sorted(p.name for p in out.parent.iterdir()) == ["merged"]


def test_failed_merge_into_existing_directory_changes_nothing(workdir, tmp_path, monkeypatch):
    from mergekit_ctm.plan import tasks

    out = tmp_path / "merged"
    text = (workdir / "recipe.yml").read_text()
    run_adapter_merge(text, str(out), MergeOptions(quiet=True), config_source=text)
    (out / "keep.txt").write_text("user file")
    before = tree(out)

    def boom(self, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(tasks.MergeModule, "execute", boom)
    with pytest.raises(KeyboardInterrupt):
        run_adapter_merge(text, str(out), MergeOptions(quiet=True), config_source=text)
    assert tree(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged", "project"]


def _fake_stage(where: Path, name: str, lock: bool) -> Path:
    d = where / name
    d.mkdir()
    (d / "adapter_model-1.safetensors").write_bytes(b"partial")
    if lock:
        (d / output.LOCK_NAME).write_text("")
    return d


def test_stale_staging_directories_are_removed_live_and_foreign_ones_kept(workdir, tmp_path):
    out = tmp_path / "merged"
    out.mkdir()
    dead_inside = _fake_stage(out, output.STAGE_PREFIX + "dead", lock=True)
    dead_beside = _fake_stage(tmp_path, ".merged.tmp-dead", lock=True)
    foreign = _fake_stage(tmp_path, ".merged.tmp-notours", lock=False)
    live = _fake_stage(out, output.STAGE_PREFIX + "live", lock=True)
    fd = os.open(live / output.LOCK_NAME, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        text = (workdir / "recipe.yml").read_text()
        run_adapter_merge(text, str(out), MergeOptions(quiet=True), config_source=text)
    finally:
        os.close(fd)
    assert not dead_inside.exists() and not dead_beside.exists()
    assert foreign.exists() and live.exists()


@pytest.mark.slow
def test_sigkilled_run_leaves_staging_that_the_next_run_removes(workdir, tmp_path):
    out = tmp_path / "merged"
    code = (
        "import os, signal, sys\n"
        "from mergekit_ctm.plan import tasks\n"
        "from mergekit_ctm.plan.run import run_adapter_merge\n"
        "from mergekit.options import MergeOptions\n"
        "def die(self, **kw):\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "tasks.MergeModule.execute = die\n"
        "text = open(sys.argv[1]).read()\n"
        "run_adapter_merge(text, sys.argv[2], MergeOptions(quiet=True), config_source=text)\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", code, str(workdir / "recipe.yml"), str(out)], timeout=300
    )
    assert res.returncode == -9
    left = [p for p in tmp_path.iterdir() if p.name.startswith(".merged.tmp-")]
    assert len(left) == 1 and not out.exists()
    text = (workdir / "recipe.yml").read_text()
    run_adapter_merge(text, str(out), MergeOptions(quiet=True), config_source=text)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged", "project"]


def test_concurrent_runs_to_one_path_do_not_mix_files(workdir, tmp_path):
    """Two different merges race to one existing directory: the result is one of them, whole."""
    texts = [
        (workdir / "recipe.yml").read_text(),
        (workdir / "recipe.yml").read_text().replace("rank: 4", "rank: 2"),
    ]
    refs = []
    for i, text in enumerate(texts):
        ref = tmp_path / f"ref{i}" / "merged"  # same name: the card's title is the dir name
        run_adapter_merge(text, str(ref), MergeOptions(quiet=True), config_source=text)
        refs.append(tree(ref))
    assert refs[0] != refs[1]
    out = tmp_path / "merged"
    out.mkdir()
    errors: list[BaseException] = []

    def go(text: str) -> None:
        try:
            run_adapter_merge(text, str(out), MergeOptions(quiet=True), config_source=text)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=go, args=(t,)) for t in texts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert tree(out) in refs


def test_output_path_that_is_a_file_is_refused(workdir, tmp_path):
    target = tmp_path / "file.txt"
    target.write_text("x")
    text = (workdir / "recipe.yml").read_text()
    with pytest.raises(output.OutputPathError, match="not a directory"):
        run_adapter_merge(text, str(target), MergeOptions(quiet=True), config_source=text)
    assert target.read_text() == "x"


def test_commit_into_existing_directory_waits_for_the_directory_lock(tmp_path):
    """The exclusion the concurrent test relies on: a commit holds off while another holds
    the output directory's lock, then installs all its files."""
    out = tmp_path / "merged"
    out.mkdir()
    st = output.stage(str(out))
    for name in ("a.bin", "b.json"):
        (Path(st.path) / name).write_text(name)
    fd = os.open(out, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    done = threading.Event()
    worker = threading.Thread(target=lambda: (st.commit(), done.set()))
    worker.start()
    try:
        assert not done.wait(0.5)
        assert not (out / "a.bin").exists() and not (out / "b.json").exists()
    finally:
        os.close(fd)
    worker.join(10)
    assert done.is_set()
    assert sorted(p.name for p in out.iterdir()) == ["a.bin", "b.json"]


def test_options_that_cannot_apply_are_named_and_no_copy_tokenizer_is_honoured(
    workdir, tmp_path, caplog
):
    from mergekit_ctm.plan.run import warn_unused_options

    warned = warn_unused_options(
        MergeOptions(lazy_unpickle=True, multi_gpu=True, copy_tokenizer=False), "adapter"
    )
    assert len(warned) == 3
    assert any("--lazy-unpickle" in w for w in warned)
    assert any("--multi-gpu" in w for w in warned)
    assert any("--copy-tokenizer applies to output: model only" in w for w in warned)
    assert warn_unused_options(MergeOptions(), "adapter") == []

    (workdir / "base" / "tokenizer_config.json").write_text("{}")
    text = (workdir / "recipe.yml").read_text() + "output: model\n"
    for copy, out in ((True, tmp_path / "with"), (False, tmp_path / "without")):
        run_adapter_merge(
            text, str(out), MergeOptions(quiet=True, copy_tokenizer=copy), config_source=text
        )
        assert (out / "tokenizer_config.json").exists() == copy
        assert (out / "config.json").exists()


@pytest.mark.parametrize("existing", [False, True], ids=["new", "existing"])
def test_staging_directories_of_live_runs_survive_racing_runs(tmp_path, existing):
    """Many runs start to one output at once: each run's clean_stale must never take the lock
    of another live run's staging directory (its lock file appears already locked) nor
    remove it, for a new output and for an existing one."""
    out = tmp_path / "out"
    if existing:
        out.mkdir()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            for _ in range(40):
                st = output.stage(str(out))
                try:
                    assert os.path.isdir(st.path), "a live staging directory was removed"
                finally:
                    st.discard()
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
