"""mergekit-ctm: merge many PEFT LoRA adapters into one low-rank LoRA, as a mergekit plugin."""

__version__ = "0.1.0"
