"""`run_mergekit_config` equals mergekit's `run_merge` on the same YAML (mergekit is the oracle).

fp32 merges must be bit-identical. bf16 merges are bit-identical too, except for magnitude
sparsification (ties, breadcrumbs*) at elements whose |delta| equals a selection threshold of some
expert: mergekit's argsort leaves the order of tied magnitudes unspecified (bf16 has only 2^15
magnitudes, so ties are common, especially in norms near 1.0), mergeopt keeps ties in index order.
Random methods (dare_*, della*) are compared statistically in test_merge_methods.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from mergeopt.errors import UserError
from mergeopt.merge.mergekit_config import run_mergekit_config

NUM_LAYERS = 4


def make_tiny_qwen2_family(
    folder: Path, *, tied: bool, num_experts: int = 3, seed: int = 0
) -> list[Path]:
    """A random Qwen2 base (4 layers, hidden 128, GQA 2 q heads / 1 kv head, head_dim 64) and
    experts = base + small noise, saved as safetensors folders. Returns [base, *experts]."""
    import transformers

    config = transformers.Qwen2Config(
        vocab_size=96,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=64,
        tie_word_embeddings=tied,
        max_position_embeddings=64,
        architectures=["Qwen2ForCausalLM"],
    )
    torch.manual_seed(seed)
    model = transformers.Qwen2ForCausalLM(config)
    base_state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    if tied:
        base_state.pop("lm_head.weight")
    generator = torch.Generator().manual_seed(seed + 1)
    paths = []
    for index in range(num_experts + 1):
        path = folder / ("base" if index == 0 else f"expert{index}")
        path.mkdir(parents=True)
        state = {
            name: (
                tensor
                if index == 0
                else tensor + 0.02 * torch.randn(tensor.shape, generator=generator)
            )
            for name, tensor in base_state.items()
        }
        save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
        config.save_pretrained(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def untied(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return make_tiny_qwen2_family(tmp_path_factory.mktemp("untied"), tied=False)


@pytest.fixture(scope="module")
def tied(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return make_tiny_qwen2_family(tmp_path_factory.mktemp("tied"), tied=True, seed=5)


def read_folder(folder: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


def mergekit_merge(config: dict[str, Any], out: Path) -> dict[str, torch.Tensor]:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    run_merge(
        MergeConfiguration.model_validate(config),
        str(out),
        MergeOptions(quiet=True, copy_tokenizer=False, write_model_card=False),
    )
    return read_folder(out)


def both(config: dict[str, Any], tmp_path: Path) -> tuple[dict, dict]:
    config_path = tmp_path / "config.yml"
    config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
    run_mergekit_config(config_path, tmp_path / "ours")
    return read_folder(tmp_path / "ours"), mergekit_merge(config, tmp_path / "theirs")


def assert_same(
    ours: dict, theirs: dict, *, ties_at: dict[str, torch.Tensor] | None = None
) -> None:
    """Every tensor bit-identical, except (bf16 magnitude sparsification) at positions in
    ``ties_at[name]``, where some expert's |delta| equals one of its selection thresholds."""
    assert set(ours) >= set(theirs)
    for name, expected in theirs.items():
        got = ours[name]
        assert got.dtype == expected.dtype, name
        differing = got != expected
        if ties_at is not None:
            differing &= ~ties_at[name]
        assert not differing.any(), f"{name}: max diff {(got - expected).abs().max()}"


def threshold_ties(config: dict[str, Any], config_path: Path) -> dict[str, torch.Tensor]:
    """Per tensor: positions whose |delta| ties with a magnitude threshold of some expert."""
    from mergeopt.merge.mergekit_config_plan import MergekitConfig

    parsed = MergekitConfig(config=config, config_path=config_path)
    base = load_file(parsed.base_or_first / "model.safetensors")
    piece = parsed.slices[0]
    experts = [load_file(piece.sources[i].path / "model.safetensors") for i in piece.experts]
    ties: dict[str, torch.Tensor] = {}
    for plan in parsed.tensor_plans(list(base)):
        name, base_tensor = plan.name, base[plan.name]
        per_expert, _ = parsed.tensor_params(plan)
        tied = torch.zeros(base_tensor.shape, dtype=torch.bool)
        for expert, params in zip(experts, per_expert, strict=True):
            delta = expert[name].bfloat16() - base_tensor.bfloat16()
            magnitude = delta.abs().float().reshape(-1)
            ordered = magnitude.sort(descending=True).values
            n = magnitude.numel()
            density = params.get("density", 1.0)
            if parsed.merge_method.sparsification == "magnitude":
                cuts = [max(1, int(density * n))]
            else:
                top = min(int(params.get("gamma", 0.01) * n), n - int(density * n))
                cuts = [top, top + int(density * n)]
            for cut in cuts:
                if 0 < cut <= n:
                    tied |= (delta.abs().float() == ordered[cut - 1]).view(tied.shape)
                if 0 <= cut < n:
                    tied |= (delta.abs().float() == ordered[cut]).view(tied.shape)
        ties[name] = tied
    return ties


def models_config(
    paths: list[Path], method: str, per_model: list[dict], **top: Any
) -> dict[str, Any]:
    base, *experts = paths
    config: dict[str, Any] = {"merge_method": method, "dtype": top.pop("dtype", "float32")}
    if method != "linear":
        config["base_model"] = str(base)
    config["models"] = [
        {"model": str(p), "parameters": params}
        for p, params in zip(experts, per_model, strict=False)
    ]
    config.update(top)
    return config


TWO = [{"weight": 0.7, "density": 0.4}, {"weight": 0.5, "density": 0.7}]
THREE = [*TWO, {"weight": 0.3, "density": 0.6}]
CASES: list[tuple[str, str, list[dict], dict]] = [
    ("task_arithmetic-two", "task_arithmetic", [{"weight": 0.7}, {"weight": 0.5}], {}),
    (
        "task_arithmetic-normalize-lambda-three",
        "task_arithmetic",
        [{"weight": 0.7}, {"weight": 0.5}, {"weight": 0.2}],
        {"parameters": {"normalize": True, "lambda": 0.8}},
    ),
    ("linear-two", "linear", [{"weight": 0.7}, {"weight": 0.5}], {}),
    (
        "linear-unnormalized-gradient",
        "linear",
        [{"weight": [0.1, 0.9]}, {"weight": 0.5}],
        {"parameters": {"normalize": False}},
    ),
    ("ties-two", "ties", TWO, {}),
    ("ties-three-no-normalize", "ties", THREE, {"parameters": {"normalize": False}}),
    (
        "ties-gradient-and-filters",
        "ties",
        [
            {
                "weight": [0.2, 0.8, 0.4],
                "density": [{"filter": "mlp", "value": 0.3}, {"value": 0.8}],
            },
            {"weight": [{"filter": "self_attn", "value": [1.0, 0.0]}, {"value": 0.5}]},
        ],
        {"parameters": {"density": 0.5, "lambda": 1.3}},
    ),
    ("breadcrumbs-two", "breadcrumbs", [{**TWO[0], "gamma": 0.05}, TWO[1]], {}),
    (
        "breadcrumbs_ties-three",
        "breadcrumbs_ties",
        [{**TWO[0], "gamma": 0.1}, TWO[1], THREE[2]],
        {"parameters": {"normalize": True}},
    ),
    ("slerp-gradient", "slerp", [{}], {"parameters": {"t": [0.0, 0.3, 0.9]}}),
]


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize(("case", "method", "per_model", "top"), CASES, ids=[c[0] for c in CASES])
def test_mergekit_config_matches_mergekit(
    untied: list[Path],
    tmp_path: Path,
    dtype: str,
    case: str,
    method: str,
    per_model: list[dict],
    top: dict,
) -> None:
    paths = untied
    config = models_config(paths, method, per_model, dtype=dtype, **top)
    if method == "slerp":
        config["models"] = [{"model": str(paths[0])}, {"model": str(paths[1])}]
    ours, theirs = both(config, tmp_path)
    ties_at = None
    if dtype == "bfloat16" and method in ("ties", "breadcrumbs", "breadcrumbs_ties"):
        ties_at = threshold_ties(config, tmp_path / "config.yml")
    assert_same(ours, theirs, ties_at=ties_at)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["task_arithmetic", "ties"])
def test_tied_embeddings_match_mergekit(tied: list[Path], tmp_path: Path, method: str) -> None:
    ours, theirs = both(models_config(tied, method, TWO), tmp_path)
    assert "lm_head.weight" not in ours
    assert_same(ours, theirs)


@pytest.mark.slow
def test_slices_with_aligned_layers_match_mergekit(untied: list[Path], tmp_path: Path) -> None:
    base, first, second = untied[:3]

    def sources(weight_first: float) -> list[dict[str, Any]]:
        return [
            {"model": str(base)},
            {"model": str(first), "parameters": {"weight": weight_first, "density": 0.5}},
            {"model": str(second), "parameters": {"weight": [0.1, 0.6]}},
        ]

    config = {
        "merge_method": "ties",
        "base_model": str(base),
        "dtype": "float32",
        "parameters": {"density": 0.7},
        "slices": [
            {"sources": [{**s, "layer_range": [0, 2]} for s in sources(0.9)]},
            {
                "sources": [{**s, "layer_range": [2, 4]} for s in sources(0.2)],
                "parameters": {"normalize": False},
            },
        ],
    }
    ours, theirs = both(config, tmp_path)
    assert_same(ours, theirs)


def test_output_folder_is_a_loadable_hf_model(untied: list[Path], tmp_path: Path) -> None:
    import transformers

    config_path = tmp_path / "r.yml"
    config = models_config(untied, "task_arithmetic", [{"weight": 0.5}], dtype="bfloat16")
    config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
    run_mergekit_config(config_path, tmp_path / "out", max_shard_bytes=100_000)
    out = tmp_path / "out"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == NUM_LAYERS
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"tokenizer": {"source": "union", "tokens": 3}}, "tokenizer.tokens: expected a mapping"),
        ({"merge_method": "rem"}, "unknown merge method 'rem'"),
        ({"parameters": {"rescale_norm": True}}, "parameters.rescale_norm"),
        ({"dtype": "int8"}, "dtype 'int8'"),
        ({"modules": {"default": {"models": []}}}, "exactly one of models, slices and modules"),
    ],
)
def test_unsupported_mergekit_config_keys_are_user_errors(
    untied: list[Path], tmp_path: Path, change: dict, message: str
) -> None:
    config = {**models_config(untied, "ties", TWO), **change}
    config_path = tmp_path / "r.yml"
    config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        run_mergekit_config(config_path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_per_model_parameter_of_another_method_is_ignored_with_a_warning(
    untied: list[Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = models_config(untied, "task_arithmetic", [{"weight": 1.0, "gamma": 0.1}])
    config_path = tmp_path / "r.yml"
    config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
    run_mergekit_config(
        config_path, tmp_path / "ok"
    )  # gamma is breadcrumbs' (mergekit ignores it here)
    assert "models[0].parameters.gamma: task_arithmetic has no per-model parameter" in caplog.text


def test_unknown_per_model_parameter_is_a_user_error(untied: list[Path], tmp_path: Path) -> None:
    config = models_config(untied, "task_arithmetic", [{"weight": 1.0, "densty": 0.5}])
    config_path = tmp_path / "r.yml"
    config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
    with pytest.raises(UserError, match=r"models\[0\]\.parameters\.densty"):
        run_mergekit_config(config_path, tmp_path / "bad")
