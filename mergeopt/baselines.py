"""Preference baselines for classifier studies: fine-tuning from the base, for a preference
vector over the objectives, with the Chebyshev scalarization or EPO search
(``preference_descent.py``), against which a study's merge chosen by ``study export
--preference`` is compared (``mergeopt baseline``, README "Preference baselines").

What is trained: the base's body with one new classification head per objective (the size of
the head of the objective's expert, ``head:``), all together. Each step draws a batch of every
task, takes the cross-entropy loss of each, and steps (AdamW) on the loss weights the descent
chose. Heads start fresh, from one seeded draw: the baseline learns from the base and the task
data only, as the benchmark's fine-tuning baselines do. The training items are each
objective's ``train`` file (the encoder zoo writes ``TASK.train.jsonl``), else its search
split.

A baseline folder (written whole, or not at all)::

    DIR/baseline.json      method, preference, objectives, training settings, train_seconds,
                           the moves of the descent, and the values (search and held-out)
    DIR/head-K/            a complete *ForSequenceClassification folder per objective's head K:
                           the shared body and that task's head (usable on its own)

It is scored as a study scores a merge (the classifier scorer and the ``Evaluator``, each
objective answered by its own head on the body), on the search and held-out splits, and its
values are recorded in the study (``attrs.BASELINES``), where ``study status``, ``study
plot`` and the dashboard show them beside the merge front.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mergeopt import attrs
from mergeopt.errors import UserError
from mergeopt.preference_descent import DESCENTS
from mergeopt.staging import staged_folder

if TYPE_CHECKING:
    import optuna
    import torch

    from mergeopt.progress import Stages
    from mergeopt.spec import StudySpec

BASELINE_JSON = "baseline.json"
HEAD_FOLDER = "head-{head}"
CPU_THREADS = 1
"""Threads a CPU baseline trains on: the encoder zoo's matrices are tiny, and a second OpenMP
thread on a busy machine made steps slower, not faster (as the zoo build found)."""


@dataclass(frozen=True, kw_only=True)
class BaselineTraining:
    """How a baseline trains (``mergeopt baseline`` options)."""

    steps: int = 150
    batch_size: int = 16
    """Items of each task per step."""
    learning_rate: float = 1e-3
    seed: int = 0
    device: str = "cpu"


def check_preference(preference: Sequence[float], names: Sequence[str]) -> list[float]:
    """The preference divided by its sum; a UserError unless it has one positive weight per
    objective (a zero weight would leave its task's head untrained)."""
    if len(preference) != len(names):
        raise UserError(
            f"--preference has {len(preference)} weights; the spec has {len(names)} objectives "
            f"({', '.join(names)})"
        )
    if not all(math.isfinite(w) and w > 0 for w in preference):
        raise UserError(
            "--preference weights of a baseline must be positive numbers (a zero weight leaves "
            "its task untrained)"
        )
    total = float(sum(preference))
    return [float(w) / total for w in preference]


def check_baseline_spec(spec: StudySpec) -> None:
    """What a baseline needs beyond a valid study spec: classification objectives only, one
    head each, raw values (the checks of ``study create`` run first: ``plan_study``)."""
    from mergeopt.study import plan_study

    plan_study(spec)
    heads: dict[int, str] = {}
    for objective in spec.objectives:
        if objective.kind != "classification" or objective.head is None:
            raise UserError(
                f"objective {objective.name}: kind {objective.kind}; a baseline fine-tunes "
                "classifiers, for kind: classification objectives only"
            )
        if objective.head in heads:
            raise UserError(
                f"objectives {heads[objective.head]} and {objective.name} share head "
                f"{objective.head}; a baseline trains one head per objective"
            )
        if objective.normalize:
            raise UserError(
                f"objective {objective.name}: normalize: true; baselines are scored on raw "
                "values (normalize: false)"
            )
        heads[objective.head] = objective.name


def train_baseline(
    spec: StudySpec,
    *,
    method: str,
    preference: Sequence[float],
    out_dir: Path,
    training: BaselineTraining,
    progress: Stages,
) -> dict[str, Any]:
    """Fine-tune from the spec's base for ``preference`` with ``method`` (a name in
    ``DESCENTS``), write the baseline folder ``out_dir``, score it; returns its
    ``baseline.json`` record. ``out_dir`` must be new, empty, or an older baseline folder."""
    import torch

    descent = DESCENTS[method]
    weights = check_preference(preference, [o.name for o in spec.objectives])  # before models
    check_baseline_spec(spec)
    out_dir = Path(out_dir).absolute()
    if (
        out_dir.exists()
        and (not out_dir.is_dir() or any(out_dir.iterdir()))
        and not (out_dir / BASELINE_JSON).is_file()
    ):
        raise UserError(f"{out_dir}: exists and is not an empty folder or a baseline folder")
    tasks = _training_tasks(spec)
    with staged_folder(out_dir, replace=True) as staging:
        threads = torch.get_num_threads()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(training.seed)  # the heads' draw; batches: random.Random(seed)
            if training.device == "cpu":
                torch.set_num_threads(CPU_THREADS)
            try:
                tokenizer, models = _models(spec, training)
                trained = _fine_tune(
                    models,
                    tokenizer,
                    tasks,
                    step=descent.step,
                    needs_gradients=descent.needs_gradients,
                    preference=weights,
                    training=training,
                    progress=progress,
                )
            finally:
                torch.set_num_threads(threads)
        _save(spec, models, tokenizer, staging)
        record: dict[str, Any] = {
            "kind": "baseline",
            "method": method,
            "preference": weights,
            "objectives": [o.name for o in spec.objectives],
            "heads": {o.name: HEAD_FOLDER.format(head=o.head) for o in spec.objectives},
            "base": str(spec.models.base),
            "training": {
                "steps": training.steps,
                "batch_size": training.batch_size,
                "learning_rate": training.learning_rate,
                "seed": training.seed,
                "device": training.device,
                "items": {o.name: o.train or f"search split of {o.task}" for o in spec.objectives},
            },
            **trained,
        }
        record.update(score_baseline(spec, staging, device=training.device))
        (staging / BASELINE_JSON).write_text(json.dumps(record, indent=2) + "\n")
    return record


def _save(spec: StudySpec, models: list[Any], tokenizer: Any, folder: Path) -> None:
    from transformers.utils import logging as transformers_logging

    bars = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        for objective, model in zip(spec.objectives, models, strict=True):
            head = folder / HEAD_FOLDER.format(head=objective.head)
            model.save_pretrained(head, safe_serialization=True)
            tokenizer.save_pretrained(head)
    finally:
        if bars:
            transformers_logging.enable_progress_bar()


def read_baseline(folder: Path) -> dict[str, Any]:
    """A baseline folder's ``baseline.json``; a UserError if it is not one."""
    try:
        record = json.loads((Path(folder) / BASELINE_JSON).read_text())
    except (OSError, ValueError) as error:
        raise UserError(f"{folder}: not a baseline folder ({BASELINE_JSON}: {error})") from None
    if not isinstance(record, dict) or record.get("kind") != "baseline":
        raise UserError(f"{folder}: not a baseline folder ({BASELINE_JSON} is not a baseline's)")
    return record


def evaluate_saved_baseline(spec: StudySpec, folder: Path, *, device: str) -> dict[str, Any]:
    """Re-score a saved baseline folder on the spec's objectives (no training) and store the
    new values in its ``baseline.json``; returns the record."""
    folder = Path(folder).absolute()
    record = read_baseline(folder)
    check_baseline_spec(spec)
    names = [o.name for o in spec.objectives]
    if record.get("objectives") != names:
        raise UserError(
            f"{folder}: a baseline for objectives {', '.join(record.get('objectives') or [])}; "
            f"the spec has {', '.join(names)}"
        )
    heads = {o.name: HEAD_FOLDER.format(head=o.head) for o in spec.objectives}
    if record.get("heads") != heads:
        # scored through the spec's heads, a task would be answered by another task's head
        # and its saved values overwritten with that
        trained = record.get("heads") or {}
        raise UserError(
            f"{folder}: a baseline whose heads are "
            f"{', '.join(f'{n} {h}' for n, h in trained.items())}; the spec's "
            f"head: would score {', '.join(f'{n} with {h}' for n, h in heads.items())}"
        )
    record.update(score_baseline(spec, folder, device=device))
    # written beside and renamed over: a kill mid-write leaves the old record whole
    partial = folder / f".{BASELINE_JSON}.partial"
    partial.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(partial, folder / BASELINE_JSON)
    return record


def score_baseline(spec: StudySpec, folder: Path, *, device: str) -> dict[str, Any]:
    """``{"values": {objective: value}, "heldout": {...} or None, "evaluate_seconds"}``: the
    baseline's body with each objective's head, scored as a study scores a merge."""
    from mergeopt.models import resolve_model
    from mergeopt.objectives.evaluate import Evaluator, has_heldout
    from mergeopt.objectives.normalization import iter_checkpoint_tensors
    from mergeopt.objectives.scorers.classifier import ClassifierScorer

    started = time.perf_counter()
    heads = {o.head: folder / HEAD_FOLDER.format(head=o.head) for o in spec.objectives}
    for path in heads.values():
        if not (path / "config.json").is_file():
            raise UserError(f"{folder}: baseline head folder {path.name} is missing")
    experts = [resolve_model(e) for e in spec.models.experts]
    expert_dirs = [heads.get(index, expert) for index, expert in enumerate(experts)]
    scorer = ClassifierScorer(
        model_dir=resolve_model(spec.models.base),
        device=device,
        dtype=spec.scorer.dtype,
        batch_size=spec.scorer.batch_size,
        trust_remote_code=spec.models.trust_remote_code,
        expert_dirs=expert_dirs,
    )
    try:
        scorer.load_weights(iter_checkpoint_tensors(next(iter(heads.values()))))
        values = Evaluator(spec.objectives, scorer, scorer_options=spec.scorer).evaluate().values
        heldout = None
        if all(has_heldout(o) for o in spec.objectives):
            evaluator = Evaluator(
                spec.objectives, scorer, scorer_options=spec.scorer, split="heldout"
            )
            heldout = evaluator.evaluate().values
    finally:
        scorer.close()
    names = [o.name for o in spec.objectives]
    return {
        "values": {name: values[name] for name in names},
        "heldout": {name: heldout[name] for name in names} if heldout is not None else None,
        "evaluate_seconds": round(time.perf_counter() - started, 3),
    }


def baseline_label(record: dict[str, Any]) -> str:
    """``"epo 0.7,0.3"``: how status, plots and the dashboard name a baseline."""
    weights = ",".join(f"{w:.3g}" for w in record["preference"])
    return f"{record['method']} {weights}"


def record_in_study(study: optuna.Study, record: dict[str, Any], folder: Path) -> str:
    """Store the baseline's values in the study (``attrs.BASELINES``, by label: a baseline of
    the same method and preference replaces the older one); returns the label."""
    from mergeopt.report import objective_names

    names = objective_names(study)
    if record["objectives"] != names:
        raise UserError(
            f"study {study.study_name!r} has objectives {', '.join(names)}; the baseline was "
            f"scored on {', '.join(record['objectives'])}"
        )
    if attrs.SPEC.get(study) is not None:
        from mergeopt.study import stored_spec

        normalized = [o.name for o in stored_spec(study).objectives if o.normalize]
        if normalized:
            # a baseline's values are raw: beside normalized trials they would sit in other units
            raise UserError(
                f"study {study.study_name!r} normalizes {', '.join(normalized)} (normalize: "
                f"true); a baseline's raw values do not compare with its trials, not recorded "
                f"(the baseline is in {folder})"
            )
    label = baseline_label(record)
    stored = dict(attrs.BASELINES.get(study) or {})
    stored[label] = {
        "method": record["method"],
        "preference": record["preference"],
        "values": [record["values"][name] for name in names],
        "heldout": [record["heldout"][name] for name in names] if record["heldout"] else None,
        "train_seconds": record["train_seconds"],
        "steps": record["training"]["steps"],
        "model_dir": str(Path(folder).absolute()),
    }
    attrs.BASELINES.set(study, stored)
    return label


# --------------------------------------------------------------------------- training


@dataclass(frozen=True)
class _Task:
    texts: list[str]
    pairs: list[str | None]
    labels: list[int]


def _training_tasks(spec: StudySpec) -> list[_Task]:
    """Each objective's training items, in spec order: its ``train`` file, else its search
    split (the items its study searches on); a label beyond its expert's head is a UserError."""
    from mergeopt.checkpoints import Checkpoint
    from mergeopt.models import resolve_model
    from mergeopt.objectives.tasks import ClassificationItem, load_task, search_split

    tasks = []
    for objective in spec.objectives:
        assert objective.head is not None  # check_baseline_spec
        if objective.train is not None:
            path = objective.train
            loaded = load_task(path, "classification")
        else:
            path = objective.task
            loaded = list(
                search_split(
                    path, "classification", limit=objective.limit, seed=objective.subsample_seed
                ).items
            )
        items = [item for item in loaded if isinstance(item, ClassificationItem)]
        expert = Checkpoint(path=resolve_model(spec.models.experts[objective.head]))
        labels = len(expert.config.get("id2label") or {}) or 2
        for number, item in enumerate(items, start=1):
            if item.label >= labels:
                raise UserError(
                    f"objective {objective.name}: label {item.label} of {path} (item {number}) "
                    f"is out of range: the head of expert {objective.head} has {labels} labels"
                )
        tasks.append(
            _Task(
                texts=[item.text for item in items],
                pairs=[item.text_pair for item in items],
                labels=[item.label for item in items],
            )
        )
    return tasks


def _models(spec: StudySpec, training: BaselineTraining) -> tuple[Any, list[Any]]:
    """The tokenizer, and one sequence classifier per objective (its expert's label count and
    names, a fresh head) all holding the same body module."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as transformers_logging

    from mergeopt.models import resolve_model

    base = resolve_model(spec.models.base)
    trust = spec.models.trust_remote_code
    tokenizer = AutoTokenizer.from_pretrained(base, trust_remote_code=trust)
    models: list[Any] = []
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()  # "newly initialized" heads, by design
    bars = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()  # a bar per head's loading says nothing
    try:
        for objective in spec.objectives:
            assert objective.head is not None  # check_baseline_spec
            expert = AutoConfig.from_pretrained(
                resolve_model(spec.models.experts[objective.head]), trust_remote_code=trust
            )
            model = AutoModelForSequenceClassification.from_pretrained(
                base,
                num_labels=expert.num_labels,
                id2label=expert.id2label,
                label2id=expert.label2id,
                trust_remote_code=trust,
            )
            if models:  # one body, trained by every task
                prefix = model.base_model_prefix
                setattr(model, prefix, getattr(models[0], prefix))
            models.append(model.to(training.device))
    finally:
        transformers_logging.set_verbosity(verbosity)
        if bars:
            transformers_logging.enable_progress_bar()
    return tokenizer, models


def _fine_tune(
    models: list[Any],
    tokenizer: Any,
    tasks: list[_Task],
    *,
    step: Any,
    needs_gradients: bool,
    preference: list[float],
    training: BaselineTraining,
    progress: Stages,
) -> dict[str, Any]:
    """Train the shared body and the heads; returns ``train_seconds``, the last losses and
    how often each move of the descent was taken."""
    import numpy as np
    import torch

    parameters: list[torch.nn.Parameter] = []
    seen: set[int] = set()
    for model in models:
        for parameter in model.parameters():
            if id(parameter) not in seen:
                seen.add(id(parameter))
                parameters.append(parameter)
    optimizer = torch.optim.AdamW(parameters, lr=training.learning_rate, weight_decay=0.01)
    total = training.steps
    warmup = max(1, total // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda i: min((i + 1) / warmup, max(0.05, (total - i) / total))
    )
    max_length = min(
        int(getattr(tokenizer, "model_max_length", 512) or 512),
        int(getattr(models[0].config, "max_position_embeddings", 512) or 512),
    )
    rng = random.Random(training.seed)
    moves: dict[str, int] = {}
    losses_now: list[float] = []
    for model in models:
        model.train()
    advance = progress.begin("fine-tuning the baseline", total)
    started = time.perf_counter()
    for _ in range(total):
        losses = []
        for model, task in zip(models, tasks, strict=True):
            chosen = rng.sample(range(len(task.labels)), min(training.batch_size, len(task.labels)))
            encoded = _encode(
                tokenizer,
                [task.texts[i] for i in chosen],
                [task.pairs[i] for i in chosen],
                max_length,
            ).to(training.device)
            labels = torch.tensor([task.labels[i] for i in chosen], device=training.device)
            logits = model(**encoded).logits
            losses.append(torch.nn.functional.cross_entropy(logits, labels))
        losses_now = [float(loss.detach()) for loss in losses]
        if needs_gradients:
            gradients = [
                torch.cat(
                    [
                        (g if g is not None else torch.zeros_like(p)).reshape(-1)
                        for g, p in zip(
                            torch.autograd.grad(
                                loss, parameters, retain_graph=True, allow_unused=True
                            ),
                            parameters,
                            strict=True,
                        )
                    ]
                )
                for loss in losses
            ]
            stacked = torch.stack(gradients)
            gram = (stacked @ stacked.T).double().cpu().numpy()
            chosen_step = step(losses_now, preference, gram)
            direction = torch.tensor(chosen_step.weights, dtype=stacked.dtype).to(stacked.device)
            flat = direction @ stacked
            offset = 0
            for parameter in parameters:
                size = parameter.numel()
                parameter.grad = flat[offset : offset + size].view_as(parameter).clone()
                offset += size
        else:
            chosen_step = step(losses_now, preference, np.zeros((len(losses), len(losses))))
            weighted = sum(w * loss for w, loss in zip(chosen_step.weights, losses, strict=True))
            assert isinstance(weighted, torch.Tensor)
            weighted.backward()
        moves[chosen_step.move] = moves.get(chosen_step.move, 0) + 1
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        advance()
    if training.device.startswith("cuda"):
        torch.cuda.synchronize(training.device)
    seconds = time.perf_counter() - started
    progress.end()
    for model in models:
        model.eval()
    return {
        "train_seconds": round(seconds, 3),
        "last_losses": [round(loss, 5) for loss in losses_now],
        "moves": moves,
    }


def _encode(tokenizer: Any, texts: list[str], pairs: list[str | None], max_length: int) -> Any:
    if all(pair is None for pair in pairs):
        return tokenizer(
            texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )
    return tokenizer(
        texts,
        [pair or "" for pair in pairs],
        padding=True,
        truncation=True,
        max_length=max_length,
        return_tensors="pt",
    )
