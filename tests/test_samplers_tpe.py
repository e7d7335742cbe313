"""The ``tpe`` sampler is Optuna's TPE, proposing the same parameters while it reads the study
once per trial instead of once per parameter."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

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


def ours_and_optunas(**options: object) -> tuple[TPESampler, optuna.samplers.TPESampler]:
    """mergeopt's TPE and Optuna's, built with the same options."""
    return TPESampler(**options), optuna.samplers.TPESampler(**options)  # type: ignore[arg-type]


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
    # For all 12 parameters: one read of every trial (TPE's startup count and its model,
    # running ones included for constant_liar), plus study.ask's check for a waiting trial;
    # Optuna's TPE reads once more per parameter.
    assert len(reads) <= 2, reads


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


def conditional_objective(trial: optuna.Trial) -> tuple[float, float] | float:
    """Mostly the same six parameters, but some trials ask for fewer (and fail, so TPE goes on
    modelling all six), in another order, with a categorical one in the middle or a log-scale
    one at the end: the batched pass (and its random state) must give what Optuna's TPE
    gives in every case."""
    names = [f"x{i}" for i in range(6)]
    if trial.number % 11 == 6:
        names.reverse()
    if trial.number % 7 == 3:
        names = names[:3]
    values = []
    for i, name in enumerate(names):
        if trial.number % 7 == 5 and i == 3:
            values.append(float(trial.suggest_categorical("kind", ["a", "b", "c"]) == "b"))
        values.append(trial.suggest_float(name, 0.0, 1.0))
    if trial.number % 7 == 3:
        raise ValueError("three of six parameters")
    if trial.number % 3 == 1:
        values.append(trial.suggest_float("rate", 1e-4, 1.0, log=True))
    first = sum(values)
    if len(trial.study.directions) == 1:
        return first
    return first, float(trial.number % 4) - values[0]


@pytest.mark.parametrize("directions", [["minimize"], ["maximize", "minimize"]])
@pytest.mark.parametrize("constant_liar", [True, False])
def test_tpe_matches_optunas_tpe_when_trials_ask_different_parameters(
    tmp_path: Path, directions: list[str], constant_liar: bool
) -> None:
    def run(sampler: optuna.samplers.BaseSampler, name: str) -> list[dict]:
        study = optuna.create_study(
            storage=f"sqlite:///{tmp_path}/{name}.db", directions=directions, sampler=sampler
        )
        study.optimize(conditional_objective, n_trials=30, catch=(ValueError,))
        return [trial.params for trial in study.trials]

    options = {"seed": 5, "n_startup_trials": 5, "constant_liar": constant_liar}
    assert run(TPESampler(**options), "ours") == run(optuna.samplers.TPESampler(**options), "o")


def test_tpe_log_scale_parameters_match_optunas_tpe(tmp_path: Path) -> None:
    space = {
        f"s{i}": optuna.distributions.FloatDistribution(1e-3, 10.0, log=True) for i in range(8)
    }
    asked = []
    for sampler in ours_and_optunas(seed=1, n_startup_trials=3):
        study = optuna.create_study(
            storage=f"sqlite:///{tmp_path}/{len(asked)}.db", sampler=sampler
        )
        params = []
        for _ in range(12):
            trial = study.ask(space)
            params.append(trial.params)
            study.tell(trial, sum(abs(v - 1.0) for v in trial.params.values()))
        asked.append(params)
    assert asked[0] == asked[1]


def test_tpe_samples_a_repeated_parameter_set_in_one_pass(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []
    per_parameter = optuna.samplers.TPESampler._sample
    monkeypatch.setattr(
        optuna.samplers.TPESampler,
        "_sample",
        lambda self, study, trial, space: (
            calls.append(trial.number) or per_parameter(self, study, trial, space)
        ),
    )
    asked_params(TPESampler(seed=0, n_startup_trials=3), f"sqlite:///{tmp_path}/s.db", 8)
    # Trial 3 is TPE's first (one pass per parameter; its order is learned); 4-7 are batched.
    assert calls == [3] * len(DISTRIBUTIONS)


def test_a_pickled_tpe_continues_as_optunas_after_a_trial_that_asked_fewer(
    tmp_path: Path,
) -> None:
    import pickle

    restored = []
    for sampler in ours_and_optunas(seed=2, n_startup_trials=2):
        study = optuna.create_study(
            storage=f"sqlite:///{tmp_path}/{len(restored)}.db", sampler=sampler
        )
        for i in range(5):
            trial = study.ask(DISTRIBUTIONS)
            study.tell(trial, float(i))
        trial = study.ask()
        trial.suggest_float("w0", 0.0, 1.0)  # one parameter of the twelve
        restored.append(pickle.loads(pickle.dumps(sampler))._rng.rng.get_state())
    ours, optunas = restored
    assert ours[2] == optunas[2]
    assert (ours[1] == optunas[1]).all()


@pytest.mark.parametrize("constant_liar", [True, False])
def test_a_trial_told_while_another_is_half_sampled_is_seen_as_optunas_tpe_sees_it(
    constant_liar: bool,
) -> None:
    def run(cls: type[optuna.samplers.TPESampler]) -> list[dict]:
        options = {"seed": 1, "n_startup_trials": 3, "multivariate": False}
        study = optuna.create_study(sampler=cls(constant_liar=constant_liar, **options))
        asked = []
        for _ in range(8):
            first = study.ask()
            x, y = first.suggest_float("x", 0, 1), first.suggest_float("y", 0, 1)
            second = study.ask()
            second.suggest_float("x", 0, 1)
            study.tell(first, (x - 0.2) ** 2 + (y - 0.8) ** 2)  # while `second` is half-asked
            second.suggest_float("y", 0, 1)
            study.tell(second, sum(second.params.values()))
            asked += [first.params, second.params]
        return asked

    assert run(TPESampler) == run(optuna.samplers.TPESampler)


def test_one_tpe_serving_two_studies_in_turn_matches_optunas() -> None:
    def run(cls: type[optuna.samplers.TPESampler]) -> list[dict]:
        sampler = cls(seed=0, n_startup_trials=3, multivariate=False)
        first = optuna.create_study(sampler=sampler)
        first.optimize(lambda t: t.suggest_float("x", 0, 1) + t.suggest_float("y", 0, 1), 5)
        second = optuna.create_study(sampler=sampler)  # the same trial ids, "x" categorical
        second.optimize(
            lambda t: (t.suggest_categorical("x", ["a", "b"]) == "a") + t.suggest_float("y", 0, 1),
            5,
        )
        return [t.params for t in first.trials + second.trials]

    assert run(TPESampler) == run(optuna.samplers.TPESampler)
