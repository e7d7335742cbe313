"""The GP models of ``saasbo-qnehvi``: one GP per objective, with a structural importance prior.

Structural importance prior (``enable_importance_prior``): each dimension ``d`` belongs to a
genome block ``b`` with importance ``I_b`` (study user attr ``mergeopt:block_importance``);
``w_d = I_b / max(I)`` in ``[0, 1]``, ``kappa = importance_strength`` (default 2.0):

    - MAP mode: lengthscale prior ``LogNormal(mu_d, sigma)`` with
      ``mu_d = sqrt(2) + ln(D)/2 + kappa * (1 - 2 w_d)`` and ``sigma = lengthscale_prior_scale``
      (default sqrt(3)); initial lengthscale ``exp(mu_d)``. The most important block's
      dimensions start ``e^kappa`` times shorter (more relevant) than BoTorch's default, the
      least important ``e^kappa`` times longer. Prior off: ``mu_d = sqrt(2) + ln(D)/2`` for all.
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


def fit_map_model(train_x: Any, train_y: Any, locations: np.ndarray, prior_scale: float) -> Any:
    import torch
    from botorch.fit import fit_gpytorch_mll
    from botorch.models import SingleTaskGP
    from botorch.models.transforms.outcome import Standardize
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
    kernel.lengthscale = torch.exp(loc).unsqueeze(0)
    model = SingleTaskGP(train_x, train_y, covar_module=kernel, outcome_transform=Standardize(m=1))
    fit_gpytorch_mll(ExactMarginalLogLikelihood(model.likelihood, model))
    return model


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
]
