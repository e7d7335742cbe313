"""Which backend a merge may use: the Triton kernels (CUDA with Triton importable) and the
environment switches that turn parts of them off.

The switches exist so that ``scripts/bench_merge.py`` can time variants on a GPU; a
:class:`~mergeopt.merge.plan.MergePlan` reads them once, when it is built:

- ``MERGEOPT_FUSED=0``: no Triton kernel at all (the torch ops run).
- ``MERGEOPT_FUSED_BLOCK=0``: weighted sums one launch per tensor, not one per block.
- ``MERGEOPT_FUSED_SELECT=0``: top-k masks by the torch bracket, not the Triton passes.
- ``MERGEOPT_FUSED_DRAWS=0``: DARE's masks drawn by torch and stored, not inside the kernels.
- ``MERGEOPT_FUSED_L1=0``: rescale norms by ``vector_norm`` on a masked copy, not one pass.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from types import ModuleType

import torch

_VARIABLES = {
    "fused": "MERGEOPT_FUSED",
    "block": "MERGEOPT_FUSED_BLOCK",
    "select": "MERGEOPT_FUSED_SELECT",
    "draws": "MERGEOPT_FUSED_DRAWS",
    "l1": "MERGEOPT_FUSED_L1",
}


@dataclass(frozen=True)
class Switches:
    """The fast paths a merge may take (all on by default; see the module docstring)."""

    fused: bool = True
    block: bool = True
    select: bool = True
    draws: bool = True
    l1: bool = True

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Switches:
        """The switches as ``env`` (default: ``os.environ``) sets them; any value but ``0``
        leaves a path on."""
        values = os.environ if env is None else env
        return cls(**{field: values.get(name, "1") != "0" for field, name in _VARIABLES.items()})


TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
"""The dtypes the Triton kernels take (``triton_kernels._KIND``)."""


def triton_on(
    device: torch.device, switches: Switches, dtype: torch.dtype | None = None
) -> ModuleType | None:
    """The Triton kernels module when merges on ``device`` (of tensors of ``dtype``, when
    given) may use it, else None."""
    if device.type != "cuda" or not switches.fused:
        return None
    if dtype is not None and dtype not in TRITON_DTYPES:
        return None
    try:
        from mergeopt.merge import triton_kernels
    except ImportError:  # no Triton in this environment: the torch ops run
        return None
    return triton_kernels
