"""The ``zoo_dir`` session fixture: the model zoo, built once per version and settings, cached.

The zoo lives in ``<repo>/.cache/zoo-<ZOO_VERSION>`` (git-ignored) and is reused by every later
test session while it is up to date (complete, this version, seed 0, the current ZooTraining);
otherwise it is rebuilt there.
An exclusive ``fcntl`` lock beside it makes parallel test processes wait for one build instead
of racing; ``build_zoo`` writes ``zoo.json`` last, so a killed build is rebuilt, never used.

Import it from ``tests/conftest.py``: ``from tests._zoo_fixture import zoo_dir  # noqa: F401``.
"""

from __future__ import annotations

import fcntl
from pathlib import Path

import pytest

from mergeopt.zoo import ZOO_VERSION, build_zoo, up_to_date_zoo

REPO_ROOT = Path(__file__).resolve().parent.parent
ZOO_CACHE_DIR = REPO_ROOT / ".cache" / f"zoo-{ZOO_VERSION}"


def cached_zoo(folder: Path = ZOO_CACHE_DIR) -> Path:
    """``folder`` holding a complete zoo, built there first unless one already is."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    with (folder.parent / f"{folder.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if up_to_date_zoo(folder) is None:
            build_zoo(folder, progress=False)  # replaces a half-built folder
    return folder


@pytest.fixture(scope="session")
def zoo_dir() -> Path:
    """The built zoo's folder (see ``mergeopt.zoo`` for its layout)."""
    return cached_zoo()
