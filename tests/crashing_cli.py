"""mergeopt's command line with a bug planted in its workers, for the crash tests.

Run as ``python -m tests.crashing_cli study run ...`` from the repository. Workers are started with
multiprocessing's spawn method, which imports the parent's main module (this file) in each
worker before it runs: so the patch below is in every worker, and mergeopt itself has no test
hook. ``TrialRunner.evaluate`` raises ``RuntimeError`` (a type the worker loop does not expect,
unlike ``TrialEvaluationError``) on the first ``CRASHES`` evaluations of the study, counted
across all workers and restarts with one marker file each in the folder ``CRASH_DIR``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mergeopt.runner import TrialRunner

CRASHES_ENV = "CRASHES"
CRASH_DIR_ENV = "CRASH_DIR"
_evaluate = TrialRunner.evaluate


def _claim_a_crash() -> bool:
    """Whether this evaluation is one of the first ``CRASHES``: it takes a marker file."""
    folder = Path(os.environ[CRASH_DIR_ENV])
    for index in range(int(os.environ[CRASHES_ENV])):
        try:
            os.close(os.open(folder / f"crash-{index}", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            continue
        return True
    return False


def _crashing_evaluate(
    self: TrialRunner, params: Mapping[str, float], *, seed: int
) -> tuple[list[float], dict[str, Any]]:
    if _claim_a_crash():
        raise RuntimeError("planted bug: the worker crashes here")
    return _evaluate(self, params, seed=seed)


TrialRunner.evaluate = _crashing_evaluate  # type: ignore[method-assign]

if __name__ == "__main__":
    from mergeopt.cli import main

    main()
