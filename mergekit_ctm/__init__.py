"""mergekit-ctm: merge many PEFT LoRA adapters into one low-rank LoRA, as a mergekit plugin.

``import mergekit_ctm`` registers ``ctm``, ``core_space``, ``mtc`` and ``lora_lego`` (and the
matrix rules ``iso_c``, ``tsv``, ``pcb``, ``iso_cts``, ``robustmerge``) in mergekit's registry
and makes ``mergekit.merge.run_merge`` send recipes that use them to our planner. Installing
the package does the same for the stock ``mergekit-yaml`` command through a startup hook.
"""

from __future__ import annotations

import mergekit_ctm_hook

__version__ = "0.1.0"

mergekit_ctm_hook.install()
# Importing the package runs the registration callback (or install() just ran it).
import mergekit.merge_methods  # noqa: E402,F401

from mergekit_ctm.plan.registration import register_methods  # noqa: E402

register_methods()

__all__ = ["__version__", "register_methods"]
