"""One description per merge method: name, summary, citation, parameters, engine function.

Everything that needs to know a method reads it from here: recipe validation, mergekit
registration, ``docs/reference.md``, ``merge_lora``'s defaults and the benchmarks. A parameter
is declared once, as a mergekit ``ParameterSpec`` (type with pydantic constraints, default,
description), and reaches the engine under its declared name (``lambda`` included).

Base-rule parameters (``weight``, ``density``, ...) are the rule's own (``engine.rules``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from mergekit.merge_methods.base import MISSING, ParameterScope, ParameterSpec
from pydantic import Field, ValidationError

from mergekit_ctm.engine import pipelines
from mergekit_ctm.engine.lego import lora_lego
from mergekit_ctm.engine.types import MergedLora

PositiveInt = Annotated[int, Field(gt=0)]
Unit = Annotated[float, Field(ge=0.0, le=1.0)]
NonNegative = Annotated[float, Field(ge=0.0)]

DEFAULT_BASE_RULE = "task_arithmetic"
SPACES = ("full", "knots", "core")


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
LEGO_ITERS = _shared("lego_iters", PositiveInt, 100, "cap on k-means iterations")
TASK_RANK = _shared(
    "task_rank",
    PositiveInt | None,
    None,
    "full checkpoints only: rank of each task vector's truncated SVD before the merge "
    "(default: rank)",
)
# Parameters that only full-checkpoint merges take (integration/full_checkpoints.py).
CHECKPOINT_PARAMETERS = (TASK_RANK,)

Runner = Callable[..., MergedLora]


@dataclass(frozen=True)
class MergeMethodDef:
    """A merge method: what it is, its parameters, and the engine function that runs it.

    ``run(As, Bs, scalings, params, *, rule_params, seed, dtype)``: ``params`` holds every
    declared parameter by its declared name, defaults filled in (:meth:`bind`).
    """

    name: str
    pretty_name: str
    summary: str
    citation: str
    reference_url: str | None
    parameters: tuple[ParameterSpec, ...]
    run: Runner

    @property
    def takes_base_rule(self) -> bool:
        return any(p.name == "base_rule" for p in self.parameters)

    @property
    def parameter_names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.parameters)

    def defaults(self) -> dict[str, Any]:
        return {p.name: p.default for p in self.parameters if p.default is not MISSING}

    def bind(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """Validate ``params`` against the declared specs; defaults fill the rest.

        Raises ValueError naming the parameter (unknown names, types, constraints)."""
        specs = {p.name: p for p in self.parameters}
        unknown = sorted(set(params) - set(specs))
        if unknown:
            raise ValueError(
                f"unknown parameter(s) {', '.join(map(repr, unknown))} for method "
                f"{self.name!r}; valid: {', '.join(specs)}"
            )
        out = self.defaults()
        for name, value in params.items():
            try:
                out[name] = specs[name].validate(value)
            except ValidationError as err:
                msg = err.errors()[0].get("msg", str(err))
                raise ValueError(f"{name} of method {self.name!r}: {msg} (got {value!r})") from None
        return out


def _run_ctm(As, Bs, scalings, p, *, rule_params, seed, dtype) -> MergedLora:
    return run_ctm_many([(As, Bs, scalings)], [seed], p, rule_params=rule_params, dtype=dtype)[0]


def run_ctm_many(
    modules: Sequence[tuple], seeds: Sequence[int | None], p: Mapping[str, Any], *, rule_params,
    dtype
) -> list[MergedLora]:  # fmt: skip
    """``ctm`` on many modules at once (core problems of equal shape solved as one batch)."""
    return pipelines.ctm_many(
        modules,
        seeds,
        rank=p["rank"],
        beta=p["beta"],
        base_rule=p["base_rule"],
        rule_params=rule_params,
        hooi_iters=p["hooi_iters"],
        hooi_tol=p["hooi_tol"],
        lam=p["lambda"],
        dtype=dtype,
    )


def _run_core_space(As, Bs, scalings, p, *, rule_params, seed, dtype) -> MergedLora:
    return pipelines.core_space(
        As, Bs, scalings, rank=p["rank"], base_rule=p["base_rule"], rule_params=rule_params,
        lam=p["lambda"], seed=seed, dtype=dtype,
    )  # fmt: skip


def _run_mtc(As, Bs, scalings, p, *, rule_params, seed, dtype) -> MergedLora:
    return pipelines.mtc(
        As, Bs, scalings, rank=p["rank"], space=p["space"], base_rule=p["base_rule"],
        rule_params=rule_params, lam=p["lambda"], seed=seed, dtype=dtype,
    )  # fmt: skip


def _run_lora_lego(As, Bs, scalings, p, *, rule_params, seed, dtype) -> MergedLora:
    B_f, A_f, info = lora_lego(
        As, Bs, scalings, rank=p["rank"], seed=seed, dtype=dtype, iters=p["lego_iters"]
    )
    return pipelines._factored_lift(B_f, A_f, p["rank"], p["lambda"], dtype, info)


CTM_PAPER = (
    "He et al., Compress then Merge: From Multiple LoRAs into One Low-Rank Adapter, "
    "arXiv:2606.03723 (2026)"
)

METHODS: dict[str, MergeMethodDef] = {
    m.name: m
    for m in (
        MergeMethodDef(
            name="ctm",
            pretty_name="Compress-then-Merge",
            summary="learn shared U, V (Tucker-2, HOSVD + HOOI on β-reweighted targets), "
            "project each adapter to r×r coordinates, merge them with base_rule, lift back; "
            "output rank = rank",
            citation=CTM_PAPER,
            reference_url="https://arxiv.org/abs/2606.03723",
            parameters=(RANK, BETA, HOOI_ITERS, HOOI_TOL, BASE_RULE, LAMBDA),
            run=_run_ctm,
        ),
        MergeMethodDef(
            name="core_space",
            pretty_name="Core Space merging",
            summary="merge the (Σr_t)×(Σr_t) core matrices with base_rule and lift back; "
            "output rank Σr_t (lossless) or rank (truncated SVD in core space)",
            citation="Panariello et al., Accurate and Efficient Low-Rank Model Merging in "
            "Core Space, NeurIPS 2025",
            reference_url=None,
            parameters=(RANK_OPTIONAL, BASE_RULE, LAMBDA),
            run=_run_core_space,
        ),
        MergeMethodDef(
            name="mtc",
            pretty_name="Merge-then-Compress",
            summary="merge with base_rule in space full | knots | core, then truncated SVD to "
            "rank (PEFT's *_svd combinations are space: full)",
            citation=CTM_PAPER + ", its Merge-then-Compress baselines",
            reference_url="https://arxiv.org/abs/2606.03723",
            parameters=(RANK, BASE_RULE, SPACE, LAMBDA),
            run=_run_mtc,
        ),
        MergeMethodDef(
            name="lora_lego",
            pretty_name="LoRA-LEGO",
            summary="k-means of rank-wise units into rank clusters, rescaled",
            citation="Zhao et al., Merging LoRAs like Playing LEGO: Pushing the Modularity "
            "of LoRA to Extremes Through Rank-Wise Clustering, ICLR 2025",
            reference_url=None,
            parameters=(RANK, LAMBDA, LEGO_ITERS),
            run=_run_lora_lego,
        ),
    )
}
METHOD_NAMES: tuple[str, ...] = tuple(METHODS)


def get_method(name: str) -> MergeMethodDef:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(
            f"unknown method {name!r}; expected one of: {', '.join(METHOD_NAMES)}"
        ) from None
