"""Benchmark the merge engine against the memory-bandwidth floor and mergekit's run_merge.

Builds a random model of a named shape (base + N experts, safetensors) in a scratch folder,
then prints one table: per method, the whole-model merge time of the resident engine (median
of repeats, written into a resident target), its ratio to the bandwidth floor (bytes read and
written by one merge over a measured device-to-device copy bandwidth), the ratio of mergekit's
``run_merge`` of the same YAML on the same device to it, the re-merge time of one changed block,
and peak device memory. Usage:

    python scripts/bench_merge.py --shape qwen3-4b --device cuda --experts 2 --dtype bfloat16
    python scripts/bench_merge.py --shape tiny --device cpu --mergekit all

Not a test: the numbers depend on the machine (docs/bench/merge-*.md keeps dated tables).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mergeopt.blocks import BlockLayout  # noqa: E402
from mergeopt.merge.engine import MergeEngine, MergeTarget, NamedTensors  # noqa: E402
from mergeopt.merge.methods import METHODS  # noqa: E402

SHAPES = {
    # name: layers, hidden, intermediate, q heads, kv heads, head_dim, vocab, tied
    "tiny": (8, 128, 256, 2, 1, 64, 96, False),
    "qwen2.5-0.5b": (24, 896, 4864, 14, 2, 64, 151936, True),
    "qwen3-4b": (36, 2560, 9728, 32, 8, 128, 151936, True),
}
METHOD_PARAMS = {
    "linear": {"weight": 0.6},
    "task_arithmetic": {"weight": 0.6},
    "ties": {"weight": 0.6, "density": 0.5},
    "dare_ties": {"weight": 0.6, "density": 0.5},
    "dare_linear": {"weight": 0.6, "density": 0.5},
    "breadcrumbs": {"weight": 0.6, "density": 0.5, "gamma": 0.01},
    "breadcrumbs_ties": {"weight": 0.6, "density": 0.5, "gamma": 0.01},
    "della": {"weight": 0.6, "density": 0.5, "epsilon": 0.1},
    "della_linear": {"weight": 0.6, "density": 0.5, "epsilon": 0.1},
    "slerp": {"t": 0.4},
    "nearswap": {"t": 0.4},
    "nuslerp": {"weight": 0.6},
    "multislerp": {"weight": 0.6},
    "model_stock": {},
    "karcher": {},
    "sce": {},
    "ram": {},
    "ramplus_tl": {},
    "arcee_fusion": {},
}


def tensor_shapes(shape: str) -> dict[str, tuple[int, ...]]:
    layers, hidden, inter, q_heads, kv_heads, head_dim, vocab, tied = SHAPES[shape]
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update(
            {
                p + "input_layernorm.weight": (hidden,),
                p + "post_attention_layernorm.weight": (hidden,),
                p + "self_attn.q_proj.weight": (q_heads * head_dim, hidden),
                p + "self_attn.k_proj.weight": (kv_heads * head_dim, hidden),
                p + "self_attn.v_proj.weight": (kv_heads * head_dim, hidden),
                p + "self_attn.o_proj.weight": (hidden, q_heads * head_dim),
                p + "self_attn.q_norm.weight": (head_dim,),
                p + "self_attn.k_norm.weight": (head_dim,),
                p + "mlp.gate_proj.weight": (inter, hidden),
                p + "mlp.up_proj.weight": (inter, hidden),
                p + "mlp.down_proj.weight": (hidden, inter),
            }
        )
    shapes["model.norm.weight"] = (hidden,)
    if not tied:
        shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


def build_models(folder: Path, shape: str, experts: int, dtype: torch.dtype, device: str) -> list:
    """Base = N(0, 0.02) (norms 1), experts = base + N(0, 0.002); sharded at 2 GB."""
    from safetensors.torch import save_file

    layers, hidden, inter, q_heads, kv_heads, head_dim, vocab, tied = SHAPES[shape]
    config = {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": q_heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "vocab_size": vocab,
        "tie_word_embeddings": tied,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "dtype": str(dtype).removeprefix("torch."),
    }
    shapes = tensor_shapes(shape)
    paths = []
    generator = torch.Generator(device=device).manual_seed(0)
    base: dict[str, torch.Tensor] = {}
    for index in range(experts + 1):
        path = folder / ("base" if index == 0 else f"expert{index}")
        path.mkdir(parents=True)
        shards: list[dict[str, torch.Tensor]] = [{}]
        shard_bytes = 0
        for name, size in shapes.items():
            if index == 0:
                if name.endswith("norm.weight"):
                    tensor = torch.ones(size, device=device)
                else:
                    tensor = torch.randn(size, generator=generator, device=device) * 0.02
                base[name] = tensor.to(dtype).cpu()
                value = base[name]
            else:
                noise = torch.randn(size, generator=generator, device=device) * 0.002
                value = (base[name].to(device).float() + noise).to(dtype).cpu()
            if shard_bytes > 2 * 10**9:
                save_file(shards[-1], str(path / f"model-{len(shards):05d}.safetensors"))
                shards.append({})
                shard_bytes = 0
            shards[-1][name] = value
            shard_bytes += value.numel() * value.element_size()
        save_file(shards[-1], str(path / f"model-{len(shards):05d}.safetensors"))
        weight_map = {
            name: f"model-{number:05d}.safetensors"
            for number, shard in enumerate(shards, start=1)
            for name in shard
        }
        del shards
        (path / "config.json").write_text(json.dumps(config), encoding="utf-8")
        (path / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": weight_map}), encoding="utf-8"
        )
        paths.append(path)
    return paths


class ResidentTarget(MergeTarget):
    """Preallocated output tensors on the device (what a scorer's parameters are)."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype, device: str):
        self.tensors = {n: torch.empty(s, dtype=dtype, device=device) for n, s in shapes.items()}

    def destination(self, name: str) -> torch.Tensor | None:
        return self.tensors.get(name)

    def write(self, tensors: NamedTensors) -> None:
        for name, tensor in tensors:
            slot = self.tensors[name]
            if slot.data_ptr() != tensor.data_ptr():
                slot.copy_(tensor)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def copy_bandwidth(device: str, dtype: torch.dtype, numel: int) -> float:
    """Bytes per second of a device-to-device copy, counting bytes read plus written."""
    numel = min(numel, 1 << 30)
    source = torch.randn(numel, device=device).to(dtype)
    target = torch.empty_like(source)
    target.copy_(source)
    times = []
    for _ in range(5):
        sync(device)
        started = time.perf_counter()
        target.copy_(source)
        sync(device)
        times.append(time.perf_counter() - started)
    return 2 * source.numel() * source.element_size() / statistics.median(times)


BROKEN: set[str] = set()
"""Fast paths that failed to build on this machine (the benchmark then times without them)."""


def prefix_mask(order: torch.Tensor, k: int) -> torch.Tensor:
    """The mask of the first ``k`` positions of a full order (the reference top-k)."""
    mask = torch.zeros(order.numel(), dtype=torch.bool, device=order.device)
    mask[order[:k]] = True
    return mask


def check_l1_kernel(engine: MergeEngine, name: str) -> list[str]:
    """The one-pass L1 norms (dare/della rescale) against vector_norm on a masked copy."""
    stack = engine._stack[name]
    kernels = engine.plan.kernels
    if kernels is None:
        return ["check l1 kernel: not used (no Triton)"]
    masks = torch.rand(stack.shape, device=stack.device) < 0.5
    try:
        norms = kernels.l1_norms(stack, masks)
    except Exception as exc:  # a kernel that fails to build: time the torch norms
        os.environ["MERGEOPT_FUSED_L1"] = "0"
        return [f"check l1 kernel: FAIL ({exc!r:.300}); timing without it"]
    rows = stack.view(stack.shape[0], -1)
    expected = torch.stack(
        [
            torch.linalg.vector_norm(rows, 1, dim=1),
            torch.linalg.vector_norm(torch.where(masks.view(rows.shape), rows, 0), 1, dim=1),
        ]
    )
    equal = int((norms == expected).sum())
    worst = float(((norms.float() - expected.float()) / expected.float()).abs().max())
    return [f"check l1 kernel {name}: {equal}/{norms.numel()} equal, max rel diff {worst:.2e}"]


def check_drawn_masks(engine: MergeEngine, name: str) -> list[str]:
    """DARE's in-kernel draws: kept fractions within 6 binomial sigmas of the densities, the
    same masks for the same seed, and the merge's draws equal to the written-out masks."""
    from mergeopt.merge.sparsification import _coefficients

    stack, base = engine._stack[name], engine._base[name]
    kernels = engine.plan.kernels
    if kernels is None:
        return ["check drawn masks: not used (no Triton)"]
    densities = (0.5, 0.9)[: stack.shape[0]] + (0.3,) * max(0, stack.shape[0] - 2)
    draws = kernels.DrawnMasks(
        seed=11, densities=_coefficients(densities, torch.float32, stack.device)
    )
    masks = kernels.draw_masks(base.shape, draws, stack.device)
    n = base.numel()
    fractions = [float(masks[i].float().mean()) for i in range(len(densities))]
    binomial = all(
        abs(f - d) < 6 * (d * (1 - d) / n) ** 0.5 for f, d in zip(fractions, densities, strict=True)
    )
    again = torch.equal(kernels.draw_masks(base.shape, draws, stack.device), masks)
    norms = kernels.l1_norms(stack, None, draws=draws)
    weights = _coefficients((0.6,) * len(densities), stack.dtype, stack.device)
    options = {"consensus": True, "normalize": False, "lam": 1.0}
    drawn = kernels.gta_combine(base, stack, None, norms, weights, draws=draws, **options)
    given = kernels.gta_combine(
        base, stack, masks, kernels.l1_norms(stack, masks), weights, **options
    )
    verdict = "ok" if binomial and again and torch.equal(drawn, given) else "FAIL"
    kept = ", ".join(f"{f:.5f}" for f in fractions)
    return [
        f"check drawn masks {name}: {verdict} (kept {kept} of {densities}; same seed same "
        f"masks: {again}; merge equals the written-out masks: {torch.equal(drawn, given)})"
    ]


def check_gpu_paths(engine: MergeEngine, names: list[str], methods: list[str]) -> list[str]:
    """Lines saying whether the fast paths equal the reference paths on the engine's tensors:
    the bracketed top-k select against a stable sort, the fused GTA kernel against the torch
    path (bitwise; rescaling methods may differ where the L1 factor's last bit does)."""
    from dataclasses import replace

    from mergeopt.merge import plan as plan_module
    from mergeopt.merge.backend import Switches
    from mergeopt.merge.methods import METHODS
    from mergeopt.merge.plan import MergePlan
    from mergeopt.merge.selection import _magnitude_keys, _triton_selectable, top_magnitude_masks
    from mergeopt.merge.sparsification import expert_masks, magnitude_masks_batch

    switches = Switches.from_env()
    select = plan_module._select_kernels(engine.device, engine.dtype, switches)
    lines = []
    for name in names:
        delta = engine._stack[name][0]
        path = "triton" if select is not None and _triton_selectable(delta) else "bracket"
        keys = _magnitude_keys(delta)
        order = torch.sort(keys, descending=True, stable=True).indices
        n = delta.numel()
        ks = [n // 2, int(0.51 * n), n // 100, 1, n - 1]

        try:
            masks = top_magnitude_masks(delta, ks, select=select)
            bands = magnitude_masks_batch("magnitude_outliers", [(delta, 0.5, 0.01)], select=select)
            band = bands[0]
        except Exception as exc:  # a selection kernel that fails to build: time without it
            lines.append(f"check top-k ({path}): FAIL ({exc!r:.300}); timing without it")
            os.environ["MERGEOPT_FUSED_SELECT"] = "0"  # the engine's next plan reads it
            select = None
            masks = top_magnitude_masks(delta, ks, select=None)
            bands = magnitude_masks_batch("magnitude_outliers", [(delta, 0.5, 0.01)], select=None)
            band = bands[0]
            path = "bracket"
        for k, mask in zip(ks, masks, strict=True):
            ok = torch.equal(mask.view(-1), prefix_mask(order, k))
            lines.append(f"check top-k ({path}) {name} k={k}: {'ok' if ok else 'FAIL'}")
        assert band is not None
        expected = prefix_mask(order, int(0.5 * n) + int(0.01 * n)) ^ prefix_mask(
            order, int(0.01 * n)
        )
        ok = torch.equal(band.view(-1), expected)
        lines.append(f"check breadcrumbs band ({path}) {name}: {'ok' if ok else 'FAIL'}")
        del order, keys
    lines += check_l1_kernel(engine, names[0])
    lines += check_drawn_masks(engine, names[0])
    for method in methods:
        merge_method = METHODS.get(method)
        if (
            merge_method is None
            or not merge_method.fused_gta
            or merge_method.sparsification is None
        ):
            continue
        params = [dict(METHOD_PARAMS[method]) for _ in range(engine.num_experts)]
        fused_plan, torch_plan = (
            MergePlan.build(
                merge_method,
                device=engine.device,
                dtype=engine.dtype,
                exact=True,
                switches=replace(switches, fused=fused),
            )
            for fused in (True, False)
        )
        for name in names:
            results = []
            try:
                fused_plan.merge_tensor(
                    engine._base[name],
                    engine._stack[name],
                    params,
                    {},
                    generator=torch.Generator(device=engine.device).manual_seed(11),
                )
            except Exception as exc:  # a kernel that fails to build: time the torch path
                lines.append(f"check fused {method}: FAIL ({exc!r:.300}); timing without it")
                BROKEN.add("MERGEOPT_FUSED")
                os.environ["MERGEOPT_FUSED"] = "0"
                return lines
            drawn: list[torch.Tensor | None] | None = None
            if merge_method.sparsification == "random":
                # the fused path draws DARE's masks inside its kernels (check_drawn_masks
                # checks those); the merge arithmetic is compared on masks drawn once
                drawn = expert_masks(
                    merge_method.sparsification,
                    engine._stack[name],
                    [{**merge_method.expert_defaults, **values} for values in params],
                    torch.Generator(device=engine.device).manual_seed(11),
                )
            for plan in (fused_plan, torch_plan):
                generator = torch.Generator(device=engine.device).manual_seed(11)
                results.append(
                    plan.merge_tensor(
                        engine._base[name],
                        engine._stack[name],
                        params,
                        {},
                        generator=generator,
                        masks=drawn,
                    )
                )
            unequal = int((results[0] != results[1]).sum())
            worst = float((results[0].float() - results[1].float()).abs().max())
            verdict = "ok" if unequal == 0 else f"{unequal} unequal, max diff {worst:.3g}"
            lines.append(f"check fused {method} {name}: {verdict}")
    # task_arithmetic's one-launch block kernel against per-tensor addmm (1 ulp allowed)
    from mergeopt.merge.plan import fused_weighted_sum
    from mergeopt.merge.sparsification import _coefficients

    params = [{"weight": 0.6} for _ in range(engine.num_experts)]
    block = engine.block_names[0]
    inputs = [(n, engine._base[n], engine._stack[n], None) for n in block if n in engine._stack]
    block_plan = MergePlan.build(
        METHODS["task_arithmetic"],
        device=engine.device,
        dtype=engine.dtype,
        exact=False,
        switches=switches,
    )
    if not block_plan.block_launch:
        lines.append("check block kernel: not used (no Triton)")
        return lines
    try:
        merged = block_plan.merge_block(inputs, params, {}, seed=0).tensors
    except Exception as exc:  # a kernel that fails to build: time the per-tensor path
        lines.append(f"check block kernel: FAIL ({exc!r:.300}); timing without it")
        os.environ["MERGEOPT_FUSED_BLOCK"] = "0"  # the engine's next plan reads it
        return lines
    coefficients = _coefficients((0.6,) * engine.num_experts, engine.dtype, engine.device)
    worst = 0.0
    for (_, base, stack, _), (_, fast) in zip(inputs, merged, strict=True):
        # task_arithmetic: base + Σ 0.6·δ_i (no normalization by default), by addmm
        assert base is not None and stack is not None
        reference = fused_weighted_sum(stack, coefficients, base=base)
        error = (fast.float() - reference.float()).abs() / reference.float().abs().clamp_min(1e-3)
        worst = max(worst, float(error.max()))
    lines.append(f"check block kernel task_arithmetic vs addmm: max rel diff {worst:.2e}")
    return lines


def check_fused_route(engine: MergeEngine, names: list[str], method: str) -> list[str]:
    """A fused route that is no longer mergekit's order of operations (the pair methods, SCE,
    RAM, Arcee Fusion) against the torch path (the plan of an exact merge), and both against
    the method's math in fp64: how many values differ, and each path's largest error."""
    from mergeopt.merge.methods import TensorMerge
    from mergeopt.merge.plan import MergePlan

    merge_method = engine.merge_method
    plans = [
        MergePlan.build(merge_method, device=engine.device, dtype=engine.dtype, exact=e)
        for e in (False, True)
    ]
    if plans[0].pair is None and plans[0].data_weighted is None and plans[0].fused is None:
        return [f"check fused {method}: not used (no Triton)"]

    def generator() -> torch.Generator | None:  # the same draws for every path
        if not merge_method.randomized:
            return None
        return torch.Generator(device=engine.device).manual_seed(5)

    lines = []
    experts = experts_params(METHOD_PARAMS[method], engine.num_experts)
    defaults = {**merge_method.global_defaults, **METHOD_PARAMS[method]}
    for name in names:
        base = engine._base.get(name) if merge_method.base_input else None
        stack = engine._stack[name]
        fused, reference = (
            plan.merge_tensor(base, stack, experts, {}, generator=generator()) for plan in plans
        )
        inputs = TensorMerge(
            None if base is None else base.double(),
            stack.double(),
            [{**merge_method.expert_defaults, **e} for e in experts],
            defaults,
            generator(),
        )
        exact = merge_method.math(merge_method, inputs)
        unequal = int((fused != reference.to(fused.dtype)).sum())  # RAM+: fp32 results
        errors = [float((r.double() - exact).abs().max()) for r in (fused, reference)]
        lines.append(
            f"check fused {method} {name}: {unequal} of {fused.numel()} unequal to the torch "
            f"path; largest error against fp64 {errors[0]:.3g} fused, {errors[1]:.3g} torch"
        )
    return lines


def profile_merge(
    engine: MergeEngine, per_block: list, target: MergeTarget, name: str, folder: Path | None
) -> None:
    """One whole merge under torch.profiler: the ops by device time, and host vs device."""
    from torch.profiler import ProfilerActivity, profile

    engine.forget(target)
    activities = [ProfilerActivity.CPU]
    if engine.device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        stats = engine.merge(per_block, target=target, seed=1)
    sort_by = "self_cuda_time_total" if engine.device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort_by, row_limit=18, max_name_column_width=48)
    text = f"## profile {name}: one whole merge, {stats.seconds * 1e3:.1f} ms (profiled)\n{table}\n"
    print(text, file=sys.stderr)
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"profile-{name.replace(':', '-')}.txt").write_text(text, encoding="utf-8")


def mergekit_seconds(config: dict, out: Path, device: str) -> float:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    options = MergeOptions(
        quiet=True,
        copy_tokenizer=False,
        write_model_card=False,
        cuda=device.startswith("cuda"),
        out_shard_size=2 * 10**9,
    )
    started = time.perf_counter()
    run_merge(MergeConfiguration.model_validate(config), str(out), options)
    seconds = time.perf_counter() - started
    shutil.rmtree(out, ignore_errors=True)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--experts", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--methods",
        default=",".join(METHOD_PARAMS),
        help="comma-separated; NAME:exact / NAME:fast force mergekit's op order / the fused path; "
        "NAME:unfused runs the torch ops instead of the Triton kernels; NAME:stored draws DARE's "
        "masks by torch and stores them (MERGEOPT_FUSED_DRAWS=0)",
    )
    parser.add_argument("--mergekit", default="task_arithmetic,ties,dare_ties")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.add_argument(
        "--check", action="store_true", help="first compare the GPU fast paths with references"
    )
    parser.add_argument(
        "--profile",
        default="",
        help="comma-separated rows: profile one whole merge of each (torch.profiler table)",
    )
    parser.add_argument("--profile-dir", type=Path, default=None, help="write the tables here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    methods = [m for m in args.methods.split(",") if m]
    with_mergekit = methods if args.mergekit == "all" else args.mergekit.split(",")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench_merge_"))
    started = time.perf_counter()
    paths = build_models(workdir, args.shape, args.experts, dtype, args.device)
    print(f"# built models in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    shapes = tensor_shapes(args.shape)
    parameters = sum(torch.Size(s).numel() for s in shapes.values())
    element = torch.empty((), dtype=dtype).element_size()
    bandwidth = copy_bandwidth(args.device, dtype, parameters)
    layers = SHAPES[args.shape][0]
    layout = BlockLayout.fixed(layers, layers_per_block=1)
    target = ResidentTarget(shapes, dtype, args.device)
    rows = []
    checked = False
    engine: MergeEngine | None = None
    for row_name in methods:
        method, _, variant = row_name.partition(":")
        merge_method = METHODS[method]
        experts = paths[1 : 1 + (merge_method.max_experts or len(paths))]
        if (
            engine is None
            or engine.merge_method.resident != merge_method.resident
            or engine.num_experts != len(experts)
        ):
            engine = None
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()
            started = time.perf_counter()
            engine = MergeEngine(
                base=paths[0], experts=experts, layout=layout, method=method,
                device=args.device, dtype=dtype,
            )  # fmt: skip
            load_seconds = time.perf_counter() - started
            print(f"# {method} engine loaded in {load_seconds:.1f} s", file=sys.stderr)
        # the engine's plan reads the switches when it is built: set them first
        os.environ["MERGEOPT_FUSED"] = (
            "0" if variant == "unfused" or "MERGEOPT_FUSED" in BROKEN else "1"
        )
        os.environ["MERGEOPT_FUSED_DRAWS"] = "0" if variant == "stored" else "1"
        exact = variant == "exact" or (variant != "fast" and args.device == "cpu")
        engine.set_method(method, exact=exact)
        if args.check and merge_method.task_vectors and not checked:
            layer = next(n for n in shapes if n.endswith("0.mlp.down_proj.weight"))
            check_names = [layer, "model.embed_tokens.weight"]
            check_methods = [m.partition(":")[0] for m in methods]
            for line in check_gpu_paths(engine, check_names, check_methods):
                print(line, flush=True)
            checked = True
            # a check that failed turned its fast path off: plan again with that switch
            if "MERGEOPT_FUSED" in BROKEN:
                os.environ["MERGEOPT_FUSED"] = "0"
            engine.set_method(method, exact=exact)
        if args.check and (
            merge_method.fused_pair is not None
            or merge_method.fused_data_weighted is not None
            or merge_method.fused_math is not None
        ):
            layer = next(n for n in shapes if n.endswith("0.mlp.down_proj.weight"))
            for line in check_fused_route(engine, [layer, "model.embed_tokens.weight"], method):
                print(line, flush=True)
        params = METHOD_PARAMS[method]
        per_block = [[dict(params) for _ in experts] for _ in range(layout.num_blocks)]
        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        times = []
        for repeat in range(args.repeats + 1):
            engine.forget(target)
            sync(args.device)
            stats = engine.merge(per_block, target=target, seed=repeat)
            if repeat:  # the first run warms up
                times.append(stats.seconds)
        whole = statistics.median(times)
        # Randomized methods re-merge every block when the seed changes: start the one-block
        # timings from a merge with the seed they use.
        engine.merge(per_block, target=target, seed=0)
        block_times = []
        # A method with no per-model parameter (model_stock, karcher, ...) has nothing to
        # change in one block: its one-block column is "-".
        for repeat in range(args.repeats if params else 0):
            changed = [list(b) for b in per_block]
            key = "weight" if "weight" in params else "t"
            changed[layers // 2] = [
                {**p, key: 0.1 + 0.05 * repeat} for p in experts_params(params, len(experts))
            ]
            stats = engine.merge(changed, target=target, seed=0)
            block_times.append(stats.seconds)
            engine.merge(per_block, target=target, seed=0)
        one_block = statistics.median(block_times) if block_times else None
        if row_name in args.profile.split(","):
            profile_merge(engine, per_block, target, row_name, args.profile_dir)
        models_read = merge_method.resident_models(len(experts))
        floor = (models_read + 1) * parameters * element / bandwidth
        peak = torch.cuda.max_memory_allocated() if args.device.startswith("cuda") else None
        mergekit = None
        if row_name in with_mergekit:
            config = {
                "merge_method": method,
                "dtype": args.dtype,
                "models": [{"model": str(p), "parameters": dict(params)} for p in experts],
            }
            if method == "slerp":
                config["models"] = [{"model": str(paths[0])}, {"model": str(experts[0])}]
                config["parameters"] = {"t": params["t"]}
                config["models"][1].pop("parameters", None)
            if merge_method.base_input:
                config["base_model"] = str(paths[0])
            if method == "slerp":
                config["base_model"] = str(paths[0])
            mergekit = mergekit_seconds(config, workdir / "mergekit_out", args.device)
        rows.append((row_name, whole, whole / floor, mergekit, one_block, peak))
        print(f"# {row_name}: {whole * 1e3:.1f} ms", file=sys.stderr)

    device_name = (
        torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor()
    )
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(
        f"\n{args.shape}-shaped random model: {parameters / 1e9:.3f} B parameters, "
        f"{args.experts} experts, {args.dtype}, device {args.device} ({device_name}), "
        f"torch {torch.__version__} ({torch.get_num_threads()} CPU threads), {stamp}; "
        f"copy bandwidth {bandwidth / 1e9:.0f} GB/s "
        f"(read + write); floor = (models read + 1 written) x P x bytes / bandwidth; "
        f"blocks = {layers} layers + 1; median of {args.repeats}\n"
    )
    print(
        "| method | whole merge ms | / floor | mergekit run_merge s | mergekit / ours "
        "| one-block re-merge ms | block / whole | peak device GiB |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for method, whole, ratio, mergekit, one_block, peak in rows:
        mk = f"{mergekit:.2f}" if mergekit is not None else "-"
        speedup = f"{mergekit / whole:.0f}x" if mergekit is not None else "-"
        peak_text = f"{peak / 2**30:.2f}" if peak is not None else "-"
        block_text = f"{one_block * 1e3:.2f} | 1/{whole / one_block:.0f}" if one_block else "- | -"
        print(
            f"| {method} | {whole * 1e3:.1f} | {ratio:.2f} | {mk} | {speedup} "
            f"| {block_text} | {peak_text} |"
        )
    resident = (1 + args.experts) * parameters * element
    print(
        f"\nbase + {args.experts} task vectors = {resident / 2**30:.2f} GiB, target "
        f"{parameters * element / 2**30:.2f} GiB (peak includes both)"
    )
    if args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)


def experts_params(params: dict, count: int) -> list[dict]:
    return [dict(params) for _ in range(count)]


if __name__ == "__main__":
    main()
