"""The merge math: exact magnitude selection, random sparsification statistics, quirks."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import Any

import pytest
import torch

from mergeopt.merge import selection, sparsification
from mergeopt.merge.backend import Switches
from mergeopt.merge.methods import METHODS, generalized_task_arithmetic
from mergeopt.merge.plan import MergePlan
from mergeopt.merge.selection import top_magnitude_mask
from mergeopt.merge.sparsification import sparsify


def reference_top_mask(x: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k by |x| with ties kept in index order (stable sort): mergeopt's order, except for
    fp32 on the CPU where a threshold splits equal nonzero magnitudes (then mergekit's)."""
    order = torch.sort(x.abs().float().reshape(-1), descending=True, stable=True).indices
    mask = torch.zeros(x.numel(), dtype=torch.bool)
    mask[order[:k]] = True
    return mask.view(x.shape)


@pytest.fixture(params=["bracket", "sort"])
def selection_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test through the sampled-bracket path (a sample smaller than the tensors) and
    through the small-tensor sort path."""
    monkeypatch.setattr(selection, "_SORT_BELOW", 0 if request.param == "bracket" else 1 << 30)
    monkeypatch.setattr(selection, "_SAMPLE_SIZE", 128)
    selection._sample_positions.cache_clear()
    return request.param


@pytest.fixture
def radix_fallbacks(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Records the k of every bracket miss (the radix select that runs instead)."""
    calls: list[int] = []
    radix = selection._radix_top_mask

    def counted(keys: torch.Tensor, k: int) -> torch.Tensor:
        calls.append(k)
        return radix(keys, k)

    monkeypatch.setattr(selection, "_radix_top_mask", counted)
    return calls


def tie_heavy_inputs(n: int) -> dict[str, torch.Tensor]:
    """Inputs whose k-th largest magnitude is shared by many elements."""
    generator = torch.Generator().manual_seed(n)
    base = (torch.randn(n, generator=generator) * 0.02).bfloat16()
    expert = (base.float() + torch.randn(n, generator=generator) * 0.002).bfloat16()
    return {
        # a bf16 task vector: differences of bf16 numbers fall on a coarse grid
        "bf16 task vector": expert - base,
        "four values": (torch.randint(0, 4, (n,), generator=generator) - 2).to(torch.bfloat16),
        "all zero": torch.zeros(n, dtype=torch.bfloat16),
        "mostly zero": torch.where(
            torch.rand(n, generator=generator) < 0.8, 0, torch.randn(n, generator=generator)
        ),
        "random fp32": torch.randn(n, generator=generator),
    }


@pytest.mark.parametrize("kind", list(tie_heavy_inputs(8)))
def test_bracketed_select_equals_a_stable_sort_on_tie_heavy_inputs(
    kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(selection, "_SORT_BELOW", 0)
    monkeypatch.setattr(selection, "_SAMPLE_SIZE", 512)
    selection._sample_positions.cache_clear()
    x = tie_heavy_inputs(20_000)[kind]
    n = x.numel()
    for k in (1, 2, 200, 5_000, n // 2, int(0.51 * n), 19_000, n - 1):
        assert torch.equal(top_magnitude_mask(x, k), reference_top_mask(x, k)), (kind, k)


def test_bracketed_select_rarely_needs_the_radix_fallback(
    monkeypatch: pytest.MonkeyPatch, radix_fallbacks: list[int]
) -> None:
    monkeypatch.setattr(selection, "_SAMPLE_SIZE", 4096)
    selection._sample_positions.cache_clear()
    x = torch.randn(300, 1000, generator=torch.Generator().manual_seed(3)).bfloat16()
    for k in (10, 3_000, 150_000, 153_000, 299_000):
        assert torch.equal(top_magnitude_mask(x, k), reference_top_mask(x, k))
    assert radix_fallbacks == []


def test_a_missed_bracket_falls_back_to_the_exact_radix_select(
    monkeypatch: pytest.MonkeyPatch, radix_fallbacks: list[int]
) -> None:
    # a negative half-width puts hi below lo: brackets miss (except where clamping at the
    # sample's ends still happens to catch the k-th key)
    monkeypatch.setattr(selection, "_SAMPLE_SIGMAS", -30.0)
    monkeypatch.setattr(selection, "_SORT_BELOW", 0)
    x = tie_heavy_inputs(20_000)["bf16 task vector"]
    for k in (7, 10_000, 19_993):
        assert torch.equal(top_magnitude_mask(x, k), reference_top_mask(x, k))
    assert 7 in radix_fallbacks and 10_000 in radix_fallbacks


def test_batched_masks_equal_one_tensor_at_a_time(selection_path: str) -> None:
    generator = torch.Generator().manual_seed(9)
    deltas = [
        (torch.randn(40, 50, generator=generator) * 0.01).bfloat16(),
        torch.randn(3000, generator=generator),
        tie_heavy_inputs(5000)["bf16 task vector"],
        torch.randn(7, generator=generator),
    ]
    for method, gamma in (("magnitude", 0.0), ("magnitude_outliers", 0.05)):
        items = [(delta, density, gamma) for delta in deltas for density in (0.3, 0.5, 1.0)]
        batched = sparsification.magnitude_masks_batch(method, items)
        for (delta, density, _), mask in zip(items, batched, strict=True):
            alone = sparsification.sparsification_mask(
                delta, method=method, density=density, gamma=gamma
            )
            if alone is None:
                assert mask is None
            else:
                assert mask is not None and torch.equal(mask, alone)
            if method == "magnitude" and density < 1:
                k = max(1, int(density * delta.numel()))
                assert torch.equal(mask, reference_top_mask(delta, k))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("k", [1, 7, 500, 999, 1000])
def test_top_k_is_exact_with_ties_in_index_order(
    dtype: torch.dtype, k: int, selection_path: str
) -> None:
    generator = torch.Generator().manual_seed(k)
    x = (torch.randn(40, 25, generator=generator) * 0.02).to(dtype)
    x[3, :10] = x[0, 0]  # force ties
    x[5, 5] = 0.0
    assert torch.equal(top_magnitude_mask(x, k), reference_top_mask(x, k))


def test_fp32_threshold_spans_both_radix_levels(selection_path: str) -> None:
    # values sharing the high 16 bits, differing only in the low ones
    x = torch.tensor([1.0 + i * 2**-20 for i in range(64)], dtype=torch.float32)
    x = x[torch.randperm(64, generator=torch.Generator().manual_seed(0))]
    for k in (1, 13, 63):
        assert torch.equal(top_magnitude_mask(x, k), reference_top_mask(x, k))


def test_magnitude_keeps_at_least_one_element_like_mergekit() -> None:
    delta = torch.tensor([0.1, -0.5, 0.2])
    assert torch.equal(sparsify(delta, method="magnitude", density=0.1), torch.tensor([0, -0.5, 0]))


def test_breadcrumbs_quirks_follow_mergekit(selection_path: str) -> None:
    from mergekit.sparsify import magnitude_outliers

    small = torch.linspace(-1, 1, 50)
    # density·n < 1: the whole delta becomes zero (no max(1, .) as TIES has)
    assert not sparsify(small, method="magnitude_outliers", density=0.01, gamma=0.01).any()
    # gamma·n < 1: no outliers dropped, the top int(density·n) kept
    kept = sparsify(small, method="magnitude_outliers", density=0.2, gamma=0.01)
    assert torch.equal(kept, magnitude_outliers(small, 0.2, gamma=0.01))
    assert kept.abs().max() == 1.0
    big = torch.randn(10_000, generator=torch.Generator().manual_seed(1))
    for density, gamma in ((0.3, 0.05), (0.9, 0.2), (0.5, 0.0)):
        assert torch.equal(
            sparsify(big, method="magnitude_outliers", density=density, gamma=gamma),
            magnitude_outliers(big, density, gamma=gamma),
        )


def fp32_grids(n: int) -> dict[str, torch.Tensor]:
    """fp32 deltas whose magnitudes take few values, so that a threshold falls inside a group of
    equal magnitudes: 13 values (one key per bracket), and a finer grid (brackets of several
    keys, a few ties each)."""
    generator = torch.Generator().manual_seed(n)
    return {
        "13 magnitudes": torch.randint(-6, 7, (n,), generator=generator).float() * 0.25,
        "fine grid": torch.randint(-3000, 3001, (n // 100, 100), generator=generator) * 2.0**-12,
    }


@pytest.mark.parametrize("path", ["sort", "bracket", "radix"])
@pytest.mark.parametrize("kind", list(fp32_grids(8)))
def test_fp32_ties_at_a_threshold_are_kept_as_mergekits_sort_keeps_them(
    path: str, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """mergekit's CPU argsort is not stable: of a group of equal magnitudes split by the
    threshold it keeps members that depend on the whole tensor. fp32 merges must equal its
    bits, so there mergeopt keeps the members mergekit keeps, on every selection path."""
    from mergekit.sparsify import magnitude, magnitude_outliers

    monkeypatch.setattr(selection, "_SORT_BELOW", 1 << 30 if path == "sort" else 0)
    monkeypatch.setattr(selection, "_SAMPLE_SIZE", 512)
    if path == "radix":  # brackets miss: the radix select runs
        monkeypatch.setattr(selection, "_SAMPLE_SIGMAS", -30.0)
    selection._sample_positions.cache_clear()
    x = fp32_grids(20_000)[kind]
    n = x.numel()
    differs_from_index_order = 0
    for density in (0.1, 0.3, 0.5, 0.77):
        theirs = magnitude(x, density)
        assert torch.equal(sparsify(x, method="magnitude", density=density), theirs), density
        differs_from_index_order += not torch.equal(
            theirs != 0, reference_top_mask(x, int(density * n)) & (x != 0)
        )
        for gamma in (0.0, 0.05):
            assert torch.equal(
                sparsify(x, method="magnitude_outliers", density=density, gamma=gamma),
                magnitude_outliers(x, density, gamma=gamma),
            ), (density, gamma)
    # the ties do split: index order would have kept other elements
    assert differs_from_index_order > 0


def test_fp32_ties_in_a_batch_are_kept_as_mergekit_keeps_them_beside_other_tensors() -> None:
    from mergekit.sparsify import magnitude

    grids = fp32_grids(100_000)
    smooth = torch.randn(300, 400, generator=torch.Generator().manual_seed(8))
    items = [(grids["13 magnitudes"], 0.3, 0.0), (smooth, 0.3, 0.0), (grids["fine grid"], 0.6, 0.0)]
    masks = sparsification.magnitude_masks_batch("magnitude", items)
    for (delta, density, _), mask in zip(items, masks, strict=True):
        assert mask is not None
        assert torch.equal(torch.where(mask, delta, 0), magnitude(delta, density))


def test_ties_at_zero_keep_index_order_without_mergekits_sort(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A zero delta adds nothing and counts in no norm or sign election: where the threshold
    splits the zeros, no full sort is needed (sparse fine-tunes have many)."""
    sorted_like_mergekit: list[int] = []
    redo = selection._mergekit_top_masks

    def counted(x: torch.Tensor, *args: Any) -> list[torch.Tensor]:
        sorted_like_mergekit.append(x.numel())
        return redo(x, *args)

    monkeypatch.setattr(selection, "_mergekit_top_masks", counted)
    generator = torch.Generator().manual_seed(2)
    for n in (5_000, 200_000):  # the sort path and the bracket path
        x = torch.where(torch.rand(n, generator=generator) < 0.8, 0, torch.randn(n))
        assert torch.equal(top_magnitude_mask(x, n // 2), reference_top_mask(x, n // 2))
    assert sorted_like_mergekit == []


def torch_sort_top_mask(x: torch.Tensor, k: int, *, ascending: bool = False) -> torch.Tensor:
    """The top-``k`` magnitude mask by torch's CPU sort of ``|x|``, as mergekit makes it
    (TIES: the first k of argsort descending; breadcrumbs: the last k of sort ascending)."""
    magnitudes = x.abs().reshape(-1).float()
    if ascending:
        order = torch.sort(magnitudes).indices[magnitudes.numel() - k :]
    else:
        order = torch.argsort(magnitudes, descending=True)[:k]
    mask = torch.zeros(magnitudes.numel(), dtype=torch.bool)
    mask[order] = True
    return mask.view(x.shape)


@pytest.mark.parametrize("values", [2, 9, 1000])
@pytest.mark.parametrize("n", [17, 100, 4097, 100_000])
def test_the_introsort_replay_orders_each_tied_group_as_torchs_cpu_sort(
    n: int, values: int
) -> None:
    """The replay of libstdc++'s introsort (torch's CPU sort) gives each group of equal keys
    the order that sort leaves it in, both directions, without sorting."""
    assert selection._introsort_replays_torch()
    keys = torch.randint(0, values, (n,), generator=torch.Generator().manual_seed(n)).int()
    for descending in (True, False):
        order = torch.sort(keys.float(), descending=descending).indices
        replayed = keys.numpy() if descending else -keys.numpy()
        for value in keys.unique()[:20].tolist():
            expected = order[keys[order] == value].numpy()
            got = selection._introsort_group_order(replayed, value if descending else -value)
            assert got is not None and got.tolist() == expected.tolist(), (descending, value)


def fp32_task_vector_with_ties(n: int, seed: int) -> torch.Tensor:
    """An fp32 task vector as a fine-tune's: expert minus base, both near 0.02, so that its
    magnitudes are multiples of the base's ulp and a few dozen elements share each value."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=generator) * 0.02
    expert = base + torch.randn(n, generator=generator) * 0.001
    return expert - base


def test_large_fp32_tensors_keep_tied_members_as_torchs_sort_without_sorting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On a tensor of millions of elements (a size where torch could sort otherwise), the
    members of a tied group split by the threshold are those torch's sort keeps, for TIES and
    for breadcrumbs' band, and no tensor is sorted to find them."""

    def no_sort(*args: Any) -> list[torch.Tensor]:
        raise AssertionError("a split tie group was sorted instead of replayed")

    monkeypatch.setattr(selection, "_sorted_top_masks", no_sort)
    x = fp32_task_vector_with_ties(3_000_000, seed=3)
    n = x.numel()
    split = 0
    for density in (0.2, 0.5, 0.7):
        k = int(density * n)
        expected = torch_sort_top_mask(x, k)
        assert torch.equal(selection.top_magnitude_mask(x, k), expected), density
        threshold = x.abs()[expected].min()
        split += int(((x.abs() == threshold) & ~expected).any())
        dropped = int(0.01 * n)
        band = sparsification.magnitude_masks_batch("magnitude_outliers", [(x, density, 0.01)])[0]
        expected_band = torch_sort_top_mask(x, k + dropped, ascending=True) ^ torch_sort_top_mask(
            x, dropped, ascending=True
        )
        assert band is not None and torch.equal(band, expected_band), density
    assert split > 0  # the thresholds do split tied groups here


def test_split_ties_fall_back_to_torchs_sort_where_the_replay_does_not_match_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A torch whose CPU sort the replay does not reproduce (another C++ library): the sort."""
    from mergekit.sparsify import magnitude

    monkeypatch.setattr(selection, "_introsort_replays_torch", lambda: False)
    x = fp32_grids(20_000)["13 magnitudes"]
    for density in (0.1, 0.3, 0.77):
        assert torch.equal(sparsify(x, method="magnitude", density=density), magnitude(x, density))


def test_split_ties_fall_back_to_torchs_sort_where_the_introsort_would_heapsort(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """At libstdc++'s depth limit the introsort heapsorts, which the replay does not follow:
    the sort decides there (the replay answers None)."""
    from mergekit.sparsify import magnitude, magnitude_outliers

    monkeypatch.setattr(selection, "_introsort_group_order", lambda keys, value: None)
    x = fp32_grids(20_000)["fine grid"]
    for density in (0.1, 0.5):
        assert torch.equal(sparsify(x, method="magnitude", density=density), magnitude(x, density))
        assert torch.equal(
            sparsify(x, method="magnitude_outliers", density=density, gamma=0.05),
            magnitude_outliers(x, density, gamma=0.05),
        )


def test_nans_of_several_payloads_sort_as_one_value_like_torchs_sort() -> None:
    """torch's comparator holds every NaN equal and above every number; the replay too."""
    x = fp32_grids(20_000)["13 magnitudes"].clone()
    quiet = torch.tensor([0x7FC00000, 0x7FC00001, -0x00400000], dtype=torch.int32)
    x[::97] = quiet.repeat(len(x[::97]) // 3 + 1)[: len(x[::97])].view(torch.float32)
    for density in (0.1, 0.3, 0.77):
        k = int(density * x.numel())
        assert torch.equal(selection.top_magnitude_mask(x, k), torch_sort_top_mask(x, k))


_skip_without_kernels = pytest.mark.skipif(
    not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
    reason="the Triton kernels need a CUDA device or TRITON_INTERPRET=1",
)


def needs_kernels(test: Callable[..., None]) -> Callable[..., None]:
    """A test of the Triton kernels: marked ``kernels`` (what test_triton_interpreter runs
    under the interpreter) and skipped without a CUDA device or ``TRITON_INTERPRET=1``."""
    return pytest.mark.kernels(_skip_without_kernels(test))


with_one_place = pytest.mark.parametrize(
    ("dtype", "ulp"), [(torch.bfloat16, 2**-7), (torch.float16, 2**-10), (torch.float32, 2**-22)]
)
"""Each dtype the kernels take, with one place of it at 1."""


@pytest.fixture
def kernel_device(monkeypatch: pytest.MonkeyPatch) -> str:
    """Where the Triton kernels run: CUDA, or the CPU under the interpreter, where plans are
    then made as on a GPU."""
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        return "cuda"
    from mergeopt.merge import plan as plan_module
    from mergeopt.merge import triton_kernels

    monkeypatch.setattr(plan_module, "triton_on", lambda *args, **kwargs: triton_kernels)
    return "cpu"


def binomial_bound(n: int, p: float, sigmas: float = 5.0) -> float:
    return sigmas * math.sqrt(p * (1 - p) / n)


@pytest.mark.parametrize("density", [0.1, 0.5, 0.9])
def test_dare_keeps_a_binomial_fraction_and_rescales_the_l1_norm(density: float) -> None:
    delta = torch.randn(200, 500, generator=torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(1)
    kept = sparsify(delta, method="random", density=density, rescale=True, generator=generator)
    fraction = (kept != 0).float().mean().item()
    assert abs(fraction - density) < binomial_bound(delta.numel(), density)
    assert kept.abs().sum().item() == pytest.approx(delta.abs().sum().item(), rel=1e-5)
    unscaled = sparsify(delta, method="random", density=density, generator=generator)
    assert torch.equal(unscaled[unscaled != 0], delta[unscaled != 0])


def test_dare_rescale_matches_mergekit_rule() -> None:
    from mergekit.sparsify import rescaled_masked_tensor

    delta = torch.randn(64, 64, generator=torch.Generator().manual_seed(2))
    kept = sparsify(
        delta,
        method="random",
        density=0.4,
        rescale=True,
        generator=torch.Generator().manual_seed(3),
    )
    mask = (kept != 0).to(delta.dtype)
    expected = rescaled_masked_tensor(delta, mask, norm="l1")
    assert torch.allclose(kept, expected, rtol=1e-6, atol=0)


def test_della_keep_probability_grows_with_magnitude_rank() -> None:
    density, epsilon = 0.5, 0.2
    rows = torch.randn(4000, 100, generator=torch.Generator().manual_seed(4))
    kept = sparsify(
        rows,
        method="della_magprune",
        density=density,
        epsilon=epsilon,
        generator=torch.Generator().manual_seed(5),
    )
    ranks = rows.abs().argsort(dim=1).argsort(dim=1)
    smallest = (kept[ranks == 0] != 0).float().mean().item()
    largest = (kept[ranks == 99] != 0).float().mean().item()
    overall = (kept != 0).float().mean().item()
    assert abs(smallest - (density - epsilon)) < binomial_bound(4000, density - epsilon)
    assert abs(largest - (density + epsilon)) < binomial_bound(4000, density + epsilon)
    assert abs(overall - density) < binomial_bound(rows.numel(), density)
    with pytest.raises(ValueError, match="epsilon"):
        sparsify(rows, method="della_magprune", density=0.9, epsilon=0.15)


@pytest.mark.parametrize(
    "method", ["task_arithmetic", "ties", "dare_ties", "breadcrumbs_ties", "della", "della_linear"]
)
def test_the_cpu_merge_in_chunks_equals_the_merge_in_one_pass(
    method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mergeopt.merge import methods

    generator = torch.Generator().manual_seed(14)
    base = torch.randn(70, 130, generator=generator) * 0.02
    task_vectors = torch.randn(3, 70, 130, generator=generator) * 0.002
    task_vectors[1, :5] = 0  # zero deltas: signs and divisors of zero
    known = METHODS[method].expert_defaults
    params = [
        {k: v for k, v in p.items() if k in known}
        for p in (
            {"weight": 0.6, "density": 0.5, "gamma": 0.05, "epsilon": 0.1},
            {"weight": -0.3, "density": 0.7, "gamma": 0.05, "epsilon": 0.1},
            {"weight": 0.45, "density": 1.0, "gamma": 0.05, "epsilon": 0.1},
        )
    ]
    for method_params in ({}, {"lambda": 0.7, "normalize": True}, {"normalize": False}):
        merged = []
        for chunk in (1 << 30, 1000):  # one pass; 10 chunks, the last one short
            monkeypatch.setattr(methods, "_CPU_CHUNK", chunk)
            merged.append(
                generalized_task_arithmetic(
                    base,
                    task_vectors,
                    method=METHODS[method],
                    expert_params=params,
                    method_params=method_params,
                    generator=torch.Generator().manual_seed(2),
                )
            )
        assert torch.equal(merged[0], merged[1]), method_params


@pytest.mark.parametrize("method", ["dare_ties", "dare_linear", "della", "della_linear"])
def test_random_methods_are_reproducible_per_generator(method: str) -> None:
    base = torch.randn(32, 48, generator=torch.Generator().manual_seed(6))
    task_vectors = torch.randn(2, 32, 48, generator=torch.Generator().manual_seed(7)) * 0.1
    params = [{"weight": 0.5, "density": 0.5}, {"weight": 0.7, "density": 0.4}]

    def merged(seed: int) -> torch.Tensor:
        return generalized_task_arithmetic(
            base,
            task_vectors,
            method=METHODS[method],
            expert_params=params,
            method_params={},
            generator=torch.Generator().manual_seed(seed),
        )

    assert torch.equal(merged(1), merged(1))
    assert not torch.equal(merged(1), merged(2))


def test_method_table_matches_mergekit_defaults() -> None:
    from mergekit.merge_methods import registry

    for name, merge_method in METHODS.items():
        theirs = {p.name: p for p in registry.get(name).spec.parameters}
        for key, default in {
            **merge_method.global_defaults,
            **merge_method.expert_defaults,
        }.items():
            if key == "t" and name in ("slerp", "nearswap"):  # required: the value only types it
                assert theirs[key].required, (name, key)
                continue
            assert key in theirs, (name, key)
            if (name, key) == ("passthrough", "scale"):  # mergekit's None: no scaling, ours 1.0
                assert theirs[key].default is None and default == 1.0
                continue
            if default is None:
                assert theirs[key].required, (name, key)
            else:
                assert theirs[key].default == default, (name, key)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("method", ["ties", "dare_ties", "breadcrumbs", "della_linear"])
def test_fused_gta_kernel_equals_the_torch_path(method: str, dtype: torch.dtype) -> None:
    pytest.importorskip("triton")
    from mergeopt.merge import triton_kernels

    device = "cuda" if torch.cuda.is_available() else "cpu"
    generator = torch.Generator().manual_seed(12)
    base = (torch.randn(37, 53, generator=generator) * 0.02).to(dtype)
    experts = [base.float() + torch.randn(37, 53, generator=generator) * 0.002 for _ in range(3)]
    task_vectors = (torch.stack([e.to(dtype) for e in experts]) - base).to(device)
    base = base.to(device)
    merge_method = METHODS[method]
    params = [
        {"weight": 0.6, "density": 0.5, "gamma": 0.05, "epsilon": 0.1},
        {"weight": -0.3, "density": 0.7, "gamma": 0.05, "epsilon": 0.1},
        {"weight": 0.45, "density": 1.0, "gamma": 0.05, "epsilon": 0.1},
    ]
    params = [{k: v for k, v in p.items() if k in merge_method.expert_defaults} for p in params]
    for method_params in ({}, {"lambda": 0.7, "normalize": True}):
        merged = {}
        for fused in (True, False):
            masks = sparsification.expert_masks(
                merge_method.sparsification,
                task_vectors,
                [{**merge_method.expert_defaults, **p} for p in params],
                torch.Generator(device=device).manual_seed(1),
            )
            if fused and device == "cpu":  # the interpreter: call the kernel directly
                options = {**merge_method.global_defaults, **method_params}
                weights = sparsification._coefficients((0.6, -0.3, 0.45), dtype, base.device)
                stacked = sparsification._stack_masks(masks, base)
                norms = None
                if options["rescale"]:  # mergekit's abs().sum(), as the torch path
                    kept = torch.where(stacked, task_vectors, 0)
                    norms = torch.stack(
                        [
                            torch.stack([tv.abs().sum() for tv in task_vectors]),
                            torch.stack([tv.abs().sum() for tv in kept]),
                        ]
                    )
                merged[fused] = triton_kernels.gta_combine(
                    base,
                    task_vectors,
                    stacked,
                    norms,
                    weights,
                    consensus=merge_method.consensus == "sum",
                    normalize=bool(options["normalize"]),
                    lam=float(options["lambda"]),
                )
            else:  # the fused route (a plan with the kernels) or the torch reference
                plan = MergePlan.build(
                    merge_method,
                    device=base.device,
                    dtype=dtype,
                    exact=True,
                    switches=Switches(fused=fused),
                )
                merged[fused] = plan.merge_tensor(
                    base, task_vectors, params, method_params, masks=masks
                )
        options = {**merge_method.global_defaults, **method_params}
        if device == "cuda" and dtype == torch.float32 and options.get("rescale"):
            # on a GPU the L1 norms' fp32 sums run in the kernel's order (``l1_norms``): the
            # rescale factor, hence a merged value, may differ in its last fp32 places
            scale = float(merged[False].abs().max())
            assert torch.allclose(merged[True], merged[False], rtol=0, atol=2**-20 * scale)
        else:
            assert torch.equal(merged[True], merged[False]), method_params


@needs_kernels
@pytest.mark.parametrize("with_base", [True, False])
def test_one_launch_block_sum_equals_the_per_tensor_kernel(with_base: bool) -> None:
    pytest.importorskip("triton")
    from mergeopt.merge import triton_kernels

    device = "cuda" if torch.cuda.is_available() else "cpu"
    generator = torch.Generator().manual_seed(13)
    shapes = [(64, 48), (5000,), (7,), (3, 2049)]
    stacks = [torch.randn(2, *s, generator=generator).bfloat16().to(device) for s in shapes]
    bases = [torch.randn(s, generator=generator).bfloat16().to(device) for s in shapes]
    coefficients = sparsification._coefficients((0.6, -0.25), torch.bfloat16, torch.device(device))
    outs = [torch.full(s, float("nan"), dtype=torch.bfloat16, device=device) for s in shapes]
    triton_kernels.weighted_sum_many(
        [(b if with_base else None, x, o) for b, x, o in zip(bases, stacks, outs, strict=True)],
        coefficients,
        scale=0.8,
    )
    for base, stack, out in zip(bases, stacks, outs, strict=True):
        alone = triton_kernels.weighted_sum(
            stack,
            coefficients,
            scale=0.8,
            base=base if with_base else None,
            out=torch.empty_like(out),
        )
        assert torch.equal(out, alone)


@needs_kernels
@with_one_place
def test_fused_slerp_of_a_block_is_the_torch_slerp_within_one_last_place(
    dtype: torch.dtype, ulp: float
) -> None:
    pytest.importorskip("triton")
    from mergeopt.merge import triton_kernels
    from mergeopt.merge.geometric import slerp, slerp_pair_coefficients

    device = "cuda" if torch.cuda.is_available() else "cpu"
    generator = torch.Generator().manual_seed(14)
    shapes = [(64, 48), (5000,), (7,), (3, 2049), (2, 1500)]
    v0s = [torch.randn(s, generator=generator) * 0.02 for s in shapes]
    v1s = [v0 + torch.randn(v0.shape, generator=generator) * 0.02 for v0 in v0s]
    v1s[1] = v0s[1] * 1.001  # nearly parallel: the lerp branch
    v0s[2] = torch.zeros(shapes[2])  # a zero tensor: its norm taken as 1
    v1s[4] = -v0s[4] + torch.randn(shapes[4], generator=generator) * 1e-3  # nearly opposite
    pairs = [
        (a.to(dtype).to(device), b.to(dtype).to(device)) for a, b in zip(v0s, v1s, strict=True)
    ]
    for t in (0.3, 0.0, 1.0):
        outs = [torch.full_like(a, float("nan")) for a, _ in pairs]
        items = [(a, b, o, None) for (a, b), o in zip(pairs, outs, strict=True)]
        triton_kernels.pair_combine(
            items, slerp_pair_coefficients(t, triton_kernels.pair_sums(items))
        )
        differing = 0
        for index, ((a, b), out) in enumerate(zip(pairs, outs, strict=True)):
            torch_path = slerp(t, a, b).double()
            exact = slerp(t, a.double(), b.double())
            # no less accurate than the torch path, give or take one place of the storage
            # dtype at the inputs' scale (its cosine comes from fp64 sums instead)
            place = ulp * float(torch.maximum(a.double().abs(), b.double().abs()).max())
            error = float((out.double() - exact).abs().max())
            assert error <= float((torch_path - exact).abs().max()) + place, (t, a.shape)
            if index != 4:  # nearly opposite tensors are ill-conditioned on either path
                differing += int((out.double() != torch_path).sum())
        if dtype != torch.float32:  # elsewhere nearly every value is the same bits
            assert differing <= 0.001 * sum(a.numel() for a, _ in pairs), (t, differing)


def _karcher_sets() -> list[list[torch.Tensor]]:
    """Sets of tensors (fp64) that take the Karcher mean's branches: apart, nearly parallel,
    one zero tensor, three directions, all zero, nearly opposite."""
    generator = torch.Generator().manual_seed(15)
    a, b, c = (torch.randn(300, generator=generator, dtype=torch.float64) for _ in range(3))
    return [
        [a, b * 3],
        [a, a * 2 + b * 1e-6],
        [torch.zeros(300, dtype=torch.float64), b],
        [a, b * 0.5, c * 2],
        [torch.zeros(300, dtype=torch.float64)] * 2,
        [a, -a + b * 1e-3],  # the sums cancel in the rules: fp32 tile sums lost the angle
    ]


@pytest.mark.parametrize("alphas", [None, (0.2, 0.5, 0.3)])
def test_karcher_coefficients_from_the_gram_matrix_give_the_karcher_mean(
    alphas: tuple[float, ...] | None,
) -> None:
    from mergeopt.merge.geometric import karcher, karcher_coefficients

    for tensors in _karcher_sets():
        weights = list(alphas or [1 / len(tensors)] * len(tensors))[: len(tensors)]
        stacked = torch.stack(tensors)
        gram = (stacked @ stacked.T).unsqueeze(0)
        coefficients = karcher_coefficients(gram, weights, max_iter=10, tol=1e-5)[0]
        expected = karcher(tensors, weights, max_iter=10, tol=1e-5)
        got = (coefficients.unsqueeze(1) * stacked).sum(0)
        # relative to the largest value: nearly opposite tensors cancel in the Gram matrix
        error = float((got - expected).abs().max()) / max(float(expected.abs().max()), 1e-300)
        assert error < 1e-9, (len(tensors), weights)


def test_multislerp_and_model_stock_coefficients_from_the_gram_matrix_give_their_merge() -> None:
    from mergeopt.merge.geometric import (
        model_stock,
        model_stock_coefficients,
        multislerp,
        multislerp_coefficients,
    )

    generator = torch.Generator().manual_seed(16)
    base = torch.randn(300, generator=generator, dtype=torch.float64)
    for tensors in _karcher_sets()[:4]:
        stacked = torch.stack(tensors)
        gram = (stacked @ stacked.T).unsqueeze(0)
        models = stacked + base
        for weights in ([0.5] * len(tensors), [0.3, 0.9, 0.2][: len(tensors)]):
            for normalize in (True, False):
                coefficients = multislerp_coefficients(
                    gram, weights, normalize_weights=normalize, eps=1e-8
                )[0]
                expected = multislerp(base, models, weights, normalize_weights=normalize, eps=1e-8)
                got = base + (coefficients.unsqueeze(1) * stacked).sum(0)
                assert torch.allclose(got, expected, rtol=1e-9, atol=1e-12), (weights, normalize)
        coefficients = model_stock_coefficients(gram)[0]
        expected = model_stock(base, list(models), filter_wise=False)
        got = base + (coefficients.unsqueeze(1) * stacked).sum(0)
        assert torch.allclose(got, expected, rtol=1e-9, atol=1e-12), len(tensors)


@needs_kernels
@with_one_place
@pytest.mark.parametrize("method", ["karcher", "multislerp", "model_stock"])
def test_a_fused_pair_merge_of_a_block_is_no_less_accurate_than_the_torch_path(
    method: str, dtype: torch.dtype, ulp: float, kernel_device: str
) -> None:
    from mergeopt.merge.methods import TensorMerge

    device = kernel_device
    merge_method = METHODS[method]
    fused_plan, torch_plan = (
        MergePlan.build(merge_method, device=torch.device(device), dtype=dtype, exact=exact)
        for exact in (False, True)
    )
    assert fused_plan.pair is not None and torch_plan.pair is None
    generator = torch.Generator().manual_seed(17)
    sets = [s[:2] for s in _karcher_sets()]
    bases = [torch.randn(300, generator=generator, dtype=torch.float64) for _ in sets]
    if not merge_method.base_input:
        bases = [torch.zeros(300, dtype=torch.float64)] * len(sets)
    stacks = [
        ((torch.stack(s) + b) * 0.02).to(dtype).to(device) for s, b in zip(sets, bases, strict=True)
    ]
    base_tensors = [(b * 0.02).to(dtype).to(device) for b in bases]
    tensors = [
        (f"w{i}", base if merge_method.base_input else None, stack, None)
        for i, (base, stack) in enumerate(zip(base_tensors, stacks, strict=True))
    ]
    experts = (
        [{"weight": 0.7}, {"weight": 0.4}] if "weight" in merge_method.expert_defaults else [{}, {}]
    )
    merged = fused_plan.merge_block(tensors, experts, {}, seed=0).tensors
    assert [name for name, _ in merged] == [name for name, *_ in tensors]
    for (name, result), (_, base, stack, _) in zip(merged, tensors, strict=True):
        assert result.dtype == dtype and result.shape == stack[0].shape
        full = [{**merge_method.expert_defaults, **e} for e in experts]
        params = dict(merge_method.global_defaults)
        inputs = TensorMerge(None if base is None else base.double(), stack.double(), full, params)
        exact = merge_method.math(merge_method, inputs)
        torch_path = torch_plan.merge_tensor(base, stack, experts, {}).double()
        place = ulp * float(stack.double().abs().max())
        error = float((result.double() - exact).abs().max())
        torch_error = float((torch_path - exact).abs().max())
        if math.isnan(torch_error):  # fp16 multislerp: its eps rounds to 0, a zero vector's 0/0
            torch_error = 0.0
        assert error <= torch_error + place, name
    if method == "model_stock":  # per row: not a pair of sums, the torch path
        _, base, stack, _ = tensors[0]
        rows = {"filter_wise": True}
        assert torch.equal(
            fused_plan.merge_tensor(base.view(15, 20), stack.view(2, 15, 20), experts, rows),
            torch_plan.merge_tensor(base.view(15, 20), stack.view(2, 15, 20), experts, rows),
        )


@needs_kernels
@with_one_place
def test_sce_in_the_fused_gta_kernel_is_no_less_accurate_than_the_torch_path(
    dtype: torch.dtype, ulp: float, kernel_device: str
) -> None:
    from mergeopt.merge.methods import TensorMerge

    device = kernel_device
    sce = METHODS["sce"]
    fused_plan, torch_plan = (
        MergePlan.build(sce, device=torch.device(device), dtype=dtype, exact=exact)
        for exact in (False, True)
    )
    assert fused_plan.data_weighted is not None and torch_plan.data_weighted is None
    generator = torch.Generator().manual_seed(18)
    base = torch.randn(40, 70, generator=generator, dtype=torch.float64) * 0.02
    for scales in ((1.0, 1.0, 1.0), (1.0, 3.0, 0.2), (1e-5, 1e-5, 1e-5)):
        stack = torch.stack(
            [
                torch.randn(40, 70, generator=generator, dtype=torch.float64) * s * 0.002
                for s in scales
            ]
        )
        b, tv = base.to(dtype).to(device), stack.to(dtype).to(device)
        params = dict(sce.global_defaults)
        fused = fused_plan.merge_tensor(b, tv, [{}] * 3, {})
        torch_path = torch_plan.merge_tensor(b, tv, [{}] * 3, {}).double()
        exact = sce.math(sce, TensorMerge(b.double(), tv.double(), [{}] * 3, params))
        place = ulp * float(b.double().abs().max())
        error = float((fused.double() - exact).abs().max())
        assert error <= float((torch_path - exact).abs().max()) + place, scales
    # the divisor's floor is 1e-6 in the dtype, as mergekit's clamp: where only a tiny
    # weight agrees, the floor decides the value
    if dtype == torch.float16:
        small = torch.zeros(2, 64, dtype=dtype, device=device)
        small[0, :32], small[1, 32:] = 250, torch.linspace(0.1, 0.3, 32)
        zero = torch.zeros(64, dtype=dtype, device=device)
        assert torch.equal(
            fused_plan.merge_tensor(zero, small, [{}] * 2, {}),
            torch_plan.merge_tensor(zero, small, [{}] * 2, {}),
        )
    # select_topk under 1 takes the torch path
    topk = fused_plan.merge_tensor(b, tv, [{}] * 3, {"select_topk": 0.5})
    assert torch.equal(topk, torch_plan.merge_tensor(b, tv, [{}] * 3, {"select_topk": 0.5}))


@needs_kernels
@with_one_place
@pytest.mark.parametrize("method", ["ram", "ramplus_tl"])
def test_ram_in_its_fused_kernel_equals_the_torch_path(
    method: str, dtype: torch.dtype, ulp: float, kernel_device: str
) -> None:
    device = torch.device(kernel_device)
    merge_method = METHODS[method]
    fused_plan, torch_plan = (
        MergePlan.build(merge_method, device=device, dtype=dtype, exact=exact)
        for exact in (False, True)
    )
    assert fused_plan.fused is not None and torch_plan.fused is None
    generator = torch.Generator().manual_seed(19)
    base = (torch.randn(41, 67, generator=generator) * 0.02).to(dtype).to(device)
    # changes around epsilon (1e-5), so that elements are changed by none, one or several
    # experts; some exactly at epsilon and at the dtype's epsilon
    deltas = torch.randn(3, 41, 67, generator=generator) * 2e-5
    deltas.view(-1)[:40] = 1e-5
    deltas.view(-1)[40:80] = float(torch.tensor(1e-5, dtype=dtype))
    stack = deltas.to(dtype).to(device)
    for count in (2, 3):
        for params in ({}, {"epsilon": 3e-5}, {"r": 0.5, "alpha": 0.9, "epsilon": 0.0}):
            if method == "ram" and "r" in params:
                continue
            fused = fused_plan.merge_tensor(base, stack[:count], [{}] * count, params)
            expected = torch_plan.merge_tensor(base, stack[:count], [{}] * count, params)
            assert fused.dtype == dtype
            assert torch.equal(fused, expected.to(dtype)), (count, params)


@needs_kernels
@with_one_place
def test_arcee_fusion_in_its_fused_kernels_equals_the_torch_path_given_its_divergences(
    dtype: torch.dtype, ulp: float, kernel_device: str
) -> None:
    from mergeopt.merge import triton_kernels
    from mergeopt.merge.selective import (
        QUANTILE_SAMPLE,
        arcee_divergence,
        arcee_fusion,
        fused_arcee_fusion,
    )

    device = torch.device(kernel_device)
    generator = torch.Generator().manual_seed(20)
    shape = (501, QUANTILE_SAMPLE // 500 + 7)  # over the sample size: quartiles from a sample
    base = (torch.randn(shape, generator=generator) * 0.02).to(dtype)
    expert = (base.float() + torch.randn(shape, generator=generator) * 0.01).to(dtype)
    base, expert = base.to(device), expert.to(device)
    divergence = arcee_divergence(base, expert)
    expected = arcee_fusion(base, expert, torch.Generator(device=device).manual_seed(3))
    fused = fused_arcee_fusion(
        triton_kernels,
        base,
        expert,
        torch.Generator(device=device).manual_seed(3),
        divergence=divergence,
    )
    assert fused is not None and fused.dtype == dtype
    assert torch.equal(fused, expected.to(dtype))
    # the kernel's own divergences against fp64: in 16-bit dtypes no further than mergekit's
    # operations, give or take a place; in fp32 both lose digits to the cancellation of the
    # sum's terms, the kernel's fast exp and log somewhat more (H200: 2.3e-7 against 1.7e-7)
    reference = arcee_divergence(base.double(), expert.double())
    ours = triton_kernels.row_divergence(base, expert).double()
    place = ulp * float(reference.abs().max())
    theirs = float((divergence.double() - reference).abs().max())
    bound = 2 * theirs if dtype == torch.float32 else theirs + place
    assert float((ours - reference).abs().max()) <= bound
    # at most a million elements (every importance sorted): the torch path
    small = base[:10].contiguous()
    assert fused_arcee_fusion(triton_kernels, small, expert[:10].contiguous(), None) is None


def test_plans_route_ram_and_arcee_fusion_through_their_fused_kernels_only_when_not_exact() -> None:
    for name in ("ram", "ramplus_tl", "arcee_fusion"):
        for exact in (False, True):
            plan = MergePlan.build(
                METHODS[name], device=torch.device("cpu"), dtype=torch.float32, exact=exact
            )
            assert plan.fused is None  # no kernels on the CPU
    assert METHODS["ram"].fused_math is not None and METHODS["ties"].fused_math is None


@pytest.fixture
def triton_selection(monkeypatch: pytest.MonkeyPatch) -> None:
    """Route 16-bit top-k selections through the Triton passes (on the CPU: the interpreter)
    with a sample smaller than the tensors. Its tests are ``needs_kernels`` ones."""
    pytest.importorskip("triton")
    from mergeopt.merge import triton_kernels

    def kernels_for(x: torch.Tensor) -> object | None:
        return triton_kernels if triton_kernels.select_supported(x) else None

    monkeypatch.setattr(selection, "_select_kernels", kernels_for)
    monkeypatch.setattr(selection, "_SORT_BELOW", 0)
    monkeypatch.setattr(selection, "_SAMPLE_SIZE", 4096)
    selection._sample_positions.cache_clear()


def on_device(x: torch.Tensor) -> torch.Tensor:
    return x.cuda() if torch.cuda.is_available() else x


@needs_kernels
@pytest.mark.parametrize("kind", ["bf16 task vector", "four values", "all zero", "mostly zero"])
def test_triton_select_equals_a_stable_sort_on_tie_heavy_inputs(
    kind: str, triton_selection: None, radix_fallbacks: list[int]
) -> None:
    for dtype in (torch.bfloat16, torch.float16):
        x = tie_heavy_inputs(20_000)[kind].to(dtype)
        n = x.numel()
        ks = [1, 2, 200, 5_000, n // 2, int(0.51 * n), 19_000, n - 1]
        masks = selection.top_magnitude_masks(on_device(x), ks)
        for k, mask in zip(ks, masks, strict=True):
            assert torch.equal(mask.cpu(), reference_top_mask(x, k)), (kind, dtype, k)
        if kind == "bf16 task vector" and dtype == torch.bfloat16:
            # a smooth distribution: the window holds the thresholds (the sample is small here:
            # the 95th percentile is 128 keys above its bracket, past the 127-key window)
            assert set(radix_fallbacks) <= {19_000}, radix_fallbacks


@needs_kernels
def test_triton_select_spans_tiles_and_breadcrumbs_bands(triton_selection: None) -> None:
    # 3 tiles of 8192: the ties at the threshold are ranked across tile boundaries
    x = (torch.randint(-3, 4, (20_000,), generator=torch.Generator().manual_seed(4))).bfloat16()
    n = x.numel()
    for density, gamma in ((0.3, 0.05), (0.5, 0.2), (0.01, 0.01)):
        mask = sparsification.magnitude_masks_batch(
            "magnitude_outliers", [(on_device(x), density, gamma)]
        )
        dropped = int(gamma * n)
        band = reference_top_mask(x, dropped + int(density * n)) ^ reference_top_mask(x, dropped)
        assert mask[0] is not None and torch.equal(mask[0].cpu(), band), (density, gamma)


@needs_kernels
def test_one_triton_launch_per_pass_selects_for_many_tensors_at_once(
    triton_selection: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mergeopt.merge import triton_kernels

    launches: list[int] = []
    many = triton_kernels.top_select_many

    def counted(items, *args, **kwargs):  # type: ignore[no-untyped-def]
        launches.append(len(items))
        return many(items, *args, **kwargs)

    monkeypatch.setattr(triton_kernels, "top_select_many", counted)
    generator = torch.Generator().manual_seed(6)
    # a block's weights for two experts: different sizes, tile counts and tie structures
    deltas = [
        (torch.randn(2, 90, 130, generator=generator) * 0.01).bfloat16(),
        torch.randint(-2, 3, (2, 17_000), generator=generator).bfloat16(),
        (torch.randn(2, 5, 40, generator=generator) * 0.01).bfloat16(),
    ]
    stacked = [on_device(torch.empty(d.shape, dtype=torch.bool)) for d in deltas]
    items = [
        (on_device(d[i]), density, 0.02)
        for d, density in zip(deltas, (0.3, 0.5, 0.9), strict=True)
        for i in range(2)
    ]
    outs = [rows[i] for rows in stacked for i in range(2)]
    for method in ("magnitude", "magnitude_outliers"):
        masks = sparsification.magnitude_masks_batch(method, items, outs=outs)
        for (delta, density, gamma), mask, out in zip(items, masks, outs, strict=True):
            n = delta.numel()
            if method == "magnitude":
                expected = reference_top_mask(delta.cpu(), int(density * n))
            else:
                dropped = int(gamma * n)
                expected = reference_top_mask(
                    delta.cpu(), dropped + int(density * n)
                ) ^ reference_top_mask(delta.cpu(), dropped)
            assert mask is not None and torch.equal(mask.cpu(), expected), (method, n)
            assert mask.data_ptr() == out.data_ptr()  # written in place
        for tensor_index, rows in enumerate(stacked):
            pair = masks[2 * tensor_index : 2 * tensor_index + 2]
            assert (
                sparsification._stack_masks(pair, rows[0]) is rows
            )  # the fused merge copies nothing
    # one call per method for the tensors with a full sample, one for the small one
    assert sorted(launches) == [2, 2, 4, 4]


@needs_kernels
def test_a_missed_triton_window_falls_back_to_the_exact_radix_select(
    triton_selection: None, monkeypatch: pytest.MonkeyPatch, radix_fallbacks: list[int]
) -> None:
    from mergeopt.merge import triton_kernels

    # a two-bin window (one key, then "above") misses wherever the threshold is not lo itself
    monkeypatch.setattr(triton_kernels, "SELECT_BINS", 2)
    x = (torch.randn(20_000, generator=torch.Generator().manual_seed(5)) * 0.02).bfloat16()
    for k in (7, 10_000, 19_993):
        assert torch.equal(top_magnitude_mask(on_device(x), k).cpu(), reference_top_mask(x, k))
    band = sparsification.magnitude_masks_batch("magnitude_outliers", [(on_device(x), 0.3, 0.05)])[
        0
    ]
    expected = reference_top_mask(x, 7000) ^ reference_top_mask(x, 1000)
    assert band is not None and torch.equal(band.cpu(), expected)
    assert 10_000 in radix_fallbacks and 7000 in radix_fallbacks


@needs_kernels
def test_dare_masks_drawn_in_the_kernels_are_binomial_reproducible_and_shared(
    triton_selection: None,
) -> None:
    """On the GPU the kernels draw DARE's masks themselves (Philox); the L1 pass and the merge
    must draw the same mask, the one ``draw_masks`` writes out."""
    from mergeopt.merge import triton_kernels

    generator = torch.Generator().manual_seed(15)
    base = on_device((torch.randn(70, 300, generator=generator) * 0.02).bfloat16())
    task_vectors = on_device((torch.randn(2, 70, 300, generator=generator) * 0.002).bfloat16())
    device = base.device
    n = base.numel()
    densities = (0.3, 0.8)
    draws = triton_kernels.DrawnMasks(
        seed=1234, densities=sparsification._coefficients(densities, torch.float32, device)
    )
    masks = triton_kernels.draw_masks(base.shape, draws, device)
    for row, density in enumerate(densities):
        kept = float(masks[row].float().mean())
        assert abs(kept - density) < 6 * (density * (1 - density) / n) ** 0.5
    assert torch.equal(triton_kernels.draw_masks(base.shape, draws, device), masks)
    other = triton_kernels.DrawnMasks(seed=1235, densities=draws.densities)
    assert not torch.equal(triton_kernels.draw_masks(base.shape, other, device), masks)

    norms = triton_kernels.l1_norms(task_vectors, None, draws=draws)
    assert torch.equal(norms, triton_kernels.l1_norms(task_vectors, masks))
    weights = sparsification._coefficients((0.6, 0.4), torch.bfloat16, device)
    for consensus in (True, False):
        options = {"consensus": consensus, "normalize": consensus, "lam": 1.0}
        drawn = triton_kernels.gta_combine(
            base, task_vectors, None, norms, weights, draws=draws, **options
        )
        given = triton_kernels.gta_combine(base, task_vectors, masks, norms, weights, **options)
        assert torch.equal(drawn, given), consensus


@needs_kernels
def test_one_pass_l1_norms_match_vector_norm(triton_selection: None) -> None:
    from mergeopt.merge import triton_kernels

    generator = torch.Generator().manual_seed(14)
    task_vectors = on_device((torch.randn(3, 130, 170, generator=generator) * 0.01).bfloat16())
    masks = on_device(torch.rand(3, 130, 170, generator=generator) < 0.4)
    masks[2] = True  # an expert keeping everything: both norms equal, its factor exactly 1
    norms = triton_kernels.l1_norms(task_vectors, masks)
    rows = task_vectors.view(3, -1).float()
    expected = torch.stack(
        [rows.abs().sum(1), torch.where(masks.view(3, -1), rows, 0).abs().sum(1)]
    ).to(torch.bfloat16)
    assert norms.dtype == torch.bfloat16
    assert torch.allclose(norms.float(), expected.float(), rtol=1e-2)
    assert norms[0, 2] == norms[1, 2]
