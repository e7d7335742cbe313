"""`mergeopt merge` against mergekit on the configurations issue #15 found silently different or
crashing: scientific-notation gradients, layer stacks other than ``model.layers`` (Falcon,
GPT-2, GPT-NeoX, LLaVA's two towers; Mistral and Granite beside them), heads planned from the
last slice, mixed input dtypes, the one-line refusals (DELLA's epsilon, LoRA references, bad
values), and the methods added since (passthrough, model_stock, nuslerp, multislerp, karcher,
nearswap, sce)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import save_file

from mergeopt.errors import UserError
from mergeopt.merge.mergekit_config import run_mergekit_config
from tests.test_merge_oracle import assert_same, both, make_tiny_qwen2_family, read_folder


def make_family(
    folder: Path,
    model: Any,
    *,
    num_experts: int = 2,
    seed: int = 0,
    extra: dict[str, torch.Tensor] | None = None,
    rename: dict[str, str] | None = None,
) -> list[Path]:
    """``model`` (random weights, plus ``extra`` tensors) as a base, and experts = base + small
    noise, saved as safetensors folders with its config (tensors named by ``rename`` where
    given); a tied head is left out, as transformers saves it."""
    state = {
        (rename or {}).get(k, k): v.detach().clone().contiguous()
        for k, v in model.state_dict().items()
    }
    state.update(extra or {})
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    generator = torch.Generator().manual_seed(seed + 1)
    paths = []
    for index in range(num_experts + 1):
        path = folder / ("base" if index == 0 else f"expert{index}")
        path.mkdir(parents=True)
        tensors = {
            name: tensor
            if index == 0
            else tensor + 0.02 * torch.randn(tensor.shape, generator=generator)
            for name, tensor in state.items()
        }
        save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
        model.config.save_pretrained(path)
        paths.append(path)
    return paths


def falcon(folder: Path) -> list[Path]:
    import transformers

    config = transformers.FalconConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_kv_heads=2,
        new_decoder_architecture=True,
        tie_word_embeddings=False,
        architectures=["FalconForCausalLM"],
    )
    torch.manual_seed(0)
    return make_family(folder, transformers.FalconForCausalLM(config))


def gpt2(folder: Path) -> list[Path]:
    import transformers

    config = transformers.GPT2Config(
        vocab_size=64, n_embd=32, n_layer=3, n_head=4, n_positions=32,
        architectures=["GPT2LMHeadModel"],
    )  # fmt: skip
    torch.manual_seed(1)
    return make_family(folder, transformers.GPT2LMHeadModel(config))


def gpt_neox(folder: Path) -> list[Path]:
    import transformers

    config = transformers.GPTNeoXConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
        intermediate_size=64, tie_word_embeddings=False, architectures=["GPTNeoXForCausalLM"],
    )  # fmt: skip
    torch.manual_seed(2)
    buffers = {}  # older GPT-NeoX checkpoints store these, and mergekit's description asks
    for layer in range(4):
        prefix = f"gpt_neox.layers.{layer}.attention"
        buffers[f"{prefix}.bias"] = torch.ones(1, 1, 8, 8).tril()
        buffers[f"{prefix}.masked_bias"] = torch.tensor(-1e9)
        buffers[f"{prefix}.rotary_emb.inv_freq"] = torch.linspace(1, 0.01, 4)
    model = transformers.GPTNeoXForCausalLM(config)  # transformers 5 calls the head lm_head
    return make_family(folder, model, extra=buffers, rename={"lm_head.weight": "embed_out.weight"})


def llama(folder: Path, *, seed: int = 4, **dims: int) -> list[Path]:
    """A tiny Llama family (``dims``: other sizes than these)."""
    import transformers

    sizes = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 4}
    config = transformers.LlamaConfig(
        **{**sizes, **dims}, num_attention_heads=4, num_key_value_heads=2,
        tie_word_embeddings=False, architectures=["LlamaForCausalLM"],
    )  # fmt: skip
    torch.manual_seed(seed)
    return make_family(folder, transformers.LlamaForCausalLM(config))


def slerp_config(paths: list[Path], t: Any) -> dict[str, Any]:
    return {
        "merge_method": "slerp",
        "base_model": str(paths[0]),
        "dtype": "float32",
        "models": [{"model": str(paths[0])}, {"model": str(paths[1])}],
        "parameters": {"t": t},
    }


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return make_tiny_qwen2_family(tmp_path_factory.mktemp("qwen2"), tied=False, num_experts=2)


def test_scientific_notation_gradient_interpolates_as_mergekit(
    qwen2: list[Path], tmp_path: Path
) -> None:
    base, first, second = qwen2
    config = {
        "merge_method": "ties",
        "base_model": str(base),
        "dtype": "float32",
        "models": [
            {"model": str(first), "parameters": {"weight": ["1e-1", 0.9], "density": "5e-1"}},
            {"model": str(second), "parameters": {"weight": 0.5, "density": 0.7}},
        ],
    }
    ours, theirs = both(config, tmp_path)
    assert_same(ours, theirs)


@pytest.mark.parametrize("value", ["abc", ["1e-1", "x"], [{"filter": "mlp", "value": "abc"}]])
def test_a_weight_that_is_not_a_number_is_one_line(
    qwen2: list[Path], tmp_path: Path, value: Any
) -> None:
    config = {
        "merge_method": "task_arithmetic",
        "base_model": str(qwen2[0]),
        "models": [{"model": str(qwen2[1]), "parameters": {"weight": value}}],
    }
    config_path = tmp_path / "r.yml"
    config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
    with pytest.raises(
        UserError, match=r"models\[0\]\.parameters\.weight: .* is not a valid value"
    ):
        run_mergekit_config(config_path, tmp_path / "out")


@pytest.mark.slow
@pytest.mark.parametrize("build", [falcon, gpt2], ids=["falcon", "gpt2"])
def test_layer_stacks_named_h_get_their_gradient(build: Any, tmp_path: Path) -> None:
    paths = build(tmp_path / "models")
    ours, theirs = both(slerp_config(paths, [0.0, 1.0]), tmp_path)
    assert_same(ours, theirs)
    base = read_folder(paths[0])
    layer_names = [n for n in theirs if ".h.2." in n or n.startswith("h.2.")]
    assert layer_names and all(not torch.equal(ours[n], base[n]) for n in layer_names)


@pytest.mark.slow
def test_gpt_neox_head_takes_the_last_slice(tmp_path: Path) -> None:
    base, first, second = gpt_neox(tmp_path / "models")

    def sources(layers: list[int], weight: float) -> list[dict[str, Any]]:
        return [
            {"model": str(base), "layer_range": layers},
            {"model": str(first), "layer_range": layers, "parameters": {"weight": weight}},
            {"model": str(second), "layer_range": layers, "parameters": {"weight": 0.3}},
        ]

    config = {
        "merge_method": "task_arithmetic",
        "base_model": str(base),
        "dtype": "float32",
        "slices": [{"sources": sources([0, 2], 0.9)}, {"sources": sources([2, 4], 0.1)}],
    }
    ours, theirs = both(config, tmp_path)
    assert_same(ours, theirs)
    assert "embed_out.weight" in theirs


@pytest.mark.slow
def test_mixed_input_dtypes_promote_per_tensor_as_mergekit(
    qwen2: list[Path], tmp_path: Path
) -> None:
    from safetensors.torch import load_file

    base = tmp_path / "bf16-base"
    base.mkdir()
    state = load_file(qwen2[0] / "model.safetensors")
    save_file({k: v.bfloat16() for k, v in state.items()}, str(base / "model.safetensors"))
    (base / "config.json").write_text((qwen2[0] / "config.json").read_text())
    config = {
        "merge_method": "task_arithmetic",
        "base_model": str(base),
        "models": [{"model": str(p), "parameters": {"weight": 0.5}} for p in qwen2[1:]],
    }
    ours, theirs = both(config, tmp_path)
    assert {t.dtype for t in theirs.values()} == {torch.float32}
    assert_same(ours, theirs)


@pytest.mark.parametrize(("density", "epsilon"), [(0.5, 0.6), (0.9, 0.15), ("2e-1", "3e-1")])
def test_della_epsilon_outside_the_unit_interval_is_refused_before_merging(
    qwen2: list[Path], tmp_path: Path, density: Any, epsilon: Any
) -> None:
    config = {
        "merge_method": "della",
        "base_model": str(qwen2[0]),
        "models": [
            {"model": str(qwen2[1]), "parameters": {"weight": 1.0, "density": density}},
        ],
        "parameters": {"epsilon": epsilon},
    }
    config_path = tmp_path / "r.yml"
    config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
    with pytest.raises(UserError, match=r"density .* ± epsilon .* must stay inside \(0, 1\)"):
        run_mergekit_config(config_path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_slerp_given_a_per_model_weight_warns_and_merges(
    qwen2: list[Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = slerp_config(qwen2, 0.3)
    config["models"][1]["parameters"] = {"weight": 0.7}
    ours, theirs = both(config, tmp_path)
    assert "slerp has no per-model parameter 'weight'; ignored" in caplog.text
    assert_same(ours, theirs)


def llava(folder: Path) -> list[Path]:
    import transformers

    text = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
    )  # fmt: skip
    vision = transformers.CLIPVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
        image_size=16, patch_size=8, projection_dim=16,
    )  # fmt: skip
    config = transformers.LlavaConfig(
        text_config=text,
        vision_config=vision,
        image_token_index=63,
        architectures=["LlavaForConditionalGeneration"],
    )
    torch.manual_seed(3)
    return make_family(folder, transformers.LlavaForConditionalGeneration(config))


@pytest.mark.slow
def test_llava_towers_each_get_t_over_their_own_layers(tmp_path: Path) -> None:
    paths = llava(tmp_path / "models")
    ours, theirs = both(slerp_config(paths, [0.0, 1.0]), tmp_path)
    assert_same(ours, theirs)
    vision_last = [n for n in theirs if "vision_tower" in n and ".layers.2." in n]
    assert vision_last and all(torch.equal(ours[n], read_folder(paths[1])[n]) for n in vision_last)


def save_character_tokenizer(folder: Path, size: int) -> None:
    """A word-level tokenizer of ``size`` tokens (fewer than the config's embedding rows)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, **{f"t{index}": index for index in range(1, size)}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>").save_pretrained(folder)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["ties", "linear"])
def test_tokenizer_source_base_cuts_a_padded_vocabulary_as_mergekit(
    tmp_path: Path, method: str
) -> None:
    import json

    paths = make_tiny_qwen2_family(tmp_path / "models", tied=False, num_experts=2)  # 96 rows
    for path in paths:
        save_character_tokenizer(path, 80)
    per_model = {"weight": 0.6, "density": 0.5} if method == "ties" else {"weight": 0.6}
    config = {
        "merge_method": method,
        "base_model": str(paths[0]),
        "dtype": "float32",
        "tokenizer_source": "base",
        "models": [
            {"model": str(p), "parameters": per_model}
            for p in (paths if method == "linear" else paths[1:])
        ],
    }
    ours, theirs = both(config, tmp_path)
    rows = theirs["model.embed_tokens.weight"].shape[0]  # 80, or 81 where transformers adds
    assert rows < 96  # Qwen2's <|endoftext|> to the tokenizer loaded from a Qwen2 folder
    assert ours["model.embed_tokens.weight"].shape == ours["lm_head.weight"].shape == (rows, 128)
    assert_same(ours, theirs)
    written = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert written["vocab_size"] == rows


def test_a_tokenizer_source_that_is_no_model_folder_is_one_line(
    qwen2: list[Path], tmp_path: Path
) -> None:
    config = {
        "merge_method": "task_arithmetic",
        "base_model": str(qwen2[0]),
        "tokenizer_source": "some/model",
        "models": [{"model": str(qwen2[1]), "parameters": {"weight": 1.0}}],
    }
    config_path = tmp_path / "r.yml"
    config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
    with pytest.raises(UserError, match="tokenizer source: model folder some/model not found"):
        run_mergekit_config(config_path, tmp_path / "out")


@pytest.mark.slow
def test_passthrough_frankenmerge_stacks_reorders_and_scales_as_mergekit(tmp_path: Path) -> None:
    import json

    _, first, second = (str(p) for p in llama(tmp_path / "models"))
    config = {
        "merge_method": "passthrough",
        "dtype": "float32",
        "slices": [
            {"sources": [{"model": first, "layer_range": [0, 2]}]},
            {"sources": [{"model": second, "layer_range": [1, 4]}]},
            {
                "sources": [{"model": first, "layer_range": [3, 4]}],
                "parameters": {"scale": [{"filter": "o_proj", "value": 0.5}, {"value": 1.0}]},
            },
            {"sources": [{"model": second, "layer_range": [0, 1]}]},
        ],
    }
    ours, theirs = both(config, tmp_path)
    assert_same(ours, theirs)
    assert set(ours) == set(theirs)
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["num_hidden_layers"] == 7


@pytest.mark.slow
def test_passthrough_of_one_model_with_a_scale_as_mergekit(
    qwen2: list[Path], tmp_path: Path
) -> None:
    config = {
        "merge_method": "passthrough",
        "dtype": "bfloat16",
        "models": [{"model": str(qwen2[1]), "parameters": {"scale": [0.5, 2.0]}}],
    }
    ours, theirs = both(config, tmp_path)
    assert_same(ours, theirs)


@pytest.mark.slow
def test_a_merge_over_slices_that_reorder_layers_as_mergekit(tmp_path: Path) -> None:
    base, first, second = (str(p) for p in llama(tmp_path / "models"))

    def sources(layers: list[int]) -> list[dict[str, Any]]:
        return [
            {"model": base, "layer_range": layers},
            {"model": first, "layer_range": layers, "parameters": {"weight": [0.2, 0.9]}},
            {"model": second, "layer_range": layers, "parameters": {"weight": 0.4}},
        ]

    config = {
        "merge_method": "ties",
        "base_model": base,
        "dtype": "float32",
        "parameters": {"density": 0.6},
        "slices": [{"sources": sources([2, 4])}, {"sources": sources([0, 3])}],
    }
    ours, theirs = both(config, tmp_path)
    assert_same(ours, theirs)
    assert set(ours) == set(theirs)


def test_a_frankenmerge_config_keeps_per_layer_lists_in_step(
    qwen2: list[Path], tmp_path: Path
) -> None:
    import transformers

    config = {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": str(qwen2[1]), "layer_range": [0, 3]}]},
            {"sources": [{"model": str(qwen2[2]), "layer_range": [1, 4]}]},
        ],
    }
    config_path = tmp_path / "r.yml"
    config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
    run_mergekit_config(config_path, tmp_path / "out")
    loaded = transformers.AutoConfig.from_pretrained(tmp_path / "out")
    assert loaded.num_hidden_layers == 6 and len(loaded.layer_types) == 6
    assert len({n for n in read_folder(tmp_path / "out") if ".layers.5." in n}) > 0


@pytest.mark.slow
@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock_matches_mergekit(qwen2: list[Path], tmp_path: Path, filter_wise: bool) -> None:
    config = {
        "merge_method": "model_stock",
        "base_model": str(qwen2[0]),
        "dtype": "float32",
        "models": [{"model": str(p)} for p in qwen2[1:]],
        "parameters": {"filter_wise": filter_wise},
    }
    ours, theirs = both(config, tmp_path)
    assert_same(ours, theirs)


def base_and_two_weighted_models(method: str, paths: list[Path], options: dict) -> dict:
    """``method`` over ``paths[0]`` as the base and two models, one weight a gradient."""
    return {
        "merge_method": method,
        "base_model": str(paths[0]),
        "dtype": "float32",
        "models": [
            {"model": str(paths[1]), "parameters": {"weight": [0.2, 0.8]}},
            {"model": str(paths[2]), "parameters": {"weight": 0.5}},
        ],
        "parameters": options,
    }


@pytest.mark.slow
@pytest.mark.parametrize(
    "options",
    [{}, {"nuslerp_flatten": False}, {"nuslerp_flatten": False, "nuslerp_row_wise": True}],
)
def test_nuslerp_matches_mergekit(qwen2: list[Path], tmp_path: Path, options: dict) -> None:
    ours, theirs = both(base_and_two_weighted_models("nuslerp", qwen2, options), tmp_path)
    assert_same(ours, theirs)


def mistral(folder: Path) -> list[Path]:
    import transformers

    config = transformers.MistralConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
        architectures=["MistralForCausalLM"],
    )  # fmt: skip
    torch.manual_seed(5)
    return make_family(folder, transformers.MistralForCausalLM(config))


def granite(folder: Path) -> list[Path]:
    import transformers

    config = transformers.GraniteConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
        architectures=["GraniteForCausalLM"],
    )  # fmt: skip
    torch.manual_seed(6)
    return make_family(folder, transformers.GraniteForCausalLM(config))


def ties_gradient_config(paths: list[Path]) -> dict[str, Any]:
    return {
        "merge_method": "ties",
        "base_model": str(paths[0]),
        "dtype": "float32",
        "parameters": {"density": [0.3, 0.9]},
        "models": [
            {"model": str(paths[1]), "parameters": {"weight": [0.1, 0.5, 0.9]}},
            {"model": str(paths[2]), "parameters": {"weight": 0.4, "density": 0.6}},
        ],
    }


@pytest.mark.slow
@pytest.mark.parametrize("build", [mistral, granite], ids=["mistral", "granite"])
@pytest.mark.parametrize("make_config", ["ties", "slerp"])
def test_mistral_and_granite_merge_with_gradients_as_mergekit(
    build: Any, make_config: str, tmp_path: Path
) -> None:
    paths = build(tmp_path / "models")
    if make_config == "ties":
        config = ties_gradient_config(paths)
    else:
        config = slerp_config(paths, [0.0, 0.3, 1.0])
        config["parameters"]["t"] = [{"filter": "self_attn", "value": [0.0, 1.0]}, {"value": 0.6}]
    ours, theirs = both(config, tmp_path)
    assert_same(ours, theirs)
    assert set(ours) == set(theirs)


@pytest.mark.slow
@pytest.mark.parametrize(
    "options", [{}, {"normalize_weights": False}, {"eps": 1e-6}], ids=["defaults", "raw", "eps"]
)
def test_multislerp_matches_mergekit(qwen2: list[Path], tmp_path: Path, options: dict) -> None:
    ours, theirs = both(base_and_two_weighted_models("multislerp", qwen2, options), tmp_path)
    assert_same(ours, theirs)


@pytest.mark.slow
@pytest.mark.parametrize("options", [{}, {"max_iter": 3, "tol": 1e-3}], ids=["defaults", "set"])
def test_karcher_matches_mergekit(qwen2: list[Path], tmp_path: Path, options: dict) -> None:
    config = {
        "merge_method": "karcher",
        "base_model": str(qwen2[0]),
        "dtype": "float32",
        "models": [{"model": str(p)} for p in qwen2],
        "parameters": options,
    }
    ours, theirs = both(config, tmp_path)
    assert_same(ours, theirs)


@pytest.mark.slow
def test_multislerp_without_a_base_model_merges_the_models_as_mergekit(
    qwen2: list[Path], tmp_path: Path
) -> None:
    config = {
        "merge_method": "multislerp",
        "dtype": "float32",
        "models": [
            {"model": str(qwen2[0]), "parameters": {"weight": 1.0}},
            {"model": str(qwen2[1]), "parameters": {"weight": [0.5, 2.0]}},
            {"model": str(qwen2[2]), "parameters": {"weight": 0.7}},
        ],
    }
    ours, theirs = both(config, tmp_path)
    assert_same(ours, theirs)


@pytest.mark.slow
@pytest.mark.parametrize(
    "t", [0.01, [0.0, 0.05], [{"filter": "mlp", "value": 1.0}, {"value": 0.02}]]
)
def test_nearswap_matches_mergekit(qwen2: list[Path], tmp_path: Path, t: Any) -> None:
    config = {
        "merge_method": "nearswap",
        "base_model": str(qwen2[0]),
        "dtype": "float32",
        "models": [{"model": str(qwen2[0])}, {"model": str(qwen2[1])}],
        "parameters": {"t": t},
    }
    ours, theirs = both(config, tmp_path)
    assert_same(ours, theirs)
    base = read_folder(qwen2[0])
    assert any(not torch.equal(ours[name], base[name]) for name in theirs)


def test_nearswap_without_t_is_one_line(qwen2: list[Path], tmp_path: Path) -> None:
    config = {
        "merge_method": "nearswap",
        "base_model": str(qwen2[0]),
        "models": [{"model": str(qwen2[1])}],
    }
    config_path = tmp_path / "r.yml"
    config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
    with pytest.raises(UserError, match="'t' is required by nearswap"):
        run_mergekit_config(config_path, tmp_path / "out")


@pytest.mark.slow
@pytest.mark.parametrize("select_topk", [1.0, 0.4, 0.0])
def test_sce_matches_mergekit(qwen2: list[Path], tmp_path: Path, select_topk: float) -> None:
    config = {
        "merge_method": "sce",
        "base_model": str(qwen2[0]),
        "dtype": "float32",
        "models": [{"model": str(p)} for p in qwen2],
        "parameters": {"select_topk": select_topk},
    }
    ours, theirs = both(config, tmp_path)
    assert_same(ours, theirs)


def grid_llama(folder: Path) -> list[Path]:
    """A tiny Llama (embeddings and head of 134,400 elements: past the small-tensor sort) whose
    weights lie on a grid of 2^-6 and whose experts add 0 to ±4 steps: fp32 task vectors are
    exact and take 5 magnitudes, so every magnitude threshold splits a group of ties."""
    paths = llama(
        folder, seed=6, vocab_size=2100, hidden_size=64, intermediate_size=128, num_hidden_layers=2
    )
    base = {name: (t * 64).round() / 64 for name, t in read_folder(paths[0]).items()}
    generator = torch.Generator().manual_seed(7)
    for index, path in enumerate(paths):
        tensors = {
            name: t if index == 0 else t + torch.randint(-4, 5, t.shape, generator=generator) / 64
            for name, t in base.items()
        }
        save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    return paths


@pytest.mark.slow
@pytest.mark.parametrize("method", ["ties", "breadcrumbs", "breadcrumbs_ties"])
def test_fp32_magnitude_ties_at_the_thresholds_merge_bit_identical_to_mergekit(
    method: str, tmp_path: Path
) -> None:
    paths = grid_llama(tmp_path / "models")
    delta = (
        read_folder(paths[1])["model.embed_tokens.weight"]
        - read_folder(paths[0])["model.embed_tokens.weight"]
    )
    assert delta.abs().unique().numel() == 5  # every threshold falls inside a group of ties
    config = {
        "merge_method": method,
        "base_model": str(paths[0]),
        "dtype": "float32",
        "models": [
            {"model": str(paths[1]), "parameters": {"weight": 0.6, "density": 0.3}},
            {"model": str(paths[2]), "parameters": {"weight": 0.4, "density": 0.55}},
        ],
    }
    if method != "ties":
        config["parameters"] = {"gamma": 0.05}
    ours, theirs = both(config, tmp_path)
    assert_same(ours, theirs)
    assert set(ours) == set(theirs)
