"""Worker processes: one per device, all sharing one study through its storage.

The parent process starts the workers, shows a progress bar read from the storage (so it counts
the trials of workers on other machines too), restarts a worker that died from a signal or
crashed (an uncaught exception; its trial is failed and retried by the heartbeat mechanism), a
bounded number of times, and forwards Ctrl-C, SIGTERM and SIGHUP
(SLURM ends and pre-empts jobs with SIGTERM) so that every worker fails and requeues its running
trial before it exits. A worker whose parent is gone, however it died, does the same: no
orphan keeps running the study.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mergeopt import attrs
from mergeopt.errors import UserError
from mergeopt.seeds import WorkerStream

if TYPE_CHECKING:
    from multiprocessing.process import BaseProcess

    import optuna

USER_ERROR_EXIT = 2
DATABASE_EXIT = 3  # the database stayed unreachable past worker.database_outage_limit
INTERRUPTED_EXIT = 130
CRASH_EXIT = 1  # an uncaught exception in a worker
# `study run` when work was lost: a crashed worker was not restarted (its restarts were spent),
# or the workers stopped before the study held the requested COMPLETE trials.
WORK_LOST_EXIT = 4
# Worker exit codes that say why it stopped; any other code (1: an uncaught exception) or a
# signal is a crash.
EXPECTED_EXITS = (0, USER_ERROR_EXIT, DATABASE_EXIT, INTERRUPTED_EXIT)
# A worker killed by a signal or crashed is restarted; without progress (no new COMPLETE trial
# since the last restart) at most this many times per device in a row, so a worker that dies
# at start (out of memory while loading) or on every trial does not loop forever.
RESTARTS_WITHOUT_PROGRESS_PER_DEVICE = 2
PARENT_POLL_SECONDS = 0.5
# After its parent died, a worker that has not requeued its trial and exited by then is ended.
ORPHAN_GRACE_SECONDS = 60.0
TERMINATING_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP reached ``study run``: handled as Ctrl-C, reported with its signal."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated(signum)


def _leave_with_parent(parent_pid: int) -> None:
    """Interrupt this worker (as Ctrl-C would) once ``parent_pid`` is no longer its parent, and
    end it if it is still alive ``ORPHAN_GRACE_SECONDS`` later."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(PARENT_POLL_SECONDS)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(ORPHAN_GRACE_SECONDS)
        os._exit(INTERRUPTED_EXIT)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


DEVICE_NAMES = "cpu, cuda, cuda:N, mps"


def is_device_name(device: str) -> bool:
    """Whether ``device`` names one device mergeopt can run on (see ``DEVICE_NAMES``)."""
    kind, _, index = device.partition(":")
    return kind in ("cpu", "cuda", "mps") and (not index or index.isdigit())


def check_device_options(workers: int | None, devices: str | None) -> list[str] | None:
    """The devices ``--devices`` names, or None for ``--workers``; a mistake in either is a
    ``UserError``. Cheap (no torch), so ``study run`` reports mistakes before anything else."""
    if workers is not None and devices is not None:
        raise UserError("give --workers or --devices, not both")
    if devices is None:
        if workers is not None and workers < 1:
            raise UserError("--workers must be at least 1")
        return None
    chosen = [d.strip() for d in devices.split(",") if d.strip()]
    for device in chosen:
        if not is_device_name(device):
            raise UserError(f"--devices: {device!r} is not a device ({DEVICE_NAMES})")
    if not chosen:
        raise UserError("--devices: no device given")
    return chosen


def parse_devices(workers: int | None, devices: str | None) -> list[str]:
    """One device per worker: ``--devices cpu,cuda:0,...`` as given, or ``--workers K`` spread
    over the visible GPUs (or the CPU when there is none)."""
    chosen = check_device_options(workers, devices)
    if chosen is not None:
        return chosen
    count = 1 if workers is None else workers
    gpus = _visible_gpus()
    if gpus:
        return [f"cuda:{i % gpus}" for i in range(count)]
    return ["cpu"] * count


def _visible_gpus() -> int:
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) == "":
        return 0
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _pin_device(device: str) -> str:
    """Make ``cuda:N`` the only GPU the worker process sees (vLLM and NCCL-free torch alike use
    the first visible device); returns the device name to use inside the process."""
    kind, _, index = device.partition(":")
    if kind != "cuda" or not index:
        return device
    visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    position = int(index)
    if visible and position >= len(visible):
        raise UserError(f"--devices: {device} but CUDA_VISIBLE_DEVICES lists {len(visible)} GPUs")
    os.environ["CUDA_VISIBLE_DEVICES"] = visible[position] if visible else index
    return "cuda:0"


def worker_threads(devices: list[str]) -> int:
    """Torch threads of each worker: the host's cores shared among all its workers. A GPU
    worker's CPU work is the sampler's (fits and acquisitions of small GPs), which two workers
    of all the cores each only slow down (on the H200 machine's 16-core host one batch took
    7.0 s with 16 threads and 4.7 s with one, ``docs/bench/study-medium-h200-2026-12-01.md``)."""
    return max(1, (os.cpu_count() or 1) // max(1, len(devices)))


def _worker_main(
    study_name: str,
    storage_url: str,
    n_trials: int,
    device: str,
    timeout: float | None,
    threads: int,
    parent_pid: int,
    stream: WorkerStream,
) -> None:
    """Entry point of a worker process; its exit code tells the parent what happened."""
    import logging

    from mergeopt.storage import DatabaseUnreachable

    logging.basicConfig(level=logging.WARNING, format="[worker %(process)d] %(message)s")
    _leave_with_parent(parent_pid)
    try:
        device = _pin_device(device)  # before torch initializes CUDA
        import warnings

        import torch
        from transformers.utils import logging as transformers_logging

        # The parent's progress bar is the one to read: no per-worker loading bars, and no
        # Optuna hint that heartbeats belong to study.optimize (workers beat themselves).
        transformers_logging.disable_progress_bar()
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
        torch.set_num_threads(threads)
        from mergeopt.trial_loop import run_worker

        run_worker(
            study_name,
            storage_url,
            n_trials=n_trials,
            device=device,
            timeout=timeout,
            stream=stream,
        )
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        sys.exit(USER_ERROR_EXIT)
    except DatabaseUnreachable as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        sys.exit(DATABASE_EXIT)
    except KeyboardInterrupt:
        sys.exit(INTERRUPTED_EXIT)
    except Exception:  # a bug: the parent reports it and restarts the worker
        import traceback

        print(f"[worker {os.getpid()}] crashed:", file=sys.stderr)
        traceback.print_exc()
        sys.stderr.flush()
        sys.exit(CRASH_EXIT)


@dataclass
class RunSummary:
    """What ``run_workers`` saw. ``crashed``: workers that crashed or died from a signal while
    trials remained and were not restarted (their restarts were spent), as "cpu (exit code 1)".
    ``timed_out``: the run reached ``--timeout``; ``exhausted``: the sampler ran out of
    candidates (a model-level grid); either ends a run short of ``n_trials`` on purpose."""

    completed_before: int
    completed_after: int
    n_trials: int
    restarts: int = 0
    user_errors: list[str] = field(default_factory=list)
    database_unreachable: list[str] = field(default_factory=list)
    crashed: list[str] = field(default_factory=list)
    interrupted: bool = False
    signal_name: str = "SIGINT"  # what interrupted the run
    timed_out: bool = False
    exhausted: bool = False
    seconds: float = 0.0

    @property
    def work_lost(self) -> bool:
        """A crashed worker was not restarted, or the workers stopped short of ``n_trials``
        with no reason to (not interrupted, no timeout, candidates left, no user or database
        error, which have their own exit codes)."""
        if self.crashed:
            return True
        stopped_early = self.interrupted or self.timed_out or self.exhausted
        explained = self.user_errors or self.database_unreachable
        return self.completed_after < self.n_trials and not stopped_early and not explained


def run_workers(
    study: optuna.Study,
    storage_url: str,
    *,
    n_trials: int,
    devices: list[str],
    timeout: float | None = None,
    progress: bool = True,
    max_restarts: int | None = None,
) -> RunSummary:
    """Run one worker process per entry of ``devices`` until the study has ``n_trials``.

    A worker killed by a signal or crashed (any exit code but those of ``EXPECTED_EXITS``) is
    restarted, with one line saying so (a crash's traceback is on the worker's stderr, which is
    this process's); its trial is failed and retried through its heartbeat. With
    ``max_restarts=None`` there is no total limit as long as the study
    progresses: only ``RESTARTS_WITHOUT_PROGRESS_PER_DEVICE * len(devices)`` restarts in a row
    without a new COMPLETE trial; an integer caps the total. The parent reads the study for
    its progress bar and tolerates the database being unreachable meanwhile (the workers
    retry, and stop with their own message past the outage limit). A worker that dies after
    the study is done is not restarted; its trial, which no worker is left to find stale, is
    failed here once its heartbeat is (one grace period later).
    """
    context = multiprocessing.get_context("spawn")
    threads = worker_threads(devices)
    stalled_restarts = RESTARTS_WITHOUT_PROGRESS_PER_DEVICE * len(devices)
    restarts_left = stalled_restarts if max_restarts is None else max_restarts
    run = claim_run_number(study, devices)
    starts = [0] * len(devices)
    started = time.monotonic()
    counter = _CompleteCounter(study)
    summary = RunSummary(counter.read(), 0, n_trials)
    progress_mark = summary.completed_before

    def start(slot: int) -> BaseProcess:
        remaining = None if timeout is None else max(1.0, timeout - (time.monotonic() - started))
        stream = WorkerStream(run, slot, starts[slot])
        starts[slot] += 1
        process = context.Process(
            target=_worker_main,
            args=(
                study.study_name,
                storage_url,
                n_trials,
                devices[slot],
                remaining,
                threads,
                os.getpid(),
                stream,
            ),
            name=f"mergeopt-worker-{devices[slot]}",
        )
        process.start()
        return process

    previous_handlers = {}
    if threading.current_thread() is threading.main_thread():
        previous_handlers = {s: signal.signal(s, _raise_terminated) for s in TERMINATING_SIGNALS}
    processes = {slot: start(slot) for slot in range(len(devices))}
    display = _Progress(study, n_trials, enabled=progress)
    died_when_done = False
    try:
        with display:
            while processes:
                display.refresh()
                for slot, process in list(processes.items()):
                    if process.is_alive():
                        continue
                    process.join()
                    code = process.exitcode
                    del processes[slot]
                    complete = counter.read()
                    done = complete >= n_trials
                    if max_restarts is None and complete > progress_mark:
                        progress_mark, restarts_left = complete, stalled_restarts
                    if code == USER_ERROR_EXIT:
                        summary.user_errors.append(devices[slot])
                    elif code == DATABASE_EXIT:
                        summary.database_unreachable.append(devices[slot])
                    elif code == INTERRUPTED_EXIT and not done:
                        # The terminal's Ctrl-C reached the worker before this process
                        # raised its own KeyboardInterrupt: the run was interrupted, no work lost.
                        summary.interrupted = True
                    elif code in EXPECTED_EXITS:
                        pass
                    elif done:
                        display.log(f"{_death(devices[slot], process)} after the study was done")
                        died_when_done = True
                    elif restarts_left > 0:
                        restarts_left -= 1
                        summary.restarts += 1
                        display.log(
                            f"{_death(devices[slot], process)}; restarting it (its trial is "
                            "retried)"
                        )
                        processes[slot] = start(slot)
                    else:
                        summary.crashed.append(f"{devices[slot]} (exit code {code})")
                        spent = (
                            f"all {max_restarts} restarts used"
                            if max_restarts is not None
                            else f"{stalled_restarts} restarts in a row without a new complete "
                            "trial"
                        )
                        display.log(f"{_death(devices[slot], process)}; not restarted ({spent})")
                time.sleep(0.5)
            display.refresh()
        if died_when_done:
            # No worker is left to find the dead one's trial stale (it may have been inside
            # an ask, its worker label not yet written): fail it here, once it is stale.
            from mergeopt.storage import is_connection_error

            try:
                failed = _fail_orphaned_trials(study, storage_url)
            except Exception as exc:
                if not is_connection_error(exc):
                    raise
                display.log(
                    "the database is unreachable: the dead worker's trial stays RUNNING until "
                    "the next run's workers find it stale"
                )
            else:
                if failed:
                    display.log(f"closed {failed} trial(s) left running by a worker that died")
    except KeyboardInterrupt as exc:
        summary.interrupted = True
        if isinstance(exc, Terminated):
            summary.signal_name = signal.Signals(exc.signum).name
        _stop(list(processes.values()))
    finally:
        for signum, handler in previous_handlers.items():
            signal.signal(signum, handler)
    summary.completed_after = counter.read()
    summary.seconds = time.monotonic() - started
    summary.timed_out = timeout is not None and summary.seconds >= timeout
    summary.exhausted = _sampler_exhausted(study)
    return summary


def _fail_orphaned_trials(study: optuna.Study, storage_url: str) -> int:
    """Fail the RUNNING trials whose heartbeat is stale, waiting one grace period (plus a
    beat) for a worker that just died; trials of live workers anywhere keep beating. Returns
    how many were failed (they are retried as a dead worker's trial is)."""
    import optuna
    from optuna.trial import TrialState

    from mergeopt.optuna_compat import clock_unbeaten_trials
    from mergeopt.storage import load_study
    from mergeopt.study import stored_spec
    from mergeopt.trial_loop import open_worker_storage

    worker = stored_spec(study).worker
    beating = load_study(study.study_name, open_worker_storage(storage_url, worker))
    running = beating.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    if not running:
        return 0
    stale_after = worker.effective_grace_period + worker.heartbeat_interval
    time.sleep(stale_after)
    if clock_unbeaten_trials(beating):  # never beaten: their clock starts now
        time.sleep(stale_after)
    optuna.storages.fail_stale_trials(beating)
    failed = {t.number for t in beating.get_trials(deepcopy=False, states=(TrialState.FAIL,))}
    return len({t.number for t in running} & failed)


def claim_run_number(study: optuna.Study, devices: list[str]) -> int:
    """The number of this ``study run`` on the study: the first free one from the count of
    those claimed up, claimed in the database (``attrs.RUN_PREFIX``) so that two invocations
    starting at once, on any machines, never share one. It seeds the workers' samplers
    (``seeds.WorkerStream``)."""
    import datetime
    import socket

    from mergeopt.optuna_compat import claim_study_system_attr, study_system_attrs

    record = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "devices": devices,
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    number = sum(1 for key in study_system_attrs(study) if key.startswith(attrs.RUN_PREFIX))
    while not claim_study_system_attr(study, f"{attrs.RUN_PREFIX}{number}", record):
        number += 1
    return number


def _death(device: str, process: BaseProcess) -> str:
    """How a worker ended, in words: a signal, or a crash whose traceback is on its stderr."""
    code = process.exitcode
    if code is not None and code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = str(-code)
        return f"worker on {device} (pid {process.pid}) died from signal {-code} ({name})"
    return (
        f"worker on {device} (pid {process.pid}) crashed with exit code {code} (its traceback "
        f"is above on stderr, after '[worker {process.pid}] crashed')"
    )


def _sampler_exhausted(study: optuna.Study) -> bool:
    """The sampler handed out its whole finite design (a model-level grid); False when the
    database cannot say."""
    from mergeopt.samplers.model_level import is_exhausted
    from mergeopt.storage import is_connection_error

    try:
        return is_exhausted(study)
    except Exception as exc:
        if not is_connection_error(exc):
            raise
        return False


class _CompleteCounter:
    """The study's COMPLETE count, or the last one read while the database is unreachable."""

    def __init__(self, study: optuna.Study) -> None:
        self.study = study
        self.last = 0

    def read(self) -> int:
        from mergeopt.storage import is_connection_error
        from mergeopt.study import trial_counts

        try:
            self.last = trial_counts(self.study)["COMPLETE"]
        except Exception as exc:
            if not is_connection_error(exc):
                raise
        return self.last


def _stop(processes: list[BaseProcess], grace_seconds: float = 60.0) -> None:
    """Forward Ctrl-C to workers, give them time to requeue their trials, then terminate."""
    for process in processes:
        if process.is_alive() and process.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGINT)
    deadline = time.monotonic() + grace_seconds
    for process in processes:
        while process.is_alive() and time.monotonic() < deadline:
            try:
                process.join(timeout=0.5)
            except Terminated:  # `timeout` and SLURM signal the parent, then its whole group
                continue
            except KeyboardInterrupt:  # a second Ctrl-C: stop waiting
                deadline = 0.0
        if process.is_alive():  # it ignores further signals while it requeues its trial
            process.kill()
            process.join()


class _Progress:
    """Progress over COMPLETE trials, read from the storage, with the best values: a rich bar on
    a terminal; off a terminal (SLURM logs, nohup) a timestamped line when the run starts,
    every ``PLAIN_INTERVAL_SECONDS`` and when it ends, since a bar there shows only at the end."""

    PLAIN_INTERVAL_SECONDS = 30.0

    def __init__(self, study: optuna.Study, n_trials: int, *, enabled: bool) -> None:
        self.study = study
        self.n_trials = n_trials
        self.enabled = enabled
        self._progress: Any = None  # a rich Progress on a terminal
        self._task = None
        self._plain = False
        self._last_line = 0.0

    def __enter__(self) -> _Progress:
        if not self.enabled:
            return self
        if not sys.stdout.isatty():
            self._plain = True
            self._plain_line(force=True)
            return self
        from mergeopt.progress import rich_progress

        self._progress = rich_progress(
            "[bold]{task.description}", eta_label="eta", trailer="{task.fields[best]}"
        )
        self._progress.__enter__()
        from mergeopt.study import trial_counts

        done = min(trial_counts(self.study)["COMPLETE"], self.n_trials)
        self._task = self._progress.add_task(
            f"study {self.study.study_name}", total=self.n_trials, completed=done, best=""
        )
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc_info)
        if self._plain:
            self._plain_line(force=True)

    def _plain_line(self, *, force: bool = False) -> None:
        from mergeopt.report import best_values_text
        from mergeopt.storage import is_connection_error
        from mergeopt.study import trial_counts

        now = time.monotonic()
        if not force and now - self._last_line < self.PLAIN_INTERVAL_SECONDS:
            return
        try:
            complete = trial_counts(self.study)["COMPLETE"]
            best = best_values_text(self.study)
        except Exception as exc:
            if is_connection_error(exc):
                return  # the workers report the outage
            raise
        self._last_line = now
        self.log(
            f"study {self.study.study_name}: {min(complete, self.n_trials)}/{self.n_trials} "
            f"complete" + (f", {best}" if best else "")
        )

    def refresh(self) -> None:
        if self._plain:
            self._plain_line()
            return
        if self._progress is None:
            return
        from mergeopt.report import best_values_text
        from mergeopt.storage import is_connection_error
        from mergeopt.study import trial_counts

        try:
            counts = trial_counts(self.study)
            best = best_values_text(self.study)
        except Exception as exc:
            if is_connection_error(exc):
                return  # the workers report the outage; the bar waits for the database
            raise
        self._progress.update(
            self._task,
            completed=min(counts["COMPLETE"], self.n_trials),
            best=best,
        )

    def log(self, message: str) -> None:
        if self._progress is not None:
            self._progress.console.print(message)
        elif self._plain:
            print(f"{time.strftime('%H:%M:%S')} {message}", flush=True)
        else:
            print(message, file=sys.stderr)
