"""Model-level search: one value per expert and parameter, shared by every block.

The classic merge baseline (one weight and density per model, as in a plain mergekit config)
searched by random or grid search, so that block-wise optimizers can be compared with it.

Parameters whose names parse as genome names (``bNN.eK.param``) are grouped by
``(expert, param)``: every block gets the group's one value. Other names (plain Optuna use) form
one group each.

Grid mode hands out every grid point exactly once across all workers, without a lock: the grid
index of a trial is the number of earlier trials (smaller ``trial.number``) that were not
enqueued with fixed parameters. Trial numbers are assigned atomically by the storage and the
``fixed_params`` system attr is written when a trial is created, so every worker computes the
same index and no two get the same one. When the last grid point is handed out, the study
system attr ``mergeopt.attrs.SAMPLER_EXHAUSTED`` is set to true: the worker loop must check
:func:`mergeopt.samplers.model_level.is_exhausted` before each ``ask`` and stop. Inside
``study.optimize`` the sampler also calls ``study.stop()``. A trial that still arrives past the
end (it was asked concurrently with the last one) gets a uniformly random model-level point.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from optuna.distributions import BaseDistribution, FloatDistribution, IntDistribution
from optuna.trial import FrozenTrial

from mergeopt import attrs
from mergeopt.samplers._state import snap
from mergeopt.samplers.base import GenomeSampler, design_index

if TYPE_CHECKING:
    from optuna import Study

    from mergeopt.genome import Genome

DEFAULT_BOUNDS: dict[str, tuple[float, float]] = {"weight": (0.05, 0.95), "density": (0.7, 0.9)}
"""SIPBMM's model-level search ranges; other parameters use their distribution's bounds."""


def is_exhausted(study: Study) -> bool:
    """True when the study's grid (or other finite design) has been handed out completely."""
    return bool(attrs.SAMPLER_EXHAUSTED.get(study))


def _group_of(name: str) -> str:
    from mergeopt.genome import parse_param_name

    try:
        _, expert, param = parse_param_name(name)
    except ValueError:
        return name
    return f"e{expert}.{param}"


def _param_kind(group: str) -> str:
    return group.split(".", 1)[1] if group.startswith("e") and "." in group else group


class ModelLevelSampler(GenomeSampler):
    """Random or grid search over one value per ``(expert, param)``, broadcast to all blocks.

    Args:
        mode: ``"random"`` (uniform in ``bounds``) or ``"grid"`` (evenly spaced points, each once).
        grid_points: grid points per searched parameter kind (grid mode), at least 2.
        bounds: ``{param: [low, high]}`` per parameter kind; defaults to :data:`DEFAULT_BOUNDS`
            clipped to each distribution, other kinds to the distribution's bounds.
        seed: random seed.
        genome: the study's genome (else read from the study's ``mergeopt:genome`` user attr);
            it makes the first trial a model-level point too.

    Example::

        sampler = ModelLevelSampler(mode="grid", grid_points=3)
        study = optuna.create_study(sampler=sampler)
    """

    def __init__(
        self,
        *,
        mode: str = "random",
        grid_points: int = 5,
        bounds: Mapping[str, Sequence[float]] | None = None,
        seed: int | None = None,
        genome: Genome | None = None,
    ) -> None:
        if mode not in ("random", "grid"):
            raise ValueError(f"mode must be 'random' or 'grid', got {mode!r}")
        if not isinstance(grid_points, int) or grid_points < 2:
            raise ValueError(f"grid_points must be an integer >= 2, got {grid_points!r}")
        self._bounds = dict(DEFAULT_BOUNDS)
        for key, value in (bounds or {}).items():
            if len(value) != 2 or not float(value[0]) < float(value[1]):
                raise ValueError(f"bounds.{key} must be [low, high] with low < high, got {value}")
            self._bounds[key] = (float(value[0]), float(value[1]))
        self._mode = mode
        self._grid_points = grid_points
        self._rng = np.random.RandomState(seed)
        super().__init__(seed=seed, genome=genome)

    def reseed_rng(self) -> None:
        self._rng.seed()
        super().reseed_rng()

    def infer_relative_search_space(
        self, study: Study, trial: FrozenTrial
    ) -> dict[str, BaseDistribution]:
        space = super().infer_relative_search_space(study, trial)
        return {k: v for k, v in space.items() if isinstance(v, FloatDistribution)}

    def _group_bounds(
        self, search_space: Mapping[str, BaseDistribution]
    ) -> dict[str, tuple[float, float]]:
        bounds: dict[str, tuple[float, float]] = {}
        for name, dist in search_space.items():
            assert isinstance(dist, (FloatDistribution, IntDistribution))
            group = _group_of(name)
            low, high = float(dist.low), float(dist.high)
            if _param_kind(group) in self._bounds:
                want_low, want_high = self._bounds[_param_kind(group)]
                if want_low < high and want_high > low:
                    low, high = max(low, want_low), min(high, want_high)
            if group in bounds:
                low, high = max(low, bounds[group][0]), min(high, bounds[group][1])
            bounds[group] = (low, high)
        return bounds

    def grid(self, search_space: Mapping[str, BaseDistribution]) -> list[dict[str, float]]:
        """All grid points as ``{group: value}``, in the order they are handed out."""
        bounds = self._group_bounds(search_space)
        axes = [np.linspace(low, high, self._grid_points).tolist() for low, high in bounds.values()]
        return [dict(zip(bounds, point, strict=True)) for point in itertools.product(*axes)]

    def _sample_numerical(
        self, study: Study, trial: FrozenTrial, space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        values: dict[str, float] | None = None
        if self._mode == "grid":
            values = self._grid_values(study, trial, space)
        if values is None:
            values = {
                group: float(self._rng.uniform(low, high))
                for group, (low, high) in self._group_bounds(space).items()
            }
        return {name: snap(dist, float(values[_group_of(name)])) for name, dist in space.items()}

    def _grid_values(
        self, study: Study, trial: FrozenTrial, space: Mapping[str, BaseDistribution]
    ) -> dict[str, float] | None:
        grid = self.grid(space)
        index = design_index(study, trial)
        if index >= len(grid) - 1:
            attrs.SAMPLER_EXHAUSTED.set(study, True)
            # Outside study.optimize, stop() raises: the worker loop checks the attr instead.
            with contextlib.suppress(RuntimeError):
                study.stop()
        attrs.GRID_INDEX.set_on(study, trial, index)
        return grid[index] if index < len(grid) else None
