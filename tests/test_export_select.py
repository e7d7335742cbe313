"""Choosing trials to export: by number, best on one objective, Pareto front, preference."""

from __future__ import annotations

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from mergeopt.errors import UserError
from mergeopt.export_choice import parse_preference, select_trials

DISTRIBUTIONS = {"b00.e0.weight": FloatDistribution(0.0, 1.0)}


def hand_made_front() -> optuna.Study:
    """accuracy (maximize) vs tokens (minimize): three Pareto trials, one dominated, one failed.

    trial 0: (0.9, 10)  best accuracy          regrets (0.0, 1.0)
    trial 1: (0.7, 4)   the knee               regrets (0.5, 0.25)
    trial 2: (0.4, 9)   dominated by trial 1
    trial 3: (0.5, 2)   fewest tokens          regrets (1.0, 0.0)
    trial 4: FAIL
    """
    study = optuna.create_study(directions=["maximize", "minimize"], study_name="front")
    study.set_metric_names(["accuracy", "tokens"])
    for index, values in enumerate([(0.9, 10.0), (0.7, 4.0), (0.4, 9.0), (0.5, 2.0)]):
        study.add_trial(
            create_trial(
                values=list(values),
                params={"b00.e0.weight": index / 4},
                distributions=DISTRIBUTIONS,
            )
        )
    study.add_trial(create_trial(state=TrialState.FAIL))
    return study


def numbers(trials: list[optuna.trial.FrozenTrial]) -> list[int]:
    return [t.number for t in trials]


@pytest.mark.parametrize(
    ("preference", "expected"),
    [
        ([1.0, 0.0], 0),  # only accuracy counts
        ([0.0, 1.0], 3),  # only tokens count
        ([0.5, 0.5], 1),  # max(0.25, 0.125) beats 0.5 for either end of the front
        ([2.0, 2.0], 1),  # weights are relative
        ([0.8, 0.2], 0),  # 0.8*0 vs 0.2*1=0.2 for trial 0; 0.8*0.5=0.4 for trial 1
        ([0.3, 0.7], 1),  # trial 1: max(0.15, 0.175); trial 0: 0.7; trial 3: 0.3
    ],
)
def test_preference_picks_the_pareto_trial_with_least_weighted_chebyshev_regret(
    preference: list[float], expected: int
) -> None:
    assert numbers(select_trials(hand_made_front(), preference=preference)) == [expected]


def test_preference_never_picks_a_dominated_trial() -> None:
    study = hand_made_front()
    chosen = {select_trials(study, preference=[w, 1 - w])[0].number for w in (0.0, 0.3, 0.6, 1.0)}
    assert 2 not in chosen and 4 not in chosen


def test_pareto_is_the_non_dominated_complete_trials_in_number_order() -> None:
    assert numbers(select_trials(hand_made_front(), pareto=True)) == [0, 1, 3]


def test_best_needs_the_objective_name_and_respects_its_direction() -> None:
    study = hand_made_front()
    assert numbers(select_trials(study, best="accuracy")) == [0]
    assert numbers(select_trials(study, best="tokens")) == [3]
    with pytest.raises(UserError, match="--best needs an objective name"):
        select_trials(study, best="")
    with pytest.raises(UserError, match="no objective 'speed'"):
        select_trials(study, best="speed")


def test_best_on_a_single_objective_study_needs_no_name() -> None:
    study = optuna.create_study(direction="minimize")
    for value in (3.0, 1.0, 1.0, 2.0):
        study.add_trial(create_trial(value=value))
    assert numbers(select_trials(study, best="")) == [1]  # lowest number among equals


def test_trial_by_number_must_exist_and_be_complete() -> None:
    study = hand_made_front()
    assert numbers(select_trials(study, trial=2)) == [2]
    with pytest.raises(UserError, match="has no trial 9 \\(trials 0..4\\)"):
        select_trials(study, trial=9)
    with pytest.raises(UserError, match="trial 4 .* is FAIL"):
        select_trials(study, trial=4)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"preference": [1.0]}, "1 weights; the study has 2 objectives \\(accuracy, tokens\\)"),
        ({"preference": [1.0, 0.0, 0.0]}, "3 weights"),
        ({"preference": [-1.0, 2.0]}, "non-negative"),
        ({"preference": [0.0, 0.0]}, "not all zero"),
        ({}, "choose exactly one"),
        ({"pareto": True, "trial": 1}, "choose exactly one"),
    ],
)
def test_bad_choices_are_one_line_user_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(UserError, match=message) as caught:
        select_trials(hand_made_front(), **kwargs)
    assert "\n" not in str(caught.value)


def test_a_study_without_complete_trials_has_nothing_to_export() -> None:
    study = optuna.create_study(directions=["maximize", "minimize"], study_name="empty")
    study.add_trial(create_trial(state=TrialState.FAIL))
    for kwargs in ({"pareto": True}, {"best": "objective_0"}, {"preference": [1.0, 1.0]}):
        with pytest.raises(UserError, match="'empty' has no COMPLETE trials"):
            select_trials(study, **kwargs)


def test_preference_text_is_comma_separated_numbers() -> None:
    assert parse_preference("0.7,0.3") == [0.7, 0.3]
    with pytest.raises(UserError, match="comma-separated numbers"):
        parse_preference("0.7;0.3")
