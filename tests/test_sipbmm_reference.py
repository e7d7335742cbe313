"""scripts/sipbmm_reference.py: the optimizer SIPBMM and AP-BMM released, a benchmark baseline."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import optuna
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from sipbmm_reference import (  # noqa: E402 - a script folder, not a package
    SipbmmReferenceSampler,
    frontier_gap_reward,
    lengthscales_by_rank,
    select_gap_aware,
)


def test_lengthscales_follow_the_importance_rank_in_four_tiers() -> None:
    importance = np.linspace(1.0, 0.0, 21)  # index 0 most important
    scales = lengthscales_by_rank(importance)
    assert scales[0] == 0.5 and scales[3] == 0.5  # rank ratio <= 0.15
    assert scales[4] == 1.0 and scales[8] == 1.0  # <= 0.40
    assert scales[9] == 2.0 and scales[14] == 2.0  # <= 0.70
    assert scales[15] == 5.0 and scales[20] == 5.0
    assert lengthscales_by_rank(importance[::-1]).tolist() == scales[::-1].tolist()


def test_the_gap_reward_is_highest_in_the_largest_gap_of_the_front() -> None:
    front = np.array([[0.0, 1.0], [0.1, 0.9], [1.0, 0.0]])  # a big gap between rows 1 and 2
    candidates = np.array([[0.55, 0.45], [0.05, 0.95], [5.0, 5.0]])
    reward = frontier_gap_reward(candidates, front)
    assert reward[0] > reward[1] > reward[2]
    assert frontier_gap_reward(candidates, front[:1]).tolist() == [0.0, 0.0, 0.0]


def test_re_ranking_prefers_the_gap_and_avoids_pending_and_chosen_points() -> None:
    observed = np.array([[0.0, 1.0], [1.0, 0.0]])
    candidates = np.array([[0.2, 0.2], [0.21, 0.2], [0.9, 0.9], [0.5, 0.5]])
    acquisition = np.array([1.0, 0.98, 0.97, 0.5])  # scaled: 1, 0.96, 0.94, 0
    means = np.full((4, 2), 0.5)  # one gap reward for all
    # Without pending points the best acquisition goes first; its near twin is then penalized.
    assert select_gap_aware(candidates, acquisition, means, observed, 2, None) == [0, 2]
    # A pending point next to both twins pushes the distant candidate first.
    pending = np.array([[0.2, 0.21]])
    assert select_gap_aware(candidates, acquisition, means, observed, 1, pending) == [2]
    assert select_gap_aware(candidates, acquisition, means, observed, 1, None) == [0]


@pytest.mark.parametrize("rerank", [False, True], ids=["sipbmm", "ap-bmm"])
def test_the_baseline_runs_batches_of_four_from_optuna(rerank: bool) -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = SipbmmReferenceSampler(  # a cheap acquisition for the test
        seed=0,
        n_startup_trials=4,
        batch_size=4,
        rerank=rerank,
        num_restarts=1,
        raw_samples=16,
        mc_samples=16,
    )
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=sampler)
    study.set_user_attr("mergeopt:block_importance", [1.0, 0.1, 0.5])
    space = {f"b{i:02d}.e0.weight": optuna.distributions.FloatDistribution(0, 1) for i in range(3)}
    for _ in range(2):  # 4 asks, then 4 tells, as four workers would
        trials = [study.ask(space) for _ in range(4)]
        for trial in trials:
            x = np.array(list(trial.params.values()))
            study.tell(trial, [-float(np.sum((x - 0.3) ** 2)), float(np.sum((x - 0.7) ** 2))])
    assert len(study.trials) == 8
    proposed = [t.params for t in study.trials[4:]]  # the first model-based batch
    assert all(set(params) == set(space) for params in proposed)
    assert all(0.0 <= v <= 1.0 for params in proposed for v in params.values())
