"""Optuna's reusable sampler test suite (optuna.testing.pytest_samplers) on mergeopt's samplers.

Each custom sampler models the numerical part of a search space and samples the rest (and
anything outside the relative space) with Optuna's RandomSampler, so every basic, relative and
multi-objective case applies. ``SingleOnlySamplerTestCase`` does not apply: every sampler here
supports several objectives. ``tpe`` (Optuna's TPE reading the study once per trial) samples
independently and takes the basic and multi-objective cases.

Every case runs for every sampler, with no skip: CMA-ES hands out its generation's members
from its state in the study (nothing enqueued), so ``study.optimize(n_trials=N)`` leaves exactly
N trials, every trial asks the sampler, and ``PartialFixedSampler`` fixes what it is given.
SAASBO runs with ``batch_size=1``, where nothing is enqueued.
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
from mergeopt.samplers.tpe import TPESampler


class TestTpeReadingOncePerTrial(BasicSamplerTestCase, MultiObjectiveSamplerTestCase):
    # Independent sampling (TPE's default): sample_relative proposes nothing, so the relative
    # cases, which expect every parameter from it, are not TPE's.
    @pytest.fixture
    def sampler(self) -> Callable[[], BaseSampler]:
        return lambda: TPESampler(seed=0, n_startup_trials=2)


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
