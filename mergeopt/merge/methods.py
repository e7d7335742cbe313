"""The fusion methods as tensor functions — the one place for the merge math.

Every task-vector method is mergekit's "generalized task arithmetic" (GTA), decomposed as

    sparsification (per expert)  x  sign consensus (across experts)  x  weighting

with one function for each factor (:func:`sparsify`, :func:`sign_consensus_mask`,
:func:`generalized_task_arithmetic`). Parameter names and defaults are mergekit 0.1.x's (see
``METHODS``); the order of floating-point operations follows mergekit's, so an fp32 merge is
bit-identical to ``mergekit-yaml`` and a bf16 merge differs only where magnitudes tie.

Papers: task arithmetic (Ilharco et al., 2023, arXiv 2212.04089); TIES (Yadav et al., 2023,
arXiv 2306.01708); DARE (Yu et al., 2024, arXiv 2311.03099); model breadcrumbs (Davari &
Belilovsky, 2024, arXiv 2312.06795); DELLA (Deep et al., 2024, arXiv 2406.11617); linear /
model soups (Wortsman et al., 2022, arXiv 2203.05482); SLERP (Shoemake, 1985).

Deliberate choices where mergekit has quirks (tested in tests/test_merge_methods.py):

- Exact magnitude top-k without sorting: the k-th largest |x| is found from a histogram of the
  magnitude's bit pattern (bf16/fp16: one 32,768-bin pass; fp32: a two-level radix histogram),
  ties at the threshold are kept in index order. mergekit's argsort keeps an unspecified subset
  of the ties, so bf16 merges may differ there (fp32 ties are practically absent).
- breadcrumbs keeps ``int(density·n)`` elements (no ``max(1, ·)`` as for TIES) and drops the top
  ``int(gamma·n)``: as in mergekit, a tensor with ``density·n < 1`` gets a zero delta, and one
  with ``gamma·n < 1`` (biases, norms) drops no outliers. Kept for oracle equality.
- Randomness (dare_*, della*) comes from an explicit ``torch.Generator`` (mergekit uses the
  global RNG), so a seed reproduces a merge on the same device; masks are Bernoulli(p) as in
  mergekit, and "rescale" is mergekit's L1-norm matching, not DARE's 1/p.
- della on a tensor with one column (ranks degenerate) keeps each element with p = density.
- ``int8_mask`` is accepted for mergekit compatibility and changes nothing (it only picks the
  dtype of mergekit's 0/1 sign mask). mergekit's ``count`` consensus is unreachable from its
  configs and is not offered; nuslerp, model_stock, karcher and the rest are not implemented.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import ModuleType

import torch

SPARSIFY_MAGNITUDE = "magnitude"
SPARSIFY_RANDOM = "random"
SPARSIFY_OUTLIERS = "magnitude_outliers"
SPARSIFY_DELLA = "della_magprune"


@dataclass(frozen=True)
class MethodSpec:
    """A merge method: its factors and its mergekit parameters with defaults.

    Attributes:
        name: mergekit's ``merge_method`` name.
        kind: ``"gta"`` (base + task vectors), ``"linear"`` or ``"slerp"`` (raw models).
        sparsification: one of the ``SPARSIFY_*`` names, or None.
        consensus: ``"sum"`` (TIES sign election) or None.
        global_defaults: method-level parameters (mergekit's SHARED scope) and defaults.
        expert_defaults: per-expert parameters and defaults; None marks a required one.
    """

    name: str
    kind: str
    sparsification: str | None = None
    consensus: str | None = None
    global_defaults: Mapping[str, float | bool] = field(default_factory=dict)
    expert_defaults: Mapping[str, float | None] = field(default_factory=dict)

    @property
    def randomized(self) -> bool:
        return self.sparsification in (SPARSIFY_RANDOM, SPARSIFY_DELLA)

    @property
    def uses_task_vectors(self) -> bool:
        return self.kind == "gta"


def _gta(
    name: str, sparsification: str | None, consensus: str | None, normalize: bool, rescale: bool
) -> MethodSpec:
    expert: dict[str, float | None] = {"weight": None, "density": 1.0}
    if sparsification == SPARSIFY_OUTLIERS:
        expert["gamma"] = 0.01
    if sparsification == SPARSIFY_DELLA:
        expert["epsilon"] = 0.15
    return MethodSpec(
        name=name,
        kind="gta",
        sparsification=sparsification,
        consensus=consensus,
        global_defaults={
            "normalize": normalize,
            "rescale": rescale,
            "lambda": 1.0,
            "int8_mask": False,
        },
        expert_defaults=expert,
    )


METHODS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        _gta("task_arithmetic", None, None, False, False),
        _gta("ties", SPARSIFY_MAGNITUDE, "sum", True, False),
        _gta("dare_ties", SPARSIFY_RANDOM, "sum", False, True),
        _gta("dare_linear", SPARSIFY_RANDOM, None, False, True),
        _gta("breadcrumbs", SPARSIFY_OUTLIERS, None, False, False),
        _gta("breadcrumbs_ties", SPARSIFY_OUTLIERS, "sum", False, False),
        _gta("della", SPARSIFY_DELLA, "sum", True, True),
        _gta("della_linear", SPARSIFY_DELLA, None, False, True),
        MethodSpec(
            name="linear",
            kind="linear",
            global_defaults={"normalize": True},
            expert_defaults={"weight": None},
        ),
        MethodSpec(name="slerp", kind="slerp", global_defaults={"t": 0.5}),
    )
}
"""mergekit's method names -> their specification (FACTS.md lists the same table)."""


def get_method(name: str) -> MethodSpec:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown merge method {name!r}; known: {', '.join(METHODS)}") from None


# ---------------------------------------------------------------------------------------------
# Exact magnitude selection without sorting


@functools.lru_cache(maxsize=256)
def _coefficients(
    values: tuple[float, ...], dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """Per-expert coefficients as a device tensor, made once per distinct value tuple (a
    host-to-device copy per merged tensor would synchronize the stream every time). Read-only."""
    return torch.tensor(values, dtype=dtype, device=device)


def _magnitude_keys(x: torch.Tensor) -> torch.Tensor:
    """Integers ordered like ``|x|`` (the float's bit pattern without the sign), flattened."""
    flat = x.reshape(-1)
    if x.dtype in (torch.bfloat16, torch.float16):
        return flat.view(torch.int16).bitwise_and(0x7FFF)
    if x.dtype == torch.float32:
        return flat.view(torch.int32).bitwise_and(0x7FFFFFFF)
    if x.dtype == torch.float64:
        return flat.view(torch.int64).bitwise_and(0x7FFFFFFFFFFFFFFF)
    raise TypeError(f"magnitude selection needs a floating tensor, got {x.dtype}")


def _kth_bin_from_top(
    counts: torch.Tensor, k: int | torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """For the k-th largest item (k >= 1): its bin and how many items lie in higher bins, as
    0-d device tensors (no host synchronization)."""
    from_top = counts.flip(0).cumsum(0)
    if isinstance(k, torch.Tensor):
        position = torch.searchsorted(from_top, k.reshape(1))[0]
    else:
        position = torch.searchsorted(from_top, k)
    position = position.clamp(max=counts.numel() - 1)
    above = torch.where(position > 0, from_top[(position - 1).clamp(min=0)], 0)
    return counts.numel() - 1 - position, above


# Digit widths of the radix select, most significant first. One 32,768-bin level for 15-bit
# keys measured faster on an H100 than two 256-bin levels (each torch.bincount also reduces
# min/max and synchronizes, so fewer levels win; docs/bench/merge-h100.md, runs 1 and 2).
_RADIX_WIDTHS = {torch.int16: (15,), torch.int32: (15, 16)}


def _kth_largest_key(keys: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k-th largest value (1-based) of non-negative integer ``keys`` (1-D), exactly, and
    the number of keys above it, as device tensors.

    A most-significant-digit radix select: one ``bincount`` per digit over the keys whose
    higher digits equal the prefix chosen so far (a spill bin takes the others): 15-bit
    bf16/fp16 magnitudes need one pass of 32,768 bins, 31-bit fp32 two (15 + 16 bits).
    64-bit keys (fp64) use kthvalue.
    """
    if keys.dtype == torch.int64:
        value = torch.kthvalue(keys, keys.numel() - k + 1).values
        return value, (keys > value).sum()
    widths = _RADIX_WIDTHS[keys.dtype]
    shift = sum(widths)
    prefix: torch.Tensor | None = None
    above: torch.Tensor | int = 0
    for width in widths:
        shift -= width
        digits = keys.bitwise_right_shift(shift).bitwise_and((1 << width) - 1)
        if prefix is None:
            counts = torch.bincount(digits, minlength=1 << width)
        else:
            matches = keys.bitwise_right_shift(shift + width) == prefix
            digits = torch.where(matches, digits + 1, 0)  # bin 0: keys of other prefixes
            counts = torch.bincount(digits, minlength=(1 << width) + 1)[1:]
        digit, more_above = _kth_bin_from_top(counts, k - above)
        above = above + more_above
        prefix = digit if prefix is None else prefix * (1 << width) + digit
    assert prefix is not None and isinstance(above, torch.Tensor)
    return prefix, above


_SORT_BELOW = 1 << 16
"""Tensors of at most this many elements are ranked by one stable sort (norms, biases)."""

_SAMPLE_SIZE = 1 << 16
"""Keys drawn (with a fixed generator) to bracket a threshold before the exact count."""

_SAMPLE_SIGMAS = 6.0
"""Half-width of the bracket in binomial standard deviations of the sample's rank: a miss
(then the radix select runs) has a probability of about 1e-9 per threshold."""


@functools.lru_cache(maxsize=128)
def _sample_positions(n: int, device: torch.device) -> torch.Tensor:
    """``min(n, _SAMPLE_SIZE)`` positions in ``[0, n)``: all of them for small ``n``, else
    drawn from a fixed CPU generator (the same positions on every device), cached. Read-only."""
    if n <= _SAMPLE_SIZE:
        return torch.arange(n, device=device)
    generator = torch.Generator().manual_seed(0x5EED)
    return torch.randint(n, (_SAMPLE_SIZE,), generator=generator).to(device)


def _nonzero_first(flags: torch.Tensor, count: int) -> torch.Tensor:
    """Positions of the first ``count`` True entries of 1-D ``flags``, in index order (the
    caller knows that at least ``count`` exist)."""
    if count <= 0:
        return torch.empty(0, dtype=torch.long, device=flags.device)
    try:
        return torch.nonzero_static(flags, size=count).view(-1)
    except (NotImplementedError, RuntimeError):  # builds without nonzero_static on the device
        return torch.nonzero(flags).view(-1)[:count]


def _radix_top_mask(keys: torch.Tensor, k: int) -> torch.Tensor:
    """Top-``k`` mask of 1-D ``keys`` by a radix select (the fallback of the bracketed
    select: exact for any input, slower on GPUs and one host sync)."""
    threshold, above = _kth_largest_key(keys, k)
    mask = keys > threshold
    equal_positions = torch.nonzero(keys == threshold).view(-1)
    missing = int(k - above.item())
    mask[equal_positions[:missing]] = True
    return mask


class _Bracket:
    """One exact top-``k`` selection of 1-D non-negative integer ``keys`` (``1 <= k < n``),
    in two phases around a host sync that a batch of selections shares.

    Phase one (the constructor, device work only): the sorted sample gives keys ``lo <= hi``
    that bracket the k-th largest key with overwhelming probability; one pass each marks the
    keys above ``hi`` and those at least ``lo``, and their counts (plus whether ``lo == hi``)
    go into ``device_values``. Phase two (:meth:`finish`, given those values on the host): if
    the bracket holds the k-th largest, the ``r = k - #(keys > hi)`` largest keys inside it
    join the mask in (key descending, index ascending) order: when ``lo == hi`` they are the
    first ``r`` positions inside it, else a stable sort of the bracket's few keys decides.
    Otherwise (a miss) the radix select runs. No histogram, no atomics.
    """

    def __init__(self, keys: torch.Tensor, k: int, sample: torch.Tensor) -> None:
        self.keys = keys
        self.k = k
        n = keys.numel()
        m = sample.numel()
        fraction = k / n
        spread = _SAMPLE_SIGMAS * math.sqrt(m * fraction * (1 - fraction)) + 4
        hi_index = min(math.floor(fraction * m - spread) - 1, m - 1)
        lo_index = max(math.ceil(fraction * m + spread), 0)
        self.device_values: list[torch.Tensor] = []
        # hi beyond the sample: nothing is "above"; lo beyond it: everything is "at least lo"
        self.above = keys > sample[hi_index] if hi_index >= 0 else None
        self.at_least_lo = keys >= sample[lo_index] if lo_index < m else None
        if self.above is not None:
            self.device_values.append(self.above.sum())
        if self.at_least_lo is not None:
            self.device_values.append(self.at_least_lo.sum())
        if self.above is not None and self.at_least_lo is not None:
            self.device_values.append(torch.eq(sample[lo_index], sample[hi_index]))

    def finish(self, values: Sequence[int]) -> torch.Tensor:
        keys, k, n = self.keys, self.k, self.keys.numel()
        read = iter(values)
        count_above = next(read) if self.above is not None else 0
        count_at_least_lo = next(read) if self.at_least_lo is not None else n
        one_key = (
            bool(next(read)) if self.above is not None and self.at_least_lo is not None else False
        )
        if not count_above < k <= count_at_least_lo:
            return _radix_top_mask(keys, k)
        above = self.above if self.above is not None else torch.zeros_like(keys, dtype=torch.bool)
        if self.at_least_lo is None:
            inside = torch.logical_not(above)
        else:
            inside = self.at_least_lo.logical_xor_(above)
        wanted = k - count_above
        if one_key:  # a single key value: the first ``wanted`` of it, in index order
            chosen = _nonzero_first(inside, wanted)
        else:
            candidates = _nonzero_first(inside, count_at_least_lo - count_above)
            order = torch.sort(keys[candidates], descending=True, stable=True).indices
            chosen = candidates[order[:wanted]]
        above[chosen] = True
        return above


def _bracket_lo_index(n: int, k: int, m: int) -> int:
    """Index into a descending sample of ``m`` keys (of ``n``) below which the k-th largest
    key lies with overwhelming probability (``_Bracket``'s lower end; ``m``: past the
    sample)."""
    fraction = k / n
    spread = _SAMPLE_SIGMAS * math.sqrt(m * fraction * (1 - fraction)) + 4
    return min(max(math.ceil(fraction * m + spread), 0), m)


@functools.lru_cache(maxsize=64)
def _stacked_sample_positions(sizes: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """The sample positions of tensors of these sizes as one R x m tensor, made once per
    block shape (the engine's blocks have two or three shapes). Read-only."""
    return torch.stack([_sample_positions(n, device) for n in sizes])


def _select_kernels(x: torch.Tensor) -> ModuleType | None:
    """The Triton kernels module when ``x``'s top-k selection can run there (see
    :func:`_fused_kernels`; 16-bit floats; ``MERGEOPT_FUSED_SELECT`` not ``0``)."""
    if os.environ.get("MERGEOPT_FUSED_SELECT", "1") == "0":
        return None
    kernels = _fused_kernels(x)
    return kernels if kernels is not None and kernels.select_supported(x) else None


class PendingTopMasks:
    """Top-k masks whose one host sync is still to come (:func:`start_top_magnitude_masks`).

    ``finish`` reads every selection's device-side values at once: the bracket counts of the
    torch path, which its masks need, and the miss flags of the Triton path, whose masks
    exist before it (in ``masks()``) and are redone in place, exactly, where a window missed.
    ``ready``: every mask is usable before ``finish`` (the engine then launches a block's merge
    first and checks it while the next block runs; a miss merges that block again).
    """

    def __init__(
        self,
        requests: Sequence[tuple[torch.Tensor, Sequence[int]]],
        results: list[list[torch.Tensor | None]],
        brackets: list[tuple[int, int, _Bracket]],
        groups: dict[tuple[int, bool, int], list[tuple[int, list[int], torch.Tensor]]],
        statuses: list[torch.Tensor],
    ) -> None:
        self._requests = requests
        self._results = results
        self._brackets = brackets
        self._groups = groups
        self._statuses = statuses
        self._finished = False

    @property
    def ready(self) -> bool:
        return not self._brackets

    def masks(self) -> list[list[torch.Tensor]]:
        """Each request's masks (in its order of ks; one for a band)."""
        assert self._finished or self.ready, "finish() first: the torch path's masks need it"
        return [[mask for mask in masks if mask is not None] for masks in self._results]

    def finish(self) -> bool:
        """The host sync; True when a Triton window missed and a mask was redone."""
        if self._finished:
            return False
        self._finished = True
        requests, results = self._requests, self._results
        device_values = [
            value for _, _, bracket in self._brackets for value in bracket.device_values
        ]
        device_values += [status[:, 2] for status in self._statuses]
        values = torch.cat([v.reshape(-1) for v in device_values]).tolist() if device_values else []
        start = 0
        for request_index, index, bracket in self._brackets:
            count = len(bracket.device_values)
            mask = bracket.finish(values[start : start + count])
            start += count
            results[request_index][index] = mask.view(requests[request_index][0].shape)
        redone = False
        for (_, as_band, _), members in self._groups.items():
            for request_index, pending, found in members:
                misses = values[start : start + len(pending)]
                start += len(pending)
                if not any(misses):
                    continue
                # a window missed (rare): that selection by the exact radix select
                redone = True
                x, ks = requests[request_index]
                keys = _magnitude_keys(x)
                if as_band:
                    exact = [_radix_top_mask(keys, ks[index]) for index in pending]
                    found[0].copy_(exact[0].logical_xor_(exact[1]).view(torch.uint8))
                    continue
                for row, (miss, index) in enumerate(zip(misses, pending, strict=True)):
                    if miss:
                        found[row].copy_(_radix_top_mask(keys, ks[index]).view(torch.uint8))
        return redone


def top_magnitude_masks_batch(
    requests: Sequence[tuple[torch.Tensor, Sequence[int]]],
    *,
    band: Sequence[bool] | None = None,
    outs: Sequence[torch.Tensor | None] | None = None,
) -> list[list[torch.Tensor]]:
    """:func:`start_top_magnitude_masks`, then its host sync: the finished masks."""
    pending = start_top_magnitude_masks(requests, band=band, outs=outs)
    pending.finish()
    return pending.masks()


def start_top_magnitude_masks(
    requests: Sequence[tuple[torch.Tensor, Sequence[int]]],
    *,
    band: Sequence[bool] | None = None,
    outs: Sequence[torch.Tensor | None] | None = None,
) -> PendingTopMasks:
    """For each request ``(x, ks)``: boolean masks (shape of ``x``) of the ``k`` elements of
    largest magnitude, one per ``k``; one host sync for the whole batch (the engine passes a
    whole block), none when every tensor is small. ``band[i]`` (request i has two ks): one
    mask instead, the first top-k minus the second (breadcrumbs' kept band). ``outs[i]``: a
    contiguous bool tensor of ``x``'s size that the Triton path writes request i's one mask
    into and returns as it is (the engine passes the rows of one N x shape tensor, which the
    fused merge then reads without a copy); other paths return new tensors.

    Exact: elements above the k-th largest magnitude, plus as many elements equal to it as
    needed, taken in index order. Small tensors: one stable sort. Large ones: a sampled
    bracket and an exact count, no sort or histogram of the whole tensor: on CUDA for 16-bit
    tensors three Triton passes, each one launch for all tensors of the batch with the same
    number of ks (a window histogram below the bracket, the ties per tile, the mask;
    ``triton_kernels.top_select_many``), elsewhere :class:`_Bracket`.
    """
    results: list[list[torch.Tensor | None]] = []
    brackets: list[tuple[int, int, _Bracket]] = []
    # fused selections grouped by (number of ks, band, sample size): one launch per pass for
    # each group (a block's tensors all have full samples: one group)
    groups: dict[tuple[int, bool, int], list[tuple[int, list[int], torch.Tensor]]] = {}
    small: dict[tuple[int, torch.dtype, torch.device], list[tuple[int, int]]] = {}
    kernels: ModuleType | None = None
    for request_index, (x, ks) in enumerate(requests):
        n = x.numel()
        masks: list[torch.Tensor | None] = [None] * len(ks)
        for index, k in enumerate(ks):
            if k >= n:
                masks[index] = torch.ones_like(x, dtype=torch.bool)
            elif k <= 0:
                masks[index] = torch.zeros_like(x, dtype=torch.bool)
        pending = [index for index, mask in enumerate(masks) if mask is None]
        select = _select_kernels(x) if pending and n > _SORT_BELOW else None
        if select is not None:
            kernels = select
            as_band = bool(band and band[request_index]) and len(pending) == 2
            rows = 1 if as_band else len(pending)
            out = outs[request_index] if outs is not None else None
            use_out = (
                rows == 1
                and out is not None
                and out.dtype == torch.bool
                and out.is_contiguous()
                and out.numel() == n
            )
            if use_out:
                assert out is not None
                found = out.view(torch.uint8).view(1, n)
            else:
                found = torch.empty((rows, n), dtype=torch.uint8, device=x.device)
            group = (len(pending), as_band, min(n, _SAMPLE_SIZE))
            groups.setdefault(group, []).append((request_index, pending, found))
            if use_out:
                # the out tensor itself, so that the fused merge sees the rows of one tensor
                masks[pending[0]] = out.view(x.shape)
            elif as_band:
                masks = [found[0].view(torch.bool).view(x.shape)]
            else:
                for row, index in enumerate(pending):
                    masks[index] = found[row].view(torch.bool).view(x.shape)
        elif pending and n <= _SORT_BELOW:
            # Small tensors (norms, biases): a stable sort beats any counting; one sort for
            # all small tensors of one size and dtype (a block's norms)
            small.setdefault((n, x.dtype, x.device), []).extend(
                (request_index, index) for index in pending
            )
        elif pending:
            keys = _magnitude_keys(x)
            positions = _sample_positions(n, keys.device)
            sample = torch.sort(keys[positions], descending=True).values
            for index in pending:
                brackets.append((request_index, index, _Bracket(keys, ks[index], sample)))
        results.append(masks)
    for (n, _, device), members in small.items():
        rows = torch.stack([requests[r][0].reshape(-1) for r, _ in members])
        order = torch.sort(
            _magnitude_keys(rows).view(rows.shape), dim=1, descending=True, stable=True
        ).indices
        ks_column = torch.tensor([requests[r][1][i] for r, i in members]).to(device).view(-1, 1)
        kept_ranks = torch.arange(n, device=device).view(1, -1) < ks_column
        found_small = torch.empty(rows.shape, dtype=torch.bool, device=device)
        found_small.scatter_(1, order, kept_ranks)
        for row, (r, index) in enumerate(members):
            results[r][index] = found_small[row].view(requests[r][0].shape)
    statuses = []
    for (_, as_band, _), members in groups.items():
        assert kernels is not None
        sizes = tuple(requests[r][0].numel() for r, _, _ in members)
        positions = _stacked_sample_positions(sizes, requests[members[0][0]][0].device)
        m = positions.shape[1]
        wanted = [requests[r][1][index] for r, pending, _ in members for index in pending]
        lo_indices = [
            _bracket_lo_index(requests[r][0].numel(), requests[r][1][index], m)
            for r, pending, _ in members
            for index in pending
        ]
        items = [(requests[r][0], found) for r, _, found in members]
        statuses.append(kernels.top_select_many(items, positions, lo_indices, wanted, xor=as_band))
    return PendingTopMasks(requests, results, brackets, groups, statuses)


def top_magnitude_masks(x: torch.Tensor, ks: Sequence[int]) -> list[torch.Tensor]:
    """Top-``k`` magnitude masks of ``x`` for each ``k`` in ``ks`` (breadcrumbs needs two),
    sharing the sample and the host sync (see :func:`top_magnitude_masks_batch`)."""
    return top_magnitude_masks_batch([(x, ks)])[0]


def top_magnitude_mask(x: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask (shape of ``x``) of the ``k`` elements of largest magnitude (exact, ties
    at the threshold in index order; see :func:`top_magnitude_masks_batch`)."""
    return top_magnitude_masks(x, [k])[0]


# ---------------------------------------------------------------------------------------------
# Sparsification (one expert's delta at a time)


def _l1_scale(
    delta: torch.Tensor, kept: torch.Tensor, eps: float = 1e-7, *, fused: bool = False
) -> torch.Tensor:
    """mergekit's L1 rescale factor (a 0-d tensor in ``delta``'s dtype): ||delta||_1 /
    ||kept||_1, or 1 where either norm is below ``eps`` (decided on the device, no sync).
    ``fused``: one reduction per norm (``vector_norm``) instead of mergekit's ``abs().sum()``
    (the same sum in another order: the factor may differ in its last bit)."""
    if fused:
        before = torch.linalg.vector_norm(delta, 1)
        after = torch.linalg.vector_norm(kept, 1)
    else:
        before = delta.abs().sum()
        after = kept.abs().sum()
    return torch.where((before < eps) | (after < eps), 1, before / after)


def _rescale_l1(delta: torch.Tensor, kept: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """mergekit's rescale: scale ``kept`` so its L1 norm equals ``delta``'s."""
    return kept * _l1_scale(delta, kept, eps)


def _apply_mask(delta: torch.Tensor, mask: torch.Tensor, rescale: bool) -> torch.Tensor:
    kept = torch.where(mask, delta, 0)
    return _rescale_l1(delta, kept) if rescale else kept


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


def _magnitude_mask_from_tops(tops: list[torch.Tensor]) -> torch.Tensor:
    # breadcrumbs: both tops are prefixes of one (magnitude, index) order, so the kept band
    # is their difference, a XOR
    return tops[0] if len(tops) == 1 else tops[0].logical_xor_(tops[1])


def magnitude_masks_batch(
    method: str,
    items: Sequence[tuple[torch.Tensor, float, float]],
    *,
    outs: Sequence[torch.Tensor | None] | None = None,
) -> list[torch.Tensor | None]:
    """Masks of a magnitude sparsification (``magnitude`` or ``magnitude_outliers``) for many
    ``(delta, density, gamma)`` at once, with one host sync in all (the engine passes every
    expert of every tensor of a block); None where ``density >= 1``. ``outs``: where the
    Triton path may write each mask (see :func:`top_magnitude_masks_batch`)."""
    pending = start_magnitude_masks(method, items, outs=outs)
    pending.finish()
    return pending.masks()


class PendingMagnitudeMasks:
    """:class:`PendingTopMasks` of a magnitude sparsification, one mask (or None) per item."""

    def __init__(self, top: PendingTopMasks, slots: list[int | None]) -> None:
        self.top = top
        self._slots = slots
        self._masks: list[torch.Tensor | None] | None = None

    @property
    def ready(self) -> bool:
        return self.top.ready

    def finish(self) -> bool:
        return self.top.finish()

    def masks(self) -> list[torch.Tensor | None]:
        """Made once (a band of two tops is their XOR in place); a redone Triton mask is
        fixed in place, so the list stays valid after ``finish``."""
        if self._masks is None:
            found = self.top.masks()
            self._masks = [
                None if slot is None else _magnitude_mask_from_tops(found[slot])
                for slot in self._slots
            ]
        return self._masks


def start_magnitude_masks(
    method: str,
    items: Sequence[tuple[torch.Tensor, float, float]],
    *,
    outs: Sequence[torch.Tensor | None] | None = None,
) -> PendingMagnitudeMasks:
    """:func:`magnitude_masks_batch` up to its host sync (see :class:`PendingTopMasks`)."""
    requests = []
    request_outs: list[torch.Tensor | None] = []
    slots: list[int | None] = []
    for index, (delta, density, gamma) in enumerate(items):
        if density >= 1:
            slots.append(None)
            continue
        slots.append(len(requests))
        requests.append((delta, _magnitude_ranks(method, delta.numel(), density, gamma)))
        request_outs.append(outs[index] if outs is not None else None)
    top = start_top_magnitude_masks(requests, band=[True] * len(requests), outs=request_outs)
    return PendingMagnitudeMasks(top, slots)


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
    if method in (SPARSIFY_MAGNITUDE, SPARSIFY_OUTLIERS):
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


# ---------------------------------------------------------------------------------------------
# Sign consensus and weighting


def sign_consensus_mask(weighted_deltas: torch.Tensor) -> torch.Tensor:
    """TIES sign election over experts: ``weighted_deltas`` is ``N x ...``; returns a bool
    ``N x ...`` mask of elements whose sign equals sign(Σ_i w_i·δ_i) (0 counts as +)."""
    majority_positive = weighted_deltas.sum(dim=0) >= 0
    majority_sign = majority_positive.to(weighted_deltas.dtype) * 2 - 1
    return weighted_deltas.sign() == majority_sign


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


def _fused_kernels(*tensors: torch.Tensor) -> ModuleType | None:
    """The Triton kernels module when these tensors can use it (CUDA, Triton importable,
    ``MERGEOPT_FUSED`` not ``0``), else None (the torch path runs)."""
    if not tensors[0].is_cuda or os.environ.get("MERGEOPT_FUSED", "1") == "0":
        return None
    try:
        from mergeopt.merge import triton_kernels
    except ImportError:
        return None
    return triton_kernels if triton_kernels.supported(tensors) else None


def expert_masks(
    spec: MethodSpec,
    task_vectors: torch.Tensor,
    expert_params: Sequence[Mapping[str, float | None]],
    generator: torch.Generator | None = None,
) -> list[torch.Tensor | None]:
    """Each expert's sparsification mask for one tensor (None: keeps everything); parameters
    already merged with the method's defaults. Magnitude masks share one host sync."""
    method = spec.sparsification
    assert method is not None
    if method in (SPARSIFY_MAGNITUDE, SPARSIFY_OUTLIERS):
        return magnitude_masks_batch(
            method,
            [
                (task_vectors[i], float(p["density"]), float(p.get("gamma") or 0.0))  # type: ignore[arg-type]
                for i, p in enumerate(expert_params)
            ],
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


def _draws_in_kernel(spec: MethodSpec, expert_params: Sequence[Mapping[str, float | None]]) -> bool:
    """Whether the fused kernels draw this merge's masks (DARE, every density in (0, 1);
    ``MERGEOPT_FUSED_DRAWS=0``: torch's Bernoulli draws, masks in memory)."""
    return (
        spec.sparsification == SPARSIFY_RANDOM
        and os.environ.get("MERGEOPT_FUSED_DRAWS", "1") != "0"
        and all(0 < float(values["density"]) < 1 for values in expert_params)
    )


def _kernel_seed(generator: torch.Generator | None) -> int:
    """The Philox seed of in-kernel draws: the generator's seed (the engine seeds one per
    tensor from the trial), else a fresh one from torch's default generator."""
    if generator is not None:
        return generator.initial_seed() & (2**63 - 1)
    return int(torch.randint(0, 2**62, (1,)).item())


def generalized_task_arithmetic(
    base: torch.Tensor,
    task_vectors: torch.Tensor,
    *,
    spec: MethodSpec,
    expert_params: Sequence[Mapping[str, float]],
    method_params: Mapping[str, float | bool],
    generator: torch.Generator | None = None,
    fused: bool | None = None,
    masks: Sequence[torch.Tensor | None] | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Merged tensor (shape of ``base``) from ``base`` and stacked ``task_vectors`` (N x shape).

    ``expert_params[i]`` holds expert i's ``weight`` (required), ``density``, ``gamma``,
    ``epsilon``; ``method_params`` the method-level ``normalize``, ``rescale``, ``lambda``.
    ``task_vectors`` is read, never modified. On CUDA with Triton (``fused`` None or True) the
    masks are made here and one kernel does the rest, rounding where the torch path rounds.
    ``masks``: the sparsification masks when the caller made them already (the engine makes a
    block's magnitude masks together, one host sync per block). ``out``: where the fused
    kernel may write the result (the engine passes the target's parameter, saving a copy);
    the torch path returns a new tensor.
    """
    params = {**spec.global_defaults, **method_params}
    expert = [{**spec.expert_defaults, **p} for p in expert_params]
    rescale = bool(params["rescale"])
    weights = _coefficients(
        tuple(float(values["weight"]) for values in expert),  # type: ignore[arg-type]
        task_vectors.dtype,
        task_vectors.device,
    )
    kernels = _fused_kernels(base, task_vectors) if fused is not False else None
    draws = None
    if masks is not None:
        masks = list(masks)
    elif kernels is not None and _draws_in_kernel(spec, expert):
        # DARE on the GPU: the kernels draw the masks themselves (no mask in memory, no
        # Bernoulli launches); the same seed on the same device gives the same merge
        densities = tuple(float(values["density"]) for values in expert)  # type: ignore[arg-type]
        draws = kernels.DrawnMasks(
            seed=_kernel_seed(generator),
            densities=_coefficients(densities, torch.float32, base.device),
        )
        masks = [None] * len(expert)
    else:
        masks = [None] * len(expert)
        if spec.sparsification is not None:
            masks = expert_masks(spec, task_vectors, expert, generator)
    if kernels is not None:
        stacked = None if draws is not None else _stack_masks(masks, base)
        norms = None
        if rescale and (draws is not None or any(m is not None for m in masks)):
            # mergekit's L1 norms before and after masking, all experts in three ops; an
            # expert without a mask has equal norms, hence the factor 1 (exactly)
            if draws is not None or os.environ.get("MERGEOPT_FUSED_L1", "1") != "0":
                # one Triton pass over task vectors and masks, no masked copy
                norms = kernels.l1_norms(task_vectors, stacked, draws=draws)
            else:
                assert stacked is not None
                rows = task_vectors.view(len(masks), -1)
                norms = torch.stack(
                    [
                        torch.linalg.vector_norm(rows, 1, dim=1),
                        torch.linalg.vector_norm(
                            torch.where(stacked.view(len(masks), -1), rows, 0), 1, dim=1
                        ),
                    ]
                )
        return kernels.gta_combine(
            base,
            task_vectors,
            stacked,
            norms,
            weights,
            consensus=spec.consensus == "sum",
            normalize=bool(params["normalize"]),
            lam=float(params["lambda"]),
            out=out,
            draws=draws,
        )
    if spec.sparsification is not None:
        deltas = torch.empty_like(task_vectors)
        for index, mask in enumerate(masks):
            if mask is None:
                deltas[index] = task_vectors[index]
            else:
                deltas[index] = task_vectors[index]
                deltas[index].masked_fill_(~mask, 0)
                if rescale:
                    deltas[index] *= _l1_scale(task_vectors[index], deltas[index])
        deltas.mul_(weights.view(-1, *([1] * base.dim())))
    else:
        deltas = task_vectors * weights.view(-1, *([1] * base.dim()))
    weights = weights.view(-1, *([1] * base.dim()))
    if spec.consensus == "sum":
        mask = sign_consensus_mask(deltas)
        mixed = (deltas * mask).sum(dim=0)
        divisor = (weights * mask).sum(dim=0)
        divisor.masked_fill_(divisor == 0, 1)  # no boolean indexing: it synchronizes
    else:
        mixed = deltas.sum(dim=0)
        divisor = weights.sum(dim=0)
        divisor.masked_fill_(divisor.abs() < 1e-8, 1)
    if params["normalize"]:
        mixed /= divisor
    if float(params["lambda"]) != 1:
        mixed *= float(params["lambda"])
    return (base + mixed).to(base.dtype)


def linear(
    models: torch.Tensor,
    *,
    weights: Sequence[float],
    normalize: bool = True,
) -> torch.Tensor:
    """Σ_i w_i·x_i (divided by Σ_i w_i when ``normalize``) of stacked ``models`` (N x shape),
    computed in fp32 (fp64 for fp64 inputs) as mergekit does; returns the input dtype."""
    first = models[0]
    dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
    coefficients = torch.tensor(list(weights), dtype=dtype, device=models.device)
    result = torch.zeros_like(first, dtype=dtype)
    for index in range(models.shape[0]):
        result.addcmul_(models[index], coefficients[index])
    if normalize:
        result.div_(coefficients.sum())
    return result.to(first.dtype)


def slerp(
    t: float, v0: torch.Tensor, v1: torch.Tensor, *, dot_threshold: float = 0.9995
) -> torch.Tensor:
    """Spherical interpolation between ``v0`` (t = 0) and ``v1`` (t = 1), same shape, over the
    whole tensor; falls back to lerp when the normalized tensors are nearly (anti)parallel."""
    dtype = torch.float64 if v0.dtype == torch.float64 else torch.float32
    a = v0.reshape(1, -1).to(dtype)
    b = v1.reshape(1, -1).to(dtype)
    if a.shape[1] == 0:
        return v0.clone()
    norm_a = torch.linalg.vector_norm(a, dim=1, keepdim=True)
    norm_b = torch.linalg.vector_norm(b, dim=1, keepdim=True)
    norm_a = torch.where(norm_a > 1e-8, norm_a, 1)
    norm_b = torch.where(norm_b > 1e-8, norm_b, 1)
    dot = ((a / norm_a) * (b / norm_b)).sum(dim=1, keepdim=True).clamp(-1, 1)
    nearly_parallel = dot.abs() > dot_threshold
    theta = torch.acos(torch.where(nearly_parallel, 0, dot))
    sin_theta = torch.sin(theta)
    t_tensor = torch.tensor(t, dtype=dtype, device=v0.device)
    coef_a = torch.where(
        nearly_parallel, 1 - t_tensor, torch.sin((1 - t_tensor) * theta) / sin_theta
    )
    coef_b = torch.where(nearly_parallel, t_tensor, torch.sin(t_tensor * theta) / sin_theta)
    return (coef_a * a + coef_b * b).reshape(v0.shape).to(v0.dtype)


def fused_weighted_sum(
    stack: torch.Tensor,
    coefficients: Sequence[float],
    *,
    scale: float = 1.0,
    base: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``base + scale · Σ_i c_i·stack[i]`` (``base`` optional) in one pass over the inputs.

    ``stack`` is N x shape; the sum is a (1 x N)·(N x numel) matrix product (``addmm``) that
    reads each input once, accumulates in fp32 and rounds once — the engine's fast path for
    task_arithmetic and linear on GPUs (a bf16 result may differ from mergekit's op-by-op
    rounding by one unit in the last place). ``out`` (shape of one tensor) receives it.
    """
    count = stack.shape[0]
    shape = stack.shape[1:]
    kernels = _fused_kernels(stack, *(t for t in (base, out) if t is not None))
    if kernels is not None:
        # one Triton pass: same fp32 accumulation and single rounding as the addmm below
        coefficient_tensor = _coefficients(tuple(coefficients), stack.dtype, stack.device)
        target_tensor = (
            out if out is not None else torch.empty(shape, dtype=stack.dtype, device=stack.device)
        )
        return kernels.weighted_sum(
            stack, coefficient_tensor, scale=scale, base=base, out=target_tensor
        ).view(shape)
    matrix = stack.reshape(count, -1)
    row = _coefficients(tuple(coefficients), stack.dtype, stack.device).view(1, -1)
    target = out.view(1, -1) if out is not None else None
    if base is None:
        result = torch.mm(row, matrix, out=target) if scale == 1 else None
        if result is None:
            result = torch.addmm(matrix[:1], row, matrix, beta=0, alpha=scale, out=target)
    else:
        result = torch.addmm(base.reshape(1, -1), row, matrix, alpha=scale, out=target)
    return result.view(shape)


@functools.lru_cache(maxsize=256)
def _rounded_sum(weights: tuple[float, ...], dtype: torch.dtype) -> float:
    """Σ weights after rounding each to ``dtype`` as mergekit does (cached: this runs for
    every tensor of a merge, and CPU tensor ops cost more than the GPU work of small ones)."""
    return sum(torch.tensor(weights, dtype=dtype).to(torch.float64).tolist())


def _weighted_sum_plan(
    spec: MethodSpec,
    expert_params: Sequence[Mapping[str, float]],
    method_params: Mapping[str, float | bool],
    dtype: torch.dtype,
) -> tuple[list[float], float, bool] | None:
    """(coefficients, scale, uses base) when the method is a weighted sum (task_arithmetic,
    linear), else None; task_arithmetic's divisor sums the weights as mergekit rounds them
    (to the tensors' ``dtype``)."""
    params = {**spec.global_defaults, **method_params}
    if spec.kind == "gta" and spec.sparsification is None and spec.consensus is None:
        weights = [float(p["weight"]) for p in expert_params]
        divisor = _rounded_sum(tuple(weights), dtype)
        divisor = divisor if abs(divisor) >= 1e-8 else 1.0
        scale = float(params["lambda"]) / (divisor if params["normalize"] else 1.0)
        return weights, scale, True
    if spec.kind == "linear":
        weights = [float(p["weight"]) for p in expert_params]
        scale = 1.0 / sum(weights) if params["normalize"] else 1.0
        return weights, scale, False
    return None


def fast_merge_tensor(
    spec: MethodSpec,
    *,
    base: torch.Tensor | None,
    stack: torch.Tensor,
    expert_params: Sequence[Mapping[str, float]],
    method_params: Mapping[str, float | bool],
    out: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """One-pass merge for methods that are a weighted sum (task_arithmetic, linear);
    None for the others (use :func:`merge_tensor`)."""
    plan = _weighted_sum_plan(spec, expert_params, method_params, stack.dtype)
    if plan is None:
        return None
    weights, scale, uses_base = plan
    if uses_base:
        assert base is not None
        return fused_weighted_sum(stack, weights, scale=scale, base=base, out=out)
    return fused_weighted_sum(stack, weights, scale=scale, out=out)


def fast_merge_block(
    spec: MethodSpec,
    *,
    items: Sequence[tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None]],
    expert_params: Sequence[Mapping[str, float]],
    method_params: Mapping[str, float | bool],
) -> list[torch.Tensor] | None:
    """:func:`fast_merge_tensor` for many ``(base, stack, out)`` at once: one Triton launch
    for a whole block on CUDA (per-tensor launches cost more host time than a small tensor's
    device time). None where that path does not apply (then merge tensor by tensor)."""
    if not items or os.environ.get("MERGEOPT_FUSED_BLOCK", "1") == "0":
        return None
    stacks = [stack for _, stack, _ in items]
    plan = _weighted_sum_plan(spec, expert_params, method_params, stacks[0].dtype)
    if plan is None:
        return None
    weights, scale, uses_base = plan
    bases = [base for base, _, _ in items] if uses_base else []
    outs = [out for _, _, out in items if out is not None]
    kernels = _fused_kernels(*stacks, *(b for b in bases if b is not None), *outs)
    if kernels is None or any(s.dtype != stacks[0].dtype for s in stacks):
        return None
    if uses_base and any(b is None or b.dtype != stacks[0].dtype for b in bases):
        return None
    merged = [out if out is not None else torch.empty_like(stack[0]) for _, stack, out in items]
    coefficients = _coefficients(tuple(weights), stacks[0].dtype, stacks[0].device)
    kernels.weighted_sum_many(
        [
            (base if uses_base else None, stack, out)
            for (base, stack, _), out in zip(items, merged, strict=True)
        ],
        coefficients,
        scale=scale,
    )
    return merged


def merge_tensor(
    spec: MethodSpec,
    *,
    base: torch.Tensor | None,
    stack: torch.Tensor,
    expert_params: Sequence[Mapping[str, float]],
    method_params: Mapping[str, float | bool],
    generator: torch.Generator | None = None,
    masks: Sequence[torch.Tensor | None] | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dispatch one tensor's merge. ``stack`` is N x shape: task vectors for GTA methods, raw
    expert tensors for linear/slerp (slerp: ``base`` is v0, ``stack[0]`` is v1). ``masks``:
    precomputed sparsification masks for GTA methods, ``out`` where their fused kernel may
    write (see :func:`generalized_task_arithmetic`)."""
    if spec.kind == "gta":
        assert base is not None
        return generalized_task_arithmetic(
            base,
            stack,
            spec=spec,
            expert_params=expert_params,
            method_params=method_params,
            generator=generator,
            masks=masks,
            out=out,
        )
    params = {**spec.global_defaults, **method_params}
    if spec.kind == "linear":
        return linear(
            stack,
            weights=[float(p["weight"]) for p in expert_params],
            normalize=bool(params["normalize"]),
        )
    if spec.kind == "slerp":
        assert base is not None
        t = float(expert_params[0].get("t", params["t"])) if expert_params else float(params["t"])
        return slerp(t, base, stack[0])
    raise ValueError(f"unknown method kind {spec.kind!r}")
