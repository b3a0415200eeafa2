"""The multi-task suite: bundled data, a self-pretrained tiny Llama, one real PEFT LoRA per task.

Everything is offline: inputs come from scikit-learn's bundled datasets (``load_digits``,
``load_breast_cancer``, ``load_wine``), turned into token sequences; the base model is a real
``transformers.LlamaForCausalLM`` pretrained here by next-token prediction on the *training*
inputs only; each task gets a fixed class-prototype head computed from the frozen base features
(the analogue of CLIP's zero-shot text heads in the paper) and a LoRA on q/k/v/o trained against
it with ``peft.get_peft_model``. Heads are never trained with the LoRA and never merged.

Cache layout (``bench/quality/.cache/<config hash>/``)::

    base/                         save_pretrained of the LlamaForCausalLM
    heads/<task>.safetensors      frozen linear heads (weight, bias)
    seed<k>/adapters/<task>/      PEFT adapter dirs (adapter_config.json, adapter_model.safetensors)
    seed<k>/lora_meta.json        per-task training log (steps, lr, loss, norms)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

CACHE_ROOT = Path(__file__).resolve().parent / ".cache"
SUITE_VERSION = 4  # bump when the build code changes in a way that changes outputs

# Vocabulary: 0..255 image patch tokens (2x2 patch, 4 grey levels per pixel),
# 256..271 tabular quantile-bin tokens, 272 BOS, 273 PAD.
N_PATCH_TOKENS = 256
N_BINS = 16
BOS = N_PATCH_TOKENS + N_BINS
PAD = BOS + 1
VOCAB = PAD + 1
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------


def _image_tokens(images: np.ndarray) -> np.ndarray:
    """(N, 8, 8) grey levels 0..16 -> (N, 16) tokens: 2x2 patches, 4 levels per pixel."""
    q = np.minimum(images.astype(np.int64) * 4 // 17, 3)
    n = q.shape[0]
    p = q.reshape(n, 4, 2, 4, 2).transpose(0, 1, 3, 2, 4).reshape(n, 16, 4)
    return (p * np.array([1, 4, 16, 64])).sum(-1)


def _tabular_tokens(x: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """(N, F) features -> (N, F) tokens 256 + quantile bin (bins fitted on the train split)."""
    bins = np.stack(
        [np.searchsorted(edges[f], x[:, f], side="right") for f in range(x.shape[1])], 1
    )
    return N_PATCH_TOKENS + np.clip(bins, 0, N_BINS - 1)


def _split(n: int, y: np.ndarray, seed: int = 0) -> dict[str, np.ndarray]:
    """Stratified 60/20/20 train/val/test split, fixed for every run (seed 0)."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(n)
    tr, rest = train_test_split(idx, test_size=0.4, stratify=y, random_state=seed)
    va, te = train_test_split(rest, test_size=0.5, stratify=y[rest], random_state=seed)
    return {"train": np.sort(tr), "val": np.sort(va), "test": np.sort(te)}


@dataclass(frozen=True)
class TaskSpec:
    """One task: a source dataset, an input transform, a label function and its LoRA recipe.

    ``lr`` and ``epochs`` differ across tasks on purpose (as real fine-tunes do), which gives the
    LoRA updates different norms: the paper's small-norm vs large-norm setting.
    """

    name: str
    source: str  # "digits" | "breast_cancer" | "wine"
    transform: str = "none"  # digits only: none | rot90 | invert | fliplr | flipud | transpose
    label: str = "class"  # digits: class | parity | ge5 | loop | mod3 ; tabular: class
    lr: float = 2e-3
    epochs: int = 8


ALL_TASKS: tuple[TaskSpec, ...] = (
    TaskSpec("digits", "digits", "none", "class", lr=1e-3, epochs=6),
    TaskSpec("parity_rot90", "digits", "rot90", "parity", lr=4e-3, epochs=14),
    TaskSpec("invert", "digits", "invert", "class", lr=3e-3, epochs=12),
    TaskSpec("loop_fliplr", "digits", "fliplr", "loop", lr=8e-4, epochs=6),
    TaskSpec("ge5_flipud", "digits", "flipud", "ge5", lr=2e-3, epochs=10),
    TaskSpec("mod3_transpose", "digits", "transpose", "mod3", lr=5e-3, epochs=16),
    TaskSpec("breast_cancer", "breast_cancer", lr=5e-4, epochs=10),
    TaskSpec("wine", "wine", lr=1e-3, epochs=30),
)


@dataclass(frozen=True)
class SuiteConfig:
    """Everything that determines the built suite; its hash names the cache directory."""

    tasks: tuple[TaskSpec, ...] = ALL_TASKS
    hidden: int = 128
    layers: int = 2
    heads: int = 4
    intermediate: int = 256
    pretrain_epochs: int = 40
    pretrain_lr: float = 3e-3
    lora_rank: int = 8
    lora_alpha: int = 16
    batch_size: int = 64
    seeds: tuple[int, ...] = (0, 1, 2)
    threads: int = 1

    def key(self) -> str:
        d = dataclasses.asdict(self)
        d.pop("seeds")  # one cache holds every seed's LoRAs (seed<k>/)
        blob = json.dumps({"v": SUITE_VERSION, **d}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    def root(self, cache_root: Path | None = None) -> Path:
        return Path(cache_root or CACHE_ROOT) / self.key()

    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]


def smoke_config() -> SuiteConfig:
    """Two tasks, a one-layer 32-wide model, a few epochs: the whole pipeline in seconds."""
    return SuiteConfig(
        tasks=(
            TaskSpec("digits", "digits", "none", "class", lr=3e-3, epochs=3),
            TaskSpec("invert", "digits", "invert", "class", lr=6e-3, epochs=3),
        ),
        hidden=32,
        layers=1,
        heads=2,
        intermediate=64,
        pretrain_epochs=3,
        pretrain_lr=5e-3,
        lora_rank=4,
        lora_alpha=8,
        seeds=(0,),
    )


@dataclass
class TaskData:
    """Token tensors and labels for one task's three splits."""

    spec: TaskSpec
    n_classes: int
    ids: dict[str, torch.Tensor] = field(default_factory=dict)  # (N, L) long, PAD-padded
    mask: dict[str, torch.Tensor] = field(default_factory=dict)  # (N, L) long
    y: dict[str, torch.Tensor] = field(default_factory=dict)


def _digit_labels(y: np.ndarray, label: str) -> tuple[np.ndarray, int]:
    if label == "class":
        return y, 10
    if label == "parity":
        return y % 2, 2
    if label == "ge5":
        return (y >= 5).astype(np.int64), 2
    if label == "loop":
        return np.isin(y, [0, 6, 8, 9]).astype(np.int64), 2
    if label == "mod3":
        return y % 3, 3
    raise ValueError(f"unknown digits label function {label!r}")


def _digit_images(images: np.ndarray, transform: str) -> np.ndarray:
    ops: dict[str, Callable[[np.ndarray], np.ndarray]] = {
        "none": lambda a: a,
        "rot90": lambda a: np.rot90(a, 1, axes=(1, 2)),
        "invert": lambda a: 16 - a,
        "fliplr": lambda a: a[:, :, ::-1],
        "flipud": lambda a: a[:, ::-1, :],
        "transpose": lambda a: a.transpose(0, 2, 1),
    }
    if transform not in ops:
        raise ValueError(f"unknown digits transform {transform!r}; use one of {sorted(ops)}")
    return np.ascontiguousarray(ops[transform](images))


def _pack(tokens: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    ids = np.concatenate([np.full((tokens.shape[0], 1), BOS), tokens], 1)
    t = torch.as_tensor(ids, dtype=torch.long)
    return t, torch.ones_like(t)


def load_task(spec: TaskSpec) -> TaskData:
    """Build one task's tokenized train/val/test splits from the bundled scikit-learn data."""
    from sklearn import datasets

    if spec.source == "digits":
        d = datasets.load_digits()
        y, k = _digit_labels(d.target.astype(np.int64), spec.label)
        split = _split(len(y), d.target)  # same image split for every digits task
        toks = _image_tokens(_digit_images(d.images, spec.transform))
    elif spec.source in ("breast_cancer", "wine"):
        d = getattr(datasets, f"load_{spec.source}")()
        y = d.target.astype(np.int64)
        k = int(y.max()) + 1
        split = _split(len(y), y)
        qs = np.linspace(0, 1, N_BINS + 1)[1:-1]
        edges = np.quantile(d.data[split["train"]], qs, axis=0).T  # (F, N_BINS-1)
        toks = _tabular_tokens(d.data, edges)
    else:
        raise ValueError(f"unknown source {spec.source!r} in task {spec.name!r}")
    td = TaskData(spec, k)
    for s, idx in split.items():
        td.ids[s], td.mask[s] = _pack(toks[idx])
        td.y[s] = torch.as_tensor(y[idx])
    return td


def load_tasks(cfg: SuiteConfig) -> dict[str, TaskData]:
    return {t.name: load_task(t) for t in cfg.tasks}


# --------------------------------------------------------------------------------------------
# model
# --------------------------------------------------------------------------------------------


def _llama_config(cfg: SuiteConfig):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=cfg.hidden,
        intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.heads,
        max_position_embeddings=64,
        bos_token_id=BOS,
        pad_token_id=PAD,
        eos_token_id=PAD,
        tie_word_embeddings=False,
    )


def backbone(model: torch.nn.Module) -> torch.nn.Module:
    """The LlamaModel inside a LlamaForCausalLM, with or without a PEFT wrapper around it."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        model = model.base_model.model
    return model.model


def features(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, bs: int = 512):
    """Mean-pooled final hidden states (after the final RMSNorm) of ``model``'s backbone."""
    outs = []
    bb = backbone(model)
    for i in range(0, ids.shape[0], bs):
        h = bb(input_ids=ids[i : i + bs], attention_mask=mask[i : i + bs]).last_hidden_state
        m = mask[i : i + bs].unsqueeze(-1).to(h.dtype)
        outs.append((h * m).sum(1) / m.sum(1))
    return torch.cat(outs)


def _pad_batch(ids: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    n = max(x.shape[0] for x in ids)
    out = torch.full((len(ids), n), PAD, dtype=torch.long)
    mask = torch.zeros((len(ids), n), dtype=torch.long)
    for i, x in enumerate(ids):
        out[i, : x.shape[0]] = x
        mask[i, : x.shape[0]] = 1
    return out, mask


def pretrain_base(cfg: SuiteConfig, tasks: dict[str, TaskData], out: Path, log=print) -> None:
    """Next-token pretraining of a tiny LlamaForCausalLM on the distinct *train* inputs.

    The generic corpus is the untransformed digits images and the tabular rows; the task
    transforms (rotations, inversion, ...) are left for the LoRAs to learn.
    """
    from transformers import LlamaForCausalLM

    torch.manual_seed(1234)
    corpus: dict[str, torch.Tensor] = {}
    for td in tasks.values():
        if td.spec.source == "digits" and td.spec.transform != "none":
            continue
        corpus.setdefault(td.spec.source, td.ids["train"])
    if not corpus:  # every digits task is transformed: fall back to the first task's inputs
        first = next(iter(tasks.values()))
        corpus[first.spec.source] = first.ids["train"]
    seqs = [row for t in corpus.values() for row in t]
    model = LlamaForCausalLM(_llama_config(cfg))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.pretrain_lr, weight_decay=0.01)
    steps = cfg.pretrain_epochs * math.ceil(len(seqs) / cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.pretrain_lr, total_steps=steps)
    g = torch.Generator().manual_seed(0)
    model.train()
    step = 0
    for ep in range(cfg.pretrain_epochs):
        perm = torch.randperm(len(seqs), generator=g)
        tot = 0.0
        for i in range(0, len(seqs), cfg.batch_size):
            ids, mask = _pad_batch([seqs[j] for j in perm[i : i + cfg.batch_size]])
            labels = ids.masked_fill(mask == 0, -100)
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            tot += float(loss)
            step += 1
        if ep % 10 == 0 or ep == cfg.pretrain_epochs - 1:
            log(f"  pretrain epoch {ep}: loss {tot / math.ceil(len(seqs) / cfg.batch_size):.3f}")
    model.eval()
    model.save_pretrained(out, safe_serialization=True)


def load_base(root: Path) -> torch.nn.Module:
    from transformers import LlamaForCausalLM

    m = LlamaForCausalLM.from_pretrained(root / "base", dtype=torch.float32)
    m.eval()
    return m


def prototype_head(feats: torch.Tensor, y: torch.Tensor, n_classes: int, temp: float = 10.0):
    """Fixed class-prototype head on frozen base features (the analogue of CLIP's zero-shot heads).

    pₖ = mean of the centred train features of class k, normalized; logits = temp·P(f − μ)/s
    with s the mean norm of the centred features. Never trained with the LoRA, never merged.
    """
    mu = feats.mean(0)
    c = feats - mu
    protos = torch.stack([c[y == k].mean(0) for k in range(n_classes)])
    protos = protos / protos.norm(dim=1, keepdim=True)
    w = temp * protos / c.norm(dim=1).mean()
    return {"weight": w.contiguous(), "bias": (-(w @ mu)).contiguous()}


def load_heads(root: Path, names: list[str]) -> dict[str, dict[str, torch.Tensor]]:
    return {n: load_file(str(root / "heads" / f"{n}.safetensors")) for n in names}


def fit(
    cfg: SuiteConfig,
    model: torch.nn.Module,
    params: list[torch.Tensor],
    td: TaskData,
    head: dict[str, torch.Tensor],
    seed: int,
    lr: float,
) -> list[float]:
    """The suite's training protocol, shared by LoRAs and full fine-tunes: AdamW on ``params``
    at ``lr`` without weight decay, the task's epochs in batches of ``cfg.batch_size``, data
    order drawn from ``seed``, cross-entropy of the frozen head on the pooled features.
    Leaves the model in eval mode; returns the loss of every step."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    n = td.ids["train"].shape[0]
    g = torch.Generator().manual_seed(seed)
    model.train()
    w, b = head["weight"], head["bias"]
    losses = []
    for _ in range(td.spec.epochs):
        perm = torch.randperm(n, generator=g)
        for i in range(0, n, cfg.batch_size):
            j = perm[i : i + cfg.batch_size]
            f = features(model, td.ids["train"][j], td.mask["train"][j])
            loss = torch.nn.functional.cross_entropy(f @ w.T + b, td.y["train"][j])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    model.eval()
    return losses


def train_lora(
    cfg: SuiteConfig,
    base_dir: Path,
    td: TaskData,
    head: dict[str, torch.Tensor],
    seed: int,
    out: Path,
) -> dict:
    """Train one task's LoRA (real ``get_peft_model``) against its frozen head; save the adapter."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed * 1000 + (hash_str(td.spec.name) % 1000))
    base = LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    lcfg = LoraConfig(
        r=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha,
        target_modules=list(TARGET_MODULES),
        lora_dropout=0.0,
        bias="none",
    )
    model = get_peft_model(base, lcfg)
    params = [p for p in model.parameters() if p.requires_grad]
    losses = fit(cfg, model, params, td, head, seed, td.spec.lr)
    model.save_pretrained(str(out))
    return {"final_loss": float(np.mean(losses[-10:])), "steps": len(losses)}


def hash_str(s: str) -> int:
    return int(hashlib.sha256(s.encode()).hexdigest()[:8], 16)


# --------------------------------------------------------------------------------------------
# build (cached)
# --------------------------------------------------------------------------------------------


@dataclass
class Suite:
    """A built suite: paths plus the in-memory task data."""

    cfg: SuiteConfig
    root: Path
    tasks: dict[str, TaskData]

    def adapter_dir(self, seed: int, task: str) -> Path:
        return self.root / f"seed{seed}" / "adapters" / task

    @property
    def base_dir(self) -> Path:
        return self.root / "base"


def build(cfg: SuiteConfig, cache_root: Path | None = None, log=print) -> Suite:
    """Build (or load from cache) the base model, heads and every seed's LoRAs."""
    torch.set_num_threads(cfg.threads)
    root = cfg.root(cache_root)
    root.mkdir(parents=True, exist_ok=True)
    tasks = load_tasks(cfg)
    timings = {}
    if not (root / "base" / "model.safetensors").exists():
        t0 = time.time()
        log(f"[suite] pretraining base model -> {root / 'base'}")
        tmp = root / "base.tmp"
        pretrain_base(cfg, tasks, tmp, log=log)
        os.replace(tmp, root / "base")
        timings["pretrain_s"] = time.time() - t0
    if not (root / "heads" / "done").exists():
        t0 = time.time()
        base = load_base(root)
        (root / "heads").mkdir(exist_ok=True)
        probe = {}
        with torch.no_grad():
            feats = {
                n: {s: features(base, td.ids[s], td.mask[s]) for s in td.ids}
                for n, td in tasks.items()
            }
        for n, td in tasks.items():
            h = prototype_head(feats[n]["train"], td.y["train"], td.n_classes)
            save_file(h, str(root / "heads" / f"{n}.safetensors"))
            acc = ((feats[n]["val"] @ h["weight"].T + h["bias"]).argmax(1) == td.y["val"]).float()
            probe[n] = float(acc.mean())
        log(f"[suite] base + prototype-head val accuracy: {json.dumps(probe)}")
        (root / "heads" / "done").write_text(json.dumps(probe))
        timings["heads_s"] = time.time() - t0
    heads = load_heads(root, list(tasks))
    for seed in cfg.seeds:
        sroot = root / f"seed{seed}"
        meta_path = sroot / "lora_meta.json"
        if meta_path.exists():
            continue
        t0 = time.time()
        meta = {}
        for n, td in tasks.items():
            t1 = time.time()
            out = sroot / "adapters" / n
            info = train_lora(cfg, root / "base", td, heads[n], seed, out)
            info["seconds"] = time.time() - t1
            meta[n] = info
            log(f"[suite] seed {seed} task {n}: {json.dumps(info)}")
        meta_path.write_text(json.dumps(meta, indent=1))
        timings[f"seed{seed}_s"] = time.time() - t0
    if timings:
        tpath = root / "build_timings.json"
        old = json.loads(tpath.read_text()) if tpath.exists() else {}
        tpath.write_text(json.dumps({**old, **timings}, indent=1))
    (root / "suite_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1))
    return Suite(cfg, root, tasks)
