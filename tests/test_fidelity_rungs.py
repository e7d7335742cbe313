"""Fidelity rungs' arithmetic: intervals, the optimistic corner and its dominance, item plans,
and the spec section (the rungs on real models are in tests/test_fidelity_study.py)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from mergeopt.errors import UserError
from mergeopt.objectives.fidelity import (
    INFORMATIVE,
    REST,
    FidelityPlan,
    disagreements,
    dominated,
    estimate,
    make_plan,
    optimistic_corner,
    rung_size,
    wilson,
)
from mergeopt.spec import parse_spec
from tests.conftest import tiny_spec


def binary(correct: int, n: int) -> list[tuple[float, float]]:
    return [(1.0, 1.0)] * correct + [(0.0, 1.0)] * (n - correct)


def test_wilson_interval_holds_the_proportion_and_narrows_as_the_sample_nears_the_task() -> None:
    low, high = wilson(6, 10, confidence=0.9)
    assert low < 0.6 < high
    assert low >= 0 and high <= 1
    of_12 = wilson(6, 10, confidence=0.9, population=12)
    of_1000 = wilson(6, 10, confidence=0.9, population=1000)
    assert of_12[1] - of_12[0] < of_1000[1] - of_1000[0] < high - low + 1e-9
    assert wilson(6, 12, confidence=0.9, population=12) == (0.5, 0.5)
    # All correct is not certainty: the interval still reaches below 1.
    assert wilson(5, 5, confidence=0.9)[0] < 1.0


def test_wilson_widens_with_the_confidence() -> None:
    narrow = wilson(3, 8, confidence=0.5)
    wide = wilson(3, 8, confidence=0.99)
    assert wide[0] < narrow[0] and narrow[1] < wide[1]


def test_accuracy_of_one_stratum_is_its_wilson_interval_around_the_sample_mean() -> None:
    result = estimate("accuracy", [(48, binary(9, 12))], confidence=0.9)
    assert result.value == pytest.approx(0.75)
    assert (result.low, result.high) == pytest.approx(wilson(9, 12, confidence=0.9, population=48))


def test_stratified_accuracy_weighs_each_stratum_by_its_share_of_the_task() -> None:
    # 10 informative items, all scored (known exactly), 30 others of which 6 scored.
    result = estimate("accuracy", [(10, binary(4, 10)), (30, binary(6, 6))], confidence=0.9)
    assert result.value == pytest.approx(10 / 40 * 0.4 + 30 / 40 * 1.0)
    assert result.low < result.value <= result.high
    assert result.high == pytest.approx(1.0 * 30 / 40 + 0.4 * 10 / 40)


def test_mean_tokens_interval_is_a_t_interval_that_closes_when_every_item_is_scored() -> None:
    tokens = [(float(t), 1.0) for t in (4, 6, 5, 7, 3, 5)]
    partial = estimate("mean_tokens", [(24, tokens)], confidence=0.9)
    assert partial.value == pytest.approx(5.0)
    assert partial.low < 5.0 < partial.high
    from scipy.stats import t

    s = math.sqrt(sum((y - 5.0) ** 2 for y, _ in tokens) / 5)
    half = t.ppf(0.95, 5) * s / math.sqrt(6) * math.sqrt(1 - 6 / 24)
    assert partial.high - partial.value == pytest.approx(half)
    full = estimate("mean_tokens", [(6, tokens)], confidence=0.9)
    assert full.low == full.value == full.high == pytest.approx(5.0)


def test_one_scored_item_bounds_a_mean_only_by_what_it_can_be() -> None:
    result = estimate("mean_tokens", [(24, [(5.0, 1.0)])], confidence=0.9)
    assert result.low == 0.0 and result.high == math.inf


def test_perplexity_interval_maps_the_log_likelihood_interval_through_exp() -> None:
    # (log-likelihood, tokens) per text; perplexity = exp(-sum ll / sum tokens).
    texts = [(-10.0, 5.0), (-14.0, 6.0), (-9.0, 5.0), (-20.0, 8.0)]
    result = estimate("perplexity", [(16, texts)], confidence=0.9)
    assert result.value == pytest.approx(math.exp(53 / 24))
    assert result.low < result.value < result.high
    full = estimate("perplexity", [(4, texts)], confidence=0.9)
    assert full.value == pytest.approx(math.exp(53 / 24))
    assert full.low == full.high == full.value


def test_the_optimistic_corner_takes_each_bound_in_its_objectives_good_direction() -> None:
    corner = optimistic_corner([0.4, 3.0], [0.7, 5.0], [True, False])
    assert corner == [0.7, 3.0]
    assert optimistic_corner([0.4, 3.0], [0.7, 5.0], [False, True]) == [0.4, 5.0]


def test_a_corner_is_dominated_only_by_a_point_as_good_everywhere_and_better_somewhere() -> None:
    maximize_accuracy_minimize_tokens = [True, False]
    front = [[0.9, 4.0], [0.5, 2.0]]
    assert dominated([0.8, 5.0], front, maximize_accuracy_minimize_tokens)
    assert dominated([0.5, 2.5], front, maximize_accuracy_minimize_tokens)
    assert not dominated([0.95, 6.0], front, maximize_accuracy_minimize_tokens)
    assert not dominated([0.4, 1.0], front, maximize_accuracy_minimize_tokens)
    assert not dominated([0.9, 4.0], front, maximize_accuracy_minimize_tokens)  # equal: kept
    assert not dominated([0.1, 9.0], [], maximize_accuracy_minimize_tokens)
    # The other directions: minimize the first, maximize the second.
    assert dominated([0.8, 3.0], [[0.5, 4.0]], [False, True])
    assert not dominated([0.8, 3.0], [[0.5, 4.0]], [True, False])


def test_rung_sizes_round_up_and_cover_the_whole_task_at_one() -> None:
    assert rung_size(0.25, 48) == 12
    assert rung_size(0.25, 10) == 3
    assert rung_size(0.01, 10) == 1
    assert rung_size(1.0, 48) == 48


def test_a_random_plan_is_a_fixed_permutation_per_seed() -> None:
    plan = make_plan({"arith": 40, "facts": 10}, first_fraction=0.25, seed=7)
    again = make_plan({"arith": 40, "facts": 10}, first_fraction=0.25, seed=7)
    other = make_plan({"arith": 40, "facts": 10}, first_fraction=0.25, seed=8)
    assert plan == again
    assert plan.groups["arith"].order != other.groups["arith"].order
    assert sorted(plan.groups["arith"].order) == list(range(40))
    assert set(plan.groups["arith"].strata) == {REST}
    assert FidelityPlan.from_json(plan.to_json()) == plan
    first = plan.items_at(0.25)
    assert len(first["arith"]) == 10 and len(first["facts"]) == 3
    assert set(first["arith"]) <= set(plan.items_at(0.5)["arith"])


def test_an_informative_plan_scores_the_disagreements_first_and_keeps_some_of_the_rest() -> None:
    disagree = {"arith": {1, 5, 8, 13, 21, 34}}
    plan = make_plan({"arith": 40}, first_fraction=0.25, seed=3, informative=disagree)
    first = set(plan.items_at(0.25)["arith"])
    assert len(first) == 10
    assert disagree["arith"] <= first  # 6 informative items fit beside 4 of the rest
    assert len(first - disagree["arith"]) == 4
    strata = plan.groups["arith"].strata
    assert {i for i, s in enumerate(strata) if s == INFORMATIVE} == disagree["arith"]
    assert sorted(plan.groups["arith"].order) == list(range(40))


def test_more_disagreements_than_the_first_rung_still_leave_room_for_the_rest() -> None:
    disagree = {"arith": set(range(30))}
    plan = make_plan({"arith": 40}, first_fraction=0.25, seed=3, informative=disagree)
    first = set(plan.items_at(0.25)["arith"])
    assert len(first - disagree["arith"]) >= 2


def test_a_first_rung_smaller_than_the_kept_share_of_the_rest_still_has_its_size() -> None:
    plan = make_plan({"arith": 4}, first_fraction=0.25, seed=1, informative={"arith": {0, 1}})
    assert len(plan.items_at(0.25)["arith"]) == 1
    assert sorted(plan.groups["arith"].order) == [0, 1, 2, 3]


def test_disagreements_are_items_whose_source_models_differ_on_an_accuracy() -> None:
    def record(correct: float, tokens: float) -> dict[str, float]:
        return {"accuracy": correct, "tokens": tokens, "_w": 1.0}

    base = {"arith": {0: record(1, 3), 1: record(0, 3), 2: record(0, 9)}}
    expert = {"arith": {0: record(1, 5), 1: record(1, 3), 2: record(0, 2)}}
    assert disagreements([base, expert], ["accuracy"]) == {"arith": {1}}


def spec_with(zoo: Path, fidelity: object) -> dict:
    return tiny_spec(zoo, fidelity=fidelity)


@pytest.mark.parametrize(
    ("fidelity", "message"),
    [
        ({"rungs": [0.5, 0.25, 1.0]}, "rungs must be strictly increasing"),
        ({"rungs": [0.25, 0.25, 1.0]}, "rungs must be strictly increasing"),
        ({"rungs": [0.25, 0.5]}, "the last rung must be 1.0"),
        ({"rungs": [0.0, 1.0]}, "in (0, 1]"),
        ({"rungs": [0.5, 1.5]}, "in (0, 1]"),
        ({"confidence": 1.0}, "confidence"),
        ({"first_rung_items": "clever"}, "first_rung_items"),
        ({"rung": [0.5, 1.0]}, "rung"),
    ],
)
def test_bad_fidelity_sections_are_one_line_errors(
    tmp_path: Path, fidelity: dict, message: str
) -> None:
    with pytest.raises(UserError) as error:
        parse_spec(spec_with(tmp_path, fidelity), source="spec.yaml", folder=tmp_path)
    text = str(error.value)
    assert "\n" not in text
    assert "fidelity" in text and message in text


def test_fidelity_is_off_by_default_and_fills_its_defaults_when_given(tmp_path: Path) -> None:
    assert parse_spec(tiny_spec(tmp_path), source="s", folder=tmp_path).fidelity is None
    spec = parse_spec(spec_with(tmp_path, {}), source="s", folder=tmp_path)
    assert spec.fidelity is not None
    assert spec.fidelity.rungs == [0.25, 1.0]
    assert spec.fidelity.confidence == 0.9
    assert spec.fidelity.first_rung_items == "informative"


@pytest.mark.parametrize(("stopped_trials", "observed"), [("observe", 2), ("ignore", 1)])
def test_saasbo_observes_stopped_trials_by_their_estimates_unless_told_to_ignore_them(
    stopped_trials: str, observed: int
) -> None:
    import optuna
    from optuna.distributions import FloatDistribution
    from optuna.trial import TrialState, create_trial

    from mergeopt.samplers._state import UnitCube
    from mergeopt.samplers.saasbo import SaasQnehviSampler

    space = {"b00.e0.weight": FloatDistribution(0.0, 1.0)}
    study = optuna.create_study(directions=["maximize", "minimize"])
    study.add_trial(
        create_trial(params={"b00.e0.weight": 0.2}, distributions=space, values=[0.5, 4.0])
    )
    study.add_trial(
        create_trial(
            state=TrialState.PRUNED,
            params={"b00.e0.weight": 0.9},
            distributions=space,
            user_attrs={"mergeopt:stopped_values": [0.1, 9.0]},
        )
    )
    sampler = SaasQnehviSampler(stopped_trials=stopped_trials)
    data = sampler._complete(study, UnitCube(space))
    assert [values for _, values in data] == [[0.5, 4.0], [0.1, 9.0]][:observed]


def test_calibrated_estimate_predicts_the_full_value_from_the_rung_with_a_prediction_interval() -> (
    None
):
    from mergeopt.objectives.fidelity import MIN_CALIBRATION, calibrated

    # Finished trials whose full accuracy is 0.1 + 0.8 x their rung's, give or take 0.01.
    xs = [0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
    pairs = [(x, 0.1 + 0.8 * x + (0.01 if i % 2 else -0.01)) for i, x in enumerate(xs)]
    assert calibrated("accuracy", 0.5, pairs[: MIN_CALIBRATION - 1], confidence=0.9) is None
    inside = calibrated("accuracy", 0.5, pairs, confidence=0.9)
    assert inside is not None
    assert inside.value == pytest.approx(0.5, abs=0.01)
    assert inside.low < inside.value < inside.high
    assert inside.high - inside.low < 0.06  # far tighter than 24 items' Wilson interval (~0.3)
    beyond = calibrated("accuracy", 0.0, pairs, confidence=0.9)  # unlike any finished trial
    assert beyond is not None and beyond.high - beyond.low > inside.high - inside.low
    top = calibrated("accuracy", 1.2, pairs, confidence=0.9)
    assert top is not None and top.high == 1.0  # cut at what accuracy can be
    flat = [(0.5, 0.1 * i) for i in range(MIN_CALIBRATION)]  # no spread in x: no line
    assert calibrated("accuracy", 0.5, flat, confidence=0.9) is None


def test_calibration_pairs_take_finished_trials_that_recorded_the_rung() -> None:
    from mergeopt.objectives.fidelity import Finished, calibration_pairs

    finished = [
        Finished([0.5, 3.0], {"acc": 0.5}, [{"acc": 0.4}]),
        Finished([0.6, 3.0], {"acc": 0.6}, []),  # no fidelity when it ran
        Finished([0.7, 3.0], {}, [{"acc": 0.7}]),
    ]
    assert calibration_pairs(finished, 0, "acc") == [(0.4, 0.5)]
    assert calibration_pairs(finished, 1, "acc") == []


# -- the rungs on a real (tiny, untrained) model ----------------------------------------------


@pytest.fixture(scope="module")
def scored(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    """An evaluator on a real tiny model with a generation, a multiple-choice and a perplexity
    task, and its full evaluation."""
    from mergeopt.objectives.evaluate import Evaluator, GenerationOptions
    from mergeopt.objectives.scorers.hf import HFScorer
    from tests.task_files import objective, write_jsonl
    from tests.tiny_models import build_tiny_model

    folder = tmp_path_factory.mktemp("rungs")
    scorer = HFScorer(model_dir=build_tiny_model(folder / "model"), batch_size=8)
    write_jsonl(folder / "arith.jsonl", [{"prompt": f"{a}+1=", "answer": a + 1} for a in range(16)])
    write_jsonl(
        folder / "mc.jsonl",
        [{"question": f"{a}+1=", "choices": [str(a), str(a + 1)], "answer": 1} for a in range(8)],
    )
    write_jsonl(folder / "texts.jsonl", [{"text": f"the number {a} follows."} for a in range(8)])
    objectives = [
        objective(folder / "arith.jsonl", "accuracy"),
        objective(folder / "arith.jsonl", "tokens", metric="mean_tokens", direction="minimize"),
        objective(folder / "mc.jsonl", "choice", kind="multiple_choice"),
        objective(
            folder / "texts.jsonl",
            "ppl",
            kind="perplexity",
            metric="perplexity",
            direction="minimize",
        ),
    ]
    evaluator = Evaluator(
        objectives, scorer, scorer_options=GenerationOptions(max_new_tokens=6, stop=("\n",))
    )
    return evaluator, objectives, evaluator.evaluate()


def rungs_of(scored, front: list[list[float]], rungs=(0.25, 0.5, 1.0)):  # noqa: ANN001, ANN201
    from mergeopt.objectives.fidelity import Finished, score_by_rungs

    evaluator, objectives, _ = scored
    reads: list[int] = []

    def read_front() -> list[Finished]:
        reads.append(1)
        return [Finished(values) for values in front]

    plan = make_plan(evaluator.group_sizes(), first_fraction=rungs[0], seed=0)
    result = score_by_rungs(
        evaluator,
        plan,
        rungs=list(rungs),
        confidence=0.9,
        objectives=objectives,
        normalize=dict,
        front=read_front,
    )
    return result, len(reads)


def test_a_trial_no_one_dominates_runs_every_rung_to_exactly_the_full_evaluation(scored) -> None:  # noqa: ANN001
    _, _, full = scored
    result, reads = rungs_of(scored, front=[])
    assert not result.stopped and result.rung == 2
    assert reads == 2  # one read of the front per rung before the last
    assert result.values == full.values  # every item once: the very same numbers
    assert result.items == full.items and result.tokens == full.tokens
    for label, metrics in full.metrics.items():
        kept = {k: v for k, v in metrics.items() if k != "seconds"}
        assert {k: v for k, v in result.metrics[label].items() if k != "seconds"} == kept


def test_a_trial_whose_best_case_is_dominated_stops_at_the_first_rung(scored) -> None:  # noqa: ANN001
    _, _, full = scored
    # Better than any model can be on every objective: nothing can reach it.
    result, reads = rungs_of(scored, front=[[2.0, -1.0, 2.0, 0.5]])
    assert result.stopped and result.rung == 0 and reads == 1
    assert result.items == 4 + 2 + 2  # a quarter of each task's 16, 8 and 8 items
    for name in full.values:
        assert result.low[name] <= result.values[name] <= result.high[name]


def test_evalscope_objectives_cannot_be_scored_in_rungs(tmp_path: Path) -> None:
    data = spec_with(tmp_path, {})
    data["objectives"].append(
        {"name": "qa", "task": "unused", "kind": "evalscope", "evalscope": {"dataset": "x"}}
    )
    with pytest.raises(UserError, match="fidelity rungs need task-file objectives"):
        parse_spec(data, source="spec.yaml", folder=tmp_path)


def test_a_trial_the_calibrated_line_predicts_dominated_stops_where_the_design_interval_would_not(
    scored,  # noqa: ANN001
) -> None:
    from mergeopt.objectives.fidelity import Finished, score_by_rungs

    evaluator, objectives, full = scored
    names = [o.name for o in objectives]
    plan = make_plan(evaluator.group_sizes(), first_fraction=0.25, seed=0)
    first = score_by_rungs(
        evaluator,
        plan,
        rungs=[0.25, 1.0],
        confidence=0.9,
        objectives=objectives,
        normalize=dict,
        front=lambda: [],
        estimator="design",
    )
    x = first.rung_raw[0]
    # Finished trials on which every objective's full value is its rung estimate: the line says
    # this trial ends exactly at its rung estimates, and one finished trial beats those a bit.
    spread = [-0.2, -0.1, 0.0, 0.1, 0.2, 0.3, -0.3, 0.15, -0.15]
    worst = [-1.0 if o.direction == "maximize" else 1e9 for o in objectives]
    finished = [
        Finished(worst, {n: x[n] + d for n in names}, [{n: x[n] + d for n in names}])
        for d in spread
    ]
    better = [
        x[n] + (0.02 if o.direction == "maximize" else -0.02)
        for n, o in zip(names, objectives, strict=True)
    ]
    finished.append(Finished(better))

    def outcome(estimator: str) -> bool:
        return score_by_rungs(
            evaluator,
            plan,
            rungs=[0.25, 1.0],
            confidence=0.9,
            objectives=objectives,
            normalize=dict,
            front=lambda: finished,
            estimator=estimator,
        ).stopped

    assert not first.stopped and len(first.rung_raw) == 1 and full.items > 0
    assert outcome("calibrated") and not outcome("design")
