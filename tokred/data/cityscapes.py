"""Cityscapes, fine annotations, 19 evaluated classes (Cordts et al., CVPR 2016).

Test pipeline as mmsegmentation's Cityscapes configs: full resolution 1024x2048 px (``Resize(scale=(2048, 1024),
keep_ratio=True)`` leaves it unchanged), sliding windows of 768x768 px every 512 px.
"""

from __future__ import annotations

from pathlib import Path

from tokred.data.spec import (DatasetSpec, TestPipeline, check_split, lut_from_mapping, pair_with_labels,
                              require_dir)

__all__ = ["CITYSCAPES", "CITYSCAPES_768", "CITYSCAPES_CLASSES", "CITYSCAPES_PALETTE", "cityscapes_files",
           "cityscapes_lut"]

CITYSCAPES_CLASSES: tuple[str, ...] = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light",
    "traffic sign", "vegetation", "terrain", "sky", "person", "rider", "car",
    "truck", "bus", "train", "motorcycle", "bicycle",
)  # fmt: skip

#: The official Cityscapes colours (cityscapesScripts labels.py), RGB, indexed by train id.
CITYSCAPES_PALETTE: tuple[tuple[int, int, int], ...] = (
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
    (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60),
    (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32))

# label id -> train id of the 19 evaluated classes; the other defined ids 0..33 are ignored.
_ID_TO_TRAIN = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9,
    23: 10, 24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}  # fmt: skip
_NUM_IDS = 34
_SPLITS = ("train", "val", "test")
LAYOUT = "root/leftImg8bit/{split}/{city}/*_leftImg8bit.png and root/gtFine/{split}/{city}/*_gtFine_labelIds.png"


def cityscapes_lut():
    """``int16 [256]`` table: the 19 evaluated label ids -> 0..18, other ids 0..33 -> 255, above 33 -1."""
    return CITYSCAPES.lut_array()


def cityscapes_files(root: Path, split: str) -> list[tuple[Path, Path]]:
    """Lists the (image, label) pairs of a Cityscapes split (fine annotations).

    Layout: ``root/leftImg8bit/{split}/{city}/*_leftImg8bit.png`` and
    ``root/gtFine/{split}/{city}/*_gtFine_labelIds.png``.

    Args:
        root: the Cityscapes folder holding ``leftImg8bit`` and ``gtFine``.
        split: one of "train", "val", "test".

    Returns:
        (image_path, label_path) pairs sorted by city and file name.

    Raises:
        ValueError: the split is unknown.
        FileNotFoundError: the folders are missing, empty, or an image lacks its label.
    """
    check_split("Cityscapes", split, _SPLITS)
    root = Path(root)
    image_dir, label_dir = root / "leftImg8bit" / split, root / "gtFine" / split
    for d in (root, image_dir, label_dir):
        require_dir(d, LAYOUT)
    suffix = "_leftImg8bit.png"
    images = sorted(image_dir.glob(f"*/*{suffix}"))
    if not images:
        raise FileNotFoundError(f"no */*{suffix} images in {image_dir}. Expected layout: {LAYOUT}")
    return pair_with_labels(
        images, lambda image: label_dir / image.parent.name / f"{image.name[:-len(suffix)]}_gtFine_labelIds.png",
        LAYOUT)


#: The test protocol (``dataset.protocol=768x768``, the default).
CITYSCAPES_768 = TestPipeline(resize="keep_ratio", scale=(1024, 2048), mode="slide", crop=(768, 768),
                              stride=(512, 512))

CITYSCAPES = DatasetSpec(
    name="cityscapes", num_classes=19, class_names=CITYSCAPES_CLASSES, palette=CITYSCAPES_PALETTE, layout=LAYOUT,
    files=cityscapes_files, splits=_SPLITS, eval_split="val",
    lut=lut_from_mapping(_ID_TO_TRAIN, ignored=[i for i in range(_NUM_IDS) if i not in _ID_TO_TRAIN]),
    test_pipeline=CITYSCAPES_768, protocols={"768x768": CITYSCAPES_768},
    citation="Cordts et al., The Cityscapes Dataset for Semantic Urban Scene Understanding, CVPR 2016")
