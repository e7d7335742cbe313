"""A mergekit config read and checked (:class:`MergekitConfig`), and its plan: which input
tensors make each output tensor, with which parameters (:meth:`MergekitConfig.tensor_plans`).

``models:`` merges every tensor of the models, each layer stack aligned (a multimodal model's
towers each with their own layer count). ``slices:`` builds the output's layers slice after
slice: each slice's sources give ``layer_range``s of one length (they may differ between
sources and slices: stacking, reordering, taking a subset, a frankenmerge); the output layers
are numbered on, and the config's layer count is their total. Embeddings come from the first
slice's sources, final norms and heads from the last's, as mergekit plans pre- and
post-weights.

``modules:`` (mergekit's per-module form) gives each module its own ``models`` or ``slices``
and ``parameters`` (between a slice's and the global ones in precedence). A module is one
layer stack, as mergekit infers an architecture it has no definition for: a model with one
stack has the single module ``default``; a multimodal model (LLaVA) one per stack, named by
its prefix (``model.language_model.layers``, ``model.vision_tower.encoder.layers``), plus
``default`` for every tensor outside the layers. Each module's layers are numbered from 0, its
``t`` over its own slices; a module the config leaves out is not written, as mergekit does
(with a warning).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from mergeopt.errors import UserError
from mergeopt.merge.adapters import apply_adapter
from mergeopt.merge.settings import check_setting, resolve, validator, validator_for
from mergeopt.merge.vocabulary import read_tokenizer_spec
from mergeopt.tensor_names import is_post_weight, layer_counts, layer_of

logger = logging.getLogger(__name__)

TOP_LEVEL_KEYS = {
    "merge_method",
    "base_model",
    "models",
    "slices",
    "modules",
    "parameters",
    "dtype",
    "out_dtype",
    "tokenizer_source",
    "tokenizer",
    "chat_template",
}
DTYPES = {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16", "fp32": "float32"}
DTYPES.update({"fp16": "float16", "bf16": "bfloat16", "float": "float32", "half": "float16"})


@dataclass(frozen=True)
class Source:
    """One model of a slice: its folder, its parameters, its first layer (``models:``: 0)."""

    path: Path
    parameters: Mapping[str, Any] | None
    start: int = 0


@dataclass(frozen=True)
class Slice:
    """Sources merged layer by layer; ``length`` layers (-1: every layer, ``models:``);
    ``base``: the index of the base among the sources (methods that take one); ``base_model``:
    the slice's base model as the config names it (also for methods that take none)."""

    sources: list[Source]
    parameters: Mapping[str, Any] | None
    length: int
    base: int | None
    experts: list[int]
    base_model: Path | None = None
    module_parameters: Mapping[str, Any] | None = None
    """The ``parameters`` of the module the slice belongs to (``modules:``), else None."""


DEFAULT_MODULE = "default"
"""mergekit's name for the module of a one-stack model, and for the tensors outside the layers
of a model with several."""


@dataclass(frozen=True)
class Module:
    """One entry of ``modules:``: its name and its slices (one, of length -1, for ``models``)."""

    name: str
    slices: list[Slice]


@dataclass(frozen=True)
class TensorPlan:
    """One output tensor: the slice it comes from, its ``t``, and the name to read in each of
    the slice's sources."""

    name: str
    piece: Slice
    t: float
    source_names: list[str]


class MergekitConfig:
    """A parsed, validated mergekit config (:mod:`mergeopt.merge.mergekit_config` says what is
    accepted)."""

    def __init__(
        self, *, config: Mapping[str, Any], config_path: Path, adapters_dir: Path | None = None
    ) -> None:
        """``adapters_dir``: where LoRA references' models are made (None: refused)."""
        from mergeopt.merge.methods import get_method

        where = str(config_path)
        self._adapters_dir = adapters_dir
        if not isinstance(config, Mapping):
            raise UserError(f"{where}: expected a mapping at the top level")
        unknown = sorted(set(config) - TOP_LEVEL_KEYS)
        if unknown:
            raise UserError(f"{where}: unsupported key {unknown[0]!r}")
        if "merge_method" not in config:
            raise UserError(f"{where}: merge_method is required")
        self.merge_method = get_method(str(config["merge_method"]), f"{where}: merge_method")
        self.where = where
        self._dir = config_path.parent
        self.tokenizer = read_tokenizer_spec(config, self._model_path, where)
        """The output tokenizer's source, tokens and padding; None: the base's files, copied."""
        self.chat_template = config.get("chat_template")
        if self.chat_template is not None and not isinstance(self.chat_template, str):
            raise UserError(f"{where}: chat_template: expected a template, a name or auto")
        self.dtype = self._dtype(config.get("dtype"), "dtype")
        self.out_dtype = self._dtype(config.get("out_dtype"), "out_dtype")
        """The dtype tensors are written in; None: the merge's own (mergekit writes what its
        method returns: fp32 from ramplus_tl and arcee_fusion in a bf16 merge)."""
        self.config_dtype = self.out_dtype or self.dtype
        """The dtype ``config.json`` names (mergekit's: ``out_dtype``, else ``dtype``)."""
        self.parameters = self._check_params(
            config.get("parameters") or {}, "parameters", global_scope=True
        )
        base = config.get("base_model")
        self.base_path = self._model_path(base, "base_model") if base is not None else None
        if sum(key in config for key in ("models", "slices", "modules")) != 1:
            raise UserError(f"{where}: give exactly one of models, slices and modules")
        self.modules: list[Module] | None = None
        """The ``modules:`` entries in the config's order; None: ``models`` or ``slices``."""
        if "modules" in config:
            self.modules = self._modules(config["modules"])
            self.slices = [piece for module in self.modules for piece in module.slices]
        else:
            self.slices = self._slices(config, "", None)
        if not self.slices:
            raise UserError(f"{where}: no input models")
        paths = [s.path for piece in self.slices for s in piece.sources]
        self.base_or_first = self.base_path or paths[0]
        self.paths = list(dict.fromkeys([self.base_or_first, *paths]))
        """Every model the config reads, the base (or the first model) first."""
        self.num_layers: int | None = None
        """The output's layer count where slices set it (:meth:`tensor_plans`)."""
        self.layer_sources: list[int] = []
        """Where slices set the layers: each output layer's layer in its (first) source."""

    @property
    def sliced(self) -> bool:
        """Sources need not hold every tensor of the reference (checked per tensor)."""
        return self.modules is not None or self.slices[0].length != -1

    # -- parsing helpers ---------------------------------------------------------------------

    def _dtype(self, value: Any, key: str) -> str | None:
        if value is None:
            return None
        if str(value) not in DTYPES:
            raise UserError(f"{self.where}: {key} {value!r} is not one of {sorted(set(DTYPES))}")
        return DTYPES[str(value)]

    def _model_path(self, reference: Any, key: str) -> Path:
        if isinstance(reference, Mapping) and set(reference) <= {"model"}:
            reference = reference.get("model")
        if not isinstance(reference, str):
            raise UserError(f"{self.where}: {key}: expected a model folder path")
        path = self._resolved(reference)
        if not path.is_dir() and reference.count("+") == 1:
            if self._adapters_dir is None:
                raise UserError(f"{self.where}: {key}: {reference}: no folder to apply LoRA into")
            model, adapter = (self._folder(part, key) for part in reference.split("+"))
            return apply_adapter(model, adapter, self._adapters_dir, f"{self.where}: {key}")
        if not path.is_dir() and "@" in reference:
            raise UserError(
                f"{self.where}: {key}: {reference}: revisions (model@revision) are not "
                "supported; give a local model folder"
            )
        if not path.is_dir():
            raise UserError(f"{self.where}: {key}: model folder {reference} not found")
        return path.resolve()

    def _resolved(self, reference: str) -> Path:
        """``reference`` as a path, relative to the config's folder where it is one there."""
        path = Path(reference).expanduser()
        return self._dir / path if not path.is_dir() and (self._dir / path).is_dir() else path

    def _folder(self, reference: str, key: str) -> Path:
        path = self._resolved(reference)
        if not path.is_dir():
            raise UserError(f"{self.where}: {key}: folder {reference} not found")
        return path.resolve()

    def _check_params(self, params: Any, key: str, *, global_scope: bool) -> Mapping[str, Any]:
        """The parameters of one scope, names and values checked; a per-model parameter of
        another method (mergekit ignores it) is dropped with a warning."""
        from mergeopt.merge.methods import METHODS

        if not isinstance(params, Mapping):
            raise UserError(f"{self.where}: {key}: expected a mapping")
        where = f"{self.where}: {key}"
        merge_method = self.merge_method
        if global_scope:  # mergekit: per-model defaults may be set here too
            merge_method.check_method_params(params, where, shared=True)
            kinds: dict[str, Any] = {**merge_method.expert_defaults, **merge_method.global_defaults}
        else:
            own = set(merge_method.expert_defaults) | set(merge_method.expert_overrides)
            elsewhere = {n for m in METHODS.values() for n in m.expert_defaults}
            for name in sorted(set(params) - own):
                if name in elsewhere:
                    logger.warning(
                        "%s.%s: %s has no per-model parameter %r; ignored, as mergekit does",
                        where,
                        name,
                        merge_method.name,
                        name,
                    )
            params = {
                name: value
                for name, value in params.items()
                if name in own or name not in elsewhere
            }
            merge_method.check_expert_params(params, where, required=False)
            kinds = {**merge_method.expert_defaults}
            kinds.update(
                {name: merge_method.global_defaults[name] for name in merge_method.expert_overrides}
            )
        for name, setting in params.items():
            check_setting(setting, validator_for(kinds.get(name)), f"{where}.{name}")
        return params

    def _source(self, entry: Any, key: str, sliced: bool) -> Source:
        if not isinstance(entry, Mapping):
            raise UserError(f"{self.where}: {key}: expected {{model, parameters}}")
        extra = sorted(set(entry) - {"model", "parameters", "layer_range"})
        if extra:
            raise UserError(f"{self.where}: {key}: unsupported key {extra[0]!r}")
        params = self._check_params(
            entry.get("parameters") or {}, f"{key}.parameters", global_scope=False
        )
        start = 0
        if sliced:
            layers = entry.get("layer_range")
            if not (isinstance(layers, list) and len(layers) == 2 and 0 <= layers[0] < layers[1]):
                raise UserError(f"{self.where}: {key}.layer_range: expected [start, end]")
            start = int(layers[0])
        path = self._model_path(entry.get("model"), f"{key}.model")
        return Source(path=path, parameters=params, start=start)

    def _slices(
        self, scope: Mapping[str, Any], key: str, module_params: Mapping[str, Any] | None
    ) -> list[Slice]:
        """The slices of the config's top level or of one module (``key``: its prefix)."""
        # mergekit reads a module's empty models (models: null beside slices) as not given
        chosen = "models" if scope.get("models") or not scope.get("slices") else "slices"
        entries = scope.get(chosen) or []
        if not isinstance(entries, list):
            raise UserError(f"{self.where}: {key}{chosen}: expected a list")
        if chosen == "models":
            sources = [self._source(m, f"{key}models[{i}]", False) for i, m in enumerate(entries)]
            pieces = [self._slice_of(sources, None, -1, f"{key}models", self.base_path)]
        else:
            pieces = [
                self._slice(entry, f"{key}slices[{index}]") for index, entry in enumerate(entries)
            ]
        return [replace(piece, module_parameters=module_params) for piece in pieces]

    def _modules(self, entries: Any) -> list[Module]:
        if not isinstance(entries, Mapping) or not entries:
            raise UserError(f"{self.where}: modules: expected a mapping of module names")
        modules = []
        for name, entry in entries.items():
            key = f"modules.{name}"
            if not isinstance(entry, Mapping):
                raise UserError(f"{self.where}: {key}: expected {{models or slices, parameters}}")
            extra = sorted(set(entry) - {"models", "slices", "parameters"})
            if extra:
                raise UserError(f"{self.where}: {key}: unsupported key {extra[0]!r}")
            if bool(entry.get("models")) == bool(entry.get("slices")):
                raise UserError(f"{self.where}: {key}: give exactly one of models and slices")
            params = self._check_params(
                entry.get("parameters") or {}, f"{key}.parameters", global_scope=True
            )
            modules.append(Module(str(name), self._slices(entry, f"{key}.", params)))
        return modules

    def _slice(self, entry: Any, key: str) -> Slice:
        if not isinstance(entry, Mapping) or not entry.get("sources"):
            raise UserError(f"{self.where}: {key}: expected {{sources, parameters}}")
        extra = sorted(set(entry) - {"sources", "parameters", "base_model", "residual_weight"})
        if extra:
            raise UserError(f"{self.where}: {key}: unsupported key {extra[0]!r}")
        residual = entry.get("residual_weight")
        if residual is not None:  # mergekit 0.1.5 reads it, then never uses it
            if isinstance(residual, (list, Mapping)):
                raise UserError(f"{self.where}: {key}.residual_weight: expected a number")
            check_setting(residual, validator(float), f"{key}.residual_weight")
            logger.warning("%s: %s.residual_weight is ignored, as mergekit does", self.where, key)
        base = self.base_path
        if entry.get("base_model") is not None:  # this slice's base, instead of the config's
            base = self._model_path(entry["base_model"], f"{key}.base_model")
        raw = entry["sources"]
        sources = [self._source(s, f"{key}.sources[{i}]", True) for i, s in enumerate(raw)]
        lengths = {int(s["layer_range"][1]) - int(s["layer_range"][0]) for s in raw}
        if len(lengths) != 1:
            raise UserError(f"{self.where}: {key}: every source must span as many layers")
        params = self._check_params(
            entry.get("parameters") or {}, f"{key}.parameters", global_scope=True
        )
        return self._slice_of(sources, params, lengths.pop(), key, base)

    def _slice_of(
        self,
        sources: list[Source],
        params: Mapping[str, Any] | None,
        length: int,
        key: str,
        base: Path | None,
    ) -> Slice:
        """Which sources are experts: methods that take a base (``base``: the slice's, else
        the config's) exclude it; linear and passthrough merge them all, as does multislerp
        without a base."""
        where = f"{self.where}: {key}"
        paths = [s.path for s in sources]
        merge_method = self.merge_method
        if not merge_method.base_input or (merge_method.base_optional and base is None):
            if base is not None and base not in paths:
                raise UserError(
                    f"{where}: base_model of a {merge_method.name} merge must be one of the models"
                )
            self.merge_method.check_experts(len(paths), where)
            return Slice(sources, params, length, None, list(range(len(paths))), base)
        if base is None:
            raise UserError(f"{where}: {self.merge_method.name} needs base_model")
        if base not in paths and length == -1:  # models: the base joins them
            sources = [*sources, Source(path=base, parameters=None)]
            paths.append(base)
        if base not in paths:
            raise UserError(f"{where}: base_model {base} is not among the sources")
        experts = [i for i, p in enumerate(paths) if p != base]
        self.merge_method.check_experts(len(experts), f"{where}: models besides the base")
        return Slice(sources, params, length, paths.index(base), experts, base)

    # -- the plan ------------------------------------------------------------------------------

    def tensor_plans(self, names: Sequence[str]) -> list[TensorPlan]:
        """Every output tensor, given the reference model's tensor ``names`` (the base's, or
        the first model's): ``models:`` keeps them all, each layer stack's ``t`` over its own
        layer count; ``slices:`` numbers the slices' layers on, one stack only; ``modules:``
        plans each module's tensors by its own models or slices."""
        counts = layer_counts(names)
        self.num_layers = None
        self.layer_sources = []
        if self.modules is None:
            return self._module_plans(names, self.slices, counts, "")
        members = self._module_members(names, counts)
        plans = []
        for module in self.modules:
            key = f"modules.{module.name}"
            if module.name not in members:
                raise UserError(
                    f"{self.where}: {key}: the model has no such module "
                    f"(its modules: {', '.join(members)})"
                )
            own = members[module.name]
            refs = [ref for name in own if (ref := layer_of(name)) is not None]
            stacks = {ref.module: counts[ref.module] for ref in refs}
            if len(members) > 1 and module.slices[0].length != -1:
                if module.name == DEFAULT_MODULE:
                    raise UserError(
                        f"{self.where}: {key}: holds no layers (a tower's stack is a module of "
                        "its own); give models"
                    )
                given = sum(piece.length for piece in module.slices)
                if given != stacks[module.name]:
                    # mergekit 0.1.5 knows no config key for an inferred module's layer count:
                    # it leaves the config's count, and the model it writes does not load
                    raise UserError(
                        f"{self.where}: {key}: slices give {given} layers, the module has "
                        f"{stacks[module.name]}; changing a tower's layer count is not "
                        "supported (mergekit leaves its config count, writing a model that "
                        "does not load)"
                    )
            plans += self._module_plans(own, module.slices, stacks, f"{key}: ")
            if len(members) > 1:  # the config's layer counts stay as they are
                self.num_layers = None
                self.layer_sources = []
        left_out = [m for m in members if m not in {module.name for module in self.modules}]
        if left_out:
            logger.warning(
                "%s: modules %s are not in the config; their tensors are not written, as "
                "mergekit does",
                self.where,
                ", ".join(left_out),
            )
        return plans

    def _module_members(
        self, names: Sequence[str], counts: Mapping[str, int]
    ) -> dict[str, list[str]]:
        """Each module's tensor names, mergekit's modules of an inferred architecture: one
        stack: ``default`` holds all; several: one module per stack, ``default`` the rest."""
        if len(counts) <= 1:
            return {DEFAULT_MODULE: list(names)}
        members: dict[str, list[str]] = {}
        loose = [name for name in names if layer_of(name) is None]
        for name in loose:
            inside = [stack for stack in counts if name.startswith(stack)]
            if inside:  # mergekit would file it under that stack and cut its name
                raise UserError(
                    f"{self.where}: modules: {name} lies outside the layers of {inside[0]}, "
                    "which mergekit names wrongly; use models"
                )
        if loose:
            members[DEFAULT_MODULE] = loose
        for stack in counts:
            members[stack] = [
                name for name in names if (ref := layer_of(name)) and ref.module == stack
            ]
        return members

    def _module_plans(
        self,
        names: Sequence[str],
        slices: list[Slice],
        counts: Mapping[str, int],
        key: str,
    ) -> list[TensorPlan]:
        """The plans of ``names`` (a module's, or all) from ``slices``; ``counts``: the layer
        stacks among them. Sets :attr:`num_layers` and :attr:`layer_sources` where slices set
        the layers."""
        if slices[0].length == -1:
            piece = slices[0]
            plans = []
            for name in names:
                ref = layer_of(name)
                t = 0.0
                if ref is not None:
                    count = counts[ref.module]
                    t = ref.index / (count - 1) if count > 1 else 1.0
                plans.append(TensorPlan(name, piece, t, [name] * len(piece.sources)))
            return plans
        if len(counts) > 1:
            raise UserError(
                f"{self.where}: {key}slices of a model with several layer stacks "
                f"({', '.join(counts)}) need modules: (one per stack) or models"
            )
        templates = []  # a layer tensor's name with {} for its index, once per tensor of layer 0
        for name in names:
            ref = layer_of(name)
            if ref is not None and ref.index == 0:
                prefix = f"{ref.module}.0."
                templates.append(f"{ref.module}.{{}}.{name[len(prefix) :]}")
        outer = [n for n in names if layer_of(n) is None]
        first, last = slices[0], slices[-1]
        plans = [
            TensorPlan(n, first, 0.0, [n] * len(first.sources))
            for n in outer
            if not is_post_weight(n)
        ]
        layer = 0
        self.layer_sources = []
        for piece in slices:
            for offset in range(piece.length):
                t = offset / (piece.length - 1) if piece.length > 1 else 1.0
                for template in templates:
                    reads = [template.format(s.start + offset) for s in piece.sources]
                    plans.append(TensorPlan(template.format(layer), piece, t, reads))
                self.layer_sources.append(piece.sources[0].start + offset)
                layer += 1
        plans += [
            TensorPlan(n, last, 0.0, [n] * len(last.sources)) for n in outer if is_post_weight(n)
        ]
        self.num_layers = layer
        return plans

    def tensor_params(
        self, plan: TensorPlan
    ) -> tuple[list[dict[str, float]], dict[str, float | bool]]:
        """(per-expert parameters, method parameters) of one output tensor, mergekit's
        precedence: the model's own setting, then the slice's, then the global ``parameters``.
        Filters match the output name (per model: the name read in that model)."""
        piece, t, name = plan.piece, plan.t, plan.name
        shared_scopes = [piece.parameters, piece.module_parameters, self.parameters]
        merge_method = self.merge_method
        method_params: dict[str, float | bool] = {}
        for key, default in merge_method.global_defaults.items():
            if key in merge_method.expert_overrides:
                continue  # given per tensor with the experts' values, below
            value = resolve(shared_scopes, key, name, t, default)
            if value is not None:
                method_params[key] = value
        experts: list[dict[str, float]] = []
        for index in piece.experts:
            source = piece.sources[index]
            read = plan.source_names[index]
            values: dict[str, float] = {}
            for key, expert_default in merge_method.expert_defaults.items():
                scopes = [source.parameters, *shared_scopes]
                value = resolve(scopes, key, read, t, expert_default)
                if value is not None:
                    values[key] = value
            for key in merge_method.expert_overrides:  # mergekit reads these from shared scopes
                value = resolve(shared_scopes, key, name, t, merge_method.global_defaults[key])
                if value is not None:
                    values[key] = value
            where = f"{self.where}: {source.path.name}, {read}"
            merge_method.check_required(values, where, overrides=True)
            merge_method.check_values(values, where)
            experts.append(values)
        return experts, method_params
