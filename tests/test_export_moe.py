"""``study export --moe``: chosen trials as the experts of one mergekit-moe model, its router
initialized from prompts of each trial's strongest objective's task.

On the zoo: the two experts alone are the trials (their values on the arithmetic and reversal
tasks as ``zoo.json`` measured them: expert-steps is best on arithmetic, expert-direct on
reversal); the MoE must load in transformers, generate, and send held-out prompts of each task
mostly to the expert best on it.
"""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import create_trial
from safetensors.torch import save_file

from mergeopt import attrs
from mergeopt.blocks import BlockLayout
from mergeopt.errors import UserError
from mergeopt.export import METADATA
from mergeopt.export_moe import check_moe, export_moe, strongest_objectives
from mergeopt.genome import Genome
from mergeopt.spec import StudySpec

LAYOUT = BlockLayout.fixed(8, num_blocks=4)


def test_a_trial_s_strongest_objective_is_where_it_stands_best_among_the_chosen() -> None:
    names = ["arith", "reverse", "tokens"]
    maximize = [True, True, False]
    values = [[0.94, 0.08, 21.5], [0.45, 0.38, 4.7], [0.60, 0.20, 4.7]]
    # trial 2 ties for fewest tokens with trial 1; trial 1 is also best on reverse (earlier)
    assert strongest_objectives(names, maximize, values) == [0, 1, 2]


def zoo_study(zoo: Path, storage_url: str, objectives: list[dict[str, str]]) -> optuna.Study:
    """The zoo's two experts alone as COMPLETE trials, valued as ``zoo.json`` measured them."""
    measured = json.loads((zoo / "zoo.json").read_text())["models"]
    experts = ["expert-direct", "expert-steps"]
    spec = StudySpec.model_validate(
        {
            "name": "moe",
            "models": {"base": str(zoo / "base"), "experts": [str(zoo / e) for e in experts]},
            "merge": {"method": "task_arithmetic", "blocks": {"num_blocks": 4}},
            "objectives": [
                {"name": o["name"], "task": str(zoo / "tasks" / f"{o['task']}.jsonl")}
                for o in objectives
            ],
        }
    )
    genome = Genome(num_blocks=LAYOUT.num_blocks, num_experts=2, searched={"weight": (0.0, 1.0)})
    study = optuna.create_study(
        study_name="moe", storage=storage_url, directions=["maximize"] * len(objectives)
    )
    study.set_metric_names([o["name"] for o in objectives])
    study.set_user_attr(attrs.SPEC, spec.to_json())
    study.set_user_attr(attrs.GENOME, genome.to_dict())
    study.set_user_attr(attrs.LAYOUT, LAYOUT.to_dict())
    for index, expert in enumerate(experts):
        params = genome.expert_alone(index)
        study.add_trial(
            create_trial(
                values=[measured[expert][o["task"]]["accuracy"] for o in objectives],
                params=params,
                distributions=genome.distributions(),
                user_attrs={attrs.RECIPE: genome.block_params(params)},
            )
        )
    return study


def routed_expert_counts(folder: Path, prompts: list[str]) -> list[int]:
    """How often each routed expert is chosen, over every token and layer of ``prompts``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    chosen: list[torch.Tensor] = []
    gates = [m for n, m in model.named_modules() if n.endswith("mlp.gate")]
    assert gates, "no router found"
    hooks = [g.register_forward_hook(lambda _m, _i, out: chosen.append(out[2])) for g in gates]
    with torch.inference_mode():
        for prompt in prompts:
            model(**tokenizer(prompt, return_tensors="pt"))
    for hook in hooks:
        hook.remove()
    return torch.bincount(torch.cat([c.flatten() for c in chosen]), minlength=2).tolist()


@pytest.mark.slow
def test_the_moe_of_two_trials_loads_generates_and_routes_each_task_to_its_best_expert(
    zoo_dir: Path, sqlite_url: str, tmp_path: Path
) -> None:
    study = zoo_study(
        zoo_dir,
        sqlite_url,
        [{"name": "arith", "task": "arith"}, {"name": "reverse", "task": "reverse"}],
    )
    out = tmp_path / "moe"
    export_moe(study, study.get_trials(), out, gate_mode="hidden")

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_experts == 2 and model.config.num_experts_per_tok == 1
    tokenizer = AutoTokenizer.from_pretrained(out)
    generated = model.generate(**tokenizer("Q: 12+34=\nA:", return_tensors="pt"), max_new_tokens=8)
    assert generated.shape[1] > len(tokenizer("Q: 12+34=\nA:")["input_ids"])
    metadata = json.loads((out / METADATA).read_text())
    assert [(e["trial"], e["strongest_objective"]) for e in metadata["experts"]] == [
        (0, "reverse"),  # expert-direct
        (1, "arith"),  # expert-steps
    ]

    def heldout(task: str) -> list[str]:
        lines = (zoo_dir / "tasks" / f"{task}.heldout.jsonl").read_text().splitlines()
        return [json.loads(line)["prompt"] for line in lines[:20]]

    arith = routed_expert_counts(out, heldout("arith"))
    reverse = routed_expert_counts(out, heldout("reverse"))
    assert arith[1] > 0.6 * sum(arith), arith  # arithmetic -> expert-steps (trial 1)
    assert reverse[0] > 0.6 * sum(reverse), reverse  # reversal -> expert-direct (trial 0)


def test_moe_limits_are_one_line_errors(zoo_dir: Path, sqlite_url: str, tmp_path: Path) -> None:
    # Both objectives on one task: the two routers would be identical.
    study = zoo_study(
        zoo_dir,
        sqlite_url,
        [{"name": "arith", "task": "arith"}, {"name": "again", "task": "arith"}],
    )
    out = tmp_path / "moe"
    with pytest.raises(UserError, match="routers would be identical") as caught:
        export_moe(study, study.get_trials(), out)
    assert "\n" not in str(caught.value) and not out.exists()
    with pytest.raises(UserError, match="at least 2 trials"):
        export_moe(study, study.get_trials()[:1], out)
    with pytest.raises(UserError, match="--gate-mode"):
        export_moe(study, study.get_trials(), out, gate_mode="learned")


def test_a_data_flow_study_and_architectures_mergekit_moe_lacks_are_refused_in_one_line(
    tmp_path: Path,
) -> None:
    trials = [create_trial(values=[0.9]), create_trial(values=[0.5])]

    def spec(base: Path, **merge: str) -> StudySpec:
        return StudySpec.model_validate(
            {
                "name": "moe",
                "models": {"base": str(base), "experts": [str(base)]},
                "merge": merge,
                "objectives": [{"name": "arith", "task": str(tmp_path / "arith.jsonl")}],
            }
        )

    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    save_file({"wte.weight": torch.zeros(2, 2)}, gpt2 / "model.safetensors")
    refusals = {
        "experts of one shape": spec(gpt2, space="dataflow"),  # trials of different depths
        "this study's are 'gpt2'": spec(gpt2, method="task_arithmetic"),
    }
    for expected, study_spec in refusals.items():
        with pytest.raises(UserError, match=expected) as caught:
            check_moe(study_spec, trials, "hidden")
        assert "\n" not in str(caught.value)
