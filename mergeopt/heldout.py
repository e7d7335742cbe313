"""Held-out evaluation: chosen COMPLETE trials scored on the split the study never searched on.

``mergeopt study evaluate NAME --heldout (--pareto | --trial N ...)`` redoes each trial's merge
(its recipe and its merge seed, so DARE/DELLA draw the same masks) into one resident scorer and
scores every objective's held-out split (``objectives[].heldout``, else the items ``limit`` left
out of the task file). The results go into the trial's user attrs (``attrs.HELDOUT_*``):
objective values (normalized with anchors measured on the held-out split where the spec says
``normalize: true``), raw per-task metrics, the seed and the evaluation cost. Evaluating a trial
again overwrites them: greedy decoding of the same merge gives the same values, and the cost is
that of the latest evaluation, so nothing is counted twice.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mergeopt import attrs
from mergeopt.errors import UserError
from mergeopt.optuna_compat import trial_id_of
from mergeopt.report import objective_names
from mergeopt.study import complete_trial, trial_seed

if TYPE_CHECKING:
    import optuna
    from optuna.trial import FrozenTrial

    from mergeopt.spec import StudySpec


def check_heldout(spec: StudySpec, study_name: str) -> None:
    """``UserError`` unless every objective has held-out items."""
    from mergeopt.objectives.evaluate import has_heldout

    missing = [o.name for o in spec.objectives if not has_heldout(o)]
    if missing:
        raise UserError(
            f"study {study_name!r} has no held-out split for objective {', '.join(missing)}: "
            "give it heldout: FILE, or a limit smaller than its task, in a new study"
        )


def choose_trials(
    study: optuna.Study, *, pareto: bool, numbers: Sequence[int]
) -> list[FrozenTrial]:
    """The Pareto trials, or the COMPLETE trials of those numbers (in the order given, once)."""

    if pareto == bool(numbers):
        raise UserError("choose the trials: --pareto, or --trial N (repeatable)")
    name = study.study_name
    if pareto:
        front = sorted(study.best_trials, key=lambda t: t.number)
        if not front:
            raise UserError(f"study {name!r} has no COMPLETE trials to evaluate")
        return front
    chosen: list[FrozenTrial] = []
    for number in dict.fromkeys(numbers):
        trial = complete_trial(study, number, done_to_it="be evaluated on the held-out split")
        chosen.append(trial)
    return chosen


@dataclass(frozen=True)
class HeldoutResult:
    """One trial's held-out evaluation: ``values`` by objective, or ``error`` if it failed."""

    trial: int
    seed: int
    values: dict[str, float] | None
    error: str | None = None


def evaluate_heldout(
    study: optuna.Study,
    trials: Sequence[FrozenTrial],
    *,
    device: str,
    progress: bool = True,
    on_result: Callable[[HeldoutResult], None] | None = None,
) -> list[HeldoutResult]:
    """Score ``trials`` on the held-out split on ``device`` and store the results in each trial.

    A trial whose evaluation fails (``TrialEvaluationError``) is reported with its reason and
    left as it was; the others are still evaluated.
    """
    from mergeopt.objectives.scorers.base import TrialEvaluationError
    from mergeopt.progress import stages
    from mergeopt.runner import TrialRunner
    from mergeopt.trial_io import set_finished_trial_user_attrs

    names = objective_names(study)
    results: list[HeldoutResult] = []
    with stages(progress) as reporter:
        reporter.begin("loading models", 1)
        runner = TrialRunner(study, device=device, split="heldout")
        try:
            advance = reporter.begin("held-out evaluation", len(trials))
            for trial in trials:
                seed = trial_seed(study, trial)  # the seed the trial was merged with
                try:
                    values, user_attrs = runner.evaluate(trial.params, seed=seed)
                except TrialEvaluationError as exc:
                    result = HeldoutResult(
                        trial=trial.number, seed=seed, values=None, error=str(exc)
                    )
                else:
                    by_name = dict(zip(names, values, strict=True))
                    set_finished_trial_user_attrs(
                        study,
                        trial_id_of(trial),
                        {
                            attrs.HELDOUT_VALUES: by_name,
                            attrs.HELDOUT_METRICS: user_attrs[attrs.METRICS],
                            attrs.HELDOUT_SEED: seed,
                            attrs.HELDOUT_COST: {
                                "items_scored": user_attrs[attrs.ITEMS_SCORED],
                                "tokens_generated": user_attrs[attrs.TOKENS_GENERATED],
                                "eval_seconds": user_attrs[attrs.EVAL_SECONDS],
                            },
                        },
                    )
                    result = HeldoutResult(trial=trial.number, seed=seed, values=by_name)
                results.append(result)
                if on_result is not None:
                    on_result(result)
                advance()
        finally:
            runner.close()
    return results
