"""Hypervolume of a study's COMPLETE trials as its evaluation cost accumulates.

``study plot`` draws it (hypervolume against cumulative tokens generated, so that a study whose
fidelity rungs stopped trials early shows what it bought per token), and
``scripts/bench_fidelity.py`` compares runs with it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from mergeopt import attrs

if TYPE_CHECKING:
    import optuna
    from optuna.trial import FrozenTrial


def hypervolume(
    points: Sequence[Sequence[float]], reference: Sequence[float], maximize: Sequence[bool]
) -> float:
    """The volume dominated by ``points`` and bounded by ``reference`` (each objective in its
    own direction; points not better than the reference in every objective add nothing).
    Exact, by slicing along the first objective: meant for fronts of a few hundred points."""
    flipped = [
        [(v - r) if up else (r - v) for v, r, up in zip(point, reference, maximize, strict=True)]
        for point in points
    ]
    return _volume([p for p in flipped if all(x > 0 for x in p)])


def _volume(points: list[list[float]]) -> float:
    """Volume of the union of boxes [0, p] (every coordinate of every p is positive)."""
    if not points:
        return 0.0
    if len(points[0]) == 1:
        return max(p[0] for p in points)
    ordered = sorted(points, key=lambda p: p[0], reverse=True)
    total = 0.0
    tallest = 0.0  # in 2-D the slice's area is the running maximum: O(n log n), not O(n^2)
    for index, point in enumerate(ordered):
        below = ordered[index + 1][0] if index + 1 < len(ordered) else 0.0
        width = point[0] - below
        if len(point) == 2:
            tallest = max(tallest, point[1])
        if width > 0:
            area = tallest if len(point) == 2 else _volume([p[1:] for p in ordered[: index + 1]])
            total += width * area
    return total


def cost_of(trial: FrozenTrial) -> tuple[int, int]:
    """(items scored, tokens generated) of a trial's search evaluation; (0, 0) when not stored."""
    return int(trial.user_attrs.get(attrs.ITEMS_SCORED, 0)), int(
        trial.user_attrs.get(attrs.TOKENS_GENERATED, 0)
    )


def hypervolume_by_cost(
    study: optuna.Study, reference: Sequence[float]
) -> tuple[str, list[tuple[int, float]]]:
    """``(unit, [(cumulative cost, hypervolume)])`` after each evaluated trial (COMPLETE or
    stopped early), in the order they finished. The unit is ``tokens generated``, or ``items
    scored`` for a study whose tasks generate no tokens."""
    from optuna.study import StudyDirection
    from optuna.trial import TrialState

    maximize = [d == StudyDirection.MAXIMIZE for d in study.directions]
    finished = [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
        if attrs.ITEMS_SCORED in t.user_attrs
    ]
    finished.sort(key=lambda t: (t.datetime_complete is None, t.datetime_complete, t.number))
    by_tokens = any(cost_of(t)[1] for t in finished)
    spent = 0
    front: list[list[float]] = []
    curve: list[tuple[int, float]] = []
    for trial in finished:
        spent += cost_of(trial)[1 if by_tokens else 0]
        if trial.state == TrialState.COMPLETE and trial.values is not None:
            front.append(list(trial.values))
        curve.append((spent, hypervolume(front, reference, maximize)))
    return ("tokens generated" if by_tokens else "items scored"), curve


def hypervolume_cost_png(study: optuna.Study, path: Path, reference: Sequence[float]) -> Path:
    """Draw :func:`hypervolume_by_cost` (a step per evaluated trial) into ``path``."""
    import matplotlib.pyplot as plt

    unit, curve = hypervolume_by_cost(study, reference)
    figure, axes = plt.subplots(figsize=(7, 4))
    axes.step([c for c, _ in curve], [h for _, h in curve], where="post", marker=".")
    axes.set_xlabel(f"cumulative {unit}")
    axes.set_ylabel("hypervolume")
    axes.set_title(f"Hypervolume against {unit}, study {study.study_name}")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
