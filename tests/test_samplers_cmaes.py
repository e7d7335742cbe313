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

from mergeopt import attrs
from mergeopt.genome import Genome
from mergeopt.samplers._state import UnitCube, read_json_state
from mergeopt.samplers.cmaes import (
    DRAW_ATTR,
    GENERATION_ATTR,
    INDEX_ATTR,
    STATE_KEY,
    ScalarizedCmaEsSampler,
)

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
    # The whole generation is drawn into the state; the trial holds its first individual and
    # nothing is enqueued for the rest.
    assert len(state["individuals"]) == state["popsize"]
    assert len(study.trials) == 1
    assert study.trials[trial.number].user_attrs == {GENERATION_ATTR: 0, INDEX_ATTR: 0}
    cube = UnitCube(GENOME.distributions())
    np.testing.assert_allclose(cube.to_unit(trial.params), state["individuals"][0], atol=1e-12)
    json.dumps(state)  # plain JSON, nothing pickled


def test_each_new_trial_takes_the_next_individual_and_n_trials_means_n_trials() -> None:
    study = optuna.create_study(sampler=ScalarizedCmaEsSampler(seed=0, genome=GENOME))
    study.optimize(
        lambda t: _sphere({n: t.suggest_float(n, 0, 1) for n in GENOME.param_names}), n_trials=20
    )
    assert len(study.trials) == 20
    assert all(t.state == TrialState.COMPLETE for t in study.trials)
    members = [(t.user_attrs[GENERATION_ATTR], t.user_attrs[INDEX_ATTR]) for t in study.trials]
    assert members == [(g, i) for g in range(3) for i in range(9)][:20]
    assert read_json_state(study, STATE_KEY)["generation"] == 2


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_partial_fixed_sampler_fixes_a_parameter_of_a_generation_member() -> None:
    sampler = ScalarizedCmaEsSampler(seed=0, genome=GENOME)
    study = optuna.create_study(
        sampler=optuna.samplers.PartialFixedSampler({"b01.e0.weight": 0.25}, sampler)
    )
    study.optimize(
        lambda t: _sphere({n: t.suggest_float(n, 0, 1) for n in GENOME.param_names}), n_trials=12
    )
    assert len(study.trials) == 12
    assert all(t.params["b01.e0.weight"] == 0.25 for t in study.trials)
    # CMA-ES searches the other five parameters, in generations of 4 + floor(3 ln 5) = 8.
    state = read_json_state(study, STATE_KEY)
    assert "b01.e0.weight" not in state["param_names"] and len(state["param_names"]) == 5
    assert [t.user_attrs[GENERATION_ATTR] for t in study.trials] == [0] * 8 + [1] * 4


def test_the_same_seed_draws_the_same_generations() -> None:
    def run(seed: int) -> list[list[float]]:
        study = optuna.create_study(sampler=ScalarizedCmaEsSampler(seed=seed, genome=GENOME))
        study.optimize(
            lambda t: _sphere({n: t.suggest_float(n, 0, 1) for n in GENOME.param_names}),
            n_trials=27,
        )
        return [list(t.params.values()) for t in study.trials]

    first = run(4)
    assert run(4) == first
    assert run(5) != first
    # Each generation draws from its own stream: generation 1 does not repeat generation 0's
    # standard-normal draws.
    cube = UnitCube(GENOME.distributions())
    steps = [cube.to_unit(dict(zip(GENOME.param_names, p, strict=True))) - 0.5 for p in first]
    assert not np.allclose(np.sign(steps[0:9]), np.sign(steps[9:18]))


def test_a_given_back_individual_is_handed_out_again() -> None:
    """A trial closed unevaluated (``mergeopt:given_back``: surplus, interrupted, taken over)
    frees its individual: the next trial gets the same point."""
    study = optuna.create_study(sampler=ScalarizedCmaEsSampler(seed=6, genome=GENOME))
    distributions = GENOME.distributions()
    first = study.ask(distributions)
    first.set_user_attr(attrs.GIVEN_BACK, True)
    study.tell(first, state=TrialState.FAIL)
    again = study.ask(distributions)
    assert again.params == first.params
    assert study.trials[again.number].user_attrs == {GENERATION_ATTR: 0, INDEX_ATTR: 0}
    study.tell(again, _sphere(again.params))
    after = study.ask(distributions)
    assert study.trials[after.number].user_attrs == {GENERATION_ATTR: 0, INDEX_ATTR: 1}


def test_asking_more_trials_than_a_generation_before_telling_gives_distinct_extra_draws() -> None:
    study = optuna.create_study(sampler=ScalarizedCmaEsSampler(seed=0, popsize=4, genome=GENOME))
    trials = [study.ask(GENOME.distributions()) for _ in range(7)]
    assert [study.trials[t.number].user_attrs[INDEX_ATTR] for t in trials] == [0, 1, 2, 3] + [
        -1
    ] * 3
    points = {tuple(t.params.values()) for t in trials}
    assert len(points) == 7
    for trial in trials:
        study.tell(trial, _sphere(trial.params))
    # The extra draws are not told: generation 0 is told once, from its 4 members.
    after = study.ask(GENOME.distributions())
    assert study.trials[after.number].user_attrs == {GENERATION_ATTR: 1, INDEX_ATTR: 0}


def test_a_generation_in_which_every_individual_failed_is_drawn_again() -> None:
    study = optuna.create_study(sampler=ScalarizedCmaEsSampler(seed=0, popsize=4, genome=GENOME))
    failed = []
    for _ in range(4):
        trial = study.ask(GENOME.distributions())
        study.tell(trial, state=TrialState.FAIL)
        failed.append(trial.params)
    redrawn = [study.ask(GENOME.distributions()) for _ in range(4)]
    state = read_json_state(study, STATE_KEY)
    assert (state["generation"], state["draw"]) == (0, 1)
    # The whole new draw is handed out (the failed trials of draw 0 hold none of it).
    assert [study.trials[t.number].user_attrs for t in redrawn] == [
        {GENERATION_ATTR: 0, INDEX_ATTR: i, DRAW_ATTR: 1} for i in range(4)
    ]
    assert not any(t.params in failed for t in redrawn)
    for trial in redrawn:
        study.tell(trial, _sphere(trial.params))
    after = study.ask(GENOME.distributions())
    assert study.trials[after.number].user_attrs == {GENERATION_ATTR: 1, INDEX_ATTR: 0}


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


def _pool_worker(url: str, name: str, n_trials: int) -> None:
    study = optuna.load_study(
        study_name=name,
        storage=url,
        sampler=ScalarizedCmaEsSampler(seed=8, popsize=6, genome=GENOME, lock_ttl_seconds=5.0),
    )

    def objective(trial: optuna.Trial) -> float:
        params = {n: trial.suggest_float(n, 0, 1) for n in GENOME.param_names}
        trial.set_user_attr("pid", os.getpid())
        time.sleep(0.3)
        return _sphere(params)

    study.optimize(objective, n_trials=n_trials)


@pytest.mark.slow
@pytest.mark.postgres
def test_workers_on_one_database_evaluate_each_generation_together(postgres_url: str) -> None:
    """Three processes, each ``study.optimize(n_trials=8)`` on one PostgreSQL study: 24 trials,
    none enqueued; each generation of 6 is shared by the workers, and each of its individuals
    is evaluated exactly once before the generation is told."""
    name = f"cma-pool-{os.getpid()}"
    optuna.create_study(study_name=name, storage=postgres_url)
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_pool_worker, args=(postgres_url, name, 8)) for _ in range(3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(300)
        if worker.exitcode is None:
            worker.kill()
    assert [worker.exitcode for worker in workers] == [0, 0, 0]

    study = optuna.load_study(study_name=name, storage=postgres_url)
    trials = study.get_trials()
    assert len(trials) == 24
    assert all(t.state == TrialState.COMPLETE for t in trials)
    members = sorted((t.user_attrs[GENERATION_ATTR], t.user_attrs[INDEX_ATTR]) for t in trials)
    assert members == [(g, i) for g in range(4) for i in range(6)]
    # Generations 0-2 were told; generation 3 is told when a trial next asks.
    assert read_json_state(study, STATE_KEY)["generation"] == 3
    for generation in range(4):
        pids = {t.user_attrs["pid"] for t in trials if t.user_attrs[GENERATION_ATTR] == generation}
        assert len(pids) >= 2, f"generation {generation} was evaluated by one worker only"


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
    evaluated = [
        t
        for t in study.get_trials(states=(TrialState.COMPLETE,))
        if t.user_attrs.get(GENERATION_ATTR) == 1
    ]
    assert len(evaluated) < killed_state["popsize"], "the kill must leave part of generation 1"
    assert not study.get_trials(states=(TrialState.WAITING,))  # nothing was enqueued

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

    # Bit-identical to a run that was never killed: the same individuals, told in index order.
    reference = optuna.create_study(sampler=ScalarizedCmaEsSampler(seed=5, genome=GENOME))
    reference.optimize(
        lambda t: _sphere({n: t.suggest_float(n, 0, 1) for n in GENOME.param_names}),
        n_trials=2 * killed_state["popsize"] + 1,
    )
    assert read_json_state(reference, STATE_KEY) == resumed


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
        orphan = study.ask(distributions)  # holds individual 1, never beaten nor told
    popsize = read_json_state(study, STATE_KEY)["popsize"]

    def objective(trial: optuna.Trial) -> float:
        return _sphere({n: trial.suggest_float(n, 0, 1) for n in GENOME.param_names})

    study.optimize(objective, n_trials=popsize, timeout=60)
    assert study._storage.get_trial(orphan._trial_id).state == TrialState.FAIL
    assert read_json_state(study, STATE_KEY)["generation"] >= 1
