"""``mergekit-ctm validate``'s peak-memory estimate for full checkpoints against the measured
peak of the merge (``mergekit-yaml``'s path: mergekit's ``run_merge`` with our kernel).

    python bench/full_validate.py [--hidden 768] [--layers 4] [--tasks 3] [--shard 5B]

Builds a float32 Llama-shaped base (random weights) and T fine-tunes (base + a rank-16
update + small noise on every tensor), all saved in 200 MB shards, and runs, each in a fresh
subprocess: ``build_full_plan`` (the estimate; also its time, headers only) and the merge,
which records its peak RSS (VmHWM) after importing torch, mergekit and mergekit_ctm (the
baseline) and after the merge. Prints one JSON line: model size, estimate, measured peak
above baseline, their ratio, and the seconds of each.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script
from bench.rss import CHILD_PRELUDE  # noqa: E402

CHILD = (
    CHILD_PRELUDE
    + r"""
import json, time
import torch, yaml, mergekit.merge, mergekit_ctm  # noqa: F401
from mergekit.common import parse_kmb
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions
mergekit_ctm.install()
recipe, out, shard = sys.argv[1], sys.argv[2], sys.argv[3]
torch.set_num_threads(1)
text = open(recipe).read()
if out == "-":
    from mergekit_ctm.recipe.full import build_full_plan
    t0 = time.time()
    plan = build_full_plan(text, recipe, out_shard_size=parse_kmb(shard))
    print(json.dumps({"estimate": plan.peak_bytes(), "model": plan.output_bytes(),
                      "seconds": time.time() - t0}))
else:
    t0 = time.time()
    with PeakSampler() as s:
        run_merge(MergeConfiguration.model_validate(yaml.safe_load(text)), out,
                  options=MergeOptions(quiet=True, out_shard_size=parse_kmb(shard)),
                  config_source=text)
    secs = time.time() - t0
    kib = 1024  # this bench reports bytes
    print(json.dumps({"measured": (status()["VmHWM"] - s.base["VmHWM"]) * kib,
                      "seconds": secs,
                      "anon": (s.peak["RssAnon"] - s.base["RssAnon"]) * kib,
                      "file": (s.peak["RssFile"] - s.base["RssFile"]) * kib}))
"""
)


def build(root: Path, hidden: int, layers: int, tasks: int) -> None:
    import warnings

    import torch
    from safetensors.torch import load_file, save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=hidden * 8 // 3,
                      num_hidden_layers=layers, num_attention_heads=hidden // 64,
                      num_key_value_heads=hidden // 64, vocab_size=8000)  # fmt: skip
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        LlamaForCausalLM(cfg).save_pretrained(root / "base", max_shard_size="200MB")
    g = torch.Generator().manual_seed(1)
    for t in range(tasks):
        dst = root / f"task{t}"
        dst.mkdir()
        for f in (root / "base").iterdir():
            if f.suffix != ".safetensors":
                (dst / f.name).write_bytes(f.read_bytes())
                continue
            out = {}
            for name, w in load_file(str(f)).items():
                if w.ndim == 2:
                    n, m = w.shape
                    low = torch.randn(n, 16, generator=g) @ torch.randn(16, m, generator=g)
                    out[name] = w + 0.01 * low / 4 + 0.001 * torch.randn(n, m, generator=g)
                else:
                    out[name] = w + 0.01 * torch.randn(w.shape, generator=g)
            save_file(out, str(dst / f.name), metadata={"format": "pt"})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--tasks", type=int, default=3)
    ap.add_argument("--shard", default="5B")
    args = ap.parse_args()
    import yaml

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0 = time.time()
        build(root, args.hidden, args.layers, args.tasks)
        recipe = {
            "merge_method": "ctm",
            "base_model": str(root / "base"),
            "models": [{"model": str(root / f"task{t}")} for t in range(args.tasks)],
            "parameters": {"base_rule": "task_arithmetic", "rank": 16},
            "dtype": "float32",
        }
        (root / "r.yml").write_text(yaml.safe_dump(recipe))
        built = time.time() - t0

        def child(out: str) -> dict:
            res = subprocess.run([sys.executable, "-c", CHILD, str(root / "r.yml"), out,
                                  args.shard], capture_output=True, text=True)  # fmt: skip
            if res.returncode:
                sys.exit(res.stderr[-2000:])
            return json.loads(res.stdout.strip().splitlines()[-1])

        est = child("-")
        run = child(str(root / "out"))
    mib = 2**20
    print(json.dumps({
        "hidden": args.hidden, "layers": args.layers, "tasks": args.tasks,
        "model_mib": round(est["model"] / mib, 1),
        "estimate_mib": round(est["estimate"] / mib, 1),
        "measured_mib": round(run["measured"] / mib, 1),
        "measured_over_estimate": round(run["measured"] / est["estimate"], 2),
        "anon_peak_mib": round(run["anon"] / mib, 1),
        "anon_over_estimate": round(run["anon"] / est["estimate"], 2),
        "file_backed_peak_mib": round(run["file"] / mib, 1),
        "validate_s": round(est["seconds"], 2), "merge_s": round(run["seconds"], 1),
        "build_s": round(built, 1),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
