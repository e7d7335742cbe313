"""Run from the registry root (the folder that holds ``package/``): ``pytest package/samplers/
saasbo_qnehvi/tests``. mergeopt's CI runs the same checks in tests/test_optunahub_packages.py."""

from __future__ import annotations

import optuna
import optunahub

module = optunahub.load_local_module(package="samplers/saasbo_qnehvi", registry_root="package/")

FAST = {"num_restarts": 2, "raw_samples": 32, "maxiter": 20, "mc_samples": 32, "num_threads": 1}


def objective(trial: optuna.Trial) -> tuple[float, float]:
    x = [trial.suggest_float(f"x{i}", 0.0, 1.0) for i in range(3)]
    return (x[0] - 0.2) ** 2 + x[2], (x[0] - 0.8) ** 2 + (x[1] - 0.5) ** 2


def test_a_multi_objective_study_is_sampled_by_the_model() -> None:
    sampler = module.SaasQnehviSampler(n_startup_trials=4, batch_size=2, seed=0, **FAST)
    study = optuna.create_study(directions=["minimize", "minimize"], sampler=sampler)
    study.optimize(objective, n_trials=9)
    complete = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(complete) == 9
    # trials 0-3 are the design (0 random: the search space is still unknown), 4-8 from fits
    fitted = [t.number for t in complete if "mergeopt:saasbo:fit_seconds" in t.user_attrs]
    assert fitted == [4, 5, 6, 7, 8]
