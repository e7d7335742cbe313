"""SAASBO + qLogNEHVI: initial design, importance prior mapping, batches handed to workers,
pending points, and 4 worker processes on one PostgreSQL study without duplicated candidates."""

from __future__ import annotations

import math
import multiprocessing
import uuid

import numpy as np
import optuna
import pytest
from optuna.trial import TrialState

from mergeopt.genome import Genome
from mergeopt.samplers.saasbo import (
    ACQ_SECONDS_ATTR,
    FIT_SECONDS_ATTR,
    SaasQnehviSampler,
    parse_initial_solutions,
)
from mergeopt.samplers.saasbo_acquisition import derived_reference_point
from mergeopt.samplers.saasbo_gp import (
    fit_map_model,
    inverse_lengthscale_scales,
    lengthscale_prior_locations,
)

GENOME = Genome(num_blocks=5, num_experts=2, searched={"weight": (0.0, 1.0), "density": (0.1, 1.0)})
FAST = {"num_restarts": 2, "raw_samples": 32, "maxiter": 20, "mc_samples": 32, "num_threads": 1}


def _objective(params: dict[str, float]) -> tuple[float, float]:
    x = np.array([params[n] for n in GENOME.param_names])
    return -float(np.sum((x[:3] - 0.7) ** 2)), -float(np.sum((x[:3] - 0.2) ** 2))


def test_custom_initial_solutions_are_broadcast_to_every_block_and_expert() -> None:
    sampler = SaasQnehviSampler(custom_initial_solutions=["0.55,0.8", "0.3,0.9"], genome=GENOME)
    study = optuna.create_study(directions=["maximize", "maximize"], sampler=sampler)
    first = study.ask(GENOME.distributions())
    second = study.ask(GENOME.distributions())
    assert {v for n, v in first.params.items() if n.endswith("weight")} == {0.55}
    assert {v for n, v in first.params.items() if n.endswith("density")} == {0.8}
    assert {v for n, v in second.params.items() if n.endswith("weight")} == {0.3}


def test_design_starts_with_each_expert_alone_then_sobol() -> None:
    study = optuna.create_study(sampler=SaasQnehviSampler(seed=0, genome=GENOME))
    asked = [study.ask(GENOME.distributions()).params for _ in range(3)]
    assert asked[:2] == [GENOME.expert_alone(0), GENOME.expert_alone(1)]
    assert asked[2] not in asked[:2]


def test_design_skips_the_experts_the_study_enqueued() -> None:
    study = optuna.create_study(sampler=SaasQnehviSampler(seed=0, genome=GENOME))
    study.enqueue_trial(GENOME.expert_alone(1))
    asked = [study.ask(GENOME.distributions()).params for _ in range(3)]
    assert asked[:2] == [GENOME.expert_alone(1), GENOME.expert_alone(0)]
    assert asked[2] not in asked[:2]


@pytest.mark.slow
def test_a_study_without_enqueued_experts_runs_exactly_as_one_with_them() -> None:
    """The experts come on top of n_startup_trials, so the design, the first fit's data and
    every later candidate are the same as with ``enqueue_experts`` and no expert design."""

    def run(sampler: SaasQnehviSampler, enqueue: bool) -> list[optuna.trial.FrozenTrial]:
        study = optuna.create_study(directions=["maximize", "maximize"], sampler=sampler)
        if enqueue:
            for expert in range(2):
                study.enqueue_trial(GENOME.expert_alone(expert))
        for _ in range(9):
            trial = study.ask(GENOME.distributions())
            study.tell(trial, list(_objective(trial.params)))
        return study.trials

    options = {"seed": 0, "genome": GENOME, "n_startup_trials": 3, "batch_size": 2, **FAST}
    with_design = run(SaasQnehviSampler(**options), enqueue=False)
    enqueued = run(SaasQnehviSampler(expert_design=False, **options), enqueue=True)
    assert [t.params for t in with_design] == [t.params for t in enqueued]
    assert with_design[0].params == GENOME.expert_alone(0)
    assert any(ACQ_SECONDS_ATTR in t.user_attrs for t in with_design[5:])  # fitted, same points


def test_the_expert_design_hands_out_a_point_shared_by_the_experts_once() -> None:
    """Density searched, weight fixed: every expert's point is density at its upper bound
    everywhere; evaluating it once per expert would repeat one merge."""
    genome = Genome(num_blocks=2, num_experts=3, searched={"density": (0.1, 1.0)})
    sampler = SaasQnehviSampler(seed=0, genome=genome, n_startup_trials=3)
    study = optuna.create_study(directions=["maximize", "maximize"], sampler=sampler)
    points = []
    for _ in range(4):
        trial = study.ask(genome.distributions())
        points.append(trial.params)
        study.tell(trial, [0.5, 0.5])
    assert points[0] == genome.expert_alone(0)
    assert all(point != points[0] for point in points[1:])


def test_without_expert_design_the_design_is_sobol_only() -> None:
    sampler = SaasQnehviSampler(seed=0, genome=GENOME, expert_design=False)
    study = optuna.create_study(sampler=sampler)
    first = study.ask(GENOME.distributions()).params
    assert first not in [GENOME.expert_alone(0), GENOME.expert_alone(1)]
    assert len(set(first.values())) > 2


def test_design_points_are_distinct_sobol_points() -> None:
    study = optuna.create_study(sampler=SaasQnehviSampler(seed=0, genome=GENOME))
    points = {tuple(study.ask(GENOME.distributions()).params.values()) for _ in range(8)}
    assert len(points) == 8


def test_bad_options_are_rejected_with_the_option_named() -> None:
    with pytest.raises(ValueError, match="batch_size"):
        SaasQnehviSampler(batch_size=0)
    with pytest.raises(ValueError, match="expert_design must be true or false"):
        SaasQnehviSampler(expert_design="false")  # a quoted YAML value: not silently True
    with pytest.raises(ValueError, match="custom_initial_solutions"):
        parse_initial_solutions("0.5,high")
    with pytest.raises(ValueError, match="one value per searched parameter"):
        SaasQnehviSampler(custom_initial_solutions="0.5", genome=GENOME)
    with pytest.raises(ValueError, match="ref_point"):
        SaasQnehviSampler(ref_point=[0.0], num_objectives=2)
    with pytest.raises(ValueError, match="ref_point_rule"):
        SaasQnehviSampler(ref_point_rule="nadir")


def test_reference_point_rules_step_back_from_the_worst_observed_or_front_values() -> None:
    import torch

    # maximization form: (3, 1) and (1, 3) are the front, (0, 0) is dominated
    y = torch.tensor([[3.0, 1.0], [1.0, 3.0], [0.0, 0.0]], dtype=torch.double)
    observed = derived_reference_point(y, "observed-worst")
    front = derived_reference_point(y, "pareto-nadir")
    torch.testing.assert_close(observed, torch.tensor([-0.3, -0.3], dtype=torch.double))
    torch.testing.assert_close(front, torch.tensor([0.8, 0.8], dtype=torch.double))
    # one Pareto point: the observed range stands in for the front's
    single = torch.tensor([[2.0, 2.0], [0.0, 1.0]], dtype=torch.double)
    torch.testing.assert_close(
        derived_reference_point(single, "pareto-nadir"),
        torch.tensor([1.8, 1.9], dtype=torch.double),
    )


def test_importance_prior_maps_importance_to_lengthscale_priors() -> None:
    importance = np.array([1.0, 0.5, 0.0])
    base = math.sqrt(2) + 0.5 * math.log(3)
    np.testing.assert_allclose(
        lengthscale_prior_locations(3, importance, strength=1.0), [base - 1, base, base + 1]
    )
    np.testing.assert_allclose(lengthscale_prior_locations(3, None, strength=1.0), [base] * 3)
    np.testing.assert_allclose(
        inverse_lengthscale_scales(importance, 1.0, 3), [math.e**2, 1.0, math.e**-2]
    )


def test_a_map_gp_can_be_restored_in_place_as_botorch_retries_a_failed_fit() -> None:
    import torch

    x = torch.rand(8, 3, dtype=torch.double, generator=torch.Generator().manual_seed(0))
    y = x.sum(dim=-1, keepdim=True)
    model = fit_map_model(x, y, lengthscale_prior_locations(3, None, 2.0), math.sqrt(3))
    # BoTorch's retry after a failed attempt writes the checkpoint back into every tensor
    for tensor in model.state_dict().values():
        tensor[...] = tensor.clone()


@pytest.mark.slow
def test_a_fit_makes_a_batch_queued_for_other_workers_conditioned_on_running_trials() -> None:
    sampler = SaasQnehviSampler(seed=0, genome=GENOME, n_startup_trials=6, batch_size=3, **FAST)
    study = optuna.create_study(directions=["maximize", "maximize"], sampler=sampler)
    study.set_user_attr("mergeopt:block_importance", [1.0, 0.2, 0.2, 0.2, 0.2])
    for _ in range(2 + 6):  # the design: each expert alone, then n_startup_trials points
        trial = study.ask(GENOME.distributions())
        study.tell(trial, list(_objective(trial.params)))
    running = study.ask(GENOME.distributions())  # the fitter's own candidate
    queued = study.get_trials(states=(TrialState.WAITING,))
    assert len(queued) == 2
    assert study.trials[running.number].user_attrs[ACQ_SECONDS_ATTR] > 0
    # The next asks pop the queued candidates instead of fitting again.
    popped = [study.ask(GENOME.distributions()) for _ in range(2)]
    assert {t.number for t in popped} == {t.number for t in queued}
    all_points = [tuple(t.params.values()) for t in [running, *popped]]
    assert len(set(all_points)) == 3


@pytest.mark.slow
def test_fast_map_mode_improves_on_the_design() -> None:
    sampler = SaasQnehviSampler(seed=1, genome=GENOME, n_startup_trials=8, **FAST)
    study = optuna.create_study(directions=["maximize", "maximize"], sampler=sampler)
    study.optimize(
        lambda t: _objective(
            {n: t.suggest_float(n, d.low, d.high) for n, d in GENOME.distributions().items()}
        ),
        n_trials=20,
    )
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    design = 2 + 8  # each expert alone, then n_startup_trials Sobol points
    design_best = max(t.values[0] + t.values[1] for t in complete[:design])
    model_best = max(t.values[0] + t.values[1] for t in complete[design:])
    assert model_best > design_best


WAITED_ATTR = "test:waited_seconds"


def _pg_worker(url: str, name: str, n_trials: int) -> None:
    import time

    # A worker's first fit also imports botorch (about 2 s, outside the timed fit); a running
    # worker has it imported, and that steady state is what the waiting bound is about.
    import botorch.acquisition.multi_objective.logei  # noqa: F401
    import botorch.models  # noqa: F401
    import botorch.optim  # noqa: F401

    from mergeopt.samplers import saasbo_acquisition

    # ... and its fused kernel loaded (the worker loop starts that at start-up; a first build
    # takes about 30 s, which no other worker should be seen waiting for)
    saasbo_acquisition.await_fused_kernel()

    sampler = SaasQnehviSampler(seed=0, genome=GENOME, n_startup_trials=8, batch_size=4, **FAST)
    study = optuna.load_study(study_name=name, storage=url, sampler=sampler)
    for _ in range(n_trials):
        fits_before = (sampler.last_fit_seconds, sampler.last_acquisition_seconds)
        started = time.perf_counter()
        trial = study.ask(GENOME.distributions())
        asked = time.perf_counter() - started
        fits_after = (sampler.last_fit_seconds, sampler.last_acquisition_seconds)
        # the time in ask not spent in this worker's own fit: waiting for another worker's
        own_fit = sum(fits_after) if fits_after != fits_before else 0.0
        trial.set_user_attr(WAITED_ATTR, max(0.0, asked - own_fit))
        time.sleep(0.05)  # a fast synthetic objective
        study.tell(trial, list(_objective(trial.params)))


@pytest.mark.slow
@pytest.mark.postgres
def test_four_workers_on_postgresql_never_evaluate_one_candidate_twice_nor_idle_past_a_fit(
    postgres_url: str,
) -> None:
    name = f"saasbo-{uuid.uuid4().hex[:8]}"
    optuna.create_study(study_name=name, storage=postgres_url, directions=["maximize", "maximize"])
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_pg_worker, args=(postgres_url, name, 4)) for _ in range(4)]
    try:
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(900)
            assert worker.exitcode == 0
        study = optuna.load_study(study_name=name, storage=postgres_url)
        evaluated = [t for t in study.trials if t.state == TrialState.COMPLETE]
        assert len(evaluated) == 16
        points = [tuple(t.params[n] for n in GENOME.param_names) for t in evaluated]
        assert len(set(points)) == len(points)
        # Some candidates came from one worker's fit and were evaluated by the others: popped
        # from the queue, or assigned to a waiting trial (a fitter's own trial is assigned its
        # candidate too, but never waited).
        assert any(
            t.system_attrs.get("fixed_params")
            or (
                t.system_attrs.get("mergeopt:saasbo:waiting")
                and t.system_attrs.get("mergeopt:saasbo:assigned")
            )
            for t in evaluated
        )
        # No worker waited for another's fit longer than one fit (plus the protocol's settle
        # and poll times and a second of scheduling slack on a loaded 2-core machine).
        fits = [
            t.user_attrs[FIT_SECONDS_ATTR] + t.user_attrs[ACQ_SECONDS_ATTR]
            for t in evaluated
            if FIT_SECONDS_ATTR in t.user_attrs
        ]
        assert fits, "no batch was fitted"
        longest_wait = max(t.user_attrs[WAITED_ATTR] for t in evaluated)
        assert longest_wait <= max(fits) + 0.25 + 0.2 + 1.0, (longest_wait, max(fits))
    finally:
        optuna.delete_study(study_name=name, storage=postgres_url)
