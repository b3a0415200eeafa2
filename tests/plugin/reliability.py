"""Shared pieces of the bad-input matrix and the fuzzer: a user's project folder, the stock
commands run in-process through click, and the checks that nothing was lost.

A project holds ``base/``, ``adapters/a0``, ``adapters/a1`` and ``recipe.yml``; every command
runs with the project as working directory, as a user would type it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from click.testing import CliRunner


def tree(root: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under root."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = Path(dirpath) / f
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def good_recipe() -> dict[str, Any]:
    return {
        "merge_method": "ctm",
        "base_model": "base",
        "models": [
            {"model": "adapters/a0", "parameters": {"weight": 1.0, "density": 0.5}},
            {"model": "adapters/a1", "parameters": {"weight": 1.0, "density": 0.5}},
        ],
        "parameters": {"base_rule": "ties", "rank": 4, "beta": 0.5},
    }


def make_project(example: dict[str, Any], root: Path) -> Path:
    """Copy the session's tiny base and two adapters into root; write the good recipe."""
    shutil.copytree(Path(example["base"]), root / "base")
    for i, src in enumerate(example["adapters"][:2]):
        shutil.copytree(src, root / "adapters" / f"a{i}")
    write_yaml(root / "recipe.yml", good_recipe())
    return root


def write_yaml(path: Path, data: Any) -> None:
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def edit_config(adapter: Path, **changes: Any) -> None:
    cfg_path = adapter / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(changes)
    cfg_path.write_text(json.dumps(cfg))


def edit_tensors(adapter: Path, fn: Callable[[dict], None]) -> None:
    from safetensors.torch import load_file, save_file

    path = adapter / "adapter_model.safetensors"
    tensors = load_file(str(path))
    fn(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def header_span(path: Path) -> tuple[int, int]:
    """(start, end) byte offsets of the JSON header of a safetensors file."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
    return 8, 8 + n


@dataclass
class Outcome:
    code: int
    stderr: str
    exception: BaseException | None

    @property
    def traceback(self) -> bool:
        """An exception escaped the command (a bug): anything but a clean exit."""
        return self.exception is not None and not isinstance(self.exception, SystemExit)


def run_command(argv: list[str], cwd: Path, tool: str = "mergekit-yaml") -> Outcome:
    """Run the stock ``mergekit-yaml`` (or ``mergekit-ctm``) command object in-process."""
    if tool == "mergekit-yaml":
        from mergekit.scripts.run_yaml import main
    else:
        from mergekit_ctm.cli.main import main
    runner = CliRunner()
    old = os.getcwd()
    os.chdir(cwd)
    try:
        res = runner.invoke(main, argv, catch_exceptions=True)
    finally:
        os.chdir(old)
    return Outcome(res.exit_code, res.stderr, res.exception)
