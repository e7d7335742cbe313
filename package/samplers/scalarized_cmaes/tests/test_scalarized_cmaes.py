"""Run from the registry root (the folder that holds ``package/``): ``pytest package/samplers/
scalarized_cmaes/tests``. mergeopt's CI runs the same checks in tests/test_optunahub_packages.py."""

from __future__ import annotations

import optuna
import optunahub

module = optunahub.load_local_module(package="samplers/scalarized_cmaes", registry_root="package/")


def objective(trial: optuna.Trial) -> tuple[float, float]:
    x = [trial.suggest_float(f"x{i}", 0.0, 1.0) for i in range(3)]
    return sum((v - 0.25) ** 2 for v in x), sum((v - 0.75) ** 2 for v in x)


def test_a_multi_objective_study_is_sampled_by_cmaes_generations() -> None:
    sampler = module.ScalarizedCmaEsSampler(popsize=4, seed=0)
    study = optuna.create_study(directions=["minimize", "minimize"], sampler=sampler)
    study.optimize(objective, n_trials=13)
    complete = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(complete) == 13
    # trial 0 (search space still unknown) is random; then generations 0, 1, 2 of 4 each
    generations = [t.user_attrs.get("mergeopt:cmaes:generation") for t in complete[1:]]
    assert generations == [0] * 4 + [1] * 4 + [2] * 4
