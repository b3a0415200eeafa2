"""Tiny offline example: a real 2-layer Llama base, real PEFT LoRA adapters, a sample recipe.

    python -m mergekit_ctm.examples DIR      # builds DIR/base, DIR/adapters/*, DIR/recipe.yml

Everything is made locally with transformers + peft (no hub), deterministic from the seeds.
"""

from __future__ import annotations

import argparse
import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

LLAMA_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def build_tiny_base(
    path: str | os.PathLike, *, hidden: int = 64, layers: int = 2, vocab: int = 128, seed: int = 0
) -> str:
    """Save a real tiny LlamaForCausalLM (fp32 safetensors) to `path`; returns the path."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg).to(torch.float32)
    model.save_pretrained(os.fspath(path), safe_serialization=True)
    return os.fspath(path)


def _load_base(base_path: str | os.PathLike):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(os.fspath(base_path), dtype=torch.float32)


def build_tiny_adapter(
    base_path: str | os.PathLike,
    out_path: str | os.PathLike,
    *,
    r: int,
    alpha: float,
    target_modules: Sequence[str] | str,
    use_rslora: bool = False,
    rank_pattern: dict[str, int] | None = None,
    alpha_pattern: dict[str, float] | None = None,
    seed: int = 0,
    scale: float = 1.0,
    modules_to_save: Sequence[str] | None = None,
    bias: str = "none",
    task_type: str | None = "CAUSAL_LM",
    base_model: Any = None,
    **lora_kwargs: Any,
) -> str:
    """A real PEFT LoRA adapter (get_peft_model + save_pretrained) with NON-zero B.

    Every lora weight is redrawn from a generator seeded by `seed`: A ~ N(0, 1/m),
    B ~ N(0, scale²/r), so adapters with different `scale` have different norms.
    `base_model` (an already loaded base) skips reloading `base_path`; `lora_kwargs` go to
    LoraConfig as is (fan_in_fan_out, use_dora, layers_to_transform, ...).
    """
    from peft import LoraConfig, get_peft_model

    model = base_model if base_model is not None else _load_base(base_path)
    cfg = LoraConfig(
        r=r,
        lora_alpha=alpha,
        target_modules=list(target_modules)
        if not isinstance(target_modules, str)
        else target_modules,
        use_rslora=use_rslora,
        rank_pattern=dict(rank_pattern or {}),
        alpha_pattern=dict(alpha_pattern or {}),
        modules_to_save=list(modules_to_save) if modules_to_save else None,
        bias=bias,
        task_type=task_type,
        lora_dropout=0.0,
        init_lora_weights=False,
        **lora_kwargs,
    )
    pm = get_peft_model(model, cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if ".lora_" not in name or p.dim() != 2:
                continue  # DoRA magnitude vectors etc. keep PEFT's initialization
            x = torch.randn(p.shape, generator=gen, dtype=torch.float32) / math.sqrt(p.shape[1])
            if ".lora_B." in name or ".lora_embedding_B" in name:
                x *= scale
            p.copy_(x)
    pm.save_pretrained(os.fspath(out_path))
    # get_peft_model wraps the base in place; unwrap so a shared base can be reused.
    pm.unload()
    return os.fspath(out_path)


def example_adapter_specs(n_adapters: int = 4) -> list[dict[str, Any]]:
    """Heterogeneous adapter settings: ranks, rsLoRA, rank/alpha patterns, fewer targets."""
    specs = [
        dict(r=4, alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], scale=1.0),
        dict(
            r=8,
            alpha=16,
            use_rslora=True,
            target_modules=["q_proj", "v_proj", "o_proj", "up_proj"],
            scale=0.5,
        ),
        dict(
            r=6,
            alpha=12,
            target_modules=["q_proj", "v_proj", "down_proj"],
            rank_pattern={"v_proj": 2},
            alpha_pattern={"v_proj": 4},
            scale=2.0,
        ),
        dict(r=2, alpha=4, target_modules=["q_proj"], scale=0.25),
    ]
    out = []
    for i in range(n_adapters):
        s = dict(specs[i % len(specs)])
        s["seed"] = 1000 + i
        s["scale"] = s["scale"] * (1 + 0.1 * (i // len(specs)))
        out.append(s)
    return out


def make_tiny_example(
    dir: str | os.PathLike, n_adapters: int = 4, *, rank: int = 8, base_rule: str = "ties"
) -> dict[str, Any]:
    """Build DIR/base, DIR/adapters/adapter_{i}, DIR/recipe.yml (merge_method ctm).

    Returns {"base": path, "adapters": [paths], "recipe": path, "out": path}.
    """
    import yaml

    root = Path(dir).absolute()
    root.mkdir(parents=True, exist_ok=True)
    base = build_tiny_base(root / "base")
    model = _load_base(base)
    adapters = []
    for i, spec in enumerate(example_adapter_specs(n_adapters)):
        p = build_tiny_adapter(base, root / "adapters" / f"adapter_{i}", base_model=model, **spec)
        adapters.append(p)
    recipe = {
        "merge_method": "ctm",
        "base_model": base,
        "models": [{"model": p, "parameters": {"weight": 1.0, "density": 0.5}} for p in adapters],
        "parameters": {"base_rule": base_rule, "rank": rank, "beta": 0.5},
        "dtype": "float32",
        "out_dtype": "float32",
    }
    recipe_path = root / "recipe.yml"
    recipe_path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return {
        "base": base,
        "adapters": adapters,
        "recipe": str(recipe_path),
        "out": str(root / "out"),
    }


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m mergekit_ctm.examples", description=__doc__)
    ap.add_argument("dir", help="output directory for base, adapters and recipe.yml")
    ap.add_argument("-n", "--n-adapters", type=int, default=4)
    args = ap.parse_args(argv)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers/peft deprecation chatter on tiny models
        ex = make_tiny_example(args.dir, args.n_adapters)
    print(f"Built a tiny Llama base and {len(ex['adapters'])} LoRA adapters in {args.dir}.")
    print("Next, run:")
    print(f"  mergekit-yaml {ex['recipe']} {ex['out']}")


if __name__ == "__main__":
    main()
