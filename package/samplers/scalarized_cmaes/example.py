"""Scalarized CMA-ES on a two-objective problem, Chebyshev scalarization with equal weights."""

from __future__ import annotations

import optuna
import optunahub


def objective(trial: optuna.Trial) -> tuple[float, float]:
    x = [trial.suggest_float(f"x{i}", 0.0, 1.0) for i in range(4)]
    f1 = sum((v - 0.25) ** 2 for v in x)
    f2 = sum((v - 0.75) ** 2 for v in x)
    return f1, f2


if __name__ == "__main__":
    module = optunahub.load_module("samplers/scalarized_cmaes")
    sampler = module.ScalarizedCmaEsSampler(scalarization="chebyshev", weights=[0.5, 0.5], seed=0)
    study = optuna.create_study(directions=["minimize", "minimize"], sampler=sampler)
    study.optimize(objective, n_trials=40)
    best = min(study.best_trials, key=lambda t: max(t.values))
    print(f"most balanced trial {best.number}: {[round(v, 4) for v in best.values]}")
