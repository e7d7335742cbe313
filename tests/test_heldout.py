"""Held-out evaluation (`mergeopt study evaluate NAME --heldout`) and evaluation cost, end to end
on the zoo: one small dare_ties study (3 trials on 12 items) is evaluated, shown and exported.

The ``tokens`` objective's held-out file is its search file, so its held-out value must equal
the searched one exactly: that holds only if the held-out merge is the trial's merge, random
DARE masks (the trial's seed) included. ``accuracy`` is held out on items it never searched on.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.study import StudyDirection
from optuna.trial import TrialState, create_trial

from mergeopt import attrs
from mergeopt.errors import UserError
from mergeopt.export_choice import select_trials
from tests.conftest import EVERY_DATABASE, run_cli, tiny_spec, write_spec

ITEMS = 12
NAME = "held"


def _head(source: Path, target: Path, count: int) -> Path:
    target.write_text("".join(source.read_text().splitlines(keepends=True)[:count]))
    return target


def _load(url: str, name: str = NAME) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=url)


@pytest.fixture(scope="module")
def held_study(tmp_path_factory: pytest.TempPathFactory, zoo_dir: Path) -> str:
    """A dare_ties study of 3 COMPLETE trials whose objectives have held-out splits."""
    root = tmp_path_factory.mktemp("heldout")
    search = _head(zoo_dir / "tasks" / "arith.jsonl", root / "search.jsonl", ITEMS)
    heldout = _head(zoo_dir / "tasks" / "arith.heldout.jsonl", root / "heldout.jsonl", ITEMS)
    spec = tiny_spec(
        zoo_dir,
        name=NAME,
        merge={
            "method": "dare_ties",
            "blocks": {"num_blocks": 4},
            "search": {"weight": [0.0, 1.0], "density": [0.3, 1.0]},
        },
        objectives=[
            {"name": "accuracy", "task": str(search), "heldout": str(heldout)},
            {
                "name": "tokens",
                "task": str(search),
                "heldout": str(search),
                "metric": "mean_tokens",
                "direction": "minimize",
            },
        ],
    )
    url = f"sqlite:///{root / 'studies.db'}"
    created = run_cli(
        "study", "create", str(write_spec(root / "held.yaml", spec)), "--storage", url
    )
    assert created.returncode == 0, created.stderr
    ran = run_cli("study", "run", NAME, "-n", "3", "-w", "1", "--storage", url, "--no-progress")
    assert ran.returncode == 0, ran.stderr
    evaluated = run_cli("study", "evaluate", NAME, "--heldout", "--pareto", "--storage", url)
    assert evaluated.returncode == 0, evaluated.stderr
    # Off a terminal, progress is timestamped lines (a rich bar on one).
    assert " held-out evaluation: started (" in evaluated.stderr, evaluated.stderr
    assert " held-out evaluation: done in " in evaluated.stderr, evaluated.stderr
    return url


def test_every_trial_records_its_evaluation_cost(held_study: str) -> None:
    for trial in _load(held_study).get_trials(states=(TrialState.COMPLETE,)):
        assert trial.user_attrs[attrs.ITEMS_SCORED] == ITEMS  # one pass answers both objectives
        tokens = trial.user_attrs[attrs.TOKENS_GENERATED]
        assert isinstance(tokens, int) and tokens == round(trial.values[1] * ITEMS)
        assert trial.user_attrs[attrs.EVAL_SECONDS] > 0


def test_pareto_trials_are_scored_on_the_heldout_split_with_their_own_merge(
    held_study: str,
) -> None:
    study = _load(held_study)
    front = study.best_trials
    assert front
    for trial in front:
        held = trial.user_attrs[attrs.HELDOUT_VALUES]
        assert set(held) == {"accuracy", "tokens"}
        assert trial.user_attrs[attrs.HELDOUT_SEED] == trial.user_attrs[attrs.SEED]
        assert held["tokens"] == trial.values[1]  # same items, same merge, same DARE masks
        assert 0.0 <= held["accuracy"] <= 1.0
        cost = trial.user_attrs[attrs.HELDOUT_COST]
        assert cost["items_scored"] == 2 * ITEMS  # the held-out file, and the search file again
        assert cost["tokens_generated"] > 0 and cost["eval_seconds"] > 0


def test_status_shows_heldout_beside_search_values_and_the_evaluation_cost(
    held_study: str,
) -> None:
    study = _load(held_study)
    report = json.loads(run_cli("study", "status", NAME, "--json", "--storage", held_study).stdout)
    front = sum(attrs.HELDOUT_COST in t.user_attrs for t in study.trials)  # evaluated trials
    for row in report["pareto"]:
        trial = study.trials[row["trial"]]
        assert row["heldout"] == trial.user_attrs[attrs.HELDOUT_VALUES]
    cost = report["evaluation_cost"]
    assert cost["search"]["trials"] == 3 and cost["search"]["items_scored"] == 3 * ITEMS
    assert cost["heldout"]["trials"] == front
    assert cost["heldout"]["items_scored"] == front * 2 * ITEMS
    assert cost["total"]["tokens_generated"] == (
        cost["search"]["tokens_generated"] + cost["heldout"]["tokens_generated"]
    )
    wide = {"COLUMNS": "200"}  # rich fits the table to 80 columns off a terminal
    text = run_cli("study", "status", NAME, "--storage", held_study, env=wide).stdout
    assert "accuracy held-out" in text and "tokens held-out" in text
    assert f"evaluation cost: search: 3 trials, {3 * ITEMS} items" in text
    assert f"held-out: {front} trials, {front * 2 * ITEMS} items" in text


def test_a_random_merge_is_redone_with_the_trials_seed_and_evaluating_again_changes_nothing(
    held_study: str,
) -> None:
    before = _load(held_study)
    # The sampled trial: DARE drops weights at random (density < 1), unlike the experts alone.
    sampled = 2
    assert any(
        expert["density"] < 1.0
        for block in before.trials[sampled].user_attrs[attrs.RECIPE]
        for expert in block
    )
    # A Pareto trial the fixture evaluated already, evaluated again after another merge.
    again = min(t.number for t in before.best_trials if t.number != sampled)
    ran = run_cli(
        "study", "evaluate", NAME, "--heldout", "--trial", str(sampled), "--trial", str(again),
        "--device", "cpu", "--no-progress", "--storage", held_study,
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    after = _load(held_study)
    trial = after.trials[sampled]
    seed = trial.user_attrs[attrs.SEED]
    assert f"trial {sampled} (seed {seed}): held-out accuracy=" in ran.stdout
    assert trial.user_attrs[attrs.HELDOUT_SEED] == seed
    # The tokens objective is held out on its own search items: equal only with the same masks.
    assert trial.user_attrs[attrs.HELDOUT_VALUES]["tokens"] == trial.values[1]

    assert len(after.trials) == len(before.trials)
    old, new = before.trials[again], after.trials[again]
    assert new.user_attrs[attrs.HELDOUT_VALUES] == old.user_attrs[attrs.HELDOUT_VALUES]
    assert (
        new.user_attrs[attrs.HELDOUT_METRICS].keys() == old.user_attrs[attrs.HELDOUT_METRICS].keys()
    )
    assert set(new.user_attrs) == set(old.user_attrs)
    for key in ("items_scored", "tokens_generated"):
        assert new.user_attrs[attrs.HELDOUT_COST][key] == old.user_attrs[attrs.HELDOUT_COST][key]
    report = json.loads(run_cli("study", "status", NAME, "--json", "--storage", held_study).stdout)
    evaluated = sum(attrs.HELDOUT_COST in t.user_attrs for t in after.trials)
    assert report["evaluation_cost"]["heldout"]["trials"] == evaluated  # each trial counted once


def test_heldout_values_show_in_index_plot_and_dashboard_note(
    held_study: str, tmp_path: Path
) -> None:
    from mergeopt.dashboard import study_note_markdown

    exported = run_cli(
        "study", "export", NAME, "--pareto", "--format", "mergekit", "--out",
        str(tmp_path / "pareto"), "--storage", held_study,
    )  # fmt: skip
    assert exported.returncode == 0, exported.stderr
    index = (tmp_path / "pareto" / "index.md").read_text()
    assert "| accuracy ↑ | accuracy held-out | tokens ↓ | tokens held-out |" in index
    rows = json.loads((tmp_path / "pareto" / "index.json").read_text())["trials"]
    assert all(row["heldout"] is not None for row in rows)
    plotted = run_cli(
        "study", "plot", NAME, "--out", str(tmp_path / "plots"), "--storage", held_study
    )
    assert plotted.returncode == 0, plotted.stderr
    assert "held-out (line to its search point)" in (tmp_path / "plots" / "plots.html").read_text()
    assert "; held-out: accuracy = " in study_note_markdown(_load(held_study))


def test_export_on_heldout_picks_by_the_heldout_values(held_study: str, tmp_path: Path) -> None:
    study = _load(held_study)
    front = study.best_trials
    best = max(front, key=lambda t: (t.user_attrs[attrs.HELDOUT_VALUES]["accuracy"], -t.number))
    chosen = select_trials(study, preference=[1.0, 0.0], on="heldout")
    assert (
        chosen[0].user_attrs[attrs.HELDOUT_VALUES]["accuracy"]
        == (best.user_attrs[attrs.HELDOUT_VALUES]["accuracy"])
    )
    exported = run_cli(
        "study", "export", NAME, "--preference", "1,0", "--on", "heldout", "--format",
        "mergekit", "--out", str(tmp_path / "pick"), "--storage", held_study,
    )  # fmt: skip
    assert exported.returncode == 0, exported.stderr
    metadata = json.loads((tmp_path / "pick" / "mergeopt.json").read_text())
    assert metadata["trial"] == chosen[0].number
    assert metadata["heldout_values"] == chosen[0].user_attrs[attrs.HELDOUT_VALUES]


def _trial(number: int, values: list[float], heldout: dict[str, float] | None) -> Any:
    user_attrs = {attrs.HELDOUT_VALUES: heldout} if heldout is not None else {}
    return create_trial(
        values=values,
        params={"x": float(number)},
        distributions={"x": FloatDistribution(0, 10)},
        user_attrs=user_attrs,
    )


def _front_study(heldout: list[dict[str, float] | None]) -> optuna.Study:
    """Three mutually non-dominated trials (accuracy up, tokens down) with given held-out values."""
    study = optuna.create_study(directions=["maximize", "minimize"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(["accuracy", "tokens"])
    for number, (values, held) in enumerate(
        zip([[0.9, 20.0], [0.6, 10.0], [0.3, 5.0]], heldout, strict=True)
    ):
        study.add_trial(_trial(number, values, held))
    return study


def test_preference_and_best_on_heldout_use_heldout_values_not_search_values() -> None:
    # On the search split trial 0 is the most accurate; held out, trial 1 is, and trial 0 is
    # dominated by it (less accurate and longer).
    study = _front_study(
        [
            {"accuracy": 0.5, "tokens": 21.0},
            {"accuracy": 0.7, "tokens": 11.0},
            {"accuracy": 0.2, "tokens": 5.0},
        ]
    )
    assert select_trials(study, preference=[1.0, 0.0])[0].number == 0
    assert select_trials(study, preference=[1.0, 0.0], on="heldout")[0].number == 1
    assert select_trials(study, preference=[0.0, 1.0], on="heldout")[0].number == 2
    assert select_trials(study, best="accuracy", on="heldout")[0].number == 1
    assert study.directions == [StudyDirection.MAXIMIZE, StudyDirection.MINIMIZE]


def test_choosing_on_heldout_needs_heldout_values() -> None:
    study = _front_study([{"accuracy": 0.5, "tokens": 21.0}, None, None])
    with pytest.raises(UserError, match="Pareto trials 1, 2 .* no held-out values; first run"):
        select_trials(study, preference=[1.0, 0.0], on="heldout")
    with pytest.raises(UserError, match="--on heldout chooses by --best or --preference"):
        select_trials(study, pareto=True, on="heldout")
    with pytest.raises(UserError, match="--on: expected one of search, heldout"):
        select_trials(study, pareto=True, on="test")
    bare = _front_study([None, None, None])
    with pytest.raises(UserError, match="no trial of study .* has held-out values"):
        select_trials(bare, best="accuracy", on="heldout")


def _one_line_error(result: Any, expected: str) -> None:
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert expected in result.stderr, result.stderr


def test_mistakes_are_one_line_and_exit_2(
    held_study: str, tmp_path: Path, zoo_dir: Path, sqlite_url: str
) -> None:
    # A study without a held-out split: all items searched on, no heldout file.
    bare = tiny_spec(zoo_dir, name="bare")
    for objective in bare["objectives"]:
        objective.pop("heldout", None)
        objective["limit"] = None
    spec = write_spec(tmp_path / "b.yaml", bare)
    created = run_cli("study", "create", str(spec), "--storage", sqlite_url)
    assert created.returncode == 0, created.stderr
    _one_line_error(
        run_cli("study", "evaluate", "bare", "--heldout", "--pareto", "--storage", sqlite_url),
        "no held-out split for objective accuracy, tokens",
    )
    # The study with one: a trial that does not exist, and one that is not COMPLETE.
    study = _load(held_study)
    failed = study.ask()
    study.tell(failed, state=TrialState.FAIL)
    last = failed.number
    evaluate = ("study", "evaluate", NAME, "--storage", held_study)
    _one_line_error(
        run_cli(*evaluate, "--heldout", "--trial", "99"), f"has no trial 99 (trials 0..{last})"
    )
    _one_line_error(
        run_cli(*evaluate, "--heldout", "--trial", str(last)),
        f"trial {last} of study {NAME!r} is FAIL; only COMPLETE trials",
    )
    _one_line_error(run_cli(*evaluate, "--pareto"), "pass --heldout")
    _one_line_error(run_cli(*evaluate, "--heldout"), "--pareto, or --trial N")


def test_a_study_without_complete_trials_has_no_front_to_evaluate() -> None:
    from mergeopt.heldout import choose_trials

    study = optuna.create_study(directions=["maximize", "minimize"])
    with pytest.raises(UserError, match="has no COMPLETE trials to evaluate"):
        choose_trials(study, pareto=True, numbers=[])


@pytest.mark.parametrize(
    "backend",
    EVERY_DATABASE,
)
def test_attrs_of_a_finished_trial_are_written_and_overwritten_in_place(
    backend: str, request: pytest.FixtureRequest
) -> None:
    from mergeopt.storage import open_storage
    from mergeopt.trial_io import set_finished_trial_user_attrs

    url = request.getfixturevalue(backend)
    name = f"finished-{backend}"
    study = optuna.create_study(study_name=name, storage=open_storage(url), directions=["maximize"])
    study.add_trial(_trial(0, [0.5], None))
    trial_id = study.trials[0]._trial_id
    for value in (0.25, 0.75, 0.75):
        set_finished_trial_user_attrs(study, trial_id, {attrs.HELDOUT_VALUES: {"a": value}})
    stored = optuna.load_study(study_name=name, storage=open_storage(url)).trials
    assert len(stored) == 1 and stored[0].state == TrialState.COMPLETE
    assert stored[0].user_attrs == {attrs.HELDOUT_VALUES: {"a": 0.75}}
