"""Full fine-tuned checkpoints: ``output: adapter`` against ``output: model``, stock mergekit-yaml.

    python bench/full_adapter.py                      # hidden 512, 4 layers, T = 3
    python bench/full_adapter.py --hidden 1024 --layers 8 --workdir /tmp/fa --keep

A Llama stack (hidden H, intermediate 2.75 H, H/64 heads, min(4, heads) KV heads,
vocabulary 4096), a base and T = 3 full fine-tunes, float32 safetensors. Every linear ΔWₜ is
``bench.compress.realistic_delta`` scaled to ‖ΔW‖_F = 0.02 ‖W_base‖_F; norms, embeddings and
lm_head get a small dense delta (so the adapter leaves something out, listed in its card).
The same recipe (ctm, base_rule ties, density 0.5, rank 16, task_rank 16, --random-seed 0) is
merged by the ``mergekit-yaml`` console script in a subprocess, ``--quiet``, once with
``output: model`` and once with ``output: adapter``: wall time, output size on disk, and the
largest relative difference between each adapter module's B·A (as PEFT computes it) and
W_model − W_base.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.compress import realistic_delta  # noqa: E402


def build(root: Path, hidden: int, layers: int, tasks: int) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    heads = max(1, hidden // 64)
    cfg = LlamaConfig(
        hidden_size=hidden, intermediate_size=int(2.75 * hidden), num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=max(1, min(4, heads)),
        vocab_size=4096, max_position_embeddings=256,
    )  # fmt: skip
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = LlamaForCausalLM(cfg)
        base.save_pretrained(root / "base")
        state = base.state_dict()
        g = torch.Generator().manual_seed(1)
        paths = []
        for t in range(tasks):
            new = {}
            for i, (name, w) in enumerate(state.items()):
                if w.ndim == 2 and "embed_tokens" not in name and "lm_head" not in name:
                    d = realistic_delta(*w.shape, seed=1000 * t + i).W
                    d = d * (0.02 * w.norm() / d.norm())
                else:
                    d = 0.01 * w.abs().mean() * torch.randn(w.shape, generator=g)
                new[name] = w + d
            model = LlamaForCausalLM(cfg)
            model.load_state_dict(new)
            model.save_pretrained(root / f"task{t}")
            paths.append(str(root / f"task{t}"))
    return {"base": str(root / "base"), "tasks": paths}


def size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--workdir")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    root = Path(args.workdir or tempfile.mkdtemp(prefix="full_adapter_"))
    root.mkdir(parents=True, exist_ok=True)
    ck = build(root, args.hidden, args.layers, 3) if not (root / "base").exists() else {
        "base": str(root / "base"), "tasks": [str(root / f"task{t}") for t in range(3)]
    }  # fmt: skip
    exe = str(Path(sys.executable).parent / "mergekit-yaml")
    results = {}
    for kind in ("model", "adapter"):
        recipe = {
            "merge_method": "ctm",
            "base_model": ck["base"],
            "models": [
                {"model": t, "parameters": {"weight": 1.0, "density": 0.5}} for t in ck["tasks"]
            ],  # fmt: skip
            "parameters": {"base_rule": "ties", "rank": 16, "task_rank": 16, "beta": 0.5},
            "dtype": "float32",
            "output": kind,
        }
        (root / f"{kind}.yml").write_text(yaml.safe_dump(recipe, sort_keys=False))
        out = root / f"out_{kind}"
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        subprocess.run([exe, str(root / f"{kind}.yml"), str(out), "--quiet", "--random-seed",
                        "0"], check=True)  # fmt: skip
        results[kind] = {"wall_s": round(time.perf_counter() - t0, 2), "bytes": size(out)}

    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    def load(p: Path) -> dict:
        return {k: v for f in sorted(p.glob("*.safetensors")) for k, v in load_file(f).items()}

    base, model = load(Path(ck["base"])), load(root / "out_model")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(ck["base"], dtype=torch.float32),
            str(root / "out_adapter"),
        )
    worst = 0.0
    for name, mod in peft.named_modules():
        if isinstance(mod, LoraLayer) and "default" in mod.lora_A:
            key = name.removeprefix("base_model.model.") + ".weight"
            want = model[key].double() - base[key].double()
            got = mod.get_delta_weight("default").double()
            worst = max(worst, float((got - want).norm() / want.norm()))
    results["max_rel_diff_BA_vs_model"] = worst
    results["base_bytes"] = size(Path(ck["base"]))
    print(json.dumps(results, indent=2))
    if not args.keep and not args.workdir:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
