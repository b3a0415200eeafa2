"""mergekit-ctm: merge many PEFT LoRA adapters into one low-rank LoRA, as a mergekit plugin.

Installing the package plugs it into mergekit through a startup hook: once mergekit's registry
loads, ``ctm``, ``core_space``, ``mtc`` and ``lora_lego`` (and the matrix rules ``iso_c``,
``tsv``, ``pcb``, ``iso_cts``, ``robustmerge``) are registered and ``mergekit.merge.run_merge``
sends recipes that use them to our planner. Importing this package has no side effects; where
the hook is off (``MERGEKIT_CTM_DISABLE=1``, or running from a source tree), call
:func:`install` once.
"""

from __future__ import annotations

__version__ = "0.1.0"


def install() -> None:
    """Plug mergekit-ctm into mergekit now (idempotent): register our methods and wrap
    ``run_merge`` / ``mergekit-yaml``, also when mergekit was imported before."""
    import mergekit_ctm_hook

    mergekit_ctm_hook.install()
    import mergekit.merge_methods  # noqa: F401  (runs the registration callback if still due)

    from mergekit_ctm.integration.registration import register_methods

    register_methods()


__all__ = ["__version__", "install", "merge_adapters"]


def __getattr__(name: str):
    # Loaded on first use, so `import mergekit_ctm` costs nothing more (PEP 562).
    if name == "merge_adapters":
        from mergekit_ctm.peft_api import merge_adapters

        return merge_adapters
    raise AttributeError(f"module 'mergekit_ctm' has no attribute {name!r}")
