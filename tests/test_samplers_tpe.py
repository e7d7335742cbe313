"""The ``tpe`` sampler is Optuna's TPE, proposing the same parameters while it reads the study
once per trial instead of once per parameter."""

from __future__ import annotations

from pathlib import Path

import optuna

from mergeopt.optuna_compat import storage_of
from mergeopt.samplers import create_sampler
from mergeopt.samplers.tpe import TPESampler

DISTRIBUTIONS = {f"w{i}": optuna.distributions.FloatDistribution(0.0, 1.0) for i in range(12)}


def asked_params(sampler: optuna.samplers.BaseSampler, url: str, trials: int) -> list[dict]:
    study = optuna.create_study(storage=url, directions=["maximize", "minimize"], sampler=sampler)
    asked = []
    for i in range(trials):
        trial = study.ask(DISTRIBUTIONS)
        asked.append(trial.params)
        study.tell(trial, [sum(trial.params.values()), float(i % 3)])
    return asked


def test_tpe_proposes_what_optunas_tpe_proposes(tmp_path: Path) -> None:
    ours = asked_params(TPESampler(seed=3, n_startup_trials=4), f"sqlite:///{tmp_path}/a.db", 10)
    optunas = asked_params(
        optuna.samplers.TPESampler(seed=3, n_startup_trials=4), f"sqlite:///{tmp_path}/b.db", 10
    )
    assert ours == optunas


def test_tpe_reads_the_trials_once_per_ask(tmp_path: Path) -> None:
    study = optuna.create_study(
        storage=f"sqlite:///{tmp_path}/s.db",
        directions=["maximize", "minimize"],
        sampler=TPESampler(seed=0, n_startup_trials=2),
    )
    for i in range(3):
        trial = study.ask(DISTRIBUTIONS)
        study.tell(trial, [float(i), float(i)])
    storage = storage_of(study)
    reads = []
    read = storage.get_all_trials
    storage.get_all_trials = lambda *a, **k: reads.append(k.get("states")) or read(*a, **k)  # type: ignore[method-assign]
    try:
        study.ask(DISTRIBUTIONS)
    finally:
        del storage.get_all_trials
    # For all 12 parameters: the finished trials (TPE's startup count) and those with the
    # running ones (constant_liar), plus study.ask's check for a waiting trial; Optuna's TPE
    # reads once more per parameter.
    assert len(reads) <= 3, reads


def test_the_spec_name_tpe_builds_it_with_optunas_options() -> None:
    sampler = create_sampler("tpe", {"n_startup_trials": 3}, seed=0, genome=None, num_objectives=2)
    assert isinstance(sampler, TPESampler)
    assert isinstance(sampler, optuna.samplers.TPESampler)


def test_tpe_pickles_after_sampling(tmp_path: Path) -> None:
    import pickle

    sampler = TPESampler(seed=0, n_startup_trials=1)
    asked_params(sampler, f"sqlite:///{tmp_path}/p.db", 3)
    restored = pickle.loads(pickle.dumps(sampler))
    assert isinstance(restored, TPESampler)
    assert "_snapshots" not in restored.__dict__  # thread-local, and only a cache
