"""Exported trials are the models the trials scored: HF folders, mergekit YAML, atomic writes.

Models are tiny random Qwen2s (head_dim 64) built in a tmp folder: a base and two experts that
differ from it by random task vectors. Studies are written by hand with the attrs a mergeopt
study carries (spec, genome, layout), and trials with ``study.add_trial`` — the recipe and seed
a worker would have stored — so these tests need no trial loop.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from optuna.trial import FrozenTrial, create_trial

from mergeopt import attrs
from mergeopt.blocks import BlockLayout
from mergeopt.errors import UserError
from mergeopt.export import (
    INDEX_JSON,
    INDEX_MD,
    MERGEKIT_CONFIG,
    METADATA,
    export_trials,
)
from mergeopt.export_choice import select_trials
from mergeopt.genome import Genome
from mergeopt.merge.engine import MergeEngine, ModuleTarget
from mergeopt.merge.mergekit_config import run_mergekit_config
from mergeopt.objectives.scorers.hf import HFScorer
from mergeopt.spec import StudySpec
from tests.tiny_models import build_tiny_model

NUM_LAYERS = 4
LAYOUT = BlockLayout.fixed(NUM_LAYERS, num_blocks=2)  # 2 layer blocks + embeddings/norm/head
PROMPTS = ["Q: 12+34=\nA:", "R: hello\nA:", "abc", "Z"]
MERGEKIT_YAML = Path(sys.executable).parent / "mergekit-yaml"


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    folders = {"base": root / "base", "e0": root / "expert-0", "e1": root / "expert-1"}
    for seed, folder in enumerate(folders.values()):
        build_tiny_model(folder, num_layers=NUM_LAYERS, task_vector_seed=seed or None)
    return folders


def make_study(
    model_dirs: dict[str, Path],
    storage_url: str,
    *,
    method: str,
    search: dict[str, tuple[float, float]],
    trials: list[tuple[dict[str, float], list[float], int | None]],
    name: str = "export-test",
) -> optuna.Study:
    """A study as ``create_study`` stores it, with COMPLETE trials (params, values, seed)."""
    task = model_dirs["base"].parent / "task.jsonl"
    task.write_text('{"prompt": "Q: 1+1=\\nA:", "answer": "2"}\n')
    spec = StudySpec.model_validate(
        {
            "name": name,
            "models": {
                "base": str(model_dirs["base"]),
                "experts": [str(model_dirs["e0"]), str(model_dirs["e1"])],
            },
            "merge": {"method": method, "search": search, "blocks": {"num_blocks": 2}},
            "objectives": [
                {"name": "accuracy", "task": str(task), "direction": "maximize"},
                {
                    "name": "tokens",
                    "task": str(task),
                    "metric": "mean_tokens",
                    "direction": "minimize",
                },
            ],
        }
    )
    genome = Genome(num_blocks=LAYOUT.num_blocks, num_experts=2, searched=search)
    study = optuna.create_study(
        study_name=name, storage=storage_url, directions=["maximize", "minimize"]
    )
    study.set_metric_names(["accuracy", "tokens"])
    study.set_user_attr(attrs.SPEC, spec.to_json())
    study.set_user_attr(attrs.GENOME, genome.to_dict())
    study.set_user_attr(attrs.LAYOUT, LAYOUT.to_dict())
    for params, values, seed in trials:
        study.add_trial(
            create_trial(
                values=values,
                params=params,
                distributions=genome.distributions(),
                user_attrs={
                    attrs.RECIPE: genome.block_params(params),
                    attrs.METRICS: {"accuracy": {"accuracy": values[0]}},
                    "mergeopt:seed": seed,
                },
            )
        )
    return study


def per_block_params(genome_values: dict[str, list[float]]) -> dict[str, float]:
    """``{"weight": [e0 b0, e1 b0, e0 b1, ...]}`` -> trial params in genome order."""
    params: dict[str, float] = {}
    for name, values in genome_values.items():
        index = 0
        for block in range(LAYOUT.num_blocks):
            for expert in range(2):
                params[f"b{block:02d}.e{expert}.{name}"] = values[index]
                index += 1
    return params


DARE_TRIAL = per_block_params(
    {"weight": [0.9, 0.2, 0.1, 0.8, 0.5, 0.5], "density": [0.5, 0.9, 0.7, 0.3, 0.6, 0.8]}
)
TIES_TRIAL = per_block_params(
    {"weight": [0.7, 0.3, 0.2, 1.1, 0.4, 0.6], "density": [0.4, 0.8, 0.9, 0.2, 0.5, 0.7]}
)


def load_state(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        state.update(load_file(shard))
    return state


def resident_generations(
    model_dirs: dict[str, Path], study: optuna.Study, trial: FrozenTrial
) -> list[str]:
    """What a worker's resident model generated for the trial: engine merge into the scorer."""
    scorer = HFScorer(model_dir=model_dirs["base"])
    engine = MergeEngine(
        base=model_dirs["base"],
        experts=[model_dirs["e0"], model_dirs["e1"]],
        layout=LAYOUT,
        method=json.loads(json.dumps(study.user_attrs[attrs.SPEC]))["merge"]["method"],
    )
    engine.merge(
        trial.user_attrs[attrs.RECIPE],
        target=ModuleTarget(module=scorer.model),  # what HFScorer.merge_target() returns
        seed=trial.user_attrs["mergeopt:seed"],
    )
    return [g.text for g in scorer.generate(PROMPTS, max_new_tokens=24, stop=[])]


@pytest.mark.slow
def test_a_trial_stored_without_a_seed_is_exported_with_the_seed_its_worker_derives(
    model_dirs: dict[str, Path], sqlite_url: str
) -> None:
    from mergeopt.seeds import derive_seed
    from mergeopt.study import stored_spec, trial_seed

    study = make_study(
        model_dirs,
        sqlite_url,
        method="dare_ties",
        search={"weight": (0.0, 1.0), "density": (0.1, 1.0)},
        trials=[(DARE_TRIAL, [0.5, 10.0], 1234567), (DARE_TRIAL, [0.4, 9.0], None)],
    )
    seeded, unseeded = study.trials
    assert trial_seed(study, seeded) == 1234567
    # The rule of the worker loop and of held-out evaluation: derived from the spec's seed.
    assert trial_seed(study, unseeded) == derive_seed(stored_spec(study).seed, 1)


def test_hf_export_loads_in_transformers_and_generates_what_the_resident_model_did(
    model_dirs: dict[str, Path], sqlite_url: str, tmp_path: Path
) -> None:
    # dare_ties draws random masks: equal outputs also show the trial's seed was used.
    study = make_study(
        model_dirs,
        sqlite_url,
        method="dare_ties",
        search={"weight": (0.0, 1.0), "density": (0.1, 1.0)},
        trials=[(DARE_TRIAL, [0.5, 10.0], 1234567)],
    )
    [trial] = select_trials(study, trial=0)
    out = tmp_path / "exported"
    assert export_trials(study, [trial], out, fmt="both") == [out]

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert (
        tokenizer("abc")["input_ids"]
        == AutoTokenizer.from_pretrained(model_dirs["base"])("abc")["input_ids"]
    )
    assert model.generation_config.eos_token_id == 1
    exported = [
        g.text for g in HFScorer(model_dir=out).generate(PROMPTS, max_new_tokens=24, stop=[])
    ]
    assert exported == resident_generations(model_dirs, study, trial)
    assert exported != [
        g.text
        for g in HFScorer(model_dir=model_dirs["base"]).generate(
            PROMPTS, max_new_tokens=24, stop=[]
        )
    ]
    metadata = json.loads((out / METADATA).read_text())
    assert metadata["study"] == "export-test" and metadata["trial"] == 0
    assert metadata["seed"] == 1234567
    assert metadata["objectives"]["tokens"] == {"value": 10.0, "direction": "minimize"}
    # mergekit-yaml cannot replay the masks; `mergeopt merge --seed` replays them exactly.
    assert (
        "mergeopt merge mergekit_config.yml OUT --seed 1234567"
        in (out / MERGEKIT_CONFIG).read_text()
    )
    replayed = tmp_path / "replayed"
    run_mergekit_config(out / MERGEKIT_CONFIG, replayed, seed=1234567)
    exported_state = load_state(out)
    for name, tensor in load_state(replayed).items():
        assert torch.equal(tensor, exported_state[name]), name


@pytest.mark.slow
@pytest.mark.parametrize(
    ("method", "dtype"),
    [("ties", "float32"), ("task_arithmetic", "bfloat16"), ("linear", "float32")],
)
def test_mergekit_yaml_on_the_exported_config_reproduces_the_exported_weights(
    model_dirs: dict[str, Path], tmp_path: Path, method: str, dtype: str
) -> None:
    search = {"weight": (0.0, 1.5), "density": (0.1, 1.0)}
    trial_params = TIES_TRIAL
    if method in ("task_arithmetic", "linear"):
        search = {"weight": (0.0, 1.5)}
        trial_params = {k: v for k, v in TIES_TRIAL.items() if k.endswith("weight")}
    study = make_study(
        model_dirs,
        f"sqlite:///{tmp_path / 'db.sqlite'}",
        method=method,
        search=search,
        trials=[(trial_params, [0.5, 10.0], 0)],
    )
    if dtype != "float32":  # merge and save in bf16: the spec's merge and scorer dtypes
        spec = dict(study.user_attrs[attrs.SPEC])
        spec["merge"] = {**spec["merge"], "dtype": dtype}
        spec["scorer"] = {**spec["scorer"], "dtype": dtype}
        study.set_user_attr(attrs.SPEC, spec)
    out = tmp_path / "both"
    export_trials(study, select_trials(study, trial=0), out, fmt="both")
    config = yaml.safe_load((out / MERGEKIT_CONFIG).read_text())
    assert config["merge_method"] == method and config["dtype"] == dtype
    weights = config["models"][1]["parameters"]["weight"]
    assert weights[0] == {"filter": "layers.0.", "value": 0.3}  # layer 0 is in block 0
    assert weights[-1] == {"value": 0.6}  # embeddings, norm, head: the last block

    reproduced = tmp_path / "mergekit-out"
    result = subprocess.run(
        [str(MERGEKIT_YAML), str(out / MERGEKIT_CONFIG), str(reproduced)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    ours, theirs = load_state(out), load_state(reproduced)
    assert set(ours) == set(theirs)
    tolerance = (
        {"atol": 1e-6, "rtol": 1e-6} if dtype == "float32" else {"atol": 1e-2, "rtol": 1.6e-2}
    )
    for name, tensor in ours.items():
        assert theirs[name].dtype == tensor.dtype, name
        torch.testing.assert_close(theirs[name], tensor, **tolerance, msg=name)


@pytest.mark.slow
def test_pareto_export_writes_a_folder_per_trial_and_an_index(
    model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    params = {k: v for k, v in TIES_TRIAL.items() if k.endswith("weight")}
    other = {k: 1.0 - v / 2 for k, v in params.items()}
    study = make_study(
        model_dirs,
        f"sqlite:///{tmp_path / 'db.sqlite'}",
        method="task_arithmetic",
        search={"weight": (0.0, 1.5)},
        trials=[(params, [0.9, 10.0], 0), (other, [0.5, 3.0], 0), (params, [0.4, 11.0], 0)],
    )
    out = tmp_path / "pareto"
    folders = export_trials(
        study,
        select_trials(study, pareto=True),
        out,
        fmt="mergekit",
        index=True,
        storage_url="postgresql://mergeopt:s3cret@db.example/studies",
    )
    assert folders == [out / "trial-0000", out / "trial-0001"]
    assert sorted(p.name for p in out.iterdir()) == [
        INDEX_JSON,
        INDEX_MD,
        "trial-0000",
        "trial-0001",
    ]
    index = json.loads((out / INDEX_JSON).read_text())
    assert [row["trial"] for row in index["trials"]] == [0, 1]
    assert index["trials"][1]["values"] == {"accuracy": 0.5, "tokens": 3.0}
    assert "| 1 | [trial-0001](trial-0001/) | 0.5 | 3 |" in (out / INDEX_MD).read_text()
    metadata = json.loads((out / "trial-0001" / METADATA).read_text())
    assert metadata["storage"] == "postgresql://mergeopt:***@db.example/studies"
    assert (out / "trial-0001" / MERGEKIT_CONFIG).is_file()
    assert not list(out.glob("trial-0001/*.safetensors"))  # mergekit format: YAML only


def test_an_existing_folder_is_kept_unless_forced(
    model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    params = {k: v for k, v in TIES_TRIAL.items() if k.endswith("weight")}
    study = make_study(
        model_dirs,
        f"sqlite:///{tmp_path / 'db.sqlite'}",
        method="task_arithmetic",
        search={"weight": (0.0, 1.5)},
        trials=[(params, [0.9, 10.0], 0)],
    )
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(UserError, match="already exists; choose another --out or pass --force"):
        export_trials(study, select_trials(study, trial=0), out, fmt="mergekit")
    assert (out / "precious.txt").read_text() == "keep me"
    export_trials(study, select_trials(study, trial=0), out, fmt="mergekit", force=True)
    assert sorted(p.name for p in out.iterdir()) == [MERGEKIT_CONFIG, METADATA]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_a_failure_in_the_middle_of_an_export_leaves_no_folder(
    model_dirs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    params = {k: v for k, v in TIES_TRIAL.items() if k.endswith("weight")}
    study = make_study(
        model_dirs,
        f"sqlite:///{tmp_path / 'db.sqlite'}",
        method="task_arithmetic",
        search={"weight": (0.0, 1.5)},
        trials=[(params, [0.9, 10.0], 0), (params, [0.5, 3.0], 0)],
    )
    import mergeopt.export as export

    calls: list[int] = []

    def fail_on_second_trial(config: dict, path: Path, *, header: str = "") -> None:
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("disk full")
        real_write(config, path, header=header)

    real_write = export.write_mergekit_config
    monkeypatch.setattr(export, "write_mergekit_config", fail_on_second_trial)
    out = tmp_path / "pareto"
    with pytest.raises(RuntimeError, match="disk full"):
        export_trials(study, select_trials(study, pareto=True), out, fmt="mergekit")
    assert len(calls) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["db.sqlite"]


KILLED_EXPORT = """
import os, signal, sys
import optuna
import mergeopt.export as export
from mergeopt.export import export_trials
from mergeopt.export_choice import select_trials

written = []
real_write = export.HFModelWriter.write

def write_then_die(self, block_params, *, seed, folder):
    real_write(self, block_params, seed=seed, folder=folder)
    written.append(folder)
    if len(written) == 2:  # the second model is on disk, the export is not finished
        os.kill(os.getpid(), signal.SIGKILL)

export.HFModelWriter.write = write_then_die
study = optuna.load_study(study_name="export-test", storage=sys.argv[1])
export_trials(study, select_trials(study, pareto=True), sys.argv[2], fmt="both")
"""


@pytest.mark.slow
def test_a_killed_export_leaves_nothing_that_looks_complete(
    model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    params = {k: v for k, v in TIES_TRIAL.items() if k.endswith("weight")}
    other = {k: 1.0 - v / 2 for k, v in params.items()}
    storage_url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    make_study(
        model_dirs,
        storage_url,
        method="task_arithmetic",
        search={"weight": (0.0, 1.5)},
        trials=[(params, [0.9, 10.0], 0), (other, [0.5, 3.0], 0), (params, [0.1, 1.0], 0)],
    )
    exports = tmp_path / "exports"
    result = subprocess.run(
        [sys.executable, "-c", KILLED_EXPORT, storage_url, str(exports / "pareto")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == -9, result.stderr[-2000:]
    leftovers = list(exports.iterdir())
    assert not (exports / "pareto").exists()
    # Only the hidden staging folder remains: no index, and not under the requested name.
    assert [p.name.startswith(".pareto.tmp-") for p in leftovers] == [True]
    assert not (leftovers[0] / INDEX_JSON).exists()


VLLM_GREEDY = """
import json, sys
from vllm import LLM, SamplingParams
llm = LLM(model=sys.argv[1], dtype="float32", gpu_memory_utilization=0.3, enforce_eager=True,
          max_model_len=128, seed=0)
outputs = llm.generate(json.loads(sys.argv[2]), SamplingParams(temperature=0.0, max_tokens=12))
print("RESULT " + json.dumps([o.outputs[0].text for o in outputs]))
"""


@pytest.mark.slow
def test_hf_export_runs_in_vllm_as_is(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    params = {k: v for k, v in TIES_TRIAL.items() if k.endswith("weight")}
    study = make_study(
        model_dirs,
        f"sqlite:///{tmp_path / 'db.sqlite'}",
        method="task_arithmetic",
        search={"weight": (0.0, 1.5)},
        trials=[(params, [0.9, 10.0], 0)],
    )
    out = tmp_path / "for-vllm"
    export_trials(study, select_trials(study, trial=0), out, fmt="hf")
    result = subprocess.run(
        [sys.executable, "-c", VLLM_GREEDY, str(out), json.dumps(PROMPTS)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(x for x in result.stdout.splitlines() if x.startswith("RESULT "))
    from_vllm = json.loads(line.removeprefix("RESULT "))
    from_transformers = HFScorer(model_dir=out).generate(PROMPTS, max_new_tokens=12, stop=[])
    assert from_vllm == [g.text for g in from_transformers]
