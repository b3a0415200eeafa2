"""Peak RSS of a 32-layer adapter merge vs a 4-layer merge with the same module shapes; and
of ``output: model`` on a ~1.8 GB base against its size and ``mergekit-ctm validate``'s estimate.

    python bench/memory.py [--hidden 1024] [--rank 16] [--adapters 4] [--method ctm]
    python bench/memory.py --model-output [--model-layers 6] [--model-hidden 2048]

Each merge runs in a fresh subprocess that records its peak RSS (VmHWM) after importing
torch, mergekit and mergekit_ctm (the baseline) and again after the merge; the difference is
what the merge itself needed. Streaming on mergekit's Executor frees each module's factors
once they are written, so the 32-layer number should stay within 1.3x of the 4-layer one.

``--model-output`` builds a float32 Llama-shaped base (random weights written shard by shard,
deleted afterwards; 6 layers of hidden 2048 and vocabulary 32000: 1.74 GB) and 4 rank-16
adapters on q/v/up/down, and merges them with ``output: model`` three ways: the default
options (streaming writer, one 1.74 GB file), an explicit ``--out-shard-size 10B`` and, for
comparison, the same plan written by mergekit's TensorWriter (how it was before: the whole
shard in RAM). The child also samples RssAnon / RssFile every 10 ms. Fails (exit 1) when the
default's peak above baseline reaches half the model size, or when validate's estimate is off
by more than 2x either way.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script
from bench.rss import CHILD_PRELUDE  # noqa: E402

CHILD = (
    CHILD_PRELUDE
    + r"""
import json
import torch, mergekit.merge  # noqa: F401
from mergekit.options import MergeOptions
from mergekit_ctm.plan.run import run_adapter_merge
recipe, out = sys.argv[1], sys.argv[2]
torch.set_num_threads(1)
base = status()["VmHWM"]
text = open(recipe).read()
run_adapter_merge(text, out, MergeOptions(quiet=True), config_source=text)
print(json.dumps({"baseline_kib": base, "peak_kib": status()["VmHWM"]}))
"""
)

MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")

MODEL_CHILD = (
    CHILD_PRELUDE
    + r"""
import json, time
import torch, mergekit.merge  # noqa: F401
from mergekit.io.tasks import TensorWriterTask
from mergekit.options import MergeOptions
from mergekit_ctm.plan import stream
from mergekit_ctm.plan.run import run_adapter_merge
recipe, out, mode = sys.argv[1], sys.argv[2], sys.argv[3]
torch.set_num_threads(1)
opts = {"quiet": True}
if mode == "shard10B":
    opts["out_shard_size"] = 10 * 1000**3
if mode == "mergekit-writer":  # the same plan, written by mergekit's TensorWriter
    stream.StreamingWriterTask = lambda out_path, max_shard_size, layout: TensorWriterTask(
        out_path=out_path, max_shard_size=max_shard_size)
text = open(recipe).read()
t0 = time.time()
with PeakSampler(0.01) as s:
    run_adapter_merge(text, out, MergeOptions(**opts), config_source=text)
secs = time.time() - t0
print(json.dumps({"baseline_kib": s.base["VmHWM"], "peak_kib": status()["VmHWM"],
                  "anon_base_kib": s.base["RssAnon"], "anon_peak_kib": s.peak["RssAnon"],
                  "file_base_kib": s.base["RssFile"], "file_peak_kib": s.peak["RssFile"],
                  "seconds": secs}))
"""
)


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


def make_model(root: str, layers: int, hidden: int, vocab: int, inter: int) -> tuple[str, int]:
    """A float32 Llama-shaped base (config.json + safetensors shards of one layer each, and
    an index), written shard by shard so this process holds one layer; returns (path, bytes)."""
    import json

    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    path = os.path.join(root, "base")
    os.makedirs(path)
    LlamaConfig(
        hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=hidden // 128, num_key_value_heads=hidden // 128, vocab_size=vocab,
        tie_word_embeddings=False, torch_dtype="float32",
    ).save_pretrained(path)  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    shards: list[dict[str, tuple[int, ...]]] = [{"model.embed_tokens.weight": (vocab, hidden)}]
    for i in range(layers):
        p = f"model.layers.{i}."
        shards.append(
            {
                **{f"{p}self_attn.{m}.weight": (hidden, hidden) for m in MODULES},
                f"{p}mlp.gate_proj.weight": (inter, hidden),
                f"{p}mlp.up_proj.weight": (inter, hidden),
                f"{p}mlp.down_proj.weight": (hidden, inter),
                f"{p}input_layernorm.weight": (hidden,),
                f"{p}post_attention_layernorm.weight": (hidden,),
            }
        )
    shards.append({"model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)})
    weight_map, total = {}, 0
    for j, shapes in enumerate(shards):
        name = f"model-{j + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {k: torch.randn(s, generator=gen) * 0.02 for k, s in shapes.items()}
        save_file(tensors, os.path.join(path, name), metadata={"format": "pt"})
        total += sum(t.numel() * 4 for t in tensors.values())
        weight_map.update({k: name for k in tensors})
        del tensors
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    return path, total


def make_model_adapters(root: str, base: str, layers: int, hidden: int, inter: int,
                        rank: int, count: int) -> list[str]:  # fmt: skip
    """Synthetic rank-``rank`` PEFT adapters on q_proj, v_proj, up_proj, down_proj."""
    import torch

    from mergekit_ctm.adapters import build_adapter_config, write_adapter

    shapes = {
        "self_attn.q_proj": (hidden, hidden), "self_attn.v_proj": (hidden, hidden),
        "mlp.up_proj": (inter, hidden), "mlp.down_proj": (hidden, inter),
    }  # fmt: skip
    gen = torch.Generator().manual_seed(1)
    paths = []
    for t in range(count):
        tensors, names = {}, []
        for i in range(layers):
            for m, (n, k) in shapes.items():
                name = f"model.layers.{i}.{m}"
                names.append(name)
                p = f"base_model.model.{name}"
                tensors[f"{p}.lora_A.weight"] = torch.randn(rank, k, generator=gen) / k**0.5
                tensors[f"{p}.lora_B.weight"] = torch.randn(n, rank, generator=gen) * 0.01
        cfg = build_adapter_config({n: rank for n in names}, rank=rank)
        cfg["target_modules"] = ["q_proj", "v_proj", "up_proj", "down_proj"]
        cfg["base_model_name_or_path"] = base
        path = os.path.join(root, f"adapter_{t}")
        write_adapter(path, tensors, cfg)
        paths.append(path)
    return paths


def model_output(args: argparse.Namespace) -> int:
    """The --model-output benchmark; returns the exit status."""
    import yaml

    from mergekit_ctm.cli.report import estimated_peak_bytes
    from mergekit_ctm.recipe import build_plan

    inter = args.model_hidden * 11 // 4
    with tempfile.TemporaryDirectory(dir=args.workdir) as root:
        base, size = make_model(root, args.model_layers, args.model_hidden, 32000, inter)
        adapters = make_model_adapters(
            root, base, args.model_layers, args.model_hidden, inter, args.rank, args.adapters
        )
        recipe = {
            "merge_method": "ctm",
            "base_model": base,
            "models": [{"model": p, "parameters": {"density": 0.5}} for p in adapters],
            "parameters": {"base_rule": "ties", "rank": args.rank},
            "output": "model",
        }
        path = os.path.join(root, "recipe.yml")
        with open(path, "w") as f:
            yaml.safe_dump(recipe, f)
        estimate = estimated_peak_bytes(build_plan(recipe)) / 2**20
        print(f"base model: {size / 2**20:.1f} MiB float32; validate's estimate {estimate:.1f} MiB")
        status = 0
        for mode in ("default", "shard10B", "mergekit-writer"):
            out = os.path.join(root, f"out-{mode}")
            res = subprocess.run(
                [sys.executable, "-c", MODEL_CHILD, path, out, mode],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            s = json.loads(res.stdout.strip().splitlines()[-1])
            merge = (s["peak_kib"] - s["baseline_kib"]) / 1024
            anon = (s["anon_peak_kib"] - s["anon_base_kib"]) / 1024
            file = (s["file_peak_kib"] - s["file_base_kib"]) / 1024
            print(
                f"{mode:16s} peak RSS {s['peak_kib'] / 1024:7.1f} MiB, baseline "
                f"{s['baseline_kib'] / 1024:6.1f}, merge {merge:7.1f} MiB "
                f"({merge / (size / 2**20):.2f} of the model; estimate/measured "
                f"{estimate / merge:.2f}); sampled above baseline: anon {anon:.1f}, file "
                f"{file:.1f} MiB; {s['seconds']:.1f} s"
            )
            shutil.rmtree(out)
            if mode != "mergekit-writer":
                if merge >= 0.5 * size / 2**20 or not 0.5 <= estimate / merge <= 2:
                    status = 1
        return status


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--adapters", type=int, default=4)
    ap.add_argument("--method", default="ctm")
    ap.add_argument("--layers", type=int, nargs=2, default=(4, 32))
    ap.add_argument("--model-output", action="store_true", help="the output: model case")
    ap.add_argument("--model-layers", type=int, default=6)
    ap.add_argument("--model-hidden", type=int, default=2048)
    ap.add_argument("--workdir", default=None, help="where the temporary base is built")
    args = ap.parse_args()
    if args.model_output:
        sys.exit(model_output(args))
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
