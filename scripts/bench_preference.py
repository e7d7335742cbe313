"""The preference-merging benchmark's question on the encoder zoo: for each preference vector,
the merge ``study export --preference`` picks from a TIES study against fine-tuning from the
base with the Chebyshev scalarization and with EPO search (``mergeopt baseline``), each
scored on the held-out files; and the compute (seconds) each took.

    .venv/bin/python scripts/bench_preference.py [--zoo .cache/encoder-2] [--trials 40]
        [--steps 150] [--batch-size 16] [--out docs/bench/preference-2026-11-30]

The study runs as a user would run it (``mergeopt study create/run/evaluate`` in fresh
processes) on a throw-away SQLite study; the baselines run in this process
(``mergeopt baseline``'s ``train_baseline``, recorded in the study as the command records
them). The merge's compute is the ``study run`` wall time plus ``study evaluate --heldout
--pareto``, paid once for all preferences (each pick reads the finished front); a
baseline's is its fine-tuning (``train_seconds``, scoring not counted), paid per preference.
Writes OUT.md (the table) and OUT.jsonl (one row per preference and method).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

os.environ.setdefault("GOMP_SPINCOUNT", "10000")  # before torch: as `mergeopt baseline` does
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

PREFERENCES = (
    (0.25, 0.25, 0.25, 0.25),
    (0.7, 0.1, 0.1, 0.1),
    (0.1, 0.7, 0.1, 0.1),
    (0.1, 0.1, 0.7, 0.1),
    (0.1, 0.1, 0.1, 0.7),
)
METHODS = ("chebyshev", "epo")


def mergeopt(*args: str) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "mergeopt.cli", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), "GOMP_SPINCOUNT": "10000"},
    )
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        sys.exit(f"mergeopt {' '.join(args)} failed:\n{result.stderr}{result.stdout}")
    return result, seconds


def spec_on(zoo: Path) -> dict:
    """``studies/encoder.yaml`` on this zoo (absolute paths)."""
    from mergeopt.zoo.encoder import EncoderZoo

    built = EncoderZoo.from_dir(zoo)
    spec = yaml.safe_load((REPO / "studies" / "encoder.yaml").read_text())
    spec["name"] = "preference"
    spec["models"] = {
        "base": str(built.base),
        "experts": [str(built.experts[o["name"]]) for o in spec["objectives"]],
    }
    for objective in spec["objectives"]:
        name = objective["name"]
        objective["task"] = str(built.tasks[name])
        objective["heldout"] = str(built.tasks[f"{name}.heldout"])
        objective["train"] = str(built.tasks[f"{name}.train"])
    return spec


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="bench-preference-") as work:
        run(Path(work))


def run(work: Path) -> None:
    """The benchmark, its study and baseline folders in ``work`` (removed afterwards)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--zoo", type=Path, default=REPO / ".cache" / "encoder-2")
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", type=Path, default=REPO / "docs/bench/preference-2026-11-30")
    args = parser.parse_args()

    import optuna

    from mergeopt.baselines import BaselineTraining, record_in_study, train_baseline
    from mergeopt.export_choice import select_trials
    from mergeopt.progress import stages
    from mergeopt.report import heldout_values, objective_names
    from mergeopt.spec import load_spec

    url = f"sqlite:///{work / 'studies.db'}"
    spec = spec_on(args.zoo)
    spec_file = work / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(spec, sort_keys=False))
    mergeopt("study", "create", str(spec_file), "--storage", url)
    _, search_seconds = mergeopt(
        "study", "run", "preference", "-n", str(args.trials), "--storage", url, "--no-progress"
    )
    _, heldout_seconds = mergeopt(
        "study", "evaluate", "preference", "--heldout", "--pareto", "--storage", url
    )
    merge_seconds = search_seconds + heldout_seconds
    print(
        f"study: {args.trials} trials in {search_seconds:.0f} s, held-out {heldout_seconds:.0f} s"
    )

    study = optuna.load_study(study_name="preference", storage=url)
    names = objective_names(study)
    parsed_spec = load_spec(spec_file)
    training = BaselineTraining(steps=args.steps, batch_size=args.batch_size)
    rows = []
    with stages(False) as progress:
        for preference in PREFERENCES:
            text = ",".join(str(w) for w in preference)
            [trial] = select_trials(study, preference=list(preference))
            rows.append(
                {
                    "preference": list(preference),
                    "method": f"merge (trial {trial.number})",
                    "values": dict(zip(names, trial.values, strict=True)),
                    "heldout": dict(zip(names, heldout_values(trial, names) or [], strict=True)),
                    "seconds": round(merge_seconds, 1),
                }
            )
            for method in METHODS:
                out = work / f"{method}-{text}"
                record = train_baseline(
                    parsed_spec,
                    method=method,
                    preference=list(preference),
                    out_dir=out,
                    training=training,
                    progress=progress,
                )
                record_in_study(study, record, out)
                rows.append(
                    {
                        "preference": list(preference),
                        "method": method,
                        "values": record["values"],
                        "heldout": record["heldout"],
                        "seconds": record["train_seconds"],
                        "moves": record["moves"],
                    }
                )
                print(f"{method} {text}: {record['heldout']} in {record['train_seconds']:.0f} s")

    header = (
        "| preference | method | "
        + " | ".join(names)
        + " | compute s |\n|---|---|"
        + "---|" * (len(names) + 1)
    )
    lines = [header]
    for row in rows:
        cells = " | ".join(f"{row['heldout'][n]:.3f}" for n in names)
        weights = ",".join(f"{w:g}" for w in row["preference"])
        lines.append(f"| {weights} | {row['method']} | {cells} | {row['seconds']:.0f} |")
    table = "\n".join(lines)
    command = " ".join(
        ["python", "scripts/bench_preference.py", "--trials", str(args.trials), "--steps",
         str(args.steps), "--batch-size", str(args.batch_size)]
    )  # fmt: skip
    note = f"""# Preference merging against fine-tuning baselines on the encoder zoo

Date: {time.strftime("%Y-%m-%d %H:%M %Z")}. Machine: {platform.node()}, {os.cpu_count()} CPU
cores, CPU only, **shared with four other jobs at the time** (seconds are wall times there:
compare them with each other, not with other tables). Python {platform.python_version()}.
Command: `{command}` (zoo {args.zoo.name}).

Held-out values (200 items a task; entailment is macro-F1, the others accuracy). The merge row
is the TIES trial `study export --preference` picks from a {args.trials}-trial study
(`studies/encoder.yaml`, searched on the 200-item search files); its compute is the whole
study plus its held-out scoring, paid once for all five preferences. A baseline fine-tunes the
base (a fresh head per task) for {args.steps} steps of {args.batch_size} items per task on the
zoo's training files (`TASK.train.jsonl`, 2,000 items a task); its compute is that training,
paid per preference. The experts' own training (the zoo build) is not counted for the merge.

{table}
"""
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text(note)
    args.out.with_suffix(".jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(table)


if __name__ == "__main__":
    main()
