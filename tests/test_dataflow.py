"""Data-flow-space merging: the genome's paths, trials in place (identity bit for bit, repeated
layers with their own KV-cache slots, no weight copies), the spec's refusals, and the exports
(a plain deeper checkpoint that transformers loads and that scores as the trial did; mergekit's
passthrough slices, which ``mergekit-yaml`` turns into the same weights).

Models are tiny random Qwen2s (``tests/tiny_models.py``): model A and a second source that
differs from it by a task vector, as an expert fine-tuned from A would.
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
from optuna.trial import create_trial

from mergeopt import attrs
from mergeopt.blocks import BlockLayout
from mergeopt.errors import UserError
from mergeopt.export import MERGEKIT_CONFIG, METADATA, export_trials
from mergeopt.export_choice import select_trials
from mergeopt.genome import DataflowGenome, genome_from_dict
from mergeopt.merge.dataflow import DataflowEngine, PathLayer
from mergeopt.objectives.scorers.hf import HFScorer
from mergeopt.spec import StudySpec, parse_spec
from tests.tiny_models import build_tiny_model

NUM_LAYERS = 4
PROMPTS = ["Q: 12+34=\nA:", "R: hello\nA:", "abc", "Z"]
MERGEKIT_YAML = Path(sys.executable).parent / "mergekit-yaml"
# A path that repeats layers (A1 twice, B1 between), takes B's layers and scales inputs.
SCALED_PATH = [
    (0, 0, 1.0),
    (0, 1, 1.0),
    (1, 1, 1.25),
    (0, 1, 0.8),
    (1, 2, 1.1),
    (0, 2, 1.0),
    (0, 3, 1.0),
]


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("dataflow-models")
    return [
        build_tiny_model(root / "model-a", num_layers=NUM_LAYERS),
        build_tiny_model(root / "model-b", num_layers=NUM_LAYERS, task_vector_seed=1),
    ]


def texts(scorer: HFScorer) -> list[str]:
    return [g.text for g in scorer.generate(PROMPTS, max_new_tokens=16, stop=[])]


def logits(model: torch.nn.Module, text: str = "Q: 12+34=\nA: 46") -> torch.Tensor:
    ids = torch.tensor([list(range(3, 3 + len(text)))])
    with torch.inference_mode():
        return model(input_ids=ids).logits


# --------------------------------------------------------------------------- genome


def test_the_genome_offers_every_layer_of_every_source_r_times_between_fixed_ends() -> None:
    genome = DataflowGenome(source_layers=(4, 4), repeats=2, scale=(0.5, 2.0))
    assert len(genome.hops) == 16  # T = M x r
    assert genome.hops[:5] == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0)]
    assert genome.dimension == 32 and genome.param_names[:2] == ["h000.take", "h000.scale"]
    assert genome.distributions()["h003.scale"].log  # 1 is the middle of [0.5, 2]
    params = {name: -1.0 if name.endswith("take") else 1.0 for name in genome.param_names}
    params.update({"h005.take": 0.3, "h005.scale": 1.5, "h009.take": 0.01, "h009.scale": 0.7})
    assert genome.path(params) == [(0, 0, 1.0), (1, 1, 1.5), (0, 1, 0.7), (0, 3, 1.0)]
    assert genome.path(genome.source_alone()) == [(0, i, 1.0) for i in range(4)]
    assert genome_from_dict(genome.to_dict()) == genome
    unscaled = DataflowGenome(source_layers=(4, 4), repeats=1, scale=None)
    assert unscaled.param_names == [f"h{t:03d}.take" for t in range(8)]


def test_a_spec_without_space_dataflow_is_unchanged_and_vllm_is_refused_in_one_line() -> None:
    base = {
        "models": {"base": "/a", "experts": ["/b"]},
        "objectives": [{"name": "accuracy", "task": "/t.jsonl"}],
    }
    spec = parse_spec({**base, "merge": {"space": "dataflow"}}, source="s.yaml", folder=Path("/"))
    assert spec.merge.method == "passthrough" and spec.merge.dataflow is not None
    assert (spec.merge.dataflow.repeats, spec.merge.dataflow.scale) == (2, (0.5, 2.0))
    assert StudySpec.from_json(spec.to_json()) == spec  # the stored spec reads back
    empty = parse_spec(
        {**base, "merge": {"space": "dataflow", "dataflow": None}}, source="s", folder=Path("/")
    )  # `dataflow:` left empty in YAML
    assert empty.merge.dataflow == spec.merge.dataflow
    old = parse_spec({**base, "merge": {"method": "ties"}}, source="s.yaml", folder=Path("/"))
    assert old.merge.space == "parameter" and old.merge.dataflow is None
    refusals = {
        "backend: hf": ({"space": "dataflow"}, {"backend": "vllm"}),
        "leave method out": ({"space": "dataflow", "method": "ties"}, {}),
        "searches no merge parameters": ({"space": "dataflow", "fixed": {"weight": 1}}, {}),
        "need space: dataflow": ({"method": "ties", "dataflow": {"repeats": 3}}, {}),
        "remove dtype": ({"space": "dataflow", "dtype": "bfloat16"}, {}),
        "decode: dynamic or auto": ({"space": "dataflow"}, {"decode": "static"}),
    }
    for expected, (merge, scorer) in refusals.items():
        with pytest.raises(UserError, match=expected) as caught:
            parse_spec(
                {**base, "merge": merge, "scorer": scorer}, source="s.yaml", folder=Path("/")
            )
        assert "\n" not in str(caught.value)


# --------------------------------------------------------------------------- in place


def test_model_a_own_path_gives_model_a_bit_for_bit(sources: list[Path]) -> None:
    reference = HFScorer(model_dir=sources[0])
    scorer = HFScorer(model_dir=sources[0])
    engine = DataflowEngine(model=scorer.model, sources=sources[1:])
    engine.apply([(0, i, 1.0) for i in range(NUM_LAYERS)])
    assert all(isinstance(layer, PathLayer) for layer in scorer.model.model.layers)
    assert torch.equal(logits(scorer.model), logits(reference.model))
    assert texts(scorer) == texts(reference)


@pytest.mark.slow
def test_a_path_is_re_pointed_in_place_with_its_own_cache_slot_per_position(
    sources: list[Path],
) -> None:
    scorer = HFScorer(model_dir=sources[0])
    engine = DataflowEngine(model=scorer.model, sources=sources[1:])
    before = texts(scorer)
    engine.apply(SCALED_PATH)
    layers = scorer.model.model.layers
    assert scorer.model.config.num_hidden_layers == len(layers) == len(SCALED_PATH)
    # no copies: each position is the source model's resident layer module itself
    for layer, (source, index, scale) in zip(layers, SCALED_PATH, strict=True):
        assert layer.layer is engine.layers[source][index] and layer.scale == scale
    assert layers[1].layer is layers[3].layer  # A1 taken twice
    # Greedy generation with the KV cache equals recomputing the whole sequence each step: a
    # repeated layer writing into one slot would corrupt its keys.
    cached = texts(scorer)
    for prompt, text in zip(PROMPTS, cached, strict=True):
        ids = scorer.tokenizer(prompt)["input_ids"]
        generated: list[int] = []
        with torch.inference_mode():
            for _ in range(16):
                full = torch.tensor([ids + generated])
                token = int(scorer.model(input_ids=full).logits[0, -1].argmax())
                if token in scorer.eos_token_ids:
                    break
                generated.append(token)
        assert scorer.tokenizer.decode(generated, skip_special_tokens=True) == text
    assert cached != before
    engine.restore()
    assert texts(scorer) == before


# --------------------------------------------------------------------------- export


def make_dataflow_study(
    sources: list[Path], storage_url: str, params: dict[str, float]
) -> optuna.Study:
    """A data-flow study as ``create_study`` stores it, with one COMPLETE trial."""
    task = sources[0].parent / "task.jsonl"
    task.write_text('{"prompt": "Q: 1+1=\\nA:", "answer": "2"}\n')
    spec = StudySpec.model_validate(
        {
            "name": "dataflow-export",
            "models": {"base": str(sources[0]), "experts": [str(sources[1])]},
            "merge": {"space": "dataflow", "dataflow": {"repeats": 1}},
            "objectives": [{"name": "accuracy", "task": str(task)}],
        }
    )
    genome = DataflowGenome(source_layers=(NUM_LAYERS, NUM_LAYERS), repeats=1, scale=(0.5, 2.0))
    study = optuna.create_study(study_name="dataflow-export", storage=storage_url)
    study.set_user_attr(attrs.SPEC, spec.to_json())
    study.set_user_attr(attrs.GENOME, genome.to_dict())
    study.set_user_attr(attrs.LAYOUT, BlockLayout.fixed(NUM_LAYERS, layers_per_block=1).to_dict())
    study.add_trial(
        create_trial(
            value=0.5,
            params=params,
            distributions=genome.distributions(),
            user_attrs={attrs.DATAFLOW_PATH: [list(h) for h in genome.path(params)]},
        )
    )
    return study


# A1, B1 (x1.3), B2 (x0.75), A2 (x1.2), then A3: hops 1, 5, 6 and 2 of A0 A1 A2 A3 B0 B1 B2 B3.
TRIAL_PARAMS = {
    **{f"h{t:03d}.take": -0.5 for t in range(8)},
    **{f"h{t:03d}.scale": 1.0 for t in range(8)},
    "h001.take": 0.4,
    "h005.take": 0.2,
    "h005.scale": 1.3,
    "h006.take": 0.9,
    "h006.scale": 0.75,
}


@pytest.mark.slow
def test_hf_export_is_a_plain_deeper_checkpoint_that_scores_as_the_trial_did(
    sources: list[Path], sqlite_url: str, tmp_path: Path
) -> None:
    study = make_dataflow_study(sources, sqlite_url, TRIAL_PARAMS)
    [trial] = select_trials(study, trial=0)
    path = [tuple(hop) for hop in trial.user_attrs[attrs.DATAFLOW_PATH]]
    assert path == [(0, 0, 1.0), (0, 1, 1.0), (1, 1, 1.3), (1, 2, 0.75), (0, 3, 1.0)]
    out = tmp_path / "exported"
    export_trials(study, [trial], out, fmt="both")

    resident = HFScorer(model_dir=sources[0])
    DataflowEngine(model=resident.model, sources=sources[1:]).apply(path)
    exported = HFScorer(model_dir=out)  # plain transformers, no mergeopt module involved
    assert exported.model.config.num_hidden_layers == 5
    assert len(exported.model.model.layers) == 5
    # The scales are folded into o_proj/down_proj: equal up to the RMSNorm epsilon.
    torch.testing.assert_close(logits(exported.model), logits(resident.model), atol=1e-4, rtol=1e-4)
    assert texts(exported) == texts(resident)
    assert texts(exported) != texts(HFScorer(model_dir=sources[0]))
    metadata = json.loads((out / METADATA).read_text())
    assert metadata["space"] == "dataflow" and metadata["depth"] == 5
    assert metadata["path"] == [list(hop) for hop in path]


@pytest.mark.slow
def test_mergekit_yaml_on_the_passthrough_slices_reproduces_the_exported_weights(
    sources: list[Path], sqlite_url: str, tmp_path: Path
) -> None:
    from safetensors.torch import load_file

    study = make_dataflow_study(sources, sqlite_url, TRIAL_PARAMS)
    out = tmp_path / "both"
    export_trials(study, select_trials(study, trial=0), out, fmt="both")
    config = yaml.safe_load((out / MERGEKIT_CONFIG).read_text())
    assert config["merge_method"] == "passthrough"
    ranges = [(s["sources"][0]["model"], s["sources"][0]["layer_range"]) for s in config["slices"]]
    a, b = str(sources[0]), str(sources[1])
    assert ranges == [(a, [0, 2]), (b, [1, 2]), (b, [2, 3]), (a, [3, 4])]
    assert config["slices"][1]["sources"][0]["parameters"]["scale"][0] == {
        "filter": "o_proj",
        "value": 1 / 1.3,
    }
    reproduced = tmp_path / "mergekit-out"
    result = subprocess.run(
        [str(MERGEKIT_YAML), str(out / MERGEKIT_CONFIG), str(reproduced)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    # mergekit 0.1.5 writes every tensor, then saves config.json, which transformers 5 refuses:
    # it sets num_hidden_layers but keeps the source's layer_types (README, limits).
    assert result.returncode == 0 or "number of `layer_types`" in result.stderr, result.stderr[
        -2000:
    ]
    ours: dict[str, torch.Tensor] = {}
    theirs: dict[str, torch.Tensor] = {}
    for folder, state in ((out, ours), (reproduced, theirs)):
        for shard in sorted(folder.glob("*.safetensors")):
            state.update(load_file(shard))
    assert set(ours) == set(theirs)
    for name, tensor in ours.items():
        assert torch.equal(theirs[name], tensor), name
    # mergeopt's own runner of mergekit configs writes the config too: a loadable model.
    from mergeopt.merge.mergekit_config import run_mergekit_config

    replayed = tmp_path / "mergeopt-merge-out"
    run_mergekit_config(out / MERGEKIT_CONFIG, replayed)
    assert texts(HFScorer(model_dir=replayed)) == texts(HFScorer(model_dir=out))


@pytest.mark.slow
def test_a_cmaes_dataflow_study_runs_in_place_and_its_export_scores_what_the_trial_scored(
    sources: list[Path], sqlite_url: str, tmp_path: Path
) -> None:
    from mergeopt.objectives.evaluate import Evaluator
    from mergeopt.study import create_study, stored_genome, trial_path
    from mergeopt.trial_loop import run_worker

    task = tmp_path / "echo.jsonl"
    task.write_text(
        "".join(json.dumps({"prompt": f"{n}+{n}=", "answer": str(2 * n)}) + "\n" for n in range(6))
    )
    spec = parse_spec(
        {
            "name": "dataflow-run",
            "models": {"base": str(sources[0]), "experts": [str(sources[1])]},
            "merge": {"space": "dataflow", "dataflow": {"repeats": 1}},
            "objectives": [
                {"name": "accuracy", "task": str(task)},
                {
                    "name": "tokens",
                    "task": str(task),
                    "metric": "mean_tokens",
                    "direction": "minimize",
                },
            ],
            "sampler": {"name": "cmaes", "options": {"popsize": 4}, "enqueue_experts": True},
            "scorer": {"max_new_tokens": 6},
        },
        source="dataflow.yaml",
        folder=tmp_path,
    )
    study = create_study(spec, storage_url=sqlite_url)
    assert isinstance(stored_genome(study), DataflowGenome)
    assert run_worker("dataflow-run", sqlite_url, n_trials=4) == 4
    trials = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert trial_path(study, trials[0]) == [(0, i, 1.0) for i in range(NUM_LAYERS)]  # A alone
    depths = {len(trial_path(study, t)) for t in trials}
    assert len(depths) > 1  # the depth changes from trial to trial
    deepest = max(trials, key=lambda t: len(trial_path(study, t)))
    out = tmp_path / "exported"
    export_trials(study, [deepest], out, fmt="hf")
    scorer = HFScorer(model_dir=out)
    values = Evaluator(spec.objectives, scorer, scorer_options=spec.scorer).evaluate().values
    assert [values["accuracy"], values["tokens"]] == deepest.values
