"""What mergeopt's samplers share: the search space a genome fixes, Optuna's ``RandomSampler``
for what the relative sampler leaves, the batch protocol's coordinator, and a trial's index in
a design handed out without a lock."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from optuna.samplers import BaseSampler, RandomSampler
from optuna.search_space import IntersectionSearchSpace

from mergeopt.optuna_compat import is_enqueued
from mergeopt.samplers._state import BatchCoordinator, numerical_space, relative_search_space

if TYPE_CHECKING:
    from optuna import Study
    from optuna.distributions import BaseDistribution
    from optuna.trial import FrozenTrial

    from mergeopt.genome import SearchGenome


class GenomeSampler(BaseSampler):
    """A sampler whose relative search space is the genome's (``genome``, else the study's
    stored one) from the first trial on; parameters outside it (categorical ones, names that
    are not genome names) are drawn by a ``RandomSampler`` with the same ``seed``."""

    def __init__(self, *, seed: int | None, genome: SearchGenome | None) -> None:
        self._seed = seed
        self._genome = genome
        self._independent = RandomSampler(seed=seed)
        self._intersection = IntersectionSearchSpace(include_pruned=True)

    def reseed_rng(self) -> None:
        self._independent.reseed_rng()

    def infer_relative_search_space(
        self, study: Study, trial: FrozenTrial
    ) -> dict[str, BaseDistribution]:
        return relative_search_space(study, self._genome, self._intersection)

    def sample_independent(
        self,
        study: Study,
        trial: FrozenTrial,
        param_name: str,
        param_distribution: BaseDistribution,
    ) -> Any:
        return self._independent.sample_independent(study, trial, param_name, param_distribution)

    def sample_relative(
        self, study: Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        """The numerical part of ``search_space`` from :meth:`_sample_numerical`, the rest (and
        whatever it leaves out) drawn independently."""
        if not search_space:
            return {}
        space = numerical_space(search_space)
        params = self._sample_numerical(study, trial, space) if space else {}
        for name, dist in search_space.items():
            if name not in params:
                params[name] = self._independent.sample_independent(study, trial, name, dist)
        return params

    def _sample_numerical(
        self, study: Study, trial: FrozenTrial, space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        """Values for the numerical parameters ``space`` (not empty): the sampler's own."""
        raise NotImplementedError


class BatchedGenomeSampler(GenomeSampler):
    """A :class:`GenomeSampler` whose candidates are shared out between workers by the batch
    protocol of :mod:`mergeopt.samplers._state` (study attrs under ``prefix``)."""

    def __init__(
        self,
        prefix: str,
        *,
        seed: int | None,
        genome: SearchGenome | None,
        timing: tuple[float, float | None, float],
        enqueue_rest: bool = True,
    ) -> None:
        """``timing``: the protocol's ``(lock_ttl_seconds, settle_seconds, poll_seconds)``;
        ``enqueue_rest``: see :class:`~mergeopt.samplers._state.BatchCoordinator`."""
        super().__init__(seed=seed, genome=genome)
        lock_ttl_seconds, settle_seconds, poll_seconds = timing
        self._coordinator = BatchCoordinator(
            prefix=prefix,
            lock_ttl_seconds=lock_ttl_seconds,
            settle_seconds=settle_seconds,
            poll_seconds=poll_seconds,
            enqueue_rest=enqueue_rest,
        )


def design_index(study: Study, trial: FrozenTrial) -> int:
    """The trial's index in a design handed out without a lock: the number of earlier trials
    (smaller ``trial.number``) that were not enqueued with fixed parameters. Trial numbers are
    assigned atomically by the storage, so every worker computes the same index for a trial
    and no two trials get the same one."""
    return sum(
        1
        for t in study.get_trials(deepcopy=False)
        if t.number < trial.number and not is_enqueued(t)
    )
