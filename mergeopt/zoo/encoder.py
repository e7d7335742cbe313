"""The encoder zoo: a tiny BERT pretrained (masked LM) on a synthetic language, and four
classifiers fine-tuned from it on tasks with 4, 2, 3 and 2 labels (analogues of AG News, IMDB,
MNLI and MRPC: ``encoder_tasks.py``), trained on the CPU in about a minute.

It stands in for roberta-base and its textattack fine-tunes, which preference-aware merging
benchmarks merge with TIES: the base is a ``BertForMaskedLM`` with no classification head,
the experts ``BertForSequenceClassification`` with heads of their own sizes, so merging them
exercises zero-padded heads (``checkpoints.merge_shapes``). Every expert's pooler and head
start from one seeded draw (as fine-tunes run with the Trainer's fixed seed do), so the padded
heads are merged as tensors that started alike. ``build`` scores each model and a TIES merge of
the four on every task (``zoo.json``'s ``models`` and ``merges``).

Layout written by :func:`build_encoder_zoo` (a contract the tests rely on)::

    out_dir/base/                           BertForMaskedLM, tokenizer (a word-level WordPiece)
    out_dir/expert-topic/, expert-sentiment/, expert-entailment/, expert-paraphrase/
    out_dir/tasks/TASK.jsonl, TASK.heldout.jsonl    {"text", "text_pair"?, "label"}
    out_dir/tasks/TASK.train.jsonl          training items for ``mergeopt baseline``
    out_dir/zoo.json                        kind "encoder", version, seed, recipe, scores

``zoo.json`` is written last: a folder with a readable ``zoo.json`` is a complete zoo. The same
seed on the same machine gives identical weights.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mergeopt.errors import UserError
from mergeopt.staging import staged_folder
from mergeopt.zoo import encoder_tasks
from mergeopt.zoo.training import deterministic_torch

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from mergeopt.progress import Stages

ENCODER_ZOO_VERSION = "encoder-2"
"""Bump whenever the training, the data or the layout changes: tests cache builds by it."""
BASE_NAME = "base"
EXPERT_NAMES = {task: f"expert-{task}" for task in encoder_tasks.LABEL_COUNTS}
ZOO_JSON = "zoo.json"
TRAIN_STREAM = 0x7A1
"""Offset of the training files' seed from the zoo's."""
TRAINING_THREADS = 1
"""Fixed, so that a seed builds the same zoo on every machine; one, because these matrices are
tiny, and a second OpenMP thread on a busy 2-core machine made steps slower, not faster."""


@dataclass(frozen=True, kw_only=True)
class EncoderZooTraining:
    """How much a build trains; tests may shrink it."""

    hidden_size: int = 64
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 128
    batch_size: int = 64
    pretrain_steps: int = 500
    pretrain_lr: float = 2e-3
    mask_share: float = 0.2
    probe_steps: int = 100
    probe_lr: float = 3e-3
    expert_steps: int = 150
    expert_lr: float = 2e-4
    split_size: int = 200
    """Items of each task's search and held-out files."""
    train_size: int = 2000
    """Items of each task's training file (``mergeopt baseline`` fine-tunes on it)."""


@dataclass(frozen=True, kw_only=True)
class EncoderZoo:
    """Where the parts of a built encoder zoo lie (``tasks``: ``"topic"``,
    ``"topic.heldout"``, ... -> JSONL file)."""

    root: Path
    base: Path
    experts: dict[str, Path]
    tasks: dict[str, Path]
    metadata: dict[str, Any]

    @classmethod
    def from_dir(cls, root: Path) -> EncoderZoo:
        root = Path(root)
        try:
            metadata = json.loads((root / ZOO_JSON).read_text())
        except (OSError, ValueError) as error:
            raise UserError(
                f"{root}: not a complete encoder zoo ({ZOO_JSON} unreadable: {error}); "
                "build it with `mergeopt zoo build --kind encoder`"
            ) from error
        tasks = {
            name: root / "tasks" / f"{name}.jsonl"
            for task in encoder_tasks.LABEL_COUNTS
            for name in (task, f"{task}.heldout", f"{task}.train")
        }
        experts = {task: root / name for task, name in EXPERT_NAMES.items()}
        return cls(
            root=root, base=root / BASE_NAME, experts=experts, tasks=tasks, metadata=metadata
        )


def up_to_date_encoder_zoo(
    out_dir: Path, *, seed: int = 0, training: EncoderZooTraining | None = None
) -> EncoderZoo | None:
    """The encoder zoo in ``out_dir`` when complete and built by this version, seed, training."""
    try:
        zoo = EncoderZoo.from_dir(Path(out_dir))
    except UserError:
        return None
    recipe = json.loads(json.dumps(asdict(training or EncoderZooTraining())))
    metadata = zoo.metadata
    fresh = metadata.get("zoo_version") == ENCODER_ZOO_VERSION and metadata.get("seed") == seed
    return zoo if fresh and metadata.get("recipe") == recipe else None


def make_tokenizer() -> PreTrainedTokenizerBase:
    """One token per word of the synthetic language (a WordPiece with whole words only)."""
    from transformers import BertTokenizer

    vocabulary = {word: index for index, word in enumerate(encoder_tasks.VOCABULARY)}
    return BertTokenizer(vocab=vocabulary, do_lower_case=True, model_max_length=64)


def _config(tokenizer: PreTrainedTokenizerBase, training: EncoderZooTraining) -> Any:
    from transformers import BertConfig

    return BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=training.hidden_size,
        num_hidden_layers=training.num_layers,
        num_attention_heads=training.num_heads,
        intermediate_size=training.intermediate_size,
        max_position_embeddings=64,
        pad_token_id=tokenizer.pad_token_id,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )


def _encode(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[tuple[str, str | None]]
) -> dict[str, torch.Tensor]:
    firsts = [text for text, _ in texts]
    if all(pair is None for _, pair in texts):
        return dict(tokenizer(firsts, padding=True, return_tensors="pt"))
    return dict(
        tokenizer(firsts, [pair or "" for _, pair in texts], padding=True, return_tensors="pt")
    )


def _texts(record: dict[str, object]) -> tuple[str, str | None]:
    """A task record's text and text pair (None for single texts)."""
    pair = record.get("text_pair")
    return str(record["text"]), None if pair is None else str(pair)


def _masked(
    encoded: dict[str, torch.Tensor], tokenizer: PreTrainedTokenizerBase, share: float
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """BERT's masking: ``share`` of the word tokens predicted, those replaced by [MASK]."""
    import torch

    input_ids = encoded["input_ids"].clone()
    special = torch.tensor(
        [[t in tokenizer.all_special_ids for t in row] for row in input_ids.tolist()]
    )
    chosen = (torch.rand(input_ids.shape) < share) & ~special
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, -100))
    input_ids[chosen] = tokenizer.mask_token_id
    return {**encoded, "input_ids": input_ids}, labels


def _train(
    model: PreTrainedModel,
    steps: Any,
    *,
    lr: float,
    total: int,
    parameters: Sequence[torch.nn.Parameter] | None = None,
) -> float:
    """AdamW on ``parameters`` (default: all) with a short warm-up and linear decay; returns
    the last loss."""
    import torch

    trained = list(parameters) if parameters is not None else list(model.parameters())
    optimizer = torch.optim.AdamW(trained, lr=lr, weight_decay=0.01)
    warmup = max(1, total // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min((step + 1) / warmup, max(0.05, (total - step) / total))
    )
    model.train()
    loss_value = float("nan")
    for inputs, labels in steps:
        loss = model(**inputs, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        loss_value = loss.item()
    model.eval()
    return loss_value


def _pretrain(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    rng: random.Random,
    training: EncoderZooTraining,
    progress: Stages,
) -> float:
    """Masked LM on the four tasks' texts, plus each task's label from the [CLS] vector through
    a linear probe per task that is thrown away afterwards: the base is pretrained on the
    skills themselves (as zoo v2's base is), so its fine-tunes need small task vectors.
    Returns the last loss (masked LM + probe)."""
    import torch

    probes = torch.nn.ModuleDict(
        {
            task: torch.nn.Linear(training.hidden_size, labels)
            for task, labels in encoder_tasks.LABEL_COUNTS.items()
        }
    )
    trained = [*model.parameters(), *probes.parameters()]
    optimizer = torch.optim.AdamW(trained, lr=training.pretrain_lr, weight_decay=0.01)
    total = training.pretrain_steps
    warmup = max(1, total // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min((step + 1) / warmup, max(0.05, (total - step) / total))
    )
    tasks = list(encoder_tasks.TASK_RECORDS)
    advance = progress.begin(f"pretraining {BASE_NAME}", total)
    model.train()
    loss_value = float("nan")
    for step in range(total):
        task = tasks[step % len(tasks)]
        records = [encoder_tasks.TASK_RECORDS[task](rng) for _ in range(training.batch_size)]
        encoded = _encode(tokenizer, [_texts(r) for r in records])
        inputs, labels = _masked(encoded, tokenizer, training.mask_share)
        output = model(**inputs, labels=labels, output_hidden_states=True)
        cls = output.hidden_states[-1][:, 0]
        task_labels = torch.tensor([int(str(r["label"])) for r in records])
        loss = output.loss + torch.nn.functional.cross_entropy(probes[task](cls), task_labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        loss_value = loss.item()
        advance()
    model.eval()
    return loss_value


def build_encoder_zoo(
    out_dir: Path,
    *,
    seed: int = 0,
    training: EncoderZooTraining | None = None,
    progress: bool = True,
) -> EncoderZoo:
    """Train the encoder zoo on the CPU into ``out_dir`` (see the module docstring), replacing
    an older zoo there; any other non-empty folder is refused with a UserError."""
    from mergeopt.progress import stages

    out_dir = Path(out_dir).absolute()
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / BASE_NAME).exists():
        raise UserError(f"{out_dir}: folder is not empty and holds no model zoo; choose another")
    with stages(progress) as reporter:
        metadata = _build(
            out_dir, seed=seed, training=training or EncoderZooTraining(), progress=reporter
        )
    (out_dir / ZOO_JSON).write_text(json.dumps(metadata, indent=2) + "\n")
    return EncoderZoo.from_dir(out_dir)


def _build(
    out_dir: Path, *, seed: int, training: EncoderZooTraining, progress: Stages
) -> dict[str, Any]:
    import torch
    import transformers
    from transformers import BertForMaskedLM, BertForSequenceClassification
    from transformers.utils import logging as transformers_logging

    started = time.perf_counter()
    rng = random.Random(seed)
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()  # "newly initialized" heads, by design
    bars_were_enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    losses: dict[str, float] = {}
    try:
        with staged_folder(out_dir, replace=True) as staging:
            (staging / "tasks").mkdir()
            for task, make_record in encoder_tasks.TASK_RECORDS.items():
                for name in (task, f"{task}.heldout"):
                    records = [make_record(rng) for _ in range(training.split_size)]
                    lines = "".join(json.dumps(r) + "\n" for r in records)
                    (staging / "tasks" / f"{name}.jsonl").write_text(lines)
            tokenizer = make_tokenizer()
            with deterministic_torch(seed, threads=TRAINING_THREADS):
                model = BertForMaskedLM(_config(tokenizer, training))
                losses[BASE_NAME] = _pretrain(model, tokenizer, rng, training, progress)
                _save(model, tokenizer, staging / BASE_NAME)
                base_names = {f"bert.{n}" for n, _ in model.bert.named_parameters()}
                head_seed = seed + 1
                for task, labels in encoder_tasks.LABEL_COUNTS.items():
                    torch.manual_seed(head_seed)  # every expert's head starts from one draw
                    expert = BertForSequenceClassification.from_pretrained(
                        staging / BASE_NAME, num_labels=labels
                    )
                    steps = training.probe_steps + training.expert_steps
                    advance = progress.begin(f"fine-tuning {EXPERT_NAMES[task]}", steps)
                    make_record = encoder_tasks.TASK_RECORDS[task]

                    def task_batches(
                        count: int, make_record: Any = make_record, advance: Any = advance
                    ) -> Any:
                        for _ in range(count):
                            records = [make_record(rng) for _ in range(training.batch_size)]
                            texts = [_texts(r) for r in records]
                            labels = [int(str(r["label"])) for r in records]
                            yield _encode(tokenizer, texts), torch.tensor(labels)
                            advance()

                    # LP-FT (Kumar et al., arXiv 2202.10054): train the new head on the frozen
                    # base first, then everything at a small rate, so the body moves little;
                    # fine-tunes of a strong base have small task vectors, and merge.
                    head = [p for n, p in expert.named_parameters() if n not in base_names]
                    expert.bert.requires_grad_(False)
                    _train(
                        expert,
                        task_batches(training.probe_steps),
                        lr=training.probe_lr,
                        total=training.probe_steps,
                        parameters=head,
                    )
                    expert.bert.requires_grad_(True)
                    losses[task] = _train(
                        expert,
                        task_batches(training.expert_steps),
                        lr=training.expert_lr,
                        total=training.expert_steps,
                    )
                    _save(expert, tokenizer, staging / EXPERT_NAMES[task])
            progress.end()
            # Drawn from a stream of their own, after the models: the training files of the
            # baselines leave the zoo's models as they were.
            train_rng = random.Random(seed + TRAIN_STREAM)
            for task, make_record in encoder_tasks.TASK_RECORDS.items():
                records = [make_record(train_rng) for _ in range(training.train_size)]
                lines = "".join(json.dumps(r) + "\n" for r in records)
                (staging / "tasks" / f"{task}.train.jsonl").write_text(lines)
            scores = _score(staging, progress)
    finally:
        transformers_logging.set_verbosity(verbosity)
        if bars_were_enabled:
            transformers_logging.enable_progress_bar()
    return {
        "kind": "encoder",
        "zoo_version": ENCODER_ZOO_VERSION,
        "seed": seed,
        "build_seconds": round(time.perf_counter() - started, 1),
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "torch_threads": TRAINING_THREADS,
        "final_train_loss": {name: round(loss, 4) for name, loss in losses.items()},
        "metrics_split": "heldout",
        **scores,
        "recipe": asdict(training),
    }


def _save(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, folder: Path) -> None:
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)


TIES_MERGE = {"method": "ties", "weight": 1.0, "density": 0.5}
"""The merge ``zoo.json`` scores: TIES of all four experts (mergekit's defaults otherwise)."""


def _score(root: Path, progress: Stages) -> dict[str, Any]:
    """Held-out accuracy of every model, and of the TIES merge, on every task."""
    from mergeopt.zoo.encoder_scores import score_encoder_zoo

    return score_encoder_zoo(
        root, base=BASE_NAME, experts=EXPERT_NAMES, progress=progress, merge=TIES_MERGE
    )
