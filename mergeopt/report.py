"""Status reporting: objective names, the best values line, recipe summaries, held-out values,
evaluation cost and the ``study status`` report."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mergeopt import attrs
from mergeopt.genome import DataflowGenome, Genome, Hop, SearchGenome
from mergeopt.study import stored_genome, stored_spec, trial_counts

if TYPE_CHECKING:
    import optuna
    from optuna.trial import FrozenTrial


def objective_names(study: optuna.Study) -> list[str]:
    names = study.metric_names
    return list(names) if names else [f"objective_{i}" for i in range(len(study.directions))]


def best_values_text(study: optuna.Study) -> str:
    """``best of each: accuracy=0.81 tokens=4.2`` over COMPLETE trials, each objective's best in
    its own direction (they may come from different trials)."""
    from optuna.study import StudyDirection
    from optuna.trial import TrialState

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        return ""
    parts = []
    for index, (name, direction) in enumerate(
        zip(objective_names(study), study.directions, strict=False)
    ):
        values = [t.values[index] for t in complete if t.values is not None]
        if values:
            best = max(values) if direction == StudyDirection.MAXIMIZE else min(values)
            parts.append(f"{name}={best:.4g}")
    return "best of each: " + " ".join(parts)


def recipe_summary(params: Mapping[str, float], genome: SearchGenome) -> str:
    """Mean of each searched parameter per expert over the blocks, e.g. ``e0.weight=0.42``;
    for a data-flow path its depth, layers per source model and range of scales, e.g.
    ``depth 11: A 8, B 3; scale 0.71-1.40``."""
    from mergeopt.genome import parse_param_name

    if isinstance(genome, DataflowGenome):
        return path_summary(genome.path(params))

    sums: dict[str, list[float]] = {}
    for name, value in params.items():
        try:
            _, expert, param = parse_param_name(name)
        except ValueError:
            continue
        sums.setdefault(f"e{expert}.{param}", []).append(value)
    return " ".join(f"{key}={sum(v) / len(v):.2f}" for key, v in sorted(sums.items()))


def path_summary(path: Sequence[Hop]) -> str:
    """``depth 11: A 8, B 3; scale 0.71-1.40``: a data-flow path at a glance (sources as
    letters, model A first)."""
    counts: dict[int, int] = {}
    for source, _, _ in path:
        counts[source] = counts.get(source, 0) + 1
    sources = ", ".join(f"{chr(ord('A') + s)} {n}" for s, n in sorted(counts.items()))
    scales = [scale for _, _, scale in path]
    return f"depth {len(path)}: {sources}; scale {min(scales):.2f}-{max(scales):.2f}"


def status_report(study: optuna.Study) -> dict[str, Any]:
    """Trial states, the Pareto (or best) trials and throughput, as JSON-compatible data."""
    from optuna.trial import TrialState

    counts = trial_counts(study)
    given_back = sum(
        1
        for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
        if t.user_attrs.get(attrs.GIVEN_BACK)
    )
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    names = objective_names(study)
    genome = stored_genome(study) if attrs.GENOME in study.user_attrs else None
    experts = _expert_trial_params(study, genome if isinstance(genome, Genome) else None)
    front = study.best_trials if complete else []
    pareto = [
        {
            "trial": t.number,
            "values": dict(zip(names, t.values or [], strict=False)),
            "heldout": _named(names, heldout_values(t, names)),
            "recipe": recipe_summary(t.params, genome) if genome else "",
            "expert": next((name for name, params in experts if params == t.params), None),
        }
        for t in sorted(front, key=lambda t: t.number)
    ]
    throughput = None
    finished = [
        (t.datetime_start, t.datetime_complete)
        for t in complete
        if t.datetime_start and t.datetime_complete
    ]
    if len(finished) >= 2:
        first = min(start for start, _ in finished)
        last = max(end for _, end in finished)
        minutes = (last - first).total_seconds() / 60
        throughput = round(len(finished) / minutes, 3) if minutes > 0 else None
    eval_seconds = [attrs.EVAL_SECONDS.get(t) for t in complete]
    merge_seconds = [attrs.MERGE_SECONDS.get(t) for t in complete]
    return {
        "study": study.study_name,
        "objectives": [
            {"name": n, "direction": d.name.lower()}
            for n, d in zip(names, study.directions, strict=False)
        ],
        "states": counts,
        "given_back": given_back,
        "pareto": pareto,
        "trials_per_minute": throughput,
        "mean_merge_seconds": _mean(merge_seconds),
        "mean_eval_seconds": _mean(eval_seconds),
        "evaluation_cost": evaluation_cost(study.get_trials(deepcopy=False)),
        "baselines": baseline_rows(study, names),
    }


def baseline_rows(study: optuna.Study, names: Sequence[str]) -> list[dict[str, Any]]:
    """The preference baselines recorded in the study (``mergeopt baseline``), by label:
    values and held-out values by objective name, and their fine-tuning seconds."""
    stored = attrs.BASELINES.get(study) or {}
    return [
        {
            "label": label,
            "values": _named(names, entry.get("values")),
            "heldout": _named(names, entry.get("heldout")),
            "train_seconds": entry.get("train_seconds"),
            "model_dir": entry.get("model_dir"),
        }
        for label, entry in sorted(stored.items())
    ]


def states_text(report: dict[str, Any]) -> str:
    """The trial states of :func:`status_report` in words: trials closed unevaluated (a
    surplus, an interrupted or taken-over trial, whose candidate went back to the queue) are
    not counted as failures, and queued trials say what they are."""
    states = dict(report["states"])
    given_back = int(report.get("given_back", 0))
    states["FAIL"] = states.get("FAIL", 0) - given_back
    parts = [
        f"{label} {states.get(state, 0)}"
        for state, label in (("COMPLETE", "complete"), ("RUNNING", "running"), ("FAIL", "failed"))
        if states.get(state, 0)
    ]
    if given_back:
        parts.append(f"given back {given_back} (closed unevaluated, not failures)")
    if states.get("WAITING", 0):
        parts.append(f"queued {states['WAITING']} (evaluated first by the next run)")
    if states.get("PRUNED", 0):
        parts.append(f"pruned {states['PRUNED']} (stopped early)")
    return ", ".join(parts) or "no trials"


def _expert_trial_params(
    study: optuna.Study, genome: Genome | None
) -> list[tuple[str, dict[str, float]]]:
    """(expert folder name, the trial parameters that are that expert alone), when the genome
    has such a point (``Genome.expert_alone``: weights in [0, 1] and task arithmetic or linear)."""
    if genome is None or attrs.SPEC not in study.user_attrs:
        return []
    spec = stored_spec(study)
    if spec.merge.method not in ("task_arithmetic", "linear"):
        return []
    low, high = spec.merge.search.get("weight", (None, None)) or (None, None)
    if (low, high) != (0.0, 1.0):
        return []
    return [
        (Path(path).name or path, genome.expert_alone(index))
        for index, path in enumerate(spec.models.experts)
    ]


def _named(names: Sequence[str], values: Sequence[float] | None) -> dict[str, float] | None:
    return None if values is None else dict(zip(names, values, strict=True))


def _mean(values: list[Any]) -> float | None:
    numbers = [float(v) for v in values if isinstance(v, (int, float))]
    return round(sum(numbers) / len(numbers), 4) if numbers else None


def heldout_values(trial: FrozenTrial, names: Sequence[str]) -> list[float] | None:
    """The trial's held-out values in objective order, or None if it has none for every name."""
    stored = trial.user_attrs.get(attrs.HELDOUT_VALUES)
    if not isinstance(stored, dict) or any(name not in stored for name in names):
        return None
    return [float(stored[name]) for name in names]


def evaluation_cost(trials: Sequence[FrozenTrial]) -> dict[str, Any]:
    """Totals of the search and held-out evaluations stored on ``trials``.

    ``{"search": {"trials", "items_scored", "tokens_generated", "eval_seconds", "stopped",
    "items_saved", "tokens_saved", "fraction_saved"}, "heldout": {...}, "total": {...}}``; a
    trial counts where it stored its cost (trials of older versions did not). ``stopped``:
    trials that fidelity rungs stopped early (PRUNED); what each saved is estimated as the
    mean cost of the COMPLETE trials (fully evaluated) less its own, and ``fraction_saved``
    is the tokens saved over the tokens a full evaluation of every trial would have taken
    (items where no tokens are generated), None before a trial completed.
    """
    from optuna.trial import TrialState

    def empty() -> dict[str, Any]:
        return {"trials": 0, "items_scored": 0, "tokens_generated": 0, "eval_seconds": 0.0}

    search, heldout = empty(), empty()
    full: list[tuple[int, int]] = []
    stopped: list[tuple[int, int]] = []
    for trial in trials:
        user_attrs = trial.user_attrs
        if attrs.ITEMS_SCORED in user_attrs:
            items, tokens = _cost_of(user_attrs)
            search["trials"] += 1
            search["items_scored"] += items
            search["tokens_generated"] += tokens
            search["eval_seconds"] += float(user_attrs.get(attrs.EVAL_SECONDS, 0.0))
            if trial.state == TrialState.COMPLETE:
                full.append((items, tokens))
            elif trial.state == TrialState.PRUNED and attrs.FIDELITY in user_attrs:
                stopped.append((items, tokens))
        cost = user_attrs.get(attrs.HELDOUT_COST)
        if isinstance(cost, dict):
            heldout["trials"] += 1
            heldout["items_scored"] += int(cost.get("items_scored", 0))
            heldout["tokens_generated"] += int(cost.get("tokens_generated", 0))
            heldout["eval_seconds"] += float(cost.get("eval_seconds", 0.0))
    search.update(_savings(full, stopped, search))
    total = {key: search[key] + heldout[key] for key in ("items_scored", "tokens_generated")}
    total["eval_seconds"] = search["eval_seconds"] + heldout["eval_seconds"]
    for part in (search, heldout, total):
        part["eval_seconds"] = round(part["eval_seconds"], 3)
    return {"search": search, "heldout": heldout, "total": total}


def _cost_of(user_attrs: Mapping[str, Any]) -> tuple[int, int]:
    return int(user_attrs[attrs.ITEMS_SCORED]), int(user_attrs.get(attrs.TOKENS_GENERATED, 0))


def _savings(
    full: Sequence[tuple[int, int]], stopped: Sequence[tuple[int, int]], search: dict[str, Any]
) -> dict[str, Any]:
    """Stopped trials, and the items and tokens they saved against full evaluation."""
    if not full:
        return {
            "stopped": len(stopped),
            "items_saved": 0,
            "tokens_saved": 0,
            "fraction_saved": None,
        }
    mean_items = sum(i for i, _ in full) / len(full)
    mean_tokens = sum(t for _, t in full) / len(full)
    items_saved = round(sum(max(0.0, mean_items - i) for i, _ in stopped))
    tokens_saved = round(sum(max(0.0, mean_tokens - t) for _, t in stopped))
    spent, saved = (
        (search["tokens_generated"], tokens_saved)
        if mean_tokens > 0
        else (search["items_scored"], items_saved)
    )
    fraction = round(saved / (spent + saved), 4) if spent + saved > 0 else None
    return {
        "stopped": len(stopped),
        "items_saved": items_saved,
        "tokens_saved": tokens_saved,
        "fraction_saved": fraction,
    }


def cost_text(cost: dict[str, Any]) -> str:
    """``search: 16 trials, 768 items, 5,120 tokens, 12.3 s; held-out: ...`` (parts with trials)."""
    parts = []
    for key, label in (("search", "search"), ("heldout", "held-out")):
        part = cost[key]
        if part["trials"]:
            parts.append(
                f"{label}: {part['trials']} trials, {part['items_scored']:,} items, "
                f"{part['tokens_generated']:,} tokens, {part['eval_seconds']:.1f} s"
            )
            if part.get("stopped"):
                fraction = part["fraction_saved"]
                parts[-1] += (
                    f" ({part['stopped']} stopped early by fidelity rungs, saving "
                    f"{part['tokens_saved']:,} tokens"
                    + (f", {fraction:.0%} of full evaluation" if fraction is not None else "")
                    + ")"
                )
    return "; ".join(parts)
