"""Registry of reducers: built-ins by explicit short names, plugins through the ``tokred.reducers`` entry points.

Names equal the config file stems (``configs/merger/<name>.yaml`` or ``configs/pruner/<name>.yaml``).
Built-ins are imported lazily (only when built); a name registered twice raises. Every entry records the
distribution and version that supplied it, so results can say where each reducer came from.

A plugin distribution declares, in its pyproject.toml::

    [project.entry-points."tokred.reducers"]
    random_prune = "my_package.module:RandomPruner"
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from importlib import metadata
from typing import Any

from tokred.reducers.base import Reducer

__all__ = ["ReducerSpec", "available_reducers", "create_reducer", "get_reducer_class", "register_reducer"]

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "tokred.reducers"

# name -> "module:Class"; kept as strings so importing tokred does not import every reducer.
_BUILTINS: dict[str, str] = {
    "none": "tokred.reducers.none:NoReducer",
    "dcts": "tokred.reducers.dcts:DCTS",
    "cts": "tokred.reducers.dcts:CTS",
    "tome": "tokred.reducers.tome:ToMe",
    "cropr": "tokred.reducers.cropr:Cropr",
    "early_exit": "tokred.reducers.early_exit:EarlyExit",
}


@dataclass(frozen=True)
class ReducerSpec:
    """Where a reducer comes from.

    Attributes:
        name: short name (config file stem).
        target: ``"module:Class"``.
        distribution: the installed distribution that supplied it (``"tokred"`` for built-ins).
        version: that distribution's version.
        origin: ``"builtin"``, ``"entry_point"`` or ``"runtime"`` (``register_reducer``).
    """

    name: str
    target: str
    distribution: str
    version: str
    origin: str


_extra: dict[str, ReducerSpec] = {}
_classes: dict[str, type[Reducer]] = {}


def _tokred_version() -> str:
    from tokred import __version__

    return __version__


def register_reducer(name: str, cls: type[Reducer], distribution: str = "<runtime>", version: str = "") -> None:
    """Registers a reducer class at run time (tests, notebooks). Prefer entry points for distributions.

    Raises:
        ValueError: ``name`` is already registered, or ``cls`` is not a ``Reducer`` subclass.
    """
    if not (isinstance(cls, type) and issubclass(cls, Reducer)):
        raise ValueError(f"reducer {name!r} must be a subclass of tokred.reducers.base.Reducer, got {cls!r}")
    if name in available_reducers():
        raise ValueError(f"reducer name {name!r} is already registered by "
                         f"{available_reducers()[name].distribution}; choose another name")
    _extra[name] = ReducerSpec(name, f"{cls.__module__}:{cls.__qualname__}", distribution, version, "runtime")
    _classes[name] = cls


def unregister_reducer(name: str) -> None:
    """Removes a reducer registered with ``register_reducer`` (built-ins and entry points stay)."""
    if _extra.pop(name, None) is not None:
        _classes.pop(name, None)


def _entry_point_specs() -> dict[str, ReducerSpec]:
    specs: dict[str, ReducerSpec] = {}
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist = ep.dist.name if ep.dist is not None else "<unknown>"
        ver = ep.dist.version if ep.dist is not None else ""
        if ep.name in specs and specs[ep.name].target != ep.value:
            raise ValueError(f"reducer {ep.name!r} is declared by two distributions ({specs[ep.name].distribution} "
                             f"and {dist}); uninstall one or rename its entry point")
        specs[ep.name] = ReducerSpec(ep.name, ep.value, dist, ver, "entry_point")
    return specs


def available_reducers() -> dict[str, ReducerSpec]:
    """Every reducer name with its source, sorted by name.

    Raises:
        ValueError: a plugin reuses a built-in name or two plugins share a name.
    """
    specs = {n: ReducerSpec(n, t, "tokred", _tokred_version(), "builtin") for n, t in _BUILTINS.items()}
    for name, spec in _entry_point_specs().items():
        if name in specs:
            raise ValueError(f"plugin {spec.distribution} registers reducer {name!r}, which is a tokred built-in; "
                             "rename the plugin's entry point")
        specs[name] = spec
    for name, spec in _extra.items():
        specs.setdefault(name, spec)
    return dict(sorted(specs.items()))


def get_reducer_class(name: str) -> type[Reducer]:
    """The class registered under ``name``, imported on first use.

    Raises:
        KeyError: unknown name (the message lists the valid names).
        ImportError: the registered target cannot be imported (names the distribution).
    """
    if name in _classes:
        return _classes[name]
    specs = available_reducers()
    if name not in specs:
        raise KeyError(f"unknown reducer {name!r}; valid names: {', '.join(specs)}")
    spec = specs[name]
    module_name, _, attr = spec.target.partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ImportError(f"reducer {name!r} from {spec.distribution} {spec.version} points at {spec.target}, "
                          f"which cannot be imported: {err}") from err
    if not (isinstance(cls, type) and issubclass(cls, Reducer)):
        raise TypeError(f"reducer {name!r} ({spec.target}) is not a tokred Reducer subclass")
    _classes[name] = cls
    return cls


def create_reducer(name: str, **kwargs: Any) -> Reducer:
    """Builds a reducer by short name, without Hydra: ``create_reducer("tome", r=8)``.

    Raises:
        KeyError: unknown name (valid names listed).
        TypeError: a keyword the reducer does not take (its signature is named).
    """
    cls = get_reducer_class(name)
    try:
        reducer = cls(**kwargs)
    except TypeError as err:
        import inspect

        raise TypeError(f"reducer {name!r} does not accept {sorted(kwargs)}: {err}; "
                        f"signature: {cls.__name__}{inspect.signature(cls.__init__)}") from err
    reducer.registry_name = name  # type: ignore[attr-defined]
    return reducer


def reducer_provenance(name: str) -> dict[str, str]:
    """``{"name", "distribution", "version", "target"}`` of a registered reducer, for metrics.json."""
    spec = available_reducers()[name]
    return {"name": name, "distribution": spec.distribution, "version": spec.version, "target": spec.target}
