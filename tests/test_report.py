"""What `study status` and `study list` say about a study's trials and objectives."""

from __future__ import annotations

from pathlib import Path

import optuna
from optuna.trial import TrialState, create_trial

from mergeopt import attrs
from mergeopt.report import states_text, status_report
from tests.conftest import run_cli

DISTRIBUTIONS = {"w": optuna.distributions.FloatDistribution(0.0, 1.0)}


def study_with_every_kind_of_trial(url: str) -> optuna.Study:
    """3 complete, 1 failed evaluation, 2 given back (a surplus, an interrupted trial), 2
    queued candidates."""
    study = optuna.create_study(
        study_name="kinds", storage=url, directions=["maximize", "minimize"]
    )
    study.set_metric_names(["accuracy", "tokens"])
    for w in (0.1, 0.5, 0.9):
        study.add_trial(
            create_trial(params={"w": w}, distributions=DISTRIBUTIONS, values=[w, 10 * w])
        )
    study.add_trial(
        create_trial(state=TrialState.FAIL, user_attrs={attrs.FAIL_REASON: "CUDA out of memory"})
    )
    for reason in ("surplus: the study already has 3", "interrupted (SIGTERM); requeued"):
        study.add_trial(
            create_trial(
                state=TrialState.FAIL,
                user_attrs={attrs.FAIL_REASON: reason, attrs.GIVEN_BACK: True},
            )
        )
    study.enqueue_trial({"w": 0.3})
    study.enqueue_trial({"w": 0.7})
    return study


def test_trials_closed_unevaluated_are_not_counted_as_failures(tmp_path: Path) -> None:
    report = status_report(study_with_every_kind_of_trial(f"sqlite:///{tmp_path}/s.db"))

    assert report["states"]["FAIL"] == 3 and report["given_back"] == 2
    assert states_text(report) == (
        "complete 3, failed 1, given back 2 (closed unevaluated, not failures), "
        "queued 2 (evaluated first by the next run)"
    )


def test_an_empty_study_has_no_trials() -> None:
    study = optuna.create_study(directions=["maximize", "minimize"])
    assert states_text(status_report(study)) == "no trials"


def test_status_and_list_name_the_objectives_and_explain_the_states(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/s.db"
    study_with_every_kind_of_trial(url)
    optuna.create_study(study_name="unnamed", storage=url, direction="minimize")

    status = run_cli("study", "status", "kinds", "--storage", url)
    listing = run_cli("study", "list", "--storage", url)

    assert status.returncode == 0, status.stderr
    assert "failed 1, given back 2" in status.stdout
    assert "queued 2 (evaluated first by the next run)" in status.stdout
    assert listing.returncode == 0, listing.stderr
    assert "accuracy ↑, tokens ↓" in listing.stdout
    assert "objective 0 ↓" in listing.stdout


def cost(items: int, tokens: int) -> dict[str, object]:
    return {attrs.ITEMS_SCORED: items, attrs.TOKENS_GENERATED: tokens, attrs.EVAL_SECONDS: 1.0}


def test_trials_stopped_by_fidelity_rungs_count_what_they_saved_against_full_evaluation() -> None:
    from mergeopt.report import cost_text, evaluation_cost

    rungs = {attrs.FIDELITY: {"rung": 0, "stopped": True}}
    trials = [
        create_trial(values=[0.5, 4.0], user_attrs=cost(48, 200)),
        create_trial(values=[0.7, 6.0], user_attrs=cost(48, 300)),
        create_trial(state=TrialState.PRUNED, user_attrs={**cost(12, 50), **rungs}),
        create_trial(state=TrialState.PRUNED, user_attrs={**cost(12, 70), **rungs}),
    ]
    search = evaluation_cost(trials)["search"]
    assert search["trials"] == 4
    assert search["tokens_generated"] == 620
    assert search["stopped"] == 2
    # A full evaluation costs 250 tokens on average (the COMPLETE trials): 200 + 180 saved.
    assert search["tokens_saved"] == 380 and search["items_saved"] == 72
    assert search["fraction_saved"] == round(380 / 1000, 4)
    text = cost_text(evaluation_cost(trials))
    assert "2 stopped early by fidelity rungs, saving 380 tokens, 38% of full evaluation)" in text


def test_without_fidelity_nothing_is_saved() -> None:
    from mergeopt.report import evaluation_cost

    search = evaluation_cost([create_trial(values=[0.5, 4.0], user_attrs=cost(48, 200))])["search"]
    assert search["stopped"] == 0 and search["tokens_saved"] == 0
    assert search["fraction_saved"] == 0.0
