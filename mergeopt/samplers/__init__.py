"""Samplers selectable by name from a study spec (``sampler: {name, options}``).

``SAMPLERS`` maps each name to the module and class that implement it; a new sampler is one
entry there. This module stays light: the sampler classes are imported only when one is built,
and nothing here imports torch or BoTorch, so ``mergeopt --help`` and ``study create`` stay
fast.

Names:
    ``random``, ``tpe``, ``nsga2``, ``gp``: Optuna's own samplers; ``options`` are passed as
    keyword arguments to their constructors (``RandomSampler``, ``TPESampler``,
    ``NSGAIISampler``, ``GPSampler``). ``tpe`` is :class:`mergeopt.samplers.tpe.TPESampler`,
    Optuna's with one read of the study per trial instead of one per parameter.
    ``saasbo-qnehvi``: :class:`mergeopt.samplers.saasbo.SaasQnehviSampler`.
    ``cmaes``: :class:`mergeopt.samplers.cmaes.ScalarizedCmaEsSampler`.
    ``model-level``: :class:`mergeopt.samplers.model_level.ModelLevelSampler`.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from mergeopt.errors import UserError

if TYPE_CHECKING:
    import optuna

    from mergeopt.genome import SearchGenome

SAMPLERS: dict[str, tuple[str, str]] = {
    "random": ("optuna.samplers", "RandomSampler"),
    "tpe": ("mergeopt.samplers.tpe", "TPESampler"),
    "nsga2": ("optuna.samplers", "NSGAIISampler"),
    "gp": ("optuna.samplers", "GPSampler"),
    "saasbo-qnehvi": ("mergeopt.samplers.saasbo", "SaasQnehviSampler"),
    "cmaes": ("mergeopt.samplers.cmaes", "ScalarizedCmaEsSampler"),
    "model-level": ("mergeopt.samplers.model_level", "ModelLevelSampler"),
}
"""Samplers by the name a spec gives (``sampler.name``) -> (module, class), imported only when
a sampler is built (BoTorch and torch are heavy)."""

SAMPLER_NAMES: tuple[str, ...] = tuple(SAMPLERS)

# Constructor arguments the factory fills itself; a spec may not set them.
_RESERVED_OPTIONS = frozenset({"seed", "genome", "num_objectives"})


def sampler_class(name: str) -> type[optuna.samplers.BaseSampler]:
    """The class of the sampler called ``name``, imported now."""
    entry = SAMPLERS.get(name)
    if entry is None:
        raise UserError(
            f"sampler.name: unknown sampler {name!r}; expected one of {', '.join(SAMPLER_NAMES)}"
        )
    module, class_name = entry
    return getattr(importlib.import_module(module), class_name)


def _constructor_kwargs(
    name: str,
    cls: Callable[..., Any],
    options: Mapping[str, Any],
    *,
    seed: int | None,
    genome: SearchGenome | None,
    num_objectives: int,
) -> dict[str, Any]:
    parameters = inspect.signature(cls).parameters
    accepted = {
        key
        for key, parameter in parameters.items()
        if parameter.kind in (parameter.KEYWORD_ONLY, parameter.POSITIONAL_OR_KEYWORD)
    }
    for key in options:
        if key in _RESERVED_OPTIONS:
            raise UserError(
                f"sampler.options.{key}: set by mergeopt itself (seed comes from the spec's seed)"
            )
        if key not in accepted:
            valid = sorted(accepted - _RESERVED_OPTIONS)
            raise UserError(
                f"sampler.options.{key}: not an option of sampler {name!r}; "
                f"expected one of {', '.join(valid)}"
            )
    kwargs = dict(options)
    if "seed" in accepted:
        kwargs["seed"] = seed
    if "genome" in accepted:
        kwargs["genome"] = genome
    if "num_objectives" in accepted:
        kwargs["num_objectives"] = num_objectives
    return kwargs


def create_sampler(
    name: str,
    options: Mapping[str, Any],
    *,
    seed: int | None,
    genome: SearchGenome | None,
    num_objectives: int,
) -> optuna.samplers.BaseSampler:
    """The sampler called ``name`` with the spec's ``options`` (one per worker process).

    Raises:
        UserError: unknown name, unknown option, or an option value the sampler rejects.
    """
    cls = sampler_class(name)
    kwargs = _constructor_kwargs(
        name, cls, options, seed=seed, genome=genome, num_objectives=num_objectives
    )
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise UserError(f"sampler.options of {name!r}: {exc}") from exc


def validate_sampler_options(
    name: str,
    options: Mapping[str, Any],
    *,
    genome: SearchGenome | None,
    num_objectives: int,
) -> None:
    """Raise :class:`UserError` (one line naming the option) if ``name``/``options`` are bad.

    Constructing a sampler is cheap (no model is fitted, no torch import), so validation builds
    one and throws it away; this is what ``study create`` calls before writing anything.
    """
    create_sampler(name, options, seed=0, genome=genome, num_objectives=num_objectives)


__all__ = [
    "SAMPLERS",
    "SAMPLER_NAMES",
    "create_sampler",
    "sampler_class",
    "validate_sampler_options",
]
