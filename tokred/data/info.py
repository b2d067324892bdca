"""Data set lookup by name through the registry :data:`tokred.plugins.DATASETS` (built-ins and plugins alike).

``DatasetInfo`` is kept as another name of :class:`tokred.data.spec.DatasetSpec`; the class lists stay importable
from here for older code.
"""

from __future__ import annotations

import difflib

from tokred.data.ade20k import ADE20K_CLASSES
from tokred.data.camvid import CAMVID_CLASSES
from tokred.data.cityscapes import CITYSCAPES_CLASSES
from tokred.data.spec import IGNORE_INDEX, IMAGENET_MEAN, IMAGENET_STD, DatasetSpec

__all__ = [
    "ADE20K_CLASSES",
    "CAMVID_CLASSES",
    "CITYSCAPES_CLASSES",
    "DATASET_NAMES",
    "IGNORE_INDEX",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "DatasetInfo",
    "check_name",
    "dataset_info",
    "dataset_names",
    "get_spec",
]

#: The old name of :class:`DatasetSpec` (a spec holds the label space and more).
DatasetInfo = DatasetSpec

#: tokred's built-in data sets, in documentation order; :func:`dataset_names` adds registered plugins.
DATASET_NAMES: tuple[str, ...] = ("camvid", "camvid_sample", "ade20k", "cityscapes")


def dataset_names() -> tuple[str, ...]:
    """Every registered data set: the built-ins (``DATASET_NAMES`` order), then plugins sorted by name."""
    from tokred.plugins import DATASETS

    registered = DATASETS.names()
    return tuple(n for n in DATASET_NAMES if n in registered) + tuple(n for n in registered if n not in DATASET_NAMES)


def check_name(name: str) -> str:
    """Normalises (strip, lower case) and validates a data set name.

    Raises:
        ValueError: the name is not registered; the message lists the registered names and a close match.
    """
    key = str(name).strip().lower()
    names = dataset_names()
    if key not in names:
        close = difflib.get_close_matches(key, names, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown dataset {name!r}{hint}; valid names are: {', '.join(names)}. A plugin adds one "
                         "through the entry-point group tokred.datasets (or tokred.plugins.DATASETS.register).")
    return key


def get_spec(name: str) -> DatasetSpec:
    """The registered :class:`DatasetSpec` of ``name`` (case-insensitive).

    Raises:
        ValueError: unknown name (lists the registered ones).
        TypeError: the registered object is not a ``DatasetSpec``.
    """
    from tokred.plugins import DATASETS

    key = check_name(name)
    spec = DATASETS.get(key)
    if not isinstance(spec, DatasetSpec):
        raise TypeError(f"dataset {key!r} is registered as {spec!r}, not a tokred.data.spec.DatasetSpec; "
                        "register a DatasetSpec object")
    return spec


def dataset_info(name: str) -> DatasetSpec:
    """The data set's spec (classes, ignore value, palette, layout, test pipeline); see :func:`get_spec`.

    Raises:
        ValueError: unknown name (lists the registered ones).
    """
    return get_spec(name)
