"""ADE20K in the SceneParsing / ADEChallengeData2016 layout, 150 classes (Zhou et al., CVPR 2017).

Test pipelines as mmsegmentation's Segmenter ADE20K configs (``dataset.protocol=``):

* ``512x512`` (the default; ``segmenter_vit-*_8xb*-160k_ade20k-512x512``): resize keeping the aspect ratio so the
  short side is 512 px and the long side at most 2048 px (``Resize(scale=(2048, 512), keep_ratio=True)``), then
  sliding windows of 512x512 px every 480 px;
* ``640x640`` (``segmenter_vit-l_mask_8xb1-160k_ade20k-640x640``, the resolution of the Segmenter authors'
  released ViT-L/16 ADE20K model): short side 640 px, long side at most 2560 px
  (``Resize(scale=(2560, 640), keep_ratio=True)``), windows of 640x640 px every 608 px.
"""

from __future__ import annotations

from pathlib import Path

from tokred.data.spec import (DatasetSpec, TestPipeline, check_split, lut_from_mapping, pair_with_labels,
                              require_dir)

__all__ = ["ADE20K", "ADE20K_512", "ADE20K_640", "ADE20K_CLASSES", "ADE20K_PALETTE", "ade20k_files", "ade20k_lut"]

# SceneParsing class order (stored value k+1 -> train id k), short names.
ADE20K_CLASSES: tuple[str, ...] = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane",
    "grass", "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant",
    "curtain", "chair", "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror",
    "rug", "field", "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp",
    "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator",
    "grandstand", "path", "stairs", "runway", "case", "pool table", "pillow", "screen door",
    "stairway", "river", "bridge", "bookcase", "blind", "coffee table", "toilet", "flower",
    "book", "hill", "bench", "countertop", "stove", "palm", "kitchen island", "computer",
    "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus", "towel", "light",
    "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver",
    "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman",
    "bottle", "buffet", "poster", "stage", "van", "ship", "fountain", "conveyer belt",
    "canopy", "washer", "plaything", "swimming pool", "stool", "barrel", "basket",
    "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank",
    "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen",
    "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray", "ashcan",
    "fan", "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator",
    "glass", "clock", "flag",
)  # fmt: skip


def _spread_palette(k: int) -> tuple[tuple[int, int, int], ...]:
    """``k`` distinct RGB colours from a fixed integer hash (no official palette ships with the benchmark)."""
    colours = []
    for i in range(k):
        v = (i + 1) * 2654435761 % 2**24  # Knuth's multiplicative hash spreads consecutive ids over RGB
        colours.append(((v >> 16) & 255, (v >> 8) & 255, v & 255))
    return tuple(colours)


ADE20K_PALETTE = _spread_palette(len(ADE20K_CLASSES))
_SUBDIRS = {"train": "training", "val": "validation"}
LAYOUT = "root/images/{training,validation}/*.jpg and root/annotations/{training,validation}/*.png"


def ade20k_lut():
    """``int16 [256]`` table: stored 0 ("other") -> 255, 1..150 -> 0..149, anything else -1 (invalid)."""
    return ADE20K.lut_array()


def ade20k_files(root: Path, split: str) -> list[tuple[Path, Path]]:
    """Lists the (image, label) pairs of an ADEChallengeData2016 split.

    Layout: ``root/images/{training,validation}/*.jpg`` and ``root/annotations/{training,validation}/*.png``
    with matching stems.

    Args:
        root: the ``ADEChallengeData2016`` folder.
        split: "train" (-> training) or "val" (-> validation).

    Returns:
        (image_path, label_path) pairs sorted by file name.

    Raises:
        ValueError: the split is unknown.
        FileNotFoundError: the folders are missing, empty, or an image lacks its label.
    """
    check_split("ADE20K", split, tuple(_SUBDIRS))
    root = Path(root)
    sub = _SUBDIRS[split]
    image_dir, label_dir = root / "images" / sub, root / "annotations" / sub
    for d in (root, image_dir, label_dir):
        require_dir(d, LAYOUT)
    images = sorted(image_dir.glob("*.jpg"))
    if not images:
        raise FileNotFoundError(f"no *.jpg images in {image_dir}. Expected layout: {LAYOUT}")
    return pair_with_labels(images, lambda image: label_dir / f"{image.stem}.png", LAYOUT)


#: The two test protocols (``dataset.protocol=512x512 | 640x640``).
ADE20K_512 = TestPipeline(resize="keep_ratio", scale=(512, 2048), mode="slide", crop=(512, 512), stride=(480, 480))
ADE20K_640 = TestPipeline(resize="keep_ratio", scale=(640, 2560), mode="slide", crop=(640, 640), stride=(608, 608))

ADE20K = DatasetSpec(
    name="ade20k", num_classes=150, class_names=ADE20K_CLASSES, palette=ADE20K_PALETTE, layout=LAYOUT,
    files=ade20k_files, splits=("train", "val"), eval_split="val",
    lut=lut_from_mapping({i + 1: i for i in range(150)}, ignored=(0,)),
    test_pipeline=ADE20K_512, protocols={"512x512": ADE20K_512, "640x640": ADE20K_640},
    citation="Zhou et al., Scene Parsing through ADE20K Dataset, CVPR 2017")
