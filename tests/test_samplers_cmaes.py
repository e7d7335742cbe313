"""CMA-ES: Sakana defaults, scalarized objectives, generations shared by workers, JSON state
that survives a killed worker (the run resumes at the same generation)."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import time
from pathlib import Path

import numpy as np
import optuna
import pytest
from optuna.storages import RDBStorage, RetryFailedTrialCallback
from optuna.trial import TrialState

from mergeopt.genome import Genome
from mergeopt.samplers._state import UnitCube, read_json_state
from mergeopt.samplers.cmaes import GENERATION_ATTR, INDEX_ATTR, STATE_KEY, ScalarizedCmaEsSampler

GENOME = Genome(num_blocks=3, num_experts=1, searched={"weight": (0.0, 1.0), "density": (0.0, 1.0)})


def _sphere(params: dict[str, float]) -> float:
    return float(sum((value - 0.3) ** 2 for value in params.values()))


def test_first_generation_follows_sakana_defaults() -> None:
    study = optuna.create_study(sampler=ScalarizedCmaEsSampler(seed=0, genome=GENOME))
    trial = study.ask(GENOME.distributions())
    state = read_json_state(study, STATE_KEY)
    assert state is not None
    assert state["popsize"] == 4 + int(np.floor(3 * np.log(6)))  # 9 for 6 dimensions
    assert state["mean"] == [0.5] * 6
    assert state["sigma"] == pytest.approx(1 / 6)
    assert state["generation"] == 0
    # The rest of the generation is queued for other workers, marked with generation and index.
    waiting = study.get_trials(states=(TrialState.WAITING,))
    assert len(waiting) == state["popsize"] - 1
    assert sorted(t.user_attrs[INDEX_ATTR] for t in waiting) == list(range(1, state["popsize"]))
    assert study.trials[trial.number].user_attrs == {GENERATION_ATTR: 0, INDEX_ATTR: 0}
    json.dumps(state)  # plain JSON, nothing pickled


def test_cmaes_minimizes_a_sphere_in_the_unit_cube() -> None:
    study = optuna.create_study(sampler=ScalarizedCmaEsSampler(seed=1, genome=GENOME))
    study.optimize(
        lambda t: _sphere({n: t.suggest_float(n, 0, 1) for n in GENOME.param_names}), n_trials=180
    )
    assert study.best_value < 1e-2  # from 0.24 at the start (x0 = 0.5)
    generations = [t.user_attrs[GENERATION_ATTR] for t in study.trials]
    assert generations == sorted(generations)  # one generation is told before the next


@pytest.mark.parametrize("scalarization", ["weighted", "chebyshev"])
def test_two_objectives_are_scalarized_with_directions(scalarization: str) -> None:
    sampler = ScalarizedCmaEsSampler(
        seed=2, genome=GENOME, scalarization=scalarization, weights=[0.5, 0.5], num_objectives=2
    )
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=sampler)

    def objective(trial: optuna.Trial) -> tuple[float, float]:
        params = {n: trial.suggest_float(n, 0, 1) for n in GENOME.param_names}
        return -_sphere(params), _sphere(params) + 0.1

    study.optimize(objective, n_trials=135)
    assert max(t.values[0] for t in study.trials) > -0.01


def test_failed_individuals_are_penalized_and_the_run_goes_on() -> None:
    study = optuna.create_study(sampler=ScalarizedCmaEsSampler(seed=3, genome=GENOME))

    def objective(trial: optuna.Trial) -> float:
        params = {n: trial.suggest_float(n, 0, 1) for n in GENOME.param_names}
        if params["b00.e0.weight"] > 0.6:
            raise RuntimeError("merge failed")
        return _sphere(params)

    study.optimize(objective, n_trials=90, catch=(RuntimeError,))
    assert read_json_state(study, STATE_KEY)["generation"] >= 9
    assert any(t.state == TrialState.FAIL for t in study.trials)


def test_wrong_number_of_weights_is_rejected() -> None:
    with pytest.raises(ValueError, match="one value per objective"):
        ScalarizedCmaEsSampler(weights=[1.0], num_objectives=2)


def _worker(url: str, name: str, n_trials: int) -> None:
    storage = RDBStorage(
        url,
        heartbeat_interval=1,
        grace_period=2,
        failed_trial_callback=RetryFailedTrialCallback(max_retry=3),
        engine_kwargs={"connect_args": {"timeout": 60}},
    )
    study = optuna.load_study(
        study_name=name,
        storage=storage,
        # The kill may hit while this worker holds the generation lock: let it expire soon.
        sampler=ScalarizedCmaEsSampler(seed=5, genome=GENOME, lock_ttl_seconds=5.0),
    )

    def objective(trial: optuna.Trial) -> float:
        params = {n: trial.suggest_float(n, 0, 1) for n in GENOME.param_names}
        time.sleep(0.3)
        return _sphere(params)

    study.optimize(objective, n_trials=n_trials)


@pytest.mark.slow
def test_a_run_killed_mid_generation_resumes_at_the_same_generation(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'cma.db'}"
    optuna.create_study(study_name="cma", storage=url)
    context = multiprocessing.get_context("spawn")
    first = context.Process(target=_worker, args=(url, "cma", 1000))
    first.start()
    study = optuna.load_study(study_name="cma", storage=url)
    deadline = time.time() + 120
    while time.time() < deadline:
        state = read_json_state(study, STATE_KEY)
        done = [
            t
            for t in study.get_trials(states=(TrialState.COMPLETE,))
            if state and t.user_attrs.get(GENERATION_ATTR) == state["generation"] == 1
        ]
        if len(done) >= 3:
            break
        time.sleep(0.05)
    os.kill(first.pid, signal.SIGKILL)  # mid-trial, mid-generation
    first.join()
    killed_state = read_json_state(study, STATE_KEY)
    assert killed_state["generation"] == 1
    unfinished = [
        t
        for t in study.get_trials(states=(TrialState.RUNNING, TrialState.WAITING))
        if t.user_attrs.get(GENERATION_ATTR) == 1
    ]
    assert unfinished, "the kill must leave part of generation 1 unevaluated"

    second = context.Process(target=_worker, args=(url, "cma", 12))
    second.start()
    second.join(300)
    if second.exitcode is None:
        second.kill()
    assert second.exitcode == 0
    resumed = read_json_state(study, STATE_KEY)
    assert resumed["generation"] == 2  # generation 1 was finished, then told, not restarted

    # Every individual of generation 1 was evaluated at exactly the point stored before the kill.
    cube = UnitCube(GENOME.distributions())
    generation_one = [
        t
        for t in study.get_trials(states=(TrialState.COMPLETE,))
        if t.user_attrs.get(GENERATION_ATTR) == 1
    ]
    indices = sorted(t.user_attrs[INDEX_ATTR] for t in generation_one)
    assert indices == list(range(killed_state["popsize"]))
    for trial in generation_one:
        expected = killed_state["individuals"][trial.user_attrs[INDEX_ATTR]]
        np.testing.assert_allclose(cube.to_unit(trial.params), expected, atol=1e-12)
    assert resumed["mean"] != killed_state["mean"]


@pytest.mark.timeout(120)
def test_a_trial_orphaned_before_its_first_heartbeat_does_not_stall_the_generation(
    tmp_path: Path,
) -> None:
    """``study.optimize`` starts a trial's heartbeat only after ``ask`` returns; a worker killed
    in between leaves a RUNNING trial that never beat, which Optuna never fails as stale. The
    waiting sampler starts its clock, so it is failed, retried and the generation completes."""
    storage = RDBStorage(
        f"sqlite:///{tmp_path / 'cma.db'}",
        heartbeat_interval=1,
        grace_period=1,
        failed_trial_callback=RetryFailedTrialCallback(max_retry=3),
    )
    sampler = ScalarizedCmaEsSampler(seed=7, genome=GENOME, lock_ttl_seconds=5.0)
    study = optuna.create_study(storage=storage, sampler=sampler)
    distributions = GENOME.distributions()
    with pytest.warns(UserWarning, match="Heartbeat"):
        first = study.ask(distributions)
        study.tell(first, _sphere(first.params))
        orphan = study.ask(distributions)  # popped from the queue, never beaten nor told
    popsize = read_json_state(study, STATE_KEY)["popsize"]

    def objective(trial: optuna.Trial) -> float:
        return _sphere({n: trial.suggest_float(n, 0, 1) for n in GENOME.param_names})

    study.optimize(objective, n_trials=popsize, timeout=60)
    assert study._storage.get_trial(orphan._trial_id).state == TrialState.FAIL
    assert read_json_state(study, STATE_KEY)["generation"] >= 1
