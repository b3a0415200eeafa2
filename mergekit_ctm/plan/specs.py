"""Method specs of the four adapter-merging methods, as mergekit ``MergeMethodSpec`` objects.

Each method has its own parameters (``rank``, ``beta``, ...) plus the parameters of the
chosen ``base_rule`` (``weight``, ``density``, ...), spelt exactly as mergekit users write them.
The registered spec lists the union of every rule's parameters (for ``mergekit-yaml`` and the
reference docs); :func:`resolution_spec` gives the exact set for one (method, base_rule) pair,
which the recipe layer resolves per module with mergekit's own parameter resolver.
"""

from __future__ import annotations

from dataclasses import replace
from functools import cache
from typing import Annotated, Any, Literal

from mergekit.merge_methods.base import (
    MISSING,
    BasePolicy,
    InputContract,
    MergeMethodSpec,
    ParameterScope,
    ParameterSpec,
)
from pydantic import Field

from mergekit_ctm.engine.rules import rule_names, rule_parameter_specs

METHOD_NAMES: tuple[str, ...] = ("ctm", "core_space", "mtc", "lora_lego")
SPACES: tuple[str, ...] = ("full", "knots", "core")
DEFAULT_BASE_RULE = "task_arithmetic"

PositiveInt = Annotated[int, Field(gt=0)]
Unit = Annotated[float, Field(ge=0.0, le=1.0)]
NonNegative = Annotated[float, Field(ge=0.0)]


def _shared(name: str, value_type: Any, default: Any, description: str) -> ParameterSpec:
    return ParameterSpec(
        name=name,
        value_type=value_type,
        scope=ParameterScope.SHARED,
        default=default,
        description=description,
    )


RANK = _shared("rank", PositiveInt, 16, "target rank r of the merged LoRA")
RANK_OPTIONAL = _shared(
    "rank",
    PositiveInt | None,
    None,
    "target rank r; omit (null) for the lossless Σ r_t core-space result, else truncated SVD "
    "in core space",
)
BETA = _shared(
    "beta",
    Unit,
    0.5,
    "task reweighting of Eq. 4 for subspace learning: 0 = equal norms, 1 = raw norms",
)
HOOI_ITERS = _shared(
    "hooi_iters",
    PositiveInt,
    500,
    "cap on HOOI sweeps (one sweep updates U then V); stops earlier at hooi_tol",
)
HOOI_TOL = _shared(
    "hooi_tol",
    NonNegative,
    1e-10,
    "relative change of the Tucker-2 objective below which HOOI stops",
)
BASE_RULE = _shared(
    "base_rule",
    str,
    DEFAULT_BASE_RULE,
    "merge rule applied to the per-task coordinates (any mergekit rule name, or iso_c, tsv, "
    "pcb, iso_cts, robustmerge); its own parameters go beside it",
)
SPACE = _shared(
    "space",
    Literal["full", "knots", "core"],
    "full",
    "where the rule merges before the final truncated SVD: full ΔW, KnOTS basis, or core space",
)
LAMBDA = _shared("lambda", float, 1.0, "global scale of the merged update, applied after the rule")

OWN_PARAMETERS: dict[str, tuple[ParameterSpec, ...]] = {
    "ctm": (RANK, BETA, HOOI_ITERS, HOOI_TOL, BASE_RULE, LAMBDA),
    "core_space": (RANK_OPTIONAL, BASE_RULE, LAMBDA),
    "mtc": (RANK, BASE_RULE, SPACE, LAMBDA),
    "lora_lego": (RANK, LAMBDA),
}
PRETTY_NAMES = {
    "ctm": "Compress-then-Merge",
    "core_space": "Core Space merging",
    "mtc": "Merge-then-Compress",
    "lora_lego": "LoRA-LEGO",
}
# Only links checked against the papers in shared/papers (001 and 003 carry no arXiv id there).
REFERENCE_URLS: dict[str, str | None] = {
    "ctm": "https://arxiv.org/abs/2606.03723",
    "core_space": None,
    "mtc": "https://arxiv.org/abs/2606.03723",
    "lora_lego": None,
}
SUMMARIES = {
    "ctm": "learn shared U, V (Tucker-2, HOSVD + HOOI on β-reweighted targets), project each "
    "adapter to r×r coordinates, merge them with base_rule, lift back; output rank = rank",
    "core_space": "merge the (Σr_t)×(Σr_t) core matrices with base_rule and lift back; output "
    "rank Σr_t (lossless) or rank (truncated SVD in core space)",
    "mtc": "merge with base_rule in space full | knots | core, then truncated SVD to rank "
    "(PEFT's *_svd combinations are space: full)",
    "lora_lego": "k-means of rank-wise units into rank clusters, rescaled",
}


def takes_base_rule(method: str) -> bool:
    return any(p.name == "base_rule" for p in OWN_PARAMETERS[method])


def own_parameter_names(method: str) -> tuple[str, ...]:
    return tuple(p.name for p in OWN_PARAMETERS[method])


def _as_input_scope(spec: ParameterSpec) -> ParameterSpec:
    # Adapters are never the base: per-adapter values bind to every input.
    if spec.scope == ParameterScope.NON_BASE:
        return replace(spec, scope=ParameterScope.INPUT)
    return spec


@cache
def rule_specs(rule: str) -> tuple[ParameterSpec, ...]:
    """The rule's own parameters, minus those our method owns (``lambda`` is applied once)."""
    own = {"lambda"}
    return tuple(_as_input_scope(p) for p in rule_parameter_specs(rule) if p.name not in own)


@cache
def resolution_spec(method: str, rule: str | None) -> MergeMethodSpec:
    """Exact parameter set of ``method`` with ``base_rule: rule``."""
    params = OWN_PARAMETERS[method]
    if rule is not None and takes_base_rule(method):
        params = params + rule_specs(rule)
    return MergeMethodSpec(name=method, parameters=params, contract=_CONTRACT)


_CONTRACT = InputContract(base=BasePolicy.IGNORED, min_inputs=1)


def _union_rule_specs() -> tuple[ParameterSpec, ...]:
    seen: dict[str, ParameterSpec] = {}
    for rule in rule_names():
        for p in rule_specs(rule):
            if p.name not in seen:
                # The same name may differ in default between rules: document it as optional.
                seen[p.name] = replace(p, default=None if p.default is MISSING else p.default)
    return tuple(seen.values())


def method_spec(method: str) -> MergeMethodSpec:
    """The registered spec: own parameters plus every base rule's parameters."""
    params = OWN_PARAMETERS[method]
    if takes_base_rule(method):
        params = params + _union_rule_specs()
    return MergeMethodSpec(
        name=method,
        parameters=params,
        contract=_CONTRACT,
        pretty_name=PRETTY_NAMES[method],
        reference_url=REFERENCE_URLS[method],
        uses_accelerator=True,
    )


def rules_taking(name: str) -> tuple[str, ...]:
    """Base rules that accept parameter ``name`` (for error messages)."""
    return tuple(r for r in rule_names() if any(p.name == name for p in rule_specs(r)))
