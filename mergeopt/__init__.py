"""mergeopt: multi-objective search for LLM merge recipes on persistent Optuna studies."""

__version__ = "0.1.0"
