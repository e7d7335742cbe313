"""OptunaHub package ``samplers/saasbo_qnehvi``: mergeopt's SAASBO + qLogNEHVI sampler.

The sampler lives in mergeopt (``mergeopt/samplers/saasbo*.py``, about 1,100 lines with the
batch protocol it shares with other samplers), which is not on PyPI; this package imports it
from an installed mergeopt instead of carrying a copy that would drift (README: Installation).
"""

from __future__ import annotations

try:
    from mergeopt.samplers.saasbo import SaasQnehviSampler
except ImportError as exc:  # mergeopt, or its BoTorch extra, is missing
    raise ImportError(
        "samplers/saasbo_qnehvi imports its sampler from mergeopt, which is not on PyPI: install "
        "it from a mergeopt clone with `pip install -e '.[bo]'` (see this package's README); "
        f"import failed with: {exc}"
    ) from exc

__all__ = ["SaasQnehviSampler"]
