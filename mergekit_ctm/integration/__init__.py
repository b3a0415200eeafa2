"""Everything that plugs mergekit-ctm into mergekit, and nothing else: registration of our
methods in mergekit's registry, the ``run_merge`` / ``mergekit-yaml`` wrappers, and the
``MergeMethod`` classes. The startup hook (``mergekit_ctm_hook``) calls into this package;
no other package of mergekit-ctm imports it.
"""

from __future__ import annotations

import sys
from typing import Any


def _register() -> None:
    """Register our methods, unless a module of ours is mid-import: ``import
    mergekit_ctm.engine.rules`` imports mergekit's registry, which brings us here before the
    module it needs is complete. Then the next hook (mergekit.merge, mergekit-yaml) or
    ``mergekit_ctm.install()`` registers; registration is idempotent."""
    if any(
        getattr(getattr(m, "__spec__", None), "_initializing", False)
        for name, m in list(sys.modules.items())
        if name.startswith("mergekit_ctm.")
    ):
        return
    from mergekit_ctm.integration.registration import register_methods

    register_methods()


def on_config(module: Any) -> None:
    """mergekit.config was imported: MergeConfiguration keeps ``output:`` (output_field.py)."""
    from mergekit_ctm.integration.output_field import add_output_field

    add_output_field(module.MergeConfiguration)


def on_merge_methods(module: Any) -> None:
    """mergekit.merge_methods was imported: register our methods."""
    _register()


def on_merge(module: Any) -> None:
    """mergekit.merge was imported: route recipes of our methods to our planner."""
    from mergekit_ctm.integration.dispatch import wrap_run_merge

    wrap_run_merge(module)
    _register()


def on_run_yaml(module: Any) -> None:
    """mergekit.scripts.run_yaml was imported: one-line errors for mergekit-yaml."""
    from mergekit_ctm.integration.dispatch import wrap_run_yaml

    wrap_run_yaml(module)
    _register()


def on_multimerge(module: Any) -> None:
    """mergekit.scripts.multimerge was imported: one-line errors for mergekit-multi."""
    from mergekit_ctm.integration.dispatch import wrap_multimerge

    wrap_multimerge(module)
    _register()


CALLBACKS = {
    "mergekit.config": on_config,
    "mergekit.merge_methods": on_merge_methods,
    "mergekit.merge": on_merge,
    "mergekit.scripts.run_yaml": on_run_yaml,
    "mergekit.scripts.multimerge": on_multimerge,
}
