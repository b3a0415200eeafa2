"""Peak RSS of a 32-layer adapter merge vs a 4-layer merge with the same module shapes.

    python bench/memory.py [--hidden 1024] [--rank 16] [--adapters 4] [--method ctm]

Each merge runs in a fresh subprocess that records its peak RSS (VmHWM) after importing
torch, mergekit and mergekit_ctm (the baseline) and again after the merge; the difference is
what the merge itself needed. Streaming on mergekit's Executor frees each module's factors
once they are written, so the 32-layer number should stay within 1.3x of the 4-layer one.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

# VmHWM (peak RSS of this process image) rather than ru_maxrss, which Linux carries over
# from the parent across fork + exec.
CHILD = r"""
import json, sys
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
import torch, mergekit.merge  # noqa: F401
from mergekit.options import MergeOptions
from mergekit_ctm.plan.run import run_adapter_merge
recipe, out = sys.argv[1], sys.argv[2]
torch.set_num_threads(1)
base = hwm()
text = open(recipe).read()
run_adapter_merge(text, out, MergeOptions(quiet=True), config_source=text)
print(json.dumps({"baseline_kib": base, "peak_kib": hwm()}))
"""

MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")


def make_adapters(root: str, layers: int, hidden: int, rank: int, count: int) -> list[str]:
    """Synthetic PEFT LoRA adapters (real files, PEFT key names) for a Llama-like stack."""
    import torch

    from mergekit_ctm.adapters import build_adapter_config, write_adapter

    paths = []
    gen = torch.Generator().manual_seed(0)
    for t in range(count):
        tensors = {}
        names = []
        for i in range(layers):
            for m in MODULES:
                name = f"model.layers.{i}.self_attn.{m}"
                names.append(name)
                p = f"base_model.model.{name}"
                tensors[f"{p}.lora_A.weight"] = torch.randn(rank, hidden, generator=gen)
                tensors[f"{p}.lora_B.weight"] = torch.randn(hidden, rank, generator=gen) * 0.01
        cfg = build_adapter_config({n: rank for n in names}, rank=rank)
        cfg["target_modules"] = list(MODULES)
        path = os.path.join(root, f"adapter_{t}")
        write_adapter(path, tensors, cfg)
        paths.append(path)
    return paths


def run_one(layers: int, args: argparse.Namespace) -> dict:
    import yaml

    with tempfile.TemporaryDirectory() as root:
        adapters = make_adapters(root, layers, args.hidden, args.rank, args.adapters)
        params = {"rank": args.rank}
        if args.method in ("ctm", "mtc", "core_space"):
            params["base_rule"] = "ties"
            params["density"] = 0.5
        recipe = {
            "merge_method": args.method,
            "models": [{"model": p} for p in adapters],
            "parameters": params,
        }
        path = os.path.join(root, "recipe.yml")
        with open(path, "w") as f:
            yaml.safe_dump(recipe, f)
        res = subprocess.run(
            [sys.executable, "-c", CHILD, path, os.path.join(root, "out")],
            capture_output=True,
            text=True,
            check=True,
        )
        stats = json.loads(res.stdout.strip().splitlines()[-1])
        stats["merge_mib"] = (stats["peak_kib"] - stats["baseline_kib"]) / 1024
        return stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--adapters", type=int, default=4)
    ap.add_argument("--method", default="ctm")
    ap.add_argument("--layers", type=int, nargs=2, default=(4, 32))
    args = ap.parse_args()
    small, large = (run_one(n, args) for n in args.layers)
    for n, s in zip(args.layers, (small, large)):
        print(
            f"{n:3d} layers: peak RSS {s['peak_kib'] / 1024:8.1f} MiB, baseline "
            f"{s['baseline_kib'] / 1024:8.1f} MiB, merge {s['merge_mib']:7.1f} MiB"
        )
    ratio = large["merge_mib"] / max(small["merge_mib"], 1e-9)
    print(f"ratio (merge above baseline, {args.layers[1]} vs {args.layers[0]} layers): {ratio:.2f}")
    if ratio > 1.3:
        sys.exit(1)


if __name__ == "__main__":
    main()
