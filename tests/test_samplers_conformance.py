"""Optuna's reusable sampler test suite (optuna.testing.pytest_samplers) on mergeopt's samplers.

Each custom sampler models the numerical part of a search space and samples the rest (and
anything outside the relative space) with Optuna's RandomSampler, so every basic, relative and
multi-objective case applies. ``SingleOnlySamplerTestCase`` does not apply: all three samplers
support several objectives.

Skipped for CMA-ES only, because a CMA-ES generation is enqueued by design (its members arrive
as WAITING trials with all params fixed): ``test_trial_relative_params`` (asserts every trial
asks the sampler for relative params), ``test_partial_fixed_sampling`` (enqueued members bypass
PartialFixedSampler), ``test_single_parameter_objective`` and
``test_combination_of_different_distributions_objective`` (assert ``len(study.trials) ==
n_trials``, but the queued rest of the generation adds WAITING trials). SAASBO runs every case
with ``batch_size=1``, where nothing is enqueued.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from optuna.samplers import BaseSampler
from optuna.testing.pytest_samplers import (
    BasicSamplerTestCase,
    MultiObjectiveSamplerTestCase,
    RelativeSamplerTestCase,
)

from mergeopt.samplers.cmaes import ScalarizedCmaEsSampler
from mergeopt.samplers.model_level import ModelLevelSampler
from mergeopt.samplers.saasbo import SaasQnehviSampler


class TestModelLevelRandom(
    BasicSamplerTestCase, RelativeSamplerTestCase, MultiObjectiveSamplerTestCase
):
    @pytest.fixture
    def sampler(self) -> Callable[[], BaseSampler]:
        return lambda: ModelLevelSampler(mode="random", seed=0)


class TestModelLevelGrid(
    BasicSamplerTestCase, RelativeSamplerTestCase, MultiObjectiveSamplerTestCase
):
    @pytest.fixture
    def sampler(self) -> Callable[[], BaseSampler]:
        # 64 points per parameter: a smaller grid is exhausted within the suite's 10-20 trials
        # and then (by design) stops study.optimize early.
        return lambda: ModelLevelSampler(mode="grid", grid_points=64, seed=0)


class TestCmaEs(BasicSamplerTestCase, RelativeSamplerTestCase, MultiObjectiveSamplerTestCase):
    @pytest.fixture
    def sampler(self) -> Callable[[], BaseSampler]:
        return lambda: ScalarizedCmaEsSampler(seed=0, popsize=4)

    @pytest.mark.parametrize("n_jobs", [1, 2])
    def test_trial_relative_params(self, n_jobs: int, sampler: Callable[[], BaseSampler]) -> None:
        pytest.skip("a CMA-ES generation is enqueued with fixed params by design (docstring)")

    def test_partial_fixed_sampling(self, sampler: Callable[[], BaseSampler]) -> None:
        pytest.skip("enqueued generation members bypass PartialFixedSampler by design")

    def test_single_parameter_objective(self, *args: object, **kwargs: object) -> None:
        pytest.skip("asserts len(study.trials) == n_trials; queued generation members add trials")

    def test_combination_of_different_distributions_objective(
        self, *args: object, **kwargs: object
    ) -> None:
        pytest.skip("asserts len(study.trials) == n_trials; queued generation members add trials")


class TestSaasQnehvi(BasicSamplerTestCase, RelativeSamplerTestCase, MultiObjectiveSamplerTestCase):
    @pytest.fixture
    def sampler(self) -> Callable[[], BaseSampler]:
        # Two design points, then the model path (fit + acquisition) with a small budget.
        return lambda: SaasQnehviSampler(
            seed=0,
            n_startup_trials=2,
            batch_size=1,
            num_restarts=1,
            raw_samples=16,
            maxiter=10,
            mc_samples=16,
            num_threads=1,
        )
