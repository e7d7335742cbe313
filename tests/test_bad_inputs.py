"""The bad-input corpus (``tests/bad_inputs/cases.yaml``): every mistake ends in one line.

Each case is built in its own tmp folder from the real tiny zoo (broken copies of its models,
broken task files, raw spec files), the CLI runs once in a fresh process, and the test asserts
what a user is promised: exit code 2, exactly one stderr line ``error: ...`` naming the
problem, no traceback, and nothing partial — no study after a failed ``study create``, no
export folder and no ``.NAME.tmp-*`` after a failed export or merge, and the prepared study
unchanged after any other command.
"""

from __future__ import annotations

import json
import os
import pickle
import resource
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml

from tests.conftest import MARIADB_ADMIN, REPO, run_cli, tiny_spec, write_spec

CORPUS = Path(__file__).parent / "bad_inputs"
CASES: list[dict[str, Any]] = yaml.safe_load((CORPUS / "cases.yaml").read_text())
CHEAP_GROUPS = ("yaml", "spec", "storage", "usage")  # they fail before any model or study is read
SMALL_DISK_BYTES = 2 * 1024 * 1024


def assert_one_line_error(result: subprocess.CompletedProcess[str], *needles: str) -> str:
    """Exit code 2 and a single stderr line ``error: ...`` holding every needle; returns it."""
    assert result.returncode == 2, result.stderr + result.stdout
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


def study_names(url: str) -> list[str]:
    storage = optuna.storages.RDBStorage(url)
    try:
        return [s.study_name for s in optuna.get_all_study_summaries(storage)]
    finally:
        storage.remove_session()
        storage.engine.dispose()


def study_snapshot(url: str) -> dict[str, Any]:
    """Everything a command could change in a storage: studies, their attrs, every trial."""
    storage = optuna.storages.RDBStorage(url)
    try:
        snapshot: dict[str, Any] = {}
        for summary in optuna.get_all_study_summaries(storage):
            study = optuna.load_study(study_name=summary.study_name, storage=storage)
            snapshot[summary.study_name] = {
                "user_attrs": study.user_attrs,
                "system_attrs": storage.get_study_system_attrs(study._study_id),
                "trials": [
                    (t.number, t.state.name, t.values, t.params, t.user_attrs, t.system_attrs)
                    for t in study.get_trials(deepcopy=False)
                ],
            }
        return snapshot
    finally:
        storage.remove_session()
        storage.engine.dispose()


# --------------------------------------------------------------------------- prepared study


@pytest.fixture(scope="session")
def finished_study(tmp_path_factory: pytest.TempPathFactory, zoo_dir: Path) -> Path:
    """A SQLite file holding study ``tiny`` with two COMPLETE trials (run by the real CLI);
    cases get a copy of it."""
    folder = tmp_path_factory.mktemp("finished-study")
    url = f"sqlite:///{folder / 'studies.db'}"
    spec = tiny_spec(zoo_dir)
    for objective in spec["objectives"]:
        objective["limit"] = 4
    spec["scorer"]["max_new_tokens"] = 8
    spec_path = write_spec(folder / "tiny.yaml", spec)
    created = run_cli("study", "create", str(spec_path), "--storage", url)
    assert created.returncode == 0, created.stderr
    ran = run_cli("study", "run", "tiny", "-n", "2", "--workers", "1", "--no-progress",
                  "--storage", url)  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    return folder / "studies.db"


@pytest.fixture(scope="session")
def mariadb_password_user(mariadb_url: str) -> Iterator[dict[str, str]]:
    """A MariaDB user that needs a password, with rights on the session's test database."""
    import sqlalchemy
    from sqlalchemy.engine import make_url

    database = make_url(mariadb_url).database
    user = f"mo_{uuid.uuid4().hex[:8]}"
    password = f"Right-{uuid.uuid4().hex[:12]}"
    engine = sqlalchemy.create_engine(MARIADB_ADMIN, isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        connection.execute(
            sqlalchemy.text(f"CREATE USER '{user}'@'127.0.0.1' IDENTIFIED BY '{password}'")
        )
        connection.execute(
            sqlalchemy.text(f"GRANT ALL PRIVILEGES ON {database}.* TO '{user}'@'127.0.0.1'")
        )
    yield {"user": user, "password": password, "database": str(database)}
    with engine.connect() as connection:
        connection.execute(sqlalchemy.text(f"DROP USER IF EXISTS '{user}'@'127.0.0.1'"))
    engine.dispose()


# --------------------------------------------------------------------------- preparers


@dataclass
class CaseContext:
    """One case's folder, placeholders and clean-ups."""

    tmp: Path
    zoo: Path
    values: dict[str, str]
    cleanups: list[Callable[[], None]] = field(default_factory=list)
    file_size_limit: int | None = None

    def fill(self, value: Any) -> Any:
        """``value`` with ``{name}`` placeholders replaced (recursively in lists and dicts)."""
        if isinstance(value, str):
            for name, replacement in self.values.items():
                value = value.replace("{" + name + "}", replacement)
            return value
        if isinstance(value, list):
            return [self.fill(v) for v in value]
        if isinstance(value, dict):
            return {self.fill(k): self.fill(v) for k, v in value.items()}
        return value

    @property
    def broken(self) -> Path:
        return Path(self.values["broken"])


def _broken_copy(ctx: CaseContext) -> Path:
    """A copy of the zoo's first expert to break."""
    shutil.copytree(ctx.zoo / "expert-direct", ctx.broken)
    return ctx.broken


def _state_dict(ctx: CaseContext) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(ctx.zoo / "expert-direct" / "model.safetensors")


def model_without_config(ctx: CaseContext) -> None:
    (_broken_copy(ctx) / "config.json").unlink()


def model_config_malformed(ctx: CaseContext) -> None:
    (_broken_copy(ctx) / "config.json").write_text('{"model_type": "qwen2",')


def model_config_unreadable(ctx: CaseContext) -> None:
    # chmod 000 does not stop root (CI runs as root): a folder in its place cannot be read
    # by anyone.
    folder = _broken_copy(ctx)
    (folder / "config.json").unlink()
    (folder / "config.json").mkdir()


def model_without_weights(ctx: CaseContext) -> None:
    (_broken_copy(ctx) / "model.safetensors").unlink()


def model_weights_truncated(ctx: CaseContext) -> None:
    weights = _broken_copy(ctx) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])


def model_pickle_only(ctx: CaseContext) -> None:
    import torch

    state = _state_dict(ctx)
    folder = _broken_copy(ctx)
    torch.save(state, folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()


class _RunsCode:
    """A pickle payload that runs a shell command when unpickled without restrictions."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def model_pickle_malicious(ctx: CaseContext) -> None:
    folder = _broken_copy(ctx)
    (folder / "model.safetensors").unlink()
    payload = {"model.embed_tokens.weight": _RunsCode(ctx.tmp / "pwned")}
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(payload))


def model_remote_code(ctx: CaseContext) -> None:
    config_path = _broken_copy(ctx) / "config.json"
    config = json.loads(config_path.read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    config_path.write_text(json.dumps(config))


def _save_model(config: Any, folder: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)


def model_other_architecture(ctx: CaseContext) -> None:
    from transformers import AutoConfig, LlamaConfig

    base = AutoConfig.from_pretrained(ctx.zoo / "base")
    llama = LlamaConfig(
        vocab_size=base.vocab_size,
        hidden_size=base.hidden_size,
        intermediate_size=base.intermediate_size,
        num_hidden_layers=base.num_hidden_layers,
        num_attention_heads=base.num_attention_heads,
        num_key_value_heads=base.num_key_value_heads,
        tie_word_embeddings=base.tie_word_embeddings,
    )
    _save_model(llama, ctx.broken)


def model_other_hidden_size(ctx: CaseContext) -> None:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(ctx.zoo / "base")
    config.hidden_size = config.hidden_size // 2
    _save_model(config, ctx.broken)


def model_missing_tensor(ctx: CaseContext) -> None:
    from safetensors.torch import save_file

    state = _state_dict(ctx)
    folder = _broken_copy(ctx)
    del state["model.norm.weight"]
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})


def _task(ctx: CaseContext, text: str | bytes, suffix: str = ".jsonl") -> None:
    path = ctx.tmp / f"broken-task{suffix}"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    ctx.values["task"] = str(path)


GOOD_LINE = '{"prompt": "Q: 1+1=\\nA:", "answer": "2"}\n'


def task_empty(ctx: CaseContext) -> None:
    _task(ctx, "\n")


def task_malformed(ctx: CaseContext) -> None:
    _task(ctx, GOOD_LINE * 2 + '{"prompt": "Q: 2+2=\\nA:", "answer": \n')


def task_without_answer(ctx: CaseContext) -> None:
    _task(ctx, GOOD_LINE + '{"prompt": "Q: 2+2=\\nA:"}\n')


def task_not_an_object(ctx: CaseContext) -> None:
    _task(ctx, '["Q: 1+1=", "2"]\n')


def task_csv_without_answer(ctx: CaseContext) -> None:
    _task(ctx, "prompt,solution\nQ: 1+1=,2\n", suffix=".csv")


def task_binary(ctx: CaseContext) -> None:
    _task(ctx, b"\xff\xfe\x00\x81 not text \x9c\n")


def task_mc_answer_out_of_range(ctx: CaseContext) -> None:
    _task(ctx, '{"question": "1+1?", "choices": ["2", "3"], "answer": 5}\n')


def binary_spec(ctx: CaseContext) -> None:
    Path(ctx.values["spec"]).write_bytes(b"name: tiny\n\xff\xfe\x81\x00 binary\n")


def existing_out(ctx: CaseContext) -> None:
    out = Path(ctx.values["out"])
    out.mkdir()
    (out / "keep.txt").write_text("a folder the user made\n")


def out_is_file(ctx: CaseContext) -> None:
    Path(ctx.values["out"]).write_text("a file the user made\n")


def small_disk(ctx: CaseContext) -> None:
    """``{out}`` on a real 2 MiB tmpfs (the zoo model is ~4.7 MB); where mounting is not
    allowed, the CLI runs with RLIMIT_FSIZE instead — a real write failure either way."""
    disk = ctx.tmp / "small-disk"
    disk.mkdir()
    try:
        mounted = (
            subprocess.run(
                ["mount", "-t", "tmpfs", "-o", f"size={SMALL_DISK_BYTES}", "tmpfs", str(disk)],
                capture_output=True,
            ).returncode
            == 0
        )
    except FileNotFoundError:  # no mount(8) in this container
        mounted = False
    if mounted:
        ctx.cleanups.append(lambda: subprocess.run(["umount", str(disk)], check=True))
    else:
        ctx.file_size_limit = SMALL_DISK_BYTES
    ctx.values["out"] = str(disk / "out")


def _mergekit_config(ctx: CaseContext, text: str | bytes) -> None:
    path = ctx.tmp / "config.yml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)


def _mergekit_config_with(ctx: CaseContext, model: str, method: str = "task_arithmetic") -> None:
    _mergekit_config(
        ctx,
        yaml.safe_dump(
            {
                "merge_method": method,
                "base_model": str(ctx.zoo / "base"),
                "models": [{"model": model, "parameters": {"weight": 0.5}}],
                "dtype": "float32",
            }
        ),
    )


def mergekit_config_malformed(ctx: CaseContext) -> None:
    _mergekit_config(ctx, "merge_method: [task_arithmetic\nbase_model: x\n")


def mergekit_config_binary(ctx: CaseContext) -> None:
    _mergekit_config(ctx, b"merge_method: \xff\xfe\x81\n")


def mergekit_config_unknown_method(ctx: CaseContext) -> None:
    _mergekit_config_with(ctx, str(ctx.zoo / "expert-direct"), method="frankenmerge")


def mergekit_config_missing_model(ctx: CaseContext) -> None:
    _mergekit_config_with(ctx, str(ctx.tmp / "no-such-model"))


def mergekit_config_with_broken_model(ctx: CaseContext) -> None:
    _mergekit_config_with(ctx, str(ctx.broken))


def mergekit_config_valid(ctx: CaseContext) -> None:
    _mergekit_config_with(ctx, str(ctx.zoo / "expert-direct"))


PREPARERS: dict[str, Callable[[CaseContext], None]] = {
    f.__name__: f
    for f in (
        model_without_config,
        model_config_malformed,
        model_config_unreadable,
        model_without_weights,
        model_weights_truncated,
        model_pickle_only,
        model_pickle_malicious,
        model_remote_code,
        model_other_architecture,
        model_other_hidden_size,
        model_missing_tensor,
        task_empty,
        task_malformed,
        task_without_answer,
        task_not_an_object,
        task_csv_without_answer,
        task_binary,
        task_mc_answer_out_of_range,
        binary_spec,
        existing_out,
        out_is_file,
        small_disk,
        mergekit_config_malformed,
        mergekit_config_binary,
        mergekit_config_unknown_method,
        mergekit_config_missing_model,
        mergekit_config_with_broken_model,
        mergekit_config_valid,
    )
}


# --------------------------------------------------------------------------- building a case


def _set_path(data: Any, dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        data = data[int(part)] if isinstance(data, list) else data.setdefault(part, {})
    if isinstance(data, list):
        data[int(last)] = value
    else:
        data[last] = value


def _unset_path(data: Any, dotted: str) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        data = data[int(part)] if isinstance(data, list) else data[part]
    del data[int(last) if isinstance(data, list) else last]


def _run(args: list[str], ctx: CaseContext) -> subprocess.CompletedProcess[str]:
    env = {"MERGEOPT_CACHE": str(ctx.tmp / "cache")}  # conversions never touch ~/.cache
    if ctx.file_size_limit is None:
        return run_cli(*args, env=env, timeout=300)
    limit = ctx.file_size_limit

    def limit_file_size() -> None:  # runs in the child, before exec
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes fail with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return subprocess.run(
        [sys.executable, "-m", "mergeopt.cli", *args],
        capture_output=True,
        text=True,
        env={**{k: v for k, v in os.environ.items() if k != "MERGEOPT_STORAGE"}, **env},
        timeout=300,
        cwd=REPO,
        preexec_fn=limit_file_size,
    )


def _marks(case: dict[str, Any]) -> list[pytest.MarkDecorator]:
    marks = [] if case["group"] in CHEAP_GROUPS else [pytest.mark.slow]
    if "mariadb" in json.dumps(case):
        marks.append(pytest.mark.mysql)
    return marks


def _leftovers(folder: Path, name: str) -> list[str]:
    """Temporary folders an export or merge of ``name`` left in ``folder``."""
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(f".{name}."))


@pytest.mark.parametrize(
    "case", [pytest.param(c, id=c["id"], marks=_marks(c)) for c in CASES]
)  # fmt: skip
def test_bad_input(case: dict[str, Any], tmp_path: Path, request: pytest.FixtureRequest) -> None:
    zoo: Path = request.getfixturevalue("zoo_dir")
    ctx = CaseContext(
        tmp=tmp_path,
        zoo=zoo,
        values={
            "tmp": str(tmp_path),
            "zoo": str(zoo),
            "spec": str(tmp_path / "spec.yaml"),
            "broken": str(tmp_path / "broken-model"),
            "out": str(tmp_path / "out"),
        },
    )
    uses_study = case["group"] in ("study", "export")
    if uses_study:
        db = tmp_path / "studies.db"
        shutil.copy(request.getfixturevalue("finished_study"), db)
        ctx.values["storage"] = f"sqlite:///{db}"
    else:
        ctx.values["storage"] = f"sqlite:///{tmp_path / 'studies.db'}"
    if "{mariadb_" in json.dumps(case):
        account = request.getfixturevalue("mariadb_password_user")
        ctx.values.update(mariadb_user=account["user"], mariadb_db=account["database"])
    if "storage" in case:
        ctx.values["storage"] = ctx.fill(case["storage"])

    for name in case.get("prepare", []):
        PREPARERS[name](ctx)
    spec_path = Path(ctx.values["spec"])
    if "spec_file" in case:
        shutil.copy(CORPUS / "specs" / case["spec_file"], spec_path)
    elif not spec_path.exists():  # else a preparer wrote it
        spec = tiny_spec(zoo)
        for dotted in case.get("unset", []):
            _unset_path(spec, dotted)
        for dotted, value in (case.get("spec") or {}).items():
            _set_path(spec, dotted, ctx.fill(value))
        write_spec(spec_path, spec)

    args = case.get("args") or ["study", "create", "{spec}", "--storage", "{storage}"]
    storage = ctx.values["storage"]
    before = study_snapshot(storage) if uses_study else None
    out = Path(ctx.values["out"])
    out_before = sorted(p.name for p in out.iterdir()) if out.is_dir() else None
    databases_before = sorted(tmp_path.rglob("*.db"))
    try:
        result = _run([str(a) for a in ctx.fill(args)], ctx)
    finally:
        for cleanup in ctx.cleanups:
            cleanup()

    line = assert_one_line_error(result, *ctx.fill(case["needles"]))
    if "needles_any" in case:
        assert any(n in line.lower() for n in case["needles_any"]), line
    for secret in ctx.fill(case.get("absent", [])):
        assert secret not in result.stdout + result.stderr
    assert not (tmp_path / "pwned").exists(), "a pickle payload ran"
    assert not (REPO / "pwned-by-yaml").exists(), "a YAML python tag ran"

    # Nothing partial: no new SQLite file (a failed create or a read command makes none).
    assert sorted(tmp_path.rglob("*.db")) == databases_before
    if (
        case["command"] == "create"
        and storage.startswith("sqlite:///")
        and Path(storage.removeprefix("sqlite:///")).is_file()
    ):
        assert study_names(storage) == []
    if case["command"] == "create" and "{mariadb_" in json.dumps(case):
        account = request.getfixturevalue("mariadb_password_user")
        admin = f"mysql+pymysql://root@127.0.0.1:3306/{account['database']}"
        assert "tiny" not in study_names(admin)
    if uses_study:
        assert study_snapshot(storage) == before
    if case["command"] in ("export", "merge"):
        now = sorted(p.name for p in out.iterdir()) if out.is_dir() else None
        assert now == out_before, f"{out} changed: {out_before} -> {now}"
        assert _leftovers(out.parent, out.name) == []
        assert not (ctx.tmp / "cache").exists() or case["group"] == "models"


def test_corpus_is_complete() -> None:
    """At least 40 cases, unique ids, every builder and raw spec file exists."""
    ids = [case["id"] for case in CASES]
    assert len(ids) >= 40
    assert len(set(ids)) == len(ids)
    for case in CASES:
        assert case["group"] in ("yaml", "spec", "models", "tasks", "storage", "study", "usage",
                                 "export", "merge"), case["id"]  # fmt: skip
        assert case["needles"], case["id"]
        for name in case.get("prepare", []):
            assert name in PREPARERS, (case["id"], name)
        if "spec_file" in case:
            assert (CORPUS / "specs" / case["spec_file"]).is_file(), case["id"]


# --------------------------------------------------------------------------- the opt-ins


def _opt_in_spec(tmp_path: Path, zoo: Path, expert: Path, **models: bool) -> Path:
    spec = tiny_spec(zoo)
    spec["models"]["experts"][0] = str(expert)
    spec["models"].update(models)
    for objective in spec["objectives"]:
        objective["limit"] = 4
    spec["scorer"]["max_new_tokens"] = 8
    return write_spec(tmp_path / f"spec-{len(list(tmp_path.glob('spec-*')))}.yaml", spec)


def _stored_models(url: str) -> dict[str, Any]:
    from mergeopt.attrs import SPEC

    study = optuna.load_study(study_name="tiny", storage=url)
    return study.user_attrs[SPEC]["models"]


@pytest.mark.slow
def test_allow_pickle_converts_a_pickle_expert_that_workers_then_use(
    tmp_path: Path, zoo_dir: Path
) -> None:
    """Refused by default; ``--allow-pickle`` (or ``models.allow_pickle: true``) reads the
    ``.bin`` with weights-only unpickling, converts it to safetensors in $MERGEOPT_CACHE, and a
    worker merges the converted expert."""
    from safetensors.torch import load_file

    ctx = CaseContext(tmp=tmp_path, zoo=zoo_dir, values={"broken": str(tmp_path / "pickled")})
    model_pickle_only(ctx)
    env = {"MERGEOPT_CACHE": str(tmp_path / "cache")}
    url = f"sqlite:///{tmp_path / 'studies.db'}"
    spec_path = _opt_in_spec(tmp_path, zoo_dir, ctx.broken)

    refused = run_cli("study", "create", str(spec_path), "--storage", url, env=env)
    assert_one_line_error(refused, "pytorch_model.bin", "--allow-pickle")
    assert not (tmp_path / "cache").exists()

    created = run_cli("study", "create", str(spec_path), "--storage", url, "--allow-pickle",
                      env=env)  # fmt: skip
    assert created.returncode == 0, created.stderr
    assert _stored_models(url)["allow_pickle"] is True
    (converted,) = (tmp_path / "cache" / "safetensors").iterdir()
    original = load_file(zoo_dir / "expert-direct" / "model.safetensors")
    assert load_file(converted / "model.safetensors").keys() == original.keys()
    assert (converted / "config.json").read_text() == (ctx.broken / "config.json").read_text()

    ran = run_cli("study", "run", "tiny", "-n", "1", "--workers", "1", "--no-progress",
                  "--storage", url, env=env)  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    trials = optuna.load_study(study_name="tiny", storage=url).trials
    assert [t.state.name for t in trials if t.state.name != "WAITING"] == ["COMPLETE"]

    other_url = f"sqlite:///{tmp_path / 'other.db'}"
    still_refused = run_cli("study", "create", str(spec_path), "--storage", other_url, env=env)
    assert_one_line_error(still_refused, "pytorch_model.bin", "--allow-pickle")  # per study
    by_spec = _opt_in_spec(tmp_path, zoo_dir, ctx.broken, allow_pickle=True)
    again = run_cli("study", "create", str(by_spec), "--storage", other_url, env=env)
    assert again.returncode == 0, again.stderr


@pytest.mark.slow
def test_trust_remote_code_accepts_an_auto_map_config(tmp_path: Path, zoo_dir: Path) -> None:
    """``--trust-remote-code`` (or the spec field) lets an ``auto_map`` config through at create
    and records the choice in the stored spec, which the scorer then follows."""
    ctx = CaseContext(tmp=tmp_path, zoo=zoo_dir, values={"broken": str(tmp_path / "remote")})
    model_remote_code(ctx)
    url = f"sqlite:///{tmp_path / 'studies.db'}"
    spec_path = _opt_in_spec(tmp_path, zoo_dir, ctx.broken)
    created = run_cli("study", "create", str(spec_path), "--storage", url, "--trust-remote-code")
    assert created.returncode == 0, created.stderr
    assert _stored_models(url)["trust_remote_code"] is True

    by_spec = _opt_in_spec(tmp_path, zoo_dir, ctx.broken, trust_remote_code=True)
    other_url = f"sqlite:///{tmp_path / 'other.db'}"
    again = run_cli("study", "create", str(by_spec), "--storage", other_url)
    assert again.returncode == 0, again.stderr
    assert _stored_models(other_url)["trust_remote_code"] is True
