"""The ``encoder_zoo`` session fixture: the encoder zoo, built once per version and training,
cached in ``<repo>/.cache/<ENCODER_ZOO_VERSION>`` (git-ignored) as ``_zoo_fixture`` caches
the decoder zoo, under an ``fcntl`` lock so parallel test processes wait for one build."""

from __future__ import annotations

import fcntl
from pathlib import Path

import pytest

from mergeopt.zoo.encoder import (
    ENCODER_ZOO_VERSION,
    EncoderZoo,
    build_encoder_zoo,
    up_to_date_encoder_zoo,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
ENCODER_ZOO_CACHE_DIR = REPO_ROOT / ".cache" / ENCODER_ZOO_VERSION


def cached_encoder_zoo(folder: Path = ENCODER_ZOO_CACHE_DIR) -> EncoderZoo:
    """The encoder zoo in ``folder``, built there first unless an up-to-date one is."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    with (folder.parent / f"{folder.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        zoo = up_to_date_encoder_zoo(folder)
        if zoo is None:
            zoo = build_encoder_zoo(folder, progress=False)
    return zoo


@pytest.fixture(scope="session")
def encoder_zoo() -> EncoderZoo:
    """The built encoder zoo (see ``mergeopt.zoo.encoder`` for its layout)."""
    return cached_encoder_zoo()
