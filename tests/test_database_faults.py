"""Database faults: a private PostgreSQL server (started by the test on a free port, never the
shared one on 5432) is stopped under running workers. Restarted within
``worker.database_outage_limit``, the workers back off, continue and finish the study; left
down past the limit, they exit with one ``error: database ... unreachable`` line and a
non-zero code, and a rerun once the server is back completes the study."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from tests.conftest import run_cli, tiny_spec, write_spec
from tests.test_study_run import start_run, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

N_TRIALS = 16


def postgres_bin() -> Path | None:
    """The newest PostgreSQL server binaries installed (Debian: /usr/lib/postgresql/V/bin)."""
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"),
        key=lambda p: int(Path(p).parent.parent.name.split(".")[0]),
    )
    return Path(found[-1]).parent if found else None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class PrivatePostgres:
    """A PostgreSQL server of its own in a temporary folder, run as the ``postgres`` user when
    the tests run as root (PostgreSQL refuses to run as root)."""

    bin: Path
    root: Path
    port: int

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str) -> None:
        prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        result = subprocess.run(
            [*prefix, *args], capture_output=True, text=True, timeout=120, cwd=self.root
        )
        assert result.returncode == 0, result.stdout + result.stderr

    def init(self) -> None:
        self._run(
            str(self.bin / "initdb"),
            "-D",
            str(self.root / "data"),
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
            "--no-sync",
        )

    def start(self) -> None:
        options = f"-p {self.port} -k {self.root} -h 127.0.0.1 -c fsync=off"
        self._run(
            str(self.bin / "pg_ctl"),
            "-D",
            str(self.root / "data"),
            "-l",
            str(self.root / "server.log"),
            "-o",
            options,
            "-w",
            "start",
        )

    def stop(self) -> None:
        data = str(self.root / "data")
        self._run(str(self.bin / "pg_ctl"), "-D", data, "-m", "fast", "-w", "stop")


@pytest.fixture
def private_postgres() -> Iterator[PrivatePostgres]:
    binaries = postgres_bin()
    if binaries is None:
        pytest.skip("PostgreSQL server binaries (/usr/lib/postgresql/*/bin) are not installed")
    # Not under pytest's tmp_path: the postgres user cannot enter root's 0700 folders.
    root = Path(tempfile.mkdtemp(prefix="mergeopt-pg-"))
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
    server = PrivatePostgres(bin=binaries, root=root, port=free_port())
    server.init()
    server.start()
    yield server
    if (root / "data" / "postmaster.pid").exists():
        server.stop()
    shutil.rmtree(root, ignore_errors=True)


def create(tmp_path: Path, zoo: Path, url: str, name: str, outage_limit: int) -> None:
    spec = tiny_spec(
        zoo,
        name=name,
        worker={
            "heartbeat_interval": 1,
            "grace_period": 4,
            "max_retry": 3,
            "database_outage_limit": outage_limit,
        },
    )
    for objective in spec["objectives"]:
        objective["limit"] = 8
    result = run_cli(
        "study", "create", str(write_spec(tmp_path / f"{name}.yaml", spec)), "--storage", url
    )
    assert result.returncode == 0, result.stderr


def counts(url: str, name: str) -> dict[str, int]:
    from mergeopt.storage import load_study
    from mergeopt.study import trial_counts

    return trial_counts(load_study(name, url))


def assert_consistent(study: optuna.Study, n_trials: int) -> None:
    from mergeopt.study import trial_counts

    states = trial_counts(study)
    assert states["COMPLETE"] == n_trials, states
    assert states["RUNNING"] == 0, states
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    times = Counter(tuple(sorted(t.params.items())) for t in complete)
    assert all(n == 1 for n in times.values()), "a candidate was completed twice"


def test_workers_ride_out_a_database_restart(
    tmp_path: Path, zoo_dir: Path, private_postgres: PrivatePostgres
) -> None:
    url = private_postgres.url
    create(tmp_path, zoo_dir, url, "outage", outage_limit=120)
    started = time.monotonic()
    process = start_run("outage", url, n_trials=N_TRIALS, workers=2)
    wait_for(lambda: counts(url, "outage")["COMPLETE"] >= 3)
    private_postgres.stop()
    down_at = time.monotonic()
    time.sleep(8)  # longer than the grace period: every heartbeat is stale when it is back
    private_postgres.start()
    down = time.monotonic() - down_at
    _, stderr = process.communicate(timeout=600)
    wall = time.monotonic() - started
    assert process.returncode == 0, stderr[-4000:]
    assert "Traceback" not in stderr
    retries = [line for line in stderr.splitlines() if "unreachable (" in line]
    assert retries, stderr[-4000:]
    assert "reachable again" in stderr
    assert "***" not in url or all("***" in line for line in retries)

    from mergeopt.storage import load_study

    study = load_study("outage", url)
    assert_consistent(study, N_TRIALS)
    failed = study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
    print(
        f"database restart: down {down:.1f} s under 2 workers, {len(retries)} retry lines, "
        f"{len(failed)} trials failed and retried, {N_TRIALS} complete, {wall:.1f} s wall\n"
        f"  first retry line: {retries[0]}"
    )


def test_workers_stop_cleanly_when_the_database_stays_down(
    tmp_path: Path, zoo_dir: Path, private_postgres: PrivatePostgres
) -> None:
    url = private_postgres.url
    create(tmp_path, zoo_dir, url, "gone", outage_limit=10)
    process = start_run("gone", url, n_trials=N_TRIALS, workers=2)
    wait_for(lambda: counts(url, "gone")["COMPLETE"] >= 2)
    private_postgres.stop()
    down_at = time.monotonic()
    _, stderr = process.communicate(timeout=300)
    stopped_after = time.monotonic() - down_at
    assert process.returncode == 3, stderr[-4000:]
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert errors, stderr[-4000:]
    for line in errors:
        assert line.startswith(f"error: database {url} unreachable for "), line
        assert line.endswith("s; the study is consistent, rerun `mergeopt study run` to continue")
    assert 10 <= stopped_after < 120

    private_postgres.start()
    result = run_cli("study", "run", "gone", "-n", str(N_TRIALS), "-w", "2", "--storage", url)
    assert result.returncode == 0, result.stderr[-4000:]

    from mergeopt.storage import load_study

    assert_consistent(load_study("gone", url), N_TRIALS)
    print(
        f"database down for good: workers stopped {stopped_after:.1f} s after the server "
        f"(limit 10 s) with {len(errors)} error lines; the rerun completed {N_TRIALS} trials"
    )
