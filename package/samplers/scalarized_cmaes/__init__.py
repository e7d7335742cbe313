"""OptunaHub package ``samplers/scalarized_cmaes``: mergeopt's scalarized, multi-worker CMA-ES.

The sampler lives in mergeopt (``mergeopt/samplers/cmaes.py`` and the batch protocol of
``mergeopt/samplers/_state.py``), which is not on PyPI; this package imports it from an
installed mergeopt instead of carrying a copy that would drift (README: Installation).
"""

from __future__ import annotations

try:
    from mergeopt.samplers.cmaes import ScalarizedCmaEsSampler
except ImportError as exc:  # mergeopt, or the cmaes package, is missing
    raise ImportError(
        "samplers/scalarized_cmaes imports its sampler from mergeopt, which is not on PyPI: "
        "install it from a mergeopt clone with `pip install -e '.[cmaes]'` (see this package's "
        f"README); import failed with: {exc}"
    ) from exc

__all__ = ["ScalarizedCmaEsSampler"]
