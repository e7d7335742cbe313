"""Zoo build speed: milliseconds per base-pretraining step under libgomp's thread-wait settings,
on an idle machine and beside busy loops (a loaded CI machine), side by side in one run.

The zoo trains on ``TRAINING_THREADS`` OpenMP threads. While one waits for its sibling it spins
(libgomp's default: 300,000 spins), sleeps at once (``OMP_WAIT_POLICY=PASSIVE``) or spins
briefly (``GOMP_SPINCOUNT``). ``mergeopt zoo build`` sets ``GOMP_SPINCOUNT=10000`` unless the
environment sets it. Each cell is a fresh process timing the first ``--steps`` batches of the
real base corpus (after 3 warm-up steps); a process that runs past ``--timeout`` seconds
prints as ``not done``.

    python scripts/bench_zoo_build.py --steps 30 --busy 2 > docs/bench/zoo-build-DATE.md
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SETTINGS = {
    "libgomp default": {},
    "OMP_WAIT_POLICY=PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"},
    "GOMP_SPINCOUNT=10000 (zoo build)": {"GOMP_SPINCOUNT": "10000"},
}

TIMER = """
import dataclasses, random, sys, time
import torch
from mergeopt.zoo import build, tasks
from mergeopt.zoo.training import batches, deterministic_torch, make_model, make_tokenizer, train

steps = int(sys.argv[1])
training = build.ZooTraining()
rng = random.Random(0)
splits = tasks.make_splits(rng, split_size=training.split_size,
                           eval_word_lengths=training.eval_word_lengths)
tokenizer = make_tokenizer()
corpus = build._base_corpus(rng, splits, dataclasses.replace(training, base_steps=steps + 3))
data = batches(tokenizer, corpus, training.batch_size, rng=rng)
with deterministic_torch(0, threads=build.TRAINING_THREADS):
    model = make_model(tokenizer, training.shape)
    train(model, data[:3], lr=1e-3, warmup_steps=1, advance=lambda: None)
    started = time.perf_counter()
    train(model, data[3:], lr=1e-3, warmup_steps=1, advance=lambda: None)
    print((time.perf_counter() - started) / steps * 1000)
"""


def time_steps(env: dict[str, str], steps: int, timeout: float) -> float | None:
    """Milliseconds per step in a fresh process with ``env`` added, or None past ``timeout``."""
    full_env = {
        k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
    }
    full_env.update(env)
    try:
        done = subprocess.run(
            [sys.executable, "-c", TIMER, str(steps)],
            env=full_env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=True,
        )
    except subprocess.TimeoutExpired:
        return None
    return float(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--busy", type=int, default=2, help="busy loops for the loaded column")
    parser.add_argument("--timeout", type=float, default=120.0)
    args = parser.parse_args()
    rows = {}
    for label, env in SETTINGS.items():
        print(f"{label}: idle", file=sys.stderr, flush=True)
        idle = time_steps(env, args.steps, args.timeout)
        print(f"{label}: {args.busy} busy loops", file=sys.stderr, flush=True)
        hogs = [
            subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)
        ]
        try:
            loaded = time_steps(env, args.steps, args.timeout)
        finally:
            for hog in hogs:
                hog.kill()
        rows[label] = (idle, loaded)

    def cell(value: float | None) -> str:
        return f"not done in {args.timeout:.0f} s" if value is None else f"{value:.0f}"

    print(f"# Zoo build: ms per base-pretraining step ({time.strftime('%Y-%m-%d')})\n")
    print(
        f"Machine: {platform.node()}, {os.cpu_count()} CPUs, Python {platform.python_version()}. "
        f"Command: `python scripts/bench_zoo_build.py --steps {args.steps} --busy {args.busy}`.\n"
    )
    print(f"| thread wait | idle, ms/step | beside {args.busy} busy loops, ms/step |")
    print("| --- | ---: | ---: |")
    for label, (idle, loaded) in rows.items():
        print(f"| {label} | {cell(idle)} | {cell(loaded)} |")


if __name__ == "__main__":
    main()
