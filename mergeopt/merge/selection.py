"""Exact magnitude top-k selection without sorting a whole tensor.

The k-th largest ``|x|`` is found from the float's bit pattern (an integer ordered like the
magnitude). Small tensors (norms, biases) are ranked by one stable sort; large ones by a
sampled bracket and an exact count (:class:`_Bracket`), on CUDA for 16-bit tensors by three
Triton passes (``triton_kernels.top_select_many``), with an exact radix select where a bracket
or window misses. Ties at the threshold are kept in index order, so a selection is a prefix of
one (magnitude descending, index ascending) order.

mergekit sorts ``|x|`` instead (TIES: ``torch.argsort(descending=True)[:k]``; breadcrumbs: a
slice of ``torch.sort`` ascending). On the CPU that sort is libstdc++'s ``std::sort``, not
stable (introsort past 16 elements), so which members of a group of tied magnitudes it keeps
depends on the whole tensor. fp32 tensors on the CPU therefore keep mergekit's members where
the threshold splits a group of equal nonzero magnitudes (:func:`_mergekit_top_masks`; ties at
zero change no merge): the group's order comes from a replay of the introsort's partitions of
the ranges that hold it (:func:`_introsort_group_order`, about two passes over the tensor),
not from a sort. 16-bit tensors tie at nearly every threshold: they keep the index order
(merges differ from mergekit's only there), and so does the GPU.

A batch of selections shares one host sync (:func:`start_top_magnitude_masks` and
:meth:`PendingTopMasks.finish`): the engine passes a whole block.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from types import ModuleType
from typing import Literal

import numpy as np
import torch

from mergeopt.merge.backend import Switches, triton_on


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


def _ties_as_mergekit(x: torch.Tensor) -> bool:
    """Whether ties at a threshold must be kept as mergekit's CPU sort keeps them: fp32 on the
    CPU (where fp32 merges must be bit-identical to mergekit's; see the module docstring)."""
    return x.dtype == torch.float32 and x.device.type == "cpu"


def _split_tied_group(sorted_keys: torch.Tensor, kept: int) -> int | None:
    """The key of the group of equal nonzero keys that keeping the first ``kept`` of these
    keys (sorted descending, more than ``kept`` of them) splits, or None. Ties at zero need no
    particular order: a zero delta adds nothing, counts in no L1 norm, and the sign election
    ignores it."""
    if kept <= 0 or kept >= sorted_keys.numel():
        return None
    last, first_left = sorted_keys[kept - 1 : kept + 1].tolist()
    return int(last) if last == first_left != 0 else None


def _split_ties_in_mask(keys: torch.Tensor, mask: torch.Tensor) -> int | None:
    """The smallest key ``mask`` (a top-k of ``keys``) keeps where it keeps some but not all
    of the keys equal to it, that key nonzero; else None (the radix fallback's check: two
    passes, rare)."""
    if not bool(mask.any()):
        return None
    threshold = int(torch.where(mask, keys, torch.iinfo(keys.dtype).max).min())
    split = threshold != 0 and bool(((keys == threshold) & ~mask).any())
    return threshold if split else None


# libstdc++'s std::sort, which torch's CPU sort of one row calls (torch.argsort and
# torch.sort, not stable: ``at::native::sort_kernel``): an introsort whose quicksort leaves
# ranges of at most this many elements to one final insertion sort.
_INTROSORT_THRESHOLD = 16

_NAN_KEY = 0x7F800001
"""Every NaN magnitude's key in the introsort's replay: torch's comparator holds all NaNs
equal and above every number (a NaN's bit pattern would order its payloads)."""


def _introsort_group_order(keys: np.ndarray, value: int) -> np.ndarray | None:
    """Where libstdc++'s ``std::sort(keys, greater)`` leaves the elements of 1-D int ``keys``
    equal to ``value``: their indices, in sorted order (``keys`` is not changed). None where
    it would heapsort (its depth limit, on adversarial inputs only).

    mergekit's sort of ``|x|`` keeps some members of a tied group and drops others, and only
    its order of the group decides which. That order follows from the quicksort's
    partitions, and only those of ranges holding two or more members matter (the final
    insertion sort never moves equal keys past each other). A range holding the group is
    partitioned here as libstdc++ does (median of three to the front, Hoare's partition with
    both scans stopping at keys equal to the pivot), with array-wide numpy passes instead of
    element swaps: about two passes over the tensor in all, instead of a sort of it.
    """
    members = np.flatnonzero(keys == value)
    n = keys.size
    if members.size < 2:
        return members
    work = keys.copy()
    at = members.copy()  # each member's position in ``work``
    flags = np.empty(n, dtype=np.bool_)
    ranges = [(0, n, 2 * (n.bit_length() - 1))]  # libstdc++'s depth limit: 2 floor(log2 n)
    while ranges:
        first, last, depth = ranges.pop()
        while last - first > _INTROSORT_THRESHOLD:
            inside = (at >= first) & (at < last)
            if np.count_nonzero(inside) < 2:
                break  # this range no longer orders members among themselves
            if depth == 0:
                return None
            depth -= 1
            # std::__move_median_to_first(first, first + 1, mid, last - 1)
            a, b, c = first + 1, first + (last - first) // 2, last - 1
            ka, kb, kc = int(work[a]), int(work[b]), int(work[c])
            if ka > kb:
                median = b if kb > kc else (c if ka > kc else a)
            elif ka > kc:
                median = a
            else:
                median = c if kb > kc else b
            work[first], work[median] = work[median], work[first]
            at = np.where(at == first, median, np.where(at == median, first, at))
            # std::__unguarded_partition(first + 1, last, pivot at first): the t-th swap
            # exchanges the t-th key <= pivot from the left with the t-th key >= pivot
            # from the right, while the former lies left of the latter
            pivot = work[first]
            span = last - first
            np.less_equal(work[first + 1 : last], pivot, out=flags[: span - 1])
            left = np.flatnonzero(flags[: span - 1])
            left += first + 1
            np.greater_equal(work[first:last], pivot, out=flags[:span])
            right = np.flatnonzero(flags[:span])[::-1] + first  # the pivot: a sentinel
            pairs = min(left.size, right.size)
            swaps = int(np.count_nonzero(left[:pairs] < right[:pairs]))
            if swaps == 0:
                cut = int(left[0])
            else:
                cut = int(right[swaps - 1])
                if swaps < left.size:
                    cut = min(cut, int(left[swaps]))
                to_right, to_left = left[:swaps], right[:swaps]
                moved = work[to_right]
                work[to_right] = work[to_left]
                work[to_left] = moved
                # members among the swapped keys move to their partners' positions
                up = to_left[::-1]
                i = np.minimum(np.searchsorted(to_right, at), swaps - 1)
                j = np.minimum(np.searchsorted(up, at), swaps - 1)
                at = np.where(
                    to_right[i] == at, to_left[i], np.where(up[j] == at, to_right[::-1][j], at)
                )
            ranges.append((cut, last, depth))  # libstdc++ recurses right, loops left
            last = cut
    return members[np.argsort(at, kind="stable")]


@functools.cache
def _introsort_replays_torch() -> bool:
    """Whether :func:`_introsort_group_order` replays this torch's CPU sort (libstdc++'s
    std::sort; a build on another C++ library sorts otherwise): checked once per process on
    1500 keys of five values, both directions, every group (some milliseconds). Where it
    does not, split tie groups fall back to torch's own sort (exact, slower)."""
    keys = torch.randint(0, 5, (1500,), generator=torch.Generator().manual_seed(0)).int()
    as_float = keys.float()
    for descending in (True, False):
        order = torch.sort(as_float, descending=descending).indices
        sorted_keys = keys[order]
        replayed = keys.numpy() if descending else -keys.numpy()
        for value in range(5):
            expected = order[sorted_keys == value].numpy()
            got = _introsort_group_order(replayed, value if descending else -value)
            if got is None or not np.array_equal(got, expected):
                return False
    return True


def _mergekit_top_masks(
    x: torch.Tensor, splits: Sequence[tuple[int, int]], band: bool
) -> list[torch.Tensor]:
    """Top-``k`` magnitude masks of ``x`` (fp32, CPU), one per ``(k, key)`` of ``splits``
    (``key``: the nonzero magnitude key of the tied group the threshold splits), keeping of
    that group the members mergekit's sort of ``|x|`` keeps: ``torch.argsort(descending=True)``
    for TIES; for breadcrumbs (``band``) ``torch.sort`` ascending, whose top ``k`` are its last
    ``k`` (its kept band ``[n - k0, n - k1)`` is then the difference of two of these masks).

    The group's order comes from a replay of that sort's partitions
    (:func:`_introsort_group_order`), or from the sort itself where the replay cannot be
    trusted (another torch build, the depth limit, NaNs)."""
    if not _introsort_replays_torch() or any(key >= _NAN_KEY for _, key in splits):
        return _sorted_top_masks(x, [k for k, _ in splits], band)
    keys = _magnitude_keys(x).numpy()
    replayed = np.minimum(keys, _NAN_KEY)  # NaNs made equal, as torch compares them
    if band:  # ascending: ``greater`` on negated keys compares as ``less`` does
        np.negative(replayed, out=replayed)
    masks = []
    for k, key in splits:
        order = _introsort_group_order(replayed, -key if band else key)
        if order is None:
            return _sorted_top_masks(x, [k for k, _ in splits], band)
        above = keys > key
        wanted = k - int(np.count_nonzero(above))
        # the top k: an ascending sort's last, a descending one's first
        above[order[order.size - wanted :] if band else order[:wanted]] = True
        masks.append(torch.from_numpy(above).view(x.shape))
    return masks


def _sorted_top_masks(x: torch.Tensor, ks: Sequence[int], band: bool) -> list[torch.Tensor]:
    """:func:`_mergekit_top_masks` by mergekit's own sort of ``|x|`` (same call, same order of
    tied magnitudes)."""
    magnitudes = x.abs().reshape(-1).float()
    if band:
        order = torch.sort(magnitudes, descending=False).indices.flip(0)
    else:
        order = torch.argsort(magnitudes, descending=True)
    masks = []
    for k in ks:
        mask = torch.zeros(magnitudes.numel(), dtype=torch.bool, device=x.device)
        mask[order[:k]] = True
        masks.append(mask.view(x.shape))
    return masks


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

    def __init__(
        self, keys: torch.Tensor, k: int, sample: torch.Tensor, *, check_ties: bool = False
    ) -> None:
        self.keys = keys
        self.k = k
        self.check_ties = check_ties
        self.split: int | None = None
        """Set by :meth:`finish` where ``check_ties`` and the mask keeps only part of the group
        of equal nonzero keys at the threshold (mergekit's sort may keep others): that key."""
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
        # count_nonzero, not sum: a bool sum first copies the mask as int64 (8 bytes an element)
        if self.above is not None:
            self.device_values.append(torch.count_nonzero(self.above))
        if self.at_least_lo is not None:
            self.device_values.append(torch.count_nonzero(self.at_least_lo))
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
            mask = _radix_top_mask(keys, k)
            self.split = _split_ties_in_mask(keys, mask) if self.check_ties else None
            return mask
        above = self.above if self.above is not None else torch.zeros_like(keys, dtype=torch.bool)
        if self.at_least_lo is None:
            inside = torch.logical_not(above)
        else:
            inside = self.at_least_lo.logical_xor_(above)
        wanted = k - count_above
        inside_count = count_at_least_lo - count_above
        if one_key:  # a single key value: the first ``wanted`` of it, in index order
            chosen = _nonzero_first(inside, wanted)
            if self.check_ties and wanted < inside_count:
                self.split = int(keys[chosen[0]]) or None
        else:
            candidates = _nonzero_first(inside, inside_count)
            ranked = torch.sort(keys[candidates], descending=True, stable=True)
            chosen = candidates[ranked.indices[:wanted]]
            if self.check_ties:
                self.split = _split_tied_group(ranked.values, wanted)
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


Select = ModuleType | None | Literal["auto"]
"""The Triton kernels a selection may use: the module, None (torch), or ``"auto"`` (decided
per tensor from its device and the environment: for calls outside a merge plan)."""


def _select_kernels(x: torch.Tensor) -> ModuleType | None:
    """``"auto"``: the Triton kernels when ``x``'s top-k can run there (CUDA, Triton, 16-bit
    floats, ``MERGEOPT_FUSED`` and ``MERGEOPT_FUSED_SELECT`` not ``0``). A merge plan decides
    this once instead (``MergePlan.select``)."""
    switches = Switches.from_env()
    kernels = triton_on(x.device, switches) if switches.select else None
    return kernels if kernels is not None and kernels.select_supported(x) else None


def _triton_selectable(x: torch.Tensor) -> bool:
    """What ``triton_kernels.select_supported`` checks, without importing Triton."""
    sixteen_bit = x.dtype in (torch.bfloat16, torch.float16)
    return x.is_contiguous() and sixteen_bit and 0 < x.numel() < 2**31


class PendingTopMasks:
    """Top-k masks whose one host sync is still to come (:func:`start_top_magnitude_masks`).

    ``masks[i]``: request i's masks (one per k; one for a band), usable when ``ready`` (the
    Triton path's masks exist before the sync) or after :meth:`finish`. ``finish`` reads every
    selection's device-side values at once: the bracket counts of the torch path, which its
    masks need, and the miss flags of the Triton path, whose masks are redone in place,
    exactly, where a window missed. Plain attributes, no properties: the engine's hot path
    reads them once per block.
    """

    def __init__(
        self,
        requests: Sequence[tuple[torch.Tensor, Sequence[int]]],
        results: list[list[torch.Tensor | None]],
        band: Sequence[bool] | None,
        brackets: list[tuple[int, int, _Bracket]],
        groups: dict[tuple[int, bool, int], list[tuple[int, list[int], torch.Tensor]]],
        statuses: list[torch.Tensor],
    ) -> None:
        self._as_mergekit: _Splits = {}
        """Masks that split tied magnitudes where mergekit's order rules (fp32 on the CPU):
        :meth:`finish` redoes them as mergekit's sort makes them."""
        self._requests = requests
        self._results = results
        self._band = band
        self._brackets = brackets
        self._groups = groups
        self._statuses = statuses
        self._finished = False
        self.ready = not brackets
        self.masks: list[list[torch.Tensor]] = self._collect() if self.ready else []

    def _collect(self) -> list[list[torch.Tensor]]:
        """Each request's masks; a band of two tops becomes their difference, a XOR (both
        are prefixes of one order). Out of place when a Triton row is involved: a redone row
        then needs the XOR again."""
        found: list[list[torch.Tensor]] = []
        for index, masks in enumerate(self._results):
            tops = [mask for mask in masks if mask is not None]
            if self._band is not None and self._band[index] and len(tops) == 2:
                tops = [
                    torch.logical_xor(tops[0], tops[1])
                    if self.ready
                    else tops[0].logical_xor_(tops[1])
                ]
            found.append(tops)
        return found

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
            if bracket.split is not None:
                self._as_mergekit.setdefault(request_index, {})[index] = bracket.split
        _redo_as_mergekit(requests, results, self._band, self._as_mergekit)
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
        if not self.ready or redone:
            self.masks = self._collect()
        return redone


_Splits = dict[int, dict[int, int]]
"""Masks that split a group of tied nonzero magnitudes: request index -> {index of its k:
the group's key}."""


def _redo_as_mergekit(
    requests: Sequence[tuple[torch.Tensor, Sequence[int]]],
    results: list[list[torch.Tensor | None]],
    band: Sequence[bool] | None,
    splits: _Splits,
) -> None:
    """Replace the masks that split a group of tied magnitudes where mergekit's order rules
    (``splits``) by the masks mergekit's sort makes; the other masks of those requests are
    prefixes of any order of the magnitudes, so a band's two tops stay prefixes of one."""
    for request_index, split in sorted(splits.items()):
        x, ks = requests[request_index]
        as_band = bool(band and band[request_index])
        indices = sorted(split)
        redone = _mergekit_top_masks(x, [(ks[i], split[i]) for i in indices], as_band)
        for index, mask in zip(indices, redone, strict=True):
            results[request_index][index] = mask
    splits.clear()


def top_magnitude_masks_batch(
    requests: Sequence[tuple[torch.Tensor, Sequence[int]]],
    *,
    band: Sequence[bool] | None = None,
    outs: Sequence[torch.Tensor | None] | None = None,
    select: Select = "auto",
) -> list[list[torch.Tensor]]:
    """:func:`start_top_magnitude_masks`, then its host sync: the finished masks."""
    pending = start_top_magnitude_masks(requests, band=band, outs=outs, select=select)
    pending.finish()
    return pending.masks


def start_top_magnitude_masks(
    requests: Sequence[tuple[torch.Tensor, Sequence[int]]],
    *,
    band: Sequence[bool] | None = None,
    outs: Sequence[torch.Tensor | None] | None = None,
    select: Select = "auto",
) -> PendingTopMasks:
    """For each request ``(x, ks)``: boolean masks (shape of ``x``) of the ``k`` elements of
    largest magnitude, one per ``k``; one host sync for the whole batch (the engine passes a
    whole block), none when every tensor is small. ``band[i]``: request i is breadcrumbs';
    with two ks, one mask instead, the first top-k minus the second (its kept band); fp32
    ties on the CPU follow mergekit's ascending sort (else its descending argsort, as for
    TIES; see the module docstring). ``outs[i]``: a
    contiguous bool tensor of ``x``'s size that the Triton path writes request i's one mask
    into and returns as it is (the engine passes the rows of one N x shape tensor, which the
    fused merge then reads without a copy); other paths return new tensors. ``select``: the
    Triton kernels (used for the tensors they take) or None, as a merge plan decided.

    Exact: elements above the k-th largest magnitude, plus as many elements equal to it as
    needed, taken in index order (fp32 on the CPU: in mergekit's order where that splits a
    group of equal nonzero magnitudes). Small tensors: one stable sort. Large ones: a sampled
    bracket and an exact count, no sort or histogram of the whole tensor: with ``select`` for
    16-bit tensors three Triton passes, each one launch for all tensors of the batch with the
    same number of ks (a window histogram below the bracket, the ties per tile, the mask;
    ``triton_kernels.top_select_many``), elsewhere :class:`_Bracket`.
    """
    results: list[list[torch.Tensor | None]] = []
    brackets: list[tuple[int, int, _Bracket]] = []
    # fused selections grouped by (number of ks, band, sample size): one launch per pass for
    # each group (a block's tensors all have full samples: one group)
    groups: dict[tuple[int, bool, int], list[tuple[int, list[int], torch.Tensor]]] = {}
    small: dict[tuple[int, torch.dtype, torch.device], list[tuple[int, int]]] = {}
    as_mergekit: _Splits = {}  # small requests' masks that split tied magnitudes (fp32, CPU)
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
        chosen = None
        if pending and n > _SORT_BELOW:
            if select == "auto":
                chosen = _select_kernels(x)
            elif select is not None and _triton_selectable(x):
                chosen = select
        if chosen is not None:
            kernels = chosen
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
                assert out is not None
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
            check_ties = _ties_as_mergekit(x)
            for index in pending:
                bracket = _Bracket(keys, ks[index], sample, check_ties=check_ties)
                brackets.append((request_index, index, bracket))
        results.append(masks)
    for (size, _, device), sorted_members in small.items():
        stacked = torch.stack([requests[r][0].reshape(-1) for r, _ in sorted_members])
        ranked = torch.sort(
            _magnitude_keys(stacked).view(stacked.shape), dim=1, descending=True, stable=True
        )
        order = ranked.indices
        ks_column = (
            torch.tensor([requests[r][1][i] for r, i in sorted_members]).to(device).view(-1, 1)
        )
        kept_ranks = torch.arange(size, device=device).view(1, -1) < ks_column
        found_small = torch.empty(stacked.shape, dtype=torch.bool, device=device)
        found_small.scatter_(1, order, kept_ranks)
        check_ties = _ties_as_mergekit(stacked)
        for row, (r, index) in enumerate(sorted_members):
            results[r][index] = found_small[row].view(requests[r][0].shape)
            split = None
            if check_ties:
                split = _split_tied_group(ranked.values[row], requests[r][1][index])
            if split is not None:
                as_mergekit.setdefault(r, {})[index] = split
    _redo_as_mergekit(requests, results, band, as_mergekit)
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
        pairs = [(requests[r][0], found) for r, _, found in members]
        statuses.append(kernels.top_select_many(pairs, positions, lo_indices, wanted, xor=as_band))
    return PendingTopMasks(requests, results, band, brackets, groups, statuses)


def top_magnitude_masks(
    x: torch.Tensor, ks: Sequence[int], *, select: Select = "auto"
) -> list[torch.Tensor]:
    """Top-``k`` magnitude masks of ``x`` for each ``k`` in ``ks`` (breadcrumbs needs two),
    sharing the sample and the host sync (see :func:`start_top_magnitude_masks`)."""
    return top_magnitude_masks_batch([(x, ks)], select=select)[0]


def top_magnitude_mask(x: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask (shape of ``x``) of the ``k`` elements of largest magnitude (exact, ties
    at the threshold in index order; see :func:`start_top_magnitude_masks`)."""
    return top_magnitude_masks(x, [k])[0]
