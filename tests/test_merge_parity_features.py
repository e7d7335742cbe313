"""`mergeopt merge` against mergekit on the config features added last: a slice's own
``base_model``, ``residual_weight`` (read and ignored by mergekit 0.1.5), tokenizers (``union``,
a model, the ``tokenizer:`` block with its ``tokens`` and ``pad_to_multiple_of``),
``chat_template``, the methods ``arcee_fusion``, ``ram`` and ``ramplus_tl``, and LoRA references
(``model+adapter``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from mergeopt.errors import UserError
from mergeopt.merge.mergekit_config import run_mergekit_config
from tests.test_merge_oracle import assert_same, both
from tests.test_merge_parity import llama


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """A tiny Llama base and two experts (4 layers, hidden 32)."""
    return llama(tmp_path_factory.mktemp("llama"))


def write_config(config: dict[str, Any], folder: Path) -> Path:
    path = folder / "config.yml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def test_a_slice_with_its_own_base_model_merges_as_mergekit(
    family: list[Path], tmp_path: Path
) -> None:
    base, first, second = (str(p) for p in family)

    def sources(layers: list[int]) -> list[dict[str, Any]]:
        return [
            {"model": base, "layer_range": layers, "parameters": {"weight": 0.3}},
            {"model": first, "layer_range": layers, "parameters": {"weight": 0.6}},
            {"model": second, "layer_range": layers, "parameters": {"weight": 0.4}},
        ]

    config = {
        "merge_method": "ties",
        "base_model": base,
        "dtype": "float32",
        "parameters": {"density": 0.5},
        "slices": [
            {"sources": sources([0, 2]), "base_model": first},  # embeddings: first is the base
            {"sources": sources([2, 4])},
        ],
    }
    ours, theirs = both(config, tmp_path)
    assert_same(ours, theirs)
    assert set(ours) == set(theirs)


def test_residual_weight_is_ignored_with_a_warning_as_mergekit_ignores_it(
    family: list[Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    base, first, _ = (str(p) for p in family)
    layers = [0, 4]
    config = {
        "merge_method": "task_arithmetic",
        "base_model": base,
        "dtype": "float32",
        "slices": [
            {
                "sources": [
                    {"model": base, "layer_range": layers},
                    {"model": first, "layer_range": layers, "parameters": {"weight": 0.7}},
                ],
                "residual_weight": 0.25,
            }
        ],
    }
    ours, theirs = both(config, tmp_path)
    assert "slices[0].residual_weight is ignored, as mergekit does" in caplog.text
    assert_same(ours, theirs)


def test_a_slice_base_model_outside_its_sources_is_one_line(
    family: list[Path], tmp_path: Path
) -> None:
    base, first, second = (str(p) for p in family)
    config = {
        "merge_method": "ties",
        "slices": [
            {
                "sources": [
                    {"model": base, "layer_range": [0, 4]},
                    {"model": first, "layer_range": [0, 4], "parameters": {"weight": 1.0}},
                ],
                "base_model": second,
            }
        ],
    }
    with pytest.raises(UserError, match=r"slices\[0\]: base_model .* is not among the sources"):
        run_mergekit_config(write_config(config, tmp_path), tmp_path / "out")


def save_word_tokenizer(folder: Path, words: list[str]) -> None:
    """A word-level tokenizer whose token ids are the positions of ``words``."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(
        models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>")
    )
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>").save_pretrained(folder)


@pytest.fixture(scope="module")
def tokenized(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """The Llama family (64 embedding rows) with tokenizers that differ: the base has 50
    tokens; the first expert has them reordered, without w7, plus x0..x4; the second lacks w3
    and w7 and adds y0..y2."""
    paths = llama(tmp_path_factory.mktemp("tokenized"))
    words = ["<unk>", *(f"w{i}" for i in range(1, 50))]
    save_word_tokenizer(paths[0], words)
    first = [w for w in words if w != "w7"]
    first[5:15] = reversed(first[5:15])
    save_word_tokenizer(paths[1], [*first, *(f"x{i}" for i in range(5))])
    save_word_tokenizer(paths[2], [*(w for w in words if w not in ("w3", "w7")), "y0", "y1", "y2"])
    return paths


VOCABULARY_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")


def assert_same_by_token(ours_dir: Path, theirs_dir: Path) -> None:
    """Both outputs hold the same tokens and, for each token, bit-identical embedding and
    head rows (mergekit orders a union's new tokens by its models' set order, which varies
    from run to run); every other tensor and the vocabulary size are identical."""
    import json

    from transformers import AutoTokenizer

    from tests.test_merge_oracle import read_folder

    ours, theirs = read_folder(ours_dir), read_folder(theirs_dir)
    our_vocab = AutoTokenizer.from_pretrained(ours_dir).get_vocab()
    their_vocab = AutoTokenizer.from_pretrained(theirs_dir).get_vocab()
    assert set(our_vocab) == set(their_vocab)
    for name in VOCABULARY_TENSORS:
        assert ours[name].shape == theirs[name].shape, name
        for token, row in their_vocab.items():
            assert torch.equal(ours[name][our_vocab[token]], theirs[name][row]), (name, token)
        padding = range(len(their_vocab), theirs[name].shape[0])
        assert all(torch.equal(ours[name][i], theirs[name][i]) for i in padding), name
    assert_same(
        {k: v for k, v in ours.items() if k not in VOCABULARY_TENSORS},
        {k: v for k, v in theirs.items() if k not in VOCABULARY_TENSORS},
    )
    read = [json.loads((d / "config.json").read_text()) for d in (ours_dir, theirs_dir)]
    assert read[0]["vocab_size"] == read[1]["vocab_size"]


def merge_both(config: dict[str, Any], tmp_path: Path, *, copy_tokenizer: bool = False) -> None:
    """``config`` merged by mergeopt into tmp_path/ours and by mergekit into tmp_path/theirs."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    run_mergekit_config(write_config(config, tmp_path), tmp_path / "ours")
    options = MergeOptions(quiet=True, copy_tokenizer=copy_tokenizer, write_model_card=False)
    run_merge(MergeConfiguration.model_validate(config), str(tmp_path / "theirs"), options)


def weighted_config(method: str, paths: list[Path], **extra: Any) -> dict[str, Any]:
    """``method`` over ``paths[0]`` as the base and the rest (linear: all of them) weighted,
    in fp32, with the ``extra`` top-level keys."""
    models = paths if method == "linear" else paths[1:]
    weights = [0.5, 0.3, 0.2] if method == "linear" else [0.6, 0.4]
    return {
        "merge_method": method,
        "base_model": str(paths[0]),
        "dtype": "float32",
        "models": [
            {
                "model": str(p),
                "parameters": {"weight": w, "density": 0.7} if method == "ties" else {"weight": w},
            }
            for p, w in zip(models, weights, strict=True)
        ],
        **extra,
    }


@pytest.mark.slow
@pytest.mark.parametrize(
    ("source", "method"), [("union", "ties"), ("union", "linear"), ("base", "ties")]
)
def test_models_with_different_tokenizers_merge_every_token_as_mergekit(
    tokenized: list[Path], tmp_path: Path, source: str, method: str
) -> None:
    merge_both(weighted_config(method, tokenized, tokenizer_source=source), tmp_path)
    assert_same_by_token(tmp_path / "ours", tmp_path / "theirs")


@pytest.mark.slow
def test_a_model_as_tokenizer_source_as_mergekit(tokenized: list[Path], tmp_path: Path) -> None:
    config = weighted_config("task_arithmetic", tokenized, tokenizer_source=str(tokenized[2]))
    merge_both(config, tmp_path)
    assert_same_by_token(tmp_path / "ours", tmp_path / "theirs")


@pytest.mark.slow
def test_the_tokenizer_block_adds_tokens_forces_rows_and_pads_as_mergekit(
    tokenized: list[Path], tmp_path: Path
) -> None:
    first, second = (str(p) for p in tokenized[1:])
    block = {
        "source": "base",
        "pad_to_multiple_of": 16,
        "tokens": {
            "new": {"source": {"kind": "zero"}},
            "w5": {"source": second, "force": True},
            "x1": {"source": {"kind": "model_token", "model": first, "token": "x3"}},
            "w9": {
                "source": {"kind": "model_token", "model": second, "token_id": 2},
                "force": True,
            },
        },
    }
    # task_arithmetic: the padding rows are equal, so a top-k would meet ties at its threshold
    merge_both(weighted_config("task_arithmetic", tokenized, tokenizer=block), tmp_path)
    assert_same_by_token(tmp_path / "ours", tmp_path / "theirs")
    from tests.test_merge_oracle import read_folder

    assert read_folder(tmp_path / "ours")["model.embed_tokens.weight"].shape[0] == 64


TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"


def test_a_slice_naming_one_model_twice_merges_with_a_built_tokenizer(
    tokenized: list[Path], tmp_path: Path
) -> None:
    """Two layer ranges of one model in a slice (mergekit refuses: "Duplicate merge inputs"):
    the union of its tokenizer with itself leaves every token's row as without a tokenizer."""
    from transformers import AutoTokenizer

    from tests.test_merge_oracle import read_folder

    model = str(tokenized[0])
    config: dict[str, Any] = {
        "merge_method": "linear",
        "dtype": "float32",
        "slices": [
            {
                "sources": [
                    {"model": model, "layer_range": [0, 2], "parameters": {"weight": 0.5}},
                    {"model": model, "layer_range": [2, 4], "parameters": {"weight": 0.5}},
                ]
            }
        ],
    }
    run_mergekit_config(write_config(config, tmp_path), tmp_path / "plain")
    config["tokenizer_source"] = "union"
    run_mergekit_config(write_config(config, tmp_path), tmp_path / "union")

    plain, union = read_folder(tmp_path / "plain"), read_folder(tmp_path / "union")
    assert union.keys() == plain.keys()
    for name in plain.keys() - set(VOCABULARY_TENSORS):
        assert torch.equal(union[name], plain[name]), name
    vocab = AutoTokenizer.from_pretrained(tmp_path / "union").get_vocab()
    original = AutoTokenizer.from_pretrained(tokenized[0]).get_vocab()
    assert vocab.keys() == original.keys()
    for name in VOCABULARY_TENSORS:
        for token, token_id in vocab.items():
            assert torch.equal(union[name][token_id], plain[name][original[token]]), token


def written_tokenizers(tmp_path: Path) -> list[Any]:
    from transformers import AutoTokenizer

    return [AutoTokenizer.from_pretrained(tmp_path / side) for side in ("ours", "theirs")]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("template", "source"), [(TEMPLATE, "base"), ("chatml", None)], ids=["text", "named"]
)
def test_the_chat_template_is_written_into_the_tokenizer_as_mergekit(
    tokenized: list[Path], tmp_path: Path, template: str, source: str | None
) -> None:
    config = weighted_config("task_arithmetic", tokenized, chat_template=template)
    if source is not None:
        config["tokenizer_source"] = source
    merge_both(config, tmp_path, copy_tokenizer=True)
    ours, theirs = written_tokenizers(tmp_path)
    assert ours.chat_template == theirs.chat_template
    assert ours.chat_template and ("im_start" in ours.chat_template or "role" in ours.chat_template)
    assert ours.get_vocab() == theirs.get_vocab()


@pytest.mark.slow
def test_chat_template_auto_takes_the_most_common_template_as_mergekit(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    paths = llama(tmp_path / "models")
    for path, template in zip(paths, [TEMPLATE, "{{ 'other' }}", TEMPLATE], strict=True):
        save_word_tokenizer(path, ["<unk>", "a", "b"])
        tokenizer = AutoTokenizer.from_pretrained(path)
        tokenizer.chat_template = template
        tokenizer.save_pretrained(path)
    merge_both(
        weighted_config("task_arithmetic", paths, chat_template="auto"),
        tmp_path,
        copy_tokenizer=True,
    )
    ours, theirs = written_tokenizers(tmp_path)
    assert ours.chat_template == theirs.chat_template == TEMPLATE


def test_a_chat_template_that_is_no_template_is_one_line(
    family: list[Path], tmp_path: Path
) -> None:
    config = weighted_config("task_arithmetic", family, chat_template="{short}")
    with pytest.raises(UserError, match="chat_template '{short}' is not a template"):
        run_mergekit_config(write_config(config, tmp_path), tmp_path / "out")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("method", "options"),
    [
        ("ram", {}),
        ("ram", {"epsilon": 0.02}),  # about half the changes count: unique and shared ones
        ("ramplus_tl", {}),
        ("ramplus_tl", {"r": 0.5, "alpha": 0.8, "epsilon": "2e-2"}),
    ],
)
def test_ram_methods_match_mergekit(
    family: list[Path], tmp_path: Path, method: str, options: dict
) -> None:
    config = {
        "merge_method": method,
        "base_model": str(family[0]),
        "dtype": "float32",
        "models": [{"model": str(p)} for p in family[1:]],
        "parameters": options,
    }
    ours, theirs = both(config, tmp_path)
    assert_same(ours, theirs)


@pytest.mark.slow
def test_arcee_fusion_matches_mergekit(family: list[Path], tmp_path: Path) -> None:
    config = {
        "merge_method": "arcee_fusion",
        "base_model": str(family[0]),
        "dtype": "float32",
        "models": [{"model": str(family[1])}],
    }
    ours, theirs = both(config, tmp_path)
    assert_same(ours, theirs)
    from tests.test_merge_oracle import read_folder

    base, expert = read_folder(family[0]), read_folder(family[1])
    name = "model.layers.1.mlp.up_proj.weight"  # some changes kept, some not
    assert not torch.equal(ours[name], base[name]) and not torch.equal(ours[name], expert[name])


def save_lora_adapter(model: Path, folder: Path) -> None:
    """A random rank-4 LoRA adapter (non-zero B, so that it changes the model) on the
    attention projections of ``model``."""
    import peft
    import transformers

    torch.manual_seed(7)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(model)
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    peft.get_peft_model(loaded, config).save_pretrained(folder)


@pytest.mark.slow
def test_a_lora_reference_merges_its_adapter_first_as_mergekit(
    family: list[Path], tmp_path: Path
) -> None:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    from tests.test_merge_oracle import read_folder

    adapter = tmp_path / "adapter"
    save_lora_adapter(family[1], adapter)
    config = weighted_config("ties", [family[0], family[1], family[2]])
    config["models"][0]["model"] = f"{family[1]}+{adapter}"
    run_mergekit_config(write_config(config, tmp_path), tmp_path / "ours")
    options = MergeOptions(
        quiet=True,
        copy_tokenizer=False,
        write_model_card=False,
        lora_merge_cache=str(tmp_path / "cache"),
    )
    run_merge(MergeConfiguration.model_validate(config), str(tmp_path / "theirs"), options)
    ours, theirs = read_folder(tmp_path / "ours"), read_folder(tmp_path / "theirs")
    assert_same(ours, theirs)
    without = tmp_path / "without"
    config["models"][0]["model"] = str(family[1])
    run_mergekit_config(write_config(config, tmp_path), without)
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(ours[name], read_folder(without)[name])  # the adapter counted
    assert not [p for p in tmp_path.iterdir() if ".adapters-" in p.name]  # removed after


@pytest.mark.slow
def test_a_lora_reference_keeps_its_model_tokenizer_as_mergekit(
    tokenized: list[Path], tmp_path: Path
) -> None:
    """A union of tokenizers takes the LoRA reference's tokens from its model's tokenizer."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions
    from transformers import AutoTokenizer

    adapter = tmp_path / "adapter"
    save_lora_adapter(tokenized[1], adapter)
    config = weighted_config("task_arithmetic", tokenized, tokenizer_source="union")
    config["models"][0]["model"] = f"{tokenized[1]}+{adapter}"
    run_mergekit_config(write_config(config, tmp_path), tmp_path / "ours")
    options = MergeOptions(
        quiet=True, write_model_card=False, lora_merge_cache=str(tmp_path / "cache")
    )
    run_merge(MergeConfiguration.model_validate(config), str(tmp_path / "theirs"), options)
    assert_same_by_token(tmp_path / "ours", tmp_path / "theirs")
    assert "x3" in AutoTokenizer.from_pretrained(tmp_path / "ours").get_vocab()


def test_a_lora_reference_whose_adapter_is_missing_is_one_line(
    family: list[Path], tmp_path: Path
) -> None:
    config = weighted_config("task_arithmetic", family)
    config["models"][0]["model"] = f"{family[1]}+{tmp_path / 'no-adapter'}"
    with pytest.raises(UserError, match=r"models\[0\]\.model: folder .*no-adapter not found"):
        run_mergekit_config(write_config(config, tmp_path), tmp_path / "out")


def test_a_lora_adapter_of_another_width_is_one_line(family: list[Path], tmp_path: Path) -> None:
    import transformers

    wider = transformers.LlamaConfig(
        vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, architectures=["LlamaForCausalLM"],
    )  # fmt: skip
    transformers.LlamaForCausalLM(wider).save_pretrained(tmp_path / "wider")
    adapter = tmp_path / "adapter"
    save_lora_adapter(tmp_path / "wider", adapter)
    config = weighted_config("task_arithmetic", family)
    config["models"][0]["model"] = f"{family[1]}+{adapter}"
    with pytest.raises(
        UserError, match=r"models\[0\]\.model: adapter .*adapter does not apply to model .*: \S"
    ) as error:
        run_mergekit_config(write_config(config, tmp_path), tmp_path / "out")
    assert "\n" not in str(error.value)
    assert not (tmp_path / "out").exists()


def test_arcee_fusion_over_a_million_elements_samples_its_quartiles_as_mergekit() -> None:
    from mergekit.merge_methods.arcee_fusion import DynamicThresholdFusion, _compute_importance

    from mergeopt.merge.selective import arcee_fusion

    generator = torch.Generator().manual_seed(0)
    base = torch.randn(1100, 1000, generator=generator)  # 1.1 M elements: sampled quartiles
    expert = base + 0.02 * torch.randn(base.shape, generator=generator)
    torch.manual_seed(1)  # mergekit samples from the global generator
    mask, _ = DynamicThresholdFusion().compute_fusion_mask(_compute_importance(expert, base))
    kept = arcee_fusion(base, expert, torch.Generator().manual_seed(2)) != base
    theirs = mask.bool()
    assert 0.01 < theirs.float().mean() < 0.5
    assert abs(kept.float().mean() - theirs.float().mean()) < 0.002
    assert (kept == theirs).float().mean() > 0.995


def test_a_base_tokenizer_past_its_embedding_rows_is_one_line(
    family: list[Path], tmp_path: Path
) -> None:
    import shutil

    base = tmp_path / "base"
    shutil.copytree(family[0], base)
    save_word_tokenizer(base, ["<unk>", *(f"w{i}" for i in range(1, 70))])  # 70 > 64 rows
    config = weighted_config("task_arithmetic", [base, *family[1:]], tokenizer_source="union")
    with pytest.raises(UserError, match="base tokenizer has tokens past its model's 64 embedding"):
        run_mergekit_config(write_config(config, tmp_path), tmp_path / "out")


@pytest.mark.slow
@pytest.mark.parametrize("options", [{}, {"nuslerp_flatten": False, "nuslerp_row_wise": True}])
def test_nuslerp_without_a_base_model_interpolates_the_two_models_as_mergekit(
    family: list[Path], tmp_path: Path, options: dict
) -> None:
    config = {
        "merge_method": "nuslerp",
        "dtype": "float32",
        "models": [
            {"model": str(family[1]), "parameters": {"weight": [0.2, 0.8]}},
            {"model": str(family[2]), "parameters": {"weight": 0.5}},
        ],
        "parameters": options,
    }
    ours, theirs = both(config, tmp_path)
    assert_same(ours, theirs)


@pytest.mark.parametrize("method", ["nuslerp", "multislerp"])
def test_the_study_engine_merges_the_weighted_spherical_methods_as_mergekit(
    family: list[Path], tmp_path: Path, method: str
) -> None:
    """Studies search these methods' per-expert ``weight``: the resident engine's merge of
    one recipe equals mergekit's merge of the same config."""
    import transformers

    from mergeopt.blocks import BlockLayout
    from mergeopt.merge.engine import MergeEngine, ModuleTarget
    from tests.test_merge_oracle import mergekit_merge

    layout = BlockLayout.fixed(4, num_blocks=2)
    weights = [{"weight": 0.3}, {"weight": 0.6}]
    engine = MergeEngine(base=family[0], experts=family[1:], layout=layout, method=method)
    module = transformers.AutoModelForCausalLM.from_pretrained(family[0], dtype=torch.float32)
    recipe = [[dict(w) for w in weights] for _ in range(layout.num_blocks)]
    engine.merge(recipe, target=ModuleTarget(module=module))
    config = {
        "merge_method": method,
        "base_model": str(family[0]),
        "dtype": "float32",
        "models": [
            {"model": str(p), "parameters": w} for p, w in zip(family[1:], weights, strict=True)
        ],
    }
    state = module.state_dict()
    for name, tensor in mergekit_merge(config, tmp_path / "theirs").items():
        assert torch.equal(state[name], tensor), name


@pytest.mark.parametrize("method", ["ram", "ramplus_tl", "arcee_fusion", "model_stock", "slerp"])
def test_a_study_of_a_method_without_per_model_parameters_is_one_line(
    tmp_path: Path, method: str
) -> None:
    from mergeopt.spec import load_spec
    from mergeopt.study import check_method

    spec_text = (Path(__file__).parents[1] / "studies" / "tiny.yaml").read_text(encoding="utf-8")
    spec_path = tmp_path / "tiny.yaml"
    spec_path.write_text(spec_text.replace("method: task_arithmetic", f"method: {method}"))
    spec = load_spec(spec_path)
    with pytest.raises(UserError, match=f"merge.method: {method} has no per-model parameter"):
        check_method(spec, num_experts=2)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["ram", "ramplus_tl", "arcee_fusion"])
def test_bf16_ram_and_fusion_write_what_mergekit_writes(
    family: list[Path], tmp_path: Path, method: str
) -> None:
    """In a bf16 merge without ``out_dtype``, mergekit writes what the method returns: bf16
    from ram, fp32 from ramplus_tl and arcee_fusion (their scales and masks are fp32)."""
    experts = family[1:2] if method == "arcee_fusion" else family[1:]
    config = {
        "merge_method": method,
        "base_model": str(family[0]),
        "dtype": "bfloat16",
        "models": [{"model": str(p)} for p in experts],
    }
    ours, theirs = both(config, tmp_path)
    assert_same(ours, theirs)
    expected = torch.bfloat16 if method == "ram" else torch.float32
    assert {tensor.dtype for tensor in ours.values()} == {expected}
