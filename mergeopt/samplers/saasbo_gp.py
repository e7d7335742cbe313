"""The GP models of ``saasbo-qnehvi``: one GP per objective, with a structural importance prior.

Structural importance prior (``enable_importance_prior``): each dimension ``d`` belongs to a
genome block ``b`` with importance ``I_b`` (study user attr ``mergeopt:block_importance``);
``w_d = I_b / max(I)`` in ``[0, 1]``, ``kappa = importance_strength`` (default 2.0):

    - MAP mode: lengthscale prior ``LogNormal(mu_d, sigma)`` with
      ``mu_d = sqrt(2) + ln(D)/2 + kappa * (1 - 2 w_d)`` and ``sigma = lengthscale_prior_scale``
      (default sqrt(3)); initial lengthscale ``exp(mu_d)``, then a second fit from half of it
      (``MAP_FIT_STARTS``), the better kept. The most important block's dimensions start
      ``e^kappa`` times shorter (more relevant) than BoTorch's default, the least important
      ``e^kappa`` times longer. Prior off: ``mu_d = sqrt(2) + ln(D)/2`` for all.
      Example, 37 dimensions, importance 1.0 on 6 blocks and 0.1 elsewhere, kappa = 2: prior
      medians ``exp(mu_d)`` = 3.4 on the 6 and 124 on the others (25 for all with the prior
      off); ``sigma = sqrt(3)`` keeps the data able to overrule a wrong prior.
    - SAAS (NUTS) mode: the half-Cauchy on the inverse squared lengthscales gets a per-dimension
      scale ``s_d = exp(2 kappa (2 w_d - 1))`` (SAAS uses 1): ``rho_d ~ HC(s_d)``, global
      ``tau ~ HC(0.1)``; the median lengthscale moves by the same ``e^{-kappa (2 w_d - 1)}``.

    Without importance in the study (or names that are not genome names) the prior is uniform
    (a warning is logged once for genome studies).

    Set ``importance_strength`` lower when the importance is a weak signal, 0 to switch its
    effect off. How the defaults were measured: ``docs/bench/samplers-2026-11-24.md``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np


def lengthscale_prior_locations(
    dimension: int, importance: np.ndarray | None, strength: float
) -> np.ndarray:
    """``mu_d`` of the MAP-mode log-normal lengthscale prior (this module's docstring)."""
    base = math.sqrt(2.0) + 0.5 * math.log(dimension)
    if importance is None:
        return np.full(dimension, base)
    return base + strength * (1.0 - 2.0 * np.asarray(importance, dtype=float))


def inverse_lengthscale_scales(importance: np.ndarray | None, strength: float, dimension: int):
    """``s_d`` of the SAAS half-Cauchy on inverse squared lengthscales (this module's docstring)."""
    if importance is None:
        return np.ones(dimension)
    return np.exp(2.0 * strength * (2.0 * np.asarray(importance, dtype=float) - 1.0))


# Where the MAP fit starts, as multiples of the lengthscale prior's median (SIPBMM's
# importance-initialized lengthscales), the better fit kept. From the median alone, a quarter of
# the fits at 16-40 points of the 37-D benchmark stopped on a plateau where the unimportant
# dimensions' lengthscales never moved, about 1 nat per point below the optimum that the second
# start finds (docs/bench/saasbo-fit-2026-12-02.md).
MAP_FIT_STARTS = (1.0, 0.5)


def fit_map_model(train_x: Any, train_y: Any, locations: np.ndarray, prior_scale: float) -> Any:
    import torch
    from botorch.fit import fit_gpytorch_mll
    from botorch.models import SingleTaskGP
    from botorch.models.transforms.outcome import Standardize
    from botorch.optim.closures.core import ForwardBackwardClosure
    from botorch.optim.utils import get_parameters_and_bounds
    from gpytorch.constraints import GreaterThan
    from gpytorch.kernels import MaternKernel
    from gpytorch.mlls import ExactMarginalLogLikelihood
    from gpytorch.priors import LogNormalPrior

    dimension = train_x.shape[-1]
    loc = torch.as_tensor(locations, dtype=train_x.dtype)
    # A scale of loc's shape, not a float: broadcast, it is a stride-0 buffer, which BoTorch's
    # retry of a failed fit attempt cannot restore in place (RuntimeError).
    scale = torch.full_like(loc, prior_scale)
    kernel = MaternKernel(
        nu=2.5,
        ard_num_dims=dimension,
        lengthscale_prior=LogNormalPrior(loc=loc, scale=scale),
        lengthscale_constraint=GreaterThan(2.5e-2, transform=None, initial_value=1.0),
    )
    model = SingleTaskGP(train_x, train_y, covar_module=kernel, outcome_transform=Standardize(m=1))
    mll = ExactMarginalLogLikelihood(model.likelihood, model)
    parameters, _ = get_parameters_and_bounds(mll)  # those BoTorch's scipy fit optimizes
    trained = {name: p for name, p in parameters.items() if p.requires_grad}
    loss = map_loss(mll)
    initial = {name: p.detach().clone() for name, p in trained.items()}
    best: tuple[float, dict[str, Any]] | None = None
    for start in MAP_FIT_STARTS:
        with torch.no_grad():
            for name, p in trained.items():
                p.copy_(initial[name])
            kernel.lengthscale = start * torch.exp(loc).unsqueeze(0)
        fit_gpytorch_mll(mll, closure=ForwardBackwardClosure(loss, trained))
        with torch.no_grad():
            value = float(loss())
        if best is None or value < best[0]:
            best = (value, {name: p.detach().clone() for name, p in trained.items()})
    assert best is not None
    with torch.no_grad():
        for name, p in trained.items():
            p.copy_(best[1][name])
    return model


def map_loss(mll: Any) -> Callable[[], Any]:
    """The loss BoTorch's MAP fit minimizes for ``fit_map_model``'s GP, in plain torch.

    ``mll``: the ``ExactMarginalLogLikelihood`` of a ``SingleTaskGP`` with a Matérn-5/2 ARD
    kernel (no output scale), a constant mean, homoskedastic Gaussian noise and no input
    transform. The closure returns ``-(log N(y; c, K + s I) + log priors) / n``, the value of
    gpytorch's closure to rounding (and its gradient), in about half the time: gpytorch spends
    most of a step of a small GP in its lazy-tensor machinery, and a fit at 12-44 points takes
    hundreds of steps. Where the Cholesky factorization fails it returns gpytorch's closure's
    value, which adds jitter (or raises) as BoTorch's fit expects."""
    import math

    import torch
    from botorch.optim.closures.model_closures import get_loss_closure
    from gpytorch.kernels import MaternKernel
    from gpytorch.likelihoods import GaussianLikelihood
    from gpytorch.means import ConstantMean

    model = mll.model
    kernel, likelihood, mean = model.covar_module, model.likelihood, model.mean_module
    if not (
        isinstance(kernel, MaternKernel)
        and kernel.nu == 2.5
        and isinstance(likelihood, GaussianLikelihood)
        and isinstance(mean, ConstantMean)
        and getattr(model, "input_transform", None) is None
    ):
        raise TypeError("map_loss: not fit_map_model's GP")
    gpytorch_loss = get_loss_closure(mll)
    x = model.train_inputs[0]
    y = model.train_targets
    n = y.shape[-1]
    centred = x - x.mean(dim=-2, keepdim=True)  # as gpytorch's Matérn kernel centres
    eye = torch.eye(n, dtype=x.dtype, device=x.device)
    constant = n * math.log(2 * math.pi)
    # gpytorch's ExactMarginalLogLikelihood adds the model's priors, each once
    priors = [(module, prior, of) for _, module, prior, of, _ in model.named_priors()]

    def loss() -> Any:
        z = centred / kernel.lengthscale
        z = z - z.mean(dim=-2, keepdim=True)  # gpytorch's distance centres again
        norms = z.pow(2).sum(dim=-1, keepdim=True)
        squared = (norms + norms.transpose(-2, -1) - 2.0 * (z @ z.transpose(-2, -1))).clamp_min(0)
        r = squared.clamp_min(1e-30).sqrt()
        covariance = (1 + math.sqrt(5) * r + 5.0 / 3.0 * r * r) * torch.exp(-math.sqrt(5) * r)
        cholesky, info = torch.linalg.cholesky_ex(covariance + likelihood.noise * eye)
        if bool(info.any()):
            return gpytorch_loss()
        residual = (y - mean.constant).unsqueeze(-1)
        whitened = torch.linalg.solve_triangular(cholesky, residual, upper=False)
        log_det = 2 * cholesky.diagonal(dim1=-2, dim2=-1).log().sum(dim=-1)
        value = -0.5 * (whitened.pow(2).sum() + log_det + constant)
        for module, prior, of in priors:
            value = value + prior.log_prob(of(module)).sum()
        return -value / n

    return loss


def fit_saas_model(train_x: Any, train_y: Any, scales: np.ndarray, nuts: dict[str, Any]) -> Any:
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as numpyro_dist
    from botorch.fit import fit_fully_bayesian_model_nuts
    from botorch.models.fully_bayesian import SaasFullyBayesianSingleTaskGP, SaasPyroModel
    from botorch.models.transforms.outcome import Standardize

    scale_values = jnp.asarray(scales)

    class ImportanceSaasPyroModel(SaasPyroModel):
        """SAAS with a per-dimension half-Cauchy scale on the inverse squared lengthscales."""

        def sample_lengthscale(self, dim: int, alpha: float = 0.1) -> Any:
            tausq = numpyro.sample("kernel_tausq", numpyro_dist.HalfCauchy(jnp.array(alpha)))
            inv_length_sq = numpyro.sample(
                "_kernel_inv_length_sq", numpyro_dist.HalfCauchy(scale_values)
            )
            inv_length_sq = numpyro.deterministic("kernel_inv_length_sq", tausq * inv_length_sq)
            return numpyro.deterministic("lengthscale", 1.0 / jnp.sqrt(inv_length_sq))

    class ImportanceSaasGP(SaasFullyBayesianSingleTaskGP):
        _pyro_model_class = ImportanceSaasPyroModel

    model = ImportanceSaasGP(train_x, train_y, outcome_transform=Standardize(m=1))
    fit_fully_bayesian_model_nuts(model, disable_progbar=True, **nuts)
    return model


__all__ = [
    "fit_map_model",
    "fit_saas_model",
    "inverse_lengthscale_scales",
    "lengthscale_prior_locations",
    "map_loss",
]
