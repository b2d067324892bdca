"""Semantic segmentation data set: label mapping, per-item validation and transforms.

File discovery lives with each data set's spec (``tokred/data/camvid.py``, ...); the ``*_files`` and ``*_lut``
functions are re-exported here for older imports.

Every item is ``(image, label)``: image float32 [3, H, W] normalised with the given mean/std (the weights'),
label int64 [H, W] of train ids ``0 .. num_classes - 1`` with ``255`` for ignored pixels.
Raw label values are mapped with a 256-entry lookup table; a raw value the table does not
know is an error (never clamped).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import tv_tensors

from tokred.data.ade20k import ade20k_files, ade20k_lut
from tokred.data.camvid import camvid_files, camvid_lut
from tokred.data.cityscapes import cityscapes_files, cityscapes_lut
from tokred.data.spec import INVALID_LABEL, DatasetSpec, TestPipeline
from tokred.data.transforms import build_eval_transform, build_protocol_transform, build_train_transform

__all__ = [
    "SegmentationDataset",
    "ade20k_files",
    "ade20k_lut",
    "camvid_files",
    "camvid_lut",
    "cityscapes_files",
    "cityscapes_lut",
]

logger = logging.getLogger(__name__)

#: Entry of a lookup table marking a raw label value as invalid.
_INVALID = INVALID_LABEL


def _open_image(path: Path, rgb: bool) -> np.ndarray:
    """Decodes an image file.

    Args:
        path: Image file.
        rgb: If True convert to RGB; otherwise return the stored values (label maps).

    Returns:
        uint8 array [H, W, 3] when ``rgb``, else the raw array (usually [H, W]).

    Raises:
        OSError: If the file cannot be opened or decoded; names the file.
    """
    try:
        with Image.open(path) as img:
            # Palette ("P") labels decode to their indices, which are the class values.
            return np.array(img.convert("RGB")) if rgb else np.array(img)
    except (OSError, SyntaxError, ValueError) as exc:  # PIL signals corrupt files with these
        raise OSError(
            f"cannot read image file {path}: {exc}. Fix: re-export or replace the file "
            "(it is missing, truncated or not an image)."
        ) from exc


class SegmentationDataset(Dataset):
    """Map-style data set of (image, label) pairs with train or eval transforms.

    Items are ``(image, label)``:

    * ``train=True``: image float32 [3, crop_H, crop_W] and label int64 [crop_H, crop_W]
      after joint random rescale/crop/flip (and image-only colour jitter).
    * ``train=False``: image float32 [3, crop_H, crop_W] (bilinear resize to ``crop_size``;
      the original [3, H, W] when ``crop_size`` is None; with ``test_pipeline`` the protocol's
      resize, e.g. ADE20K short side 512 px, so sizes differ per image) and label int64 [H, W] at
      the label file's ORIGINAL resolution; the evaluator upsamples logits to the label's size.

    Images are normalised with ``mean``/``std`` (default: the spec's, ImageNet); labels hold train ids with
    255 = ignore.

    Attributes:
        info: Label-space description of the data set.
        files: (image_path, label_path) pairs, one per item.
        train: Whether training augmentation is applied.
    """

    def __init__(
        self,
        files: Sequence[tuple[Path, Path]],
        info: DatasetSpec,
        lut: np.ndarray,
        train: bool,
        crop_size: tuple[int, int] | None,
        scale_range: tuple[float, float] = (0.5, 2.0),
        base_size: tuple[int, int] | None = None,
        hflip: bool = True,
        photometric: bool = True,
        test_pipeline: TestPipeline | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        """Creates the data set.

        Args:
            files: (image_path, label_path) pairs.
            info: Label-space description.
            lut: int16 [256] raw-label-to-train-id table; -1 marks invalid raw values.
            train: Apply training augmentation (True) or the eval transform (False).
            crop_size: Training crop / eval input size (H, W) in px; may be None for eval only.
            scale_range: Random scale range for training.
            base_size: Reference size (H, W) in px for the training rescale; defaults to
                ``crop_size``.
            hflip: Random horizontal flip in training.
            photometric: Colour jitter in training.
            test_pipeline: eval only: apply this protocol's resize rule instead of resizing to ``crop_size``
                (``dataset.test_pipeline=protocol``).
            mean / std: per-channel RGB normalisation of [0, 1] images (3 floats each); None: the spec's.

        Raises:
            ValueError: If ``files`` is empty, ``lut`` has the wrong shape, or ``train`` is
                True with ``crop_size`` None (or any size/scale argument is invalid).
        """
        if not files:
            raise ValueError(f"dataset {info.name!r} has no files")
        lut = np.asarray(lut)
        if lut.shape != (256,):
            raise ValueError(f"lut must have shape [256], got {list(lut.shape)}")
        self.info = info
        self.files: list[tuple[Path, Path]] = [(Path(img), Path(lbl)) for img, lbl in files]
        self.train = bool(train)
        self._lut = lut.astype(np.int16)
        norm = {"mean": tuple(info.mean if mean is None else mean), "std": tuple(info.std if std is None else std)}
        self.mean, self.std = norm["mean"], norm["std"]
        if self.train:
            if crop_size is None:
                raise ValueError("crop_size (H, W) in px is required when train=True")
            self._transform = build_train_transform(
                crop_size, scale_range, base_size, hflip, photometric, **norm
            )
        elif test_pipeline is not None:
            self._transform = build_protocol_transform(test_pipeline, **norm)
        else:
            self._transform = build_eval_transform(crop_size, **norm)
        logger.debug("dataset %s: %d items, train=%s", info.name, len(self.files), self.train)

    def __len__(self) -> int:
        """Returns the number of items."""
        return len(self.files)

    def _load_label(self, label_path: Path) -> np.ndarray:
        """Reads a label map and converts raw values to train ids.

        Args:
            label_path: Single-channel label image.

        Returns:
            uint8 array [H, W] of train ids with 255 = ignore.

        Raises:
            OSError: If the file cannot be decoded.
            ValueError: If the label is not single-channel or holds values the data set does
                not define; names the file and the offending values.
        """
        raw = _open_image(label_path, rgb=False)
        if raw.ndim != 2:
            raise ValueError(
                f"label file {label_path} has shape {list(raw.shape)}; expected a "
                "single-channel [H, W] label map. Fix: save labels as 8-bit grayscale PNG."
            )
        raw = raw.astype(np.int64, copy=False)
        in_range = (raw >= 0) & (raw < 256)
        mapped = np.full(raw.shape, _INVALID, dtype=np.int16)
        mapped[in_range] = self._lut[raw[in_range]]
        bad = mapped == _INVALID
        if bad.any():
            offending = np.unique(raw[bad])
            valid = np.flatnonzero(self._lut != _INVALID)
            raise ValueError(
                f"label file {label_path} contains values {offending.tolist()[:20]} that are "
                f"not valid for dataset {self.info.name!r} (valid raw values: {_compact(valid)}). "
                "Fix: check the label encoding or the dataset name."
            )
        return mapped.astype(np.uint8)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Loads, validates and transforms one item.

        Args:
            index: Item index in ``[0, len(self))``.

        Returns:
            (image, label): image float32 [3, H', W'] normalised; label int64 [H'', W''] with
            train ids and 255 = ignore (see the class docstring for the sizes).

        Raises:
            IndexError: If ``index`` is out of range.
            OSError: If the image or label cannot be decoded; names the file.
            ValueError: If image and label sizes differ (names both files) or the label holds
                invalid values (names the file and the values).
        """
        image_path, label_path = self.files[index]
        image = _open_image(image_path, rgb=True)
        label = self._load_label(label_path)
        if image.shape[:2] != label.shape:
            raise ValueError(
                f"image {image_path} is {image.shape[0]}x{image.shape[1]} px (HxW) but label "
                f"{label_path} is {label.shape[0]}x{label.shape[1]} px. Fix: the pair must "
                "have the same size."
            )
        img_t = tv_tensors.Image(torch.from_numpy(image).permute(2, 0, 1))
        lbl_t = tv_tensors.Mask(torch.from_numpy(label)[None])
        if self.train:
            img_out, lbl_out = self._transform(img_t, lbl_t)
            return img_out.as_subclass(torch.Tensor), lbl_out.as_subclass(torch.Tensor)[0]
        img_out = self._transform(img_t)
        return img_out.as_subclass(torch.Tensor), lbl_t.as_subclass(torch.Tensor)[0].long()


def _compact(values: np.ndarray) -> str:
    """Formats sorted ints as ranges, e.g. ``[0-10, 255]``.

    Args:
        values: Sorted 1-D integer array.

    Returns:
        The compact text form.
    """
    parts: list[str] = []
    start = prev = int(values[0])
    for v in [int(x) for x in values[1:]] + [None]:
        if v is not None and v == prev + 1:
            prev = v
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if v is not None:
            start = prev = v
    return "[" + ", ".join(parts) + "]"
