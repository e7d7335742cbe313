"""The OptunaHub packages in ``package/samplers/`` (OptunaHub's registry layout): each loads with
``optunahub.load_local_module``, exports mergeopt's own sampler class, and samples a plain
Optuna multi-objective study itself rather than through its random fallback; and each has the
files and README front matter the registry asks for."""

from __future__ import annotations

import ast
from types import ModuleType

import optuna
import optunahub
import pytest
import yaml
from optuna.trial import TrialState

from mergeopt.samplers.cmaes import GENERATION_ATTR, INDEX_ATTR, ScalarizedCmaEsSampler
from mergeopt.samplers.saasbo import ACQ_SECONDS_ATTR, FIT_SECONDS_ATTR, SaasQnehviSampler
from tests.conftest import REPO

REGISTRY = REPO / "package"
PACKAGES = {"saasbo_qnehvi": "SaasQnehviSampler", "scalarized_cmaes": "ScalarizedCmaEsSampler"}
FAST = {"num_restarts": 2, "raw_samples": 32, "maxiter": 20, "mc_samples": 32, "num_threads": 1}


def load(name: str) -> ModuleType:
    return optunahub.load_local_module(package=f"samplers/{name}", registry_root=str(REGISTRY))


def two_objectives(trial: optuna.Trial) -> tuple[float, float]:
    x = [trial.suggest_float(f"x{i}", 0.0, 1.0) for i in range(3)]
    return (x[0] - 0.2) ** 2 + x[2], (x[0] - 0.8) ** 2 + (x[1] - 0.5) ** 2


def test_saasbo_package_samples_a_multi_objective_study_with_its_model() -> None:
    module = load("saasbo_qnehvi")
    assert module.SaasQnehviSampler is SaasQnehviSampler  # mergeopt's code, not a copy
    sampler = module.SaasQnehviSampler(n_startup_trials=4, batch_size=2, seed=0, **FAST)
    study = optuna.create_study(directions=["minimize", "maximize"], sampler=sampler)
    study.optimize(two_objectives, n_trials=9)
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(complete) == 9
    # Trials 0-3 are the design (trial 0 random: a define-by-run space is unknown until one
    # trial ran); every later one comes from a GP fit and a qLogNEHVI batch.
    fitted = [t for t in complete if FIT_SECONDS_ATTR in t.user_attrs]
    assert [t.number for t in fitted] == [4, 5, 6, 7, 8]
    assert all(t.user_attrs[ACQ_SECONDS_ATTR] > 0 for t in fitted)
    assert sampler.last_fit_seconds > 0
    # a batch of 2 per fit: pairs of trials share one fit's timing
    assert fitted[0].user_attrs[FIT_SECONDS_ATTR] == fitted[1].user_attrs[FIT_SECONDS_ATTR]


def test_cmaes_package_samples_a_multi_objective_study_in_generations() -> None:
    module = load("scalarized_cmaes")
    assert module.ScalarizedCmaEsSampler is ScalarizedCmaEsSampler
    sampler = module.ScalarizedCmaEsSampler(
        popsize=4, scalarization="chebyshev", weights=[0.5, 0.5], seed=0
    )
    study = optuna.create_study(directions=["minimize", "maximize"], sampler=sampler)
    study.optimize(two_objectives, n_trials=13)
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(complete) == 13
    assert GENERATION_ATTR not in complete[0].user_attrs  # the random first trial
    # then three generations of 4, each told to CMA-ES before the next is drawn
    members = [(t.user_attrs[GENERATION_ATTR], t.user_attrs[INDEX_ATTR]) for t in complete[1:]]
    assert members == [(g, i) for g in range(3) for i in range(4)]


@pytest.mark.parametrize("name", sorted(PACKAGES))
def test_package_has_the_registry_files_and_front_matter(name: str) -> None:
    folder = REGISTRY / "samplers" / name
    for required in ("__init__.py", "README.md", "LICENSE", "example.py", "requirements.txt"):
        assert (folder / required).is_file(), required
    assert list((folder / "tests").glob("test_*.py"))
    assert "Apache License" in (folder / "LICENSE").read_text()
    readme = (folder / "README.md").read_text()
    _, front, body = readme.split("---\n", 2)
    meta = yaml.safe_load(front)
    assert set(meta) == {"author", "title", "description", "tags", "optuna_versions", "license"}
    assert "sampler" in meta["tags"]
    assert optuna.__version__ in [str(v) for v in meta["optuna_versions"]]
    for section in ("## Abstract", "## APIs", "## Installation", "## Example"):
        assert section in body, section
    assert "<" + "/" not in body  # no HTML: the hub strips it
    assert PACKAGES[name] in body
    # The example loads from the registry (no local paths), as the registry requires.
    example = (folder / "example.py").read_text()
    ast.parse(example)
    assert f'optunahub.load_module("samplers/{name}")' in example
    assert "load_local_module" not in example


def test_packages_are_mentioned_in_the_readme() -> None:
    readme = (REPO / "README.md").read_text()
    for name in PACKAGES:
        assert f"package/samplers/{name}" in readme


def test_the_package_list_is_complete() -> None:
    assert sorted(p.name for p in (REGISTRY / "samplers").iterdir() if p.is_dir()) == sorted(
        PACKAGES
    )
