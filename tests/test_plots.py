"""Study plots (Pareto front with anchors, hypervolume, block x trial heat map) and their
registration as optuna-dashboard artifacts. Studies are hand-made: no models needed."""

from __future__ import annotations

import io
import json
import wsgiref.util
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState, create_trial

from mergeopt import attrs
from mergeopt.blocks import BlockLayout
from mergeopt.dashboard import (
    artifact_dir_for,
    attach_plots,
    dashboard_command,
    refresh_dashboard,
    register_artifacts,
    write_study_note,
)
from mergeopt.errors import UserError
from mergeopt.genome import Genome
from mergeopt.plots import (
    anchor_points,
    block_labels,
    heatmap_panels,
    pareto_trials_for_heatmap,
    plot_study,
    reference_point,
)
from mergeopt.spec import StudySpec

LAYOUT = BlockLayout.fixed(8, num_blocks=4)
GENOME = Genome(
    num_blocks=5, num_experts=2, searched={"weight": (0.0, 1.0)}, fixed={"density": 1.0}
)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SPEC = StudySpec.model_validate(
    {
        "models": {"base": "/zoo/base", "experts": ["/zoo/expert-direct", "/zoo/expert-steps"]},
        "merge": {"method": "task_arithmetic", "blocks": {"num_blocks": 4}},
        "objectives": [
            {"name": "accuracy", "task": "/zoo/tasks/arith.jsonl"},
            {"name": "tokens", "task": "/zoo/tasks/arith.jsonl", "metric": "mean_tokens"},
        ],
    }
)


def make_study(storage: str | None = None, *, anchors: dict | None = None) -> optuna.Study:
    """accuracy (max) vs tokens (min), 12 trials whose recipes weigh expert 1 by trial number."""
    study = optuna.create_study(
        study_name="plots", storage=storage, directions=["maximize", "minimize"]
    )
    study.set_metric_names(["accuracy", "tokens"])
    study.set_user_attr(attrs.LAYOUT, LAYOUT.to_dict())
    study.set_user_attr(attrs.SPEC, SPEC.to_json())
    if anchors is not None:
        study.set_user_attr(attrs.ANCHORS, anchors)
    for number in range(12):
        share = number / 11
        params = {name: share if ".e1." in name else 1 - share for name in GENOME.param_names}
        accuracy = 0.2 + 0.6 * share - 0.1 * (number % 3)
        tokens = 4 + 20 * share + 3 * (number % 2)
        study.add_trial(
            create_trial(
                values=[accuracy, tokens],
                params=params,
                distributions=GENOME.distributions(),
                user_attrs={attrs.RECIPE: GENOME.block_params(params)},
            )
        )
    study.add_trial(create_trial(state=TrialState.FAIL))
    return study


ANCHORS = {
    "base": {"accuracy": 0.1, "tokens": 5.0},
    "experts": [{"accuracy": 0.4, "tokens": 4.0}, {"accuracy": 0.9, "tokens": 26.0}],
}


@pytest.mark.slow
def test_plot_study_writes_png_and_one_self_contained_page_of_front_hypervolume_and_heatmap(
    tmp_path: Path,
) -> None:
    written = plot_study(make_study(anchors=ANCHORS), tmp_path / "plots")
    assert [p.name for p in written] == [
        "pareto_front.png",
        "hypervolume.png",
        "block_params.png",
        "plots.html",
    ]
    for path in written[:3]:
        data = path.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000
    page = (tmp_path / "plots" / "plots.html").read_text()
    # plotly's script inlined once, nothing loaded from beside the page: it draws offline and
    # where optuna-dashboard's artifact server serves it alone
    assert "plotly.min.js" not in page and page.count("Plotly.newPlot") == 3
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == sorted(p.name for p in written)
    assert "anchor: base" in page and "anchor: expert 1" in page
    assert "Hypervolume of study" in page
    assert "weight of expert-steps" in page and "b3 L6-7" in page


def test_without_plotly_only_png_is_written(tmp_path: Path) -> None:
    written = plot_study(make_study(), tmp_path, html=False)
    assert sorted(p.suffix for p in written) == [".png", ".png", ".png"]


def test_anchor_points_are_read_from_the_study_and_skipped_when_absent() -> None:
    assert anchor_points(make_study(anchors=ANCHORS)) == {
        "base": [0.1, 5.0],
        "expert 0": [0.4, 4.0],
        "expert 1": [0.9, 26.0],
    }
    assert anchor_points(make_study()) == {}
    named = {**ANCHORS, "models": ["/zoo/base", "/zoo/expert-direct", "/zoo/expert-steps"]}
    assert list(anchor_points(make_study(anchors=named))) == [
        "base",
        "expert-direct",
        "expert-steps",
    ]


def test_anchors_of_normalized_objectives_are_normalized_like_the_trials() -> None:
    study = make_study(anchors=ANCHORS)
    spec = SPEC.to_json()
    spec["objectives"] = [{**o, "normalize": True} for o in spec["objectives"]]
    study.set_user_attr(attrs.SPEC, spec)
    assert anchor_points(study) == {
        "base": [0.0, pytest.approx(1 / 22)],
        "expert 0": [pytest.approx(0.375), 0.0],
        "expert 1": [1.0, 1.0],
    }


def test_heatmap_is_block_by_pareto_trial_ordered_by_the_first_objective() -> None:
    study = make_study()
    trials = pareto_trials_for_heatmap(study)
    front = {t.number for t in study.best_trials}
    assert {t.number for t in trials} == front
    accuracies = [t.values[0] for t in trials]
    assert accuracies == sorted(accuracies, reverse=True)
    panels = dict(heatmap_panels(trials))
    assert sorted(panels) == ["e0.weight", "e1.weight"]  # a fixed density of 1.0 is no news
    matrix = panels["e1.weight"]
    assert len(matrix) == 5 and len(matrix[0]) == len(trials)
    assert matrix[2][0] == pytest.approx(trials[0].number / 11)
    assert block_labels(study, 5) == ["b0 L0-1", "b1 L2-3", "b2 L4-5", "b3 L6-7", "outer"]


def test_reference_point_lies_beyond_the_worst_value_of_each_objective() -> None:
    study = make_study()
    accuracy = [t.values[0] for t in study.trials if t.values]
    tokens = [t.values[1] for t in study.trials if t.values]
    low, high = reference_point(study)
    assert low < min(accuracy) and high > max(tokens)


def test_a_study_without_complete_trials_cannot_be_plotted(tmp_path: Path) -> None:
    study = optuna.create_study(study_name="empty", directions=["maximize", "minimize"])
    with pytest.raises(UserError, match="'empty' has no COMPLETE trials to plot"):
        plot_study(study, tmp_path)


def test_single_objective_study_gets_its_history_and_no_hypervolume(tmp_path: Path) -> None:
    study = optuna.create_study(direction="maximize")
    for value in (0.1, 0.5, 0.3):
        study.add_trial(create_trial(value=value))
    assert [p.name for p in plot_study(study, tmp_path, html=False)] == ["pareto_front.png"]


def test_artifacts_live_beside_a_sqlite_file_and_must_be_named_for_servers(tmp_path: Path) -> None:
    assert artifact_dir_for(f"sqlite:///{tmp_path}/studies.db") == tmp_path / "studies.artifacts"
    assert artifact_dir_for("postgresql://u:pw@h/db", tmp_path / "shared") == tmp_path / "shared"
    with pytest.raises(UserError, match=r"postgresql://u:\*\*\*@h/db is not a SQLite file"):
        artifact_dir_for("postgresql://u:pw@h/db")
    assert dashboard_command("postgresql://u:pw@h/db", artifact_dir=tmp_path / "a") == (
        f"optuna-dashboard --host 127.0.0.1 --port 8080 --artifact-dir {tmp_path}/a "
        "'postgresql://u:***@h/db'"
    )


def _get(app: object, path: str) -> tuple[str, bytes]:
    environ: dict = {"PATH_INFO": path, "REQUEST_METHOD": "GET", "wsgi.input": io.BytesIO()}
    wsgiref.util.setup_testing_defaults(environ)
    status: list[str] = []
    body = b"".join(app(environ, lambda s, headers, exc_info=None: status.append(s)))  # type: ignore[operator]
    return status[0], body


@pytest.mark.slow
def test_plots_become_study_artifacts_that_optuna_dashboard_serves(tmp_path: Path) -> None:
    import optuna_dashboard
    from optuna.artifacts import FileSystemArtifactStore

    storage = f"sqlite:///{tmp_path}/studies.db"
    study = make_study(storage)
    artifact_dir = artifact_dir_for(storage)
    paths = plot_study(study, tmp_path / "plots", html=False)
    register_artifacts(study, paths, artifact_dir=artifact_dir)
    write_study_note(study)
    ids = register_artifacts(study, paths, artifact_dir=artifact_dir)  # again: replaces
    assert sorted(p.name for p in artifact_dir.iterdir()) == sorted(ids)

    app = optuna_dashboard.wsgi(storage, artifact_store=FileSystemArtifactStore(str(artifact_dir)))
    status, body = _get(app, f"/api/studies/{study._study_id}")
    assert status.startswith("200")
    detail = json.loads(body)
    assert sorted(a["filename"] for a in detail["artifacts"]) == sorted(p.name for p in paths)
    assert detail["objective_names"] == ["accuracy", "tokens"]
    note = detail["note"]["body"]
    assert "**task_arithmetic** merge of expert-direct, expert-steps into base" in note
    assert "| accuracy | maximize | arith.jsonl | accuracy |" in note
    assert "| block | expert-direct weight | expert-steps weight |" in note
    assert "| b3 L6-7 | 0.091 | 0.909 |" in note  # trial 10: weights 1/11 and 10/11
    status, body = _get(app, f"/artifacts/{study._study_id}/{ids[0]}")
    assert status.startswith("200") and body == paths[0].read_bytes()


def _artifact_names(study: optuna.Study) -> dict[str, str]:
    """filename -> artifact id of the study's current artifacts."""
    found = {}
    for key, value in study._storage.get_study_system_attrs(study._study_id).items():
        meta = json.loads(value) if key.startswith("artifacts:") else None
        if meta:
            found[meta["filename"]] = meta["artifact_id"]
    return found


@pytest.mark.slow
def test_the_end_of_a_run_refreshes_the_note_and_the_plots_study_plot_attached(
    tmp_path: Path,
) -> None:
    from optuna_dashboard import get_note

    storage = f"sqlite:///{tmp_path}/studies.db"
    study = make_study(storage)
    artifact_dir = artifact_dir_for(storage)
    attach_plots(study, plot_study(study, tmp_path / "plots"), artifact_dir=artifact_dir)
    before = _artifact_names(study)
    assert "with 12 complete trials" in get_note(study)

    params = {name: 0.5 for name in GENOME.param_names}
    study.add_trial(
        create_trial(
            values=[0.99, 3.0],  # a new Pareto trial, better on both objectives
            params=params,
            distributions=GENOME.distributions(),
            user_attrs={attrs.RECIPE: GENOME.block_params(params)},
        )
    )
    assert refresh_dashboard(study) == f"dashboard note and plots updated in {artifact_dir}"

    after = _artifact_names(study)
    assert sorted(after) == sorted(before) == sorted(p.name for p in plot_study_names())
    assert not set(after.values()) & set(before.values())  # every plot replaced
    assert sorted(p.name for p in artifact_dir.iterdir()) == sorted(after.values())
    note = get_note(study)
    assert "with 13 complete trials" in note and "### Trial 13: accuracy = 0.99" in note


def plot_study_names() -> list[Path]:
    return [
        Path(n) for n in ("pareto_front.png", "hypervolume.png", "block_params.png", "plots.html")
    ]


def test_a_run_without_attached_plots_updates_the_note_and_says_how_to_plot(
    tmp_path: Path,
) -> None:
    study = make_study(f"sqlite:///{tmp_path}/studies.db")
    assert refresh_dashboard(study) == (
        "dashboard note updated; plots: mergeopt study plot plots --out DIR"
    )


def test_plots_attached_in_a_folder_this_machine_lacks_are_reported_stale(
    tmp_path: Path,
) -> None:
    storage = f"sqlite:///{tmp_path}/studies.db"
    study = make_study(storage)
    elsewhere = tmp_path / "shared" / "artifacts"
    attach_plots(study, plot_study(study, tmp_path / "plots", html=False), artifact_dir=elsewhere)
    for path in elsewhere.iterdir():
        path.unlink()
    elsewhere.rmdir()

    line = refresh_dashboard(study)
    assert line == (
        f"dashboard plots are stale ({elsewhere} not found here); refresh: "
        f"mergeopt study plot plots --out DIR --artifact-dir {elsewhere}"
    )


def test_hypervolume_against_tokens_counts_every_evaluated_trial_stopped_ones_included(
    tmp_path: Path,
) -> None:
    from mergeopt.hypervolume import hypervolume, hypervolume_by_cost

    study = optuna.create_study(directions=["maximize", "minimize"])
    costs = {attrs.ITEMS_SCORED: 24}
    for accuracy, tokens, spent in ((0.5, 10.0, 100), (0.8, 20.0, 200)):
        study.add_trial(
            create_trial(
                values=[accuracy, tokens], user_attrs={**costs, attrs.TOKENS_GENERATED: spent}
            )
        )
    stopped = {**costs, attrs.TOKENS_GENERATED: 30, attrs.FIDELITY: {"stopped": True}}
    study.add_trial(create_trial(state=TrialState.PRUNED, user_attrs=stopped))
    reference = [0.0, 30.0]
    unit, curve = hypervolume_by_cost(study, reference)
    assert unit == "tokens generated"
    both = hypervolume([[0.5, 10.0], [0.8, 20.0]], reference, [True, False])
    assert both == pytest.approx(0.5 * 20 + 0.3 * 10)
    assert curve == [(100, pytest.approx(0.5 * 20)), (300, pytest.approx(both)), (330, both)]
    written = plot_study(study, tmp_path, html=False)
    assert "hypervolume_cost.png" in [p.name for p in written]


def test_hypervolume_of_three_objectives_is_the_union_of_the_boxes() -> None:
    from mergeopt.hypervolume import hypervolume

    points = [[1.0, 2.0, 1.0], [2.0, 1.0, 1.0]]
    # Two 1x2x1 boxes from the origin overlapping in a 1x1x1 cube.
    assert hypervolume(points, [0.0, 0.0, 0.0], [True, True, True]) == pytest.approx(3.0)
    assert hypervolume([[-1.0, 5.0, 5.0]], [0.0, 0.0, 0.0], [True, True, True]) == 0.0
