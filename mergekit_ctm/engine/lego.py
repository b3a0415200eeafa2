"""LoRA-LEGO (Zhao et al., ICLR 2025): rank-wise clustering of Minimal Semantic Units.

Each LoRA is a sum of rank-one units ΔWₜ = Σᵢ (sₜ bₜᵢ) aₜᵢᵀ (bₜᵢ column i of Bₜ, aₜᵢ row i
of Aₜ). The MSU pool of all T adapters is clustered into k = rank clusters and each cluster is
replaced by its centroid unit; the merged LoRA is the sum of the centroids.

The paper (Zhao et al., ICLR 2025: Merging LoRAs like Playing LEGO) leaves details open;
our choices:
1. Units are balanced first (‖ã‖ = ‖b̃‖ = √(sₜ‖a‖‖b‖)) so the split of the scale between the
   factors does not matter.
2. Clustering feature: the unit direction x = [ã/‖ã‖; b̃/‖b̃‖]/√2. A unit and its negation
   (−a, −b) are the same update, so similarity is |cos| (sign-invariant spherical k-means),
   k-means++ initialisation from a generator seeded by ``seed``, Lloyd iterations until the
   assignment is stable (≤ ``iters``).
3. Centroid: the mean of the sign-aligned members' ã and b̃.
4. Dual reweighting. Parameter level (norm decay: averaging non-parallel vectors shrinks
   them): each centroid factor is rescaled to its members' mean norm. Output level (by
   concatenation–summation equivalence a cluster of |c| similar units contributes |c| of
   them): centroid c is weighted by |c|, so a single adapter (T = 1, rank ≥ r₁) is reproduced
   exactly and the scale matches task arithmetic; the global ``lambda`` rescales from there.
"""

from __future__ import annotations

import torch

from mergekit_ctm.engine.linalg import F64


def _kmeanspp(X: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    n = X.shape[0]
    first = int(torch.randint(n, (1,), generator=gen))
    centers = [X[first]]
    for _ in range(1, k):
        sim = (X @ torch.stack(centers).mT).abs().amax(dim=1)
        d = (1.0 - sim).clamp_min(0)
        if float(d.sum()) <= 0:
            probs = torch.ones(n, dtype=F64)
        else:
            probs = (d / d.sum()).cpu()
        centers.append(X[int(torch.multinomial(probs, 1, generator=gen))])
    return torch.stack(centers)


def cluster_units(
    X: torch.Tensor, k: int, *, seed: int | None, iters: int = 100
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sign-invariant spherical k-means of unit rows X (N × d); returns (labels, centers)."""
    gen = torch.Generator().manual_seed(0 if seed is None else int(seed))
    C = _kmeanspp(X, k, gen)
    labels = None
    for _ in range(iters):
        S = X @ C.mT
        new = S.abs().argmax(dim=1)
        if labels is not None and torch.equal(new, labels):
            break
        labels = new
        sign = torch.sign(S.gather(1, labels[:, None])).clamp_min(0) * 2 - 1
        for c in range(k):
            members = labels == c
            if members.any():
                m = (X[members] * sign[members]).sum(0)
                C[c] = m / m.norm().clamp_min(1e-300)
            else:  # re-seed an empty cluster at the worst-explained unit
                C[c] = X[S.abs().amax(dim=1).argmin()]
    return labels, C


def lora_lego(As, Bs, scalings, *, rank: int, seed: int | None, dtype, iters: int = 100):
    """Return (B_f n × k, A_f k × m, info): the merged update is B_f A_f (before ``lambda``)."""
    a = torch.cat([A.to(F64) for A in As], dim=0)  # N × m
    b = torch.cat([B.to(F64) * float(s) for B, s in zip(Bs, scalings)], dim=1).mT  # N × n
    na, nb = a.norm(dim=1), b.norm(dim=1)
    live = (na > 0) & (nb > 0)
    a, b, na, nb = a[live], b[live], na[live], nb[live]
    root = (na * nb).sqrt()
    a_t = a * (root / na)[:, None]
    b_t = b * (root / nb)[:, None]
    X = torch.cat([a / na[:, None], b / nb[:, None]], dim=1) / 2**0.5
    k = min(rank, X.shape[0])
    labels, centers = cluster_units(X, k, seed=seed, iters=iters)
    C_a, C_b, sizes = [], [], []
    for c in range(k):
        idx = (labels == c).nonzero().flatten()
        if idx.numel() == 0:
            continue
        ref = centers[c]
        sign = torch.where(X[idx] @ ref >= 0, 1.0, -1.0).to(F64)[:, None]
        ma, mb = (a_t[idx] * sign).mean(0), (b_t[idx] * sign).mean(0)
        ma = ma * (a_t[idx].norm(dim=1).mean() / ma.norm().clamp_min(1e-300))
        mb = mb * (b_t[idx].norm(dim=1).mean() / mb.norm().clamp_min(1e-300))
        C_a.append(ma)
        C_b.append(mb * idx.numel())
        sizes.append(int(idx.numel()))
    B_f = torch.stack(C_b, dim=1).to(dtype)
    A_f = torch.stack(C_a, dim=0).to(dtype)
    return B_f, A_f, {"method": "lora_lego", "cluster_sizes": sizes}
