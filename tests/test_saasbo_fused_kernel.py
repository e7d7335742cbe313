"""Workers load BoTorch's fused qLogNEHVI kernel beside their first trials: a lock file left by a
killed builder never makes an acquisition wait past ``KERNEL_WAIT_S``, and a lock that old is
removed."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
from botorch.acquisition.multi_objective import logei
from torch.utils.cpp_extension import _get_build_directory

from mergeopt.samplers import saasbo_acquisition
from mergeopt.samplers.saasbo import SaasQnehviSampler


@pytest.fixture
def kernel_lock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh process's view of the kernel (not loaded, never tried), built under tmp_path."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(logei, "_C", None)
    monkeypatch.setattr(logei, "_load_attempted", False)
    monkeypatch.setattr(saasbo_acquisition, "_kernel_load", {})
    return Path(_get_build_directory("logei_fused_ext", verbose=False)) / "lock"


def test_a_held_kernel_lock_delays_the_first_acquisition_by_the_wait_limit_only(
    kernel_lock: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kernel_lock.touch()  # another process builds, or was killed while building
    monkeypatch.setattr(saasbo_acquisition, "KERNEL_WAIT_S", 0.5)
    saasbo_acquisition.start_fused_kernel_load()
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(8, 3))
    started = time.perf_counter()
    try:
        candidates, _, _ = saasbo_acquisition.propose_batch(
            train_x=x,
            train_y=np.stack([x.sum(1), -x[:, 0]], 1),
            pending_x=None,
            q=2,
            importance=None,
            ref_point=None,
            sampler=SaasQnehviSampler(num_restarts=1, raw_samples=16, maxiter=5, mc_samples=16),
            seed=0,
        )
    finally:
        kernel_lock.unlink()  # the waiting thread finds nothing built and gives up
    assert candidates.shape == (2, 3)
    assert time.perf_counter() - started < 30  # not forever
    assert logei._C is None  # the pure-PyTorch path, for the rest of the process
    assert kernel_lock.parent.exists()


def test_a_lock_older_than_any_build_is_removed_and_a_fresh_one_kept(kernel_lock: Path) -> None:
    kernel_lock.touch()
    saasbo_acquisition._remove_stale_kernel_lock()
    assert kernel_lock.exists()
    hour_ago = time.time() - 3600
    os.utime(kernel_lock, (hour_ago, hour_ago))
    saasbo_acquisition._remove_stale_kernel_lock()
    assert not kernel_lock.exists()


def test_botorch_still_keeps_the_kernel_where_workers_load_it() -> None:
    # start_fused_kernel_load relies on these names of BoTorch's logei module.
    assert hasattr(logei, "_C") and hasattr(logei, "_load_attempted")
    assert callable(logei._try_load_fused_kernel)
