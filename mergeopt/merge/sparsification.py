"""Sparsification: which elements of each expert's task vector a merge keeps.

``magnitude`` (TIES) keeps the top ``max(1, int(density·n))`` by |x|; ``random`` (DARE) keeps
each element with probability ``density``; ``magnitude_outliers`` (breadcrumbs) drops the top
``int(gamma·n)`` and keeps the next ``int(density·n)``; ``della_magprune`` (DELLA) keeps an
element of magnitude rank j with p = density − ε + 2ε·j/(cols−1), per row. Masks are bool
tensors (True: kept); None means "keeps everything" (``density >= 1``). Here too: the TIES sign
election (``sign_consensus_mask``) and SCE, which selects elements by their variance across
experts (``sce``); and GTA's per-expert coefficients as device tensors (``_coefficients``, also
the weighted sums' and the fused kernels') and mergekit's rounded weight sum.

Deliberate choices where mergekit has quirks (tested in tests/test_merge_methods.py):

- breadcrumbs keeps ``int(density·n)`` elements (no ``max(1, ·)`` as for TIES) and drops the top
  ``int(gamma·n)``: as in mergekit, a tensor with ``density·n < 1`` gets a zero delta, and one
  with ``gamma·n < 1`` (biases, norms) drops no outliers. Kept for oracle equality.
- Randomness comes from an explicit ``torch.Generator`` (mergekit uses the global RNG), so a
  seed reproduces a merge on the same device; masks are Bernoulli(p) as in mergekit, and
  "rescale" is mergekit's L1-norm matching, not DARE's 1/p.
- della on a tensor with one column (ranks degenerate) keeps each element with p = density.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence

import torch

from mergeopt.merge.selection import Select, _magnitude_keys, top_magnitude_masks_batch

SPARSIFY_MAGNITUDE = "magnitude"
SPARSIFY_RANDOM = "random"
SPARSIFY_OUTLIERS = "magnitude_outliers"
SPARSIFY_DELLA = "della_magprune"

MAGNITUDE_THRESHOLDS = {SPARSIFY_MAGNITUDE: 1, SPARSIFY_OUTLIERS: 2}
"""The sparsifications that select by magnitude, and how many top-k thresholds each needs."""


@functools.lru_cache(maxsize=256)
def _coefficients(
    values: tuple[float, ...], dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """Per-expert coefficients as a device tensor, made once per distinct value tuple (a
    host-to-device copy per merged tensor would synchronize the stream every time). Read-only."""
    return torch.tensor(values, dtype=dtype, device=device)


@functools.lru_cache(maxsize=256)
def _rounded_sum(weights: tuple[float, ...], dtype: torch.dtype) -> float:
    """Σ weights after rounding each to ``dtype`` as mergekit does (cached: this runs for
    every tensor of a merge, and CPU tensor ops cost more than the GPU work of small ones)."""
    return sum(torch.tensor(weights, dtype=dtype).to(torch.float64).tolist())


def _l1_scale(delta: torch.Tensor, kept: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """mergekit's L1 rescale factor (a 0-d tensor in ``delta``'s dtype): ||delta||_1 /
    ||kept||_1 by mergekit's ``abs().sum()``, or 1 where either norm is below ``eps``
    (decided on the device, no sync)."""
    before = delta.abs().sum()
    after = kept.abs().sum()
    return torch.where((before < eps) | (after < eps), 1, before / after)


def _apply_mask(delta: torch.Tensor, mask: torch.Tensor, rescale: bool) -> torch.Tensor:
    kept = torch.where(mask, delta, 0)
    return kept * _l1_scale(delta, kept) if rescale else kept


def _bernoulli_mask(
    shape: torch.Size, probability: float, generator: torch.Generator | None, device: torch.device
) -> torch.Tensor:
    """Bool mask with P(True) = probability per element (one byte written per element)."""
    mask = torch.empty(shape, dtype=torch.uint8, device=device)
    mask.bernoulli_(probability, generator=generator)
    return mask.view(torch.bool)


def _check_della(density: float, epsilon: float) -> None:
    if density + epsilon >= 1 or density - epsilon <= 0:
        raise ValueError("della: epsilon must keep density ± epsilon inside (0, 1)")


def della_values_problem(values: Mapping[str, float | None]) -> str | None:
    """What mergekit refuses in one expert's DELLA values for a tensor (defaults filled in):
    density ± epsilon outside (0, 1) where it sparsifies (0 < density < 1); else None."""
    density, epsilon = float(values["density"] or 0), float(values["epsilon"] or 0)
    if 0 < density < 1 and (density + epsilon >= 1 or density - epsilon <= 0):
        return f"della: density {density:g} ± epsilon {epsilon:g} must stay inside (0, 1)"
    return None


def _della_mask(
    delta: torch.Tensor,
    density: float,
    epsilon: float,
    generator: torch.Generator | None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per row (a 1-D delta is one row): keep the element of magnitude rank j (0 = smallest)
    with p = density − ε + 2ε·j/(cols−1). Ranks come from one sort of the 16/32-bit magnitude
    keys per row; the Bernoulli draws are made in sorted order, where p is one vector for all
    rows, and scattered back (no rank tensor, no per-element probabilities)."""
    rows = delta.reshape(1, -1) if delta.dim() < 2 else delta.reshape(delta.shape[0], -1)
    columns = rows.shape[1]
    if out is None:
        mask = torch.empty(rows.shape, dtype=torch.bool, device=delta.device)
    else:
        mask = out.view(rows.shape)
    step = 2 * epsilon / (columns - 1) if columns > 1 else 0.0
    by_rank = torch.arange(columns, device=delta.device, dtype=torch.float32)
    by_rank = by_rank.mul_(step).add_(density - epsilon)
    keys = _magnitude_keys(rows).view(rows.shape)
    # Rows in chunks of about 2^24 elements bound the int64 order scratch.
    chunk = max(1, (1 << 24) // max(1, columns))
    for start in range(0, rows.shape[0], chunk):
        part = keys[start : start + chunk]
        order = torch.sort(part, dim=1).indices
        draws = torch.rand(part.shape, generator=generator, device=delta.device)
        mask[start : start + chunk].scatter_(1, order, draws < by_rank)
    return mask.view(delta.shape)


def _magnitude_ranks(method: str, n: int, density: float, gamma: float) -> list[int]:
    """The top-k sizes a magnitude sparsification needs: ``[k]`` for TIES; for breadcrumbs
    ``[dropped + kept, dropped]`` (its mask is their difference) or ``[kept]``."""
    if method == SPARSIFY_MAGNITUDE:
        return [max(1, int(density * n)) if density > 0 and n > 0 else 0]
    target = int(density * n)
    dropped_top = min(int(gamma * n), n - target)
    return [dropped_top + target, dropped_top] if dropped_top > 0 else [target]


MagnitudeRequests = tuple[
    list[tuple[torch.Tensor, list[int]]],
    list[torch.Tensor | None],
    list[int | None],
    list[bool],
]
"""(top-k requests, their out tensors, each item's request index or None: keeps all, each
request's ``band`` flag: breadcrumbs')."""


def magnitude_requests(
    method: str,
    items: Sequence[tuple[torch.Tensor, float, float]],
    outs: Sequence[torch.Tensor | None] | None = None,
) -> MagnitudeRequests:
    """The top-k selections (``selection.start_top_magnitude_masks`` with ``band``) that make
    the masks of a magnitude sparsification (``magnitude`` or ``magnitude_outliers``) for
    many ``(delta, density, gamma)``; an item with ``density >= 1`` needs none. ``outs[i]``:
    where the Triton path may write item i's mask. Breadcrumbs' requests are bands (kept
    between two thresholds, ties ordered as mergekit's ascending sort orders them)."""
    requests: list[tuple[torch.Tensor, list[int]]] = []
    request_outs: list[torch.Tensor | None] = []
    slots: list[int | None] = []
    for index, (delta, density, gamma) in enumerate(items):
        if density >= 1:
            slots.append(None)
            continue
        slots.append(len(requests))
        requests.append((delta, _magnitude_ranks(method, delta.numel(), density, gamma)))
        request_outs.append(outs[index] if outs is not None else None)
    return requests, request_outs, slots, [method == SPARSIFY_OUTLIERS] * len(requests)


def magnitude_masks_batch(
    method: str,
    items: Sequence[tuple[torch.Tensor, float, float]],
    *,
    outs: Sequence[torch.Tensor | None] | None = None,
    select: Select = "auto",
) -> list[torch.Tensor | None]:
    """Masks of a magnitude sparsification for many ``(delta, density, gamma)`` at once, with
    one host sync in all; None where ``density >= 1``. ``outs``: where the Triton path may
    write each mask; ``select``: see ``selection.start_top_magnitude_masks``."""
    requests, request_outs, slots, band = magnitude_requests(method, items, outs)
    found = top_magnitude_masks_batch(requests, band=band, outs=request_outs, select=select)
    return [None if slot is None else found[slot][0] for slot in slots]


def sparsification_mask(
    delta: torch.Tensor,
    *,
    method: str,
    density: float,
    gamma: float = 0.01,
    epsilon: float = 0.15,
    generator: torch.Generator | None = None,
) -> torch.Tensor | None:
    """The bool mask (shape of ``delta``) of the elements a sparsification keeps; None when it
    keeps everything (``density >= 1``). See :func:`sparsify` for the methods."""
    if density >= 1:
        return None
    if method in MAGNITUDE_THRESHOLDS:
        return magnitude_masks_batch(method, [(delta, density, gamma)])[0]
    if method == SPARSIFY_RANDOM:
        return _bernoulli_mask(delta.shape, density, generator, delta.device)
    if method == SPARSIFY_DELLA:
        if density <= 0:
            return torch.zeros_like(delta, dtype=torch.bool)
        _check_della(density, epsilon)
        return _della_mask(delta, density, epsilon, generator)
    raise ValueError(f"unknown sparsification {method!r}")


def sparsify(
    delta: torch.Tensor,
    *,
    method: str,
    density: float,
    rescale: bool = False,
    gamma: float = 0.01,
    epsilon: float = 0.15,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One expert's delta (any shape) with elements dropped; a new tensor of the same shape.

    ``magnitude``: keep the top ``max(1, int(density·n))`` by |x| (TIES).
    ``random``: keep each element with probability ``density`` (DARE).
    ``magnitude_outliers``: drop the top ``int(gamma·n)``, keep the next ``int(density·n)``
    (breadcrumbs). ``della_magprune``: per row, keep with p = density − ε + 2ε·rank/(cols−1)
    (DELLA). ``rescale`` matches the L1 norm of the kept delta to the original (mergekit).
    """
    mask = sparsification_mask(
        delta, method=method, density=density, gamma=gamma, epsilon=epsilon, generator=generator
    )
    if mask is None:
        return delta
    return _apply_mask(delta, mask, rescale)


def _stack_masks(masks: Sequence[torch.Tensor | None], like: torch.Tensor) -> torch.Tensor:
    """The experts' masks as one N x shape bool tensor (None: all kept); no copy when they
    already are the rows of one (dare's masks are drawn that way)."""
    first = masks[0]
    whole = first._base if first is not None else None
    if (
        whole is not None
        and whole.dtype == torch.bool
        and whole.shape == (len(masks), *like.shape)
        and whole.is_contiguous()
        and all(
            m is not None and m.data_ptr() == whole[i].data_ptr() and m.shape == like.shape
            for i, m in enumerate(masks)
        )
    ):
        return whole
    return torch.stack([torch.ones_like(like, dtype=torch.bool) if m is None else m for m in masks])


def expert_masks(
    method: str,
    task_vectors: torch.Tensor,
    expert_params: Sequence[Mapping[str, float | None]],
    generator: torch.Generator | None = None,
    *,
    select: Select = "auto",
) -> list[torch.Tensor | None]:
    """Each expert's ``method`` sparsification mask for one tensor (None: keeps everything);
    parameters already merged with the method's defaults. Magnitude masks share one host
    sync (``select``: see ``selection.start_top_magnitude_masks``)."""
    if method in MAGNITUDE_THRESHOLDS:
        return magnitude_masks_batch(
            method,
            [
                (task_vectors[i], float(p["density"]), float(p.get("gamma") or 0.0))  # type: ignore[arg-type]
                for i, p in enumerate(expert_params)
            ],
            select=select,
        )
    densities = [float(values["density"]) for values in expert_params]  # type: ignore[arg-type]
    if all(0 < density < 1 for density in densities):
        # drawn straight into the rows of one N x shape mask (the fused kernel reads it as is)
        stacked = torch.empty(task_vectors.shape, dtype=torch.bool, device=task_vectors.device)
        for index, values in enumerate(expert_params):
            if method == SPARSIFY_RANDOM:
                stacked[index].view(torch.uint8).bernoulli_(densities[index], generator=generator)
            else:
                epsilon = float(values.get("epsilon") or 0.0)
                _check_della(densities[index], epsilon)
                _della_mask(
                    task_vectors[index], densities[index], epsilon, generator, stacked[index]
                )
        return list(stacked.unbind(0))
    return [
        sparsification_mask(
            task_vectors[index],
            method=method,
            density=densities[index],
            epsilon=float(values.get("epsilon") or 0.0),
            generator=generator,
        )
        for index, values in enumerate(expert_params)
    ]


def sign_consensus_mask(weighted_deltas: torch.Tensor) -> torch.Tensor:
    """TIES sign election over experts: ``weighted_deltas`` is ``N x ...``; returns a bool
    ``N x ...`` mask of elements whose sign equals sign(Σ_i w_i·δ_i) (0 counts as +)."""
    majority_positive = weighted_deltas.sum(dim=0) >= 0
    # sign(x) == ±1 without a float sign tensor: x > 0 where the majority is +, x < 0 where
    # it is - (0 and NaN match neither, as their sign equals neither)
    return torch.where(majority_positive, weighted_deltas > 0, weighted_deltas < 0)


def sce(base: torch.Tensor, task_vectors: torch.Tensor, select_topk: float) -> torch.Tensor:
    """SCE (Wan et al., 2024, arXiv 2408.07990) as mergekit: keep the ``select_topk`` share of
    elements whose task vectors (N x shape) vary most across experts, weight each expert by its
    mean squared task vector, erase elements against the TIES sign, and add the weighted mean."""
    if select_topk < 1:
        task_vectors = task_vectors * _variance_mask(task_vectors, select_topk).unsqueeze(0)
    erase = sign_consensus_mask(task_vectors)
    weights = task_vectors.square().reshape(task_vectors.shape[0], -1).mean(dim=1)
    total = torch.sum(weights).item()
    weights = torch.ones_like(weights) / len(weights) if abs(total) < 1e-6 else weights / total
    weights = weights.view(-1, *([1] * (task_vectors.dim() - 1))) * erase
    merged = (task_vectors * weights).sum(dim=0)
    return base + merged / torch.sum(weights, dim=0).clamp(min=1e-6)


def _variance_mask(task_vectors: torch.Tensor, density: float) -> torch.Tensor:
    """1 at the top ``int(density · nonzero)`` elements by variance across experts, else 0."""
    if density <= 0:
        return torch.zeros_like(task_vectors[0])
    variance = torch.var(task_vectors, dim=0, unbiased=False)
    k = int(torch.count_nonzero(variance) * density)
    mask = torch.zeros_like(variance)
    if k > 0:
        mask.view(-1)[torch.topk(variance.abs().view(-1), k=k, largest=True)[1]] = 1
    return mask
