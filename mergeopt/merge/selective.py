"""Merges that keep each element of a task vector by how the experts agree on it (RAM, RAM+
tensor-local) or by how much it matters (Arcee Fusion), in mergekit 0.1.5's operation order, so
that an fp32 merge is bit-identical to mergekit's.

RAM (Reinforced Agent Merging, arXiv 2601.13572): an element that only one expert changes (by
more than ``epsilon``) is taken whole; one that several change is averaged over them.
``ramplus_tl`` scales each expert's unique elements by ``1 + r · min(alpha, shared / unique)``,
its count of shared over unique elements in this tensor. Arcee Fusion keeps an expert's change
where its importance (``|delta|`` times the row's KL divergence between the two softmaxes) reaches
``median + 1.5 · IQR`` of the tensor's importances; above a million elements the quartiles
come from a million sampled with replacement, as mergekit samples them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

QUANTILE_SAMPLE = 1_000_000
"""Arcee Fusion's quartiles come from at most this many sampled importances."""


def ram(
    base: torch.Tensor,
    task_vectors: torch.Tensor,
    *,
    epsilon: float,
    r: float | None = None,
    alpha: float | None = None,
) -> torch.Tensor:
    """RAM of ``task_vectors`` (N x shape) onto ``base``; RAM+ tensor-local when ``r`` and
    ``alpha`` are given."""
    flat = task_vectors.reshape(len(task_vectors), -1)
    changed = flat.abs() > epsilon
    counts = changed.sum(dim=0, keepdim=True)
    shared, unique = counts > 1, counts == 1
    kept = flat * changed
    unique_part = kept * unique
    if r is not None and alpha is not None:
        shared_count = (changed & shared).sum(dim=1)
        unique_count = (changed & unique).sum(dim=1)
        rho = shared_count / unique_count.clamp(min=epsilon)
        unique_part = unique_part * (1 + r * rho.clamp(min=0, max=alpha)).unsqueeze(-1)
    merged = (unique_part + (kept * shared / counts.clamp(min=1))).sum(dim=0, keepdim=True)
    return base + merged.reshape_as(base)


def arcee_fusion(
    base: torch.Tensor, expert: torch.Tensor, generator: torch.Generator | None
) -> torch.Tensor:
    """``expert``'s changes to ``base`` where they matter (``generator``: the quartiles'
    sample, for tensors over :data:`QUANTILE_SAMPLE` elements)."""
    eps = 1e-8
    p = F.softmax(expert, dim=-1) + eps
    q = F.softmax(base, dim=-1) + eps
    divergence = torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    importance = (expert - base).abs() * divergence
    flat = importance.reshape(-1)
    if flat.numel() > QUANTILE_SAMPLE:
        picks = torch.randint(
            flat.numel(), (QUANTILE_SAMPLE,), generator=generator, device=flat.device
        )
        flat = flat[picks]
    ordered, _ = torch.sort(flat)
    where = (torch.tensor([0.25, 0.5, 0.75]).to(ordered.device) * (ordered.numel() - 1)).long()
    q1, median, q3 = ordered[where]
    keep = (importance >= median + 1.5 * (q3 - q1)).float()
    return base + (expert - base) * keep
