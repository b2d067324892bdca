"""Data set factory: name + root + split -> :class:`SegmentationDataset`."""

from __future__ import annotations

import logging
from pathlib import Path

from torch.utils.data import Dataset

from tokred.data.datasets import (
    SegmentationDataset,
    ade20k_files,
    ade20k_lut,
    camvid_files,
    camvid_lut,
    cityscapes_files,
    cityscapes_lut,
)
from tokred.data.info import check_name, dataset_info

__all__ = ["build_dataset", "default_sample_root"]

logger = logging.getLogger(__name__)

_FILES = {
    "camvid": camvid_files,
    "camvid_sample": camvid_files,
    "ade20k": ade20k_files,
    "cityscapes": cityscapes_files,
}
_LUTS = {
    "camvid": camvid_lut,
    "camvid_sample": camvid_lut,
    "ade20k": ade20k_lut,
    "cityscapes": cityscapes_lut,
}


def default_sample_root() -> Path:
    """Returns the folder of the CamVid sample embedded in the package.

    Returns:
        Path of ``tokred/data/camvid_sample`` (SegNet layout, splits "train" and "val").
    """
    return Path(__file__).resolve().parent / "camvid_sample"


def build_dataset(
    name: str,
    root: str | Path | None,
    split: str,
    crop_size: tuple[int, int] | None,
    train: bool,
    scale_range: tuple[float, float] = (0.5, 2.0),
    base_size: tuple[int, int] | None = None,
    hflip: bool = True,
    photometric: bool = True,
    max_items: int | None = None,
) -> Dataset:
    """Builds a segmentation data set.

    Items are ``(image, label)`` with image float32 [3, H, W] (ImageNet-normalised) and label
    int64 [H, W] (train ids, 255 = ignore). With ``train=True`` both are randomly rescaled,
    cropped to ``crop_size`` (padding: image 0, label 255) and flipped together, and the image
    is colour-jittered. With ``train=False`` the image is resized (bilinear) to ``crop_size``
    (kept at its size if ``crop_size`` is None) and the label stays at its ORIGINAL
    resolution, so the evaluator must upsample logits to the label's size.

    Args:
        name: One of ``DATASET_NAMES`` ("camvid", "camvid_sample", "ade20k", "cityscapes").
        root: Data set folder; may be None only for "camvid_sample" (uses
            :func:`default_sample_root`).
        split: "train", "val" or "test" ("test" not for ADE20K or the sample).
        crop_size: Training crop / eval input size (H, W) in px; None allowed for eval only.
        train: Whether to apply training augmentation.
        scale_range: (min, max) random scale on top of ``base_size`` (training).
        base_size: Size (H, W) in px the image is fitted into (aspect kept) before the random
            scale; defaults to ``crop_size`` (training).
        hflip: Random horizontal flip (training).
        photometric: Colour jitter on the image (training).
        max_items: Keep only the first ``max_items`` pairs (in list/sorted order); None = all.

    Returns:
        A :class:`SegmentationDataset` with ``.info`` and ``.files``.

    Raises:
        ValueError: Unknown name (lists the valid ones), unknown split, ``root`` None for a
            data set that needs one, bad sizes, or ``max_items`` < 1.
        FileNotFoundError: Missing root, wrong layout or a listed file missing (names the path
            and the expected layout).
    """
    key = check_name(name)
    info = dataset_info(key)
    if root is None:
        if key != "camvid_sample":
            raise ValueError(
                f"dataset {key!r} needs a root folder but root is None. "
                f"Fix: pass dataset.root=/path/to/{key} (e.g. dataset.root=../shared/data/CamVid "
                "for CamVid)."
            )
        root = default_sample_root()
    root_path = Path(root).expanduser()
    files = _FILES[key](root_path, split)
    if max_items is not None:
        if max_items < 1:
            raise ValueError(f"max_items must be >= 1 or None, got {max_items}")
        files = files[:max_items]
    logger.info("dataset %s/%s from %s: %d items (train=%s)", key, split, root_path, len(files), train)
    return SegmentationDataset(
        files,
        info,
        _LUTS[key](),
        train=train,
        crop_size=crop_size,
        scale_range=scale_range,
        base_size=base_size,
        hflip=hflip,
        photometric=photometric,
    )
