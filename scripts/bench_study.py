"""Whole trials of a study on one device, timed part by part, for each hf decoding path.

Part 1 of issue #19's end-to-end benchmark: a random model of a given shape (Qwen3-4B by
default), base + 2 experts, fixed-length answers (EOS off, no stop string: every prompt gets
exactly ``--max-new-tokens`` greedy tokens). Each trial of an Optuna study (SQLite on local
disk) is timed as

- ask/fit: ``study.ask`` (the sampler's fit and proposal);
- merge: the merge engine's math for every changed block;
- swap: what the engine copies into the resident scorer's parameters after merging (it
  writes straight into them where it can, as a worker does);
- evaluate: the evaluator on the task (64 prompts, one generation per prompt);
- tell: ``study.tell`` with the two objective values (accuracy, mean tokens).

The decoding paths (``scorer.decode``: dynamic is the scorer before issue #19, static the
static cache with its CUDA graph) run in the same process on the same models, each on its own
study, one after the other. The decode floor of an evaluation is the weights read once per
forward pass: forward passes x parameter bytes / the copy bandwidth measured here (a large
device-to-device copy, bytes read + written). Afterwards both paths generate for two recipes
and their outputs are compared token for token (the graph replays must follow the weights the
engine writes in place). Example::

    python scripts/bench_study.py --device cuda --dtype bfloat16 --trials 6 \\
        --out docs/bench/study-h200.md

Not a timed test: the numbers depend on the machine; the tables are committed under docs/bench/.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402 - after the path fix so the script runs from a checkout
from bench_scoring import (  # noqa: E402 - the random models and helpers of the scoring bench
    SHAPES,
    Objective,
    TimedTarget,
    build_random_models,
    machine_description,
)

from mergeopt.blocks import BlockLayout  # noqa: E402
from mergeopt.genome import Genome  # noqa: E402
from mergeopt.merge.engine import MergeEngine  # noqa: E402
from mergeopt.objectives.evaluate import Evaluator, GenerationOptions  # noqa: E402
from mergeopt.objectives.scorers import create_scorer  # noqa: E402
from mergeopt.objectives.scorers.hf import HFScorer  # noqa: E402
from mergeopt.objectives.scorers.static_decode import prefill_width  # noqa: E402
from mergeopt.samplers import create_sampler  # noqa: E402

PARTS = ("ask", "merge", "swap", "evaluate", "tell")


class InPlaceTimedTarget(TimedTarget):
    """The scorer's target as a worker uses it: the engine writes merged tensors straight into
    the parameters it offers (``destination``), so "swap" times only what is left to copy."""

    def destination(self, name: str) -> torch.Tensor | None:
        return self.inner.destination(name)

    def write(self, tensors: list[tuple[str, torch.Tensor]]) -> None:
        _sync(self.device)  # the merge kernels finish first: their time is not the swap's
        super().write(tensors)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device, *, megabytes: int = 2048, repeats: int = 10) -> float:
    """Bytes per second of a large device-to-device copy, counting bytes read plus written
    (the median of ``repeats`` copies after three warm-up copies)."""
    source = torch.randint(0, 255, (megabytes << 20,), dtype=torch.uint8, device=device)
    destination = torch.empty_like(source)
    for _ in range(3):
        destination.copy_(source)
    seconds = []
    for _ in range(repeats):
        _sync(device)
        started = time.perf_counter()
        destination.copy_(source)
        _sync(device)
        seconds.append(time.perf_counter() - started)
    del source, destination
    return 2 * (megabytes << 20) / statistics.median(seconds)


def parameter_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters, a tied tensor counted once (what one forward reads)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def run_trials(
    *,
    decode: str,
    scorer: HFScorer,
    engine: MergeEngine,
    genome: Genome,
    objectives: Sequence[Objective],
    options: GenerationOptions,
    sampler: str,
    trials: int,
    storage: str,
    device: torch.device,
) -> list[dict[str, float]]:
    import optuna

    study = optuna.create_study(
        study_name=f"bench-{decode}",
        storage=storage,
        directions=["maximize", "minimize"],
        sampler=create_sampler(sampler, {}, seed=0, genome=genome, num_objectives=2),
    )
    evaluator = Evaluator(objectives, scorer, scorer_options=options)
    target = InPlaceTimedTarget(scorer.merge_target(), device)
    results = []
    for _ in range(trials):
        seconds: dict[str, float] = {}
        started = time.perf_counter()
        trial = study.ask(genome.distributions())
        seconds["ask"] = time.perf_counter() - started
        target.seconds = 0.0
        _sync(device)
        started = time.perf_counter()
        engine.merge(genome.block_params(trial.params), target=target)
        _sync(device)
        seconds["swap"] = target.seconds
        seconds["merge"] = time.perf_counter() - started - target.seconds
        evaluation = evaluator.evaluate()
        seconds["evaluate"] = evaluation.seconds
        started = time.perf_counter()
        study.tell(trial, [evaluation.values["accuracy"], evaluation.values["tokens"]])
        seconds["tell"] = time.perf_counter() - started
        seconds["total"] = sum(seconds[part] for part in PARTS)
        seconds["tokens"] = float(evaluation.tokens)
        results.append(seconds)
        print(json.dumps({"decode": decode, **seconds}), flush=True)
    return results


def agreement(
    scorers: dict[str, HFScorer],
    engine: MergeEngine,
    genome: Genome,
    prompts: list[str],
    max_new_tokens: int,
    device: torch.device,
) -> list[str]:
    """For two random recipes merged into every scorer: how many prompts' greedy outputs are
    identical across the decoding paths, and whether the recipes' outputs differ."""
    import random

    rng = random.Random(1)
    targets = {decode: TimedTarget(s.merge_target(), device) for decode, s in scorers.items()}
    lines, previous = [], None
    for name in ("A", "B"):
        params = {p: rng.uniform(0.0, 1.0) for p in genome.param_names}
        outputs = {}
        for decode, scorer in scorers.items():
            engine.merge(genome.block_params(params), target=targets[decode])
            outputs[decode] = scorer.generate(prompts, max_new_tokens=max_new_tokens, stop=[])
        if "dynamic" in scorers:
            # The dynamic path against itself at half the batch: how often bf16 rounding of a
            # different batch shape alone flips a greedy token on this model.
            dynamic = scorers["dynamic"]
            dynamic.batch_size //= 2
            outputs["dynamic at half the batch"] = dynamic.generate(
                prompts, max_new_tokens=max_new_tokens, stop=[]
            )
            dynamic.batch_size *= 2
        first, *others = outputs.values()
        same = [sum(a == b for a, b in zip(first, o, strict=True)) for o in others]
        changed = ""
        if previous is not None:
            differing = sum(a != b for a, b in zip(previous, first, strict=True))
            changed = f"; outputs differ from A's on {differing}/{len(prompts)} prompts"
        lines.append(
            f"- recipe {name}: identical greedy outputs across {' / '.join(outputs)}: "
            f"{', '.join(f'{n}/{len(prompts)}' for n in same)}{changed}"
        )
        previous = first
    return lines


def device_decode_seconds(
    scorer: HFScorer, prompts: list[str], max_new_tokens: int, device: torch.device
) -> tuple[float, float]:
    """Seconds of one batch's prefill and of one decode step (the median of its steps), timed
    on the static decoder alone: the device's share of an evaluation, without the host's
    reading back and stop checks."""
    token_ids = [scorer.tokenizer(p)["input_ids"] for p in prompts][: scorer.batch_size]
    decoder = scorer._decoder(len(token_ids), prefill_width(token_ids), max_new_tokens)
    steps = []
    with torch.inference_mode():
        _sync(device)
        started = time.perf_counter()
        decoder.prefill(token_ids, pad_token_id=scorer.pad_token_id)
        _sync(device)
        prefill = time.perf_counter() - started
        for _ in range(max_new_tokens - 1):
            started = time.perf_counter()
            decoder.advance()
            _sync(device)
            steps.append(time.perf_counter() - started)
    return prefill, statistics.median(steps)


def _mean(rows: Sequence[dict[str, float]], key: str) -> float:
    return statistics.fmean(row[key] for row in rows) if rows else float("nan")


def report(
    results: dict[str, list[dict[str, float]]],
    *,
    floor: float,
    bandwidth: float,
    weight_bytes: int,
    forward_passes: int,
    graphs: dict[str, int],
    compiled: dict[str, int],
    agreement_lines: list[str],
    setup: str,
    device: torch.device,
    command: str,
) -> str:
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# Whole trials on one device (bench_study part 1)",
        "",
        f"- date: {now}",
        f"- machine: {machine_description(device)}",
        f"- setup: {setup}",
        f"- command: `{command}`",
        f"- decode floor: {forward_passes} forward passes x {weight_bytes / 1e9:.2f} GB of "
        f"weights / {bandwidth / 1e12:.2f} TB/s (measured copy, read + write) = "
        f"{1000 * floor:.0f} ms per evaluation",
        "",
        "Mean seconds per trial; the first trial of each path is shown on its own row (it pays "
        "CUDA warm-up, and for static decoding compilation and the graph capture).",
        "",
        "| decode | trials | ask/fit | merge | swap | evaluate | tell | total | tokens/s "
        "| evaluate / floor | total / evaluate |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for decode, rows in results.items():
        for label, chosen in (("first", rows[:1]), (f"2-{len(rows)}", rows[1:])):
            if not chosen:
                continue
            cells = [f"{_mean(chosen, part):.3f}" for part in (*PARTS, "total")]
            evaluate = _mean(chosen, "evaluate")
            lines.append(
                f"| {decode} | {label} | {' | '.join(cells)} | "
                f"{_mean(chosen, 'tokens') / evaluate:,.0f} | {evaluate / floor:.1f}x | "
                f"{_mean(chosen, 'total') / evaluate:.2f} |"
            )
    lines += ["", "Targets (issue #19, H200):", ""]
    for decode, rows in results.items():
        later = rows[1:] or rows
        ratio = _mean(later, "evaluate") / floor
        total_ratio = _mean(later, "total") / _mean(later, "evaluate")
        capture = rows[0]["evaluate"] - _mean(later, "evaluate") if len(rows) > 1 else math.nan
        lines.append(
            f"- {decode}: evaluation {ratio:.1f}x the decode floor (target <= 3x: "
            f"{'met' if ratio <= 3 else 'missed'}); trial total {total_ratio:.2f}x its "
            f"evaluation (target <= 1.3x: {'met' if total_ratio <= 1.3 else 'missed'}); "
            f"first trial's extra evaluation time {capture:.2f} s (compilation and capture); "
            f"after {len(rows)} trials, compiled decode steps: {compiled.get(decode, 0)}, "
            f"CUDA graphs: {graphs.get(decode, 0)}"
        )
    lines += ["", "Same outputs (both paths on the same merged weights):", "", *agreement_lines]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen3-4b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--decodes", default="dynamic,static", help="comma-separated paths")
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--sampler", default="tpe")
    parser.add_argument("--limit", type=int, default=64, help="prompts per evaluation")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--bandwidth-megabytes", type=int, default=2048)
    parser.add_argument("--work-dir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None, help="markdown report file")
    parser.add_argument("--json", type=Path, default=None, help="every trial as JSON")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    work_dir = Path(args.work_dir or tempfile.mkdtemp(prefix="bench-study-"))
    work_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    base_dir, expert_dirs, task = build_random_models(
        args.shape, work_dir, device=device, dtype=args.dtype
    )
    print(f"built random models in {time.perf_counter() - started:.1f} s", flush=True)
    bandwidth = copy_bandwidth(device, megabytes=args.bandwidth_megabytes)
    print(f"copy bandwidth {bandwidth / 1e9:.0f} GB/s (read + write)", flush=True)

    num_layers = json.loads((base_dir / "config.json").read_text())["num_hidden_layers"]
    layout = BlockLayout.fixed(num_layers, num_blocks=num_layers)
    engine = MergeEngine(
        base=base_dir,
        experts=expert_dirs,
        layout=layout,
        method="task_arithmetic",
        device=device,
        dtype=getattr(torch, args.dtype),
    )
    genome = Genome(num_blocks=layout.num_blocks, num_experts=2, searched={"weight": (0.0, 1.0)})
    objectives = [
        Objective(name="accuracy", task=str(task), metric="accuracy", limit=args.limit),
        Objective(
            name="tokens",
            task=str(task),
            metric="mean_tokens",
            direction="minimize",
            limit=args.limit,
        ),
    ]
    options = GenerationOptions(max_new_tokens=args.max_new_tokens, stop=())
    decodes = [d.strip() for d in args.decodes.split(",") if d.strip()]
    scorers: dict[str, HFScorer] = {}
    for decode in decodes:
        scorer = create_scorer(
            "hf",
            base_dir,
            device=args.device,
            dtype=args.dtype,
            batch_size=args.batch_size,
            decode=decode,
        )
        assert isinstance(scorer, HFScorer)
        scorer.eos_token_ids = set()  # fixed-length answers: every prompt runs to the limit
        scorers[decode] = scorer
    weight_bytes = parameter_bytes(next(iter(scorers.values())).model)
    forward_passes = math.ceil(args.limit / args.batch_size) * args.max_new_tokens
    floor = forward_passes * weight_bytes / bandwidth

    results: dict[str, list[dict[str, float]]] = {}
    for decode, scorer in scorers.items():
        results[decode] = run_trials(
            decode=decode,
            scorer=scorer,
            engine=engine,
            genome=genome,
            objectives=objectives,
            options=options,
            sampler=args.sampler,
            trials=args.trials,
            storage=f"sqlite:///{work_dir / 'bench.db'}",
            device=device,
        )
    graphs = {
        decode: sum(d.graph is not None for d in scorer._decoders.values())
        for decode, scorer in scorers.items()
    }
    compiled = {
        decode: sum(d._forward != d._model_logits for d in scorer._decoders.values())
        for decode, scorer in scorers.items()
    }
    prompts = [json.loads(line)["prompt"] for line in task.read_text().splitlines()][: args.limit]
    agreement_lines = agreement(scorers, engine, genome, prompts, args.max_new_tokens, device)
    for decode, scorer in scorers.items():
        if scorer.static_decoding:
            prefill, step = device_decode_seconds(scorer, prompts, args.max_new_tokens, device)
            device_total = prefill + (args.max_new_tokens - 1) * step
            agreement_lines += [
                "",
                f"Device time of one {decode} batch ({len(prompts[: args.batch_size])} prompts, "
                f"decoder timed alone): prefill {1000 * prefill:.1f} ms + "
                f"{args.max_new_tokens - 1} steps x {1000 * step:.2f} ms = "
                f"{1000 * device_total:.0f} ms ({device_total / floor:.1f}x the floor; "
                f"one step's weights alone: {1000 * weight_bytes / bandwidth:.2f} ms); the rest "
                "of an evaluation is the host's (tokenizing, reading back, stop checks, metrics).",
            ]

    setup = (
        f"random {args.shape}-shaped Qwen3, base + 2 experts, {args.dtype}; task_arithmetic "
        f"over {layout.num_blocks} blocks; sampler {args.sampler}, SQLite on local disk; "
        f"{args.limit} prompts in batches of {args.batch_size}, exactly {args.max_new_tokens} "
        "greedy tokens each (EOS off, no stop string); the engine merges straight into the "
        "scorer's parameters (swap: what it still copies)"
    )
    command = "python scripts/bench_study.py " + " ".join(sys.argv[1:] if argv is None else argv)
    text = report(
        results,
        floor=floor,
        bandwidth=bandwidth,
        weight_bytes=weight_bytes,
        forward_passes=forward_passes,
        graphs=graphs,
        compiled=compiled,
        agreement_lines=agreement_lines,
        setup=setup,
        device=device,
        command=command,
    )
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    if args.json is not None:
        args.json.write_text(json.dumps({"bandwidth": bandwidth, "trials": results}, indent=1))


if __name__ == "__main__":
    main()
