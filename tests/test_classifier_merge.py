"""Encoder classifiers as merge inputs: heads with different label counts are zero-padded to
the largest, a base without a head merges as zeros, and mismatched models are one-line errors.
Tiny random BERTs built here; the merge is the study's engine."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mergeopt.blocks import BlockLayout
from mergeopt.checkpoints import Checkpoint, merge_shapes
from mergeopt.errors import UserError
from mergeopt.merge.engine import MergeEngine
from mergeopt.objectives.scorers.classifier import ClassifierScorer
from mergeopt.zoo.encoder import make_tokenizer

HIDDEN = 32


def _config(hidden: int = HIDDEN, **extra: object):  # type: ignore[no-untyped-def]
    from transformers import BertConfig

    return BertConfig(
        vocab_size=len(make_tokenizer()),
        hidden_size=hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        **extra,
    )


def _save(model: torch.nn.Module, folder: Path) -> Path:
    model.save_pretrained(folder, safe_serialization=True)  # type: ignore[operator]
    make_tokenizer().save_pretrained(folder)
    return folder


def masked_lm_base(folder: Path, *, seed: int = 0) -> Path:
    from transformers import BertForMaskedLM

    torch.manual_seed(seed)
    return _save(BertForMaskedLM(_config()), folder)


def classifier(folder: Path, *, labels: int, seed: int, hidden: int = HIDDEN) -> Path:
    from transformers import BertForSequenceClassification

    torch.manual_seed(seed)
    return _save(BertForSequenceClassification(_config(hidden, num_labels=labels)), folder)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("classifiers")
    return {
        "base": masked_lm_base(root / "base"),
        "topic": classifier(root / "topic", labels=4, seed=1),
        "sentiment": classifier(root / "sentiment", labels=2, seed=2),
    }


def test_heads_are_padded_to_the_largest_and_the_masked_lm_head_is_not_merged(
    models: dict[str, Path],
) -> None:
    shapes = merge_shapes(
        Checkpoint(path=models["base"]),
        [Checkpoint(path=models["topic"]), Checkpoint(path=models["sentiment"])],
    )
    assert shapes["classifier.weight"] == (4, HIDDEN)
    assert shapes["classifier.bias"] == (4,)
    assert shapes["bert.pooler.dense.weight"] == (HIDDEN, HIDDEN)  # the base has no pooler
    assert not any(name.startswith("cls.") for name in shapes)  # the base's masked-LM head


def test_task_arithmetic_merges_zero_padded_task_vectors(models: dict[str, Path]) -> None:
    base, topic, sentiment = (load_file(models[m] / "model.safetensors") for m in models)
    scorer = ClassifierScorer(model_dir=models["base"])
    engine = MergeEngine(
        base=models["base"],
        experts=[models["topic"], models["sentiment"]],
        layout=BlockLayout.fixed(2, num_blocks=1),
        method="task_arithmetic",
    )
    weights = (0.7, 0.4)
    engine.merge([[{"weight": w} for w in weights]] * 2, target=scorer.merge_target())
    merged = scorer.model.state_dict()

    padded_head = torch.zeros(4, HIDDEN)
    padded_head[:2] = sentiment["classifier.weight"]
    # the base has no head: its task vectors are the experts' heads, the smaller one padded
    expected_head = weights[0] * topic["classifier.weight"] + weights[1] * padded_head
    torch.testing.assert_close(merged["classifier.weight"], expected_head)
    assert torch.equal(merged["classifier.bias"][2:], weights[0] * topic["classifier.bias"][2:])
    name = "bert.encoder.layer.1.attention.self.query.weight"
    expected = base[name] + sum(
        w * (expert[name] - base[name])
        for w, expert in zip(weights, (topic, sentiment), strict=True)
    )
    torch.testing.assert_close(merged[name], expected)
    assert scorer.model.config.num_labels == 4


def test_each_task_is_answered_by_its_experts_head_on_the_merged_body(
    models: dict[str, Path],
) -> None:
    from transformers import BertForSequenceClassification

    scorer = ClassifierScorer(
        model_dir=models["base"], expert_dirs=[models["topic"], models["sentiment"]]
    )
    engine = MergeEngine(
        base=models["base"],
        experts=[models["topic"], models["sentiment"]],
        layout=BlockLayout.fixed(2, num_blocks=1),
        method="task_arithmetic",
    )
    engine.merge([[{"weight": 0.5}, {"weight": 0.5}]] * 2, target=scorer.merge_target())
    body = {
        name: tensor.clone()
        for name, tensor in scorer.model.state_dict().items()
        if not name.startswith(("classifier", "bert.pooler"))
    }
    texts = ["good ball team", "bad awful market"]
    logits = scorer.classify(texts, [None, None], head=1)

    # transformers' own classifier: the merged body, the sentiment expert's pooler and head
    sentiment = load_file(models["sentiment"] / "model.safetensors")
    own = {n: t for n, t in sentiment.items() if n.startswith(("classifier", "bert.pooler"))}
    reference = BertForSequenceClassification(_config(num_labels=2)).eval()
    reference.load_state_dict({**body, **own})
    with torch.no_grad():
        expected = reference(**scorer.tokenizer(texts, padding=True, return_tensors="pt")).logits
    assert [len(row) for row in logits] == [4, 4]
    torch.testing.assert_close(torch.tensor(logits)[:, :2], expected)
    assert all(row[2:] == [0.0, 0.0] for row in logits)  # the padding scores 0


def test_a_source_model_loads_padded_with_zeros_where_it_has_nothing(
    models: dict[str, Path],
) -> None:
    from mergeopt.objectives.normalization import iter_checkpoint_tensors

    scorer = ClassifierScorer(model_dir=models["base"])
    scorer.load_weights(iter_checkpoint_tensors(models["topic"]))
    scorer.load_weights(iter_checkpoint_tensors(models["sentiment"]))
    state = scorer.model.state_dict()
    sentiment = load_file(models["sentiment"] / "model.safetensors")
    assert state["classifier.weight"].shape == (4, HIDDEN)
    assert torch.equal(state["classifier.weight"][:2], sentiment["classifier.weight"])
    assert not state["classifier.weight"][2:].any()
    scorer.load_weights(iter_checkpoint_tensors(models["base"]))  # no head, no pooler: zeros
    assert not scorer.model.state_dict()["bert.pooler.dense.weight"].any()
    assert not scorer.model.state_dict()["classifier.weight"].any()


def test_mismatched_models_are_one_line_errors(tmp_path: Path, models: dict[str, Path]) -> None:
    wide = classifier(tmp_path / "wide", labels=2, seed=3, hidden=48)
    with pytest.raises(
        UserError, match=r"has shape \[48\], another model has \[32\] \(only a head's"
    ):
        merge_shapes(
            Checkpoint(path=models["base"]),
            [Checkpoint(path=models["topic"]), Checkpoint(path=wide)],
        )
    from transformers import BertForMaskedLM

    torch.manual_seed(4)
    masked_lm = _save(BertForMaskedLM(_config()), tmp_path / "masked-lm")
    with pytest.raises(UserError, match="is missing"):  # not every expert is a classifier
        merge_shapes(
            Checkpoint(path=models["base"]),
            [Checkpoint(path=models["topic"]), Checkpoint(path=masked_lm)],
        )


def test_texts_longer_than_the_position_embeddings_are_truncated_to_them(
    tmp_path: Path, models: dict[str, Path]
) -> None:
    from transformers import BertForSequenceClassification, BertTokenizer

    # a tokenizer saved without model_max_length has no limit of its own
    folder = classifier(tmp_path / "unlimited", labels=2, seed=3)
    vocabulary = make_tokenizer().get_vocab()
    BertTokenizer(vocab=vocabulary, do_lower_case=True).save_pretrained(folder)
    scorer = ClassifierScorer(model_dir=folder, expert_dirs=[folder])
    assert scorer.tokenizer.model_max_length > 10**20
    words = [w for w in vocabulary if w.isalpha()]
    long_text = " ".join(words[i % len(words)] for i in range(100))

    logits = scorer.classify([long_text], [None], head=0)

    # what the model sees: the text cut to its 64 positions, special tokens included
    encoded = scorer.tokenizer([long_text], truncation=True, max_length=64, return_tensors="pt")
    assert encoded["input_ids"].shape[1] == 64
    model = BertForSequenceClassification.from_pretrained(folder).eval()
    with torch.no_grad():
        expected = model(**encoded).logits
    torch.testing.assert_close(torch.tensor(logits), expected)
