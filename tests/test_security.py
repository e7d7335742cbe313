"""Security promises: storage passwords never leave the URL they came in, nothing read from a
study database is unpickled, exports never replace a folder without ``--force``, and the
dashboard is only ever shown bound to 127.0.0.1."""

from __future__ import annotations

import hashlib
import json
import pickle
import re
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import optuna
import pytest
import yaml

from tests.conftest import REPO, run_cli, tiny_spec, write_spec
from tests.test_bad_inputs import _RunsCode, assert_one_line_error
from tests.test_bad_inputs import mariadb_password_user as mariadb_password_user  # fixture

MERGEOPT = REPO / "mergeopt"


@dataclass
class PasswordStudy:
    """A study created, run, inspected and exported through a URL with a password."""

    name: str
    url: str  # with the password
    admin_url: str  # root, no password: what the tests read the database with
    password: str
    user: str
    folder: Path
    outputs: dict[str, subprocess.CompletedProcess[str]] = field(default_factory=dict)


@pytest.fixture(scope="module")
def password_study(
    tmp_path_factory: pytest.TempPathFactory, zoo_dir: Path, mariadb_password_user: dict[str, str]
) -> Iterator[PasswordStudy]:
    account = mariadb_password_user
    folder = tmp_path_factory.mktemp("password-study")
    url = f"mysql://{account['user']}:{account['password']}@127.0.0.1:3306/{account['database']}"
    study = PasswordStudy(
        name=f"secure-{uuid.uuid4().hex[:6]}",
        url=url,
        admin_url=f"mysql+pymysql://root@127.0.0.1:3306/{account['database']}",
        password=account["password"],
        user=account["user"],
        folder=folder,
    )
    spec = tiny_spec(zoo_dir, name=study.name, storage=url)  # the spec names the storage
    for objective in spec["objectives"]:
        objective["limit"] = 4
    spec["scorer"]["max_new_tokens"] = 8
    spec_path = write_spec(folder / "spec.yaml", spec)
    env = {"MERGEOPT_CACHE": str(folder / "cache")}
    steps = {
        "create": ["study", "create", str(spec_path)],
        "run": [
            "study",
            "run",
            study.name,
            "-n",
            "2",
            "--workers",
            "1",
            "--no-progress",
            "--storage",
            url,
        ],  # fmt: skip
        "status": ["study", "status", study.name, "--storage", url],
        "status_json": ["study", "status", study.name, "--json", "--storage", url],
        "list": ["study", "list", "--storage", url],
        "export": [
            "study",
            "export",
            study.name,
            "--pareto",
            "--format",
            "both",
            "--out",
            str(folder / "export"),
            "--storage",
            url,
        ],  # fmt: skip
        "plot": [
            "study",
            "plot",
            study.name,
            "--out",
            str(folder / "plots"),
            "--artifact-dir",
            str(folder / "artifacts"),
            "--storage",
            url,
        ],  # fmt: skip
        "status_by_env": ["study", "status", study.name],
    }
    for step, args in steps.items():
        step_env = {**env, "MERGEOPT_STORAGE": url} if step == "status_by_env" else env
        result = run_cli(*args, env=step_env, timeout=600)
        assert result.returncode == 0, f"{step}: {result.stderr}"
        study.outputs[step] = result
    yield study


def _all_attrs(admin_url: str, name: str) -> str:
    """Every study and trial attribute of a study, user and system, as one JSON text."""
    storage = optuna.storages.RDBStorage(admin_url)
    try:
        study = optuna.load_study(study_name=name, storage=storage)
        return json.dumps(
            {
                "study_user": study.user_attrs,
                "study_system": storage.get_study_system_attrs(study._study_id),
                "trials": [
                    {"user": t.user_attrs, "system": t.system_attrs}
                    for t in study.get_trials(deepcopy=False)
                ],
            }
        )
    finally:
        storage.engine.dispose()


@pytest.mark.slow
@pytest.mark.mysql
def test_password_appears_nowhere(password_study: PasswordStudy) -> None:
    """Not in any command's output (create, run, status, list, export, plot), not in the
    study's or trials' attributes, not in any file written (export, plots, artifacts)."""
    study = password_study
    masked = f"{study.user}:***@"
    for step, result in study.outputs.items():
        assert study.password not in result.stdout + result.stderr, step
    assert masked in study.outputs["create"].stdout
    assert masked in study.outputs["run"].stdout  # the dashboard hint names the storage
    assert study.password not in _all_attrs(study.admin_url, study.name)
    written = [
        p for p in study.folder.rglob("*") if p.is_file() and p.name != "spec.yaml"
    ]  # the spec is the user's own file, with the URL they wrote
    assert any(p.name == "mergeopt.json" for p in written)
    assert any(p.name == "index.json" for p in written)
    for path in written:
        assert study.password.encode() not in path.read_bytes(), path
    index = json.loads(next(p for p in written if p.name == "index.json").read_text())
    assert index["storage"].startswith(f"mysql://{masked}")


@pytest.mark.slow
@pytest.mark.mysql
def test_dashboard_hints_bind_to_localhost(password_study: PasswordStudy) -> None:
    """The commands the CLI prints for opening the dashboard bind to 127.0.0.1."""
    printed = [
        line
        for result in password_study.outputs.values()
        for line in result.stdout.splitlines()
        if "optuna-dashboard" in line
    ]
    assert printed, "run and plot print the dashboard command"
    for line in printed:
        assert "--host 127.0.0.1" in line, line
        assert password_study.password not in line


def test_readme_dashboard_commands_bind_to_localhost() -> None:
    from mergeopt.dashboard import dashboard_command

    for document in (REPO / "README.md", REPO / "docs" / "inspection.md"):
        commands = re.findall(r"optuna-dashboard\s+(?:--\S+|\S+://)[^\n`]*", document.read_text())
        assert commands, document
        for command in commands:
            assert "--host 127.0.0.1" in command, (document, command)
    assert "--host 127.0.0.1" in dashboard_command("sqlite:///mergeopt.db")
    hidden = dashboard_command("postgresql://mergeopt:secret@db-host/mergeopt")
    assert "--host 127.0.0.1" in hidden and "secret" not in hidden


# --------------------------------------------------------------------------- no unpickling


def _sources() -> list[Path]:
    return sorted(MERGEOPT.rglob("*.py"))


def test_no_module_unpickles() -> None:
    """mergeopt never imports pickle, dill, cloudpickle or joblib, never loads numpy pickles or
    unsafe YAML, and every torch.load is weights-only."""
    forbidden = [
        re.compile(r"^\s*(import|from)\s+(pickle|cPickle|dill|cloudpickle|joblib)\b", re.M),
        re.compile(r"\bpickle\.loads?\("),
        re.compile(r"allow_pickle\s*=\s*True"),
        re.compile(r"\byaml\.(unsafe_load|full_load)\b|\b(Unsafe|Full)Loader\b"),
        re.compile(r"\byaml\.load\((?![^)]*Loader=_UniqueKeyLoader)"),
    ]
    for path in _sources():
        text = path.read_text()
        for pattern in forbidden:
            match = pattern.search(text)
            assert match is None, f"{path.relative_to(REPO)}: {match.group(0)!r}"
        for call in re.finditer(r"torch\.load\(", text):
            arguments = text[call.end() : text.find(")", call.end()) + 1]
            assert "weights_only=True" in arguments, f"{path.relative_to(REPO)}: torch.load"


def test_the_spec_loader_is_a_safe_loader() -> None:
    from mergeopt.spec import _UniqueKeyLoader

    assert issubclass(_UniqueKeyLoader, yaml.SafeLoader)


def test_studies_use_optuna_rdb_storage_only() -> None:
    """Optuna's RDBStorage keeps attrs as JSON; its Journal/Redis backends and the old cached
    storage pickle snapshots, so mergeopt must not use them."""
    for path in _sources():
        text = path.read_text()
        for name in ("JournalStorage", "JournalRedis", "RedisStorage", "_CachedStorage"):
            assert name not in text, f"{path.relative_to(REPO)} uses {name}"
    from mergeopt.storage import open_storage

    storage = open_storage("sqlite:///:memory:")
    assert isinstance(storage, optuna.storages.RDBStorage)
    # mergeopt's subclass only makes the hand-out of queued trials atomic; it stores nothing
    # in any other way.
    assert {name for name in vars(type(storage)) if not name.startswith("_")} == {
        "set_trial_state_values"
    }


@pytest.mark.slow
@pytest.mark.mysql
def test_a_pickle_planted_in_the_database_stays_a_string(
    password_study: PasswordStudy, tmp_path: Path
) -> None:
    """Someone who can write to the database plants a pickle that would run a command; every
    command that reads the study (status, run, export) treats it as the text it is."""
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_RunsCode(marker)).decode("latin-1")
    storage = optuna.storages.RDBStorage(password_study.admin_url)
    study = optuna.load_study(study_name=password_study.name, storage=storage)
    study.set_user_attr("planted", payload)
    storage.set_study_system_attr(study._study_id, "planted", payload)
    url = password_study.url
    for args in (
        ["study", "status", password_study.name, "--json", "--storage", url],
        [
            "study",
            "export",
            password_study.name,
            "--trial",
            "0",
            "--format",
            "mergekit",
            "--out",
            str(tmp_path / "export"),
            "--storage",
            url,
        ],  # fmt: skip
        [
            "study",
            "run",
            password_study.name,
            "-n",
            "3",
            "--workers",
            "1",
            "--no-progress",
            "--storage",
            url,
        ],  # fmt: skip
    ):
        result = run_cli(*args)
        assert result.returncode == 0, result.stderr
        assert not marker.exists()
    again = optuna.load_study(study_name=password_study.name, storage=storage)
    assert again.user_attrs["planted"] == payload
    assert storage.get_study_system_attrs(again._study_id)["planted"] == payload
    storage.engine.dispose()
    assert not marker.exists()


# --------------------------------------------------------------------------- exports


def _tree_digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        if p.is_file()
        else "dir"  # fmt: skip
        for p in sorted(folder.rglob("*"))
    }


@pytest.mark.slow
@pytest.mark.mysql
def test_export_replaces_an_existing_folder_only_with_force(
    password_study: PasswordStudy, tmp_path: Path
) -> None:
    out = tmp_path / "mine"
    (out / "notes").mkdir(parents=True)
    (out / "notes" / "todo.md").write_text("my own notes\n")
    (out / "weights.bin").write_bytes(b"\x00\x01" * 100)
    before = _tree_digest(out)
    base = ["study", "export", password_study.name, "--trial", "0", "--format", "mergekit",
            "--out", str(out), "--storage", password_study.url]  # fmt: skip

    refused = run_cli(*base)
    assert_one_line_error(refused, f"{out} already exists", "--force")
    assert _tree_digest(out) == before

    forced = run_cli(*base, "--force")
    assert forced.returncode == 0, forced.stderr
    assert sorted(p.name for p in out.iterdir()) == ["mergekit_config.yml", "mergeopt.json"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
