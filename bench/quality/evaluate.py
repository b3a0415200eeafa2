"""Evaluate PEFT adapter directories on every task with that task's own (unmerged) head.

``Evaluator.accuracies(adapter_dir, split, scales)`` loads the directory with
``PeftModel.from_pretrained`` on a fresh copy of the suite's base model and returns, for each
global scale λ, the accuracy of every task. λ multiplies the adapter's own scaling
(``LoraLayer.set_scale``):
for a merge whose ``lambda`` acts once after the rule (ΔW = λ·B·A), scaling the loaded λ=1 adapter
is the same function as merging with ``lambda: λ``; the final configuration is re-merged with λ
folded in and re-evaluated to check it.

Energy retention (Appendix D.1 of the CtM paper)::

    ΔŴ⁽ᵗ⁾ⁱ = Uⁱ Uⁱᵀ ΔW⁽ᵗ⁾ⁱ Vⁱ Vⁱᵀ,  ρ⁽ᵗ⁾ⁱ = ‖ΔŴ⁽ᵗ⁾ⁱ‖_F / ‖ΔW⁽ᵗ⁾ⁱ‖_F,  ρ̄⁽ᵗ⁾ = mean_i ρ⁽ᵗ⁾ⁱ

with (Uⁱ, Vⁱ) the left/right singular vectors of the merged update at layer i (its numerical rank).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from bench.quality.suite import Suite, features, load_base, load_heads


def _lora_layers(model: torch.nn.Module):
    from peft.tuners.lora.layer import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


class Evaluator:
    """Per-task accuracy of the base model, of an adapter dir, or of a PeftModel in memory."""

    def __init__(self, suite: Suite, val_max: int = 200):
        self.suite = suite
        self.val_max = val_max
        self.names = list(suite.tasks)
        self.heads = load_heads(suite.root, self.names)
        self._base_state = None

    def fresh_base(self) -> torch.nn.Module:
        return load_base(self.suite.root)

    @torch.no_grad()
    def model_accuracies(self, model: torch.nn.Module, split: str) -> dict[str, float]:
        out = {}
        for n, td in self.suite.tasks.items():
            ids, mask, y = td.ids[split], td.mask[split], td.y[split]
            if split == "val" and ids.shape[0] > self.val_max:
                # every other validation example: halves the search cost; test is always whole
                step = -(-ids.shape[0] // self.val_max)
                ids, mask, y = ids[::step], mask[::step], y[::step]
            f = features(model, ids, mask)
            h = self.heads[n]
            pred = (f @ h["weight"].T + h["bias"]).argmax(1)
            out[n] = float((pred == y).float().mean())
        return out

    def load(self, adapter_dir: Path | str) -> torch.nn.Module:
        from peft import PeftModel

        model = PeftModel.from_pretrained(self.fresh_base(), str(adapter_dir))
        model.eval()
        return model

    @torch.no_grad()
    def accuracies(
        self, adapter_dir: Path | str, split: str, scales: Sequence[float] = (1.0,)
    ) -> list[dict[str, float]]:
        """Per-task accuracy on ``split`` for each global scale λ in ``scales``."""
        model = self.load(adapter_dir)
        return self.peft_accuracies(model, split, scales)

    @torch.no_grad()
    def peft_accuracies(
        self, model: torch.nn.Module, split: str, scales: Sequence[float] = (1.0,)
    ) -> list[dict[str, float]]:
        layers = _lora_layers(model)
        name = model.active_adapter
        res = []
        for s in scales:
            for layer in layers:
                layer.set_scale(name, float(s))
            res.append(self.model_accuracies(model, split))
        for layer in layers:
            layer.set_scale(name, 1.0)
        return res


# --------------------------------------------------------------------------------------------
# reading factors and energy retention
# --------------------------------------------------------------------------------------------


def read_deltas(adapter_dir: Path | str) -> dict[str, torch.Tensor]:
    """Dense ΔW = s·B·A per target module of a PEFT LoRA dir (float64), keyed by module path."""
    d = Path(adapter_dir)
    cfg = json.loads((d / "adapter_config.json").read_text())
    tensors = load_file(str(d / "adapter_model.safetensors"))
    rank_pattern = cfg.get("rank_pattern") or {}
    alpha_pattern = cfg.get("alpha_pattern") or {}
    out = {}
    for key, a in tensors.items():
        if not key.endswith("lora_A.weight"):
            continue
        mod = key[: -len(".lora_A.weight")]
        b = tensors[mod + ".lora_B.weight"]
        short = mod.split(".", 2)[-1] if mod.startswith("base_model.model.") else mod
        r = next((v for k, v in rank_pattern.items() if short.endswith(k)), cfg["r"])
        alpha = next((v for k, v in alpha_pattern.items() if short.endswith(k)), cfg["lora_alpha"])
        s = alpha / (r**0.5 if cfg.get("use_rslora") else r)
        out[mod] = s * b.double() @ a.double()
    return out


def energy_retention(
    merged: dict[str, torch.Tensor], tasks: dict[str, dict[str, torch.Tensor]], rtol: float = 1e-9
) -> dict[str, float]:
    """ρ̄⁽ᵗ⁾ for each task (Appendix D.1), averaged over the modules the merge has."""
    per_task: dict[str, list[float]] = {t: [] for t in tasks}
    for mod, dw in merged.items():
        u, s, vh = torch.linalg.svd(dw, full_matrices=False)
        k = int((s > rtol * s[0]).sum()) if s.numel() and s[0] > 0 else 0
        uk, vk = u[:, :k], vh[:k].T
        for t, deltas in tasks.items():
            if mod not in deltas:
                continue
            x = deltas[mod]
            proj = uk @ (uk.T @ x @ vk) @ vk.T
            per_task[t].append(float(proj.norm() / x.norm()))
    return {t: float(np.mean(v)) for t, v in per_task.items()}


def task_norms(tasks: dict[str, dict[str, torch.Tensor]]) -> dict[str, float]:
    """‖ΔW⁽ᵗ⁾‖ as the root of the summed squared Frobenius norms over all modules."""
    return {
        t: float(sum(float(x.norm() ** 2) for x in d.values()) ** 0.5) for t, d in tasks.items()
    }
