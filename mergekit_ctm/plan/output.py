"""The output directory: stage every file, then install it without losing anything.

Contract (docs/usage.md, "Where the output goes"):

- The output path may not be an input (adapter, base model, recipe) or hold one: refused
  before any work (:func:`check_output_path`).
- A new output directory appears whole or not at all: files are written into a hidden sibling
  ``.<name>.tmp-*`` and the directory is renamed into place.
- In an existing directory only the files this merge writes are replaced, each atomically
  (``os.replace``), under an exclusive lock on the directory, so two runs to one path never
  mix their files; every other file stays, as with stock mergekit.
- Each staging directory holds a lock file locked for the life of the run. The next run to
  the same path removes staging directories whose lock is free (their run died: SIGKILL,
  power loss); it never touches a directory without that lock file.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from mergekit_ctm.errors import InputError

LOG = logging.getLogger(__name__)

LOCK_NAME = ".mergekit-ctm.lock"
STAGE_PREFIX = ".mergekit-ctm.tmp-"

# Files whose presence makes a loader ignore the files we wrote (transformers prefers a
# single-file checkpoint to a sharded one; PEFT prefers safetensors to .bin).
_SHADOWS = {
    "model.safetensors.index.json": ("model.safetensors",),
    "pytorch_model.bin.index.json": ("pytorch_model.bin", "model.safetensors"),
}


class OutputPathError(InputError):
    """The output path cannot be used; nothing was written."""


def _real(path: str) -> str:
    return os.path.realpath(os.path.abspath(os.path.expanduser(path)))


def check_output_path(out_path: str, inputs: Sequence[tuple[str, str]]) -> None:
    """Refuse an output path that is, or contains, an input.

    ``inputs``: (what, path) pairs, e.g. ("adapter models[0]", "/a/b"). Writing there would
    overwrite the input's files (same directory) or mix the merge into a folder that holds
    inputs (an ancestor).
    """
    if os.path.lexists(out_path) and not os.path.isdir(out_path):
        raise OutputPathError(
            f"output path {out_path!r} exists and is not a directory; choose a directory path"
        )
    out = _real(out_path)
    for what, path in inputs:
        if not path:
            continue
        p = _real(path)
        if p == out:
            raise OutputPathError(
                f"output path {out_path!r} is the {what} ({path}); a merge would overwrite it. "
                "Write the merge to a new directory, e.g. merged/"
            )
        if p.startswith(out.rstrip(os.sep) + os.sep):
            raise OutputPathError(
                f"output path {out_path!r} contains the {what} ({path}); write the merge to a "
                "directory of its own, e.g. merged/, so no input can be overwritten"
            )


@dataclass
class Stage:
    """A staging directory holding this run's lock; files written here are installed by
    :meth:`commit` into ``out_path``."""

    path: str
    out_path: str
    inside: bool  # staged inside an existing output directory
    _lock_fd: int

    def commit(self) -> list[str]:
        """Install the staged files; returns their names (relative to the output)."""
        names = sorted(_staged_files(self.path))
        mode = 0o666 & ~_umask()  # writers may create 0600 files; use the usual permissions
        for name in names:
            os.chmod(os.path.join(self.path, name), mode)
        if not self.inside and not os.path.lexists(self.out_path):
            # unlink while still holding the lock: a racing clean_stale that opened it cannot
            # take it, and one that comes later finds no lock file (not ours: untouched)
            os.remove(os.path.join(self.path, LOCK_NAME))
            os.close(self._lock_fd)
            self._lock_fd = -1
            try:
                os.rename(self.path, self.out_path)  # atomic: the whole directory appears
                return names
            except OSError:
                if not os.path.isdir(self.out_path):
                    raise
                # Another run created it meanwhile: install file by file like any existing dir.
                self._lock_fd = _new_lock(self.path)
        with _locked_dir(self.out_path):
            for name in names:
                dst = os.path.join(self.out_path, name)
                os.makedirs(os.path.dirname(dst), exist_ok=True)
                os.replace(os.path.join(self.path, name), dst)
        _warn_shadows(self.out_path, names)
        self.discard()
        return names

    def discard(self) -> None:
        """Remove the staging directory (after a failure, or what is left after commit)."""
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1
        shutil.rmtree(self.path, ignore_errors=True)


def _umask() -> int:
    """The process umask, read without changing it where Linux allows (os.umask is racy)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _staged_files(root: str) -> Iterator[str]:
    for dirpath, _, files in os.walk(root):
        for f in files:
            rel = os.path.relpath(os.path.join(dirpath, f), root)
            if rel != LOCK_NAME:
                yield rel


def _new_lock(directory: str) -> int:
    """Put our lock file into ``directory``, already locked: created under another name,
    locked, then renamed into place, so no other run ever sees it unlocked (clean_stale of a
    run racing to the same output would otherwise take the free lock and remove this
    directory). Returns the open descriptor that holds the lock."""
    tmp = os.path.join(directory, f"{LOCK_NAME}.{os.getpid()}.{threading.get_ident()}")
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a new inode: nobody else holds it
    os.rename(tmp, os.path.join(directory, LOCK_NAME))
    return fd


@contextlib.contextmanager
def _locked_dir(path: str) -> Iterator[None]:
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _warn_shadows(out: str, written: Sequence[str]) -> None:
    for ours, theirs in _SHADOWS.items():
        if ours not in written:
            continue
        for name in theirs:
            if name not in written and os.path.exists(os.path.join(out, name)):
                LOG.warning(
                    "%s: kept %s from an earlier run; transformers loads it instead of the "
                    "merged model just written. Delete it.",
                    out,
                    name,
                )


def _stage_dirs(out_path: str) -> list[str]:
    """Where staging directories for ``out_path`` live: inside it, and beside it."""
    parent = os.path.dirname(_real(out_path))
    base = os.path.basename(_real(out_path))
    found = []
    for where, prefix in ((out_path, STAGE_PREFIX), (parent, f".{base}.tmp-")):
        try:
            entries = os.listdir(where)
        except OSError:
            continue
        found += [os.path.join(where, e) for e in entries if e.startswith(prefix)]
    return found


def clean_stale(out_path: str) -> list[str]:
    """Remove staging directories of dead runs to ``out_path``; returns those removed.

    A directory counts as ours only if it holds our lock file, and as dead only if that lock
    can be taken (a live run holds it; the kernel frees it when the process dies).
    """
    removed = []
    for path in _stage_dirs(out_path):
        lock = os.path.join(path, LOCK_NAME)
        if not os.path.isfile(lock):
            continue
        try:
            fd = os.open(lock, os.O_RDWR)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue  # a live run
        try:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
        finally:
            os.close(fd)
    if removed:
        LOG.info("removed %d staging director(ies) of interrupted runs", len(removed))
    return removed


def stage(out_path: str) -> Stage:
    """A new locked staging directory for ``out_path`` (inside it when it already exists, so
    an existing output needs no write access to its parent)."""
    clean_stale(out_path)
    out = os.path.abspath(out_path)
    inside = os.path.isdir(out)
    if inside:
        path = tempfile.mkdtemp(prefix=STAGE_PREFIX, dir=out)
    else:
        parent = os.path.dirname(out)
        os.makedirs(parent, exist_ok=True)
        path = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp-", dir=parent)
    os.chmod(path, 0o777 & ~_umask())  # mkdtemp makes 0700; the output gets the usual mode
    return Stage(path, out, inside, _new_lock(path))
