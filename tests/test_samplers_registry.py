"""The sampler registry: every name builds a sampler; bad options fail with one clear line."""

from __future__ import annotations

import subprocess
import sys

import optuna
import pytest

from mergeopt.errors import UserError
from mergeopt.genome import Genome
from mergeopt.samplers import SAMPLER_NAMES, create_sampler, validate_sampler_options

GENOME = Genome(num_blocks=3, num_experts=2, searched={"weight": (0.0, 1.0), "density": (0.1, 1.0)})


@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_every_registered_name_builds_an_optuna_sampler(name: str) -> None:
    sampler = create_sampler(name, {}, seed=0, genome=GENOME, num_objectives=2)
    assert isinstance(sampler, optuna.samplers.BaseSampler)


@pytest.mark.parametrize("name", ["random", "tpe", "nsga2", "model-level"])
def test_a_sampler_from_the_registry_runs_a_genome_study(name: str) -> None:
    sampler = create_sampler(name, {}, seed=1, genome=GENOME, num_objectives=2)
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=sampler)
    for _ in range(4):
        trial = study.ask(GENOME.distributions())
        study.tell(trial, [sum(trial.params.values()), 1.0])
    assert len(study.trials) == 4
    assert set(study.trials[0].params) == set(GENOME.param_names)


def test_options_are_passed_to_optuna_samplers() -> None:
    sampler = create_sampler("tpe", {"n_startup_trials": 3}, seed=0, genome=None, num_objectives=1)
    assert isinstance(sampler, optuna.samplers.TPESampler)
    assert sampler._n_startup_trials == 3


def test_unknown_name_is_a_user_error_listing_the_names() -> None:
    with pytest.raises(UserError, match="unknown sampler 'bogus'.*saasbo-qnehvi"):
        validate_sampler_options("bogus", {}, genome=GENOME, num_objectives=1)


def test_unknown_option_names_the_option_and_the_valid_ones() -> None:
    with pytest.raises(UserError, match=r"sampler.options.n_startup: .*n_startup_trials"):
        validate_sampler_options("tpe", {"n_startup": 3}, genome=GENOME, num_objectives=1)


def test_seed_is_not_an_option() -> None:
    with pytest.raises(UserError, match="sampler.options.seed"):
        validate_sampler_options("random", {"seed": 3}, genome=GENOME, num_objectives=1)


def test_bad_option_value_is_one_line() -> None:
    with pytest.raises(UserError) as info:
        validate_sampler_options("model-level", {"mode": "spiral"}, genome=GENOME, num_objectives=1)
    assert "mode" in str(info.value) and "\n" not in str(info.value)


def test_importing_the_registry_imports_neither_torch_nor_botorch() -> None:
    code = (
        "import sys, mergeopt.samplers as s; s.validate_sampler_options('saasbo-qnehvi', {}, "
        "genome=None, num_objectives=2); s.validate_sampler_options('cmaes', {}, genome=None, "
        "num_objectives=2); print('torch' in sys.modules, 'botorch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
