"""tokred: token reduction for ViT semantic segmentation on one shared Segmenter pipeline.

Library use without Hydra::

    import tokred
    seg = tokred.build_segmenter("vit_tiny", num_classes=11, crop_size=(384, 512), merger="tome",
                                 merger_kwargs={"r": 8})
    reducer = tokred.create_reducer("tome", r=8)

The names below are imported on first use, so ``import tokred`` (and ``python -m tokred list``) does not
import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

#: public name -> module that defines it.
_LAZY: dict[str, str] = {
    "EmbedContext": "tokred.encoder", "Encoder": "tokred.encoder",
    "SegOutput": "tokred.models", "Segmenter": "tokred.models", "build_segmenter": "tokred.models",
    "BackboneInfo": "tokred.reducers", "Merger": "tokred.reducers", "Pruner": "tokred.reducers",
    "Reducer": "tokred.reducers", "available_reducers": "tokred.reducers", "create_reducer": "tokred.reducers",
    "register_reducer": "tokred.reducers", "ScoredPruner": "tokred.reducers", "select_topk": "tokred.reducers",
    "AuxOutput": "tokred.state", "Bank": "tokred.state", "TokenState": "tokred.state", "merge_tokens": "tokred.state",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str) -> Any:
    """Imports a public name on first use.

    Raises:
        AttributeError: ``name`` is not a public name of tokred.
    """
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'tokred' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
