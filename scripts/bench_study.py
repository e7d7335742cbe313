"""Whole trials of a study on one device, timed part by part, for each hf decoding path.

Part 1 of issue #19's end-to-end benchmark: a random model of a given shape (Qwen3-4B by
default), base + 2 experts, fixed-length answers (EOS off, no stop string: every prompt gets
exactly ``--max-new-tokens`` greedy tokens). Each trial of an Optuna study (SQLite on local
disk) is timed as

- ask/fit: ``study.ask`` (the sampler's fit and proposal), as a worker asks: the parameters
  written in one transaction (``trial_io.batched_trial_writes``), storage from
  ``mergeopt.storage.open_storage``;
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

    python scripts/bench_study.py --device cuda --dtype bfloat16 --trials 16 \\
        --out docs/bench/study-h200.md

Parts 2 and 3 (``--part medium``): a medium zoo, zoo v2's recipe (``mergeopt.zoo.build``) at
about 100 M parameters (``MEDIUM_SHAPE``), trained on the device in the same call; then the
demo study (``studies/tiny.yaml``: task arithmetic over 4 blocks, accuracy and mean tokens on
the zoo's sums) with the ``saasbo-qnehvi`` sampler (``--medium-sampler``), run by ``mergeopt
study run`` as a user runs it (SQLite on local disk): once with one worker (``--one-worker``),
once with two workers on two GPUs (``--two-workers``), each ``--study-trials`` trials. The
per-trial breakdown is read from the study (a trial's duration from ``study.ask`` to ``tell``; its
merge and evaluation seconds from its attributes). Then the disk path of mergekit-evolve and
SIPBMM on the first ``--disk-trials`` recipes of the one-worker study: ``mergekit-yaml`` (a
whole process, merging on the GPU with ``--cuda``) writes the merged model, a fresh
transformers model loads it, the same evaluator scores it. Example (two GPUs)::

    python scripts/bench_study.py --part medium --device cuda --dtype float32 \
        --two-workers cuda:0,cuda:1 --study-trials 48 --disk-trials 4 --out docs/bench/x.md
    python scripts/bench_study.py --part medium --device cpu --zoo-scale tiny \
        --one-worker cpu --two-workers cpu,cpu --study-trials 6 --disk-trials 1  # the script

Not a timed test: the numbers depend on the machine; the tables are committed under docs/bench/.
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

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


def sampler_startup_trials(sampler: str) -> int:
    """Trials the sampler draws at random before it models anything (its class's default
    ``n_startup_trials``; 0 without one): the table shows them apart, since asking is much
    cheaper then."""
    from mergeopt.samplers import sampler_class

    parameter = inspect.signature(sampler_class(sampler)).parameters.get("n_startup_trials")
    return parameter.default if parameter is not None else 0


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

    from mergeopt.optuna_compat import storage_of
    from mergeopt.storage import open_storage
    from mergeopt.trial_io import batched_trial_writes

    study = optuna.create_study(
        study_name=f"bench-{decode}",
        storage=open_storage(storage),
        directions=["maximize", "minimize"],
        sampler=create_sampler(sampler, {}, seed=0, genome=genome, num_objectives=2),
    )
    evaluator = Evaluator(objectives, scorer, scorer_options=options)
    target = InPlaceTimedTarget(scorer.merge_target(), device)
    results = []
    for _ in range(trials):
        seconds: dict[str, float] = {}
        started = time.perf_counter()
        with batched_trial_writes(storage_of(study)):
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
        compared = (
            f"identical greedy outputs across {' / '.join(outputs)}: "
            f"{', '.join(f'{n}/{len(prompts)}' for n in same)}"
            if others
            else f"one path only ({next(iter(outputs))}), nothing to compare"
        )
        lines.append(f"- recipe {name}: {compared}{changed}")
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


def decode_step_kernels(
    scorer: HFScorer, prompts: list[str], max_new_tokens: int, *, top: int = 12
) -> list[str]:
    """Markdown rows: the CUDA kernels of one decode step (graph replays profiled over 8 steps),
    by device time per step, the ``top`` largest and the rest summed."""
    from torch.profiler import ProfilerActivity, profile

    token_ids = [scorer.tokenizer(p)["input_ids"] for p in prompts][: scorer.batch_size]
    decoder = scorer._decoder(len(token_ids), prefill_width(token_ids), max_new_tokens)
    steps = min(8, max_new_tokens - 1)
    with torch.inference_mode():
        decoder.prefill(token_ids, pad_token_id=scorer.pad_token_id)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                decoder.advance()
            torch.cuda.synchronize()
    kernels = [
        (event.key, event.device_time_total / steps, event.count / steps)
        for event in prof.key_averages()
        if event.device_time_total > 0
    ]
    kernels.sort(key=lambda k: -k[1])
    total = sum(k[1] for k in kernels)
    rows = ["| kernel | us per step | calls per step | share |", "| --- | ---: | ---: | ---: |"]
    for name, micros, calls in kernels[:top]:
        rows.append(f"| `{name[:90]}` | {micros:,.0f} | {calls:.0f} | {micros / total:.0%} |")
    rest = sum(k[1] for k in kernels[top:])
    rows.append(f"| {len(kernels) - top} others | {rest:,.0f} | | {rest / max(total, 1e-9):.0%} |")
    rows.append(f"| total | {total:,.0f} | | |")
    return rows


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
    startup_trials: int,
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
        groups = [("first", rows[:1]), (f"2-{len(rows)}", rows[1:])]
        if 1 < startup_trials < len(rows):
            groups += [
                (f"2-{startup_trials} (sampler's startup)", rows[1:startup_trials]),
                (f"{startup_trials + 1}-{len(rows)}", rows[startup_trials:]),
            ]
        for label, chosen in groups:
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


# -- parts 2 and 3: the medium zoo -------------------------------------------------------------

REPO = Path(__file__).resolve().parent.parent
# Zoo v2's model at about 104 M parameters: 8 layers of hidden 1024 (MLP 4096), initialized at
# 0.02 (the usual scale at this width), zoo v2's data and experts; the base trains 2000 steps at
# 6e-4 (100 warm-up). Chosen on an H200 (2026-12-01, docs/bench/study-medium-h200-2026-12-01.md)
# among 3e-4, 6e-4 and 1e-3: held-out sums accuracy base / expert-direct / expert-steps
# 0.39 / 0.21 / 1.00, as zoo v2's 0.42 / 0.45 / 0.94 (3e-4: every model 1.00; 1e-3: 0.11 /
# 0.08 / 0.38). Zoo v2's 700 steps at 1e-3 learned the formats, not the sums (0.01).
MEDIUM_SHAPE = {"hidden_size": 1024, "intermediate_size": 4096, "num_layers": 8}


def zoo_training(scale: str) -> Any:
    """The medium recipe, or (``tiny``) zoo v2's model with few steps, to check the script."""
    from mergeopt.zoo import ExpertTraining, ZooTraining
    from mergeopt.zoo.training import ModelShape

    if scale == "tiny":
        return ZooTraining(
            base_steps=40,
            direct=ExpertTraining(arith_style="direct", steps=8, lr=3e-4, reverse_share=0.4),
            steps=ExpertTraining(arith_style="steps", steps=8, lr=3e-4, layer_decay=0.7),
            eval_limit=16,
        )
    return ZooTraining(
        shape=ModelShape(**MEDIUM_SHAPE, initializer_range=0.02),
        base_lr=6e-4,
        base_steps=2000,
        warmup_steps=100,
        direct=ExpertTraining(arith_style="direct", steps=100, lr=1e-4, reverse_share=0.4),
        steps=ExpertTraining(arith_style="steps", steps=100, lr=1e-4, layer_decay=0.7),
    )


def medium_spec(
    zoo: Path,
    *,
    name: str,
    dtype: str,
    limit: int,
    sampler_name: str = "saasbo-qnehvi",
    sampler_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The demo study on ``zoo`` with the given sampler (the experts enqueued first)."""
    from tests.conftest import tiny_spec

    sampler = {
        "name": sampler_name,
        "enqueue_experts": True,
        "options": dict(sampler_options or {}),
    }
    spec = tiny_spec(zoo, name=name, sampler=sampler)
    for objective in spec["objectives"]:
        objective["limit"] = limit
    spec["scorer"].update({"dtype": dtype, "batch_size": limit})
    return spec


def run_logged(command: list[str], log: Path, env: dict[str, str], *, check: bool = True) -> float:
    """Wall seconds of ``command`` (output to ``log``); exits with its log's end if it fails
    (with ``check``; else prints the end and goes on)."""
    started = time.perf_counter()
    with log.open("w") as handle:
        result = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, env=env)
    seconds = time.perf_counter() - started
    if result.returncode != 0 and not check:
        print(f"exit code {result.returncode}: {log.read_text()[-1500:]}", flush=True)
    elif result.returncode != 0:
        print(log.read_text()[-3000:], flush=True)
        raise SystemExit(f"{command[:4]} failed with exit code {result.returncode}")
    return seconds


def study_trials(url: str, name: str) -> list[dict[str, Any]]:
    """Every trial of the study: state, seconds (ask to tell), merge and evaluation seconds,
    worker, parameters and values."""
    import optuna

    from mergeopt import attrs

    rows = []
    for trial in optuna.load_study(study_name=name, storage=url).get_trials(deepcopy=False):
        end = trial.datetime_complete
        start = trial.datetime_start
        rows.append(
            {
                "number": trial.number,
                "state": trial.state.name,
                "start": start.timestamp() if start else math.nan,
                "seconds": (end - start).total_seconds() if end and start else math.nan,
                "merge": float(attrs.MERGE_SECONDS.get(trial) or math.nan),
                "evaluate": float(attrs.EVAL_SECONDS.get(trial) or math.nan),
                "worker": attrs.WORKER.get(trial) or "",
                "params": trial.params,
                "values": list(trial.values) if trial.values else None,
            }
        )
    return rows


def run_study(
    spec: dict[str, Any],
    *,
    devices: str,
    trials: int,
    timeout: float,
    work: Path,
    env: dict[str, str],
) -> dict[str, Any]:
    """``mergeopt study create`` then ``study run -n trials --devices devices``, timed."""
    import yaml

    name = spec["name"]
    url = f"sqlite:///{work / (name + '.db')}"
    spec_path = work / f"{name}.yaml"
    spec_path.write_text(yaml.safe_dump(spec, sort_keys=False))
    cli = [sys.executable, "-m", "mergeopt.cli", "study"]
    run_logged([*cli, "create", str(spec_path), "--storage", url], work / f"{name}-create.log", env)
    wall = run_logged(
        [*cli, "run", name, "-n", str(trials), "--storage", url, "--devices", devices]
        + ["--timeout", str(timeout), "--no-progress"],
        work / f"{name}-run.log",
        env,
        check=False,  # the trials in the study are what is measured
    )
    rows = study_trials(url, name)
    print(f"{name}: {devices}, {wall:.1f} s wall, {len(rows)} trials", flush=True)
    return {"name": name, "url": url, "devices": devices, "wall": wall, "trials": rows}


def integrity(run: dict[str, Any], wanted: int) -> str:
    """Whether the study holds exactly the trials asked for: none lost, none twice."""
    rows = run["trials"]
    complete = [r for r in rows if r["state"] == "COMPLETE"]
    numbers = sorted(r["number"] for r in rows)
    recipes = {tuple(sorted(r["params"].items())) for r in complete}
    workers = sorted({r["worker"] for r in complete})
    by_worker = ", ".join(f"{w or '?'}: {sum(r['worker'] == w for r in complete)}" for w in workers)
    other = {r["state"] for r in rows} - {"COMPLETE"}
    return (
        f"{len(complete)}/{wanted} complete, {len(rows)} trials numbered "
        f"{numbers[0] if numbers else '-'}..{numbers[-1] if numbers else '-'} "
        f"({'contiguous' if numbers == list(range(len(numbers))) else 'GAPS'}), "
        f"{len(recipes)} distinct recipes among the complete ones"
        f"{'' if len(recipes) == len(complete) else ' (DUPLICATES)'}; other states: "
        f"{', '.join(sorted(other)) or 'none'}; per worker: "
        f"{by_worker}"
    )


def disk_path(
    run: dict[str, Any],
    spec: dict[str, Any],
    *,
    count: int,
    device: str,
    work: Path,
    env: dict[str, str],
) -> list[dict[str, float]]:
    """The first ``count`` complete recipes of ``run`` through mergekit-yaml, a fresh model load
    and the same evaluator: seconds of each part, and the values against the study's."""
    import optuna

    from mergeopt.export_mergekit import mergekit_config, write_mergekit_config
    from mergeopt.objectives.evaluate import Evaluator
    from mergeopt.spec import StudySpec

    study = optuna.load_study(study_name=run["name"], storage=run["url"])
    parsed = StudySpec.model_validate(spec)
    chosen = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"][:count]
    rows = []
    for trial in chosen:
        config = work / f"mergekit-{trial.number}.yml"
        out = work / f"merged-{trial.number}"
        write_mergekit_config(mergekit_config(study, trial), config)
        command = [sys.executable, "-m", "mergekit.scripts.run_yaml", str(config), str(out)]
        if device.startswith("cuda"):
            command.append("--cuda")
        merge = run_logged(command, work / f"mergekit-{trial.number}.log", env)
        _sync_all()
        started = time.perf_counter()
        # Dynamic decoding: a model loaded afresh for each trial cannot reuse a captured graph,
        # and compiling one per trial would cost more than it saves.
        scorer = create_scorer(
            "hf",
            out,
            device=device,
            dtype=parsed.scorer.dtype,
            batch_size=parsed.scorer.batch_size,
            decode="dynamic",
        )
        _sync_all()
        load = time.perf_counter() - started
        evaluation = Evaluator(parsed.objectives, scorer, scorer_options=parsed.scorer).evaluate()
        scorer.close()
        shutil.rmtree(out)
        values = [evaluation.values[o.name] for o in parsed.objectives]
        row = {
            "number": float(trial.number),
            "mergekit": merge,
            "load": load,
            "evaluate": evaluation.seconds,
            "total": merge + load + evaluation.seconds,
            "same_values": float(values == list(trial.values)),
        }
        rows.append(row)
        print(json.dumps({"disk": row, "values": values, "study": trial.values}), flush=True)
    return rows


def _sync_all() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _trial_table(runs: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| study | workers | trials | wall s | trials / min | first trial s | later trials: "
        "s (ask/fit + tell) | merge | evaluate | trials / h at later trials' pace |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for run in runs:
        complete = [r for r in run["trials"] if r["state"] == "COMPLETE"]
        workers = len(run["devices"].split(","))
        first = [r for r in complete if r["number"] < workers]
        later = [r for r in complete if r["number"] >= workers] or complete
        seconds = _mean(later, "seconds")
        merge, evaluate = _mean(later, "merge"), _mean(later, "evaluate")
        lines.append(
            f"| {run['name']} | {workers} ({run['devices']}) | {len(complete)} | "
            f"{run['wall']:.1f} | {60 * len(complete) / run['wall']:.1f} | "
            f"{_mean(first, 'seconds'):.2f} | {seconds:.3f} ({seconds - merge - evaluate:.3f}) | "
            f"{merge:.3f} | {evaluate:.3f} | {3600 * workers / seconds:,.0f} |"
        )
    return lines


def medium_main(args: argparse.Namespace, command: str) -> None:
    from mergeopt.zoo import ZooInfo, build_zoo

    device = torch.device(args.device)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench-study-medium-")).absolute()
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    if args.zoo is not None:  # checking the script: a zoo built before
        shutil.copytree(args.zoo, work / "zoo", dirs_exist_ok=True)
        info = ZooInfo.from_dir(work / "zoo")
    else:
        info = build_zoo(
            work / "zoo", training=zoo_training(args.zoo_scale), device=args.device, progress=False
        )
    models = info.metadata["models"]
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(work / "zoo" / "base")
    with torch.device("meta"):
        from transformers import AutoModelForCausalLM

        parameters = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    zoo_lines = [
        f"- medium zoo: {parameters / 1e6:.1f} M parameters per model, built on {args.device} in "
        f"{info.metadata['build_seconds']:.1f} s (phases: {info.metadata['phase_seconds']})",
        *(
            f"- {name}: sums accuracy {m['arith']['accuracy']:.2f} at "
            f"{m['arith']['mean_tokens']:.1f} tokens ({m['arith']['traced']:.0%} traced), "
            f"reversal accuracy {m['reverse']['accuracy']:.2f}; final train loss "
            f"{m['final_train_loss']}"
            for name, m in models.items()
        ),
        f"- task vectors, ||tau|| / ||theta||: {info.metadata['task_vector_relative_norm']}",
    ]
    print("\n".join(zoo_lines), flush=True)
    runs = []
    sampler_options = json.loads(args.sampler_options)

    def spec_named(name: str) -> dict[str, Any]:
        return medium_spec(
            work / "zoo",
            name=name,
            dtype=args.dtype,
            limit=args.limit,
            sampler_name=args.medium_sampler,
            sampler_options=sampler_options,
        )

    for label, devices in (("one", args.one_worker), ("two", args.two_workers)):
        if not devices:
            continue
        spec = spec_named(f"medium-{label}")
        runs.append(
            run_study(
                spec,
                devices=devices,
                trials=args.study_trials,
                timeout=args.study_timeout,
                work=work,
                env=env,
            )
        )
    disk: list[dict[str, float]] = []
    disk_error = ""
    if runs and args.disk_trials:
        try:
            disk = disk_path(
                runs[0],
                spec_named(runs[0]["name"]),
                count=args.disk_trials,
                device=args.device,
                work=work,
                env=env,
            )
        except (Exception, SystemExit) as exc:  # noqa: BLE001 - the studies' tables still count
            disk_error = f"- disk path failed: {type(exc).__name__}: {exc}"
            print(disk_error, flush=True)
    lines = [
        "# A whole study on the medium zoo, one and two workers, against the disk path "
        "(bench_study parts 2 and 3)",
        "",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}",
        f"- machine: {machine_description(device)}",
        f"- command: `{command}`",
        f"- study: studies/tiny.yaml on the medium zoo (task_arithmetic, 4 blocks x 2 experts), "
        f"sampler {args.medium_sampler} (experts enqueued first; options "
        f"{args.sampler_options}), {args.limit} sums per evaluation, "
        f"greedy, at most 32 tokens, stop at newline, {args.dtype}; `mergeopt study run` with "
        f"SQLite on local disk, --timeout {args.study_timeout:.0f} s",
        *zoo_lines,
        "",
        "Trial seconds are from the study: ask (the sampler's fit) to tell; wall is the whole "
        "`study run` (worker start, model load, compilation and capture included).",
        "",
        *_trial_table(runs),
        "",
        "Trials as the workers left them:",
        "",
        *(f"- {run['name']}: {integrity(run, args.study_trials)}" for run in runs),
    ]
    if disk_error:
        lines += ["", disk_error]
    if disk:
        complete = [r for r in runs[0]["trials"] if r["state"] == "COMPLETE"]
        later = complete[1:]
        ours = _mean(later, "seconds")
        ours_no_sampler = _mean(later, "merge") + _mean(later, "evaluate")
        disk_total = _mean(disk, "total")
        lines += [
            "",
            f"Disk path (mergekit-evolve's and SIPBMM's): the first {len(disk)} recipes of "
            f"{runs[0]['name']}, each through `mergekit-yaml` (a whole process"
            f"{', --cuda' if device.type == 'cuda' else ''}), a fresh model load, the same "
            "evaluator (dynamic decoding); no sampler time counted.",
            "",
            "| trial | mergekit-yaml s | load s | evaluate s | total s "
            "| same values as the study |",
            "| ---: | ---: | ---: | ---: | ---: | --- |",
            *(
                f"| {int(r['number'])} | {r['mergekit']:.2f} | {r['load']:.2f} | "
                f"{r['evaluate']:.3f} | {r['total']:.2f} | {'yes' if r['same_values'] else 'no'} |"
                for r in disk
            ),
            "",
            f"- trials per hour: disk path {3600 / disk_total:,.0f} (no sampler); one worker "
            f"{3600 / ours:,.0f} at its later trials' pace with the sampler's fit included "
            f"({disk_total / ours:.1f}x the disk path; target >= 10x: "
            f"{'met' if disk_total / ours >= 10 else 'missed'}), "
            f"{3600 * len(complete) / runs[0]['wall']:,.0f} over the whole run's wall "
            f"({disk_total * len(complete) / runs[0]['wall']:.1f}x); merge + evaluate alone "
            f"{disk_total / ours_no_sampler:.1f}x",
        ]
    if len(runs) == 2:
        rates = [
            len([r for r in run["trials"] if r["state"] == "COMPLETE"]) / run["wall"]
            for run in runs
        ]
        paces = []
        for run in runs:
            complete = sorted(
                (r for r in run["trials"] if r["state"] == "COMPLETE"), key=lambda r: r["start"]
            )
            ends = [r["start"] + r["seconds"] for r in complete]
            starts = [r["start"] for r in complete]
            # Steady state: the trials that started after every worker had finished its first.
            workers = len(run["devices"].split(","))
            warm = sorted(ends)[workers - 1] if len(ends) >= workers else math.nan
            done = [e for s, e in zip(starts, ends, strict=True) if s >= warm]
            paces.append(len(done) / (max(done) - warm) if done else math.nan)
        lines += [
            "",
            f"- two workers against one: {rates[1] / rates[0]:.2f}x the trials per minute over "
            f"the whole run (target >= 1.9x: {'met' if rates[1] / rates[0] >= 1.9 else 'missed'}); "
            f"{paces[1] / paces[0]:.2f}x once every worker has finished its first trial "
            f"({60 * paces[0]:.1f} and {60 * paces[1]:.1f} trials / min)",
        ]
    text = "\n".join(lines) + "\n"
    print(text, flush=True)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    if args.json is not None:
        args.json.write_text(
            json.dumps({"runs": runs, "disk": disk, "zoo": info.metadata}, indent=1)
        )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen3-4b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--decodes", default="dynamic,static", help="comma-separated paths")
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--sampler", default="tpe")
    parser.add_argument("--limit", type=int, default=64, help="prompts per evaluation")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--bandwidth-megabytes", type=int, default=2048)
    parser.add_argument("--work-dir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None, help="markdown report file")
    parser.add_argument("--json", type=Path, default=None, help="every trial as JSON")
    parser.add_argument("--part", choices=("shape", "medium"), default="shape")
    medium = parser.add_argument_group("--part medium")
    medium.add_argument("--zoo-scale", choices=("medium", "tiny"), default="medium")
    medium.add_argument("--zoo", type=Path, default=None, help="a zoo built before (no build)")
    medium.add_argument("--one-worker", default="cuda:0", help="device of the one-worker study")
    medium.add_argument("--two-workers", default="cuda:0,cuda:1", help="'' to skip")
    medium.add_argument("--study-trials", type=int, default=48)
    medium.add_argument("--study-timeout", type=float, default=240.0)
    medium.add_argument("--disk-trials", type=int, default=4)
    medium.add_argument("--medium-sampler", default="saasbo-qnehvi", help="the study's sampler")
    medium.add_argument(
        "--sampler-options", default="{}", help="the sampler's options as JSON (the spec's)"
    )
    args = parser.parse_args(argv)
    if args.part == "medium":
        if args.limit == 64:
            args.limit = 48  # the demo study's
        medium_main(
            args,
            "python scripts/bench_study.py " + " ".join(sys.argv[1:] if argv is None else argv),
        )
        return

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
            if device.type == "cuda":
                agreement_lines += [
                    "",
                    f"Kernels of one {decode} decode step (torch.profiler over 8 graph replays):",
                    "",
                    *decode_step_kernels(scorer, prompts, args.max_new_tokens),
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
        startup_trials=sampler_startup_trials(args.sampler),
    )
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    if args.json is not None:
        args.json.write_text(json.dumps({"bandwidth": bandwidth, "trials": results}, indent=1))


if __name__ == "__main__":
    main()
