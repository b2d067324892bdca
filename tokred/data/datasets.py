"""Semantic segmentation data sets: file discovery, label mapping and per-item validation.

Every item is ``(image, label)``: image float32 [3, H, W] normalised with ImageNet mean/std,
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

from tokred.data.info import IGNORE_INDEX, DatasetInfo
from tokred.data.transforms import build_eval_transform, build_train_transform

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
_INVALID = -1

_CAMVID_PREFIX = "/SegNet/CamVid/"
_CAMVID_SPLITS = ("train", "val", "test")
_ADE_SPLITS = {"train": "training", "val": "validation"}
_CITYSCAPES_SPLITS = ("train", "val", "test")

# Cityscapes label id -> train id (19 evaluated classes); every other id is ignored.
_CITYSCAPES_ID_TO_TRAIN = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9,
    23: 10, 24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}  # fmt: skip
_CITYSCAPES_NUM_IDS = 34  # label ids 0..33 are defined


def camvid_lut() -> np.ndarray:
    """Returns the raw-to-train-id table of the SegNet CamVid labels.

    Raw 0..10 are the classes (kept), 11 (Unlabelled) and 255 (already ignored) map to 255,
    anything else is invalid.

    Returns:
        int16 array [256]; entry -1 marks an invalid raw value.
    """
    lut = np.full(256, _INVALID, dtype=np.int16)
    lut[:11] = np.arange(11)
    lut[11] = IGNORE_INDEX
    lut[IGNORE_INDEX] = IGNORE_INDEX
    return lut


def ade20k_lut() -> np.ndarray:
    """Returns the raw-to-train-id table of ADEChallengeData2016 labels.

    Raw 0 ("other") maps to 255, raw 1..150 map to 0..149, anything else is invalid.

    Returns:
        int16 array [256]; entry -1 marks an invalid raw value.
    """
    lut = np.full(256, _INVALID, dtype=np.int16)
    lut[0] = IGNORE_INDEX
    lut[1:151] = np.arange(150)
    return lut


def cityscapes_lut() -> np.ndarray:
    """Returns the label-id-to-train-id table of Cityscapes ``*_gtFine_labelIds.png``.

    The 19 evaluated label ids map to train ids 0..18, the other defined ids (0..33) map to
    255, anything above 33 is invalid.

    Returns:
        int16 array [256]; entry -1 marks an invalid raw value.
    """
    lut = np.full(256, _INVALID, dtype=np.int16)
    lut[:_CITYSCAPES_NUM_IDS] = IGNORE_INDEX
    for label_id, train_id in _CITYSCAPES_ID_TO_TRAIN.items():
        lut[label_id] = train_id
    return lut


def _require_dir(path: Path, layout: str) -> None:
    """Raises if ``path`` is not an existing directory.

    Args:
        path: Directory that must exist.
        layout: Description of the expected layout, for the message.

    Raises:
        FileNotFoundError: If ``path`` is not a directory; names it and the expected layout.
    """
    if not path.is_dir():
        raise FileNotFoundError(
            f"expected directory {path} does not exist. Expected layout: {layout}. "
            "Fix: point dataset.root=... at the folder holding that layout."
        )


def camvid_files(root: Path, split: str) -> list[tuple[Path, Path]]:
    """Lists the (image, label) pairs of a CamVid split in the SegNet layout.

    Layout: ``root/{train,val,test}.txt`` with lines ``<image> <label>``; a leading
    ``/SegNet/CamVid/`` is stripped and the rest resolved relative to ``root``.

    Args:
        root: Folder holding the list files.
        split: One of "train", "val", "test".

    Returns:
        (image_path, label_path) pairs in list-file order.

    Raises:
        ValueError: If the split is unknown or a list line is malformed.
        FileNotFoundError: If ``root``, the list file or a listed file is missing.
    """
    if split not in _CAMVID_SPLITS:
        raise ValueError(f"CamVid split {split!r} unknown; valid splits: {', '.join(_CAMVID_SPLITS)}")
    layout = (
        "root/{train,val,test}.txt listing '<image> <label>' pairs "
        f"(prefix {_CAMVID_PREFIX} stripped, relative to root), e.g. train/X.png trainannot/X.png"
    )
    _require_dir(root, layout)
    list_file = root / f"{split}.txt"
    if not list_file.is_file():
        raise FileNotFoundError(
            f"CamVid list file {list_file} not found. Expected layout: {layout}. "
            "Fix: point dataset.root=... at the SegNet CamVid folder."
        )
    pairs: list[tuple[Path, Path]] = []
    for lineno, line in enumerate(list_file.read_text().splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2:
            raise ValueError(
                f"{list_file}:{lineno}: expected '<image> <label>', got {line.strip()!r}"
            )
        pair = []
        for entry in fields:
            rel = entry[len(_CAMVID_PREFIX):] if entry.startswith(_CAMVID_PREFIX) else entry
            path = root / rel.lstrip("/")
            if not path.is_file():
                raise FileNotFoundError(
                    f"{list_file}:{lineno} references {path}, which does not exist. "
                    "Fix: restore the file or remove the line from the list."
                )
            pair.append(path)
        pairs.append((pair[0], pair[1]))
    if not pairs:
        raise FileNotFoundError(f"CamVid list file {list_file} lists no images")
    return pairs


def ade20k_files(root: Path, split: str) -> list[tuple[Path, Path]]:
    """Lists the (image, label) pairs of an ADEChallengeData2016 split.

    Layout: ``root/images/{training,validation}/*.jpg`` and
    ``root/annotations/{training,validation}/*.png`` with matching stems.

    Args:
        root: The ``ADEChallengeData2016`` folder.
        split: "train" (-> training) or "val" (-> validation).

    Returns:
        (image_path, label_path) pairs sorted by file name.

    Raises:
        ValueError: If the split is unknown.
        FileNotFoundError: If the folders are missing, empty, or an image lacks its label.
    """
    if split not in _ADE_SPLITS:
        raise ValueError(f"ADE20K split {split!r} unknown; valid splits: {', '.join(_ADE_SPLITS)}")
    sub = _ADE_SPLITS[split]
    layout = "root/images/{training,validation}/*.jpg and root/annotations/{training,validation}/*.png"
    image_dir, label_dir = root / "images" / sub, root / "annotations" / sub
    _require_dir(root, layout)
    _require_dir(image_dir, layout)
    _require_dir(label_dir, layout)
    images = sorted(image_dir.glob("*.jpg"))
    if not images:
        raise FileNotFoundError(f"no *.jpg images in {image_dir}. Expected layout: {layout}")
    pairs = []
    for image in images:
        label = label_dir / f"{image.stem}.png"
        if not label.is_file():
            raise FileNotFoundError(
                f"label {label} for image {image} does not exist. Expected layout: {layout}"
            )
        pairs.append((image, label))
    return pairs


def cityscapes_files(root: Path, split: str) -> list[tuple[Path, Path]]:
    """Lists the (image, label) pairs of a Cityscapes split (fine annotations).

    Layout: ``root/leftImg8bit/{split}/{city}/*_leftImg8bit.png`` and
    ``root/gtFine/{split}/{city}/*_gtFine_labelIds.png``.

    Args:
        root: The Cityscapes folder holding ``leftImg8bit`` and ``gtFine``.
        split: One of "train", "val", "test".

    Returns:
        (image_path, label_path) pairs sorted by city and file name.

    Raises:
        ValueError: If the split is unknown.
        FileNotFoundError: If the folders are missing, empty, or an image lacks its label.
    """
    if split not in _CITYSCAPES_SPLITS:
        raise ValueError(
            f"Cityscapes split {split!r} unknown; valid splits: {', '.join(_CITYSCAPES_SPLITS)}"
        )
    layout = (
        "root/leftImg8bit/{split}/{city}/*_leftImg8bit.png and "
        "root/gtFine/{split}/{city}/*_gtFine_labelIds.png"
    )
    image_dir, label_dir = root / "leftImg8bit" / split, root / "gtFine" / split
    _require_dir(root, layout)
    _require_dir(image_dir, layout)
    _require_dir(label_dir, layout)
    suffix = "_leftImg8bit.png"
    images = sorted(image_dir.glob(f"*/*{suffix}"))
    if not images:
        raise FileNotFoundError(f"no */*{suffix} images in {image_dir}. Expected layout: {layout}")
    pairs = []
    for image in images:
        stem = image.name[: -len(suffix)]
        label = label_dir / image.parent.name / f"{stem}_gtFine_labelIds.png"
        if not label.is_file():
            raise FileNotFoundError(
                f"label {label} for image {image} does not exist. Expected layout: {layout}"
            )
        pairs.append((image, label))
    return pairs


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
      the original [3, H, W] when ``crop_size`` is None) and label int64 [H, W] at the
      label file's ORIGINAL resolution; the evaluator upsamples logits to the label's size.

    Images are normalised with ImageNet mean/std; labels hold train ids with 255 = ignore.

    Attributes:
        info: Label-space description of the data set.
        files: (image_path, label_path) pairs, one per item.
        train: Whether training augmentation is applied.
    """

    def __init__(
        self,
        files: Sequence[tuple[Path, Path]],
        info: DatasetInfo,
        lut: np.ndarray,
        train: bool,
        crop_size: tuple[int, int] | None,
        scale_range: tuple[float, float] = (0.5, 2.0),
        base_size: tuple[int, int] | None = None,
        hflip: bool = True,
        photometric: bool = True,
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
        if self.train:
            if crop_size is None:
                raise ValueError("crop_size (H, W) in px is required when train=True")
            self._transform = build_train_transform(
                crop_size, scale_range, base_size, hflip, photometric
            )
        else:
            self._transform = build_eval_transform(crop_size)
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
