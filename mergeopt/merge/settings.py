"""Parameter values of a mergekit config: the one place that reads them.

A setting is a scalar, a gradient (a list of scalars, interpolated over a slice's layers at
``t``) or filter entries (``{filter, value}``, the first whose filter is a substring of the
tensor name wins). Every scalar is validated by its parameter's type as mergekit validates it
(pydantic): a float parameter takes ``0.5``, ``1`` and the string ``"1e-1"`` (PyYAML reads
``1e-1`` without a dot as a string); a bool parameter takes ``true`` or ``"yes"``.
:func:`check_setting` checks a whole setting when the config is read (a bad value is one
:class:`UserError` line); :func:`evaluate_setting` resolves it for one tensor.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from pydantic import TypeAdapter, ValidationError

from mergeopt.errors import UserError

Validate = Callable[[Any], Any]
_SCALARS = (bool, int, float, str)


@functools.cache
def validator(kind: type) -> Validate:
    """``kind``'s validation (float or bool), mergekit's: pydantic in lax mode."""
    return TypeAdapter(kind).validate_python


def validator_for(default: Any) -> Validate:
    """The validation of a parameter whose default is ``default`` (None: a required float)."""
    return validator(bool if isinstance(default, bool) else float)


def check_setting(setting: Any, validate: Validate, where: str) -> None:
    """Raise a one-line :class:`UserError` unless every scalar of ``setting`` validates and its
    shape is a scalar, a gradient or filter entries."""
    if isinstance(setting, Mapping):
        setting = [setting]
    if isinstance(setting, _SCALARS):
        _validated(validate, setting, where)
        return
    if not isinstance(setting, list):
        raise UserError(f"{where}: unexpected parameter value {setting!r}")
    if all(isinstance(e, _SCALARS) for e in setting):
        for element in setting:
            _validated(validate, element, where)
        return
    for condition in setting:
        if not isinstance(condition, Mapping) or "value" not in condition:
            raise UserError(f"{where}: parameter entry {condition!r}: expected {{filter, value}}")
        extra = set(condition) - {"filter", "value"}
        if extra:
            raise UserError(f"{where}: parameter entry: unsupported key {sorted(extra)[0]!r}")
        if isinstance(condition["value"], (Mapping, list)) and not all(
            isinstance(e, _SCALARS) for e in condition["value"]
        ):
            raise UserError(f"{where}: a filter entry's value is a scalar or a gradient")
        check_setting(condition["value"], validate, where)


def _validated(validate: Validate, value: Any, where: str) -> Any:
    try:
        return validate(value)
    except ValidationError:
        raise UserError(f"{where}: {value!r} is not a valid value") from None


def evaluate_setting(setting: Any, tensor_name: str, t: float, validate: Validate) -> Any:
    """A checked setting's value for one tensor: scalars validated, numeric gradients
    interpolated at ``t`` (other gradients pick an element), filter entries by first substring
    match (None when nothing matches) — mergekit's ``evaluate_setting``."""
    if isinstance(setting, Mapping):
        setting = [setting]
    if isinstance(setting, _SCALARS):
        return validate(setting)
    if not setting:
        return None
    if all(isinstance(e, _SCALARS) for e in setting):
        values = [validate(e) for e in setting]
        if not all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in values):
            return values[int(t * (len(values) - 1))]
        scaled = t * (len(values) - 1)
        low = int(scaled)
        high = min(len(values) - 1, low + 1)
        fraction = scaled - low
        return validate((1 - fraction) * values[low] + fraction * values[high])
    for condition in setting:
        pattern = condition.get("filter")
        if pattern is None or pattern == "*" or (tensor_name and pattern in tensor_name):
            return evaluate_setting(condition["value"], tensor_name, t, validate)
    return None


def resolve(
    scopes: Sequence[Mapping[str, Any] | None], name: str, tensor: str, t: float, default: Any
) -> Any:
    """The first scope's value of parameter ``name`` for ``tensor`` that is not None (None
    when no scope sets it); ``default`` picks the validation."""
    for scope in scopes:
        if scope and name in scope:
            value = evaluate_setting(scope[name], tensor, t, validator_for(default))
            if value is not None:
                return value
    return None
