"""Which trials of a study to export or evaluate: one by number, the best on one objective, every
Pareto-optimal trial, or the Pareto trial nearest a preference vector (:data:`PREFERENCE_RULE`),
on the values the study searched on or on the held-out values."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from mergeopt.errors import UserError
from mergeopt.report import heldout_values, objective_names
from mergeopt.study import complete_trial

if TYPE_CHECKING:
    import optuna
    from optuna.trial import FrozenTrial

PREFERENCE_RULE = (
    "Among the Pareto-optimal trials, each objective is rescaled to a regret in [0, 1] "
    "(0 = the best value on the front, 1 = the worst, direction-aware); the weights are "
    "divided by their sum, and the trial with the smallest max_k(w_k * regret_k) (weighted "
    "Chebyshev distance to the ideal point) is chosen; ties go to the smaller weighted sum of "
    "regrets, then to the lower trial number. A larger weight pulls the choice towards that "
    "objective's best value. With --on heldout, the trials are the Pareto trials that are "
    "also Pareto-optimal on their held-out values, and regrets are taken on held-out values."
)
SPLITS: tuple[str, ...] = ("search", "heldout")


def select_trials(
    study: optuna.Study,
    *,
    trial: int | None = None,
    best: str | None = None,
    pareto: bool = False,
    preference: Sequence[float] | None = None,
    on: str = "search",
) -> list[FrozenTrial]:
    """The COMPLETE trials to export, chosen by exactly one of the keyword arguments.

    Args:
        trial: that trial number.
        best: the best trial on the objective of that name (lowest number among equals);
            ``""`` names the only objective of a single-objective study.
        pareto: every Pareto-optimal trial, in trial-number order.
        preference: one non-negative weight per objective; see :data:`PREFERENCE_RULE`.
        on: ``"search"`` (the values the study optimized) or ``"heldout"``: ``best`` and
            ``preference`` choose by the held-out values ``study evaluate --heldout`` stored.

    Raises:
        UserError: no or several choices, no COMPLETE trials, an unknown trial or objective,
            a missing objective name on a multi-objective study, a preference of wrong length.
    """
    from optuna.study import StudyDirection
    from optuna.trial import TrialState

    chosen = [trial is not None, best is not None, pareto, preference is not None]
    if sum(chosen) != 1:
        raise UserError("choose exactly one of --trial N, --best OBJECTIVE, --pareto, --preference")
    if on not in SPLITS:
        raise UserError(f"--on: expected one of {', '.join(SPLITS)}, got {on!r}")
    if on == "heldout" and (trial is not None or pareto):
        raise UserError("--on heldout chooses by --best or --preference")
    name = study.study_name
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if trial is not None:
        return [complete_trial(study, trial, done_to_it="be exported")]
    if not complete:
        raise UserError(f"study {name!r} has no COMPLETE trials to export")
    names = objective_names(study)
    if best is not None:
        if best == "" and len(names) > 1:
            raise UserError(
                f"study {name!r} has {len(names)} objectives ({', '.join(names)}): "
                "--best needs an objective name"
            )
        index = 0 if best == "" else _objective_index(names, best, name)
        maximize = study.directions[index] == StudyDirection.MAXIMIZE
        value_of = _values_on(on, names)
        if on == "heldout":
            complete = [t for t in complete if heldout_values(t, names) is not None]
            if not complete:
                raise UserError(
                    f"no trial of study {name!r} has held-out values; first run: "
                    f"mergeopt study evaluate {name} --heldout --pareto"
                )
        ordered = sorted(
            complete, key=lambda t: ((-1 if maximize else 1) * value_of(t)[index], t.number)
        )
        return [ordered[0]]
    front = sorted(study.best_trials, key=lambda t: t.number)
    if pareto:
        return front
    assert preference is not None
    if on == "heldout":
        missing = [t.number for t in front if heldout_values(t, names) is None]
        if missing:
            raise UserError(
                f"Pareto trial{'s' if len(missing) > 1 else ''} "
                f"{', '.join(map(str, missing))} of study {name!r} "
                f"{'have' if len(missing) > 1 else 'has'} no held-out values; first run: "
                f"mergeopt study evaluate {name} --heldout --pareto"
            )
        front = non_dominated(front, study.directions, _values_on(on, names))
    return [
        preference_trial(
            front, study.directions, preference, names=names, value_of=_values_on(on, names)
        )
    ]


def _values_on(on: str, names: Sequence[str]) -> Callable[[FrozenTrial], Sequence[float]]:
    """A trial's objective values: those the study searched on, or its held-out values."""
    if on == "heldout":
        return lambda t: heldout_values(t, names) or []
    return lambda t: list(t.values)


def non_dominated(
    trials: Sequence[FrozenTrial],
    directions: Sequence[Any],
    value_of: Callable[[FrozenTrial], Sequence[float]],
) -> list[FrozenTrial]:
    """The trials no other of ``trials`` dominates on ``value_of`` (at least as good on every
    objective, better on one), in their order."""
    from optuna.study import StudyDirection

    from mergeopt.objectives.fidelity import dominated

    maximize = [d == StudyDirection.MAXIMIZE for d in directions]
    values = [[float(v) for v in value_of(t)] for t in trials]
    return [t for t, v in zip(trials, values, strict=True) if not dominated(v, values, maximize)]


def _objective_index(names: Sequence[str], wanted: str, study_name: str) -> int:
    if wanted not in names:
        raise UserError(
            f"study {study_name!r} has no objective {wanted!r} (objectives: {', '.join(names)})"
        )
    return list(names).index(wanted)


def preference_trial(
    front: Sequence[FrozenTrial],
    directions: Sequence[Any],
    preference: Sequence[float],
    *,
    names: Sequence[str] | None = None,
    value_of: Callable[[FrozenTrial], Sequence[float]] | None = None,
) -> FrozenTrial:
    """The trial of ``front`` with the least weighted Chebyshev regret (:data:`PREFERENCE_RULE`).

    A weighted Chebyshev scalarization reaches every Pareto-optimal point, also on non-convex
    fronts (Miettinen, *Nonlinear Multiobjective Optimization*, 1999, ch. 3.4); the preference
    vector plays the role it has in preference-aware model merging ("You Only Merge Once",
    Chen & Kwok, 2024, arXiv 2408.12105).

    Args:
        front: Pareto-optimal COMPLETE trials (``values`` of length M).
        directions: M ``optuna.study.StudyDirection`` values.
        preference: M non-negative weights, not all zero.
        value_of: the values to compare (default: ``trial.values``; held-out values for
            ``--on heldout``).
    """
    from optuna.study import StudyDirection

    count = len(directions)
    labels = ", ".join(names) if names else f"{count} objectives"
    if len(preference) != count:
        raise UserError(
            f"--preference has {len(preference)} weights; the study has {count} objectives "
            f"({labels})"
        )
    if any(not w >= 0 for w in preference) or sum(preference) <= 0:
        raise UserError("--preference weights must be non-negative numbers, not all zero")
    if not front:
        raise UserError("there are no Pareto-optimal trials to choose from")
    total = float(sum(preference))
    weights = [float(w) / total for w in preference]
    regrets: list[list[float]] = [[0.0] * count for _ in front]
    for k, direction in enumerate(directions):
        values = [float((value_of(t) if value_of else t.values)[k]) for t in front]
        low, high = min(values), max(values)
        span = high - low
        for i, value in enumerate(values):
            if span <= 0:
                continue
            best_side = high if direction == StudyDirection.MAXIMIZE else low
            regrets[i][k] = abs(best_side - value) / span

    def score(i: int) -> tuple[float, float, int]:
        weighted = [w * r for w, r in zip(weights, regrets[i], strict=True)]
        return (max(weighted), sum(weighted), front[i].number)

    return front[min(range(len(front)), key=score)]


def parse_preference(text: str) -> list[float]:
    """``"0.7,0.3"`` -> ``[0.7, 0.3]``; a one-line UserError for anything else."""
    try:
        return [float(part) for part in text.split(",")]
    except ValueError:
        raise UserError(
            f"--preference {text!r}: expected comma-separated numbers, e.g. 0.7,0.3"
        ) from None
