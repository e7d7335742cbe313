"""Building the zoo: a competent base pretrained on the skills, two experts fine-tuned briefly
from it, their scores, all in a staging folder renamed into place at the end."""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from mergeopt.errors import UserError
from mergeopt.staging import staged_folder
from mergeopt.zoo import tasks as zoo_tasks
from mergeopt.zoo.training import (
    ModelShape,
    batches,
    deterministic_torch,
    make_model,
    make_tokenizer,
    relative_delta_norm,
    train,
)

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerFast

    from mergeopt.progress import Stages
    from mergeopt.zoo import ZooInfo


# Fixed, so that a seed builds the same zoo on every machine (the thread count changes float
# summation order); two is what the CI machine has and where most of the speed-up ends for
# matrices this small.
TRAINING_THREADS = 2


@dataclass(frozen=True, kw_only=True)
class ExpertTraining:
    """A brief supervised fine-tune of the base: ``steps`` batches at a small learning rate.

    Attributes:
        arith_style: how the expert answers sums (``direct`` or ``steps``).
        reverse_share: share of its examples that are reversals (answered directly).
        layer_decay: layer-wise learning-rate decay (1 = the same rate for every layer).
    """

    arith_style: Literal["direct", "steps"]
    steps: int
    lr: float
    reverse_share: float = 0.0
    reverse_word_lengths: tuple[int, int] = (2, 6)
    layer_decay: float = 1.0


@dataclass(frozen=True, kw_only=True)
class ZooTraining:
    """How much of everything a build makes; tests shrink it to check the machinery quickly.

    The base's corpus is the skills themselves in the task format, loss on the answers only:
    ``1 - base_reverse_share`` sums, written with a trace with probability
    ``base_trace_share[carries]`` (harder sums more often traced), the rest reversals.
    """

    shape: ModelShape = field(default_factory=ModelShape)
    batch_size: int = 64
    base_steps: int = 700
    base_lr: float = 3e-3
    warmup_steps: int = 20
    base_reverse_share: float = 0.2
    base_trace_share: tuple[float, float, float] = (0.2, 0.5, 0.8)
    base_word_lengths: tuple[int, int] = (2, 6)
    base_reverse_task_format_share: float = 0.25
    eval_word_lengths: tuple[int, int] = (3, 6)
    direct: ExpertTraining = field(
        default_factory=lambda: ExpertTraining(
            arith_style="direct", steps=100, lr=3e-4, reverse_share=0.4
        )
    )
    steps: ExpertTraining = field(
        default_factory=lambda: ExpertTraining(
            arith_style="steps", steps=100, lr=3e-4, layer_decay=0.7
        )
    )
    # Problems and words per evaluation split; the training items exclude all of them.
    split_size: int = 200
    eval_limit: int = 100


def _arith_example(a: int, b: int, style: str) -> zoo_tasks.Example:
    answer = zoo_tasks.arith_steps_answer if style == "steps" else zoo_tasks.arith_direct_answer
    return zoo_tasks.Example(zoo_tasks.arith_prompt(a, b), answer(a, b), style)


def _reverse_example(word: str, *, task_format: bool = True) -> zoo_tasks.Example:
    prompt = zoo_tasks.reverse_prompt(word) if task_format else zoo_tasks.plain_reverse_prompt(word)
    return zoo_tasks.Example(prompt, zoo_tasks.reverse_answer(word), "reverse")


def _base_corpus(
    rng: random.Random, splits: zoo_tasks.Splits, training: ZooTraining
) -> list[zoo_tasks.Example]:
    examples = []
    for _ in range(training.base_steps * training.batch_size):
        if rng.random() < training.base_reverse_share:
            word = splits.train_word(rng, training.base_word_lengths)
            task_format = rng.random() < training.base_reverse_task_format_share
            examples.append(_reverse_example(word, task_format=task_format))
            continue
        a, b = rng.choice(splits.train_problems)
        traced = rng.random() < training.base_trace_share[zoo_tasks.carries(a, b)]
        examples.append(_arith_example(a, b, "steps" if traced else "direct"))
    return examples


def _expert_corpus(
    rng: random.Random, splits: zoo_tasks.Splits, expert: ExpertTraining, batch_size: int
) -> list[zoo_tasks.Example]:
    examples = []
    for _ in range(expert.steps * batch_size):
        if rng.random() < expert.reverse_share:
            examples.append(_reverse_example(splits.train_word(rng, expert.reverse_word_lengths)))
        else:
            examples.append(_arith_example(*rng.choice(splits.train_problems), expert.arith_style))
    return examples


def _save(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, folder: Path) -> None:
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)


def _prepare_out_dir(out_dir: Path, names: set[str]) -> None:
    """Refuse to overwrite anything that is not a (possibly half-built) zoo."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise UserError(f"{out_dir}: exists and is not a folder; cannot build the zoo there")
    entries = {entry.name for entry in out_dir.iterdir()}
    if entries and not entries & names:
        raise UserError(
            f"{out_dir}: folder is not empty and holds no model zoo; choose another OUT_DIR"
        )


def score_model(
    model_dir: Path,
    task_file: Path,
    *,
    limit: int,
    extract: str,
    max_new_tokens: int = 32,
    device: str = "cpu",
) -> dict[str, float]:
    """Greedy accuracy, mean generated tokens (the stop newline or EOS included, as the study
    scorer counts them) and the share of traced answers, on the first ``limit`` records."""
    import torch

    from mergeopt.objectives.metrics import generation_accuracy
    from mergeopt.objectives.scorers.hf import HFScorer

    records = zoo_tasks.read_jsonl(task_file)[:limit]
    # One thread: these matrices are tiny, and two OpenMP threads on a busy 2-core machine spin
    # against each other (measured: 10x slower generation under load).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        # Dynamic decoding: a static decoder's compilation would cost more than these few
        # batches (on the CPU, where zoos are built, it is the default anyway).
        scorer = HFScorer(model_dir=model_dir, batch_size=limit, device=device, decode="dynamic")
        outputs = scorer.generate(
            [r["prompt"] for r in records], max_new_tokens=max_new_tokens, stop=["\n"]
        )
    finally:
        torch.set_num_threads(threads)
    texts = [o.text for o in outputs]
    return {
        "accuracy": generation_accuracy(texts, [r["answer"] for r in records], extract=extract),
        "mean_tokens": sum(o.num_tokens for o in outputs) / len(outputs),
        "traced": sum(t.lstrip().startswith("[") for t in texts) / len(texts),
    }


def build(
    out_dir: Path,
    *,
    seed: int,
    training: ZooTraining,
    progress: Stages,
    version: str,
    device: str = "cpu",
) -> dict[str, Any]:
    """Train and score the zoo into ``out_dir``; returns the metadata for ``zoo.json`` (which the
    caller writes last). See ``mergeopt.zoo`` for the layout.

    ``device``: where the models train and are scored. The CPU build is deterministic; on CUDA
    it is seeded only (cross-entropy has no deterministic CUDA kernel), for larger shapes
    (``scripts/bench_study.py``'s medium zoo)."""
    import torch
    import transformers
    from transformers.utils import logging as transformers_logging

    from mergeopt.zoo import BASE_NAME, EXPERT_NAMES, TASK_FILES

    started = time.perf_counter()
    out_dir = out_dir.absolute()
    _prepare_out_dir(out_dir, {"zoo.json", BASE_NAME, "tasks"})
    seconds: dict[str, float] = {}

    def lap(phase: str) -> None:
        seconds[phase] = round(time.perf_counter() - started - sum(seconds.values()), 1)

    # Our own progress lines only: transformers draws a bar per saved or loaded model.
    bars_were_enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        with staged_folder(out_dir, replace=True) as staging:
            rng = random.Random(seed)
            splits = zoo_tasks.make_splits(
                rng, split_size=training.split_size, eval_word_lengths=training.eval_word_lengths
            )
            (staging / "tasks").mkdir()
            for task, records in zoo_tasks.task_records(rng, splits).items():
                zoo_tasks.write_jsonl(staging / "tasks" / TASK_FILES[task], records)
            tokenizer = make_tokenizer()
            base_steps = batches(
                tokenizer, _base_corpus(rng, splits, training), training.batch_size, rng=rng
            )
            experts = dict(zip(EXPERT_NAMES, (training.direct, training.steps), strict=True))
            expert_steps = {
                name: batches(
                    tokenizer,
                    _expert_corpus(rng, splits, expert, training.batch_size),
                    training.batch_size,
                    rng=rng,
                )
                for name, expert in experts.items()
            }
            lap("data")
            folders = {name: staging / name for name in (BASE_NAME, *EXPERT_NAMES)}
            losses: dict[str, float] = {}
            delta_norms: dict[str, float] = {}
            on_device = {
                name: [(ids.to(device), labels.to(device)) for ids, labels in steps]
                for name, steps in (("base", base_steps), *expert_steps.items())
            }
            base_steps, expert_steps = on_device.pop("base"), on_device
            deterministic = torch.device(device).type == "cpu"
            with deterministic_torch(seed, threads=TRAINING_THREADS, algorithms=deterministic):
                model = make_model(tokenizer, training.shape)
                model.to(device)  # type: ignore[arg-type]  # transformers types .to badly
                advance = progress.begin(f"pretraining {BASE_NAME}", len(base_steps))
                losses[BASE_NAME] = train(
                    model,
                    base_steps,
                    lr=training.base_lr,
                    warmup_steps=training.warmup_steps,
                    advance=advance,
                )
                _save(model, tokenizer, folders[BASE_NAME])
                lap(BASE_NAME)
                base_state = {k: v.clone() for k, v in model.state_dict().items()}
                for name, expert in experts.items():
                    model.load_state_dict(base_state)
                    advance = progress.begin(f"fine-tuning {name}", len(expert_steps[name]))
                    losses[name] = train(
                        model,
                        expert_steps[name],
                        lr=expert.lr,
                        warmup_steps=min(training.warmup_steps, max(1, expert.steps // 4)),
                        layer_decay=expert.layer_decay,
                        advance=advance,
                    )
                    delta_norms[name] = round(
                        relative_delta_norm(base_state, model.state_dict()), 5
                    )
                    _save(model, tokenizer, folders[name])
                    lap(name)
            metrics: dict[str, dict[str, Any]] = {}
            advance = progress.begin("scoring the models", 2 * len(folders))
            for name, folder in folders.items():
                metrics[name] = {}
                for task, extract in (("arith", "last_number"), ("reverse", "exact")):
                    metrics[name][task] = score_model(
                        folder,
                        staging / "tasks" / TASK_FILES[f"{task}.heldout"],
                        limit=training.eval_limit,
                        extract=extract,
                        device=device,
                    )
                    advance()
                metrics[name]["final_train_loss"] = round(losses[name], 4)
            progress.end()
            lap("scoring")
    finally:
        if bars_were_enabled:
            transformers_logging.enable_progress_bar()
    return {
        "zoo_version": version,
        "seed": seed,
        "build_seconds": round(time.perf_counter() - started, 1),
        "phase_seconds": seconds,
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "torch_threads": TRAINING_THREADS,
        "metrics_split": "heldout",
        "metrics_limit": training.eval_limit,
        "models": metrics,
        "task_vector_relative_norm": delta_norms,
        "recipe": asdict(training),
    }


def write_metadata(info_root: Path, metadata: dict[str, Any]) -> ZooInfo:
    """Write ``zoo.json`` (last: its presence marks the zoo complete) and return the zoo."""
    from mergeopt.zoo import ZOO_JSON, ZooInfo

    (info_root / ZOO_JSON).write_text(json.dumps(metadata, indent=2) + "\n")
    return ZooInfo.from_dir(info_root)
