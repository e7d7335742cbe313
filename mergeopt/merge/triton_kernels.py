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

import dataclasses
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
def _kept(mask_ptr, density_ptr, seed, index, n, offs, inside, DRAW: tl.constexpr):
    """Whether expert ``index`` keeps the elements at ``offs``: read from its mask row
    (``DRAW`` 0), or (``DRAW`` 1, DARE) a Bernoulli(density) draw, uniform < density, from
    Philox at counter (``seed``, index·n + offset), so every pass that asks draws the same
    mask; ``DRAW`` 2: every element (no mask)."""
    if DRAW == 2:
        return inside
    if DRAW:
        uniform = tl.rand(seed, offs + index * n)
        return inside & (uniform < tl.load(density_ptr + index))
    return tl.load(mask_ptr + index * n + offs, mask=inside, other=0) != 0


@triton.jit
def _draw_masks_kernel(out_ptr, density_ptr, seed, n, N: tl.constexpr, BLOCK: tl.constexpr):
    """The masks :func:`_kept` draws, written out (for checks and tests)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n
    for i in tl.static_range(N):
        keep = _kept(out_ptr, density_ptr, seed, i, n, offs, inside, True)
        tl.store(out_ptr + i * n + offs, keep.to(tl.uint8), mask=inside)


@triton.jit
def _weighted_delta(
    tv_ptr,
    mask_ptr,
    density_ptr,
    seed,
    norm_ptr,
    weight_ptr,
    index,
    n,
    offs,
    inside,
    eps,
    N,
    RESCALE,
    KIND,
    DRAW: tl.constexpr,
):
    """Expert ``index``'s sparsified, rescaled, weighted delta: round(round(kept·s)·w), with
    mergekit's L1 factor s = round(before / after), or 1 when a norm is below ``eps``
    (``norm_ptr``: N norms before masking, then N after)."""
    x = tl.load(tv_ptr + index * n + offs, mask=inside, other=0).to(tl.float32)
    keep = _kept(mask_ptr, density_ptr, seed, index, n, offs, inside, DRAW)
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
    density_ptr,
    seed,
    norm_ptr,
    weight_ptr,
    weight_sum_ptr,
    out_ptr,
    n,
    lam,
    tiny,
    eps,
    floor,
    N: tl.constexpr,
    RESCALE: tl.constexpr,
    CONSENSUS: tl.constexpr,
    NORMALIZE: tl.constexpr,
    SCALE_LAMBDA: tl.constexpr,
    KIND: tl.constexpr,
    DRAW: tl.constexpr,
    SIGN_OF_SUM: tl.constexpr,
    FLOOR: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """mergekit's GTA combination (see :func:`gta_combine`); ``SIGN_OF_SUM``: the sign election
    on the unweighted sum of the kept task vectors and agreement by their own signs (SCE), not
    by the weighted ones; ``FLOOR``: the
    normalizing divisor floored at ``floor`` (SCE's clamp) instead of 1 where it is 0."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n
    total = tl.zeros([BLOCK], dtype=tl.float32)
    for i in tl.static_range(N):
        if SIGN_OF_SUM:
            x = tl.load(tv_ptr + i * n + offs, mask=inside, other=0).to(tl.float32)
            keep = _kept(mask_ptr, density_ptr, seed, i, n, offs, inside, DRAW)
            total += tl.where(keep, x, 0.0)
        else:
            total += _weighted_delta(
                tv_ptr, mask_ptr, density_ptr, seed, norm_ptr, weight_ptr, i, n, offs, inside,
                eps, N, RESCALE, KIND, DRAW,
            )  # fmt: skip
    if CONSENSUS:
        positive = _round(total, KIND) >= 0
        mixed = tl.zeros([BLOCK], dtype=tl.float32)
        divisor = tl.zeros([BLOCK], dtype=tl.float32)
        for i in tl.static_range(N):
            delta = _weighted_delta(
                tv_ptr, mask_ptr, density_ptr, seed, norm_ptr, weight_ptr, i, n, offs, inside,
                eps, N, RESCALE, KIND, DRAW,
            )  # fmt: skip
            if SIGN_OF_SUM:  # SCE erases by each task vector's own sign, not the product's
                x = tl.load(tv_ptr + i * n + offs, mask=inside, other=0).to(tl.float32)
                keep = _kept(mask_ptr, density_ptr, seed, i, n, offs, inside, DRAW)
                x = tl.where(keep, x, 0.0)
                agree = tl.where(positive, x > 0, x < 0)
            else:
                agree = tl.where(positive, delta > 0, delta < 0)
            mixed += tl.where(agree, delta, 0.0)
            divisor += tl.where(agree, tl.load(weight_ptr + i).to(tl.float32), 0.0)
        mixed = _round(mixed, KIND)
        divisor = _round(divisor, KIND)
        if FLOOR:  # noqa: SIM108 (a constexpr branch, compiled away)
            divisor = tl.maximum(divisor, floor)
        else:
            divisor = tl.where(divisor == 0, 1.0, divisor)
    else:
        mixed = _round(total, KIND)
        weight_sum = tl.load(weight_sum_ptr).to(tl.float32)
        divisor = tl.where(tl.abs(weight_sum) < tiny, 1.0, weight_sum)
    if NORMALIZE:
        mixed = _round(tl.math.div_rn(mixed, divisor), KIND)
    if SCALE_LAMBDA:
        mixed = _round(mixed * lam, KIND)
    base = tl.load(base_ptr + offs, mask=inside, other=0).to(tl.float32)
    merged = _round(base + mixed, KIND)
    tl.store(out_ptr + offs, merged.to(out_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _weighted_total(x_ptr, coef_ptr, n, offs, inside, scale, N: tl.constexpr, BLOCK: tl.constexpr):
    """``scale * sum_i coef[i] * x[i]`` in float32 over one program's elements (both weighted-sum
    kernels; Triton inlines it, so the arithmetic and its order are the kernels' own)."""
    total = tl.zeros([BLOCK], dtype=tl.float32)
    for i in tl.static_range(N):
        x = tl.load(x_ptr + i * n + offs, mask=inside, other=0).to(tl.float32)
        total += tl.load(coef_ptr + i).to(tl.float32) * x
    return total * scale


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
    total = _weighted_total(x_ptr, coef_ptr, n, offs, inside, scale, N, BLOCK)
    if HAS_BASE:
        total += tl.load(base_ptr + offs, mask=inside, other=0).to(tl.float32)
    tl.store(out_ptr + offs, _round(total, KIND).to(out_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _launch_row(
    table_ptr, starts_ptr, count, WIDTH: tl.constexpr, MAX_TENSORS: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    """This program's tensor t in a launch table of ``WIDTH`` columns (its size in column 3)
    and the offsets of its tile there: (t, offs, inside)."""
    pid = tl.program_id(0)
    slots = tl.arange(0, MAX_TENSORS)
    starts = tl.load(starts_ptr + slots, mask=slots < count, other=2**30)
    t = tl.sum((starts <= pid).to(tl.int32)) - 1
    start = tl.load(starts_ptr + t)
    n = tl.load(table_ptr + t * WIDTH + 3)
    offs = (pid - start).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    return t, offs, offs < n


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
    t, offs, inside = _launch_row(table_ptr, starts_ptr, count, 4, MAX_TENSORS, BLOCK)
    n = tl.load(table_ptr + t * 4 + 3)
    x_ptr = tl.load(table_ptr + t * 4 + 1).to(tl.pointer_type(DTYPE))
    out_ptr = tl.load(table_ptr + t * 4 + 2).to(tl.pointer_type(DTYPE))
    total = _weighted_total(x_ptr, coef_ptr, n, offs, inside, scale, N, BLOCK)
    if HAS_BASE:
        base_ptr = tl.load(table_ptr + t * 4).to(tl.pointer_type(DTYPE))
        total += tl.load(base_ptr + offs, mask=inside, other=0).to(tl.float32)
    tl.store(out_ptr + offs, _round(total, KIND).to(DTYPE), mask=inside)


_TL_DTYPE = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@functools.lru_cache(maxsize=1024)
def _launch_tables(
    rows: tuple[tuple[int, ...], ...], device: torch.device
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


@functools.lru_cache(maxsize=8)
def _tiny(dtype: torch.dtype) -> float:
    """1e-8 rounded to ``dtype`` (mergekit's zero-divisor test), computed once per dtype."""
    return _in_dtype(1e-8, dtype)


@functools.lru_cache(maxsize=64)
def _in_dtype(value: float, dtype: torch.dtype) -> float:
    """``value`` rounded to ``dtype``, as a constant of mergekit's operations in it is."""
    return float(torch.tensor(value, dtype=dtype))


def gta_combine(
    base: torch.Tensor,
    task_vectors: torch.Tensor,
    masks: torch.Tensor | None,
    norms: torch.Tensor | None,
    weights: torch.Tensor,
    *,
    consensus: bool,
    normalize: bool,
    lam: float,
    eps: float = 1e-7,
    out: torch.Tensor | None = None,
    draws: DrawnMasks | None = None,
    sign_of_sum: bool = False,
    floor: float | None = None,
) -> torch.Tensor:
    """mergekit's GTA combination in one pass (see ``methods.generalized_task_arithmetic``).

    ``task_vectors`` N x shape (contiguous), ``masks`` N x shape uint8/bool (kept elements;
    None with no ``draws``: every element), ``weights`` N values in the task vectors' dtype;
    ``norms`` (2 x N, same dtype: each task vector's L1 norm, then its kept part's) when the
    kept deltas are rescaled, else None. ``draws`` instead of ``masks``: DARE's masks drawn
    inside the kernel (:class:`DrawnMasks`). SCE's variant: ``sign_of_sum`` elects the sign
    on the unweighted sum, ``floor`` floors the normalizing divisor.
    """
    count = task_vectors.shape[0]
    n = base.numel()
    out = torch.empty_like(base) if out is None else out
    tiny = _tiny(base.dtype)
    grid = (triton.cdiv(n, _BLOCK),)
    mask_ptr, density_ptr, seed, draw = _mask_arguments(masks, draws, weights)
    # Without consensus the divisor is the weights' sum, summed by torch as the torch path sums
    # it: on CUDA its reduction adds three values in another order than left to right, which
    # can move an fp32 sum by a place (and every normalized value with it).
    weight_sum = weights.view(-1, 1).sum(dim=0) if normalize and not consensus else weights
    _gta_kernel[grid](
        base,
        task_vectors,
        mask_ptr,
        density_ptr,
        seed,
        norms if norms is not None else weights,
        weights,
        weight_sum,
        out,
        n,
        float(lam),
        tiny,
        float(eps),
        0.0 if floor is None else _in_dtype(floor, base.dtype),  # clamp(min=floor) in the dtype
        N=count,
        RESCALE=norms is not None,
        CONSENSUS=consensus,
        NORMALIZE=normalize,
        SCALE_LAMBDA=float(lam) != 1,
        KIND=_KIND[base.dtype],
        DRAW=draw,
        SIGN_OF_SUM=sign_of_sum,
        FLOOR=floor is not None,
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


# ---------------------------------------------------------------------------------------------
# Pairs of many tensors (SLERP, the Karcher mean of two, Multi-SLERP and Model Stock of two
# around a base): one pass for the sums, one for the result c0·x0 + c1·x1 (+ the base) with
# coefficients the caller computes from the sums


@triton.jit
def _pair_operands(
    table_ptr, t, offs, inside, AROUND_BASE: tl.constexpr, COMPUTE: tl.constexpr,
    DTYPE: tl.constexpr,
):  # fmt: skip
    """Row t's x0 and x1 over the tile in ``COMPUTE`` (16-bit values widened through fp32,
    each step exact), and its base (x0 again without ``AROUND_BASE``: unused then)."""
    a_ptr = tl.load(table_ptr + t * 5).to(tl.pointer_type(DTYPE))
    b_ptr = tl.load(table_ptr + t * 5 + 1).to(tl.pointer_type(DTYPE))
    a = tl.load(a_ptr + offs, mask=inside, other=0).to(tl.float32).to(COMPUTE)
    b = tl.load(b_ptr + offs, mask=inside, other=0).to(tl.float32).to(COMPUTE)
    base = a
    if AROUND_BASE:
        base_ptr = tl.load(table_ptr + t * 5 + 4).to(tl.pointer_type(DTYPE))
        base = tl.load(base_ptr + offs, mask=inside, other=0).to(tl.float32).to(COMPUTE)
    return a, b, base


@triton.jit
def _pair_sums_many_kernel(
    table_ptr,
    starts_ptr,
    partial_ptr,
    count,
    AROUND_BASE: tl.constexpr,
    DTYPE: tl.constexpr,
    MAX_TENSORS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Per program of the launch table (row t: x0, x1, out addresses, size, base address): the
    fp64 sums of x0², x1² and x0·x1 over its tile, at ``partial_ptr[3·pid ...]``; with
    ``AROUND_BASE``, of x0 − base and x1 − base. In fp64 because the Karcher and Multi-SLERP
    rules cancel the sums (|mean|² is 0.5·(1 + cos)) for nearly opposite pairs."""
    pid = tl.program_id(0)
    t, offs, inside = _launch_row(table_ptr, starts_ptr, count, 5, MAX_TENSORS, BLOCK)
    a, b, base = _pair_operands(table_ptr, t, offs, inside, AROUND_BASE, tl.float64, DTYPE)
    if AROUND_BASE:
        a = a - base
        b = b - base
    tl.store(partial_ptr + pid * 3, tl.sum(a * a, 0))
    tl.store(partial_ptr + pid * 3 + 1, tl.sum(b * b, 0))
    tl.store(partial_ptr + pid * 3 + 2, tl.sum(a * b, 0))


@triton.jit
def _pair_reduce_kernel(partial_ptr, starts_ptr, ends_ptr, sums_ptr, CHUNK: tl.constexpr):
    """Tensor t's three sums from its programs' partials, in fp64, in a fixed order (the same
    inputs give the same bits)."""
    t = tl.program_id(0)
    start = tl.load(starts_ptr + t)
    end = tl.load(ends_ptr + t)
    rows = tl.arange(0, CHUNK)
    aa = tl.zeros([CHUNK], dtype=tl.float64)
    bb = tl.zeros([CHUNK], dtype=tl.float64)
    ab = tl.zeros([CHUNK], dtype=tl.float64)
    for first in range(start, end, CHUNK):
        inside = first + rows < end
        at = partial_ptr + (first + rows).to(tl.int64) * 3
        aa += tl.load(at, mask=inside, other=0).to(tl.float64)
        bb += tl.load(at + 1, mask=inside, other=0).to(tl.float64)
        ab += tl.load(at + 2, mask=inside, other=0).to(tl.float64)
    tl.store(sums_ptr + t * 3, tl.sum(aa, 0))
    tl.store(sums_ptr + t * 3 + 1, tl.sum(bb, 0))
    tl.store(sums_ptr + t * 3 + 2, tl.sum(ab, 0))


@triton.jit
def _pair_combine_many_kernel(
    table_ptr,
    starts_ptr,
    coef_ptr,
    count,
    AROUND_BASE: tl.constexpr,
    COMPUTE: tl.constexpr,
    KIND: tl.constexpr,
    DTYPE: tl.constexpr,
    MAX_TENSORS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """out = round(c0[t]·x0 + c1[t]·x1), every product and the sum rounded to fp32 as torch's
    ``coef_a * a + coef_b * b`` rounds them (launched without fp fusion); with
    ``AROUND_BASE``, round(base + (c0·(x0 − base) + c1·(x1 − base))). ``COMPUTE`` fp64 (fp64
    coefficients): all of it in fp64, rounded at the end (coefficients that cancel, as for
    nearly opposite pairs, lose the result's digits in fp32)."""
    t, offs, inside = _launch_row(table_ptr, starts_ptr, count, 5, MAX_TENSORS, BLOCK)
    a, b, base = _pair_operands(table_ptr, t, offs, inside, AROUND_BASE, COMPUTE, DTYPE)
    out_ptr = tl.load(table_ptr + t * 5 + 2).to(tl.pointer_type(DTYPE))
    if AROUND_BASE:
        total = tl.load(coef_ptr + t * 2) * (a - base) + tl.load(coef_ptr + t * 2 + 1) * (b - base)
        total = base + total
    else:
        total = tl.load(coef_ptr + t * 2) * a + tl.load(coef_ptr + t * 2 + 1) * b
    tl.store(out_ptr + offs, _round(total.to(tl.float32), KIND).to(DTYPE), mask=inside)


@functools.lru_cache(maxsize=1024)
def _program_ends(rows: tuple[tuple[int, ...], ...], device: torch.device) -> torch.Tensor:
    """Each tensor's end in the launch table's programs (the next one's start)."""
    _, starts, programs = _launch_tables(rows, device)
    return torch.cat([starts[1:], starts.new_tensor([programs])])


PairItems = Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]]
"""``(x0, x1, out, base)`` per tensor: one 16/32-bit dtype, contiguous, none empty; ``base``
None for every item (a pair of tensors) or for none (the pair's differences from the base)."""


def _pair_launch(
    items: PairItems,
) -> tuple[tuple[tuple[int, ...], ...], dict[str, object]]:
    rows = tuple(
        (
            a.data_ptr(),
            b.data_ptr(),
            out.data_ptr(),
            out.numel(),
            0 if base is None else base.data_ptr(),
        )
        for a, b, out, base in items
    )
    common = {
        "AROUND_BASE": items[0][3] is not None,
        "DTYPE": _TL_DTYPE[items[0][0].dtype],
        "MAX_TENSORS": max(16, triton.next_power_of_2(len(rows))),
    }
    return rows, common


def pair_sums(items: PairItems) -> torch.Tensor:
    """The T x 3 fp64 sums x0·x0, x1·x1, x0·x1 of each item (of x0 − base and x1 − base with a
    base): one pass of fp64 tile sums over all of them, reduced per tensor in a fixed order;
    no host sync."""
    device = items[0][0].device
    rows, common = _pair_launch(items)
    table, starts, programs = _launch_tables(rows, device)
    partials = torch.empty((programs, 3), dtype=torch.float64, device=device)
    _pair_sums_many_kernel[(programs,)](
        table, starts, partials, len(rows), BLOCK=_BLOCK, num_warps=8, **common
    )
    sums = torch.empty((len(rows), 3), dtype=torch.float64, device=device)
    _pair_reduce_kernel[(len(rows),)](
        partials, starts, _program_ends(rows, device), sums, CHUNK=1024, num_warps=4
    )
    return sums


def pair_combine(items: PairItems, coefficients: torch.Tensor) -> None:
    """Writes ``round(c0·x0 + c1·x1)`` (with a base: ``round(base + c0·(x0 − base) + c1·(x1 −
    base))``) into each item's ``out`` in one launch. ``coefficients``: T x 2 on the device,
    fp32 (computed as torch's ``c0 * x0 + c1 * x1`` in fp32 rounds) or fp64 (computed in fp64,
    rounded once to fp32 and to the dtype)."""
    dtype = items[0][0].dtype
    rows, common = _pair_launch(items)
    table, starts, programs = _launch_tables(rows, items[0][0].device)
    _pair_combine_many_kernel[(programs,)](
        table, starts, coefficients.contiguous(), len(rows),
        COMPUTE=tl.float64 if coefficients.dtype == torch.float64 else tl.float32,
        KIND=_KIND[dtype], BLOCK=_BLOCK, num_warps=8,
        enable_fp_fusion=False, **common,
    )  # fmt: skip


@triton.jit
def _l1_partials_kernel(
    tv_ptr,
    mask_ptr,
    density_ptr,
    seed,
    out_ptr,
    n,
    programs,
    N: tl.constexpr,
    DRAW: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Per tile and expert: the fp32 sums of |x| over all elements and over the kept ones."""
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n
    for i in tl.static_range(N):
        x = tl.abs(tl.load(tv_ptr + i * n + offs, mask=inside, other=0).to(tl.float32))
        keep = _kept(mask_ptr, density_ptr, seed, i, n, offs, inside, DRAW)
        tl.store(out_ptr + i * programs + pid, tl.sum(x, 0))
        tl.store(out_ptr + (N + i) * programs + pid, tl.sum(tl.where(keep, x, 0.0), 0))


@dataclasses.dataclass(frozen=True)
class DrawnMasks:
    """DARE's masks, never stored: expert i keeps an element with probability
    ``densities[i]`` (N fp32 values on the device), drawn inside each kernel that reads the
    mask from Philox at counter (``seed``, i·numel + position). The L1 pass and the merge
    draw the same mask; the same seed on the same device gives the same merge."""

    seed: int
    densities: torch.Tensor


def _mask_arguments(
    masks: torch.Tensor | None, draws: DrawnMasks | None, like: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """(mask pointer, density pointer, seed, DRAW) for the kernels' :func:`_kept`."""
    if draws is not None:
        return draws.densities, draws.densities, draws.seed, 1
    if masks is None:  # every element kept
        return like, like, 0, 2
    return masks.view(torch.uint8), like, 0, 0


def draw_masks(shape: Sequence[int], draws: DrawnMasks, device: torch.device) -> torch.Tensor:
    """The N x shape bool masks that ``draws`` stands for (checks and tests; merges never
    materialize them)."""
    count = draws.densities.numel()
    out = torch.empty((count, *shape), dtype=torch.uint8, device=device)
    n = out[0].numel()
    _draw_masks_kernel[(triton.cdiv(n, _BLOCK),)](
        out, draws.densities, draws.seed, n, N=count, BLOCK=_BLOCK, num_warps=8
    )
    return out.view(torch.bool)


def l1_norms(
    task_vectors: torch.Tensor,
    masks: torch.Tensor | None,
    *,
    draws: DrawnMasks | None = None,
) -> torch.Tensor:
    """The 2 x N L1 norms (each task vector's, then its kept part's) in the task vectors'
    dtype, from one pass over the task vectors and masks (no masked copy; ``draws``: the
    masks drawn on the fly instead): fp32 partial sums per tile, summed by torch, rounded
    once, as ``vector_norm`` accumulates and rounds (the order of the fp32 additions
    differs, so a norm may differ in its last fp32 bit)."""
    count = task_vectors.shape[0]
    n = task_vectors[0].numel()
    block = 8192
    programs = triton.cdiv(n, block)
    partials = torch.empty((2 * count, programs), dtype=torch.float32, device=task_vectors.device)
    mask_ptr, density_ptr, seed, draw = _mask_arguments(masks, draws, task_vectors)
    _l1_partials_kernel[(programs,)](
        task_vectors, mask_ptr, density_ptr, seed, partials, n, programs, N=count, DRAW=draw,
        BLOCK=block, num_warps=8,
    )  # fmt: skip
    return partials.sum(1).view(2, count).to(task_vectors.dtype)


# ---------------------------------------------------------------------------------------------
# RAM and Arcee Fusion (``selective``): element-wise selections in one pass each


@triton.jit
def _ram_changed(tv_ptr, index, n, offs, inside, eps):
    """Expert ``index``'s task vector at ``offs`` (fp32) and whether it changes them (|x| >
    ``eps``, the dtype's epsilon)."""
    x = tl.load(tv_ptr + index * n + offs, mask=inside, other=0).to(tl.float32)
    return x, inside & (tl.abs(x) > eps)


@triton.jit
def _ram_changes(tv_ptr, n, offs, inside, eps, N: tl.constexpr, BLOCK: tl.constexpr):
    """How many experts change each element."""
    count = tl.zeros([BLOCK], dtype=tl.int32)
    for i in tl.static_range(N):
        _, changed = _ram_changed(tv_ptr, i, n, offs, inside, eps)
        count += changed.to(tl.int32)
    return count


@triton.jit
def _ram_counts_kernel(tv_ptr, partial_ptr, n, programs, eps, N: tl.constexpr, BLOCK: tl.constexpr):
    """Per tile and expert: its changed elements no other expert changes (row i of
    ``partial``), then those another expert changes too (row N + i)."""
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n
    count = _ram_changes(tv_ptr, n, offs, inside, eps, N, BLOCK)
    for i in tl.static_range(N):
        _, changed = _ram_changed(tv_ptr, i, n, offs, inside, eps)
        tl.store(partial_ptr + i * programs + pid, tl.sum((changed & (count == 1)).to(tl.int32)))
        tl.store(
            partial_ptr + (N + i) * programs + pid, tl.sum((changed & (count > 1)).to(tl.int32))
        )


@triton.jit
def _ram_kernel(
    base_ptr, tv_ptr, factor_ptr, out_ptr, n, eps,
    N: tl.constexpr, PLUS: tl.constexpr, KIND: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """RAM (``selective.ram``): an element one expert changes takes its change (RAM+: times
    its factor, in fp32), one several change the average, each change rounded to the dtype
    after its division; the sum over experts in fp32, rounded to the dtype for RAM (RAM+ adds
    it to the base in fp32)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n
    count = _ram_changes(tv_ptr, n, offs, inside, eps, N, BLOCK)
    divisor = tl.maximum(count, 1).to(tl.float32)
    total = tl.zeros([BLOCK], dtype=tl.float32)
    for i in tl.static_range(N):
        x, changed = _ram_changed(tv_ptr, i, n, offs, inside, eps)
        kept = tl.where(changed, x, 0.0)
        if PLUS:  # noqa: SIM108 (a constexpr branch, compiled away)
            unique = kept * tl.load(factor_ptr + i)
        else:
            unique = kept
        shared = _round(tl.math.div_rn(kept, divisor), KIND)
        total += tl.where(count == 1, unique, tl.where(count > 1, shared, 0.0))
    if not PLUS:
        total = _round(total, KIND)
    base = tl.load(base_ptr + offs, mask=inside, other=0).to(tl.float32)
    tl.store(out_ptr + offs, _round(base + total, KIND).to(out_ptr.dtype.element_ty), mask=inside)


def ram_counts(task_vectors: torch.Tensor, epsilon: float) -> tuple[torch.Tensor, torch.Tensor]:
    """RAM+ tensor-local's counts: each expert's changed elements (|x| > ``epsilon``) that no
    other expert changes, and those another one changes too; two int64 tensors of N values on
    the device (no host sync)."""
    count = task_vectors.shape[0]
    n = task_vectors[0].numel()
    programs = triton.cdiv(n, _BLOCK)
    partials = torch.empty(2 * count, programs, dtype=torch.int32, device=task_vectors.device)
    _ram_counts_kernel[(programs,)](
        task_vectors, partials, n, programs, _in_dtype(epsilon, task_vectors.dtype), N=count,
        BLOCK=_BLOCK, num_warps=8,
    )  # fmt: skip
    sums = partials.sum(1, dtype=torch.int64)
    return sums[:count], sums[count:]


def ram_combine(
    base: torch.Tensor,
    task_vectors: torch.Tensor,
    epsilon: float,
    factors: torch.Tensor | None,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """RAM of ``task_vectors`` (N x shape, contiguous) onto ``base`` in one pass; ``factors``
    (N fp32 values) make it RAM+ tensor-local. ``epsilon`` is compared in the dtype, as
    mergekit's comparison with a Python float is."""
    n = base.numel()
    out = torch.empty_like(base) if out is None else out
    _ram_kernel[(triton.cdiv(n, _BLOCK),)](
        base, task_vectors, factors if factors is not None else base, out, n,
        _in_dtype(epsilon, base.dtype), N=task_vectors.shape[0], PLUS=factors is not None,
        KIND=_KIND[base.dtype], BLOCK=_BLOCK, num_warps=8,
        enable_fp_fusion=False,  # a fused multiply-add would skip a rounding mergekit does
    )  # fmt: skip
    return out


@triton.jit
def _row_divergence_kernel(
    expert_ptr, base_ptr, out_ptr, rows, columns, eps,
    KIND: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """``ROWS`` rows' KL(softmax(expert) + eps || softmax(base) + eps) in fp32: the softmaxes'
    maxima and sums in one sweep of the rows (online), the divergences in a second."""
    row = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    live = row < rows
    starts = (row * columns)[:, None]
    lanes = tl.arange(0, BLOCK)[None, :]
    top_p = tl.full([ROWS], -float("inf"), tl.float32)
    top_q = tl.full([ROWS], -float("inf"), tl.float32)
    sum_p = tl.zeros([ROWS], dtype=tl.float32)
    sum_q = tl.zeros([ROWS], dtype=tl.float32)
    for first in range(0, columns, BLOCK):
        inside = live[:, None] & (first + lanes < columns)
        x = tl.load(expert_ptr + starts + first + lanes, mask=inside, other=-float("inf"))
        y = tl.load(base_ptr + starts + first + lanes, mask=inside, other=-float("inf"))
        x = x.to(tl.float32)
        y = y.to(tl.float32)
        new_p = tl.maximum(top_p, tl.max(x, 1))
        new_q = tl.maximum(top_q, tl.max(y, 1))
        # rows past the end stay at -inf: keep their (unused) sums finite
        new_p = tl.where(live, new_p, 0.0)
        new_q = tl.where(live, new_q, 0.0)
        sum_p = sum_p * tl.exp(top_p - new_p) + tl.sum(tl.exp(x - new_p[:, None]), 1)
        sum_q = sum_q * tl.exp(top_q - new_q) + tl.sum(tl.exp(y - new_q[:, None]), 1)
        top_p = new_p
        top_q = new_q
    total = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
    for first in range(0, columns, BLOCK):
        inside = live[:, None] & (first + lanes < columns)
        x = tl.load(expert_ptr + starts + first + lanes, mask=inside, other=0).to(tl.float32)
        y = tl.load(base_ptr + starts + first + lanes, mask=inside, other=0).to(tl.float32)
        p = tl.exp(x - top_p[:, None]) / sum_p[:, None] + eps
        q = tl.exp(y - top_q[:, None]) / sum_q[:, None] + eps
        total += tl.where(inside, p * tl.log(p / q), 0.0)
    divergence = _round(tl.sum(total, 1), KIND)
    tl.store(out_ptr + row, divergence.to(out_ptr.dtype.element_ty), mask=live)


def row_divergence(base: torch.Tensor, expert: torch.Tensor) -> torch.Tensor:
    """Arcee Fusion's divergence of each row (over the last dimension; contiguous tensors of
    one shape), shape ``(*rows, 1)`` in their dtype: fp32 arithmetic (the GPU's fast exp and
    log), rounded once."""
    columns = base.shape[-1]
    rows = base.numel() // columns
    out = torch.empty((*base.shape[:-1], 1), dtype=base.dtype, device=base.device)
    block = min(512, triton.next_power_of_2(columns))
    per_program = max(1, 2048 // block)  # tiles of up to 2048 elements
    _row_divergence_kernel[(triton.cdiv(rows, per_program),)](
        expert, base, out, rows, columns, 1e-8, KIND=_KIND[base.dtype], ROWS=per_program,
        BLOCK=block, num_warps=8,
    )  # fmt: skip
    return out


@triton.jit
def _arcee_importance(
    base_ptr, expert_ptr, divergence_ptr, at, inside, columns, KIND: tl.constexpr
):
    """At flat indices ``at``: the base (fp32), expert - base and its importance |expert - base|
    times the row's divergence, each rounded to the dtype as ``selective.arcee_importance``."""
    base = tl.load(base_ptr + at, mask=inside, other=0).to(tl.float32)
    expert = tl.load(expert_ptr + at, mask=inside, other=0).to(tl.float32)
    divergence = tl.load(divergence_ptr + at // columns, mask=inside, other=0).to(tl.float32)
    delta = _round(expert - base, KIND)
    return base, delta, _round(tl.abs(delta) * divergence, KIND)


@triton.jit
def _arcee_sample_kernel(
    base_ptr, expert_ptr, divergence_ptr, picks_ptr, out_ptr, m, columns,
    KIND: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """The importances at the flat indices ``picks``, rounded as ``selective.arcee_importance``
    rounds."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < m
    at = tl.load(picks_ptr + offs, mask=inside, other=0)
    _, _, importance = _arcee_importance(
        base_ptr, expert_ptr, divergence_ptr, at, inside, columns, KIND
    )
    tl.store(out_ptr + offs, importance.to(out_ptr.dtype.element_ty), mask=inside)


def arcee_importance_at(
    base: torch.Tensor, expert: torch.Tensor, divergence: torch.Tensor, picks: torch.Tensor
) -> torch.Tensor:
    """Arcee Fusion's importances at the flat indices ``picks`` (int64) in one launch."""
    m = picks.numel()
    out = torch.empty(m, dtype=base.dtype, device=base.device)
    _arcee_sample_kernel[(triton.cdiv(m, _BLOCK),)](
        base, expert, divergence, picks, out, m, base.shape[-1], KIND=_KIND[base.dtype],
        BLOCK=_BLOCK, num_warps=8, enable_fp_fusion=False,
    )  # fmt: skip
    return out


@triton.jit
def _arcee_kernel(
    base_ptr, expert_ptr, divergence_ptr, threshold_ptr, out_ptr, n, columns,
    KIND: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Arcee Fusion's result: base + (expert - base) where |expert - base| times the row's
    divergence reaches the threshold, rounded as ``selective.arcee_fusion`` rounds."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n
    base, delta, importance = _arcee_importance(
        base_ptr, expert_ptr, divergence_ptr, offs, inside, columns, KIND
    )
    keep = importance >= tl.load(threshold_ptr).to(tl.float32)
    merged = _round(base + delta * keep.to(tl.float32), KIND)
    tl.store(out_ptr + offs, merged.to(out_ptr.dtype.element_ty), mask=inside)


def arcee_combine(
    base: torch.Tensor,
    expert: torch.Tensor,
    divergence: torch.Tensor,
    threshold: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Arcee Fusion of ``expert`` onto ``base`` (contiguous, one shape) in one pass, from the
    rows' ``divergence`` (one per row, their dtype) and the 0-d ``threshold``."""
    n = base.numel()
    out = torch.empty_like(base) if out is None else out
    _arcee_kernel[(triton.cdiv(n, _BLOCK),)](
        base, expert, divergence, threshold, out, n, base.shape[-1], KIND=_KIND[base.dtype],
        BLOCK=_BLOCK, num_warps=8, enable_fp_fusion=False,
    )  # fmt: skip
    return out


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
def _select_request(table_ptr, count, pid, MAX_REQUESTS: tl.constexpr, ALIGNED: tl.constexpr):
    """Program ``pid``'s request in a many-tensor selection: its index ``r``, first program,
    size and the addresses of its keys and its mask(s). Table row r: (keys, n, out, start).
    ``ALIGNED`` (every address 16-byte aligned, every size a multiple of 16, checked by the
    host): say so, or the compiler, which cannot see addresses read from memory, moves one
    element per instruction (2.6x slower mask pass on an H100)."""
    slots = tl.arange(0, MAX_REQUESTS)
    starts = tl.load(table_ptr + slots * 4 + 3, mask=slots < count, other=2**40)
    r = tl.sum((starts <= pid).to(tl.int32)) - 1
    start = tl.load(table_ptr + r * 4 + 3)
    n = tl.load(table_ptr + r * 4 + 1)
    x_ptr = tl.load(table_ptr + r * 4).to(tl.pointer_type(tl.int16))
    out_ptr = tl.load(table_ptr + r * 4 + 2).to(tl.pointer_type(tl.uint8))
    if ALIGNED:
        x_ptr = tl.multiple_of(x_ptr, 16)
        out_ptr = tl.multiple_of(out_ptr, 16)
        n = tl.multiple_of(n, 16)
    return r, start, n, x_ptr, out_ptr


@triton.jit
def _select_sample_kernel(table_ptr, positions_ptr, samples_ptr, m, BLOCK: tl.constexpr):
    """The magnitude keys of each request's sample positions (request = program axis 0)."""
    r = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < m
    x_ptr = tl.load(table_ptr + r * 4).to(tl.pointer_type(tl.int16))
    positions = tl.load(positions_ptr + r.to(tl.int64) * m + offs, mask=inside, other=0)
    keys = _select_keys(x_ptr, positions, inside)
    tl.store(samples_ptr + r.to(tl.int64) * m + offs, keys.to(tl.int16), mask=inside)


@triton.jit
def _select_hist_kernel(
    table_ptr,
    count,
    samples_ptr,
    m,
    lo_index_ptr,
    hist_ptr,
    T: tl.constexpr,
    BINS: tl.constexpr,
    TILE: tl.constexpr,
    MAX_REQUESTS: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    """Pass 1: each program adds its tile's window histogram (one per selection) to its
    request's: a block-local histogram, then one atomic per non-empty bin."""
    pid = tl.program_id(0)
    r, start, n, x_ptr, _ = _select_request(table_ptr, count, pid, MAX_REQUESTS, ALIGNED)
    offs = (pid - start).to(tl.int64) * TILE + tl.arange(0, TILE)
    inside = offs < n
    keys = _select_keys(x_ptr, offs, inside)
    for s in tl.static_range(T):
        selection = r * T + s
        relative = keys - _select_lo(samples_ptr + r.to(tl.int64) * m, lo_index_ptr, selection, m)
        in_window = inside & (relative >= 0)
        local = tl.histogram(tl.minimum(tl.maximum(relative, 0), BINS - 1), BINS, in_window)
        bins = tl.arange(0, BINS)
        tl.atomic_add(hist_ptr + selection * BINS + bins, local, mask=local != 0)


@triton.jit
def _select_equal_kernel(
    table_ptr,
    count,
    samples_ptr,
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
    MAX_REQUESTS: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    """Pass 2: each program counts its keys equal to each selection's threshold (their
    prefix sums give the index-order rank of the ties); a request's first program writes
    its status rows (threshold, ties taken, miss)."""
    pid = tl.program_id(0)
    r, start, n, x_ptr, _ = _select_request(table_ptr, count, pid, MAX_REQUESTS, ALIGNED)
    offs = (pid - start).to(tl.int64) * TILE + tl.arange(0, TILE)
    inside = offs < n
    keys = _select_keys(x_ptr, offs, inside)
    for s in tl.static_range(T):
        selection = r * T + s
        lo = _select_lo(samples_ptr + r.to(tl.int64) * m, lo_index_ptr, selection, m)
        t, missing, miss = _select_resolve(hist_ptr, k_ptr, selection, lo, BINS)
        equal = tl.sum((inside & (keys == t)).to(tl.int32), 0)
        tl.store(equal_ptr + s * programs + pid, equal)
        if pid == start:
            tl.store(status_ptr + selection * 3, t.to(tl.int64))
            tl.store(status_ptr + selection * 3 + 1, missing.to(tl.int64))
            tl.store(status_ptr + selection * 3 + 2, miss.to(tl.int64))


@triton.jit
def _select_mask_kernel(
    table_ptr,
    count,
    samples_ptr,
    m,
    lo_index_ptr,
    hist_ptr,
    k_ptr,
    equal_prefix_ptr,
    programs,
    T: tl.constexpr,
    XOR: tl.constexpr,
    BINS: tl.constexpr,
    TILE: tl.constexpr,
    MAX_REQUESTS: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    """Pass 3: the masks: keys above the threshold, plus the first ``missing`` keys equal to
    it in index order (rank = ties in the request's earlier tiles, from the inclusive prefix
    sum over all programs, + the inclusive rank in this tile, computed only in the tile where
    the ties taken run out). ``XOR``: one mask per request,
    its first selection's minus its second's (breadcrumbs' band)."""
    pid = tl.program_id(0)
    r, start, n, x_ptr, out_ptr = _select_request(table_ptr, count, pid, MAX_REQUESTS, ALIGNED)
    offs = (pid - start).to(tl.int64) * TILE + tl.arange(0, TILE)
    inside = offs < n
    keys = _select_keys(x_ptr, offs, inside)
    band = tl.zeros([TILE], dtype=tl.int1)
    for s in tl.static_range(T):
        selection = r * T + s
        lo = _select_lo(samples_ptr + r.to(tl.int64) * m, lo_index_ptr, selection, m)
        t, missing, miss = _select_resolve(hist_ptr, k_ptr, selection, lo, BINS)
        equal = inside & (keys == t)
        row = equal_prefix_ptr + s * programs
        before_request = tl.load(row + start - 1, mask=start > 0, other=0)
        earlier = tl.load(row + pid - 1, mask=pid > 0, other=0) - before_request
        through_tile = tl.load(row + pid) - before_request
        # Only the one tile where the ties taken run out needs their index-order rank (a
        # scan over the tile, the dearest step of the pass); before it every tie is taken,
        # after it none.
        if (earlier < missing) & (through_tile > missing):
            rank = earlier + tl.cumsum(equal.to(tl.int32), 0).to(tl.int64)
            taken = equal & (rank <= missing)
        else:
            taken = equal & (through_tile <= missing)
        keep = inside & ((keys > t) | taken)
        if XOR:
            band = band ^ keep
        else:
            tl.store(out_ptr + s * n + offs, keep.to(tl.uint8), mask=inside)
    if XOR:
        tl.store(out_ptr + offs, band.to(tl.uint8), mask=inside)


def select_supported(x: torch.Tensor) -> bool:
    """Whether :func:`top_select_many` takes ``x``: contiguous 16-bit floats, under 2^31
    elements."""
    sixteen_bit = x.dtype in (torch.bfloat16, torch.float16)
    return x.is_contiguous() and sixteen_bit and 0 < x.numel() < 2**31


_SAMPLE_BLOCK = 4096


def top_select_many(
    items: Sequence[tuple[torch.Tensor, torch.Tensor]],
    positions: torch.Tensor,
    lo_indices: Sequence[int],
    ks: Sequence[int],
    *,
    xor: bool,
) -> torch.Tensor:
    """Exact top-``k`` magnitude masks of many 16-bit tensors, T values of k each, with one
    launch per pass for all of them and no host sync (``methods.top_magnitude_masks_batch``
    describes the order). Every launch costs host time; a block of a 4B model has 14 expert
    tensors, so one launch per pass instead of one per tensor is what keeps the merge
    GPU-bound.

    ``items``: R pairs (x, out): ``x`` the tensor, ``out`` its contiguous uint8 masks (T x
    numel, or numel with ``xor``: the first mask minus the second). ``positions`` (R x m,
    int64): each tensor's sample positions. ``lo_indices`` and ``ks`` (R*T each, request-major):
    each selection's lower bracket index into its sorted sample, and its k. Returns the
    R*T x 3 int64 status (threshold key, ties taken, miss). A miss row's mask is empty: the
    caller, after its host sync, replaces it by an exact fallback.
    """
    count = len(items)
    selections = len(ks) // count
    device = items[0][0].device
    m = positions.shape[1]
    rows: list[int] = []
    programs = 0
    for x, out in items:
        rows += [x.data_ptr(), x.numel(), out.data_ptr(), programs]
        programs += triton.cdiv(x.numel(), _SELECT_TILE)
    # the table, bracket indices and ks in one host-to-device copy
    packed = torch.tensor([*rows, *lo_indices, *ks], dtype=torch.int64).to(device)
    table = packed[: 4 * count]
    lo_index = packed[4 * count : 4 * count + len(ks)]
    k_values = packed[4 * count + len(ks) :]
    samples = torch.empty((count, m), dtype=torch.int16, device=device)
    _select_sample_kernel[(count, triton.cdiv(m, _SAMPLE_BLOCK))](
        table, positions, samples, m, BLOCK=_SAMPLE_BLOCK
    )
    samples = torch.sort(samples, dim=1, descending=True).values
    hist = torch.zeros((len(ks), SELECT_BINS), dtype=torch.int32, device=device)
    equal = torch.empty((selections, programs), dtype=torch.int32, device=device)
    status = torch.empty((len(ks), 3), dtype=torch.int64, device=device)
    common = {
        "T": selections,
        "BINS": SELECT_BINS,
        "TILE": _SELECT_TILE,
        "MAX_REQUESTS": max(16, triton.next_power_of_2(count)),
        "ALIGNED": all(
            x.data_ptr() % 16 == 0 and out.data_ptr() % 16 == 0 and x.numel() % 16 == 0
            for x, out in items
        ),
        "num_warps": 8,
    }
    _select_hist_kernel[(programs,)](table, count, samples, m, lo_index, hist, **common)
    _select_equal_kernel[(programs,)](
        table, count, samples, m, lo_index, hist, k_values, equal, status, programs, **common
    )
    prefix = equal.cumsum(1)  # int64
    _select_mask_kernel[(programs,)](
        table, count, samples, m, lo_index, hist, k_values, prefix, programs, XOR=xor, **common
    )
    return status


def supported(tensors: Sequence[torch.Tensor | None]) -> bool:
    """Whether the kernels take these tensors (contiguous, one float dtype they know); a None
    (an absent ``out``) is skipped."""
    given = [t for t in tensors if t is not None]
    return all(t.is_contiguous() and t.dtype in _KIND for t in given) and (
        len({t.dtype for t in given}) <= 1
    )
