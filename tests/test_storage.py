"""Storage URLs: precedence, drivers, masked passwords, clear errors for unreachable servers."""

from __future__ import annotations

import time

import pytest

from mergeopt.errors import UserError
from mergeopt.storage import DEFAULT_STORAGE, mask_url, open_storage, resolve_storage_url


def test_precedence_is_flag_then_environment_then_spec_then_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("MERGEOPT_STORAGE", raising=False)
    assert resolve_storage_url(None, None) == DEFAULT_STORAGE
    assert resolve_storage_url(None, "sqlite:///spec.db") == "sqlite:///spec.db"
    monkeypatch.setenv("MERGEOPT_STORAGE", "sqlite:///env.db")
    assert resolve_storage_url(None, "sqlite:///spec.db") == "sqlite:///env.db"
    assert resolve_storage_url("sqlite:///flag.db", "sqlite:///spec.db") == "sqlite:///flag.db"


def test_passwords_are_masked() -> None:
    assert mask_url("postgresql://u:hunter2@db:5432/x") == "postgresql://u:***@db:5432/x"
    assert "hunter2" not in mask_url("mysql+pymysql://root:hunter2@127.0.0.1/x")


def test_sqlite_storage_uses_wal(sqlite_url: str) -> None:
    import sqlite3

    open_storage(sqlite_url)
    path = sqlite_url.removeprefix("sqlite:///")
    with sqlite3.connect(path) as connection:
        assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


@pytest.mark.postgres
def test_postgres_url_without_driver_works(postgres_url: str) -> None:
    assert open_storage(postgres_url).url.startswith("postgresql+psycopg://")


@pytest.mark.mysql
def test_mysql_url_without_driver_works(mariadb_url: str) -> None:
    assert open_storage(mariadb_url).url.startswith("mysql+pymysql://")


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgresql://postgres:hunter2@127.0.0.1:1/x", "cannot connect"),
        ("mysql://root:hunter2@127.0.0.1:3306/test", "Access denied"),
        ("mongodb://localhost/x", "unsupported database"),
        ("not a url", "not a database URL"),
        ("sqlite:////no/such/folder/x.db", "does not exist"),
    ],
)
def test_bad_storage_urls_are_one_line_without_the_password(url: str, expected: str) -> None:
    with pytest.raises(UserError) as raised:
        open_storage(url)
    message = str(raised.value)
    assert expected in message
    assert "hunter2" not in message
    assert "\n" not in message


def _take_queued_trials(url: str, study_name: str, start_at: float) -> list[int]:
    """A worker process: ask until the queue is empty; the numbers of the trials it took."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=study_name, storage=open_storage(url))
    distributions = {"x": optuna.distributions.FloatDistribution(0.0, 1.0)}
    while time.time() < start_at:  # every worker starts popping at the same moment
        time.sleep(0.001)
    taken = []
    while True:
        trial = study.ask(distributions)
        if "queued" not in trial.user_attrs:  # the queue is empty: a fresh trial
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            return taken
        taken.append(trial.number)
        study.tell(trial, 0.0)


@pytest.mark.parametrize(
    "backend",
    ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)],
)
def test_each_queued_trial_is_handed_to_exactly_one_worker(
    backend: str, request: pytest.FixtureRequest
) -> None:
    # Optuna's own hand-out relies on SELECT ... FOR UPDATE, which SQLite ignores: two demo
    # workers took the same enqueued expert trial and one died on a unique constraint.
    import multiprocessing

    import optuna

    url = request.getfixturevalue(f"{backend}_url")
    study = optuna.create_study(storage=open_storage(url), study_name="queue")
    queued = 60
    for i in range(queued):
        study.enqueue_trial({"x": i / queued}, user_attrs={"queued": True})
    workers = 4
    start_at = time.time() + 3.0  # after every process has imported optuna
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        taken = pool.starmap(_take_queued_trials, [(url, "queue", start_at)] * workers)
    numbers = [n for worker in taken for n in worker]
    assert sorted(numbers) == list(range(queued))  # none twice, none lost


@pytest.mark.parametrize("claimed", [True, False])
def test_a_candidate_taken_over_by_a_trial_whose_worker_died_is_queued_once(
    sqlite_url: str, claimed: bool
) -> None:
    # A waiting trial pops a queued candidate, marks it taken and (claimed) records it as its
    # own; its worker dies before closing the popped trial. Both are failed as stale: exactly
    # one retry copy may hold the candidate (the taker's when it claimed it, else the popped
    # trial's), never both.
    import optuna
    from optuna.trial import TrialState

    from mergeopt import attrs
    from mergeopt.optuna_compat import clock_unbeaten_trials, fixed_params

    storage = open_storage(sqlite_url, heartbeat_interval=1, grace_period=1)
    study = optuna.create_study(storage=storage)
    taker = study.ask()
    study.enqueue_trial({"x": 0.5})
    queued = study.get_trials(states=(TrialState.WAITING,))[0]
    assert storage.set_trial_state_values(queued._trial_id, TrialState.RUNNING)
    attrs.TAKEN_BY.set_on(study, queued, taker.number)
    if claimed:
        storage.set_trial_system_attr(
            taker._trial_id,
            attrs.sampler_prefix("saasbo") + attrs.ASSIGNED,
            {"params": {"x": 0.5}, "user_attrs": {}},
        )
    time.sleep(1.2)
    clock_unbeaten_trials(study)  # neither trial ever beat: start their clocks
    time.sleep(2.5)  # past the grace period, at the database clock's one-second resolution
    optuna.storages.fail_stale_trials(study)

    holders = []
    for trial in study.get_trials(states=(TrialState.WAITING,)):
        assigned = trial.system_attrs.get(attrs.sampler_prefix("saasbo") + attrs.ASSIGNED)
        if fixed_params(trial) == {"x": 0.5} or (assigned and assigned["params"] == {"x": 0.5}):
            holders.append(trial.system_attrs["failed_trial"])
    assert holders == [taker.number if claimed else queued.number]
