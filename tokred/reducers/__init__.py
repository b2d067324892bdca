"""Token reducers (mergers and pruners) and their registry."""

from tokred.reducers.base import BackboneInfo, Merger, Pruner, Reducer
from tokred.reducers.registry import (
    ReducerSpec,
    available_reducers,
    create_reducer,
    get_reducer_class,
    reducer_provenance,
    register_reducer,
    unregister_reducer,
)

__all__ = [
    "BackboneInfo", "Merger", "Pruner", "Reducer", "ReducerSpec", "available_reducers", "create_reducer",
    "get_reducer_class", "reducer_provenance", "register_reducer", "unregister_reducer",
]
