"""SAASBO + qLogNEHVI on a two-objective problem in 8 dimensions, of which 2 matter."""

from __future__ import annotations

import optuna
import optunahub


def objective(trial: optuna.Trial) -> tuple[float, float]:
    x = [trial.suggest_float(f"x{i}", 0.0, 1.0) for i in range(8)]
    # Only x0 and x1 move the front; the other six add a little noise-like slope.
    f1 = (x[0] - 0.2) ** 2 + (x[1] - 0.3) ** 2 + 0.01 * sum(x[2:])
    f2 = (x[0] - 0.8) ** 2 + (x[1] - 0.7) ** 2 + 0.01 * sum(x[2:])
    return f1, f2


if __name__ == "__main__":
    module = optunahub.load_module("samplers/saasbo_qnehvi")
    # 8 design points, then two fits that propose 4 candidates each: a fit and its
    # acquisition take seconds to a minute on a CPU, depending on its cores and their load.
    sampler = module.SaasQnehviSampler(n_startup_trials=8, batch_size=4, seed=0)
    study = optuna.create_study(directions=["minimize", "minimize"], sampler=sampler)
    study.optimize(objective, n_trials=16)
    print(f"{len(study.best_trials)} Pareto-optimal trials")
    for trial in study.best_trials:
        print(trial.number, [round(v, 4) for v in trial.values])
