"""Benchmark `mergeopt merge` against `mergekit-yaml` as whole processes on the CPU.

Builds random-weight Qwen2-shaped models (base + 2 experts whose task vectors are a few % of
the base, fp32 safetensors) once into a cache folder, writes one mergekit config per method
(mergekit's parameter names), then runs ``mergeopt merge CONFIG OUT`` and ``mergekit-yaml
CONFIG OUT`` alternately, N repeats each, and prints a markdown table: per shape and method,
the median wall seconds of each whole process (start, imports, reading, merging, writing) and
their ratio. Every run's output is checked before its time counts: deterministic methods must
give tensors equal to mergekit's, randomized ones (dare_*, della*) the same names, shapes and
dtypes, all finite. Usage:

    python scripts/bench_merge_cli.py --shapes qwen2-130m,qwen2.5-0.5b --repeats 3 --threads 2
    python scripts/bench_merge_cli.py --shapes tiny --repeats 1   # checks the script itself
    # two mergeopt checkouts side by side (old and new), each against mergekit-yaml
    python scripts/bench_merge_cli.py --shapes qwen2-130m --checkout main=../main --checkout .

``mergeopt`` runs from this checkout (``python -m mergeopt.cli``), or from each ``--checkout
[NAME=]PATH`` (its folder first on ``PYTHONPATH``), ``mergekit-yaml`` from the running Python's
environment. All get ``OMP_NUM_THREADS``/``MKL_NUM_THREADS`` = ``--threads``.
Progress goes to stderr, the table to stdout. Not a test: the numbers depend on the machine
(docs/bench/ keeps dated tables); run it on an idle one.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CACHE = REPO / ".cache" / "bench-merge-cli"

# name: layers, hidden, intermediate, q heads, kv heads, head_dim, vocab, tied embeddings
SHAPES: dict[str, tuple[int, int, int, int, int, int, int, bool]] = {
    "tiny": (4, 64, 128, 4, 2, 16, 256, True),
    "qwen2-130m": (12, 768, 3072, 12, 2, 64, 32000, True),  # 0.126 B parameters
    "qwen2.5-0.5b": (24, 896, 4864, 14, 2, 64, 151936, True),  # Qwen2.5-0.5B's dims
}
BASE_STD = 0.02
TASK_VECTOR_STD = 0.001  # 5 % of the base's: a fine-tune's size
EXPERTS = 2

# per-model parameters, expert 1 and 2 (mergekit's names); global ones in GLOBAL_PARAMS
MODEL_PARAMS: dict[str, list[dict[str, float]]] = {
    "task_arithmetic": [{"weight": 0.6}, {"weight": 0.4}],
    "ties": [{"weight": 0.6, "density": 0.5}, {"weight": 0.4, "density": 0.7}],
    "dare_ties": [{"weight": 0.6, "density": 0.5}, {"weight": 0.4, "density": 0.7}],
    "dare_linear": [{"weight": 0.6, "density": 0.5}, {"weight": 0.4, "density": 0.7}],
    "breadcrumbs": [
        {"weight": 0.6, "density": 0.5, "gamma": 0.01},
        {"weight": 0.4, "density": 0.7, "gamma": 0.01},
    ],
    "breadcrumbs_ties": [
        {"weight": 0.6, "density": 0.5, "gamma": 0.01},
        {"weight": 0.4, "density": 0.7, "gamma": 0.01},
    ],
    "della": [
        {"weight": 0.6, "density": 0.5, "epsilon": 0.1},
        {"weight": 0.4, "density": 0.7, "epsilon": 0.1},
    ],
    "della_linear": [
        {"weight": 0.6, "density": 0.5, "epsilon": 0.1},
        {"weight": 0.4, "density": 0.7, "epsilon": 0.1},
    ],
}
GLOBAL_PARAMS: dict[str, dict[str, float]] = {"della": {"lambda": 1.0}}
RANDOMIZED = {"dare_ties", "dare_linear", "della", "della_linear"}
DEFAULT_METHODS = "task_arithmetic,ties,dare_ties,della"


def say(message: str) -> None:
    print(f"[{datetime.now(timezone.utc):%H:%M:%S}] {message}", file=sys.stderr, flush=True)


def tensor_shapes(shape: str) -> dict[str, tuple[int, ...]]:
    """Qwen2's tensors (q/k/v biases, no q/k norms) for a named shape."""
    layers, hidden, inter, q_heads, kv_heads, head_dim, vocab, tied = SHAPES[shape]
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update(
            {
                p + "input_layernorm.weight": (hidden,),
                p + "post_attention_layernorm.weight": (hidden,),
                p + "self_attn.q_proj.weight": (q_heads * head_dim, hidden),
                p + "self_attn.q_proj.bias": (q_heads * head_dim,),
                p + "self_attn.k_proj.weight": (kv_heads * head_dim, hidden),
                p + "self_attn.k_proj.bias": (kv_heads * head_dim,),
                p + "self_attn.v_proj.weight": (kv_heads * head_dim, hidden),
                p + "self_attn.v_proj.bias": (kv_heads * head_dim,),
                p + "self_attn.o_proj.weight": (hidden, q_heads * head_dim),
                p + "mlp.gate_proj.weight": (inter, hidden),
                p + "mlp.up_proj.weight": (inter, hidden),
                p + "mlp.down_proj.weight": (hidden, inter),
            }
        )
    shapes["model.norm.weight"] = (hidden,)
    if not tied:
        shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


def qwen2_config(shape: str) -> dict[str, Any]:
    layers, hidden, inter, q_heads, kv_heads, head_dim, vocab, tied = SHAPES[shape]
    assert q_heads * head_dim == hidden, "Qwen2 has no head_dim key: hidden = heads x head_dim"
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": q_heads,
        "num_key_value_heads": kv_heads,
        "vocab_size": vocab,
        "tie_word_embeddings": tied,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "hidden_act": "silu",
        "torch_dtype": "float32",
    }


def cached_models(cache: Path, shape: str) -> list[Path]:
    """Base and experts of ``shape`` in ``cache/shape/`` (built once; ``done.json`` marks a
    complete build of these exact dims, so an interrupted or stale one is rebuilt)."""
    import torch
    from safetensors.torch import save_file

    folder = cache / shape
    stamp = {"dims": list(SHAPES[shape]), "base_std": BASE_STD, "tv_std": TASK_VECTOR_STD}
    names = ["base"] + [f"expert{i}" for i in range(1, EXPERTS + 1)]
    paths = [folder / name for name in names]
    done = folder / "done.json"
    if done.is_file() and json.loads(done.read_text(encoding="utf-8")) == stamp:
        return paths
    say(f"building {shape} models in {folder}")
    shutil.rmtree(folder, ignore_errors=True)
    generator = torch.Generator().manual_seed(0)
    shapes = tensor_shapes(shape)
    base: dict[str, torch.Tensor] = {}
    for name, size in shapes.items():
        if name.endswith("norm.weight"):
            base[name] = torch.ones(size)
        else:
            base[name] = torch.randn(size, generator=generator) * BASE_STD
    for path, name in zip(paths, names, strict=True):
        path.mkdir(parents=True)
        if name == "base":
            tensors = base
        else:
            tensors = {
                n: t + torch.randn(t.shape, generator=generator) * TASK_VECTOR_STD
                for n, t in base.items()
            }
        save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
        del tensors
        (path / "config.json").write_text(json.dumps(qwen2_config(shape), indent=2) + "\n")
    done.write_text(json.dumps(stamp), encoding="utf-8")
    return paths


def write_config(folder: Path, method: str, models: list[Path]) -> Path:
    import yaml

    config: dict[str, Any] = {
        "merge_method": method,
        "base_model": str(models[0]),
        "models": [
            {"model": str(path), "parameters": params}
            for path, params in zip(models[1:], MODEL_PARAMS[method], strict=True)
        ],
        "dtype": "float32",
    }
    if method in GLOBAL_PARAMS:
        config["parameters"] = GLOBAL_PARAMS[method]
    path = folder / f"{method}.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def read_folder(folder: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    tensors: dict[str, Any] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(str(shard)))
    return tensors


def check_output(out: Path, reference: dict[str, Any] | None, exact: bool) -> str | None:
    """What is wrong with the merged folder ``out`` (None: nothing). ``reference``: the
    tensors it must match (all of them if ``exact``, else names, shapes and dtypes)."""
    import torch

    if not (out / "config.json").is_file():
        return f"{out}: no config.json"
    tensors = read_folder(out)
    if not tensors:
        return f"{out}: no tensors"
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return f"{out}: {name} is not finite"
    if reference is None:
        return None
    if set(tensors) != set(reference):
        odd = sorted(set(tensors) ^ set(reference))[:3]
        return f"{out}: tensor names differ from mergekit's ({odd})"
    for name, tensor in tensors.items():
        want = reference[name]
        if tensor.shape != want.shape or tensor.dtype != want.dtype:
            got = f"{tensor.dtype}{list(tensor.shape)}"
            return f"{out}: {name} is {got}, mergekit's {want.dtype}{list(want.shape)}"
        if exact and not torch.equal(tensor, want):
            diff = (tensor.float() - want.float()).abs().max().item()
            return f"{out}: {name} differs from mergekit's (max |diff| {diff:.3g})"
    return None


def run_once(command: list[str], env: dict[str, str], out: Path, cwd: Path) -> float:
    """Wall seconds of one whole process writing ``out``, run in ``cwd`` (``python -m``
    imports from there first); its output shown if it fails."""
    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    result = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        sys.stderr.write(result.stdout[-4000:] + result.stderr[-4000:])
        raise SystemExit(f"error: {shlex.join(command)} exited {result.returncode}")
    return seconds


def checkout_env(env: dict[str, str], checkout: Path) -> dict[str, str]:
    """``env`` with ``checkout`` first on ``PYTHONPATH`` (its ``mergeopt`` is imported)."""
    paths = [str(checkout), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    return {**env, "PYTHONPATH": os.pathsep.join(dict.fromkeys(paths))}


def bench_method(
    shape: str,
    method: str,
    models: list[Path],
    work: Path,
    repeats: int,
    env: dict[str, str],
    checkouts: dict[str, Path],
) -> dict[str, list[float]]:
    """Wall seconds of each checkout's ``mergeopt merge`` and of ``mergekit-yaml`` (key
    ``mergekit``), ``repeats`` runs each, in a rotating order."""
    config = write_config(work, method, models)
    out = work / "out"
    merge = ["-m", "mergeopt.cli", "merge", str(config), str(out)]
    tools = {
        name: ([sys.executable, *merge], checkout_env(env, path), path)
        for name, path in checkouts.items()
    }
    tools["mergekit"] = ([mergekit_yaml(), str(config), str(out)], env, REPO)
    times: dict[str, list[float]] = {tool: [] for tool in tools}
    reference: dict[str, Any] | None = None
    names = ["mergekit", *checkouts]
    for repeat in range(repeats):
        # rotate who goes first, so none always runs on another's warm page cache
        order = names[repeat % len(names) :] + names[: repeat % len(names)]
        if "mergekit" in order[1:] and reference is None:
            order = ["mergekit", *(name for name in order if name != "mergekit")]
        for tool in order:
            command, tool_env, cwd = tools[tool]
            seconds = run_once(command, tool_env, out, cwd)
            if tool == "mergekit" and reference is None:
                reference = read_folder(out)
                problem = check_output(out, None, exact=False)
            else:
                assert reference is not None
                exact = method not in RANDOMIZED
                problem = check_output(out, reference, exact=exact)
            if problem is not None:
                raise SystemExit(f"error: {shape} {method} {tool}: {problem}")
            times[tool].append(seconds)
            say(f"{shape} {method} {tool} run {repeat + 1}/{repeats}: {seconds:.2f} s, checked")
    shutil.rmtree(out, ignore_errors=True)
    return times


def mergekit_yaml() -> str:
    beside = Path(sys.executable).parent / "mergekit-yaml"
    found = str(beside) if beside.is_file() else shutil.which("mergekit-yaml")
    if found is None:
        raise SystemExit("error: mergekit-yaml not found beside this Python nor on PATH")
    return found


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return f"{platform.node()}: {cpu}, {os.cpu_count()} CPUs, load average {load} at start"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="qwen2-130m,qwen2.5-0.5b", help=f"of {list(SHAPES)}")
    parser.add_argument("--methods", default=DEFAULT_METHODS, help=f"of {list(MODEL_PARAMS)}")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each tool per row")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="models built here")
    parser.add_argument(
        "--checkout",
        action="append",
        default=[],
        metavar="[NAME=]PATH",
        help="a mergeopt checkout to time (repeatable; default: this one, named mergeopt)",
    )
    args = parser.parse_args(argv)
    args.shapes = args.shapes.split(",")
    args.methods = args.methods.split(",")
    for shape in args.shapes:
        if shape not in SHAPES:
            parser.error(f"unknown shape {shape!r} (known: {', '.join(SHAPES)})")
    for method in args.methods:
        if method not in MODEL_PARAMS:
            parser.error(f"unknown method {method!r} (known: {', '.join(MODEL_PARAMS)})")
    if args.repeats < 1 or args.threads < 1:
        parser.error("--repeats and --threads must be at least 1")
    checkouts: dict[str, Path] = {}
    for given in args.checkout or [f"mergeopt={REPO}"]:
        name, _, path = given.rpartition("=")
        folder = Path(path).resolve()
        name = name or folder.name
        if not (folder / "mergeopt" / "__init__.py").is_file():
            parser.error(f"--checkout {given}: no mergeopt package in {folder}")
        if name in checkouts or name == "mergekit":
            parser.error(f"--checkout {given}: the name {name!r} is taken")
        checkouts[name] = folder
    args.checkouts = checkouts
    args.cache = args.cache.resolve()  # the configs name the models from any checkout's folder
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import torch

    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(args.threads)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    header = [
        f"machine: {machine()}",
        f"date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"torch {torch.__version__}, {args.threads} threads (OMP_NUM_THREADS) per process",
        f"command: python {shlex.join(['scripts/bench_merge_cli.py', *sys.argv[1:]])}",
        f"mergeopt: {sys.executable} -m mergeopt.cli merge from "
        + ", ".join(f"{name} ({path})" for name, path in args.checkouts.items())
        + f"; mergekit: {mergekit_yaml()}",
    ]
    rows = []
    args.cache.mkdir(parents=True, exist_ok=True)
    for shape in args.shapes:
        models = cached_models(args.cache, shape)
        params = sum(int(torch.Size(s).numel()) for s in tensor_shapes(shape).values())
        for method in args.methods:
            with tempfile.TemporaryDirectory(prefix="run-", dir=args.cache) as work:
                times = bench_method(
                    shape, method, models, Path(work), args.repeats, env, args.checkouts
                )
            medians = {tool: statistics.median(runs) for tool, runs in times.items()}
            theirs_s = medians["mergekit"]
            check = "random: names, shapes, dtypes" if method in RANDOMIZED else "bit-identical"
            ours = " | ".join(f"{medians[name]:.2f}" for name in args.checkouts)
            ratios = " | ".join(f"{theirs_s / medians[name]:.2f}x" for name in args.checkouts)
            rows.append(
                f"| {shape} ({params / 1e6:.1f} M) | {method} | {ours} | {theirs_s:.2f} "
                f"| {ratios} | {check} |"
            )
    print("\n".join(f"- {line}" for line in header))
    print(
        f"\nbase + {EXPERTS} experts, fp32, task vectors {TASK_VECTOR_STD / BASE_STD:.0%} of the "
        f"base's std; median of {args.repeats} whole-process runs each, alternating\n"
    )
    names = list(args.checkouts)
    print(
        "| shape | method | "
        + " | ".join(f"{name} merge s" for name in names)
        + " | mergekit-yaml s | "
        + " | ".join(f"mergekit / {name}" for name in names)
        + " | output |"
    )
    print("| --- | --- | " + "---: | " * (2 * len(names) + 1) + "--- |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
