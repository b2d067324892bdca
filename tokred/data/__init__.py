"""Data layer of tokred: data set registry, loaders and joint image/label transforms.

Every data set item is ``(image, label)``: image float32 [3, H, W] normalised with
``IMAGENET_MEAN``/``IMAGENET_STD``; label int64 [H, W] of train ids with 255 = ignore. In eval
mode the label keeps its original resolution (see :func:`build_dataset`).
"""

from tokred.data.build import build_dataset, default_sample_root
from tokred.data.datasets import SegmentationDataset
from tokred.data.info import (
    DATASET_NAMES,
    IGNORE_INDEX,
    IMAGENET_MEAN,
    IMAGENET_STD,
    DatasetInfo,
    dataset_info,
)

__all__ = [
    "DATASET_NAMES",
    "IGNORE_INDEX",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "DatasetInfo",
    "SegmentationDataset",
    "build_dataset",
    "dataset_info",
    "default_sample_root",
]
