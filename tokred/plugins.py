"""One plugin registry for every extension point: reducers, backbone adapters, decoders, datasets.

Each ``Registry`` holds built-ins as ``"module:attr"`` strings (imported on first use, so importing the
registry imports neither torch nor the built-ins) and finds plugins through one entry-point group, e.g. a
distribution declares in its pyproject.toml::

    [project.entry-points."tokred.reducers"]
    random_prune = "my_package.module:RandomPruner"

Names are unique across built-ins, entry points and run-time registrations (a second registration raises).
Every entry records the distribution and version that supplied it, so results say where each part came from.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from typing import Any

__all__ = ["BACKBONES", "DATASETS", "DECODERS", "PluginSpec", "REDUCERS", "REGISTRIES", "Registry", "UnknownNameError"]


class UnknownNameError(ValueError, KeyError):
    """A name that no registry entry carries (both a ``ValueError`` and a ``KeyError`` for old callers)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class PluginSpec:
    """Where a registered object comes from.

    Attributes:
        name: short name (the config file stem where there is one).
        target: ``"module:attr"``.
        distribution: the installed distribution that supplied it (``"tokred"`` for built-ins).
        version: that distribution's version.
        origin: ``"builtin"``, ``"entry_point"`` or ``"runtime"`` (``Registry.register``).
    """

    name: str
    target: str
    distribution: str
    version: str
    origin: str


def _tokred_version() -> str:
    from tokred import __version__

    return __version__


class Registry:
    """Short names -> lazily imported objects (classes or factories), with provenance.

    Args:
        kind: what it holds, for messages (``"reducer"``, ``"backbone"``, ``"decoder"``, ``"dataset"``).
        group: the entry-point group plugins declare (``"tokred.reducers"``, ...).
        builtins: ``name -> "module:attr"`` of tokred's own entries.
        check: optional ``check(name, obj)`` run on every object at first import; raises ``TypeError``
            when the object is not of the expected kind (e.g. not a ``Reducer`` subclass).
    """

    def __init__(self, kind: str, group: str, builtins: dict[str, str],
                 check: Callable[[str, Any], None] | None = None) -> None:
        self.kind = kind
        self.group = group
        self._builtins = dict(builtins)
        self._check = check
        self._extra: dict[str, PluginSpec] = {}
        self._objects: dict[str, Any] = {}

    # ------------------------------------------------------------------ discovery
    def _entry_point_specs(self) -> dict[str, PluginSpec]:
        specs: dict[str, PluginSpec] = {}
        for ep in metadata.entry_points(group=self.group):
            dist = ep.dist.name if ep.dist is not None else "<unknown>"
            ver = ep.dist.version if ep.dist is not None else ""
            if ep.name in specs and specs[ep.name].target != ep.value:
                raise ValueError(f"{self.kind} {ep.name!r} is declared by two distributions "
                                 f"({specs[ep.name].distribution} and {dist}); uninstall one or rename its entry point")
            specs[ep.name] = PluginSpec(ep.name, ep.value, dist, ver, "entry_point")
        return specs

    def available(self) -> dict[str, PluginSpec]:
        """Every name with its source, sorted by name.

        Raises:
            ValueError: a plugin reuses a built-in name, or two plugins share a name.
        """
        specs = {n: PluginSpec(n, t, "tokred", _tokred_version(), "builtin") for n, t in self._builtins.items()}
        for name, spec in self._entry_point_specs().items():
            if name in specs:
                raise ValueError(f"plugin {spec.distribution} registers {self.kind} {name!r}, which is a tokred "
                                 f"built-in; rename the plugin's entry point in group {self.group!r}")
            specs[name] = spec
        for name, spec in self._extra.items():
            specs.setdefault(name, spec)
        return dict(sorted(specs.items()))

    def names(self) -> list[str]:
        return list(self.available())

    # ------------------------------------------------------------------ run-time registration
    def register(self, name: str, obj: Any, distribution: str = "<runtime>", version: str = "") -> None:
        """Registers ``obj`` under ``name`` at run time (tests, notebooks); distributions use entry points.

        Raises:
            ValueError: ``name`` is already registered.
            TypeError: ``obj`` fails the registry's kind check.
        """
        if name in self.available():
            raise ValueError(f"{self.kind} name {name!r} is already registered by "
                             f"{self.available()[name].distribution}; choose another name")
        if self._check is not None:
            self._check(name, obj)
        target = f"{getattr(obj, '__module__', '?')}:{getattr(obj, '__qualname__', repr(obj))}"
        self._extra[name] = PluginSpec(name, target, distribution, version, "runtime")
        self._objects[name] = obj

    def unregister(self, name: str) -> None:
        """Removes a run-time registration (built-ins and entry points stay)."""
        if self._extra.pop(name, None) is not None:
            self._objects.pop(name, None)

    # ------------------------------------------------------------------ lookup
    def get(self, name: str) -> Any:
        """The object registered under ``name``, imported on first use.

        Raises:
            UnknownNameError: unknown name (a ``ValueError`` and a ``KeyError``; the message lists the valid
                names and the closest match).
            ImportError: the registered target cannot be imported (names the distribution).
            TypeError: the target is not of this registry's kind.
        """
        if name in self._objects:
            return self._objects[name]
        specs = self.available()
        if name not in specs:
            close = difflib.get_close_matches(str(name), list(specs), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise UnknownNameError(f"unknown {self.kind} {name!r}{hint}; valid names: {', '.join(specs)}")
        spec = specs[name]
        module_name, _, attr = spec.target.partition(":")
        try:
            obj: Any = importlib.import_module(module_name)
            for part in attr.split("."):
                obj = getattr(obj, part)
        except (ImportError, AttributeError) as err:
            raise ImportError(f"{self.kind} {name!r} from {spec.distribution} {spec.version} points at "
                              f"{spec.target}, which cannot be imported: {err}") from err
        if self._check is not None:
            self._check(name, obj)
        self._objects[name] = obj
        return obj

    def provenance(self, name: str) -> dict[str, str]:
        """``{"name", "distribution", "version", "target"}`` of a registered entry, for metrics.json."""
        spec = self.available()[name]
        return {"name": name, "distribution": spec.distribution, "version": spec.version, "target": spec.target}


def _subclass_check(base_target: str, kind: str) -> Callable[[str, Any], None]:
    """A kind check that imports the base class only when an object is first checked (keeps torch out)."""

    def check(name: str, obj: Any) -> None:
        module_name, _, attr = base_target.partition(":")
        base = getattr(importlib.import_module(module_name), attr)
        if not (isinstance(obj, type) and issubclass(obj, base)):
            raise TypeError(f"{kind} {name!r} must be a subclass of {base_target.replace(':', '.')}, got {obj!r}")

    return check


#: Token reducers (mergers and pruners); names equal ``configs/merger|pruner/<name>.yaml`` stems.
REDUCERS = Registry("reducer", "tokred.reducers", {
    "none": "tokred.reducers.none:NoReducer",
    "dcts": "tokred.reducers.dcts:DCTS",
    "cts": "tokred.reducers.dcts:CTS",
    "tome": "tokred.reducers.tome:ToMe",
    "cropr": "tokred.reducers.cropr:Cropr",
    "early_exit": "tokred.reducers.early_exit:EarlyExit",
}, check=_subclass_check("tokred.reducers.base:Reducer", "reducer"))

#: Backbone-family adapters: how the encoder loop embeds, runs attention and reads keys for a family.
BACKBONES = Registry("backbone adapter", "tokred.backbones", {
    "vit": "tokred.backbones.vit:VisionTransformerAdapter",
    "eva": "tokred.backbones.eva:EvaAdapter",
}, check=_subclass_check("tokred.backbones.base:BackboneAdapter", "backbone adapter"))

#: Decoders on the restored patch grid (and encoder taps); names equal ``configs/decoder/<name>.yaml`` stems.
DECODERS = Registry("decoder", "tokred.decoders", {
    "linear": "tokred.models.decoders:LinearDecoder",
    "mask_transformer": "tokred.models.decoders:MaskTransformerDecoder",
}, check=_subclass_check("tokred.models.decoders:Decoder", "decoder"))

#: Dataset specs (classes, palette, folder layout, label mapping, test pipeline); one file each.
DATASETS = Registry("dataset", "tokred.datasets", {
    "camvid": "tokred.data.camvid:CAMVID",
    "camvid_sample": "tokred.data.camvid:CAMVID_SAMPLE",
    "ade20k": "tokred.data.ade20k:ADE20K",
    "cityscapes": "tokred.data.cityscapes:CITYSCAPES",
})

#: Every registry by kind, for ``python -m tokred list``.
REGISTRIES: dict[str, Registry] = {"reducers": REDUCERS, "backbones": BACKBONES, "decoders": DECODERS,
                                   "datasets": DATASETS}
