"""The merge landscape of a built zoo: do merges of its experts behave like merges of real
fine-tunes? Measures issue #11's criteria with mergeopt's own study machinery (the demo spec
``studies/tiny.yaml``: task arithmetic, 4 blocks + the embeddings/head block, weights in [0, 1],
objectives accuracy and mean tokens on the search split, limit 48) and prints a table:

a. 24 random block-wise recipes, experts evaluated first: the share scoring at least half the
   weaker expert's accuracy (>= 0.70), and the hypervolume of the recipes plus the experts over
   the experts' alone (>= 1.05);
b. the model-level line w * expert-direct + (1 - w) * expert-steps, w = 0, 0.1, ..., 1: accuracy
   never below 0.8 x the weaker expert's, mean tokens monotone within +-10%;
c. the best front found block-wise within 88 evaluations (each sampler of ``--samplers`` from
   the experts, batches of 4; the best run counts) against the 11 x 11 model-level grid
   (>= 1.03 x its hypervolume), and Spearman's rank correlation (>= 0.5) between the study's
   per-block importance and each block's sensitivity: the change of the objectives (each
   divided by the experts' gap, summed) when one block goes from expert-steps to
   expert-direct (w 0 -> 1) with every other block at w = 0.5.

Hypervolumes use the reference point (accuracy 0, mean tokens = max_new_tokens).

    python scripts/zoo_landscape.py .cache/zoo-2 --write   # also records it in zoo.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from bench_samplers import hypervolume  # noqa: E402

Values = tuple[float, float]  # (accuracy, mean tokens)


def demo_spec(zoo: Path, *, limit: int, seed: int) -> dict[str, Any]:
    """``studies/tiny.yaml`` pointed at ``zoo``, every objective limited to ``limit`` items."""
    from tests.conftest import tiny_spec

    spec = tiny_spec(zoo, sampler={"name": "random", "enqueue_experts": False}, seed=seed)
    for objective in spec["objectives"]:
        objective["limit"] = limit
    return spec


def front_of(values: Sequence[Values]) -> list[Values]:
    """The non-dominated (accuracy up, tokens down) points, by accuracy."""
    front = [v for v in values if not any(u[0] >= v[0] and u[1] <= v[1] and u != v for u in values)]
    return sorted(set(front))


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(x, y).statistic)


class Landscape:
    """The zoo's demo study, resident: ``evaluate(params)`` merges in place and scores."""

    def __init__(self, zoo: Path, *, limit: int, seed: int, folder: Path) -> None:
        import optuna

        from mergeopt.runner import TrialRunner
        from mergeopt.spec import StudySpec
        from mergeopt.study import create_study, stored_genome

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        spec = StudySpec.model_validate(demo_spec(zoo, limit=limit, seed=seed))
        self.study = create_study(spec, storage_url=f"sqlite:///{folder}/zoo.db", name="zoo")
        self.genome = stored_genome(self.study)
        self.importance = list(self.study.user_attrs["mergeopt:block_importance"])
        self.max_new_tokens = spec.scorer.max_new_tokens
        self.seed = seed
        self.runner = TrialRunner(self.study, device="cpu")
        self.evaluations = 0

    def evaluate(self, params: Mapping[str, float]) -> Values:
        values, _ = self.runner.evaluate(params, seed=self.seed)
        self.evaluations += 1
        return float(values[0]), float(values[1])

    def model_level(self, direct: float, steps: float) -> dict[str, float]:
        return self.genome.broadcast([{"weight": direct}, {"weight": steps}])

    def hypervolume(self, values: Sequence[Values]) -> float:
        points = np.array(values) * np.array([1.0, -1.0])
        return hypervolume(points, np.array([0.0, -float(self.max_new_tokens)]))


def search(
    land: Landscape, sampler_name: str, *, budget: int, seed: int, advance: Callable[[], None]
) -> list[Values]:
    """A block-wise study of ``budget`` evaluations, experts first, asks in batches of 4."""
    import optuna

    from mergeopt.samplers import create_sampler

    sampler = create_sampler(sampler_name, {}, seed=seed, genome=land.genome, num_objectives=2)
    study = optuna.create_study(directions=land.study.directions, sampler=sampler)
    for key, value in land.study.user_attrs.items():
        study.set_user_attr(key, value)
    for expert in range(land.genome.num_experts):
        study.enqueue_trial(land.genome.expert_alone(expert))
    distributions = land.genome.distributions()
    values: list[Values] = []
    while len(values) < budget:
        trials = [study.ask(distributions) for _ in range(min(4, budget - len(values)))]
        for trial in trials:
            v = land.evaluate(trial.params)
            study.tell(trial, list(v))
            values.append(v)
            advance()
    return values


def measure(args: argparse.Namespace) -> dict[str, Any]:
    from mergeopt.genome import param_name
    from mergeopt.progress import stages

    started = time.perf_counter()
    samplers = args.samplers.split(",")
    with tempfile.TemporaryDirectory(prefix="zoo-landscape-") as folder:
        land = Landscape(args.zoo, limit=args.limit, seed=args.seed, folder=Path(folder))
        genome = land.genome
        num_blocks = genome.num_blocks
        with stages() as progress:
            advance = progress.begin("experts and line", 13)
            experts = [land.evaluate(genome.expert_alone(e)) for e in range(2)]
            for _ in experts:
                advance()
            line = []
            for i in range(11):
                line.append(land.model_level(i / 10, 1 - i / 10))
            line_values = []
            for params in line:
                line_values.append(land.evaluate(params))
                advance()
            rng = random.Random(args.seed)
            advance = progress.begin("random block-wise recipes", 24)
            random_values = []
            for _ in range(24):
                params = {n: rng.uniform(d.low, d.high) for n, d in genome.distributions().items()}
                random_values.append(land.evaluate(params))
                advance()
            advance = progress.begin("model-level grid 11 x 11", 121)
            grid_values = []
            for i in range(11):
                for j in range(11):
                    grid_values.append(land.evaluate(land.model_level(i / 10, j / 10)))
                    advance()
            searches = {}
            for name in samplers:
                advance = progress.begin(f"block-wise {name}", args.budget)
                searches[name] = search(
                    land, name, budget=args.budget, seed=args.seed, advance=advance
                )
            advance = progress.begin("block sensitivity", 2 * num_blocks)
            sensitivity_rows = []
            for block in range(num_blocks):
                ends = []
                for w in (0.0, 1.0):
                    params = land.model_level(0.5, 0.5)
                    params[param_name(block, 0, "weight")] = w
                    params[param_name(block, 1, "weight")] = 1 - w
                    ends.append(land.evaluate(params))
                    advance()
                sensitivity_rows.append((ends[1][0] - ends[0][0], ends[1][1] - ends[0][1]))
        land.runner.close()

    (direct, steps) = experts
    weaker = min(direct[0], steps[0])
    hv_experts = land.hypervolume(experts)
    hv_random = land.hypervolume([*experts, *random_values])
    hv_grid = land.hypervolume(grid_values)
    hv_search = {name: land.hypervolume(v) for name, v in searches.items()}
    best_search = max(hv_search, key=lambda name: hv_search[name])
    tokens = [v[1] for v in line_values]  # w = 0 (expert-steps) -> 1 (expert-direct)
    accuracy_gap = abs(direct[0] - steps[0]) or 1.0
    tokens_gap = abs(direct[1] - steps[1]) or 1.0
    sensitivity = [abs(da) / accuracy_gap + abs(dt) / tokens_gap for da, dt in sensitivity_rows]
    criteria = {
        "a_share_above_half_weaker": sum(v[0] >= 0.5 * weaker for v in random_values) / 24,
        "a_hypervolume_ratio": hv_random / hv_experts,
        "b_min_accuracy_over_weaker": min(v[0] for v in line_values) / weaker,
        "b_tokens_monotone_within_10pct": all(
            tokens[i + 1] <= 1.10 * tokens[i] for i in range(len(tokens) - 1)
        ),
        "c_blockwise_over_grid": hv_search[best_search] / hv_grid,
        "c_spearman_importance_sensitivity": spearman(land.importance, sensitivity),
    }
    passed = {
        "a_share_above_half_weaker": criteria["a_share_above_half_weaker"] >= 0.70,
        "a_hypervolume_ratio": criteria["a_hypervolume_ratio"] >= 1.05,
        "b_min_accuracy_over_weaker": criteria["b_min_accuracy_over_weaker"] >= 0.8,
        "b_tokens_monotone_within_10pct": bool(criteria["b_tokens_monotone_within_10pct"]),
        "c_blockwise_over_grid": criteria["c_blockwise_over_grid"] >= 1.03,
        "c_spearman_importance_sensitivity": criteria["c_spearman_importance_sensitivity"] >= 0.5,
    }
    return {
        "date": time.strftime("%Y-%m-%d"),
        "settings": {
            "limit": args.limit,
            "seed": args.seed,
            "budget": args.budget,
            "samplers": samplers,
            "reference_point": [0.0, land.max_new_tokens],
        },
        "experts": {"expert-direct": direct, "expert-steps": steps},
        "line": [[i / 10, *v] for i, v in enumerate(line_values)],
        "random": random_values,
        "grid_front": front_of(grid_values),
        "search_fronts": {name: front_of(v) for name, v in searches.items()},
        "hypervolume": {
            "experts": hv_experts,
            "experts_and_random": hv_random,
            "grid": hv_grid,
            **{f"search_{name}": hv for name, hv in hv_search.items()},
        },
        "best_search": best_search,
        "importance": land.importance,
        "sensitivity": sensitivity,
        "sensitivity_changes": sensitivity_rows,
        "criteria": criteria,
        "passed": passed,
        "evaluations": land.evaluations,
        "seconds": round(time.perf_counter() - started, 1),
    }


def _pct(values: Sequence[float]) -> str:
    return ", ".join(f"{v:.2f}" for v in values)


def table(result: Mapping[str, Any]) -> str:
    c, p = result["criteria"], result["passed"]
    ok = {True: "met", False: "**missed**"}
    hv = result["hypervolume"]
    lines = [
        "| criterion | target | measured | |",
        "| --- | --- | ---: | --- |",
        f"| a. random block-wise recipes at >= half the weaker expert's accuracy | >= 0.70 | "
        f"{c['a_share_above_half_weaker']:.2f} | {ok[p['a_share_above_half_weaker']]} |",
        f"| a. hypervolume, 24 random + experts / experts | >= 1.05 | "
        f"{c['a_hypervolume_ratio']:.3f} | {ok[p['a_hypervolume_ratio']]} |",
        f"| b. model-level line: lowest accuracy / weaker expert's | >= 0.80 | "
        f"{c['b_min_accuracy_over_weaker']:.2f} | {ok[p['b_min_accuracy_over_weaker']]} |",
        f"| b. line's mean tokens monotone within 10% | yes | "
        f"{'yes' if c['b_tokens_monotone_within_10pct'] else 'no'} | "
        f"{ok[p['b_tokens_monotone_within_10pct']]} |",
        f"| c. best block-wise front in {result['settings']['budget']} evaluations "
        f"({result['best_search']}) / 11 x 11 grid | >= 1.03 | "
        f"{c['c_blockwise_over_grid']:.3f} | {ok[p['c_blockwise_over_grid']]} |",
        f"| c. Spearman(block importance, block sensitivity) | >= 0.5 | "
        f"{c['c_spearman_importance_sensitivity']:.2f} | "
        f"{ok[p['c_spearman_importance_sensitivity']]} |",
        "",
        "expert-direct (accuracy, tokens) = "
        f"({result['experts']['expert-direct'][0]:.3f}, "
        f"{result['experts']['expert-direct'][1]:.1f}); expert-steps = "
        f"({result['experts']['expert-steps'][0]:.3f}, "
        f"{result['experts']['expert-steps'][1]:.1f})",
        "",
        "line (w of expert-direct: accuracy / tokens): "
        + "; ".join(f"{w:.1f}: {a:.2f} / {t:.1f}" for w, a, t in result["line"]),
        "",
        "hypervolume (reference accuracy 0, tokens "
        f"{result['settings']['reference_point'][1]}): "
        + ", ".join(f"{k} {v:.3f}" for k, v in hv.items()),
        "",
        f"block importance: {_pct(result['importance'])}; sensitivity: "
        f"{_pct(result['sensitivity'])}",
        "",
        "11 x 11 grid front: " + ", ".join(f"({a:.2f}, {t:.1f})" for a, t in result["grid_front"]),
    ]
    for name, front in result["search_fronts"].items():
        lines += ["", f"{name} front: " + ", ".join(f"({a:.2f}, {t:.1f})" for a, t in front)]
    lines += ["", f"{result['evaluations']} evaluations in {result['seconds']:.0f} s"]
    return "\n".join(lines)


def record_in_zoo(zoo: Path, result: Mapping[str, Any]) -> None:
    """Add ``result`` to ``zoo.json`` as ``landscape`` (written to a temporary file, renamed)."""
    path = zoo / "zoo.json"
    metadata = json.loads(path.read_text())
    metadata["landscape"] = result
    handle, temporary = tempfile.mkstemp(dir=zoo, prefix=".zoo.json.")
    with os.fdopen(handle, "w") as out:
        out.write(json.dumps(metadata, indent=2) + "\n")
    os.replace(temporary, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("zoo", type=Path, nargs="?", default=REPO / ".cache" / "zoo-2")
    parser.add_argument("--limit", type=int, default=48, help="items per objective (demo: 48)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--budget", type=int, default=88, help="block-wise evaluations")
    parser.add_argument("--samplers", default="saasbo-qnehvi,tpe")
    parser.add_argument("--write", action="store_true", help="record the result in zoo.json")
    parser.add_argument("--json", type=Path, help="also write the result to this file")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)  # tiny matrices: one thread is fastest, and fair under load
    result = measure(args)
    print(table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    if args.write:
        record_in_zoo(args.zoo, result)


if __name__ == "__main__":
    main()
