"""Workers load BoTorch's fused qLogNEHVI kernel beside their first trials, under a lock the
system drops with a dead holder: a loader killed midway never makes a later worker wait, a torch
lock file it left is removed, and a load that takes too long leaves the process on the
pure-PyTorch path for good."""

from __future__ import annotations

import inspect
import subprocess
import sys
import time
from pathlib import Path

import pytest
from botorch.acquisition.multi_objective import logei
from torch.utils.cpp_extension import _get_build_directory

from mergeopt.samplers import saasbo_acquisition

LOADED = object()  # stands for the built module: no test here compiles C++


@pytest.fixture
def build_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh worker's view of the kernel (not loaded, never tried), built under tmp_path, with
    a loader that returns at once."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(logei, "_C", None)
    monkeypatch.setattr(logei, "_load_attempted", False)
    monkeypatch.setattr(saasbo_acquisition, "_kernel_load", {})
    monkeypatch.setattr(saasbo_acquisition, "_build_or_load_kernel", lambda: LOADED)
    return Path(_get_build_directory("logei_fused_ext", verbose=False))


def _hold_lock_in_a_process(lock: Path) -> subprocess.Popen[str]:
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, sys, time\n"
            f"f = open({str(lock)!r}, 'w'); fcntl.flock(f, fcntl.LOCK_EX)\n"
            "print('locked', flush=True); time.sleep(600)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
    return holder


def test_the_kernel_loads_beside_the_trials_and_is_installed_at_the_first_acquisition(
    build_dir: Path,
) -> None:
    saasbo_acquisition.start_fused_kernel_load()
    assert logei._load_attempted  # BoTorch never loads it itself, under torch's lock
    assert logei._C is None
    saasbo_acquisition.await_fused_kernel()
    assert logei._C is LOADED


def test_a_killed_loaders_locks_delay_no_later_worker(build_dir: Path) -> None:
    holder = _hold_lock_in_a_process(build_dir.parent / "logei_fused_ext.mergeopt-lock")
    (build_dir / "lock").touch()  # torch's lock file, which nobody will ever remove
    saasbo_acquisition.start_fused_kernel_load()
    time.sleep(0.3)
    assert (build_dir / "lock").exists()  # a live holder's lock is respected
    holder.kill()  # SIGKILL: the system releases its flock
    holder.wait()
    started = time.perf_counter()
    saasbo_acquisition.await_fused_kernel()
    assert time.perf_counter() - started < 10
    assert logei._C is LOADED
    assert not (build_dir / "lock").exists()


def test_a_sampler_outside_a_worker_loads_the_kernel_under_the_same_lock(build_dir: Path) -> None:
    # Plain Optuna code never starts the load: the first acquisition does, and a torch lock
    # file a killed process left (BoTorch's own load waits on it forever) is removed.
    (build_dir / "lock").touch()
    started = time.perf_counter()
    saasbo_acquisition.await_fused_kernel()
    assert time.perf_counter() - started < 10
    assert logei._load_attempted and logei._C is LOADED
    assert not (build_dir / "lock").exists()


def test_a_load_past_the_wait_limit_leaves_the_process_on_the_pure_path(
    build_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    holder = _hold_lock_in_a_process(build_dir.parent / "logei_fused_ext.mergeopt-lock")
    monkeypatch.setattr(saasbo_acquisition, "KERNEL_WAIT_S", 0.3)
    try:
        saasbo_acquisition.start_fused_kernel_load()
        saasbo_acquisition.await_fused_kernel()
    finally:
        holder.kill()
        holder.wait()
    saasbo_acquisition._kernel_load["thread"].join(10)
    saasbo_acquisition.await_fused_kernel()  # decided once
    assert logei._C is None


def test_workers_build_the_kernel_as_botorch_does() -> None:
    # Same name, source and flags as BoTorch's own load, so both share one build.
    botorch_load = inspect.getsource(logei._try_load_fused_kernel)
    ours = inspect.getsource(saasbo_acquisition._build_or_load_kernel)
    assert f'"{saasbo_acquisition._KERNEL_NAME}"' in botorch_load
    for part in ('"logei_fused.cpp"', '"-O3"', '"-march=native"'):
        assert part in botorch_load and part in ours
    source = Path(logei.__file__).parent.parent.parent / "csrc" / "logei_fused.cpp"
    assert source.is_file()
    assert hasattr(logei, "_C") and hasattr(logei, "_load_attempted")
