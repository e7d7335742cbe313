"""Experiment trackers (spec ``tracking:``): a real study on the zoo, two workers, logged to a
real MLflow SQLite store and to Weights & Biases in offline mode, read back from both; bad
tracker specs; and trackers that fail without failing a trial."""

from __future__ import annotations

import json
import logging
import math
import struct
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.trial import TrialState

from mergeopt.errors import UserError
from mergeopt.spec import StudySpec
from mergeopt.tracking import TRACKERS, WorkerTrackers, check_tracking, prepare_tracking
from tests.conftest import run_cli, tiny_spec, write_spec

OBJECTIVES = ["accuracy", "tokens"]
COSTS = [
    "cost/trial_seconds",
    "cost/merge_seconds",
    "cost/eval_seconds",
    "cost/items_scored",
    "cost/tokens_generated",
]


def wandb_env(tmp_path: Path) -> dict[str, str]:
    """W&B offline, everything it writes under ``tmp_path``."""
    folder = tmp_path / "wandb-home"
    folder.mkdir(exist_ok=True)
    return {
        "WANDB_MODE": "offline",
        "WANDB_DIR": str(folder),
        "WANDB_CONFIG_DIR": str(folder / "config"),
        "WANDB_CACHE_DIR": str(folder / "cache"),
        "WANDB_DATA_DIR": str(folder / "data"),
    }


def wandb_records(path: Path) -> Iterator[Any]:
    """The records of an offline run's ``.wandb`` file (W&B's transaction log: a 7-byte
    ``:W&B`` header, then LevelDB-style chunks in 32 KiB blocks)."""
    from wandb.proto import wandb_internal_pb2

    block = 32768
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    position, pending = 7, b""
    while position + 7 <= len(data):
        left = block - position % block
        _checksum, length, kind = struct.unpack("<IHB", data[position : position + 7])
        if left < 7 or (kind == 0 and length == 0):  # block padding
            position += left
            continue
        chunk = data[position + 7 : position + 7 + length]
        position += 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk  # FULL, FIRST / MIDDLE, LAST
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def wandb_runs(folder: Path) -> list[dict[str, Any]]:
    """Each offline run under ``folder``: its name, group and history rows."""
    runs = []
    for path in sorted(folder.glob("wandb/offline-run-*/run-*.wandb")):
        run: dict[str, Any] = {"history": []}
        for record in wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run.update(name=record.run.display_name, group=record.run.run_group)
            elif kind == "history":
                run["history"].append(
                    {
                        item.key or "/".join(item.nested_key): json.loads(item.value_json)
                        for item in record.history.item
                    }
                )
        runs.append(run)
    return runs


@pytest.mark.slow
def test_a_study_logs_every_trial_to_mlflow_and_wandb(tmp_path: Path, zoo_dir: Path) -> None:
    import mlflow

    url = f"sqlite:///{tmp_path / 'studies.db'}"
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    spec = tiny_spec(
        zoo_dir,
        name="tracked",
        tracking={"mlflow": {"tracking_uri": tracking_uri}, "wandb": {"project": "mergeopt-test"}},
    )
    for objective in spec["objectives"]:
        objective["limit"] = 8  # the trackers are under test, not the merges
    env = wandb_env(tmp_path)
    created = run_cli(
        "study", "create", str(write_spec(tmp_path / "s.yaml", spec)), "--storage", url, env=env
    )
    assert created.returncode == 0, created.stderr
    assert created.stderr == ""  # no MLflow INFO lines while it creates its tables
    ran = run_cli(
        "study", "run", "tracked", "-n", "4", "-w", "2", "--storage", url, "--no-progress", env=env
    )
    assert ran.returncode == 0, ran.stderr
    assert "tracker" not in ran.stderr, ran.stderr  # no tracker warned
    assert "Run summary" not in ran.stderr + ran.stdout  # not one per worker at the end
    study = optuna.load_study(study_name="tracked", storage=url)
    trials = {t.number: t for t in study.get_trials(states=(TrialState.COMPLETE,))}
    assert len(trials) == 4

    # MLflow: one experiment named after the study (created once, by `study create`), one run
    # per trial named by its number, the objectives and costs as metrics, the recipe as params.
    client = mlflow.MlflowClient(tracking_uri)
    experiments = [e for e in client.search_experiments() if e.name == "tracked"]
    assert len(experiments) == 1
    runs = client.search_runs([experiments[0].experiment_id])
    assert sorted(int(run.info.run_name) for run in runs) == sorted(trials)
    for run in runs:
        trial = trials[int(run.info.run_name)]
        assert run.info.status == "FINISHED"
        for name, value in zip(OBJECTIVES, trial.values, strict=True):
            assert run.data.metrics[name] == pytest.approx(value)
        assert run.data.metrics["cost/eval_seconds"] == pytest.approx(
            trial.user_attrs["mergeopt:eval_seconds"]
        )
        assert run.data.metrics["cost/merge_seconds"] >= 0
        for name in ("items_scored", "tokens_generated"):
            assert run.data.metrics[f"cost/{name}"] == trial.user_attrs[f"mergeopt:{name}"] > 0
        assert run.data.metrics["cost/trial_seconds"] >= run.data.metrics["cost/eval_seconds"]
        assert {k: float(v) for k, v in run.data.params.items()} == pytest.approx(trial.params)
        assert run.data.tags["state"] == "COMPLETE"
        assert "mergeopt:recipe" in run.data.tags
    default = client.get_experiment_by_name("Default")
    assert default is None or not client.search_runs([default.experiment_id])

    # W&B: one run per worker process in a group named after the study; together their steps
    # are the trial numbers, each with the objectives, costs and parameters of its trial.
    wandb_logged = wandb_runs(Path(env["WANDB_DIR"]))
    assert len(wandb_logged) == 2
    assert {run["group"] for run in wandb_logged} == {"tracked"}
    assert all(run["name"].endswith("/cpu") for run in wandb_logged)
    rows = {row["_step"]: row for run in wandb_logged for row in run["history"]}
    assert sorted(rows) == sorted(trials)
    for number, row in rows.items():
        trial = trials[number]
        assert [row[name] for name in OBJECTIVES] == pytest.approx(trial.values)
        assert {name: row[name] for name in trial.params} == pytest.approx(trial.params)
        assert all(row[name] >= 0 for name in COSTS)


@pytest.mark.parametrize(
    ("tracking", "needles"),
    [
        ({"neptune": {}}, ["tracking", "unknown tracker 'neptune'", "mlflow, wandb"]),
        ({"mlflow": {"trackinguri": "x"}}, ["tracking.mlflow", "trackinguri", "unknown field"]),
        ({"wandb": {"as_multirun": "often"}}, ["tracking.wandb", "as_multirun"]),
        (
            {"mlflow": {"tracking_uri": "https://me:secret@mlflow.example"}},
            ["tracking.mlflow", "MLFLOW_TRACKING_PASSWORD"],
        ),
    ],
)
def test_bad_tracking_sections_are_one_line_user_errors(
    tracking: dict[str, Any], needles: list[str]
) -> None:
    with pytest.raises(UserError) as raised:
        check_tracking(tracking)
    message = str(raised.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message
    assert "secret" not in message


def test_a_list_of_tracker_names_means_their_defaults(zoo_dir: Path) -> None:
    spec = StudySpec.model_validate(tiny_spec(zoo_dir, tracking=["mlflow", "wandb"]))
    assert spec.tracking == {"mlflow": {}, "wandb": {}}
    assert StudySpec.model_validate(tiny_spec(zoo_dir)).tracking == {}  # off by default
    check_tracking(spec.tracking)


def test_a_missing_tracker_package_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # what `import wandb` sees when absent
    with pytest.raises(UserError, match=r"tracking\.wandb: the wandb package is not installed; "):
        prepare_tracking({"wandb": {}}, "s")
    with pytest.raises(UserError) as raised:
        prepare_tracking({"wandb": {}}, "s")
    assert "pip install -e '.[tracking]'" in str(raised.value)


def test_an_unusable_mlflow_store_at_create_is_a_user_error(tmp_path: Path) -> None:
    (tmp_path / "not-a-database").write_text("hello")
    uri = f"sqlite:///{tmp_path / 'not-a-database'}"
    with pytest.raises(UserError, match=r"^tracking\.mlflow: ") as raised:
        prepare_tracking({"mlflow": {"tracking_uri": uri}}, "s")
    assert "\n" not in str(raised.value)


def finished_trial(study: optuna.Study) -> optuna.Trial:
    trial = study.ask()
    trial.suggest_float("b00.e0.weight", 0.0, 1.0)
    trial.set_user_attr("mergeopt:eval_seconds", 0.5)
    study.tell(trial, [0.5, 7.0])
    return trial


def test_failing_trackers_warn_once_and_never_raise(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A store that breaks after the worker started, and a W&B that cannot start (online, no
    key, no network): each costs a warning line, never the trial."""
    for key, value in wandb_env(tmp_path).items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens there
    database = tmp_path / "mlflow.db"
    study = optuna.create_study(directions=["maximize", "minimize"], study_name="broken")
    caplog.set_level(logging.WARNING, logger="mergeopt")
    trackers = WorkerTrackers.open(
        {"mlflow": {"tracking_uri": f"sqlite:///{database}"}, "wandb": {}},
        study_name="broken",
        metric_names=OBJECTIVES,
        worker="host:1/cpu",
    )
    assert [t.name for t in trackers.trackers] == ["mlflow"]
    assert any("tracker wandb off in this worker" in r.getMessage() for r in caplog.records)
    caplog.clear()
    trial = finished_trial(study)
    database.write_bytes(b"this is no longer an sqlite database" * 100)
    trackers.report(study, trial)  # must not raise
    trackers.close()
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith("tracker mlflow could not log trial 0: ")
    assert "\n" not in warnings[0]


def test_every_tracker_in_the_registry_has_options_and_modules() -> None:
    for name, entry in TRACKERS.items():
        entry.options()  # every option has a default: `tracking: [name]` works
        assert entry.modules, name


def test_costs_follow_the_values_and_are_nan_when_missing() -> None:
    from mergeopt.tracking import with_costs

    study = optuna.create_study(directions=["maximize", "minimize"])
    finished_trial(study)
    frozen = with_costs(study.trials[0])
    assert frozen.values[:2] == [0.5, 7.0]
    trial_seconds, merge_seconds, eval_seconds, items, tokens = frozen.values[2:]
    assert trial_seconds >= 0 and math.isnan(merge_seconds) and eval_seconds == 0.5
    assert math.isnan(items) and math.isnan(tokens)
    assert study.trials[0].values == [0.5, 7.0]  # the stored trial is untouched
