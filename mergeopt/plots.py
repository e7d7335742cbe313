"""Pictures of a study: the trade-off, the progress, and which blocks matter.

:func:`plot_study` writes, as PNG (matplotlib, Agg) and — when plotly is installed — as HTML:

- ``pareto_front``: every COMPLETE trial in objective space with the Pareto front
  (``optuna.visualization.plot_pareto_front``), the base and experts' anchor scores marked when
  the study stored them (``mergeopt:anchors``), and each trial's held-out values (``mergeopt
  study evaluate --heldout``) as a hollow marker joined to its search point by a line (two
  objectives), and the preference baselines ``mergeopt baseline`` recorded (``mergeopt:baselines``)
  as red diamonds (drawn in two dimensions: two objectives, or the first two of more than
  three); a single-objective study gets the optimization history instead;
- ``hypervolume``: the dominated hypervolume after each trial
  (``optuna.visualization.plot_hypervolume_history``), the reference point being the worst
  value seen on each objective pushed 10 % of its range further out;
- ``hypervolume_cost``: the same against cumulative tokens (``mergeopt/hypervolume.py``);
- ``block_params``: a heat map per expert and searched parameter, block (rows) x Pareto trial
  (columns, ordered by the first objective) — SIPBMM's picture of which blocks matter.
"""

from __future__ import annotations

import importlib.util
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from mergeopt import attrs
from mergeopt.hypervolume import hypervolume_cost_png
from mergeopt.report import objective_names

if TYPE_CHECKING:
    import optuna
    from optuna.trial import FrozenTrial

PARETO_FRONT = "pareto_front"
HYPERVOLUME = "hypervolume"
HYPERVOLUME_COST = "hypervolume_cost"
BLOCK_PARAMS = "block_params"
INTERACTIVE = "plots"
REFERENCE_MARGIN = 0.1
_ANCHOR_MARKERS = ("*", "P", "X", "D", "s", "^", "v")


def plotly_available() -> bool:
    return importlib.util.find_spec("plotly") is not None


def plot_study(study: optuna.Study, out_dir: Path, *, html: bool | None = None) -> list[Path]:
    """Write the study's plots into ``out_dir``; returns the files written (PNG, then HTML).

    Args:
        html: also write ``plots.html``, the same plots made interactive (plotly), one page
            with plotly's script inlined so that it opens offline and from optuna-dashboard's
            artifact server alike (about 5 MB); default: when plotly is installed.

    Raises:
        UserError: the study has no COMPLETE trials.
    """
    import matplotlib

    matplotlib.use("Agg")
    import optuna
    from optuna.trial import TrialState

    from mergeopt.errors import UserError

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        raise UserError(f"study {study.study_name!r} has no COMPLETE trials to plot")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with_html = plotly_available() if html is None else html
    written: list[Path] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        written.append(_pareto_png(study, out_dir / f"{PARETO_FRONT}.png"))
        if len(study.directions) > 1:
            written.append(_hypervolume_png(study, out_dir / f"{HYPERVOLUME}.png"))
            if any(attrs.ITEMS_SCORED in t.user_attrs for t in complete):  # cost is stored
                path = out_dir / f"{HYPERVOLUME_COST}.png"
                written.append(hypervolume_cost_png(study, path, reference_point(study)))
        heatmap = _block_params_png(study, out_dir / f"{BLOCK_PARAMS}.png")
        if heatmap is not None:
            written.append(heatmap)
        if with_html:
            written.append(_write_page(study, out_dir / f"{INTERACTIVE}.html"))
    return written


# --------------------------------------------------------------------------- data


def anchor_points(study: optuna.Study) -> dict[str, list[float]]:
    """Objective values of the source models (``{"base": [v1, v2], ...}``) in the study's
    objective space, or ``{}`` when the study stored no anchors.

    Anchors are raw objective values per source model (``{"base": {"accuracy": 0.2, ...},
    "experts": [{...}, ...], "models": [paths]}``); where the spec normalizes an objective,
    they are normalized the way the trial values were (so the anchors sit at 0 and 1).
    """
    stored = attrs.ANCHORS.get(study)
    if not isinstance(stored, Mapping):
        return {}
    names = objective_names(study)
    per_model = _models_of(stored, names)
    if not per_model:
        return {}
    normalize = _normalizer(study, stored)
    points: dict[str, list[float]] = {}
    for label, raw in per_model.items():
        values = normalize(raw) if normalize is not None else raw
        try:
            points[label] = [float(values[name]) for name in names]
        except (KeyError, TypeError, ValueError):
            continue
    return points


def baseline_points(study: optuna.Study) -> dict[str, list[float]]:
    """Objective values (the searched split) of the preference baselines recorded in the
    study, by label (``"epo 0.7,0.3"``); ``{}`` when there are none."""
    stored = attrs.BASELINES.get(study) or {}
    count = len(study.directions)
    return {
        label: [float(v) for v in entry["values"]]
        for label, entry in stored.items()
        if isinstance(entry, Mapping) and len(entry.get("values") or ()) == count
    }


def _drawn_in_two_dimensions(names: Sequence[str]) -> bool:
    """Whether the front is drawn on two axes (the first two objectives: ``_front_targets``)."""
    return len(names) == 2 or len(names) > 3


def _models_of(stored: Mapping[str, Any], names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Label -> raw scores, from ``{"base": {...}, "experts": [{...}], "models": [paths]}``
    (``mergeopt.objectives.normalization.Anchors``) or from ``{label: {...}}``."""

    def is_scores(value: Any) -> bool:
        return isinstance(value, Mapping) and all(name in value for name in names)

    paths = stored.get("models")
    experts = stored.get("experts")
    if isinstance(experts, Sequence) and is_scores(stored.get("base")):
        labels = ["base", *(f"expert {i}" for i in range(len(experts)))]
        if isinstance(paths, Sequence) and len(paths) == len(labels):
            labels = [Path(str(p)).name or label for p, label in zip(paths, labels, strict=True)]
        scores = [stored["base"], *experts]
        return {
            label: dict(value)
            for label, value in zip(labels, scores, strict=True)
            if is_scores(value)
        }
    return {str(key): dict(value) for key, value in stored.items() if is_scores(value)}


def _normalizer(study: optuna.Study, stored: Mapping[str, Any]) -> Any:
    """``raw -> normalized`` as the trial loop applies it, or None when nothing is normalized."""
    from mergeopt.study import stored_spec

    if attrs.SPEC not in study.user_attrs:
        return None
    spec = stored_spec(study)
    if not any(objective.normalize for objective in spec.objectives):
        return None
    from mergeopt.objectives.normalization import Anchors, normalize_values

    anchors = Anchors.from_json(stored)
    return lambda raw: normalize_values(raw, anchors, spec.objectives)


def heldout_pairs(study: optuna.Study) -> list[tuple[int, list[float], list[float]]]:
    """(trial number, search values, held-out values) of the COMPLETE trials evaluated on the
    held-out split, in trial order."""
    from optuna.trial import TrialState

    from mergeopt.report import heldout_values

    names = objective_names(study)
    pairs = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        held = heldout_values(trial, names)
        if held is not None and trial.values is not None:
            pairs.append((trial.number, list(trial.values), held))
    return pairs


def reference_point(study: optuna.Study) -> list[float]:
    """The worst value of each objective over COMPLETE trials, pushed 10 % of its range out."""
    from optuna.study import StudyDirection
    from optuna.trial import TrialState

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    point = []
    for k, direction in enumerate(study.directions):
        values = [t.values[k] for t in complete]
        span = max(values) - min(values)
        margin = REFERENCE_MARGIN * (span if span > 0 else max(abs(values[0]), 1.0))
        if direction == StudyDirection.MAXIMIZE:
            point.append(min(values) - margin)
        else:
            point.append(max(values) + margin)
    return point


def pareto_trials_for_heatmap(study: optuna.Study) -> list[FrozenTrial]:
    """Pareto trials with a stored recipe, ordered by the first objective (best first)."""
    from optuna.study import StudyDirection

    sign = -1 if study.directions[0] == StudyDirection.MAXIMIZE else 1
    front = [t for t in study.best_trials if attrs.RECIPE.get(t) is not None]
    return sorted(front, key=lambda t: (sign * t.values[0], t.number))


def block_labels(study: optuna.Study, num_blocks: int) -> list[str]:
    """``"b0 L0-1"``, ... and ``"outer"`` for the embeddings/norm/head block."""
    from mergeopt.blocks import BlockLayout

    layout_data = attrs.LAYOUT.get(study)
    if layout_data is None:
        return [f"b{b}" for b in range(num_blocks)]
    layout = BlockLayout.from_dict(layout_data)
    labels = []
    for block in range(layout.num_layer_blocks):
        layers = layout.layers_of_block(block)
        span = f"L{layers[0]}" if len(layers) == 1 else f"L{layers[0]}-{layers[-1]}"
        labels.append(f"b{block} {span}")
    return [*labels, "outer"]


def heatmap_panels(
    trials: Sequence[FrozenTrial],
) -> list[tuple[str, list[list[float]]]]:
    """``[("e0.weight", rows = blocks x columns = trials), ...]`` from the trials' recipes."""
    first = attrs.RECIPE.read(trials[0])
    num_blocks, num_experts = len(first), len(first[0])
    panels = []
    for expert in range(num_experts):
        for param in sorted(first[0][expert]):
            matrix = [
                [float(attrs.RECIPE.read(t)[block][expert][param]) for t in trials]
                for block in range(num_blocks)
            ]
            if len({value for row in matrix for value in row}) > 1 or param == "weight":
                panels.append((f"e{expert}.{param}", matrix))
    return panels


def expert_names(study: optuna.Study) -> list[str]:
    spec = attrs.SPEC.get(study) or {}
    experts = (spec.get("models") or {}).get("experts") or []
    return [Path(str(e)).name for e in experts]


def _panel_title(study: optuna.Study, panel: str) -> str:
    expert, _, param = panel.partition(".")
    names = expert_names(study)
    index = int(expert[1:])
    return f"{param} of {names[index]}" if index < len(names) else f"{param} of expert {index}"


def _front_targets(names: Sequence[str]) -> dict[str, Any]:
    """Optuna draws fronts of 2 or 3 objectives; beyond that, the first two are shown."""
    if len(names) <= 3:
        return {"target_names": list(names)}
    return {"target_names": list(names[:2]), "targets": lambda t: t.values[:2]}


# --------------------------------------------------------------------------- matplotlib


def _set_size(axes: Any, width: float, height: float) -> None:
    from matplotlib.figure import Figure

    figure = axes.figure
    assert isinstance(figure, Figure)  # Optuna's plots draw on a figure of their own
    figure.set_size_inches(width, height)


def _save(axes_or_figure: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    figure = getattr(axes_or_figure, "figure", axes_or_figure)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def _pareto_png(study: optuna.Study, path: Path) -> Path:
    from optuna.visualization import matplotlib as optuna_mpl

    names = objective_names(study)
    if len(names) == 1:
        axes = optuna_mpl.plot_optimization_history(study, target_name=names[0])
        return _save(axes, path)
    axes = optuna_mpl.plot_pareto_front(study, **_front_targets(names))
    baselines = baseline_points(study) if _drawn_in_two_dimensions(names) else {}
    for label, point in baselines.items():
        axes.scatter(
            [point[0]],
            [point[1]],
            marker="D",
            s=70,
            color="tab:red",
            zorder=6,
            label=f"baseline: {label}",
        )
        axes.annotate(label, (point[0], point[1]), textcoords="offset points", xytext=(6, -10))
    if baselines and len(names) != 2:
        axes.legend(loc="best", fontsize="small")
    if len(names) == 2:
        for marker, (label, point) in zip(
            _ANCHOR_MARKERS, anchor_points(study).items(), strict=False
        ):
            axes.scatter(
                [point[0]],
                [point[1]],
                marker=marker,
                s=160,
                color="black",
                zorder=5,
                label=f"anchor: {label}",
            )
            axes.annotate(label, (point[0], point[1]), textcoords="offset points", xytext=(6, 6))
        pairs = heldout_pairs(study)
        for _, search, held in pairs:
            axes.plot([search[0], held[0]], [search[1], held[1]], color="grey", lw=0.8, zorder=4)
        if pairs:
            axes.scatter(
                [held[0] for _, _, held in pairs],
                [held[1] for _, _, held in pairs],
                s=60,
                facecolors="none",
                edgecolors="black",
                zorder=5,
                label="held-out (line to its search point)",
            )
        axes.legend(loc="best", fontsize="small")
    axes.set_title(f"Pareto front of study {study.study_name}")
    _set_size(axes, 7, 5)
    return _save(axes, path)


def _hypervolume_png(study: optuna.Study, path: Path) -> Path:
    from optuna.visualization import matplotlib as optuna_mpl

    axes = optuna_mpl.plot_hypervolume_history(study, reference_point=reference_point(study))
    axes.set_title(f"Hypervolume of study {study.study_name}")
    _set_size(axes, 7, 4)
    return _save(axes, path)


def _block_params_png(study: optuna.Study, path: Path) -> Path | None:
    import matplotlib.pyplot as plt

    heatmap = _heatmap(study)
    if heatmap is None:
        return None
    panels, labels, columns = heatmap.panels, heatmap.labels, heatmap.columns
    width = min(3 + 0.45 * len(columns), 14)
    figure, axes_list = plt.subplots(
        1, len(panels), figsize=(width * len(panels), 1.2 + 0.45 * len(labels)), squeeze=False
    )
    for axes, (panel, matrix) in zip(axes_list[0], panels, strict=True):
        low, high = heatmap.limits[panel.partition(".")[2]]
        image = axes.imshow(matrix, aspect="auto", cmap="viridis", vmin=low, vmax=high)
        axes.grid(False)
        axes.set_xticks(range(len(columns)), columns, rotation=90, fontsize="small")
        axes.set_yticks(range(len(labels)), labels, fontsize="small")
        axes.set_xlabel(f"Pareto trials, best {objective_names(study)[0]} first")
        axes.set_title(_panel_title(study, panel))
        figure.colorbar(image, ax=axes, fraction=0.05)
    figure.suptitle(f"Per-block merge parameters of the Pareto trials ({study.study_name})")
    return _save(figure, path)


class _Heatmap(NamedTuple):
    """What both renderings of the block x trial heat map show."""

    panels: list[tuple[str, list[list[float]]]]  # (panel, blocks x trials matrix)
    labels: list[str]  # one per block
    columns: list[str]  # one per Pareto trial
    limits: dict[str, tuple[float, float]]  # color range per parameter


def _heatmap(study: optuna.Study) -> _Heatmap | None:
    """The heat map's panels, block labels, trial columns and color limits (None: no Pareto
    trial has a recipe)."""
    trials = pareto_trials_for_heatmap(study)
    if not trials:
        return None
    panels = heatmap_panels(trials)
    labels = block_labels(study, len(attrs.RECIPE.read(trials[0])))
    columns = [f"#{t.number}" for t in trials]
    return _Heatmap(panels, labels, columns, _color_limits(panels))


def _color_limits(
    panels: Sequence[tuple[str, list[list[float]]]],
) -> dict[str, tuple[float, float]]:
    """One colour scale per parameter, shared by the experts' panels so they compare."""
    limits: dict[str, tuple[float, float]] = {}
    for panel, matrix in panels:
        param = panel.partition(".")[2]
        values = [value for row in matrix for value in row]
        low, high = limits.get(param, (min(values), max(values)))
        limits[param] = (min(low, *values), max(high, *values))
    return limits


# --------------------------------------------------------------------------- plotly


def _write_page(study: optuna.Study, path: Path) -> Path:
    """One self-contained page of the interactive plots: plotly's script is inlined once (a
    page that loads it from beside itself is blank where optuna-dashboard serves artifacts)."""
    import html

    figures = [_pareto_figure(study)]
    if len(study.directions) > 1:
        figures.append(_hypervolume_figure(study))
    heatmap = _block_params_figure(study)
    if heatmap is not None:
        figures.append(heatmap)
    title = html.escape(f"mergeopt study {study.study_name}")
    divs = [
        figure.to_html(full_html=False, include_plotlyjs=index == 0)
        for index, figure in enumerate(figures)
    ]
    path.write_text(
        f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{title}</title></head>\n'
        f"<body>\n<h2>{title}</h2>\n" + "\n".join(divs) + "\n</body></html>\n",
        encoding="utf-8",
    )
    return path


def _pareto_figure(study: optuna.Study) -> Any:
    import optuna.visualization as optuna_plotly
    import plotly.graph_objects as go

    names = objective_names(study)
    if len(names) == 1:
        return optuna_plotly.plot_optimization_history(study, target_name=names[0])
    figure = optuna_plotly.plot_pareto_front(study, **_front_targets(names))
    if _drawn_in_two_dimensions(names):
        for label, point in baseline_points(study).items():
            figure.add_trace(
                _labelled_point(
                    label,
                    point,
                    kind="baseline",
                    place="bottom right",
                    symbol="diamond",
                    size=12,
                    color="red",
                )
            )
    if len(names) == 2:
        for label, point in anchor_points(study).items():
            figure.add_trace(
                _labelled_point(
                    label,
                    point,
                    kind="anchor",
                    place="top right",
                    symbol="star",
                    size=16,
                    color="black",
                )
            )
        pairs = heldout_pairs(study)
        if pairs:
            lines_x: list[float | None] = []
            lines_y: list[float | None] = []
            for _, search, held in pairs:
                lines_x += [search[0], held[0], None]
                lines_y += [search[1], held[1], None]
            figure.add_trace(
                go.Scatter(
                    x=lines_x,
                    y=lines_y,
                    mode="lines",
                    line={"color": "grey", "width": 1},
                    hoverinfo="skip",
                    showlegend=False,
                )
            )
            figure.add_trace(
                go.Scatter(
                    x=[held[0] for _, _, held in pairs],
                    y=[held[1] for _, _, held in pairs],
                    mode="markers",
                    marker={"symbol": "circle-open", "size": 11, "color": "black"},
                    text=[f"trial {number} held-out" for number, _, _ in pairs],
                    hovertemplate="%{text}: %{x:.4g}, %{y:.4g}<extra></extra>",
                    name="held-out (line to its search point)",
                )
            )
    figure.update_layout(title=f"Pareto front of study {study.study_name}")
    return figure


def _labelled_point(
    label: str, point: Sequence[float], *, kind: str, place: str, symbol: str, size: int, color: str
) -> Any:
    """One named point of the front's picture (an anchor, a baseline), its label beside it."""
    import plotly.graph_objects as go

    return go.Scatter(
        x=[point[0]],
        y=[point[1]],
        mode="markers+text",
        text=[label],
        textposition=place,
        marker={"symbol": symbol, "size": size, "color": color},
        name=f"{kind}: {label}",
    )


def _hypervolume_figure(study: optuna.Study) -> Any:
    import optuna.visualization as optuna_plotly

    figure = optuna_plotly.plot_hypervolume_history(study, reference_point=reference_point(study))
    figure.update_layout(title=f"Hypervolume of study {study.study_name}")
    return figure


def _block_params_figure(study: optuna.Study) -> Any:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    heatmap = _heatmap(study)
    if heatmap is None:
        return None
    panels = heatmap.panels
    figure = make_subplots(
        rows=1, cols=len(panels), subplot_titles=[_panel_title(study, p) for p, _ in panels]
    )
    for column, (panel, matrix) in enumerate(panels, start=1):
        low, high = heatmap.limits[panel.partition(".")[2]]
        figure.add_trace(
            go.Heatmap(
                z=matrix,
                zmin=low,
                zmax=high,
                x=heatmap.columns,
                y=heatmap.labels,
                colorscale="Viridis",
                colorbar={"x": column / len(panels) - 0.02, "len": 0.9},
                hovertemplate="trial %{x}, %{y}: %{z:.3f}<extra></extra>",
            ),
            row=1,
            col=column,
        )
        figure.update_yaxes(autorange="reversed", row=1, col=column)
    figure.update_layout(
        title=f"Per-block merge parameters of the Pareto trials ({study.study_name})"
    )
    return figure
