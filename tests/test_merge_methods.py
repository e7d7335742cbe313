"""The merge math: exact magnitude selection, random sparsification statistics, quirks."""

from __future__ import annotations

import math

import pytest
import torch

from mergeopt.merge import methods
from mergeopt.merge.methods import (
    METHODS,
    generalized_task_arithmetic,
    sparsify,
    top_magnitude_mask,
)


def reference_top_mask(x: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k by |x| with ties kept in index order (stable sort)."""
    order = torch.sort(x.abs().float().reshape(-1), descending=True, stable=True).indices
    mask = torch.zeros(x.numel(), dtype=torch.bool)
    mask[order[:k]] = True
    return mask.view(x.shape)


@pytest.fixture(params=["histogram", "sort"])
def selection_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test through the radix-histogram path and through the small-tensor sort path."""
    monkeypatch.setattr(methods, "_SORT_BELOW", 0 if request.param == "histogram" else 1 << 30)
    return request.param


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


def test_breadcrumbs_quirks_follow_mergekit() -> None:
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


@pytest.mark.parametrize("method", ["dare_ties", "dare_linear", "della", "della_linear"])
def test_random_methods_are_reproducible_per_generator(method: str) -> None:
    base = torch.randn(32, 48, generator=torch.Generator().manual_seed(6))
    task_vectors = torch.randn(2, 32, 48, generator=torch.Generator().manual_seed(7)) * 0.1
    params = [{"weight": 0.5, "density": 0.5}, {"weight": 0.7, "density": 0.4}]

    def merged(seed: int) -> torch.Tensor:
        return generalized_task_arithmetic(
            base,
            task_vectors,
            spec=METHODS[method],
            expert_params=params,
            method_params={},
            generator=torch.Generator().manual_seed(seed),
        )

    assert torch.equal(merged(1), merged(1))
    assert not torch.equal(merged(1), merged(2))


def test_method_table_matches_mergekit_defaults() -> None:
    from mergekit.merge_methods import registry

    for name, spec in METHODS.items():
        theirs = {p.name: p for p in registry.get(name).spec.parameters}
        for key, default in {**spec.global_defaults, **spec.expert_defaults}.items():
            if key == "t" and name == "slerp":
                continue
            assert key in theirs, (name, key)
            if default is None:
                assert theirs[key].required, (name, key)
            else:
                assert theirs[key].default == default, (name, key)
