"""Model-level search: one value per expert and parameter in every block; grid points once."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import optuna
import pytest

from mergeopt.genome import Genome, parse_param_name
from mergeopt.samplers.model_level import ModelLevelSampler, is_exhausted

GENOME = Genome(num_blocks=4, num_experts=2, searched={"weight": (0.0, 1.0), "density": (0.1, 1.0)})


def _per_group(params: dict[str, float]) -> dict[tuple[int, str], set[float]]:
    groups: dict[tuple[int, str], set[float]] = {}
    for name, value in params.items():
        _, expert, param = parse_param_name(name)
        groups.setdefault((expert, param), set()).add(value)
    return groups


def test_random_mode_shares_one_value_per_expert_across_blocks_within_sipbmm_bounds() -> None:
    study = optuna.create_study(sampler=ModelLevelSampler(mode="random", seed=0, genome=GENOME))
    for _ in range(10):
        trial = study.ask(GENOME.distributions())
        groups = _per_group(trial.params)
        assert all(len(values) == 1 for values in groups.values())
        for (_, param), (value,) in groups.items():
            low, high = (0.05, 0.95) if param == "weight" else (0.7, 0.9)
            assert low <= value <= high
        study.tell(trial, 0.0)


def test_grid_mode_hands_out_every_point_once_then_reports_exhaustion() -> None:
    genome = Genome(num_blocks=3, num_experts=1, searched={"weight": (0.0, 1.0)})
    sampler = ModelLevelSampler(
        mode="grid", grid_points=4, bounds={"weight": [0.0, 1.0]}, genome=genome
    )
    study = optuna.create_study(sampler=sampler)
    seen = []
    while not is_exhausted(study):
        trial = study.ask(genome.distributions())
        seen.append(trial.params["b00.e0.weight"])
        study.tell(trial, 0.0)
    assert sorted(seen) == pytest.approx([0.0, 1 / 3, 2 / 3, 1.0])


def test_grid_mode_stops_study_optimize_after_the_last_point() -> None:
    genome = Genome(num_blocks=2, num_experts=2, searched={"weight": (0.0, 1.0)})
    study = optuna.create_study(
        sampler=ModelLevelSampler(mode="grid", grid_points=3, genome=genome)
    )
    study.optimize(
        lambda t: sum(t.suggest_float(n, d.low, d.high) for n, d in genome.distributions().items()),
        n_trials=100,
    )
    assert len(study.trials) == 9
    points = {tuple(sorted(t.params.items())) for t in study.trials}
    assert len(points) == 9


def test_grid_skips_enqueued_trials_when_counting() -> None:
    genome = Genome(num_blocks=1, num_experts=1, searched={"weight": (0.0, 1.0)})
    study = optuna.create_study(
        sampler=ModelLevelSampler(mode="grid", grid_points=3, genome=genome)
    )
    study.enqueue_trial({"b00.e0.weight": 0.123})
    values = []
    for _ in range(4):
        trial = study.ask(genome.distributions())
        values.append(trial.params["b00.e0.weight"])
        study.tell(trial, 0.0)
    assert values[0] == 0.123
    assert sorted(values[1:]) == pytest.approx([0.05, 0.5, 0.95])


def _grid_worker(url: str, name: str) -> None:
    genome = Genome(
        num_blocks=2, num_experts=1, searched={"weight": (0.0, 1.0), "density": (0.0, 1.0)}
    )
    study = optuna.load_study(
        study_name=name,
        storage=url,
        sampler=ModelLevelSampler(
            mode="grid",
            grid_points=4,
            genome=genome,
            bounds={"density": [0.0, 1.0], "weight": [0.0, 1.0]},
        ),
    )
    while not is_exhausted(study):
        trial = study.ask(genome.distributions())
        study.tell(trial, 0.0)


@pytest.mark.slow
def test_grid_points_are_unique_across_worker_processes(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'grid.db'}"
    storage = optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 60}})
    optuna.create_study(study_name="grid", storage=storage)
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_grid_worker, args=(url, "grid")) for _ in range(3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
        assert worker.exitcode == 0
    study = optuna.load_study(study_name="grid", storage=url)
    points = [(t.params["b00.e0.weight"], t.params["b00.e0.density"]) for t in study.trials]
    on_grid = [p for p in points if all(abs(v * 3 - round(v * 3)) < 1e-9 for v in p)]
    # Every grid point exactly once; a worker racing past the end may add one random point.
    assert len(on_grid) == len(set(on_grid)) == 16
    assert len(points) - len(on_grid) <= 2
