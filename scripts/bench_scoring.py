"""Trial overhead: resident scorer with in-place weight swaps vs "save merged model + new engine".

Per trial, with a fresh random recipe (every block changes, the worst case for in-place merges):

- resident: seconds merging (engine math), loading the merged tensors into the live scorer
  (``ModuleTarget`` copies for transformers, ``reload_weights`` for vLLM), and evaluating;
- fresh (what SIPBMM and mergekit-evolve do): merging, writing the merged model folder to disk,
  starting a new engine on it, and evaluating.

Both run in the same process on the same models, task and settings. Examples::

    # CPU, the tiny zoo, both scorers
    python scripts/bench_scoring.py --zoo zoo --backends hf,vllm --out docs/bench/scoring-cpu.md
    # GPU, a random Qwen3-4B-shaped model (base + 2 experts written to --work-dir first)
    python scripts/bench_scoring.py --random-shape qwen3-4b --device cuda --dtype bfloat16 \\
        --backends hf --out scoring-h100.md

Not a timed test: the numbers depend on the machine; the tables are committed under docs/bench/.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import random
import shutil
import statistics
import string
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402 - after the path fix so the script runs from a checkout

from mergeopt.blocks import BlockLayout  # noqa: E402
from mergeopt.merge.engine import CallbackTarget, MergeEngine  # noqa: E402
from mergeopt.objectives.evaluate import Evaluator, GenerationOptions  # noqa: E402
from mergeopt.objectives.scorers import create_scorer  # noqa: E402
from mergeopt.objectives.scorers.base import Scorer  # noqa: E402

SHAPES: dict[str, dict[str, Any]] = {
    # Qwen3-4B (config of Qwen/Qwen3-4B): 4.02 B parameters + tied 151,936 x 2,560 embeddings.
    "qwen3-4b": dict(
        hidden_size=2560,
        intermediate_size=9728,
        num_hidden_layers=36,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=151936,
        max_position_embeddings=40960,
        tie_word_embeddings=True,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
    ),
    "tiny": dict(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=64,
        vocab_size=256,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    ),
}


@dataclass(frozen=True)
class Objective:
    """The bench's objectives (the fields ``Evaluator`` reads from a spec's objective)."""

    name: str
    task: str
    metric: str
    kind: str = "generation"
    direction: str = "maximize"
    extract: str = "last_number"
    pattern: str | None = None
    limit: int | None = None
    subsample_seed: int = 0
    heldout: str | None = None
    normalize: bool = False
    evalscope: dict[str, Any] | None = None


@dataclass
class Trial:
    mode: str
    backend: str
    seconds: dict[str, float] = field(default_factory=dict)
    values: dict[str, float] = field(default_factory=dict)


class TimedTarget:
    """Forwards merged tensors to the scorer's target and times the writes (= loading)."""

    def __init__(self, inner: Any, device: torch.device) -> None:
        self.inner = inner
        self.device = device
        self.seconds = 0.0

    def write(self, tensors: list[tuple[str, torch.Tensor]]) -> None:
        started = time.perf_counter()
        self.inner.write(tensors)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds += time.perf_counter() - started


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def random_recipe(rng: random.Random, num_blocks: int, num_experts: int) -> list[list[dict]]:
    return [
        [{"weight": rng.uniform(0.0, 1.0)} for _ in range(num_experts)] for _ in range(num_blocks)
    ]


# -- models -----------------------------------------------------------------------------------


def _big_vocab_tokenizer(vocab_size: int) -> Any:
    """A character tokenizer padded with filler tokens to the model's vocabulary size."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokens = [
        "<pad>",
        "<eos>",
        "<unk>",
        *(string.digits + string.ascii_letters + string.punctuation + " \n"),
    ]
    tokens += [f"<t{i}>" for i in range(vocab_size - len(tokens))]
    backend = Tokenizer(
        models.WordLevel(vocab={t: i for i, t in enumerate(tokens)}, unk_token="<unk>")
    )
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        clean_up_tokenization_spaces=False,
    )


def build_random_models(
    shape: str, work_dir: Path, *, device: torch.device, dtype: str, num_experts: int = 2
) -> tuple[Path, list[Path], Path]:
    """A random base, experts = base + N(0, 0.002) noise, and an arithmetic task file."""
    from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        **SHAPES[shape], bos_token_id=1, eos_token_id=1, pad_token_id=0, dtype=dtype
    )
    tokenizer = _big_vocab_tokenizer(config.vocab_size)
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen3ForCausalLM(config).to(getattr(torch, dtype))
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=1, pad_token_id=0)
    base_dir = work_dir / "base"
    model.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    expert_dirs = []
    for index in range(num_experts):
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                parameter.copy_(base_state[name] + 0.002 * torch.randn_like(parameter))
        folder = work_dir / f"expert{index}"
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        expert_dirs.append(folder)
    del model, base_state
    if device.type == "cuda":
        torch.cuda.empty_cache()
    rng = random.Random(0)
    task = work_dir / "arith.jsonl"
    with task.open("w") as handle:
        for _ in range(256):
            a, b = rng.randint(10, 99), rng.randint(10, 99)
            handle.write(json.dumps({"prompt": f"Q: {a}+{b}=\nA:", "answer": str(a + b)}) + "\n")
    return base_dir, expert_dirs, task


def save_model_folder(tensors: dict[str, torch.Tensor], base_dir: Path, out_dir: Path) -> None:
    """What a restart-based search writes per candidate: weights + config + tokenizer files."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.contiguous() for k, v in tensors.items()},
        str(out_dir / "model.safetensors"),
        metadata={"format": "pt"},
    )
    for source in base_dir.iterdir():
        if source.suffix != ".safetensors" and source.name != "model.safetensors.index.json":
            shutil.copy(source, out_dir / source.name)


# -- trials -----------------------------------------------------------------------------------


def resident_trials(
    *,
    backend: str,
    make_scorer: Callable[[Path], Scorer],
    engine: MergeEngine,
    objectives: Sequence[Objective],
    options: GenerationOptions,
    base_dir: Path,
    trials: int,
    device: torch.device,
    rng: random.Random,
) -> tuple[list[Trial], float]:
    started = time.perf_counter()
    scorer = make_scorer(base_dir)
    startup = time.perf_counter() - started
    evaluator = Evaluator(objectives, scorer, scorer_options=options)
    target = TimedTarget(scorer.merge_target(), device)
    results = []
    for _ in range(trials):
        recipe = random_recipe(rng, engine.layout.num_blocks, engine.num_experts)
        target.seconds = 0.0
        _sync(device)
        merge_started = time.perf_counter()
        engine.merge(recipe, target=target)
        merged = time.perf_counter()
        scorer.after_weights_loaded()  # vLLM reloads the queued blocks here
        _sync(device)
        flush_seconds = time.perf_counter() - merged
        merge_and_load = time.perf_counter() - merge_started
        evaluation = evaluator.evaluate()
        results.append(
            Trial(
                mode="resident",
                backend=backend,
                values=evaluation.values,
                seconds={
                    "merge": merge_and_load - target.seconds - flush_seconds,
                    "load": target.seconds + flush_seconds,
                    "evaluate": evaluation.seconds,
                    "total": merge_and_load + evaluation.seconds,
                },
            )
        )
        print(json.dumps(results[-1].__dict__), flush=True)
    scorer.close()
    return results, startup


def fresh_trials(
    *,
    backend: str,
    make_scorer: Callable[[Path], Scorer],
    engine: MergeEngine,
    objectives: Sequence[Objective],
    options: GenerationOptions,
    base_dir: Path,
    trials: int,
    device: torch.device,
    rng: random.Random,
    work_dir: Path,
) -> list[Trial]:
    results = []
    for index in range(trials):
        recipe = random_recipe(rng, engine.layout.num_blocks, engine.num_experts)
        merged: dict[str, torch.Tensor] = {}

        def keep(tensors: list[tuple[str, torch.Tensor]], into: dict = merged) -> None:
            into.update((name, tensor.to("cpu", copy=True)) for name, tensor in tensors)

        _sync(device)
        started = time.perf_counter()
        engine.merge(recipe, target=CallbackTarget(fn=keep))
        merge_seconds = time.perf_counter() - started
        out_dir = work_dir / f"fresh-{backend}-{index}"
        started = time.perf_counter()
        save_model_folder(merged, base_dir, out_dir)
        save_seconds = time.perf_counter() - started
        del merged
        started = time.perf_counter()
        scorer = make_scorer(out_dir)
        _sync(device)
        start_seconds = time.perf_counter() - started
        evaluation = Evaluator(objectives, scorer, scorer_options=options).evaluate()
        scorer.close()
        shutil.rmtree(out_dir)
        results.append(
            Trial(
                mode="fresh",
                backend=backend,
                values=evaluation.values,
                seconds={
                    "merge": merge_seconds,
                    "save": save_seconds,
                    "start": start_seconds,
                    "evaluate": evaluation.seconds,
                    "total": merge_seconds + save_seconds + start_seconds + evaluation.seconds,
                },
            )
        )
        print(json.dumps(results[-1].__dict__), flush=True)
    return results


# -- report -----------------------------------------------------------------------------------


def machine_description(device: torch.device) -> str:
    cpu = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import os

    parts = [f"{cpu}, {os.cpu_count()} cores", f"torch {torch.__version__}"]
    if device.type == "cuda":
        parts.insert(0, torch.cuda.get_device_name(device))
    try:
        import vllm

        parts.append(f"vllm {vllm.__version__}")
    except ImportError:
        pass
    import transformers

    parts.append(f"transformers {transformers.__version__}")
    return "; ".join(parts)


def _mean(trials: Sequence[Trial], key: str) -> float:
    values = [t.seconds[key] for t in trials if key in t.seconds]
    return statistics.fmean(values) if values else float("nan")


def report(
    results: dict[str, dict[str, Any]],
    *,
    title: str,
    setup: str,
    device: torch.device,
    command: str,
) -> str:
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"# {title}",
        "",
        f"- date: {now}",
        f"- machine: {machine_description(device)}",
        f"- setup: {setup}",
        f"- command: `{command}`",
        "",
        "Mean seconds per trial (each trial a fresh random recipe: every block re-merged).",
        "",
        "| scorer | mode | trials | merge | load weights | save to disk | start engine "
        "| evaluate | total | load / evaluate |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for backend, parts in results.items():
        resident, fresh = parts["resident"], parts["fresh"]
        for mode, trials in (("resident (in place)", resident), ("save + fresh engine", fresh)):
            if not trials:
                continue
            load = _mean(trials, "load")
            evaluate = _mean(trials, "evaluate")
            ratio = f"{100 * load / evaluate:.2f} %" if load == load else "–"

            def cell(key: str, trials: Sequence[Trial] = trials) -> str:
                value = _mean(trials, key)
                return "–" if value != value else f"{value:.3f}"

            lines.append(
                f"| {backend} | {mode} | {len(trials)} | {cell('merge')} | "
                f"{cell('load')} | {cell('save')} | {cell('start')} | "
                f"{cell('evaluate')} | {cell('total')} | {ratio} |"
            )
    lines += [
        "",
        "| scorer | resident start-up (once per worker) | weight swap (load) | "
        "save + start (per trial) | save+start / load | total fresh / total resident |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for backend, parts in results.items():
        resident, fresh = parts["resident"], parts["fresh"]
        load = _mean(resident, "load")
        restart = _mean(fresh, "save") + _mean(fresh, "start")
        lines.append(
            f"| {backend} | {parts['startup']:.2f} s | {load:.4f} s | {restart:.2f} s | "
            f"{restart / load:.0f}x | "
            f"{_mean(fresh, 'total') / _mean(resident, 'total'):.1f}x |"
        )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--zoo", type=Path, help="a built zoo folder (base, experts, tasks)")
    source.add_argument("--random-shape", choices=sorted(SHAPES))
    parser.add_argument("--backends", default="hf", help="comma-separated: hf,vllm")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--fresh-trials", type=int, default=2)
    parser.add_argument(
        "--num-blocks", type=int, default=None, help="blocks of layers (default: one per layer)"
    )
    parser.add_argument("--limit", type=int, default=64, help="task items per evaluation")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--vllm-enforce-eager", action="store_true")
    parser.add_argument("--work-dir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None, help="markdown report file")
    parser.add_argument("--json", type=Path, default=None, help="all trials as JSON")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    work_dir = Path(args.work_dir or tempfile.mkdtemp(prefix="bench-scoring-"))
    work_dir.mkdir(parents=True, exist_ok=True)
    if args.zoo is not None:
        base_dir = args.zoo / "base"
        expert_dirs = [args.zoo / "expert-direct", args.zoo / "expert-steps"]
        task = args.zoo / "tasks" / "arith.jsonl"
        setup = f"zoo at {args.zoo} (Qwen2, 8 layers, hidden 128)"
    else:
        started = time.perf_counter()
        base_dir, expert_dirs, task = build_random_models(
            args.random_shape, work_dir, device=device, dtype=args.dtype
        )
        print(f"built random models in {time.perf_counter() - started:.1f} s", flush=True)
        setup = f"random {args.random_shape}-shaped Qwen3 (base + 2 experts)"
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
    options = GenerationOptions(max_new_tokens=args.max_new_tokens, stop=("\n",))
    config = json.loads((base_dir / "config.json").read_text())
    num_layers = config["num_hidden_layers"]
    layout = BlockLayout.fixed(num_layers, num_blocks=args.num_blocks or num_layers)
    started = time.perf_counter()
    engine = MergeEngine(
        base=base_dir,
        experts=expert_dirs,
        layout=layout,
        method="task_arithmetic",
        device=device,
        dtype=getattr(torch, args.dtype),
    )
    engine_seconds = time.perf_counter() - started
    setup += (
        f"; task_arithmetic over {layout.num_blocks} blocks; {args.limit} arith prompts, "
        f"greedy, max {args.max_new_tokens} new tokens, stop at newline; dtype "
        f"{args.dtype}; engine load {engine_seconds:.1f} s (once per worker)"
    )

    results: dict[str, dict[str, Any]] = {}
    rng = random.Random(0)
    for backend in [b.strip() for b in args.backends.split(",") if b.strip()]:

        def make_scorer(folder: Path, backend: str = backend) -> Scorer:
            return create_scorer(
                backend,
                folder,
                device=args.device,
                dtype=args.dtype,
                batch_size=args.batch_size,
                enforce_eager=args.vllm_enforce_eager,
            )

        common = dict(
            backend=backend,
            make_scorer=make_scorer,
            engine=engine,
            objectives=objectives,
            options=options,
            base_dir=base_dir,
            device=device,
            rng=rng,
        )
        resident, startup = resident_trials(trials=args.trials, **common)
        fresh = fresh_trials(trials=args.fresh_trials, work_dir=work_dir, **common)
        results[backend] = {"resident": resident, "fresh": fresh, "startup": startup}

    title = f"Scoring overhead per trial ({args.device}, {setup.split(';')[0]})"
    command = "python scripts/bench_scoring.py " + " ".join(sys.argv[1:] if argv is None else argv)
    text = report(results, title=title, setup=setup, device=device, command=command)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    if args.json is not None:
        args.json.write_text(
            json.dumps(
                {
                    backend: {
                        mode: [t.__dict__ for t in parts[mode]] for mode in ("resident", "fresh")
                    }
                    | {"startup": parts["startup"]}
                    for backend, parts in results.items()
                },
                indent=1,
            )
        )
    if args.work_dir is None:
        shutil.rmtree(work_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
