"""What one ``study.ask`` costs with TPE on a genome-sized search space, three ways side by side.

The study is what a mergeopt worker asks on: ``--params`` continuous parameters in [0, 1] (74 =
a 37-block, 2-expert genome), two objectives, SQLite on local disk, parameters written in one
transaction (``trial_io.batched_trial_writes``, as the worker does), random objective values.
Each variant runs its own study with the same seed; reported: the median seconds per ask over
the trials after TPE's random start-up, and whether each variant asked for exactly the same
parameters as Optuna's TPE.

- ``optuna``: ``optuna.samplers.TPESampler`` (Optuna 5: ``constant_liar`` on, which reads every
  trial from the storage once per parameter);
- ``read once``: mergeopt's ``tpe`` with its batched pass switched off (one read per trial);
- ``mergeopt tpe``: ``mergeopt.samplers.tpe.TPESampler`` as shipped (one read, one pass).

    python scripts/bench_tpe_ask.py --params 74 --trials 24 --repeats 3
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.distributions import FloatDistribution
from optuna.samplers._tpe import _truncnorm

from mergeopt.samplers.tpe import TPESampler
from mergeopt.trial_io import batched_trial_writes

STARTUP = 10


class _ReadOnceTPE(TPESampler):
    """mergeopt's TPE sampling one parameter at a time."""

    def _sample_batch(self, *args: Any, **kwargs: Any) -> None:
        return None


VARIANTS: dict[str, type[optuna.samplers.TPESampler]] = {
    "optuna": optuna.samplers.TPESampler,
    "read once": _ReadOnceTPE,
    "mergeopt tpe": TPESampler,
}


def run(sampler_cls: type[optuna.samplers.TPESampler], params: int, trials: int, seed: int):
    space = {f"b{i // 2:02d}.e{i % 2}.weight": FloatDistribution(0.0, 1.0) for i in range(params)}
    rng = np.random.default_rng(seed)
    # Optuna memoizes log Phi(x) for 1,000 x: a variant run after another with the same seed
    # would find the other's values there.
    _truncnorm._log_ndtr_single.cache_clear()
    with tempfile.TemporaryDirectory() as tmp:
        study = optuna.create_study(
            storage=f"sqlite:///{Path(tmp) / 'study.db'}",
            directions=["maximize", "minimize"],
            sampler=sampler_cls(seed=seed, n_startup_trials=STARTUP),
        )
        seconds, asked = [], []
        for _ in range(trials):
            start = time.perf_counter()
            with batched_trial_writes(study._storage):
                trial = study.ask(space)
            seconds.append(time.perf_counter() - start)
            asked.append(trial.params)
            study.tell(trial, [float(rng.random()), float(rng.random())])
    return seconds[STARTUP + 1 :], asked  # the first modelled ask learns the order


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", type=int, default=74)
    parser.add_argument("--trials", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=3, help="rounds of all variants")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    seconds: dict[str, list[float]] = {name: [] for name in VARIANTS}
    same: dict[str, bool] = dict.fromkeys(VARIANTS, True)
    for repeat in range(args.repeats):
        reference = None
        for name, cls in VARIANTS.items():  # interleaved, so drift hits every variant alike
            times, asked = run(cls, args.params, args.trials, seed=repeat)
            seconds[name] += times
            reference = asked if reference is None else reference
            same[name] &= asked == reference
            print(f"round {repeat + 1}/{args.repeats}: {name} {statistics.median(times):.3f} s")
    cpu = platform.machine()
    with contextlib.suppress(OSError):
        names = [
            line for line in Path("/proc/cpuinfo").read_text().splitlines() if "model name" in line
        ]
        cpu = names[0].split(":", 1)[1].strip() + f", {len(names)} cores" if names else cpu
    print(f"\n- date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; machine: {cpu}")
    print(
        f"- {args.params} parameters, 2 objectives, SQLite; asks {STARTUP + 2}-{args.trials} of "
        f"{args.repeats} studies per variant\n"
    )
    print("| sampler | median s per ask | vs optuna | same parameters as optuna |")
    print("| --- | ---: | ---: | --- |")
    base = statistics.median(seconds["optuna"])
    for name in VARIANTS:
        median = statistics.median(seconds[name])
        print(f"| {name} | {median:.3f} | {base / median:.1f}x | {'yes' if same[name] else 'NO'} |")


if __name__ == "__main__":
    main()
