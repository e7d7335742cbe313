"""The resident engine: per-block merges into a module or a callback; only changes re-merged."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest
import torch
import yaml

from mergeopt.blocks import BlockLayout
from mergeopt.errors import UserError
from mergeopt.merge import engine as engine_module
from mergeopt.merge.engine import CallbackTarget, MergeEngine, ModuleTarget, required_bytes
from mergeopt.merge.mergekit_config import run_mergekit_config
from tests.test_merge_methods import needs_kernels


def _load_oracle_module() -> ModuleType:
    """test_merge_oracle.py (tiny Qwen2 family builder, mergekit helpers) as a module object."""
    path = Path(__file__).with_name("test_merge_oracle.py")
    spec = importlib.util.spec_from_file_location("_merge_oracle_helpers", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


oracle = _load_oracle_module()

LAYOUT = BlockLayout.fixed(oracle.NUM_LAYERS, num_blocks=2)  # blocks 0, 1 + outer block 2


@pytest.fixture(scope="module")
def untied(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return oracle.make_tiny_qwen2_family(tmp_path_factory.mktemp("e_untied"), tied=False)


@pytest.fixture(scope="module")
def tied(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return oracle.make_tiny_qwen2_family(tmp_path_factory.mktemp("e_tied"), tied=True, seed=7)


def uniform(params: list[dict[str, float]], blocks: int = LAYOUT.num_blocks) -> list:
    return [[dict(p) for p in params] for _ in range(blocks)]


def load_module(path: Path) -> torch.nn.Module:
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


@pytest.mark.parametrize("family", ["untied", "tied"])
def test_module_target_equals_mergekit_config_output(
    family: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    paths: list[Path] = request.getfixturevalue(family)
    params = [{"weight": 0.6, "density": 0.5}, {"weight": 0.3, "density": 0.8}]
    engine = MergeEngine(base=paths[0], experts=paths[1:3], layout=LAYOUT, method="ties")
    module = load_module(paths[0])
    stats = engine.merge(uniform(params), target=ModuleTarget(module=module))
    assert stats.blocks_merged == LAYOUT.num_blocks

    config = oracle.models_config(paths, "ties", params)
    (tmp_path / "r.yml").write_text(yaml.safe_dump(config), encoding="utf-8")
    run_mergekit_config(tmp_path / "r.yml", tmp_path / "out")
    expected = oracle.read_folder(tmp_path / "out")
    state = module.state_dict()
    for name, tensor in expected.items():
        assert torch.equal(state[name], tensor), name
    if family == "tied":
        assert module.lm_head.weight.data_ptr() == module.model.embed_tokens.weight.data_ptr()
        assert torch.equal(module.lm_head.weight, expected["model.embed_tokens.weight"])


def test_only_changed_blocks_are_remerged(untied: list[Path]) -> None:
    engine = MergeEngine(
        base=untied[0], experts=untied[1:3], layout=LAYOUT, method="task_arithmetic"
    )
    received: list[list[str]] = []
    target = CallbackTarget(fn=lambda pairs: received.append([name for name, _ in pairs]))
    params = uniform([{"weight": 0.5}, {"weight": 0.5}])
    assert engine.merge(params, target=target).blocks_merged == 3
    assert engine.merge(params, target=target).blocks_merged == 0
    params[1][0]["weight"] = 0.9
    received.clear()
    stats = engine.merge(params, target=target)
    assert stats.blocks_merged == 1
    assert all(".layers.2." in n or ".layers.3." in n for n in received[0])
    assert stats.tensors_written == len(received[0])
    other = CallbackTarget(fn=lambda pairs: None)
    assert engine.merge(params, target=other).blocks_merged == 3  # a new target gets all


def test_each_block_gets_its_own_parameters(untied: list[Path]) -> None:
    engine = MergeEngine(
        base=untied[0], experts=untied[1:2], layout=LAYOUT, method="task_arithmetic"
    )
    got: dict[str, torch.Tensor] = {}
    target = CallbackTarget(fn=lambda pairs: got.update({n: t.clone() for n, t in pairs}))
    engine.merge([[{"weight": 0.0}], [{"weight": 1.0}], [{"weight": 0.5}]], target=target)
    base = oracle.read_folder(untied[0])
    expert = oracle.read_folder(untied[1])
    name0, name3 = "model.layers.0.mlp.up_proj.weight", "model.layers.3.mlp.up_proj.weight"
    assert torch.equal(got[name0], base[name0])
    assert torch.equal(got[name3], base[name3] + (expert[name3] - base[name3]))
    embed = "model.embed_tokens.weight"
    assert torch.equal(got[embed], base[embed] + (expert[embed] - base[embed]) * 0.5)


def test_random_methods_reproduce_with_the_same_seed(untied: list[Path]) -> None:
    engine = MergeEngine(base=untied[0], experts=untied[1:3], layout=LAYOUT, method="dare_ties")
    params = uniform([{"weight": 0.6, "density": 0.3}, {"weight": 0.6, "density": 0.5}])

    def run(seed: int) -> dict[str, torch.Tensor]:
        got: dict[str, torch.Tensor] = {}
        engine.merge(
            params,
            target=CallbackTarget(fn=lambda p: got.update({n: t.clone() for n, t in p})),
            seed=seed,
        )
        return got

    first, again, other = run(3), run(3), run(4)
    assert all(torch.equal(first[n], again[n]) for n in first)
    assert not torch.equal(
        first["model.layers.1.mlp.up_proj.weight"], other["model.layers.1.mlp.up_proj.weight"]
    )


def test_a_new_seed_remerges_random_methods_only(untied: list[Path]) -> None:
    target = CallbackTarget(fn=lambda pairs: None)
    dare = MergeEngine(base=untied[0], experts=untied[1:2], layout=LAYOUT, method="dare_linear")
    params = uniform([{"weight": 1.0, "density": 0.5}])
    dare.merge(params, target=target, seed=1)
    assert dare.merge(params, target=target, seed=2).blocks_merged == 3
    ties = MergeEngine(base=untied[0], experts=untied[1:2], layout=LAYOUT, method="ties")
    ties.merge(params, target=target, seed=1)
    assert ties.merge(params, target=target, seed=2).blocks_merged == 0


def test_engine_fails_early_with_the_memory_it_needs(
    untied: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(engine_module, "_free_bytes", lambda device: 1000)
    with pytest.raises(UserError, match=r"needs \d+\.\d\d GiB on cpu .*only 0\.00 GiB is free"):
        MergeEngine(base=untied[0], experts=untied[1:3], layout=LAYOUT, method="ties")


def test_required_bytes_counts_base_task_vectors_and_scratch() -> None:
    assert required_bytes(
        num_parameters=1000,
        num_experts=2,
        dtype=torch.bfloat16,
        largest_block_parameters=100,
        largest_tensor_parameters=10,
        method="ties",
    ) == 2 * (3 * 1000 + 100 + 7 * 10) + 2 * 100 * (2 + 2)  # + key and two masks per element
    assert required_bytes(
        num_parameters=1000,
        num_experts=2,
        dtype=torch.bfloat16,
        largest_block_parameters=100,
        largest_tensor_parameters=10,
        method="dare_ties",
    ) == 2 * (3 * 1000 + 100 + 7 * 10)


def test_bad_inputs_are_user_errors(untied: list[Path], tmp_path: Path) -> None:
    with pytest.raises(UserError, match="unknown parameter 'gamma'"):
        MergeEngine(
            base=untied[0],
            experts=untied[1:2],
            layout=LAYOUT,
            method="ties",
            method_params={"gamma": 0.1},
        )
    with pytest.raises(UserError, match="block layout has 5 layers"):
        MergeEngine(
            base=untied[0],
            experts=untied[1:2],
            layout=BlockLayout.fixed(5, num_blocks=1),
            method="ties",
        )
    with pytest.raises(UserError, match="folder not found"):
        MergeEngine(base=tmp_path / "nope", experts=untied[1:2], layout=LAYOUT, method="ties")
    engine = MergeEngine(base=untied[0], experts=untied[1:2], layout=LAYOUT, method="ties")
    with pytest.raises(ValueError, match="'weight' is required"):
        engine.merge(uniform([{"density": 0.5}]), target=CallbackTarget(fn=lambda p: None))


@pytest.mark.parametrize("method", ["task_arithmetic", "linear"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_fast_path_writes_in_place_within_one_rounding(
    untied: list[Path], method: str, dtype: torch.dtype
) -> None:
    params = uniform([{"weight": 0.7}, {"weight": 0.45}])
    method_params = {"lambda": 0.9} if method == "task_arithmetic" else {}
    exact, fast = (
        MergeEngine(
            base=untied[0],
            experts=untied[1:3],
            layout=LAYOUT,
            method=method,
            method_params=method_params,
            dtype=dtype,
            exact=flag,
        )
        for flag in (True, False)
    )
    reference: dict[str, torch.Tensor] = {}
    exact.merge(params, target=CallbackTarget(fn=lambda p: reference.update(dict(p))))
    module = load_module(untied[0]).to(dtype)
    pointers = {n: p.data_ptr() for n, p in module.named_parameters()}
    fast.merge(params, target=ModuleTarget(module=module))
    tolerance = 2**-7 if dtype == torch.bfloat16 else 1e-6
    for name, parameter in module.named_parameters():
        assert parameter.data_ptr() == pointers[name]
        scale = reference[name].abs().max().item()
        assert (parameter - reference[name]).abs().max().item() <= tolerance * scale, name


@needs_kernels
@pytest.mark.parametrize("method", ["ties", "breadcrumbs"])
def test_a_missed_window_found_after_the_next_block_remerges_its_block(
    method: str, untied: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The engine checks a block's Triton top-k windows only after launching the next block;
    a miss merges the block again, so the target ends up exactly as with checked masks."""
    pytest.importorskip("triton")
    from mergeopt.merge import plan, selection, triton_kernels

    params = uniform([{"weight": 0.6, "density": 0.5}, {"weight": 0.3, "density": 0.8}])

    def final_tensors() -> tuple[dict[str, torch.Tensor], list[str]]:
        engine = MergeEngine(
            base=untied[0], experts=untied[1:3], layout=LAYOUT, method=method,
            dtype=torch.bfloat16, device="cuda" if torch.cuda.is_available() else "cpu",
        )  # fmt: skip
        got: dict[str, torch.Tensor] = {}
        writes: list[str] = []

        def keep(pairs: list[tuple[str, torch.Tensor]]) -> None:
            got.update({name: tensor.clone() for name, tensor in pairs})
            writes.extend(name for name, _ in pairs)

        engine.merge(params, target=CallbackTarget(fn=keep))
        return got, writes

    monkeypatch.setenv("MERGEOPT_FUSED_SELECT", "0")  # on a GPU too
    expected, _ = final_tensors()  # the torch path: brackets, checked before merging
    monkeypatch.setattr(plan, "_select_kernels", lambda device, dtype, switches: triton_kernels)
    monkeypatch.setattr(selection, "_SORT_BELOW", 0)
    monkeypatch.setattr(selection, "_SAMPLE_SIZE", 64)
    selection._sample_positions.cache_clear()
    monkeypatch.setattr(triton_kernels, "SELECT_BINS", 2)  # windows of one key: misses
    got, writes = final_tensors()
    assert len(writes) > len(set(writes))  # some block was written twice: merged again
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name
