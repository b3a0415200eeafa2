"""Merge rules on T same-shape matrices (task updates ΔW_t or their shared-basis coordinates).

Contract::

    merge_matrices(tensors, rule, params=None, *, seed=None) -> Tensor   # same shape and dtype

Two kinds of rules:

- **mergekit rules** are mergekit's own registered ``MergeMethod`` objects, run unchanged on a
  ``TensorGroup`` whose base is a zero tensor (``base + merged delta`` with ``base = 0`` is the
  merged delta). Methods whose base is ignored (``linear``, ``karcher``) run on the T tensors
  alone, without the zero tensor, which would otherwise count as one more input.
  Supported: the GeneralizedTaskArithmetic family (``task_arithmetic``, ``ties``, ``dare_ties``,
  ``dare_linear``, ``breadcrumbs``, ``breadcrumbs_ties``, ``della``, ``della_linear``), ``sce``,
  ``ram``, ``ramplus_tl``, ``model_stock`` (T ≥ 2), ``multislerp``, ``nuslerp`` (T = 2), and on
  the tensors alone ``linear`` (weighted mean) and ``karcher``. Rejected, with the reason in the
  error: ``slerp``, ``nearswap``, ``arcee_fusion`` (they need a real base and one model) and
  ``passthrough`` (merges nothing). Other registered names are refused as not vetted.
- **matrix rules** mergekit lacks (``iso_c``, ``iso_cts``, ``tsv``, ``pcb``, ``robustmerge``),
  implemented in :mod:`mergekit_ctm.engine.matrix_rules`.

Parameters use mergekit's names and shapes: per-adapter values (``weight``, ``density``,
``gamma``, ``epsilon``) are a scalar (broadcast to every adapter) or a sequence of length T;
shared values (``normalize``, ``rescale``, ``int8_mask``, ``lambda``, ...) are scalars.
``weight`` defaults to 1.0 (mergekit makes it required). Unknown names are errors.

Behaviour kept from mergekit on purpose:

- Magnitude trimming (``ties``, ``breadcrumbs*`` bottom cut) keeps ⌊density·N⌋ entries (at least
  one when density > 0); the TIES paper and the CtM authors' code keep ⌊density·N⌋ + 1.
- mergekit ranks magnitudes in float32 on CPU (float64 on CUDA); near-ties may order differently.
- DARE/DELLA rescale the kept entries to the tensor's original L1 norm (``rescale: true``), not
  by 1/density as in the DARE paper.

Randomness (``dare_ties``, ``dare_linear``, ``della``, ``della_linear``): adapter t is sparsified
by mergekit's own sparsifier under a private RNG state seeded with ``adapter_seed(seed, t)``
(``seed=None`` means 0), forked on the tensor's device so the caller's global RNG is untouched.
The result depends only on (seed, t, inputs): bit-identical across calls and execution orders.
CPU and CUDA draw different masks (different generators). The kept entries are rescaled in the
input dtype by mergekit's ``rescaled_masked_tensor`` (mergekit's CPU sparsifiers would otherwise
round float64 inputs through float32); the sparsified deltas then go through mergekit's merge
with density 1.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import pydantic
import torch
from mergekit.merge_methods import registry
from mergekit.merge_methods.base import (
    BasePolicy,
    GroupMergeMethod,
    InputContract,
    MergeMethod,
    MergeMethodSpec,
    ParameterScope,
    ParameterSpec,
    TensorGroup,
)
from mergekit.merge_methods.generalized_task_arithmetic import GeneralizedTaskArithmeticMerge
from mergekit.sparsify import RescaleNorm, SparsificationMethod, rescaled_masked_tensor, sparsify

from mergekit_ctm.engine import matrix_rules
from mergekit_ctm.errors import InputError

__all__ = [
    "RuleError",
    "adapter_seed",
    "check_rule_params",
    "matrix_rule_methods",
    "merge_matrices",
    "rule_names",
    "rule_parameter_specs",
]


FLAT_SPECTRUM_RULES = ("iso_c", "iso_cts")  # outputs with equal singular values


class RuleError(InputError):
    """Unknown rule, or a rule parameter that is unknown or invalid."""


# mergekit methods that merge deltas relative to a base: run with a zero base.
_ZERO_BASE_RULES = (
    "task_arithmetic",
    "ties",
    "dare_ties",
    "dare_linear",
    "breadcrumbs",
    "breadcrumbs_ties",
    "della",
    "della_linear",
    "sce",
    "ram",
    "ramplus_tl",
    "model_stock",
    "multislerp",
    "nuslerp",
)
# mergekit methods that ignore the base: run on the T tensors alone.
_NO_BASE_RULES = ("linear", "karcher")
_REJECTED_RULES = {
    "slerp": "it interpolates between the base and exactly one model; with a zero base it only "
    "scales that one delta (use task_arithmetic with weight t, or nuslerp for two deltas)",
    "nearswap": "it pulls one model towards the base where they are close; with a zero base "
    "there is nothing to be close to",
    "arcee_fusion": "it scores one model's importance against the base weights, which a zero "
    "base does not provide",
    "passthrough": "it copies a single input and merges nothing",
}
_RANDOM_SPARSIFIERS = (SparsificationMethod.random, SparsificationMethod.della_magprune)
_PER_ADAPTER_SCOPES = (ParameterScope.NON_BASE, ParameterScope.INPUT)
_ANY_SHAPE_RULES = ("pcb",)  # matrix rules that work on flattened entries of any shape


def rule_names() -> tuple[str, ...]:
    """Every name usable as ``base_rule``: supported mergekit methods, then our matrix rules."""
    available = {m.spec.name for m in registry.registered_methods()}
    mk = tuple(n for n in (*_ZERO_BASE_RULES, *_NO_BASE_RULES) if n in available)
    return mk + matrix_rules.MATRIX_RULE_NAMES


def _unknown_rule(rule: str) -> RuleError:
    if rule in _REJECTED_RULES:
        return RuleError(
            f"merge rule {rule!r} cannot merge task deltas: {_REJECTED_RULES[rule]}. "
            f"Valid rules: {', '.join(rule_names())}"
        )
    registered = {m.spec.name for m in registry.registered_methods()}
    if rule in registered:
        return RuleError(
            f"merge rule {rule!r} is registered in mergekit but not vetted for merging task "
            f"deltas on a zero base. Valid rules: {', '.join(rule_names())}"
        )
    return RuleError(f"unknown merge rule {rule!r}. Valid rules: {', '.join(rule_names())}")


def _mergekit_method(rule: str) -> MergeMethod:
    if rule not in _ZERO_BASE_RULES and rule not in _NO_BASE_RULES:
        raise _unknown_rule(rule)
    try:
        return registry.get(rule)
    except RuntimeError:
        raise _unknown_rule(rule) from None


def rule_parameter_specs(rule: str) -> tuple[ParameterSpec, ...]:
    """The parameters ``rule`` accepts, as mergekit ParameterSpecs (``weight`` defaults to 1.0)."""
    if rule in matrix_rules.MATRIX_RULE_NAMES:
        return matrix_rules.PARAMETER_SPECS[rule]
    specs = _mergekit_method(rule).spec.parameters
    return tuple(
        dataclasses.replace(p, default=1.0) if p.name == "weight" and p.required else p
        for p in specs
    )


def adapter_seed(seed: int | None, index: int) -> int:
    """Seed of adapter ``index`` for random rules: a stable 63-bit hash of (seed, index)."""
    digest = hashlib.blake2b(f"{0 if seed is None else int(seed)}:{index}".encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "little") & ((1 << 63) - 1)


def _bind(rule: str, params: Mapping[str, Any] | None, count: int) -> dict[str, Any]:
    """Validate ``params`` against the rule's specs; per-adapter values become T-lists."""
    specs = {p.name: p for p in rule_parameter_specs(rule)}
    params = dict(params or {})
    unknown = sorted(set(params) - set(specs))
    if unknown:
        raise RuleError(
            f"unknown parameter(s) {', '.join(map(repr, unknown))} for merge rule {rule!r}; "
            f"valid parameters: {', '.join(specs) or '(none)'}"
        )
    bound: dict[str, Any] = {}
    for name, spec in specs.items():
        value = params.get(name, spec.default)
        if spec.required and name not in params:
            raise RuleError(f"merge rule {rule!r} requires parameter {name!r}")
        if spec.scope in _PER_ADAPTER_SCOPES:
            if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
                if len(value) != count:
                    raise RuleError(
                        f"parameter {name!r} of merge rule {rule!r} has {len(value)} values "
                        f"for {count} adapters; give one value per adapter or a single scalar"
                    )
                values = list(value)
            else:
                values = [value] * count
            bound[name] = [_validate(rule, spec, v, index=i) for i, v in enumerate(values)]
        else:
            bound[name] = _validate(rule, spec, value)
    _check_ranges(rule, bound)
    return bound


def check_rule_params(rule: str, params: Mapping[str, Any] | None, count: int) -> dict[str, Any]:
    """Validate ``params`` for ``rule`` and ``count`` adapters exactly as ``merge_matrices`` will
    (names, types, per-adapter lengths, ranges); returns the bound values, raises RuleError."""
    return _bind(rule, params, count)


def _validate(rule: str, spec: ParameterSpec, value: Any, index: int | None = None) -> Any:
    where = f" (adapter {index})" if index is not None else ""
    if value is None and spec.default is None:
        return None
    try:
        out = spec.validate(value)
    except pydantic.ValidationError as err:
        msg = err.errors()[0].get("msg", str(err))
        raise RuleError(
            f"parameter {spec.name!r}{where} of merge rule {rule!r}: {msg} (got {value!r})"
        ) from None
    if isinstance(out, float) and not math.isfinite(out):
        raise RuleError(f"parameter {spec.name!r}{where} of merge rule {rule!r} is {out}")
    return out


def _check_ranges(rule: str, bound: Mapping[str, Any]) -> None:
    for i, d in enumerate(bound.get("density", ())):
        if not 0.0 <= d <= 1.0:
            raise RuleError(
                f"parameter 'density' (adapter {i}) of merge rule {rule!r} must be in [0, 1]; "
                f"got {d}"
            )
    epsilons = bound.get("epsilon")
    if not isinstance(epsilons, list):  # ram's epsilon is a shared threshold, not DELLA's
        return
    for i, (d, e) in enumerate(zip(bound["density"], epsilons, strict=True)):
        if 0.0 < d < 1.0 and not (0.0 < d - e and d + e < 1.0):
            raise RuleError(
                f"parameter 'epsilon' (adapter {i}) of merge rule {rule!r}: density ± epsilon "
                f"must lie in (0, 1); got density={d}, epsilon={e}"
            )


def _check_tensors(tensors: Sequence[torch.Tensor], rule: str, ndim: int | None) -> None:
    if len(tensors) == 0:
        raise RuleError(f"merge rule {rule!r} needs at least one tensor; got none")
    first = tensors[0]
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise RuleError(f"tensor {i} for merge rule {rule!r} is not a floating-point tensor")
        if t.shape != first.shape or t.dtype != first.dtype or t.device != first.device:
            raise RuleError(
                f"tensor {i} for merge rule {rule!r} has shape {tuple(t.shape)}, {t.dtype}, "
                f"{t.device}; tensor 0 has {tuple(first.shape)}, {first.dtype}, {first.device}. "
                "All tensors must share shape, dtype and device"
            )
    if ndim is not None and first.ndim != ndim:
        raise RuleError(
            f"merge rule {rule!r} merges {ndim}-D matrices; got shape {tuple(first.shape)}"
        )


_RNG_LOCK = threading.Lock()


@contextlib.contextmanager
def _seeded(device: torch.device, seed: int) -> Iterator[None]:
    """Private RNG state for ``device`` seeded with ``seed``; the caller's state is restored.

    mergekit's sparsifiers draw from the process-wide default generator, so the seeded region
    holds a lock: threads (``merge_lora_many`` workers) would otherwise reseed each other's
    draws.
    """
    with _RNG_LOCK, _seeded_unlocked(device, seed):
        yield


@contextlib.contextmanager
def _seeded_unlocked(device: torch.device, seed: int) -> Iterator[None]:
    if device.type == "cpu":
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            yield
    elif device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        with torch.random.fork_rng(devices=[index], device_type="cuda"):
            torch.cuda.default_generators[index].manual_seed(seed)
            yield
    else:
        raise RuleError(f"random merge rules support CPU and CUDA tensors; got {device}")


def _presparsify(
    method: GeneralizedTaskArithmeticMerge,
    tensors: Sequence[torch.Tensor],
    bound: dict[str, Any],
    seed: int | None,
) -> list[torch.Tensor]:
    """Sparsify each delta with mergekit's sparsifier under its own (seed, t) RNG state."""
    norm = RescaleNorm.l1 if bound["rescale"] else None
    out = []
    for t, x in enumerate(tensors):
        with _seeded(x.device, adapter_seed(seed, t)):
            kept = sparsify(
                x,
                density=bound["density"][t],
                method=method.sparsification_method,
                epsilon=bound.get("epsilon", [0.0] * len(tensors))[t],
                rescale_norm=None,
            )
        # mergekit's CPU sparsifiers compute in float32; keep only their mask, rescale in x's dtype.
        mask = (kept != 0).to(x.dtype)
        out.append(rescaled_masked_tensor(x, mask, norm))
    return out


def _run_mergekit(
    rule: str, tensors: Sequence[torch.Tensor], bound: dict[str, Any], seed: int | None
) -> torch.Tensor:
    method = _mergekit_method(rule)
    tensors = list(tensors)
    if (
        isinstance(method, GeneralizedTaskArithmeticMerge)
        and method.sparsification_method in _RANDOM_SPARSIFIERS
    ):
        tensors = _presparsify(method, tensors, bound, seed)
        bound = {**bound, "density": [1.0] * len(tensors)}
    if rule in _NO_BASE_RULES:
        group = TensorGroup.from_tensors(tensors)
    else:
        zero = torch.zeros_like(tensors[0])
        group = TensorGroup.from_tensors([zero, *tensors], base_index=0)
    try:
        (out,) = method([group], parameters=bound, out_dtype=tensors[0].dtype)
    except (ValueError, TypeError) as err:
        # Input-count contracts (model_stock >= 2, nuslerp == 2) and mergekit's own checks.
        hint = "" if rule in _NO_BASE_RULES else " (mergekit counts the zero base as one input)"
        raise RuleError(f"merge rule {rule!r} on {len(tensors)} tensors: {err}{hint}") from err
    return out


def merge_matrices(
    tensors: Sequence[torch.Tensor],
    rule: str,
    params: Mapping[str, Any] | None = None,
    *,
    seed: int | None = None,
    rank: int | None = None,
) -> torch.Tensor:
    """Merge T same-shape tensors with ``rule``; returns one tensor of the same shape and dtype.

    ``params``: mergekit-style names (see module docstring); ``seed``: per-module seed for random
    rules (None = 0; deterministic rules ignore it). ``rank``: the rank the caller truncates the
    result to, if any. Rules whose output has a flat spectrum (``FLAT_SPECTRUM_RULES``) choose
    their directions by it, because truncating a flat spectrum afterwards picks an arbitrary
    subspace: Iso-C whitens the top-``rank`` part of the sum (the CtM paper's MtC Iso-C) and
    Iso-CTS caps its directions at ``rank`` unless ``cts_rank`` is set. Other rules ignore it.
    Raises RuleError for an unknown or rejected rule, unknown or invalid parameters, or tensors
    that differ in shape, dtype or device.
    """
    if rule in matrix_rules.MATRIX_RULE_NAMES:
        _check_tensors(tensors, rule, ndim=None if rule in _ANY_SHAPE_RULES else 2)
        bound = _bind(rule, params, len(tensors))
        bound["lam"] = bound.pop("lambda")
        if rank is not None and rule == "iso_c":
            bound["rank"] = rank
        elif rank is not None and rule == "iso_cts" and bound.get("cts_rank") is None:
            bound["cts_rank"] = rank
        fn: Callable[..., torch.Tensor] = matrix_rules.RULES[rule]
        return fn(list(tensors), **bound)
    _mergekit_method(rule)  # unknown / rejected rule before anything else
    _check_tensors(tensors, rule, ndim=None)
    bound = _bind(rule, params, len(tensors))
    return _run_mergekit(rule, tensors, bound, seed)


class _MatrixRuleMethod(GroupMergeMethod):
    """A matrix rule as a mergekit method: merged = base + rule(inputs − base).

    2-D tensors go through the matrix rule. Other tensors (norms, biases) get λ · mean_t(w_t Δ_t),
    as the authors' code averages non-matrix parameters (Iso-C/CTS, TSV, RobustMerge); PCB works
    on flattened entries, so it takes every shape.
    """

    def __init__(self, name: str):
        self.name = name
        self.spec = MergeMethodSpec(
            name=name,
            parameters=matrix_rules.PARAMETER_SPECS[name],
            contract=InputContract(base=BasePolicy.REQUIRED),
            pretty_name=matrix_rules.PRETTY_NAMES[name],
            reference_url=matrix_rules.REFERENCE_URLS[name],
        )

    def merge_group(self, group: TensorGroup, /, **parameters: Any) -> torch.Tensor:
        base = group.base.tensor
        entries = group.non_base
        if not entries:
            return base
        if base.numel() == 0:
            # An empty weight merges to itself, as with mergekit's own methods (PCB's and
            # RobustMerge's top-k thresholds have no entry to rank and would raise).
            return base.clone()
        deltas = [e.tensor - base for e in entries]
        kwargs = {
            k: (v.values_for(entries) if hasattr(v, "values_for") else v)
            for k, v in parameters.items()
        }
        if base.ndim == 2 or self.name in _ANY_SHAPE_RULES:
            delta = merge_matrices(deltas, self.name, kwargs)
        else:
            weights = kwargs["weight"]
            mean = sum(w * d for w, d in zip(weights, deltas, strict=True)) / len(deltas)
            delta = kwargs["lambda"] * mean
        return (base + delta).to(base.dtype)


def matrix_rule_methods() -> tuple[MergeMethod, ...]:
    """Our matrix rules as mergekit methods (base required; they merge deltas from the base).

    Not registered here: the plan layer registers them once in mergekit's registry.
    """
    return tuple(_MatrixRuleMethod(name) for name in matrix_rules.MATRIX_RULE_NAMES)
