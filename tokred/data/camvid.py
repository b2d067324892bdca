"""CamVid in the SegNet 11-class layout (Brostow et al., Pattern Recognition Letters 2008; SegNet, TPAMI 2017).

``CAMVID`` is the full set (train 367 / val 101 / test 233, 360x480 px); ``CAMVID_SAMPLE`` is the 22-image
sample shipped in ``tokred/data/camvid_sample`` (same layout and labels) so a fresh clone runs end to end.
Test pipeline: native 360x480 px, whole-image inference (padded to 368x480 for patch_size 16).
"""

from __future__ import annotations

from pathlib import Path

from tokred.data.spec import (IGNORE_INDEX, DatasetSpec, TestPipeline, check_split, lut_from_mapping,
                              missing_files_error, require_dir)

__all__ = ["CAMVID", "CAMVID_CLASSES", "CAMVID_PALETTE", "CAMVID_SAMPLE", "camvid_files", "camvid_lut"]

CAMVID_CLASSES: tuple[str, ...] = (
    "Sky", "Building", "Pole", "Road", "Pavement", "Tree",
    "SignSymbol", "Fence", "Car", "Pedestrian", "Bicyclist",
)  # fmt: skip

#: The SegNet CamVid colours, RGB, indexed by train id.
CAMVID_PALETTE: tuple[tuple[int, int, int], ...] = (
    (128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (60, 40, 222), (128, 128, 0),
    (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0), (0, 128, 192))

_PREFIX = "/SegNet/CamVid/"
_SPLITS = ("train", "val", "test")
LAYOUT = ("root/{train,val,test}.txt listing '<image> <label>' pairs "
          f"(prefix {_PREFIX} stripped, relative to root), e.g. train/X.png trainannot/X.png")
_CITATION = ("Brostow, Fauqueur, Cipolla, Semantic object classes in video, PRL 2008; Badrinarayanan, Kendall, "
             "Cipolla, SegNet, TPAMI 2017")

# Stored 0..10 are the classes, 11 (Unlabelled) and 255 are ignored.
_LUT = lut_from_mapping({i: i for i in range(11)}, ignored=(11, IGNORE_INDEX))


def camvid_lut():
    """``int16 [256]`` stored-value -> train-id table of the SegNet labels (11 and 255 -> 255, others -1)."""
    return CAMVID.lut_array()


def camvid_files(root: Path, split: str) -> list[tuple[Path, Path]]:
    """Lists the (image, label) pairs of a CamVid split in the SegNet layout.

    Layout: ``root/{train,val,test}.txt`` with lines ``<image> <label>``; a leading ``/SegNet/CamVid/`` is
    stripped and the rest resolved relative to ``root``.

    Args:
        root: folder holding the list files.
        split: one of "train", "val", "test".

    Returns:
        (image_path, label_path) pairs in list-file order.

    Raises:
        ValueError: the split is unknown or a list line is malformed.
        FileNotFoundError: ``root``, the list file or a listed file is missing.
    """
    check_split("CamVid", split, _SPLITS)
    root = Path(root)
    require_dir(root, LAYOUT)
    list_file = root / f"{split}.txt"
    if not list_file.is_file():
        raise FileNotFoundError(f"CamVid list file {list_file} not found. Expected layout: {LAYOUT}. "
                                "Fix: point dataset.root=... at the SegNet CamVid folder.")
    pairs: list[tuple[Path, Path]] = []
    absent: list[str] = []
    for lineno, line in enumerate(list_file.read_text().splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2:
            raise ValueError(f"{list_file}:{lineno}: expected '<image> <label>', got {line.strip()!r}")
        pair = []
        for entry in fields:
            rel = entry[len(_PREFIX):] if entry.startswith(_PREFIX) else entry
            path = root / rel.lstrip("/")
            if not path.is_file():
                absent.append(f"{list_file}:{lineno} references {path}, which does not exist")
            pair.append(path)
        pairs.append((pair[0], pair[1]))
    if absent:  # every missing file at once, not only the first
        raise missing_files_error(absent, "Fix: restore the files or remove their lines from the list.")
    if not pairs:
        raise FileNotFoundError(f"split {split!r} of {root} lists no images ({list_file} is empty). Fix: add "
                                "'<image> <label>' lines to it, or restore the SegNet list file.")
    return pairs


# Native resolution, one forward per image (360 px is padded to 368 px for patch_size 16 and cropped back).
_PIPELINE = TestPipeline(resize="none", mode="whole")
# Native resolution, 240x320 windows every 120x160 px (2 x 2 = 4 overlapping windows, logits averaged).
_SLIDE = TestPipeline(resize="none", mode="slide", crop=(240, 320), stride=(120, 160))
_PROTOCOLS = {"360x480": _PIPELINE, "slide": _SLIDE}  # dataset.protocol=360x480 (default) | slide

CAMVID = DatasetSpec(
    name="camvid", num_classes=11, class_names=CAMVID_CLASSES, palette=CAMVID_PALETTE, layout=LAYOUT,
    files=camvid_files, splits=_SPLITS, eval_split="test", lut=_LUT, test_pipeline=_PIPELINE,
    protocols=_PROTOCOLS, citation=_CITATION)

CAMVID_SAMPLE = DatasetSpec(
    name="camvid_sample", num_classes=11, class_names=CAMVID_CLASSES, palette=CAMVID_PALETTE, layout=LAYOUT,
    files=camvid_files, splits=("train", "val"), eval_split="val", lut=_LUT, test_pipeline=_PIPELINE,
    protocols=_PROTOCOLS, default_root=Path(__file__).resolve().parent / "camvid_sample", citation=_CITATION)
