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

On CUDA the engine's plans (not ``exact``) compute them with the Triton kernels instead
(:func:`fused_ram`, :func:`fused_arcee_fusion`): the same roundings, except Arcee Fusion's
divergences, which the kernel forms in fp32 and rounds once.
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType

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


def fused_ram(
    kernels: ModuleType,
    base: torch.Tensor,
    task_vectors: torch.Tensor,
    *,
    epsilon: float,
    r: float | None = None,
    alpha: float | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """:func:`ram` by the Triton kernels, rounding where its operations round: one pass (RAM+
    tensor-local: one more for its counts, its scale factors by the same torch operations).
    None where the kernels do not take the tensors (strided, empty, mixed dtypes)."""
    if base.numel() == 0 or not kernels.supported([base, task_vectors, out]):
        return None
    factors = None
    if r is not None and alpha is not None:
        unique_count, shared_count = kernels.ram_counts(task_vectors, epsilon)
        rho = shared_count / unique_count.clamp(min=epsilon)
        factors = 1 + r * rho.clamp(min=0, max=alpha)
    return kernels.ram_combine(base, task_vectors, epsilon, factors, out=out)


def arcee_divergence(base: torch.Tensor, expert: torch.Tensor) -> torch.Tensor:
    """Each row's KL divergence between the expert's and the base's softmax (over the last
    dimension), in their dtype, shape ``(*rows, 1)``: mergekit's operations."""
    eps = 1e-8
    p = F.softmax(expert, dim=-1) + eps
    q = F.softmax(base, dim=-1) + eps
    return torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)


def arcee_importance(
    base: torch.Tensor, expert: torch.Tensor, divergence: torch.Tensor
) -> torch.Tensor:
    """``|expert - base|`` times its row's divergence (any matching shapes of elements and
    their rows' divergences)."""
    return (expert - base).abs() * divergence


def arcee_threshold(
    importance_at: Callable[[torch.Tensor | None], torch.Tensor],
    numel: int,
    generator: torch.Generator | None,
    device: torch.device,
) -> torch.Tensor:
    """``median + 1.5 · IQR`` of the importances, a 0-d device tensor: ``importance_at(picks)``
    gives the importances at flat indices ``picks`` (None: all of them, flattened); above
    :data:`QUANTILE_SAMPLE` elements the quartiles come from that many sampled with
    replacement, as mergekit samples them."""
    picks = None
    if numel > QUANTILE_SAMPLE:
        picks = torch.randint(numel, (QUANTILE_SAMPLE,), generator=generator, device=device)
    ordered, _ = torch.sort(importance_at(picks))
    # the quartiles' indices as mergekit computes them (fp32, truncated), on the host: no
    # index tensor to copy to the device
    where = (torch.tensor([0.25, 0.5, 0.75]) * (ordered.numel() - 1)).long().tolist()
    q1, median, q3 = (ordered[index] for index in where)
    return median + 1.5 * (q3 - q1)


def arcee_fusion(
    base: torch.Tensor, expert: torch.Tensor, generator: torch.Generator | None
) -> torch.Tensor:
    """``expert``'s changes to ``base`` where they matter (``generator``: the quartiles'
    sample, for tensors over :data:`QUANTILE_SAMPLE` elements)."""
    importance = arcee_importance(base, expert, arcee_divergence(base, expert))
    flat = importance.reshape(-1)
    threshold = arcee_threshold(
        lambda picks: flat if picks is None else flat[picks], flat.numel(), generator, flat.device
    )
    keep = (importance >= threshold).float()
    return base + (expert - base) * keep


def fused_arcee_fusion(
    kernels: ModuleType,
    base: torch.Tensor,
    expert: torch.Tensor,
    generator: torch.Generator | None,
    out: torch.Tensor | None = None,
    divergence: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """:func:`arcee_fusion` by the Triton kernels: the rows' divergences in one pass (in fp32
    from the inputs, rounded once to their dtype; mergekit rounds each operation, so a row's
    divergence may be a place apart), the importances only at the sampled elements (one
    launch), the result in one more pass, exactly as :func:`arcee_fusion` forms it from those
    divergences. None where the kernels do not take the tensors (at most
    :data:`QUANTILE_SAMPLE` elements: the quartiles need every importance; strided; mixed
    dtypes). ``divergence``: given (tests)."""
    if base.numel() <= QUANTILE_SAMPLE or not kernels.supported([base, expert, out]):
        return None
    if divergence is None:
        divergence = kernels.row_divergence(base, expert)

    def importance_at(picks: torch.Tensor | None) -> torch.Tensor:
        assert picks is not None  # numel > QUANTILE_SAMPLE: always sampled
        return kernels.arcee_importance_at(base, expert, divergence, picks)

    threshold = arcee_threshold(importance_at, base.numel(), generator, base.device)
    return kernels.arcee_combine(base, expert, divergence, threshold, out=out)
