"""Pure-torch merge engine: LoRA factors in, one merged LoRA's factors out.

No file I/O, YAML or mergekit planner here. Entry point::

    from mergekit_ctm.engine import merge_lora
    out = merge_lora(As, Bs, scalings, method="ctm", rank=16, beta=0.5,
                     base_rule="ties", rule_params={"density": 0.5})
    out.B @ out.A   # merged ΔW, scaling 1
"""

from mergekit_ctm.engine.api import merge_lora, merge_lora_many
from mergekit_ctm.engine.compress import compress_delta
from mergekit_ctm.engine.core import CoreSpace, build_core_space
from mergekit_ctm.engine.methods import METHOD_NAMES, METHODS, SPACES, MergeMethodDef
from mergekit_ctm.engine.tucker import Tucker2Result, tucker2, tucker2_batch, tucker2_dense
from mergekit_ctm.engine.types import MergedLora

__all__ = [
    "METHODS",
    "METHOD_NAMES",
    "SPACES",
    "MergeMethodDef",
    "CoreSpace",
    "MergedLora",
    "Tucker2Result",
    "build_core_space",
    "compress_delta",
    "merge_lora",
    "merge_lora_many",
    "tucker2",
    "tucker2_batch",
    "tucker2_dense",
]
