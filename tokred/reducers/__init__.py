"""Token reducers (mergers and pruners) and their registry.

The registry functions import no torch; the base classes (``Reducer``, ``Merger``, ``Pruner``,
``ScoredPruner``, ``BackboneInfo``) are loaded on first access, so ``import tokred.reducers`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

from tokred.reducers.registry import (
    ReducerSpec,
    available_reducers,
    create_reducer,
    get_reducer_class,
    reducer_provenance,
    register_reducer,
    unregister_reducer,
)

_LAZY = {"BackboneInfo": "tokred.reducers.base", "Merger": "tokred.reducers.base", "Pruner": "tokred.reducers.base",
         "Reducer": "tokred.reducers.base", "ScoredPruner": "tokred.reducers.prune",
         "select_topk": "tokred.reducers.prune"}

__all__ = [
    "BackboneInfo", "Merger", "Pruner", "Reducer", "ReducerSpec", "ScoredPruner", "available_reducers",
    "create_reducer", "get_reducer_class", "reducer_provenance", "register_reducer", "select_topk",
    "unregister_reducer",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'tokred.reducers' has no attribute {name!r}")
