"""Helpers that mergekit's upstream tests import as ``tests.common``.

mergekit's source distribution ships ``tests/`` without ``common.py`` (and without
``tests/__init__.py``); the harness in ``tests/upstream/test_mergekit_suite.py`` copies this file
there. It is written for this repository from what the upstream tests call: tiny models built
locally (no hub access), a real ``run_merge`` into a temporary folder, and the checks the tests
rely on (a model and config are written, no NaN, every non-optional weight of the architecture is
present, then the test's own ``validate``).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable

from mergekit.architecture import arch_info_for_config, get_architecture_info
from mergekit.config import MergeConfiguration
from mergekit.io.lazy_tensor_loader import LazyTensorLoader, ShardedTensorIndex
from mergekit.merge import MergeOptions, run_merge
from transformers import (
    AutoConfig,
    CLIPVisionConfig,
    GPT2Config,
    GPT2LMHeadModel,
    GraniteConfig,
    GraniteForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
)


def run_and_check_merge(
    config: MergeConfiguration,
    check_nan: bool = True,
    check_tensors: bool = True,
    validate: Callable[[str], None] | None = None,
    index_json_name: str | None = None,
    auto_arch: bool = False,
) -> None:
    """Merge ``config`` with mergekit's ``run_merge`` into a temp folder and check the output."""
    index_json_name = index_json_name or "model.safetensors.index.json"
    with tempfile.TemporaryDirectory() as out:
        run_merge(config, out_path=out, options=MergeOptions())
        index_path = os.path.join(out, index_json_name)
        single_file = index_path.removesuffix(".index.json")
        assert os.path.exists(index_path) or os.path.exists(single_file), "merge wrote no model"
        assert os.path.exists(os.path.join(out, "config.json")), "merge wrote no config.json"

        if check_nan:
            loader = LazyTensorLoader.from_disk(out, lazy_unpickle=False)
            for name in loader.index.tensor_paths:
                assert not loader.get_tensor(name).isnan().any(), f"NaN in output tensor {name}"

        if check_tensors:
            model_config = AutoConfig.from_pretrained(out)
            if auto_arch:
                arch_info = get_architecture_info(config, MergeOptions())
            else:
                arch_info = arch_info_for_config(model_config)
            written = ShardedTensorIndex.from_disk(out).tensor_paths
            for weight in arch_info.all_weights(model_config):
                if weight.optional:
                    continue
                names = (weight.name, *(weight.aliases or ()))
                if not any(n in written for n in names):
                    raise RuntimeError(f"merge output lacks tensor {weight.name}")

        if validate is not None:
            validate(out)


def _save(model, path) -> str:
    model.save_pretrained(path, safe_serialization=True)
    return str(path)


def _pico_llama_config(vocab_size: int = 64) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=48,
        num_attention_heads=16,
        num_hidden_layers=2,
    )


def make_picollama(path, vocab_size: int = 64) -> str:
    """A 2-layer Llama with hidden size 32, randomly initialized."""
    return _save(LlamaForCausalLM(_pico_llama_config(vocab_size)), path)


def make_picogranite(path, vocab_size: int = 64) -> str:
    """A 2-layer Granite with hidden size 32, randomly initialized."""
    cfg = GraniteConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=48,
        num_attention_heads=16,
        num_hidden_layers=2,
    )
    return _save(GraniteForCausalLM(cfg), path)


def make_gpt2size(path) -> str:
    """A GPT-2 with GPT-2's 12 layers (the stacking test slices layers 0-12), narrow otherwise.

    Only the layer count matters to the tests that use it; a narrow model keeps them fast.
    """
    cfg = GPT2Config(n_ctx=128, n_positions=128, n_embd=64, n_head=4, n_layer=12, vocab_size=256)
    return _save(GPT2LMHeadModel(cfg), path)


def make_picoLlaVa(path) -> str:  # (sic) the name the upstream tests import
    """A LLaVA with a 2-layer CLIP vision tower and the 2-layer pico Llama as language model."""
    vision = CLIPVisionConfig(
        image_size=32,
        patch_size=4,
        num_hidden_layers=2,
        num_attention_heads=2,
        hidden_size=64,
        intermediate_size=128,
    )
    cfg = LlavaConfig(vision_config=vision, text_config=_pico_llama_config(), image_seq_length=16)
    return _save(LlavaForConditionalGeneration(cfg), path)
