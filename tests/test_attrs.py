"""The attribute accessors of ``mergeopt.attrs``: one namespaced key each, typed get/set."""

from __future__ import annotations

import optuna
import pytest

from mergeopt import attrs

ACCESSORS = {
    name: value
    for name, value in vars(attrs).items()
    if isinstance(
        value,
        (attrs.StudyUserAttr, attrs.StudySystemAttr, attrs.TrialUserAttr, attrs.TrialSystemAttr),
    )
}


def test_every_key_is_namespaced_and_unique() -> None:
    assert len(ACCESSORS) >= 20
    keys = [str(accessor) for accessor in ACCESSORS.values()]
    assert all(key.startswith(attrs.PREFIX) for key in keys)
    assert len(set(keys)) == len(keys)
    assert attrs.GRID_INDEX == "mergeopt:model-level:grid_index"  # stored keys never change
    assert attrs.SAMPLER_EXHAUSTED == "mergeopt:sampler:exhausted"


def test_study_and_trial_accessors_round_trip() -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study()
    assert attrs.SPEC.get(study) is None
    with pytest.raises(KeyError):
        attrs.SPEC.read(study)
    attrs.SPEC.set(study, {"name": "x"})
    assert attrs.SPEC.read(study) == {"name": "x"} == study.user_attrs["mergeopt:spec"]
    attrs.SAMPLER_EXHAUSTED.set(study, True)
    assert attrs.SAMPLER_EXHAUSTED.get(study) is True

    trial = study.ask()
    attrs.SEED.set(trial, 7)
    assert attrs.SEED.get(trial) == 7
    frozen = study.get_trials(deepcopy=False)[0]
    attrs.FAIL_REASON.set_on(study, frozen, "why")
    attrs.TAKEN_BY.set_on(study, frozen.number, 3)  # an id: trial ids are numbers here
    frozen = study.get_trials(deepcopy=False)[0]
    assert attrs.FAIL_REASON.read(frozen) == "why"
    assert attrs.TAKEN_BY.get(frozen) == 3
    assert type(next(iter(frozen.user_attrs))) is str  # stored under the plain key
