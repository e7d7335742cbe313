"""How well and how fast saasbo-qnehvi's MAP fit finds its optimum, by where it starts.

Fits one GP per objective of ``bench_samplers.py``'s 37-D synthetic problem (importance prior on
the 6 relevant blocks, as ``saasbo-prior``) to uniform random points, for each seed and number of
points, four ways: from the prior's median with gpytorch's loss (the fit before 726e209), from
the median with ``saasbo_gp.map_loss``, from half the median, and ``fit_map_model`` as it is (its
``MAP_FIT_STARTS``, the better fit kept). Prints a line per fit (seconds, final loss: the negative
log marginal likelihood with priors, per point; lower is better) and, at the end, how often each
way ended more than 0.01 above the best of them, and its seconds in all.

Usage: ``python scripts/probe_map_fit.py --seeds 0-11 --points 16,28,40 --threads 1``
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_samplers  # noqa: E402

from mergeopt.samplers import saasbo_gp  # noqa: E402

PRIOR_SCALE = math.sqrt(3.0)  # SaasQnehviSampler's default lengthscale_prior_scale
WAYS = ("median, gpytorch's loss", "median", "half the median", "fit_map_model")


def fit(x: torch.Tensor, y: torch.Tensor, locations: np.ndarray, way: str) -> tuple[float, float]:
    """Seconds and final loss of one fit done ``way``."""
    from botorch.fit import fit_gpytorch_mll
    from gpytorch.mlls import ExactMarginalLogLikelihood

    torch.manual_seed(0)
    start = time.perf_counter()
    if way == "median, gpytorch's loss":
        model = _median_model(x, y, locations)
        fit_gpytorch_mll(ExactMarginalLogLikelihood(model.likelihood, model))
    else:
        starts = {"median": (1.0,), "half the median": (0.5,)}.get(way, saasbo_gp.MAP_FIT_STARTS)
        kept, saasbo_gp.MAP_FIT_STARTS = saasbo_gp.MAP_FIT_STARTS, starts
        try:
            model = saasbo_gp.fit_map_model(x, y, locations, PRIOR_SCALE)
        finally:
            saasbo_gp.MAP_FIT_STARTS = kept
    seconds = time.perf_counter() - start
    mll = ExactMarginalLogLikelihood(model.likelihood, model)
    with torch.no_grad():
        return seconds, float(saasbo_gp.map_loss(mll)())


def _median_model(x: torch.Tensor, y: torch.Tensor, locations: np.ndarray) -> Any:
    """``fit_map_model``'s GP before its fit, its lengthscales at the prior's median."""
    from botorch.models import SingleTaskGP
    from botorch.models.transforms.outcome import Standardize
    from gpytorch.constraints import GreaterThan
    from gpytorch.kernels import MaternKernel
    from gpytorch.priors import LogNormalPrior

    loc = torch.as_tensor(locations, dtype=x.dtype)
    kernel = MaternKernel(
        nu=2.5,
        ard_num_dims=x.shape[-1],
        lengthscale_prior=LogNormalPrior(loc=loc, scale=torch.full_like(loc, PRIOR_SCALE)),
        lengthscale_constraint=GreaterThan(2.5e-2, transform=None, initial_value=1.0),
    )
    kernel.lengthscale = torch.exp(loc).unsqueeze(0)
    return SingleTaskGP(x, y, covar_module=kernel, outcome_transform=Standardize(m=1))


def seed_range(text: str) -> list[int]:
    low, _, high = text.partition("-")
    return list(range(int(low), int(high or low) + 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0-11", help="a range, e.g. 0-11")
    parser.add_argument("--points", default="16,28,40")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    seconds = dict.fromkeys(WAYS, 0.0)
    above_best = dict.fromkeys(WAYS, 0)
    fits = 0
    for seed in seed_range(args.seeds):
        problem = bench_samplers.problem(seed)
        importance = np.full(bench_samplers.DIMENSION, 0.1)
        importance[problem["relevant"]] = 1.0
        locations = saasbo_gp.lengthscale_prior_locations(bench_samplers.DIMENSION, importance, 2.0)
        for points in (int(p) for p in args.points.split(",")):
            rng = np.random.default_rng(seed * 100 + points)
            x = rng.uniform(size=(points, bench_samplers.DIMENSION))
            y = np.array([bench_samplers.values_of(problem, row) for row in x])
            for objective in range(y.shape[1]):
                train_x = torch.as_tensor(x, dtype=torch.double)
                train_y = torch.as_tensor(y[:, objective : objective + 1], dtype=torch.double)
                results = {way: fit(train_x, train_y, locations, way) for way in WAYS}
                best = min(loss for _, loss in results.values())
                fits += 1
                for way, (took, loss) in results.items():
                    seconds[way] += took
                    above_best[way] += loss > best + 0.01
                cells = " | ".join(f"{w} {t:.2f} s {v:.4f}" for w, (t, v) in results.items())
                print(f"seed {seed} points {points} objective {objective}: {cells}", flush=True)
    print(f"\n{fits} fits; ended more than 0.01 above the best of the four, and seconds in all:")
    for way in WAYS:
        print(f"  {way}: {above_best[way]} of {fits}, {seconds[way]:.1f} s")


if __name__ == "__main__":
    main()
