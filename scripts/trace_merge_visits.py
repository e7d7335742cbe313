"""Count how often one trial's merge enters each module of ``mergeopt/merge/`` (issue #12).

Follows a trial as ``TrialRunner.evaluate`` runs it: ``Genome.block_params`` -> one
``MergeEngine.merge`` into the scorer's weights (a ``ModuleTarget`` of the zoo's base model),
under ``sys.setprofile``. A *visit* of a module is a call of one of its functions from code
outside that module; per merge route (method x backend) the script prints, for each merge
module, the distinct functions entered that way ("entries") and the number of such calls
("calls", tensors and blocks multiply them). Calls made by Triton's interpreter into a
kernel's jitted helpers are not visits.

Routes: ``torch`` (the CPU engine, mergekit's operation order), ``fast`` (the CPU engine's
one-rounding weighted sums), ``triton`` (the CUDA routes, run on the CPU under Triton's
interpreter: needs ``TRITON_INTERPRET=1`` and triton on ``PYTHONPATH``, e.g.
``.cache/triton-interpreter``). Usage:

    python scripts/trace_merge_visits.py --zoo .cache/zoo-2
    TRITON_INTERPRET=1 PYTHONPATH=.cache/triton-interpreter \\
        python scripts/trace_merge_visits.py --zoo .cache/zoo-2 --routes triton

Not a test; the numbers describe the code's structure, not its speed.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections import Counter
from pathlib import Path
from types import FrameType
from typing import Any

sys.path.insert(0, os.getcwd())  # the checkout it is run from (before and after a change)

import torch  # noqa: E402

METHODS = {
    "task_arithmetic": {"weight": (0.2, 0.7)},
    "ties": {"weight": (0.2, 0.7), "density": (0.3, 0.6)},
    "dare_ties": {"weight": (0.2, 0.7), "density": (0.3, 0.6)},
    "breadcrumbs": {"weight": (0.2, 0.7), "density": (0.3, 0.6), "gamma": (0.01, 0.02)},
    "della": {"weight": (0.2, 0.7), "density": (0.3, 0.6), "epsilon": (0.1, 0.1)},
    "linear": {"weight": (0.2, 0.7)},
    "slerp": {"t": (0.3, 0.6)},
}


class Visits:
    """``sys.setprofile`` hook: calls into merge modules from outside them."""

    def __init__(self, folder: Path) -> None:
        self.folder = str(folder)
        self.triton = None
        try:
            import triton

            self.triton = str(Path(triton.__file__).parent)
        except ImportError:
            pass
        self.entries: dict[str, set[str]] = {}
        self.calls: Counter[str] = Counter()

    def __call__(self, frame: FrameType, event: str, arg: Any) -> None:
        if event != "call":
            return
        callee = frame.f_code.co_filename
        if not callee.startswith(self.folder):
            return
        caller_frame = frame.f_back
        caller = caller_frame.f_code.co_filename if caller_frame is not None else ""
        if caller == callee or (self.triton and caller.startswith(self.triton)):
            return
        module = Path(callee).name
        self.entries.setdefault(module, set()).add(frame.f_code.co_qualname)
        self.calls[module] += 1


def route_engine(route: str, method: str, zoo: Path) -> Any:
    """An engine for ``route``: the Triton route patches the kernels in for the CPU."""
    from mergeopt.blocks import BlockLayout
    from mergeopt.merge import engine as engine_module

    if route == "triton":
        from mergeopt.merge import triton_kernels

        # the zoo's tensors are small enough for the one-sort path; a real model's are not:
        # send every top-k through the Triton passes, as on a GPU with a full-size model
        try:
            small_sort = importlib.import_module("mergeopt.merge.selection")
        except ImportError:  # before the split: methods.py held the selection
            small_sort = importlib.import_module("mergeopt.merge.methods")
        setattr(small_sort, "_SORT_BELOW", 0)  # noqa: B010 - either module, same names
        setattr(small_sort, "_SAMPLE_SIZE", 4096)  # noqa: B010

        try:
            from mergeopt.merge import backend, plan

            def on(device: Any, switches: Any, dtype: Any = None) -> Any:
                ok = switches.fused and (dtype is None or dtype in backend.TRITON_DTYPES)
                return triton_kernels if ok else None

            plan.triton_on = on  # type: ignore[assignment]
            plan._select_kernels = lambda device, dtype, switches: triton_kernels  # type: ignore[assignment]
        except ImportError:  # before the merge plan: the per-call decisions in methods.py
            from mergeopt.merge import methods

            methods._fused_kernels = lambda *tensors: (  # type: ignore[attr-defined]
                triton_kernels if triton_kernels.supported(tensors) else None
            )
            methods._select_kernels = lambda x: (  # type: ignore[attr-defined]
                triton_kernels if triton_kernels.select_supported(x) else None
            )
    experts = [zoo / "expert-direct"] + ([] if method == "slerp" else [zoo / "expert-steps"])
    return engine_module.MergeEngine(
        base=zoo / "base",
        experts=experts,
        layout=BlockLayout.fixed(8, num_blocks=4),
        method=method,
        dtype=torch.bfloat16 if route == "triton" else torch.float32,
        exact=route == "torch",
    )


def trace(route: str, method: str, zoo: Path) -> Visits:
    import transformers

    transformers.utils.logging.disable_progress_bar()
    from mergeopt.genome import Genome
    from mergeopt.merge.engine import ModuleTarget

    engine = route_engine(route, method, zoo)
    module = transformers.AutoModelForCausalLM.from_pretrained(
        zoo / "base", dtype=engine.dtype
    ).eval()
    target = ModuleTarget(module=module)
    bounds = {k: (lo, hi + 0.1) for k, (lo, hi) in METHODS[method].items()}
    genome = Genome(num_blocks=5, num_experts=engine.num_experts, searched=bounds)
    first = {name: bounds[name.rsplit(".", 1)[1]][0] for name in genome.param_names}
    second = {name: bounds[name.rsplit(".", 1)[1]][1] for name in genome.param_names}
    engine.merge(genome.block_params(first), target=target, seed=1)  # caches warm, as a worker
    visits = Visits(Path(engine_module_file()).parent)
    sys.setprofile(visits)
    try:  # what TrialRunner.evaluate does between the sampler's params and the scorer
        engine.merge(genome.block_params(second), target=target, seed=2)
    finally:
        sys.setprofile(None)
    return visits


def engine_module_file() -> str:
    from mergeopt.merge import engine

    return str(engine.__file__)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", type=Path, default=Path(".cache/zoo-2"))
    parser.add_argument("--routes", default="torch,fast")
    parser.add_argument("--methods", default=",".join(METHODS))
    args = parser.parse_args()
    routes = [r for r in args.routes.split(",") if r]
    methods = [m for m in args.methods.split(",") if m]
    most: Counter[str] = Counter()
    print("| route | method | module: entries (calls) |")
    print("| --- | --- | --- |")
    for route in routes:
        for method in methods:
            if route == "fast" and method not in ("task_arithmetic", "linear"):
                continue
            visits = trace(route, method, args.zoo)
            cells = []
            for module in sorted(visits.entries):
                names = visits.entries[module]
                most[module] = max(most[module], len(names))
                listed = ", ".join(sorted(names))
                cells.append(f"{module}: {len(names)} ({visits.calls[module]}) [{listed}]")
            print(f"| {route} | {method} | {'; '.join(cells)} |", flush=True)
    print(
        "\nmost entries per module over these routes: "
        + ", ".join(f"{m} {n}" for m, n in sorted(most.items()))
    )


if __name__ == "__main__":
    main()
