"""Exports of data-flow trials: the path as a plain, deeper checkpoint, and as mergekit's
``passthrough`` slices.

``hf``: model A's embeddings, final norm and head around the path's layers copied in path order
(``model.layers.P`` is position P), ``num_hidden_layers`` (and ``layer_types``) set to the
path's depth, the hop scales folded into each position's residual writers (``o_proj``,
``down_proj`` times ``1 / C_p``, see :mod:`mergeopt.merge.dataflow`), in the dtype the trial was
scored in. transformers loads it as it loads model A.

``mergekit``: one slice per run of consecutive layers of one source with one fold factor, the
factor as passthrough's ``scale`` on ``o_proj`` and ``down_proj``; ``mergekit-yaml`` on it writes
the same tensors as the ``hf`` export (``tests/test_dataflow.py``). mergekit copies model A's
config with the new depth but not ``layer_types``, which transformers then rejects for some
models; the ``hf`` export writes both.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mergeopt.genome import Hop

if TYPE_CHECKING:
    from mergeopt.spec import StudySpec

LAYER_PREFIX = "model.layers."


def _layer_of(name: str) -> tuple[int, str] | None:
    """``model.layers.3.mlp.down_proj.weight`` -> ``(3, "mlp.down_proj.weight")``."""
    if not name.startswith(LAYER_PREFIX):
        return None
    index, _, rest = name.removeprefix(LAYER_PREFIX).partition(".")
    return int(index), rest


def write_dataflow_model(
    path: Sequence[Hop], *, sources: Sequence[Path], dtype: str, folder: Path
) -> None:
    """The plain checkpoint of ``path`` over ``sources`` (model A first) into ``folder``."""
    import torch
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as transformers_logging

    from mergeopt.merge.dataflow import folded_layer_tensors

    transformers_logging.disable_progress_bar()  # the CLI says what it exported
    torch_dtype = getattr(torch, dtype)
    used = {(s, i) for s, i, _ in path}
    outer: dict[str, torch.Tensor] = {}
    layers: list[dict[int, dict[str, torch.Tensor]]] = [{} for _ in sources]
    for source, source_dir in enumerate(sources):
        for shard in sorted(Path(source_dir).glob("*.safetensors")):
            with safe_open(str(shard), framework="pt") as handle:
                for name in handle.keys():  # noqa: SIM118 - safe_open has keys(), no __iter__
                    where = _layer_of(name)
                    if where is None and source == 0:
                        outer[name] = handle.get_tensor(name).to(torch_dtype)
                    elif where is not None and (source, where[0]) in used:
                        tensors = layers[source].setdefault(where[0], {})
                        tensors[where[1]] = handle.get_tensor(name).to(torch_dtype)
    layer_tensors = [
        [by_index.get(i, {}) for i in range(max(by_index, default=-1) + 1)] for by_index in layers
    ]
    state = dict(outer)
    written: set[int] = set()
    for position, tensors in folded_layer_tensors(path, layer_tensors):
        for name, tensor in tensors.items():
            # A layer taken twice unscaled would be one tensor under two names, which
            # save_pretrained refuses (shared tensors): the second position gets a copy.
            if id(tensor) in written:
                tensor = tensor.clone()
            written.add(id(tensor))
            state[f"{LAYER_PREFIX}{position}.{name}"] = tensor

    config: Any = AutoConfig.from_pretrained(sources[0])
    source_configs = [AutoConfig.from_pretrained(s) for s in sources]
    config.num_hidden_layers = len(path)
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [source_configs[s].layer_types[i] for s, i, _ in path]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise RuntimeError(f"data-flow export: missing {missing}, unexpected {unexpected}")
    if missing:  # tied embeddings: the head is the embedding matrix
        model.tie_weights()
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(sources[0]).save_pretrained(folder)
    generation_config = Path(sources[0]) / "generation_config.json"
    if generation_config.is_file():
        shutil.copyfile(generation_config, folder / "generation_config.json")


def dataflow_mergekit_config(
    path: Sequence[Hop], *, sources: Sequence[str], dtype: str
) -> dict[str, Any]:
    """mergekit's ``passthrough`` slices of ``path`` (a dict ready for ``yaml.safe_dump``)."""
    from mergeopt.merge.dataflow import cumulative_scales

    runs: list[tuple[int, int, int, float]] = []  # source, first layer, end, factor
    for (source, layer, _), product in zip(path, cumulative_scales(path), strict=True):
        factor = 1.0 / product
        if runs and runs[-1][0] == source and runs[-1][2] == layer and runs[-1][3] == factor:
            runs[-1] = (source, runs[-1][1], layer + 1, factor)
        else:
            runs.append((source, layer, layer + 1, factor))
    slices = []
    for source, first, end, factor in runs:
        entry: dict[str, Any] = {"model": str(sources[source]), "layer_range": [first, end]}
        if factor != 1.0:
            entry["parameters"] = {
                "scale": [
                    {"filter": "o_proj", "value": factor},
                    {"filter": "down_proj", "value": factor},
                    {"value": 1.0},
                ]
            }
        slices.append({"sources": [entry]})
    return {"merge_method": "passthrough", "slices": slices, "dtype": dtype}


def dataflow_metadata(path: Sequence[Hop], spec: StudySpec) -> dict[str, Any]:
    """What ``mergeopt.json`` says of a data-flow trial instead of a merge recipe."""
    return {
        "space": "dataflow",
        "sources": [spec.models.base, *spec.models.experts],
        "path": [list(hop) for hop in path],
        "depth": len(path),
    }
