"""Merge driver: recipes for every compared method, run through the project's mergekit path.

Backends (``backend=``):

* ``"mergekit-yaml"``: write the recipe YAML and run the stock ``mergekit-yaml recipe.yml out/``
  in a subprocess. The report's numbers come from this path.
* ``"inprocess"``: the same recipe parsed by mergekit (``MergeConfiguration``) and handed to
  ``mergekit.merge.run_merge`` in this process, i.e. the exact code ``mergekit-yaml`` calls, minus
  ~3 s of interpreter start-up per merge. Used for the validation search (hundreds of merges);
  the selected configuration is re-merged with ``mergekit-yaml`` and its test accuracy taken
  from that directory.

PEFT's own ``add_weighted_adapter`` baselines (``svd``, ``ties_svd``) run directly through PEFT.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from itertools import product
from pathlib import Path
from typing import Any

import torch
import yaml

from mergekit_ctm.engine.methods import METHODS

BETAS = (0.0, 0.25, 0.5, 0.75)
CTM_DEFAULTS = METHODS["ctm"].defaults()
DENSITIES = (0.3, 0.6)


@dataclass(frozen=True)
class MethodSpec:
    """One row of the results table.

    family: "ctm" | "core_space" | "mtc" | "lora_lego" | "peft" (PEFT add_weighted_adapter).
    rule: base_rule for mergekit-path methods, combination_type for "peft".
    lossless: core_space without truncation (the upper reference, rank Σ rₜ).
    """

    key: str
    family: str
    rule: str | None = None
    space: str | None = None
    lossless: bool = False

    @property
    def searches_beta(self) -> bool:
        return self.family == "ctm"

    @property
    def searches_density(self) -> bool:
        return self.rule in ("ties", "dare_ties", "robustmerge", "ties_svd")

    def grid(self) -> list[dict[str, Any]]:
        """Discrete hyperparameters searched on validation (λ is searched separately)."""
        betas = BETAS if self.searches_beta else (None,)
        dens = DENSITIES if self.searches_density else (None,)
        out = []
        for b, d in product(betas, dens):
            g: dict[str, Any] = {}
            if b is not None:
                g["beta"] = b
            if d is not None:
                g["density"] = d
            out.append(g)
        return out

    @property
    def lambda_is_scale(self) -> bool:
        """Whether merging with ``lambda: λ`` equals scaling the λ=1 merge by λ.

        True for every method since the engine passes the target rank to flat-spectrum rules
        (before that, Iso-C / Iso-CTS under ``mtc`` / truncated ``core_space`` truncated a flat
        spectrum, so λ also changed the direction, and they were re-merged at every λ).
        """
        return True

    @property
    def label(self) -> str:
        return self.key


RULES = ("task_arithmetic", "ties", "dare_ties", "iso_c")
RULE_LABEL = {"task_arithmetic": "TA", "ties": "TIES", "dare_ties": "DARE-TIES", "iso_c": "Iso-C"}


def all_methods() -> list[MethodSpec]:
    """Every compared method, in table order (as in Table 1 of the paper)."""
    ms: list[MethodSpec] = [
        MethodSpec("lora_lego", "lora_lego"),
        MethodSpec("robustmerge", "mtc", "robustmerge", "full"),
        MethodSpec("iso_cts", "mtc", "iso_cts", "full"),
        MethodSpec("peft/svd", "peft", "svd"),
        MethodSpec("peft/ties_svd", "peft", "ties_svd"),
    ]
    for rule in RULES:
        for space in ("full", "knots", "core"):
            ms.append(MethodSpec(f"mtc-{space}/{rule}", "mtc", rule, space))
        ms.append(MethodSpec(f"core_space/{rule}", "core_space", rule))
        ms.append(MethodSpec(f"ctm/{rule}", "ctm", rule))
        ms.append(MethodSpec(f"core_space-lossless/{rule}", "core_space", rule, lossless=True))
    return ms


def method_by_key(key: str) -> MethodSpec:
    for m in all_methods():
        if m.key == key:
            return m
    raise KeyError(f"unknown method {key!r}; known: {[m.key for m in all_methods()]}")


# --------------------------------------------------------------------------------------------
# recipes
# --------------------------------------------------------------------------------------------


def make_recipe(
    method: MethodSpec,
    adapters: list[Path],
    base_dir: Path,
    *,
    rank: int,
    hp: dict[str, Any],
    lam: float = 1.0,
    hooi_iters: int | None = None,
) -> dict[str, Any]:
    """The mergekit recipe (as a dict) of one merge (docs/usage.md: recipes); unset
    hyperparameters take the method's declared defaults (engine/methods.py)."""
    if method.family == "peft":
        raise ValueError(f"{method.key} runs through PEFT directly, it has no mergekit recipe")
    per_model: dict[str, Any] = {"weight": 1.0}
    if "density" in hp:
        per_model["density"] = float(hp["density"])
    params: dict[str, Any] = {"lambda": float(lam)}
    if method.family != "lora_lego":
        params["base_rule"] = method.rule
    if not method.lossless:
        params["rank"] = int(rank)
    if method.family == "ctm":
        params["beta"] = float(hp.get("beta", CTM_DEFAULTS["beta"]))
        params["hooi_iters"] = int(hooi_iters or CTM_DEFAULTS["hooi_iters"])
    if method.family == "mtc":
        params["space"] = method.space
    if method.rule == "iso_cts":  # the CtM paper's setting: r − T common directions, 1 per task
        params["common_space_fraction"] = max(rank - len(adapters), 0) / rank
    return {
        "merge_method": method.family,
        "base_model": str(base_dir),
        "models": [
            {"model": str(a)}
            if method.family == "lora_lego"  # LoRA-LEGO takes no per-model params
            else {"model": str(a), "parameters": dict(per_model)}
            for a in adapters
        ],
        "parameters": params,
        "dtype": "float32",
        "out_dtype": "float32",
    }


def write_recipe(recipe: dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


class MergeFailed(RuntimeError):
    pass


def run_mergekit_yaml(recipe_path: Path, out_dir: Path, *, seed: int = 0) -> None:
    """``mergekit-yaml recipe.yml out/`` in a subprocess (one thread: the machine is shared)."""
    exe = shutil.which("mergekit-yaml") or str(Path(sys.executable).parent / "mergekit-yaml")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [exe, str(recipe_path), str(out_dir), "--random-seed", str(seed), "--allow-crimes"]
    if out_dir.exists():
        shutil.rmtree(out_dir)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise MergeFailed(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")


def run_inprocess(recipe: dict[str, Any], out_dir: Path, *, seed: int = 0) -> None:
    """What ``mergekit-yaml`` does, without the subprocess: parse, then ``run_merge``."""
    import mergekit.merge as mm
    from mergekit.config import MergeConfiguration
    from mergekit.options import MergeOptions

    import mergekit_ctm

    mergekit_ctm.install()  # the dispatch, as the .pth hook does for the CLI

    cfg = MergeConfiguration.model_validate(recipe)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    opts = MergeOptions(allow_crimes=True, random_seed=seed, quiet=True)
    try:
        mm.run_merge(cfg, str(out_dir), opts)
    except Exception as e:
        raise MergeFailed(f"in-process merge failed: {type(e).__name__}: {e}") from e


def merge(
    recipe: dict[str, Any], out_dir: Path, *, backend: str, seed: int = 0, workdir: Path
) -> Path:
    """Run one recipe with the chosen backend; returns the adapter directory."""
    if backend == "mergekit-yaml":
        path = write_recipe(recipe, workdir / (out_dir.name + ".yml"))
        run_mergekit_yaml(path, out_dir, seed=seed)
    elif backend == "inprocess":
        run_inprocess(recipe, out_dir, seed=seed)
    else:
        raise ValueError(f"unknown backend {backend!r}; use mergekit-yaml | inprocess")
    return out_dir


# --------------------------------------------------------------------------------------------
# PEFT's own add_weighted_adapter baselines
# --------------------------------------------------------------------------------------------


def peft_weighted_adapter(
    base: torch.nn.Module,
    adapters: list[Path],
    combination_type: str,
    *,
    rank: int,
    hp: dict[str, Any],
    lam: float = 1.0,
    out_dir: Path | None = None,
):
    """PeftModel with PEFT's ``add_weighted_adapter(..., combination_type, svd_rank=rank)`` active.

    weights = λ for every task (for ``svd`` and ``ties_svd`` a common weight is a global scale).
    Saves the merged adapter alone to ``out_dir`` when given.
    """
    from peft import PeftModel

    names = [f"t{i}" for i in range(len(adapters))]
    model = PeftModel.from_pretrained(base, str(adapters[0]), adapter_name=names[0])
    for n, a in zip(names[1:], adapters[1:]):
        model.load_adapter(str(a), adapter_name=n)
    kw: dict[str, Any] = {}
    if combination_type in ("ties_svd", "ties", "dare_ties_svd"):
        kw["density"] = float(hp["density"])
    model.add_weighted_adapter(
        names,
        [float(lam)] * len(names),
        "merged",
        combination_type=combination_type,
        svd_rank=rank,
        **kw,
    )
    model.set_adapter("merged")
    for n in names:
        model.delete_adapter(n)
    model.eval()
    if out_dir is not None:
        model.save_pretrained(str(out_dir), selected_adapters=["merged"])
        # PEFT saves non-default adapters in a subfolder named after the adapter
        sub = out_dir / "merged"
        if sub.is_dir():
            for f in sub.iterdir():
                shutil.move(str(f), out_dir / f.name)
            sub.rmdir()
    return model
