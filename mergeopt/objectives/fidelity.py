"""Fidelity rungs: score a trial on a fixed subset of items first, stop it when it cannot win.

A study with ``fidelity: {rungs: [0.25, 1.0], confidence: 0.9}`` scores each trial on the first
rung's items of every task (a fixed subset, the same for all trials of the study); after each
rung but the last it estimates every objective's value over the whole task with a confidence
interval, takes the **optimistic corner** (each interval's bound in the objective's good
direction, after the study's normalization), and stops the trial if a COMPLETE trial of the
study dominates that corner. Otherwise it scores the next rung's items not yet scored and
combines them with the earlier ones; the last rung (1.0) gives exactly the value a full
evaluation gives.

Items of a task are split into strata: with ``first_rung_items: informative``, the items on
which the source models (base and experts, scored once per study for the anchors) disagree
about an accuracy objective, and the rest; the first rung takes the disagreeing items first
(they tell merges apart), padded with random ones, and keeps a share of the rest so that
every stratum is estimated. With ``random`` there is one stratum. Estimates are stratified
(each stratum weighs its share of the task), with the finite-population correction (a rung
that scored a whole stratum knows it exactly):

- accuracy: a Wilson score interval per stratum (on the effective sample size
  ``n (N - 1) / (N - n)``), the stratum bounds weighted and summed (conservative);
- mean tokens and perplexity: a t-interval of the stratified ratio estimator
  ``sum(y) / sum(w)`` (perplexity is ``exp(-ratio)`` of log-likelihood over tokens), cut at
  what the metric can be (0 tokens, perplexity 1).

Those design-based intervals treat a trial's items as a random sample, which wastes what the
study already knows: merges of the same experts get mostly the same items right, so a
trial's score on the first rung predicts its full score far better than the sampling
variance says. With ``estimator: calibrated`` (the default) each objective at each rung is
predicted from the study's COMPLETE trials instead, once there are ``MIN_CALIBRATION`` of
them: an ordinary least-squares line from the rung's design-based estimate to the full value,
and its prediction interval ``t * s * sqrt(1 + 1/k + (x - mean x)^2 / Sxx)`` (the residual
spread of k trials, widened for a trial unlike them). Every trial stores its rung estimates
(``Finished.rung_raw``), so the line needs no extra database read. Before enough trials
finish, or where the line is undefined, the design-based interval is used.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mergeopt.objectives.evaluate import WEIGHT, check_finite

if TYPE_CHECKING:
    from mergeopt.objectives.evaluate import Evaluator

INFORMATIVE, REST = 0, 1
MIN_PER_STRATUM = 2
MIN_CALIBRATION = 8
"""COMPLETE trials the calibrated estimator needs before it replaces the design-based one
(6 residual degrees of freedom: t at 0.9 is 1.94 against the normal's 1.64)."""
ESTIMATORS = ("calibrated", "design")
Record = Mapping[str, float]


@dataclass(frozen=True)
class Finished:
    """A COMPLETE trial as the rungs see it: ``values`` as the study stores them (objective
    order); ``raw``, its full values before normalization, and ``rung_raw``, the design-based
    raw estimates of its rungs before the last, by objective name."""

    values: Sequence[float]
    raw: Mapping[str, float] = field(default_factory=dict)
    rung_raw: Sequence[Mapping[str, float]] = ()


def rung_size(fraction: float, total: int) -> int:
    """Items a rung covers of a task of ``total`` items (at least one, at most all)."""
    return min(total, max(1, math.ceil(fraction * total - 1e-9)))


@dataclass(frozen=True)
class ItemOrder:
    """One task's items in scoring order, and the stratum of each item (by index)."""

    order: tuple[int, ...]
    strata: tuple[int, ...]

    def upto(self, fraction: float) -> tuple[int, ...]:
        return self.order[: rung_size(fraction, len(self.order))]


@dataclass(frozen=True)
class FidelityPlan:
    """Every task group's item order (by the evaluator's group label): JSON in the study."""

    groups: dict[str, ItemOrder]

    def items_at(self, fraction: float) -> dict[str, tuple[int, ...]]:
        return {label: order.upto(fraction) for label, order in self.groups.items()}

    def to_json(self) -> dict[str, Any]:
        return {
            label: {"order": list(o.order), "strata": list(o.strata)}
            for label, o in self.groups.items()
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> FidelityPlan:
        return cls(
            {
                label: ItemOrder(
                    tuple(int(i) for i in g["order"]), tuple(int(s) for s in g["strata"])
                )
                for label, g in data.items()
            }
        )


def make_plan(
    sizes: Mapping[str, int],
    *,
    first_fraction: float,
    seed: int,
    informative: Mapping[str, set[int]] | None = None,
) -> FidelityPlan:
    """Item orders for tasks of ``sizes`` items: random (``informative`` None), or the given
    informative items first, with at least ``MIN_PER_STRATUM`` (and a quarter of the first
    rung where there are enough) of the other items so both strata are estimated."""
    groups: dict[str, ItemOrder] = {}
    for label, total in sizes.items():
        rng = random.Random(f"{seed}:{label}")
        chosen = set(informative.get(label, ())) if informative is not None else set()
        top = [i for i in range(total) if i in chosen]
        rest = [i for i in range(total) if i not in chosen]
        rng.shuffle(top)
        rng.shuffle(rest)
        first = rung_size(first_fraction, total)
        if not top or not rest:
            order = top + rest
        else:
            keep_rest = min(len(rest), max(MIN_PER_STRATUM, math.ceil(first / 4)))
            take_top = max(0, min(len(top), first - keep_rest))
            head = top[:take_top] + rest[: first - take_top]
            taken = set(head)
            tail = [i for i in top[take_top:] + rest if i not in taken]
            rng.shuffle(tail)
            order = head + tail
        strata = tuple(INFORMATIVE if i in chosen and rest else REST for i in range(total))
        groups[label] = ItemOrder(tuple(order), strata)
    return FidelityPlan(groups)


def disagreements(
    sources: Sequence[Mapping[str, Mapping[int, Record]]], accuracy_objectives: Sequence[str]
) -> dict[str, set[int]]:
    """Items (by group label) on which the source models' records differ on an accuracy
    objective: the items that tell merges apart."""
    result: dict[str, set[int]] = {}
    if not sources:
        return result
    for label, records in sources[0].items():
        result[label] = {
            index
            for index, record in records.items()
            if any(
                name in record and len({source[label][index][name] for source in sources}) > 1
                for name in accuracy_objectives
            )
        }
    return result


# -- intervals --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Estimate:
    """An objective's estimated value over all items, and its confidence interval."""

    value: float
    low: float
    high: float


def _z(confidence: float) -> float:
    from statistics import NormalDist

    return NormalDist().inv_cdf(0.5 + confidence / 2)


def _t(confidence: float, df: int) -> float:
    from scipy.stats import t

    return float(t.ppf(0.5 + confidence / 2, df))


def wilson(
    successes: float, n: int, *, confidence: float, population: int | None = None
) -> tuple[float, float]:
    """Wilson score interval of a proportion from ``n`` items (of ``population``, sampled
    without replacement: the effective sample size grows to infinity as n reaches it)."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    if population is not None and n >= population:
        return p, p
    n_eff = n * (population - 1) / (population - n) if population is not None else float(n)
    z = _z(confidence)
    denominator = 1 + z * z / n_eff
    centre = (p + z * z / (2 * n_eff)) / denominator
    half = z * math.sqrt(p * (1 - p) / n_eff + z * z / (4 * n_eff * n_eff)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def estimate(
    metric: str,
    strata: Sequence[tuple[int, Sequence[tuple[float, float]]]],
    *,
    confidence: float,
) -> Estimate:
    """An objective over all items from the ``(stratum size, [(y, w) scored])`` of each
    stratum (see the module's text for the interval of each metric)."""
    sampled = [(size, obs) for size, obs in strata if obs]
    complete = all(len(obs) >= size for size, obs in strata)
    total_y = {id(obs): sum(y for y, _ in obs) for _, obs in sampled}
    total_w = {id(obs): sum(w for _, w in obs) for _, obs in sampled}
    # Stratified totals of y and w over the whole task.
    y_hat = sum(size * total_y[id(obs)] / len(obs) for size, obs in sampled)
    w_hat = sum(size * total_w[id(obs)] / len(obs) for size, obs in sampled)
    ratio = y_hat / w_hat if w_hat else 0.0
    if complete:
        y_all = sum(total_y.values())
        w_all = sum(total_w.values())
        ratio = y_all / w_all if w_all else 0.0
        value = math.exp(-ratio) if metric == "perplexity" else ratio
        return Estimate(value, value, value)
    if metric == "accuracy":
        population = sum(size for size, _ in strata)
        low = high = 0.0
        for size, obs in strata:
            lo, hi = wilson(
                sum(y for y, _ in obs), len(obs), confidence=confidence, population=size
            )
            low += size / population * lo
            high += size / population * hi
        return Estimate(ratio, low, high)
    variance = 0.0
    df = 0
    for size, obs in strata:
        n = len(obs)
        if n >= size:
            continue
        if n < 2:
            variance = math.inf
            break
        residuals = [y - ratio * w for y, w in obs]
        mean = sum(residuals) / n
        s2 = sum((e - mean) ** 2 for e in residuals) / (n - 1)
        variance += size * size * (1 - n / size) * s2 / n
        df += n - 1
    half = _t(confidence, max(df, 1)) * math.sqrt(variance) / w_hat if w_hat else math.inf
    if metric == "perplexity":  # at least 1: no text is likelier than certain
        low = max(1.0, math.exp(-(ratio + half))) if half < math.inf else 1.0
        return Estimate(math.exp(-ratio), low, math.exp(-(ratio - half)))
    return Estimate(ratio, max(0.0, ratio - half), ratio + half)  # tokens: at least 0


def calibrated(
    metric: str,
    x: float,
    pairs: Sequence[tuple[float, float]],
    *,
    confidence: float,
) -> Estimate | None:
    """The full value predicted from a rung's estimate ``x`` by the line through ``pairs``
    (rung estimate, full value) of finished trials, with its prediction interval cut at what
    the metric can be; None with fewer than ``MIN_CALIBRATION`` pairs or no spread in x."""
    k = len(pairs)
    if k < MIN_CALIBRATION:
        return None
    mean_x = sum(p for p, _ in pairs) / k
    mean_y = sum(q for _, q in pairs) / k
    sxx = sum((p - mean_x) ** 2 for p, _ in pairs)
    if sxx <= 1e-12 * max(1.0, mean_x * mean_x):
        return None
    slope = sum((p - mean_x) * (q - mean_y) for p, q in pairs) / sxx
    intercept = mean_y - slope * mean_x
    s2 = sum((q - intercept - slope * p) ** 2 for p, q in pairs) / (k - 2)
    value = intercept + slope * x
    half = _t(confidence, k - 2) * math.sqrt(s2 * (1 + 1 / k + (x - mean_x) ** 2 / sxx))
    low, high = value - half, value + half
    if metric == "accuracy":
        value, low, high = (min(1.0, max(0.0, v)) for v in (value, low, high))
    elif metric == "perplexity":
        value, low, high = (max(1.0, v) for v in (value, low, high))
    else:
        value, low, high = (max(0.0, v) for v in (value, low, high))
    return Estimate(value, low, high)


def calibration_pairs(
    finished: Sequence[Finished], rung: int, name: str
) -> list[tuple[float, float]]:
    """(rung ``rung``'s estimate, full value) of objective ``name`` over finished trials that
    recorded both."""
    return [
        (float(f.rung_raw[rung][name]), float(f.raw[name]))
        for f in finished
        if len(f.rung_raw) > rung and name in f.rung_raw[rung] and name in f.raw
    ]


def finished_trials(trials: Iterable[Any]) -> list[Finished]:
    """COMPLETE Optuna trials as :class:`Finished` (their values, and the raw values and rung
    estimates the study stored in their user attrs, where it did)."""
    from mergeopt import attrs

    result = []
    for trial in trials:
        if trial.values is None:
            continue
        fidelity = attrs.FIDELITY.get(trial) or {}
        result.append(
            Finished(
                values=list(trial.values),
                raw=attrs.RAW_VALUES.get(trial) or {},
                rung_raw=fidelity.get("rung_raw", []),
            )
        )
    return result


def optimistic_corner(
    low: Sequence[float], high: Sequence[float], maximize: Sequence[bool]
) -> list[float]:
    """Each objective's best plausible value: the interval's bound in its good direction."""
    return [hi if up else lo for lo, hi, up in zip(low, high, maximize, strict=True)]


def dominated(
    point: Sequence[float], others: Sequence[Sequence[float]], maximize: Sequence[bool]
) -> bool:
    """Whether one of ``others`` is at least as good as ``point`` in every objective and
    better in one (each objective in its own direction)."""
    signs = [1.0 if up else -1.0 for up in maximize]
    mine = [s * v for s, v in zip(signs, point, strict=True)]
    for other in others:
        theirs = [s * v for s, v in zip(signs, other, strict=True)]
        if all(t >= m for t, m in zip(theirs, mine, strict=True)) and theirs != mine:
            return True
    return False


# -- the rungs ----------------------------------------------------------------------------------


@dataclass
class RungResult:
    """What a trial's rungs scored: ``values``/``low``/``high`` normalized as the study sees
    them (by objective name), ``raw`` before normalization, ``metrics`` per task group over
    the scored items; ``rung`` the index of the last rung scored, ``stopped`` whether the
    trial stopped there."""

    values: dict[str, float]
    low: dict[str, float]
    high: dict[str, float]
    raw: dict[str, float]
    metrics: dict[str, dict[str, float]]
    rung: int
    stopped: bool
    items: int = 0
    tokens: int = 0
    seconds: float = 0.0
    records: dict[str, dict[int, dict[str, float]]] = field(default_factory=dict)
    rung_raw: list[dict[str, float]] = field(default_factory=list)
    """The design-based raw estimates of each rung before the last that was scored."""


def score_by_rungs(
    evaluator: Evaluator,
    plan: FidelityPlan,
    *,
    rungs: Sequence[float],
    confidence: float,
    objectives: Sequence[Any],
    normalize: Callable[[dict[str, float]], dict[str, float]],
    front: Callable[[], Sequence[Finished]],
    estimator: str = "calibrated",
) -> RungResult:
    """Score the merged model rung by rung (see the module's text); ``front()`` is called once
    per rung before the last and returns the study's COMPLETE trials."""
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}")
    started = time.perf_counter()
    records: dict[str, dict[int, dict[str, float]]] = {label: {} for label in plan.groups}
    rung_raw: list[dict[str, float]] = []
    items = tokens = 0
    maximize = [objective.direction == "maximize" for objective in objectives]
    for index, fraction in enumerate(rungs):
        wanted = plan.items_at(fraction)
        todo = {label: [i for i in wanted[label] if i not in records[label]] for label in wanted}
        scored = evaluator.score_items(todo)
        for label, new in scored.records.items():
            records[label].update(new)
        items += scored.items
        tokens += scored.tokens
        last = index == len(rungs) - 1
        raw, metrics = evaluator.summarize(records)
        finished: Sequence[Finished] = ()
        if last:  # every item scored: exactly the values of a full evaluation
            check_finite(raw)
            value = low = high = normalize(raw)
        else:
            estimates = {
                objective.name: estimate(
                    objective.metric, _strata(plan, records, objective.name), confidence=confidence
                )
                for objective in objectives
            }
            rung_raw.append({name: e.value for name, e in estimates.items()})
            finished = front()
            if estimator == "calibrated":
                for objective in objectives:
                    better = calibrated(
                        objective.metric,
                        estimates[objective.name].value,
                        calibration_pairs(finished, index, objective.name),
                        confidence=confidence,
                    )
                    if better is not None:
                        estimates[objective.name] = better
            raw = {name: e.value for name, e in estimates.items()}
            check_finite(raw)
            value = normalize(raw)
            low = normalize({name: e.low for name, e in estimates.items()})
            high = normalize({name: e.high for name, e in estimates.items()})
        names = [objective.name for objective in objectives]
        corner = optimistic_corner([low[n] for n in names], [high[n] for n in names], maximize)
        stopped = not last and dominated(corner, [f.values for f in finished], maximize)
        if last or stopped:
            return RungResult(
                values=value,
                low=low,
                high=high,
                raw=raw,
                metrics=metrics,
                rung=index,
                stopped=stopped,
                items=items,
                tokens=tokens,
                seconds=time.perf_counter() - started,
                records=records,
                rung_raw=rung_raw,
            )
    raise ValueError("no rungs")


def _strata(
    plan: FidelityPlan, records: Mapping[str, Mapping[int, Record]], name: str
) -> list[tuple[int, list[tuple[float, float]]]]:
    """``(stratum size, [(y, w)])`` of objective ``name``'s task group, by stratum."""
    for label, order in plan.groups.items():
        group = records.get(label, {})
        if not group or name not in next(iter(group.values())):
            continue
        result: list[tuple[int, list[tuple[float, float]]]] = []
        for stratum in sorted(set(order.strata)):
            members = [i for i, s in enumerate(order.strata) if s == stratum]
            observed = [(group[i][name], group[i][WEIGHT]) for i in members if i in group]
            result.append((len(members), observed))
        return result
    raise KeyError(f"objective {name!r} has no scored items")
