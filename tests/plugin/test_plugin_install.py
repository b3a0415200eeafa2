"""The startup hook: stock mergekit sees our methods without `mergekit_ctm.install()`, imports no
torch at interpreter start, can be disabled, and survives a real `pip install .`."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from conftest import run_cli, write_recipe

REPO = Path(__file__).resolve().parents[2]

PROBE = """
import sys
mods = ("torch", "mergekit", "mergekit_ctm_hook")
print("startup:", *(m in sys.modules for m in mods))
from mergekit.merge_methods import registered_methods
names = {m.spec.name for m in registered_methods()}
print("methods:", all(n in names for n in ("ctm", "core_space", "mtc", "lora_lego")))
import mergekit.merge, mergekit.scripts.run_yaml as ry
print("dispatch:", hasattr(ry.run_merge, "__mergekit_ctm_original__"))
print("module:", __import__("mergekit_ctm").__file__)
"""


def _probe(python: str, cwd: Path, env: dict[str, str] | None = None) -> dict[str, str]:
    res = run_cli(python, "-c", PROBE, env=env, cwd=cwd)
    return dict(line.split(": ", 1) for line in res.stdout.strip().splitlines())


def test_hook_in_this_environment(tmp_path):
    """This venv has the package installed (editable): the .pth hook is live."""
    out = _probe(sys.executable, tmp_path)
    assert out["startup"] == "False False True"
    assert out["methods"] == "True"
    assert out["dispatch"] == "True"


def test_env_var_disables_hook(tmp_path):
    out = _probe(sys.executable, tmp_path, env={"MERGEKIT_CTM_DISABLE": "1"})
    assert out["startup"] == "False False True"  # the module is tiny; install() did nothing
    assert out["methods"] == "False"
    assert out["dispatch"] == "False"


def test_install_registers_after_mergekit_was_imported():
    """With the startup hook off, mergekit_ctm.install() plugs in, also after mergekit loaded;
    importing mergekit_ctm alone (or any of its packages) changes nothing in mergekit."""
    code = (
        "import mergekit.merge, mergekit.merge_methods as mm\n"
        "names = lambda: {m.spec.name for m in mm.registered_methods()}\n"
        "import mergekit_ctm, mergekit_ctm.engine, mergekit_ctm.recipe, mergekit_ctm.plan.run\n"
        "assert 'ctm' not in names()\n"
        "assert not hasattr(mergekit.merge.run_merge, '__mergekit_ctm_original__')\n"
        "mergekit_ctm.install()\n"
        "assert {'ctm', 'core_space', 'mtc', 'lora_lego', 'iso_c'} <= names()\n"
        "assert hasattr(mergekit.merge.run_merge, '__mergekit_ctm_original__')\n"
        "print('ok')"
    )
    res = run_cli(sys.executable, "-c", code, env={"MERGEKIT_CTM_DISABLE": "1"})
    assert res.stdout.strip() == "ok"


PACKAGES = (
    "mergekit_ctm",
    "mergekit_ctm.errors",
    "mergekit_ctm.engine",
    "mergekit_ctm.adapters",
    "mergekit_ctm.recipe",
    "mergekit_ctm.plan",
    "mergekit_ctm.plan.run",
    "mergekit_ctm.integration",
    "mergekit_ctm.integration.registration",
    "mergekit_ctm.integration.dispatch",
    "mergekit_ctm.cli.main",
)


@pytest.mark.slow
@pytest.mark.parametrize("name", PACKAGES)
def test_each_package_imports_alone_without_touching_mergekit(name):
    """A fresh interpreter imports the package on its own (no import cycles), and importing
    registers or wraps nothing in mergekit (the hook or install() does; the CLI installs when
    a command runs)."""
    code = (
        f"import importlib; importlib.import_module({name!r})\n"
        "import mergekit.merge, mergekit.merge_methods as mm\n"
        "print('ctm' in {m.spec.name for m in mm.registered_methods()},\n"
        "      hasattr(mergekit.merge.run_merge, '__mergekit_ctm_original__'))\n"
    )
    res = run_cli(sys.executable, "-c", code, env={"MERGEKIT_CTM_DISABLE": "1"})
    assert res.stdout.strip() == "False False", res.stdout


@pytest.mark.slow
def test_fresh_venv_pip_install_dot(example, tmp_path):
    """`pip install .` (a real wheel) in a fresh venv: the unmodified mergekit-yaml entry point
    merges a ctm recipe. Dependencies come from this venv through a path-only .pth."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = str(venv / "bin" / "python")
    site = subprocess.run(
        [py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    # plain path line: this venv's packages become importable, its .pth files are not run
    Path(site, "_parent_site.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run_cli(
        sys.executable,
        "-m",
        "pip",
        "--python",
        py,
        "install",
        "--quiet",
        "--no-deps",
        "--no-build-isolation",
        str(REPO),
        cwd=tmp_path,
    )
    assert Path(site, "mergekit_ctm.pth").exists()
    out = _probe(py, tmp_path)
    assert out["startup"] == "False False True"
    assert out["methods"] == "True" and out["dispatch"] == "True"
    assert out["module"].startswith(site), out["module"]

    recipe = write_recipe(
        tmp_path / "r.yml", example, "ctm", parameters={"rank": 4}, adapters=[0, 1]
    )
    res = run_cli(
        py,
        "-c",
        "from mergekit.scripts.run_yaml import main; main()",
        str(recipe),
        str(tmp_path / "out"),
        "--quiet",
        cwd=tmp_path,
    )
    assert (tmp_path / "out" / "adapter_model.safetensors").exists(), res.stderr
    assert (tmp_path / "out" / "adapter_config.json").exists()
