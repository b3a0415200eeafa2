"""What a merge writes beside its tensors so that others can trust and redo it.

- ``mergekit_config.yml``: the recipe with every method parameter resolved (defaults written
  out) and the seed, as a valid recipe, after a comment header with the versions and each
  input's weights hash (hub inputs: their revision). ``mergekit-yaml out/mergekit_config.yml
  out2/`` on the same inputs reproduces ``out/`` byte for byte.
- ``README.md``: Hub front matter (``base_model`` only when it is a hub id: a local path
  means nothing elsewhere; ``library_name: peft`` for adapters; tags), the method and its
  citation, the inputs, the resolved parameters, versions and seed. It names no output path,
  so the same merge gives the same bytes wherever it is written.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import re
from collections.abc import Sequence
from typing import Any

import yaml
from mergekit.merge_methods.base import MISSING

from mergekit_ctm.engine.methods import METHODS
from mergekit_ctm.recipe import MergePlan
from mergekit_ctm.recipe.params import rule_specs

_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
_SNAPSHOT = re.compile(r"[/\\]snapshots[/\\]([0-9a-f]{40})(?:[/\\]|$)")


def versions() -> dict[str, str]:
    out = {}
    for dist in ("mergekit-ctm", "mergekit", "peft", "torch"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "unknown"
    return out


def is_hub_id(ref: str | None) -> bool:
    return bool(ref) and not os.path.exists(ref) and bool(_HUB_ID.match(ref.split("@")[0]))


def sha256_file(path: str, chunk: int = 1 << 20) -> str:
    """sha256 of a file read into one reused buffer (as Python 3.11's hashlib.file_digest
    does): a fresh 16 MiB bytes object per read kept two of them, 32 MiB, alive at once."""
    h = hashlib.sha256()
    buf = bytearray(chunk)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def input_identity(ref: str, path: str, files: Sequence[str]) -> str:
    """A hub input's revision (commit hash), else the sha256 of its weights file."""
    snap = _SNAPSHOT.search(path)
    if is_hub_id(ref.split("+")[-1]) and snap:
        return f"revision {snap.group(1)}"
    weights = [f for f in files if f.endswith((".safetensors", ".bin"))]
    if not weights:
        return "no weights file"
    return f"sha256 {sha256_file(os.path.join(path, sorted(weights)[0]))}"


def resolved_recipe(plan: MergePlan) -> dict[str, Any]:
    """The recipe as run: the user's keys, the method's and the base rule's parameters with
    defaults written out, the base model and the seed.

    A rule default goes to the recipe-wide level, where mergekit's resolver reaches it only
    when no adapter sets the parameter (adapter > recipe), so it changes no resolved value.
    Defaults of None (computed by the rule, e.g. from the adapter count: ``tsv``'s
    ``fraction``) are left out, so the rule still computes them."""
    recipe = plan.recipe.model_dump(mode="json", exclude_none=True)
    params = dict(recipe.get("parameters") or {})
    specs = [
        *METHODS[plan.method].parameters,
        *(rule_specs(plan.base_rule) if plan.base_rule else ()),
    ]
    for p in specs:
        if p.name not in params and p.default is not None and p.default is not MISSING:
            params[p.name] = p.default
    recipe["parameters"] = params
    if plan.base_model:
        recipe["base_model"] = plan.base_model
    if plan.random_seed is not None:
        recipe["random_seed"] = int(plan.random_seed)
    order = ("merge_method", "base_model", "models", "parameters", "dtype", "out_dtype")
    return {k: recipe[k] for k in order if k in recipe} | {
        k: v for k, v in recipe.items() if k not in order
    }


def base_identity(plan: MergePlan) -> str | None:
    """The base model's revision (commit hash) when the merge read it from the Hugging Face
    cache (output: model with a hub id); None otherwise."""
    snap = _SNAPSHOT.search(plan.base_path or "")
    if is_hub_id(plan.base_model) and snap:
        return f"revision {snap.group(1)}"
    return None


def identities(plan: MergePlan) -> list[str]:
    """Each input adapter's revision or weights hash (reads each weights file once)."""
    return [input_identity(a.ref, a.path, a.files) for a in plan.adapters]


def versions_line() -> str:
    return ", ".join(f"{k} {v}" for k, v in versions().items())


def config_text(plan: MergePlan, ids: Sequence[str]) -> str:
    """mergekit_config.yml: provenance as comments, then the resolved recipe."""
    lines = ["Written by mergekit-ctm.", versions_line()]
    if base := base_identity(plan):
        lines.append(f"base_model {plan.base_model}: {base}")
    lines += [
        f"models[{i}] {a.ref}: {ident}" for i, (a, ident) in enumerate(zip(plan.adapters, ids))
    ]
    head = "".join(f"# {line}\n" for line in lines)
    return head + yaml.safe_dump(resolved_recipe(plan), sort_keys=False)


def card_head(
    base_model: str | None, adapter: bool, method: str, title: str, intro: str
) -> list[str]:
    """The first lines of every card of ours: Hub front matter (``base_model`` only for a hub
    id, without its revision; ``library_name: peft`` for an adapter; tags), the title, the
    intro, the method's citation and the Inputs heading."""
    definition = METHODS[method]
    meta: dict[str, Any] = {}
    if is_hub_id(base_model):
        meta["base_model"] = base_model.split("@")[0]  # the Hub's field takes no revision
    if adapter:
        meta["library_name"] = "peft"
    meta["tags"] = ["mergekit", "merge", "mergekit-ctm", method]
    return [
        "---",
        yaml.safe_dump(meta, sort_keys=False).rstrip(),
        "---",
        title,
        "",
        intro,
        "",
        f"Method: {definition.citation}."
        + (f" <{definition.reference_url}>" if definition.reference_url else ""),
        "",
        "## Inputs",
        "",
    ]


def reproduce_lines(seed: Any, how: str, config_yaml: str) -> list[str]:
    """The card's Reproduce section: versions, the seed, ``how`` to redo the merge, and the
    configuration it ran."""
    return [
        "",
        "## Reproduce",
        "",
        f"Versions: {versions_line()}. Seed: {seed}.",
        "",
        how,
        "",
        "```yaml",
        config_yaml.rstrip(),
        "```",
        "",
    ]


def model_card(
    plan: MergePlan,
    ids: Sequence[str],
    ranks: dict[str, int] | None = None,
    zero: Sequence[str] = (),
) -> str:
    """README.md with Hub front matter; ``ids``: :func:`identities`; ``zero``: modules whose
    merged update is zero (left out of the adapter)."""
    rule = f" with base rule `{plan.base_rule}`" if plan.base_rule else ""
    what = "LoRA adapter" if plan.output == "adapter" else "model (base model + merged LoRA update)"
    base = plan.base_model or "the adapters' base model"
    lines = card_head(
        plan.base_model,
        plan.output == "adapter",
        plan.method,
        f"# {METHODS[plan.method].pretty_name} merge of {len(plan.adapters)} LoRA adapters",
        f"This {what} for `{base}` was merged with mergekit-ctm (a "
        "[mergekit](https://github.com/arcee-ai/mergekit) plugin) using the "
        f"`{plan.method}` method{rule}.",
    )
    if base_rev := base_identity(plan):
        lines.append(f"- base model `{plan.base_model}` ({base_rev})")
    for info, ident in zip(plan.adapters, ids):
        rs = sorted({m.r for m in info.modules.values()})
        lines.append(
            f"- `{info.ref}` (rank {', '.join(map(str, rs))}, {len(info.modules)} modules; {ident})"
        )
    if ranks:
        out = sorted(set(ranks.values()))
        lines += ["", f"Output rank: {', '.join(map(str, out))} over {len(ranks)} modules."]
    if zero:
        lines += [
            "",
            f"Left out, their merged update is zero (every input's is, or they cancel): "
            f"{', '.join(f'`{m}`' for m in zero)}.",
        ]
    seed = "none (`--random-seed` not given)" if plan.random_seed is None else plan.random_seed
    lines += reproduce_lines(
        seed,
        "With the same inputs: `mergekit-yaml mergekit_config.yml out/`. The configuration, "
        "every parameter resolved:",
        yaml.safe_dump(resolved_recipe(plan), sort_keys=False),
    )
    return "\n".join(lines)
