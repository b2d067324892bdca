"""Data layer of tokred: data set specs and registry, loaders, joint image/label transforms, eval collate.

Every data set item is ``(image, label)``: image float32 [3, H, W] normalised with the mean/std the weights
need (``normalization=``, :mod:`tokred.data.normalization`; the spec's ImageNet statistics by default); label
int64 [H, W] of train ids with 255 = ignore. In eval mode the label keeps its original resolution (see
:func:`build_dataset`). A data set is one :class:`DatasetSpec` registered in ``tokred.plugins.DATASETS``
(``tokred/data/camvid.py``, ``ade20k.py``, ``cityscapes.py``).

Names are imported on first access, so looking up a spec (``tokred.plugins.DATASETS.get("camvid")``,
``tokred.data.spec``) does not import torch; the loaders do.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "TEST_PIPELINES": "build", "InferenceSettings": "build", "build_dataset": "build",
    "default_sample_root": "build", "eval_collate": "build", "eval_inference": "build",
    "SegmentationDataset": "datasets",
    "DATASET_NAMES": "info", "DatasetInfo": "info", "check_name": "info", "dataset_info": "info",
    "dataset_names": "info", "get_spec": "info",
    "IGNORE_INDEX": "spec", "IMAGENET_MEAN": "spec", "IMAGENET_STD": "spec", "DatasetSpec": "spec",
    "TestPipeline": "spec",
    "Normalization": "normalization", "parse_normalization": "normalization",
}  # fmt: skip

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'tokred.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"tokred.data.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
