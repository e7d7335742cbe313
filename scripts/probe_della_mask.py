"""Where DELLA's mask time goes on a GPU (Qwen3-4B shapes, bf16), and two candidate routes.

Times, per tensor shape and summed over a 2-expert model: the engine's ``_della_mask``, its
parts (magnitude keys, the row sort), a route that draws the masks in a Triton kernel from
the sort's order (``fused``), and one sorting (row << 16 | key) in one flat sort (``packed``);
each route's keep rate by magnitude-rank decile checks it. Usage (CUDA only):
``python scripts/probe_della_mask.py OUT_DIR`` writes ``OUT_DIR/della_profile.json``.
"""

import json
import os
import sys

import torch
import triton
import triton.language as tl

from mergeopt.merge.selection import _magnitude_keys
from mergeopt.merge.sparsification import _della_mask

SHAPES = {  # name: (shape, count in the model)
    "q": ((4096, 2560), 36),
    "kv": ((1024, 2560), 72),
    "o": ((2560, 4096), 36),
    "gate_up": ((9728, 2560), 72),
    "down": ((2560, 9728), 36),
    "embed": ((151936, 2560), 1),
}


@triton.jit
def _mask_from_order(
    order_ptr, mask_ptr, seed, cols, n_total, lo, step, FLAT: tl.constexpr, BLOCK: tl.constexpr
):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < n_total
    idx = tl.load(order_ptr + offs, mask=valid, other=0)
    row = offs // cols
    j = offs - row * cols
    u = tl.rand(seed, offs)
    keep = u < lo + step * j.to(tl.float32)
    if FLAT:  # noqa: SIM108 (a constexpr branch)
        target = idx
    else:
        target = row * cols + idx
    tl.store(mask_ptr + target, keep.to(tl.int8), mask=valid)


def mask_through_order(delta, density, epsilon, seed, out, *, packed=False):
    """The mask drawn by ``_mask_from_order`` through each row's magnitude order: from a sort
    of each row (``packed`` False) or one flat sort of (row << 16 | key) per chunk."""
    rows = delta.reshape(delta.shape[0], -1)
    cols = rows.shape[1]
    step = 2 * epsilon / (cols - 1)
    keys = _magnitude_keys(rows).view(rows.shape)
    chunk = max(1, (1 << 24) // cols)
    if packed:
        keys = keys.to(torch.int32)
        chunk = min(chunk, 32767)
    mask = out.view(rows.shape)
    for start in range(0, rows.shape[0], chunk):
        part = keys[start : start + chunk]
        if packed:
            row_ids = torch.arange(part.shape[0], device=part.device, dtype=torch.int32)
            order = torch.sort(((row_ids.view(-1, 1) << 16) | part).view(-1)).indices
        else:
            order = torch.sort(part, dim=1).indices
        n = order.numel()
        _mask_from_order[(triton.cdiv(n, 2048),)](
            order,
            mask[start : start + chunk].view(torch.int8),
            seed + start,
            cols,
            n,
            density - epsilon,
            step,
            FLAT=packed,
            BLOCK=2048,
        )
    return out


def timed(fn, repeats=5):
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        a = torch.cuda.Event(enable_timing=True)
        b = torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2]


def keep_by_decile(mask: torch.Tensor, deciles: torch.Tensor) -> list[float]:
    kept = torch.bincount(deciles, weights=mask.view(-1).float(), minlength=10)
    return [round(x, 4) for x in (kept / torch.bincount(deciles, minlength=10)).tolist()]


def probe_shape(name: str, shape: tuple[int, int], count: int, gen: torch.Generator) -> dict:
    dev = gen.device
    delta = (torch.randn(shape, device=dev) * 0.01).to(torch.bfloat16)
    out = torch.empty(shape, dtype=torch.bool, device=dev)
    keys = _magnitude_keys(delta).view(shape)
    keys32 = keys.to(torch.int32)
    row: dict = {"tensor": name, "shape": shape, "count": count}
    row["current"] = timed(lambda: _della_mask(delta, 0.5, 0.1, gen, out))
    row["keys"] = timed(lambda: _magnitude_keys(delta))
    row["sort_rows"] = timed(lambda: torch.sort(keys, dim=1))
    row["fused"] = timed(lambda: mask_through_order(delta, 0.5, 0.1, 7, out))
    if shape[0] * shape[1] < (1 << 31):
        row["packed"] = timed(lambda: mask_through_order(delta, 0.5, 0.1, 7, out, packed=True))
    row["sort_flat_int32"] = timed(lambda: torch.sort(keys32.view(-1)))
    # keep rate by magnitude-rank decile (expected 0.41, 0.43, ..., 0.59)
    deciles = (torch.sort(keys, dim=1).indices.argsort(dim=1) * 10 // shape[1]).view(-1)
    mask_through_order(delta, 0.5, 0.1, 11, out)
    row["keep_by_decile_fused"] = keep_by_decile(out, deciles)
    _della_mask(delta, 0.5, 0.1, gen, out)
    row["keep_by_decile_current"] = keep_by_decile(out, deciles)
    return row


def main() -> None:
    out_dir = sys.argv[1]
    gen = torch.Generator(device=torch.device("cuda"))
    gen.manual_seed(1)
    rows = []
    totals: dict[str, float] = {}
    for name, (shape, count) in SHAPES.items():
        row = probe_shape(name, shape, count, gen)
        for key in ("current", "keys", "sort_rows", "fused", "packed", "sort_flat_int32"):
            if key in row:
                totals[key] = totals.get(key, 0.0) + row[key] * count * 2
        rows.append(row)
        print(json.dumps(row), flush=True)
    summary = {k: round(v, 1) for k, v in totals.items()}
    print("model totals (2 experts), ms:", json.dumps(summary), flush=True)
    with open(os.path.join(out_dir, "della_profile.json"), "w") as f:
        json.dump({"rows": rows, "totals_ms": totals}, f, indent=1)


if __name__ == "__main__":
    main()
