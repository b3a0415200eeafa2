"""Base-rule parameters as recipes see them: a rule's own specs, per (method, rule) pair.

A method's own parameters are declared in :mod:`mergekit_ctm.engine.methods`; the parameters
of its ``base_rule`` are the rule's (``engine.rules.rule_parameter_specs``), spelt exactly as
mergekit users write them, minus ``lambda``, which the method owns and applies once.
"""

from __future__ import annotations

from dataclasses import replace
from functools import cache

from mergekit.merge_methods.base import MISSING, ParameterScope, ParameterSpec

from mergekit_ctm.engine.rules import rule_names, rule_parameter_specs

_METHOD_OWNED = {"lambda"}


def _as_input_scope(spec: ParameterSpec) -> ParameterSpec:
    # Adapters are never the base: per-adapter values bind to every input.
    if spec.scope == ParameterScope.NON_BASE:
        return replace(spec, scope=ParameterScope.INPUT)
    return spec


@cache
def rule_specs(rule: str) -> tuple[ParameterSpec, ...]:
    """The rule's own parameters, minus those our methods own (``lambda`` is applied once)."""
    return tuple(
        _as_input_scope(p) for p in rule_parameter_specs(rule) if p.name not in _METHOD_OWNED
    )


def union_rule_specs() -> tuple[ParameterSpec, ...]:
    """Every base rule's parameters, once each (documented as optional where rules differ)."""
    seen: dict[str, ParameterSpec] = {}
    for rule in rule_names():
        for p in rule_specs(rule):
            if p.name not in seen:
                seen[p.name] = replace(p, default=None if p.default is MISSING else p.default)
    return tuple(seen.values())


def rules_taking(name: str) -> tuple[str, ...]:
    """Base rules that accept parameter ``name`` (for error messages)."""
    return tuple(r for r in rule_names() if any(p.name == name for p in rule_specs(r)))
