"""The merge plan (a method's route, decided once) and the method table's own checks."""

from __future__ import annotations

import pytest
import torch

from mergeopt.errors import UserError
from mergeopt.merge.backend import Switches
from mergeopt.merge.methods import METHODS, MethodParamError, get_method
from mergeopt.merge.plan import MergePlan


def test_switches_are_read_from_the_environment_once_per_plan(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert Switches.from_env({}) == Switches()
    assert Switches.from_env({"MERGEOPT_FUSED_L1": "0", "MERGEOPT_FUSED_DRAWS": "no"}) == (
        Switches(l1=False)
    )
    monkeypatch.setenv("MERGEOPT_FUSED_L1", "0")
    plan = MergePlan.build(
        METHODS["dare_ties"], device=torch.device("cpu"), dtype=torch.float32, exact=True
    )
    monkeypatch.setenv("MERGEOPT_FUSED_L1", "1")
    assert plan.fused_l1 is False  # a built plan keeps what it read


@pytest.mark.parametrize("name", list(METHODS))
@pytest.mark.parametrize("exact", [True, False])
def test_a_cpu_plan_runs_torch_and_the_weighted_sums_only_when_not_exact(
    name: str, exact: bool
) -> None:
    method = METHODS[name]
    plan = MergePlan.build(method, device=torch.device("cpu"), dtype=torch.bfloat16, exact=exact)
    assert plan.kernels is None and plan.gta is None and plan.select is None
    assert not plan.block_launch and not plan.draws
    assert (plan.weighted_sum is not None) == (not exact and name in ("task_arithmetic", "linear"))
    assert plan.block_masks == (method.sparsification in ("magnitude", "magnitude_outliers"))
    # arcee_fusion samples its quartiles from tensors over a million elements
    assert plan.randomized == (name.startswith(("dare", "della")) or name == "arcee_fusion")


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_merges_one_tensor_through_its_plan(name: str) -> None:
    method = METHODS[name]
    generator = torch.Generator().manual_seed(3)
    base = torch.randn(6, 40, generator=generator)
    count = method.max_experts or 2
    stack = torch.randn(count, 6, 40, generator=generator) * 0.1
    values = {"weight": 0.6, "density": 0.5, "gamma": 0.05, "epsilon": 0.1}
    experts = [{k: v for k, v in values.items() if k in method.expert_defaults}] * count
    plan = MergePlan.build(method, device=torch.device("cpu"), dtype=torch.float32, exact=True)
    merged = plan.merge_tensor(
        base if method.base_input else None,
        stack,
        experts,
        {},
        generator=torch.Generator().manual_seed(1),
    )
    assert merged.shape == base.shape and merged.dtype == base.dtype
    assert torch.isfinite(merged).all()


def test_parameter_errors_are_one_line_user_errors_naming_the_field() -> None:
    ties = get_method("ties")
    with pytest.raises(MethodParamError) as caught:
        ties.check_method_params({"temperature": 1.0}, "merge.parameters")
    assert isinstance(caught.value, UserError) and isinstance(caught.value, ValueError)
    message = str(caught.value)
    assert "\n" not in message and message.startswith("merge.parameters.temperature: ")
    with pytest.raises(MethodParamError, match=r"'weight' is required by ties"):
        ties.check_expert_params({"density": 0.5}, "block 0 expert 0")
    with pytest.raises(MethodParamError, match="unknown per-expert parameter 'gamma'"):
        ties.check_expert_params({"weight": 1.0, "gamma": 0.1}, "block 0 expert 0")
    with pytest.raises(MethodParamError, match="unknown merge method 'rem'"):
        get_method("rem", "merge.method")
    slerp = get_method("slerp")
    slerp.check_expert_params({"t": 0.3}, "block 0 expert 0")  # an override, per tensor
    with pytest.raises(MethodParamError, match="'t' is required by slerp"):
        slerp.check_required({}, "config", overrides=True)
    with pytest.raises(MethodParamError, match="at most 1 expert"):
        slerp.check_experts(2, "models.experts")
