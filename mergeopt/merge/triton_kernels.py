"""Fused Triton kernels for the merge hot path on GPUs (imported only where Triton exists).

The op-by-op torch formulation of a GTA merge (mergekit's) reads and writes the N x tensor
scratch a dozen times; these kernels read each input once and write the merged tensor once,
while rounding at exactly the places where mergekit's bf16/fp16 operations round (every
intermediate is rounded to the storage dtype, ties to even, by :func:`_round`), so their
result equals the torch path element for element (tests/test_merge_methods.py pins it, on the
GPU or under ``TRITON_INTERPRET=1``). Sums over experts accumulate in fp32 in expert order, as
``torch.sum(dim=0)`` does for the expert counts a merge uses.

No fused multiply-add can form where mergekit rounds: every product is rounded before it is
added. The weighted-sum kernel is the exception by design: it is the engine's documented
one-rounding fast path (``fused_weighted_sum``), within one unit in the last place of mergekit.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

_KIND = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_BLOCK = 2048


@triton.jit
def _round(x, KIND: tl.constexpr):
    """fp32 -> fp32 holding the nearest value of the storage dtype (ties to even)."""
    if KIND == 1:
        bits = x.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
        rounded = bits.to(tl.float32, bitcast=True)
        return tl.where(x != x, x, rounded)
    elif KIND == 2:
        return x.to(tl.float16).to(tl.float32)
    else:
        return x


@triton.jit
def _weighted_delta(
    tv_ptr, mask_ptr, norm_ptr, weight_ptr, index, n, offs, inside, eps, N, RESCALE, KIND
):
    """Expert ``index``'s sparsified, rescaled, weighted delta: round(round(kept·s)·w), with
    mergekit's L1 factor s = round(before / after), or 1 when a norm is below ``eps``
    (``norm_ptr``: N norms before masking, then N after)."""
    x = tl.load(tv_ptr + index * n + offs, mask=inside, other=0).to(tl.float32)
    keep = tl.load(mask_ptr + index * n + offs, mask=inside, other=0) != 0
    x = tl.where(keep, x, 0.0)
    if RESCALE:
        before = tl.load(norm_ptr + index).to(tl.float32)
        after = tl.load(norm_ptr + N + index).to(tl.float32)
        small = (before < eps) | (after < eps)
        scale = tl.where(small, 1.0, _round(tl.math.div_rn(before, after), KIND))
        x = _round(x * scale, KIND)
    weight = tl.load(weight_ptr + index).to(tl.float32)
    return _round(x * weight, KIND)


@triton.jit
def _gta_kernel(
    base_ptr,
    tv_ptr,
    mask_ptr,
    norm_ptr,
    weight_ptr,
    out_ptr,
    n,
    lam,
    tiny,
    eps,
    N: tl.constexpr,
    RESCALE: tl.constexpr,
    CONSENSUS: tl.constexpr,
    NORMALIZE: tl.constexpr,
    SCALE_LAMBDA: tl.constexpr,
    KIND: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n
    total = tl.zeros([BLOCK], dtype=tl.float32)
    for i in tl.static_range(N):
        total += _weighted_delta(
            tv_ptr, mask_ptr, norm_ptr, weight_ptr, i, n, offs, inside, eps, N, RESCALE, KIND
        )
    if CONSENSUS:
        positive = _round(total, KIND) >= 0
        mixed = tl.zeros([BLOCK], dtype=tl.float32)
        divisor = tl.zeros([BLOCK], dtype=tl.float32)
        for i in tl.static_range(N):
            delta = _weighted_delta(
                tv_ptr, mask_ptr, norm_ptr, weight_ptr, i, n, offs, inside, eps, N, RESCALE, KIND
            )
            agree = tl.where(positive, delta > 0, delta < 0)
            mixed += tl.where(agree, delta, 0.0)
            divisor += tl.where(agree, tl.load(weight_ptr + i).to(tl.float32), 0.0)
        mixed = _round(mixed, KIND)
        divisor = _round(divisor, KIND)
        divisor = tl.where(divisor == 0, 1.0, divisor)
    else:
        mixed = _round(total, KIND)
        weight_sum = tl.load(weight_ptr).to(tl.float32) * 0
        for i in tl.static_range(N):
            weight_sum += tl.load(weight_ptr + i).to(tl.float32)
        weight_sum = _round(weight_sum, KIND)
        divisor = tl.where(tl.abs(weight_sum) < tiny, 1.0, weight_sum)
    if NORMALIZE:
        mixed = _round(tl.math.div_rn(mixed, divisor), KIND)
    if SCALE_LAMBDA:
        mixed = _round(mixed * lam, KIND)
    base = tl.load(base_ptr + offs, mask=inside, other=0).to(tl.float32)
    merged = _round(base + mixed, KIND)
    tl.store(out_ptr + offs, merged.to(out_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _weighted_sum_kernel(
    base_ptr,
    x_ptr,
    coef_ptr,
    out_ptr,
    n,
    scale,
    N: tl.constexpr,
    HAS_BASE: tl.constexpr,
    KIND: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n
    total = tl.zeros([BLOCK], dtype=tl.float32)
    for i in tl.static_range(N):
        x = tl.load(x_ptr + i * n + offs, mask=inside, other=0).to(tl.float32)
        total += tl.load(coef_ptr + i).to(tl.float32) * x
    total = total * scale
    if HAS_BASE:
        total += tl.load(base_ptr + offs, mask=inside, other=0).to(tl.float32)
    tl.store(out_ptr + offs, _round(total, KIND).to(out_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _weighted_sum_many_kernel(
    table_ptr,
    starts_ptr,
    coef_ptr,
    count,
    scale,
    N: tl.constexpr,
    HAS_BASE: tl.constexpr,
    KIND: tl.constexpr,
    DTYPE: tl.constexpr,
    MAX_TENSORS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """:func:`_weighted_sum_kernel` over several tensors in one launch: row t of the table
    holds tensor t's (base, stack, out) addresses and size, ``starts[t]`` its first program."""
    pid = tl.program_id(0)
    slots = tl.arange(0, MAX_TENSORS)
    starts = tl.load(starts_ptr + slots, mask=slots < count, other=2**30)
    t = tl.sum((starts <= pid).to(tl.int32)) - 1
    start = tl.load(starts_ptr + t)
    n = tl.load(table_ptr + t * 4 + 3)
    x_ptr = tl.load(table_ptr + t * 4 + 1).to(tl.pointer_type(DTYPE))
    out_ptr = tl.load(table_ptr + t * 4 + 2).to(tl.pointer_type(DTYPE))
    offs = (pid - start).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n
    total = tl.zeros([BLOCK], dtype=tl.float32)
    for i in tl.static_range(N):
        x = tl.load(x_ptr + i * n + offs, mask=inside, other=0).to(tl.float32)
        total += tl.load(coef_ptr + i).to(tl.float32) * x
    total = total * scale
    if HAS_BASE:
        base_ptr = tl.load(table_ptr + t * 4).to(tl.pointer_type(DTYPE))
        total += tl.load(base_ptr + offs, mask=inside, other=0).to(tl.float32)
    tl.store(out_ptr + offs, _round(total, KIND).to(DTYPE), mask=inside)


_TL_DTYPE = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@functools.lru_cache(maxsize=1024)
def _launch_tables(
    rows: tuple[tuple[int, int, int, int], ...], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The address table, program starts and program count for a set of tensors, made once
    per set of addresses (the engine's tensors and a target's parameters stay put)."""
    starts = []
    programs = 0
    for row in rows:
        starts.append(programs)
        programs += triton.cdiv(row[3], _BLOCK)
    table = torch.tensor(rows, dtype=torch.int64).to(device)
    return table, torch.tensor(starts, dtype=torch.int32).to(device), programs


def weighted_sum_many(
    items: Sequence[tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]],
    coefficients: torch.Tensor,
    *,
    scale: float,
) -> None:
    """:func:`weighted_sum` for many ``(base, stack, out)`` in one launch (all bases None or
    none; one dtype; contiguous): the engine merges a whole block with one launch."""
    count_experts = items[0][1].shape[0]
    dtype = items[0][1].dtype
    has_base = items[0][0] is not None
    rows = tuple(
        (
            base.data_ptr() if base is not None else 0,
            stack.data_ptr(),
            out.data_ptr(),
            out.numel(),
        )
        for base, stack, out in items
    )
    table, starts, programs = _launch_tables(rows, coefficients.device)
    _weighted_sum_many_kernel[(programs,)](
        table,
        starts,
        coefficients,
        len(items),
        float(scale),
        N=count_experts,
        HAS_BASE=has_base,
        KIND=_KIND[dtype],
        DTYPE=_TL_DTYPE[dtype],
        MAX_TENSORS=max(16, triton.next_power_of_2(len(items))),
        BLOCK=_BLOCK,
        num_warps=8,
    )


def gta_combine(
    base: torch.Tensor,
    task_vectors: torch.Tensor,
    masks: torch.Tensor,
    norms: torch.Tensor | None,
    weights: torch.Tensor,
    *,
    consensus: bool,
    normalize: bool,
    lam: float,
    eps: float = 1e-7,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """mergekit's GTA combination in one pass (see ``methods.generalized_task_arithmetic``).

    ``task_vectors`` N x shape (contiguous), ``masks`` N x shape uint8/bool (kept elements),
    ``weights`` N values in the task vectors' dtype; ``norms`` (2 x N, same dtype: each
    task vector's L1 norm, then its kept part's) when the kept deltas are rescaled, else None.
    """
    count = task_vectors.shape[0]
    n = base.numel()
    out = torch.empty_like(base) if out is None else out
    tiny = float(torch.tensor(1e-8, dtype=base.dtype))
    grid = (triton.cdiv(n, _BLOCK),)
    _gta_kernel[grid](
        base,
        task_vectors,
        masks.view(torch.uint8),
        norms if norms is not None else weights,
        weights,
        out,
        n,
        float(lam),
        tiny,
        float(eps),
        N=count,
        RESCALE=norms is not None,
        CONSENSUS=consensus,
        NORMALIZE=normalize,
        SCALE_LAMBDA=float(lam) != 1,
        KIND=_KIND[base.dtype],
        BLOCK=_BLOCK,
        num_warps=8,
        enable_fp_fusion=False,  # a fused multiply-add would skip a rounding mergekit does
    )
    return out


def weighted_sum(
    stack: torch.Tensor,
    coefficients: torch.Tensor,
    *,
    scale: float,
    base: torch.Tensor | None,
    out: torch.Tensor,
) -> torch.Tensor:
    """``round(base + scale·Σ c_i·stack[i])`` with fp32 accumulation, one pass."""
    count = stack.shape[0]
    n = out.numel()
    grid = (triton.cdiv(n, _BLOCK),)
    _weighted_sum_kernel[grid](
        base if base is not None else out,
        stack,
        coefficients,
        out,
        n,
        float(scale),
        N=count,
        HAS_BASE=base is not None,
        KIND=_KIND[out.dtype],
        BLOCK=_BLOCK,
        num_warps=8,
    )
    return out


@triton.jit
def _l1_partials_kernel(
    tv_ptr, mask_ptr, out_ptr, n, programs, N: tl.constexpr, BLOCK: tl.constexpr
):
    """Per tile and expert: the fp32 sums of |x| over all elements and over the kept ones."""
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n
    for i in tl.static_range(N):
        x = tl.abs(tl.load(tv_ptr + i * n + offs, mask=inside, other=0).to(tl.float32))
        keep = tl.load(mask_ptr + i * n + offs, mask=inside, other=0) != 0
        tl.store(out_ptr + i * programs + pid, tl.sum(x, 0))
        tl.store(out_ptr + (N + i) * programs + pid, tl.sum(tl.where(keep, x, 0.0), 0))


def l1_norms(task_vectors: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """The 2 x N L1 norms (each task vector's, then its kept part's) in the task vectors'
    dtype, from one pass over the task vectors and masks (no masked copy): fp32 partial sums
    per tile, summed by torch, rounded once, as ``vector_norm`` accumulates and rounds (the
    order of the fp32 additions differs, so a norm may differ in its last fp32 bit)."""
    count = task_vectors.shape[0]
    n = task_vectors[0].numel()
    block = 8192
    programs = triton.cdiv(n, block)
    partials = torch.empty((2 * count, programs), dtype=torch.float32, device=masks.device)
    _l1_partials_kernel[(programs,)](
        task_vectors, masks.view(torch.uint8), partials, n, programs, N=count, BLOCK=block,
        num_warps=8,
    )  # fmt: skip
    return partials.sum(1).view(2, count).to(task_vectors.dtype)


# ---------------------------------------------------------------------------------------------
# Exact top-k magnitude selection of 16-bit tensors, no mask or key tensor until the last pass

SELECT_BINS = 128
"""Bins of a selection's window: keys ``lo .. lo + SELECT_BINS - 2`` one bin each, the last
bin every key above (a k-th largest key there, or below ``lo``, is a miss: exact fallback)."""

_SELECT_TILE = 8192


@triton.jit
def _select_keys(x_ptr, offs, inside):
    """The 15-bit magnitude keys (|x|'s bit pattern) of 16-bit floats read as int16."""
    return tl.load(x_ptr + offs, mask=inside, other=0).to(tl.int32) & 0x7FFF


@triton.jit
def _select_lo(sample_ptr, lo_index_ptr, s, m):
    """Selection ``s``'s window start: the sorted sample's key at its lower bracket index,
    0 when that index lies past the sample (every key is in or above the window)."""
    index = tl.load(lo_index_ptr + s)
    value = tl.load(sample_ptr + tl.minimum(index, m - 1)).to(tl.int32) & 0x7FFF
    return tl.where(index < m, value, 0)


@triton.jit
def _select_resolve(hist_ptr, k_ptr, s, lo, BINS: tl.constexpr):
    """From selection ``s``'s window histogram: the k-th largest key ``t``, how many keys equal
    to it the top-k takes (``missing``), and whether the window missed it (then ``t`` is
    larger than any key and ``missing`` 0, so nothing is selected)."""
    bins = tl.arange(0, BINS)
    counts = tl.load(hist_ptr + s * BINS + bins).to(tl.int64)
    from_top = tl.cumsum(counts, 0, reverse=True)  # keys in this bin or above
    k = tl.load(k_ptr + s)
    position = tl.max(tl.where(from_top >= k, bins, -1), 0)
    miss = (position < 0) | (position == BINS - 1)
    at = tl.sum(tl.where(bins == position, from_top - counts, 0), 0)  # keys above the bin
    t = tl.where(miss, 0x8000, lo + position)
    missing = tl.where(miss, 0, k - at)
    return t, missing, miss


@triton.jit
def _select_hist_kernel(
    x_ptr,
    n,
    sample_ptr,
    m,
    lo_index_ptr,
    hist_ptr,
    T: tl.constexpr,
    BINS: tl.constexpr,
    TILE: tl.constexpr,
):
    """Pass 1: each program adds its tile's window histogram (one per selection) to the
    global one: a block-local histogram, then one atomic per non-empty bin."""
    offs = tl.program_id(0).to(tl.int64) * TILE + tl.arange(0, TILE)
    inside = offs < n
    keys = _select_keys(x_ptr, offs, inside)
    for s in tl.static_range(T):
        relative = keys - _select_lo(sample_ptr, lo_index_ptr, s, m)
        in_window = inside & (relative >= 0)
        local = tl.histogram(tl.minimum(tl.maximum(relative, 0), BINS - 1), BINS, in_window)
        bins = tl.arange(0, BINS)
        tl.atomic_add(hist_ptr + s * BINS + bins, local, mask=local != 0)


@triton.jit
def _select_equal_kernel(
    x_ptr,
    n,
    sample_ptr,
    m,
    lo_index_ptr,
    hist_ptr,
    k_ptr,
    equal_ptr,
    status_ptr,
    programs,
    T: tl.constexpr,
    BINS: tl.constexpr,
    TILE: tl.constexpr,
):
    """Pass 2: each program counts its keys equal to each selection's threshold (their
    prefix sums give the index-order rank of the ties); program 0 writes the status rows
    (threshold, ties taken, miss)."""
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * TILE + tl.arange(0, TILE)
    inside = offs < n
    keys = _select_keys(x_ptr, offs, inside)
    for s in tl.static_range(T):
        lo = _select_lo(sample_ptr, lo_index_ptr, s, m)
        t, missing, miss = _select_resolve(hist_ptr, k_ptr, s, lo, BINS)
        equal = tl.sum((inside & (keys == t)).to(tl.int32), 0)
        tl.store(equal_ptr + s * programs + pid, equal)
        if pid == 0:
            tl.store(status_ptr + s * 3, t.to(tl.int64))
            tl.store(status_ptr + s * 3 + 1, missing.to(tl.int64))
            tl.store(status_ptr + s * 3 + 2, miss.to(tl.int64))


@triton.jit
def _select_mask_kernel(
    x_ptr,
    n,
    sample_ptr,
    m,
    lo_index_ptr,
    hist_ptr,
    k_ptr,
    equal_prefix_ptr,
    out_ptr,
    programs,
    T: tl.constexpr,
    XOR: tl.constexpr,
    BINS: tl.constexpr,
    TILE: tl.constexpr,
):
    """Pass 3: the masks: keys above the threshold, plus the first ``missing`` keys equal to
    it in index order (rank = ties in earlier tiles + inclusive rank in this tile). ``XOR``:
    one mask, the first selection's minus the second's (breadcrumbs' band)."""
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * TILE + tl.arange(0, TILE)
    inside = offs < n
    keys = _select_keys(x_ptr, offs, inside)
    band = tl.zeros([TILE], dtype=tl.int1)
    for s in tl.static_range(T):
        lo = _select_lo(sample_ptr, lo_index_ptr, s, m)
        t, missing, miss = _select_resolve(hist_ptr, k_ptr, s, lo, BINS)
        equal = inside & (keys == t)
        before = tl.load(equal_prefix_ptr + s * programs + pid - 1, mask=pid > 0, other=0).to(
            tl.int64
        )
        rank = before + tl.cumsum(equal.to(tl.int32), 0).to(tl.int64)
        keep = inside & ((keys > t) | (equal & (rank <= missing)))
        if XOR:
            band = band ^ keep
        else:
            tl.store(out_ptr + s * n + offs, keep.to(tl.uint8), mask=inside)
    if XOR:
        tl.store(out_ptr + offs, band.to(tl.uint8), mask=inside)


def select_supported(x: torch.Tensor) -> bool:
    """Whether :func:`top_select` takes ``x``: contiguous 16-bit floats, under 2^31 elements."""
    sixteen_bit = x.dtype in (torch.bfloat16, torch.float16)
    return x.is_contiguous() and sixteen_bit and 0 < x.numel() < 2**31


def top_select(
    x: torch.Tensor,
    sample: torch.Tensor,
    lo_indices: torch.Tensor,
    ks: torch.Tensor,
    *,
    xor: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-``k`` magnitude masks of 16-bit ``x`` for T values of k, in three passes
    over ``x`` and no host sync (``methods.top_magnitude_masks_batch`` describes the order).

    ``sample``: magnitude keys of a sample of ``x``, sorted descending (int16);
    ``lo_indices`` (T, int32): each selection's lower bracket index into it; ``ks`` (T,
    int64). Returns the masks (T x numel uint8, or 1 x numel with ``xor``: the first mask
    minus the second) and a T x 3 int64 status (threshold key, ties taken, miss). A miss
    row's mask is empty: the caller, after its host sync, replaces it by an exact fallback.
    """
    n = x.numel()
    count = ks.numel()
    keys = x.view(-1).view(torch.int16)
    programs = triton.cdiv(n, _SELECT_TILE)
    hist = torch.zeros((count, SELECT_BINS), dtype=torch.int32, device=x.device)
    equal = torch.empty((count, programs), dtype=torch.int32, device=x.device)
    status = torch.empty((count, 3), dtype=torch.int64, device=x.device)
    common = {"T": count, "BINS": SELECT_BINS, "TILE": _SELECT_TILE, "num_warps": 8}
    m = sample.numel()
    _select_hist_kernel[(programs,)](keys, n, sample, m, lo_indices, hist, **common)
    _select_equal_kernel[(programs,)](
        keys, n, sample, m, lo_indices, hist, ks, equal, status, programs, **common
    )
    prefix = equal.cumsum(1)
    masks = torch.empty((1 if xor else count, n), dtype=torch.uint8, device=x.device)
    _select_mask_kernel[(programs,)](
        keys, n, sample, m, lo_indices, hist, ks, prefix, masks, programs, XOR=xor, **common
    )
    return masks, status


def supported(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether the kernels take these tensors (contiguous, one float dtype they know)."""
    return all(t.is_contiguous() and t.dtype in _KIND for t in tensors)
