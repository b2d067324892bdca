"""Reducer registry functions, a thin view of ``tokred.plugins.REDUCERS`` (the one registry of reducers).

Names equal the config file stems (``configs/merger/<name>.yaml`` or ``configs/pruner/<name>.yaml``).
Built-ins are imported lazily (only when built); a name registered twice raises. Every entry records the
distribution and version that supplied it, so results can say where each reducer came from.

A plugin distribution declares, in its pyproject.toml::

    [project.entry-points."tokred.reducers"]
    random_prune = "my_package.module:RandomPruner"
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any

from tokred.plugins import REDUCERS, PluginSpec

if TYPE_CHECKING:
    from tokred.reducers.base import Reducer

__all__ = ["ReducerSpec", "available_reducers", "create_reducer", "get_reducer_class", "reducer_provenance",
           "register_reducer", "unregister_reducer"]

ENTRY_POINT_GROUP = REDUCERS.group

#: Where a reducer comes from (``name``, ``target``, ``distribution``, ``version``, ``origin``).
ReducerSpec = PluginSpec


def register_reducer(name: str, cls: type[Reducer], distribution: str = "<runtime>", version: str = "") -> None:
    """Registers a reducer class at run time (tests, notebooks). Prefer entry points for distributions.

    Raises:
        ValueError: ``name`` is already registered.
        TypeError: ``cls`` is not a ``Reducer`` subclass.
    """
    REDUCERS.register(name, cls, distribution=distribution, version=version)


def unregister_reducer(name: str) -> None:
    """Removes a reducer registered with ``register_reducer`` (built-ins and entry points stay)."""
    REDUCERS.unregister(name)


def available_reducers() -> dict[str, PluginSpec]:
    """Every reducer name with its source, sorted by name.

    Raises:
        ValueError: a plugin reuses a built-in name or two plugins share a name.
    """
    return REDUCERS.available()


def get_reducer_class(name: str) -> type[Reducer]:
    """The class registered under ``name``, imported on first use.

    Raises:
        KeyError: unknown name (the message lists the valid names).
        ImportError: the registered target cannot be imported (names the distribution).
        TypeError: the target is not a tokred ``Reducer`` subclass.
    """
    return REDUCERS.get(name)


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
        raise TypeError(f"reducer {name!r} does not accept {sorted(kwargs)}: {err}; "
                        f"signature: {cls.__name__}{inspect.signature(cls.__init__)}") from err
    reducer.registry_name = name  # type: ignore[attr-defined]
    return reducer


def reducer_provenance(name: str) -> dict[str, str]:
    """``{"name", "distribution", "version", "target"}`` of a registered reducer, for metrics.json."""
    return REDUCERS.provenance(name)
