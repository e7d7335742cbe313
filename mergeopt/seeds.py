"""Seeds derived from a study's one ``seed``: one formula for every stream that needs its own.

A worker's sampler, a trial's randomized merge and a CMA-ES generation each draw from their
own stream, so that two streams never repeat each other's numbers and every stream can be
recomputed (a resumed CMA-ES generation, ``study export`` repeating a trial's merge).
"""

from __future__ import annotations

from typing import NamedTuple

_MULTIPLIER = 1_000_003  # a prime: distinct (seed, stream) pairs below it map apart


def derive_seed(seed: int, stream: int, *, bits: int = 31) -> int:
    """The seed of stream ``stream`` (a trial number, a process id, a generation) of a run
    seeded with ``seed``: ``(seed * 1_000_003 + stream) mod 2**bits``.

    ``bits`` fits the consumer: 31 for anything that may pass it to a signed 32-bit seed,
    32 for NumPy's ``RandomState``.
    """
    return (seed * _MULTIPLIER + stream) % (2**bits)


class WorkerStream(NamedTuple):
    """Where one worker process's sampler draws from: ``study run`` number ``run`` on the
    study (each invocation claims its own, ``workers.claim_run_number``), its ``slot``-th
    device, started for the ``start``-th time (a restarted worker must not replay the draws of
    the one it replaces). No two workers anywhere share a stream, and a study run again from
    scratch with the same seed and devices gets the same streams."""

    run: int
    slot: int
    start: int

    def seed(self, seed: int) -> int:
        return derive_seed(derive_seed(derive_seed(seed, self.run), self.slot), self.start)
