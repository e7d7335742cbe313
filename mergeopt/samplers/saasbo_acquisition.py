"""The acquisition step of ``saasbo-qnehvi``: fit the GPs, then optimize qLogNEHVI (several
objectives) or qLogNEI (one) for a batch of candidates in the unit cube, warm-started near the
current front. The sampler (:mod:`mergeopt.samplers.saasbo`) decides when and with what data."""

from __future__ import annotations

import threading
import time
import warnings
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from mergeopt.samplers.saasbo_gp import (
    fit_map_model,
    fit_saas_model,
    inverse_lengthscale_scales,
    lengthscale_prior_locations,
)

# How long the first acquisition of a worker waits for BoTorch's fused qLogNEHVI kernel (a
# build takes about 40 s) before it goes on with the pure-PyTorch path for the whole process.
KERNEL_WAIT_S = 180.0
_KERNEL_NAME = "logei_fused_ext"
_kernel_load: dict[str, Any] = {}
_kernel_start_lock = threading.Lock()


def start_fused_kernel_load() -> None:
    """Load BoTorch's fused qLogNEHVI C++ kernel on a daemon thread, for a worker process.

    BoTorch JIT-builds the kernel (``torch.utils.cpp_extension.load``) at the first acquisition,
    and torch takes a lock file in the extensions folder for every load (a build, or its
    up-to-date check), which it waits on forever with no owner check: a worker killed meanwhile
    (the chaos tests do that) left every later acquisition on the machine waiting. So workers
    load it under their own lock, an ``flock`` the system drops with a dead holder, and while
    they hold it a torch lock file can only be a dead process's and is removed. The load runs
    beside the worker's first trials (start-up trials need no model); the first acquisition
    waits for it at most ``KERNEL_WAIT_S`` (``await_fused_kernel``), else computes the same
    acquisition on the pure-PyTorch path, about half as fast (``docs/bench/
    study-medium-h200-2026-12-01.md``). Without ``fcntl`` (not POSIX) workers keep that path."""
    from botorch.acquisition.multi_objective import logei

    with _kernel_start_lock:
        if _kernel_load or logei._C is not None:
            return
        _start_kernel_thread(logei)


def _start_kernel_thread(logei: Any) -> None:
    logei._load_attempted = True  # no acquisition loads it itself: it would take torch's lock
    try:
        import fcntl
    except ImportError:
        return

    def load() -> None:
        from torch.utils.cpp_extension import _get_build_directory

        build = Path(_get_build_directory(_KERNEL_NAME, verbose=False))
        with (build.parent / f"{_KERNEL_NAME}.mergeopt-lock").open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when this process ends, however
            try:
                (build / "lock").unlink(missing_ok=True)  # a dead loader's: we hold the lock
                _kernel_load["module"] = _build_or_load_kernel()
            except Exception as exc:  # noqa: BLE001 - no compiler, no ninja: the pure path
                warnings.warn(
                    f"BoTorch's fused qLogNEHVI kernel did not load ({exc!r:.200}); "
                    "acquisitions take the pure-PyTorch path, about half as fast",
                    stacklevel=1,
                )

    thread = threading.Thread(target=load, name="botorch-fused-kernel", daemon=True)
    _kernel_load["thread"] = thread
    thread.start()


def _build_or_load_kernel() -> Any:
    """The kernel module, built as BoTorch's ``_try_load_fused_kernel`` builds it (same name,
    source and flags, so both share one build)."""
    from botorch.acquisition.multi_objective import logei
    from torch.utils.cpp_extension import load

    source = Path(logei.__file__).parent.parent.parent / "csrc" / "logei_fused.cpp"
    return load(
        name=_KERNEL_NAME,
        sources=[str(source.resolve())],
        extra_cflags=["-O3", "-march=native"],
        verbose=False,
    )


def await_fused_kernel() -> None:
    """Before an acquisition: wait (once per process, at most ``KERNEL_WAIT_S``) for the kernel
    ``start_fused_kernel_load`` loads, and install it into BoTorch. Decided once: every
    acquisition of a process computes the same way (a kernel loaded later is not used).

    A sampler used outside a worker (plain Optuna code) starts the load here and waits for it:
    BoTorch's own load would wait forever on a lock file a killed process left behind."""
    start_fused_kernel_load()
    thread = _kernel_load.get("thread")
    if thread is None or _kernel_load.get("decided"):
        return
    thread.join(KERNEL_WAIT_S)
    _kernel_load["decided"] = True
    module = _kernel_load.get("module") if not thread.is_alive() else None
    if module is not None:
        from botorch.acquisition.multi_objective import logei

        logei._C = module


class ProposalSettings(Protocol):
    """The settings :func:`propose_batch` reads (a ``SaasQnehviSampler`` has them all)."""

    num_threads: int | None
    use_saas: bool
    nuts: dict[str, Any]
    importance_strength: float
    lengthscale_prior_scale: float
    mc_samples: int
    ref_point_rule: str
    prune_baseline: bool
    sequential: bool
    raw_samples: int
    num_restarts: int
    maxiter: int


def propose_batch(
    *,
    train_x: np.ndarray,
    train_y: np.ndarray,
    pending_x: np.ndarray | None,
    q: int,
    importance: np.ndarray | None,
    ref_point: np.ndarray | None,
    sampler: ProposalSettings,
    seed: int,
) -> tuple[np.ndarray, float, float]:
    """Fit the models and optimize the acquisition.

    Args:
        train_x: ``n x d`` observed points in the unit cube.
        train_y: ``n x m`` observed values, every objective maximized.
        pending_x: ``p x d`` points being evaluated (or queued), or None.
        q: candidates to return.
        importance: ``d`` importances in ``[0, 1]`` or None (uniform prior).
        ref_point: ``m`` reference point (maximization form) or None (derived from data).
        sampler: the settings.
        seed: torch seed of this batch.

    Returns:
        ``(q x d candidates, fit seconds, acquisition seconds)``.
    """
    import torch

    await_fused_kernel()
    previous_threads = torch.get_num_threads()
    if sampler.num_threads is not None:
        torch.set_num_threads(sampler.num_threads)
    try:
        torch.manual_seed(seed)
        x = torch.as_tensor(train_x, dtype=torch.double)
        y = torch.as_tensor(train_y, dtype=torch.double)
        start = time.perf_counter()
        model = _fit_models(x, y, importance, sampler)
        fit_seconds = time.perf_counter() - start
        start = time.perf_counter()
        pending = None if pending_x is None else torch.as_tensor(pending_x, dtype=torch.double)
        reference = None if ref_point is None else torch.as_tensor(ref_point, dtype=torch.double)
        candidates = _optimize_acquisition(model, x, y, pending, q, reference, sampler, seed)
        acq_seconds = time.perf_counter() - start
    finally:
        torch.set_num_threads(previous_threads)
    return candidates.detach().clamp(0.0, 1.0).numpy(), fit_seconds, acq_seconds


def _fit_models(x: Any, y: Any, importance: np.ndarray | None, sampler: ProposalSettings) -> Any:
    """One GP per objective (a ``ModelListGP`` of them for several)."""
    from botorch.models import ModelListGP

    dimension, num_objectives = x.shape[-1], y.shape[-1]
    models = []
    for j in range(num_objectives):
        if sampler.use_saas:
            scales = inverse_lengthscale_scales(importance, sampler.importance_strength, dimension)
            models.append(fit_saas_model(x, y[:, j : j + 1], scales, sampler.nuts))
        else:
            locations = lengthscale_prior_locations(
                dimension, importance, sampler.importance_strength
            )
            models.append(
                fit_map_model(x, y[:, j : j + 1], locations, sampler.lengthscale_prior_scale)
            )
    return ModelListGP(*models) if num_objectives > 1 else models[0]


def _optimize_acquisition(
    model: Any,
    x: Any,
    y: Any,
    pending: Any,
    q: int,
    reference: Any,
    sampler: ProposalSettings,
    seed: int,
) -> Any:
    """``q x d`` candidates maximizing qLogNEHVI (several objectives) or qLogNEI (one)."""
    import torch
    from botorch.acquisition import AcquisitionFunction
    from botorch.acquisition.logei import qLogNoisyExpectedImprovement
    from botorch.acquisition.multi_objective.logei import (
        qLogNoisyExpectedHypervolumeImprovement,
    )
    from botorch.optim import optimize_acqf
    from botorch.optim.initializers import initialize_q_batch
    from botorch.sampling import SobolQMCNormalSampler

    dimension, dtype = x.shape[-1], x.dtype
    qmc = SobolQMCNormalSampler(sample_shape=torch.Size([sampler.mc_samples]), seed=seed)
    if y.shape[-1] > 1:
        ref = derived_reference_point(y, sampler.ref_point_rule) if reference is None else reference
        acquisition: AcquisitionFunction = qLogNoisyExpectedHypervolumeImprovement(
            model=model,
            ref_point=ref.tolist(),
            X_baseline=x,
            prune_baseline=sampler.prune_baseline,
            sampler=qmc,
            X_pending=pending,
        )
    else:
        acquisition = qLogNoisyExpectedImprovement(
            model=model,
            X_baseline=x,
            prune_baseline=sampler.prune_baseline,
            sampler=qmc,
            X_pending=pending,
        )
    bounds = torch.stack([torch.zeros(dimension, dtype=dtype), torch.ones(dimension, dtype=dtype)])
    q_joint = 1 if sampler.sequential else q
    raw = _raw_starts(x, y, sampler.raw_samples, q_joint, seed)
    with torch.no_grad():
        raw_values = torch.cat([acquisition(chunk) for chunk in raw.split(64)])
    starts, _ = initialize_q_batch(raw, raw_values, n=sampler.num_restarts)
    # Sequential greedy draws its own raw samples per point; joint optimization starts from ours.
    starting: dict[str, Any] = (
        {"raw_samples": sampler.raw_samples, "sequential": True}
        if sampler.sequential and q > 1
        else {"batch_initial_conditions": starts}
    )
    candidates, _ = optimize_acqf(
        acquisition,
        bounds=bounds,
        q=q,
        num_restarts=sampler.num_restarts,
        options={"maxiter": sampler.maxiter, "batch_limit": sampler.num_restarts},
        **starting,
    )
    return candidates


def derived_reference_point(y: Any, rule: str) -> Any:
    """Reference point (maximization form) of ``n x m`` values ``y`` by ``rule`` (see
    ``SaasQnehviSampler``). Where the front has no spread in an objective (one Pareto point),
    the observed range stands in for the front's, and 1.0 where nothing varies."""
    import torch
    from botorch.utils.multi_objective.pareto import is_non_dominated

    observed_span = y.max(dim=0).values - y.min(dim=0).values
    observed_span = torch.where(observed_span > 0, observed_span, torch.ones_like(observed_span))
    points = y[is_non_dominated(y)] if rule == "pareto-nadir" else y
    low, high = points.min(dim=0).values, points.max(dim=0).values
    span = torch.where(high > low, high - low, observed_span)
    return low - 0.1 * span


def _raw_starts(x: Any, y: Any, raw_samples: int, q: int, seed: int) -> Any:
    """``raw_samples x q x d`` starting batches: Sobol points, a quarter of them with one point
    replaced by a jittered Pareto-set member (warm starts near the current front)."""
    import torch
    from botorch.utils.multi_objective.pareto import is_non_dominated
    from torch.quasirandom import SobolEngine

    dimension = x.shape[-1]
    sobol = SobolEngine(dimension, scramble=True, seed=seed)
    raw = sobol.draw(raw_samples * q).to(x).view(raw_samples, q, dimension)
    front = x[is_non_dominated(y)] if y.shape[-1] > 1 else x[y.argmax(dim=0)]
    generator = torch.Generator().manual_seed(seed)
    n_warm = raw_samples // 4
    picks = torch.randint(len(front), (n_warm,), generator=generator)
    jitter = 0.05 * torch.randn(n_warm, dimension, generator=generator, dtype=x.dtype)
    raw[:n_warm, 0, :] = (front[picks] + jitter).clamp(0.0, 1.0)
    return raw


__all__ = ["ProposalSettings", "derived_reference_point", "propose_batch"]
