"""The transformers scorer's static decoding (a static KV cache whose decode step is a CUDA graph
on CUDA) generates exactly what the dynamic path generates: same tokens, same stops, same
counts, across batch sizes, short last batches, EOS and weights written in place."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mergeopt.errors import UserError
from mergeopt.objectives.scorers.hf import HFScorer
from mergeopt.objectives.scorers.static_decode import STEPS_BETWEEN_CHECKS, StaticDecoder
from tests.tiny_models import build_tiny_model

# 7 prompts in batches of 4: a full batch, then 3 prompts and one dummy row.
PROMPTS = [
    "Q: 12+7=\nA:",
    "R: abc\nA:",
    "hello world, this is a longer prompt than the others",
    "x",
    "abc def",
    "Q: 1+1=\nA:",
    "zz",
]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def dynamic(tiny_model: Path) -> HFScorer:
    return HFScorer(model_dir=tiny_model, batch_size=4, decode="dynamic")


@pytest.fixture(scope="module")
def static(tiny_model: Path) -> HFScorer:
    return HFScorer(model_dir=tiny_model, batch_size=4, decode="static")


@pytest.mark.parametrize(
    ("stop", "max_new_tokens"),
    [([], 1), ([], 2 * STEPS_BETWEEN_CHECKS + 3), (["\n"], 20), (["a", "3", "@@never"], 9)],
)
def test_static_decoding_generates_what_dynamic_decoding_generates(
    dynamic: HFScorer, static: HFScorer, stop: list[str], max_new_tokens: int
) -> None:
    expected = dynamic.generate(PROMPTS, max_new_tokens=max_new_tokens, stop=stop)
    assert static.generate(PROMPTS, max_new_tokens=max_new_tokens, stop=stop) == expected
    assert (
        static.generate(PROMPTS[::-1], max_new_tokens=max_new_tokens, stop=stop) == (expected[::-1])
    )


def test_eos_ends_a_static_generation_where_it_ends_a_dynamic_one(
    dynamic: HFScorer, static: HFScorer
) -> None:
    free = dynamic.generate(PROMPTS, max_new_tokens=12, stop=[])
    eos = dynamic.tokenizer.convert_tokens_to_ids(free[2].text[4])  # some rows end early
    try:
        dynamic.eos_token_ids = static.eos_token_ids = {eos}
        expected = dynamic.generate(PROMPTS, max_new_tokens=12, stop=[])
        outputs = static.generate(PROMPTS, max_new_tokens=12, stop=[])
    finally:
        dynamic.eos_token_ids = static.eos_token_ids = {1}
    assert outputs == expected
    assert any(g.num_tokens < 12 for g in outputs)


def test_weights_written_in_place_change_static_outputs_with_the_same_decoders(
    tiny_model: Path,
) -> None:
    dynamic = HFScorer(model_dir=tiny_model, batch_size=4, decode="dynamic")
    static = HFScorer(model_dir=tiny_model, batch_size=4, decode="static")
    before = static.generate(PROMPTS, max_new_tokens=10, stop=["\n"])
    decoders = dict(static._decoders)
    base = {name: t.detach().clone() for name, t in static.model.state_dict().items()}
    changed_weights = {name: -1.5 * t for name, t in base.items() if "mlp" in name}
    for scorer in (dynamic, static):
        scorer.load_weights(changed_weights.items())
    changed = static.generate(PROMPTS, max_new_tokens=10, stop=["\n"])
    assert changed != before
    assert changed == dynamic.generate(PROMPTS, max_new_tokens=10, stop=["\n"])
    static.load_weights(base.items())
    assert static.generate(PROMPTS, max_new_tokens=10, stop=["\n"]) == before
    assert static._decoders == decoders  # the caches (graphs on CUDA) were reused
    static.close()
    dynamic.close()


def test_decode_auto_is_dynamic_on_the_cpu_and_unknown_paths_are_user_errors(
    tiny_model: Path,
) -> None:
    assert not HFScorer(model_dir=tiny_model, decode="auto").static_decoding
    with pytest.raises(UserError, match="scorer.decode: 'graph' is not one of auto, static"):
        HFScorer(model_dir=tiny_model, decode="graph")


def test_a_decode_step_the_compiler_fails_on_runs_uncompiled_with_a_warning(
    dynamic: HFScorer, static: HFScorer
) -> None:
    decoder = StaticDecoder(
        static.model, rows=1, length=64, cache_field=static._cache_field, capture=False
    )

    def compiler_failure(*args: object) -> torch.Tensor:
        raise RuntimeError("inductor: no C compiler")

    decoder._forward = compiler_failure
    with torch.inference_mode():
        decoder.prefill([static.tokenizer(PROMPTS[0])["input_ids"]], pad_token_id=0)
        with pytest.warns(UserWarning, match="torch.compile failed on the decode step"):
            decoder._warm_up_step()
        tokens = decoder.generated[0, :2].tolist()
    assert decoder._forward == decoder._model_logits
    dynamic.eos_token_ids = set()
    try:
        expected = dynamic.generate(PROMPTS[:1], max_new_tokens=2, stop=[])[0]
    finally:
        dynamic.eos_token_ids = {1}
    assert static.tokenizer.decode(tokens, skip_special_tokens=True) == expected.text


@pytest.mark.slow
def test_on_the_zoo_base_static_and_dynamic_decoding_agree(zoo_dir: Path) -> None:
    lines = (zoo_dir / "tasks" / "arith.jsonl").read_text().splitlines()[:24]
    prompts = [json.loads(line)["prompt"] for line in lines]
    outputs = [
        HFScorer(model_dir=zoo_dir / "base", batch_size=16, decode=decode).generate(
            prompts, max_new_tokens=24, stop=["\n"]
        )
        for decode in ("dynamic", "static")
    ]
    assert outputs[0] == outputs[1]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_a_captured_decode_step_follows_weights_written_in_place(tiny_model: Path) -> None:
    dynamic = HFScorer(model_dir=tiny_model, device="cuda", batch_size=4, decode="dynamic")
    static = HFScorer(model_dir=tiny_model, device="cuda", batch_size=4)  # auto: static
    before = static.generate(PROMPTS, max_new_tokens=20, stop=[])
    assert before == dynamic.generate(PROMPTS, max_new_tokens=20, stop=[])
    graphs = {key: decoder.graph for key, decoder in static._decoders.items()}
    assert all(graph is not None for graph in graphs.values())
    changed_weights = {
        name: -1.5 * t.detach() for name, t in static.model.state_dict().items() if "mlp" in name
    }
    for scorer in (dynamic, static):
        scorer.load_weights(changed_weights.items())
    changed = static.generate(PROMPTS, max_new_tokens=20, stop=[])
    assert changed != before
    assert changed == dynamic.generate(PROMPTS, max_new_tokens=20, stop=[])
    assert {key: decoder.graph for key, decoder in static._decoders.items()} == graphs


def test_packed_grouped_query_attention_is_sdpa_over_repeated_keys() -> None:
    from transformers.integrations.sdpa_attention import repeat_kv

    from mergeopt.objectives.scorers.static_decode import packed_gqa_attention

    generator = torch.Generator().manual_seed(0)
    rows, kv_heads, groups, length, dim = 3, 2, 4, 40, 16
    query = torch.randn(rows, kv_heads * groups, 1, dim, generator=generator)
    key = torch.randn(rows, kv_heads, length, dim, generator=generator)
    value = torch.randn(rows, kv_heads, length, dim, generator=generator)
    mask = torch.zeros(rows, 1, 1, length)
    mask[:, :, :, 30:] = torch.finfo(torch.float32).min  # slots not written yet
    mask[1, :, :, :5] = torch.finfo(torch.float32).min  # left padding of row 1
    module = torch.nn.Module()
    module.num_key_value_groups = groups  # type: ignore[assignment]

    out, _ = packed_gqa_attention(module, query, key, value, mask, scaling=0.25)
    expected = torch.nn.functional.scaled_dot_product_attention(
        query, repeat_kv(key, groups), repeat_kv(value, groups), attn_mask=mask, scale=0.25
    ).transpose(1, 2)
    assert out.shape == (rows, 1, kv_heads * groups, dim)
    torch.testing.assert_close(out, expected)


def test_decode_steps_attend_packed_and_leave_the_model_on_sdpa(static: HFScorer) -> None:
    from transformers import AttentionInterface

    from mergeopt.objectives.scorers import static_decode

    calls = []
    packed = AttentionInterface._global_mapping[static_decode.PACKED_GQA]
    AttentionInterface._global_mapping[static_decode.PACKED_GQA] = lambda *a, **k: (
        calls.append(a[1].shape) or packed(*a, **k)
    )
    try:
        static.generate(PROMPTS[:2], max_new_tokens=3, stop=[])
    finally:
        AttentionInterface._global_mapping[static_decode.PACKED_GQA] = packed
    layers = static.model.config.num_hidden_layers
    assert len(calls) == 2 * layers  # steps 2 and 3; the prefill (token 1) runs sdpa
    assert all(shape[2] == 1 for shape in calls)
    assert static.model.config._attn_implementation == "sdpa"
