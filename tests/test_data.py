"""Tests of the data layer: sample, transforms, loaders, label mappings and input errors."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tokred.data import (
    DATASET_NAMES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    DatasetInfo,
    build_dataset,
    dataset_info,
    default_sample_root,
)

FULL_CAMVID = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "CamVid"
CAMVID_VALUES = set(range(11)) | {255}

# Colour of each synthetic class (far apart in RGB so the class can be read back from pixels).
PALETTE = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0]], dtype=np.float32)


def _denormalise(image: torch.Tensor) -> np.ndarray:
    """Maps a normalised [3, H, W] image back to [H, W, 3] values on a 0..255 scale."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return ((image * std + mean) * 255.0).permute(1, 2, 0).numpy()


def _save(path: Path, array: np.ndarray) -> Path:
    """Writes an array as an image file (format from the suffix)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def _synthetic_label(h: int = 60, w: int = 80) -> np.ndarray:
    """Asymmetric layout: vertical bands 0 | 1 | 2 plus a class-3 block at the top left."""
    label = np.zeros((h, w), dtype=np.uint8)
    label[:, w // 3 :] = 1
    label[:, 2 * w // 3 :] = 2
    label[: h // 3, : w // 4] = 3
    return label


def _make_camvid(
    root: Path, pairs: dict[str, tuple[np.ndarray, np.ndarray]], split: str = "train"
) -> Path:
    """Creates a SegNet-layout CamVid folder with the given {stem: (image, label)} pairs."""
    lines = []
    for stem, (image, label) in pairs.items():
        _save(root / split / f"{stem}.png", image)
        _save(root / f"{split}annot" / f"{stem}.png", label)
        lines.append(f"/SegNet/CamVid/{split}/{stem}.png /SegNet/CamVid/{split}annot/{stem}.png")
    (root / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture
def colour_camvid(tmp_path: Path) -> Path:
    """A one-image CamVid folder whose image colour encodes the class of each pixel."""
    label = _synthetic_label()
    image = PALETTE[label].astype(np.uint8)
    return _make_camvid(tmp_path / "camvid", {"a": (image, label)})


# Registry / info ------------------------------------------------------------------------------


def test_dataset_info_and_names() -> None:
    assert DATASET_NAMES == ("camvid", "camvid_sample", "ade20k", "cityscapes")
    camvid = dataset_info("camvid")
    assert isinstance(camvid, DatasetInfo)
    assert camvid.num_classes == 11 and camvid.ignore_index == 255
    assert camvid.class_names[0] == "Sky" and camvid.class_names[-1] == "Bicyclist"
    assert dataset_info("ade20k").num_classes == len(dataset_info("ade20k").class_names) == 150
    assert dataset_info("cityscapes").num_classes == 19
    with pytest.raises(AttributeError):
        camvid.num_classes = 3  # type: ignore[misc]  # frozen


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="camvid, camvid_sample, ade20k, cityscapes"):
        dataset_info("pascal")
    with pytest.raises(ValueError, match="camvid, camvid_sample, ade20k, cityscapes"):
        build_dataset("pascal", None, "train", (8, 8), train=True)


# Embedded CamVid sample -----------------------------------------------------------------------


def test_sample_layout_and_size() -> None:
    root = default_sample_root()
    assert (root / "train.txt").is_file() and (root / "val.txt").is_file()
    assert (root / "README.md").is_file()
    total = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    assert total < 5 * 2**20


def test_sample_loads_train_items() -> None:
    ds = build_dataset("camvid_sample", None, "train", (128, 160), train=True)
    assert len(ds) == 16
    assert ds.info == dataset_info("camvid_sample")
    assert all(img.is_file() and lbl.is_file() for img, lbl in ds.files)
    torch.manual_seed(0)
    for i in range(3):
        image, label = ds[i]
        assert image.shape == (3, 128, 160) and image.dtype == torch.float32
        assert label.shape == (128, 160) and label.dtype == torch.int64
        assert set(label.unique().tolist()) <= CAMVID_VALUES


def test_sample_eval_keeps_label_resolution_and_normalises() -> None:
    ds = build_dataset("camvid_sample", None, "val", (240, 320), train=False)
    assert len(ds) == 6
    image, label = ds[0]
    assert image.shape == (3, 240, 320) and image.dtype == torch.float32
    assert label.shape == (360, 480) and label.dtype == torch.int64
    assert set(label.unique().tolist()) <= CAMVID_VALUES

    # crop_size None: image kept at its size and exactly the ImageNet-normalised pixels.
    image, label = build_dataset("camvid_sample", None, "val", None, train=False)[0]
    assert image.shape == (3, 360, 480) and label.shape == (360, 480)
    raw = np.asarray(Image.open(ds.files[0][0]).convert("RGB"), dtype=np.float32)
    np.testing.assert_allclose(_denormalise(image), raw, atol=1e-3)


def test_sample_unlabelled_becomes_ignore() -> None:
    ds = build_dataset("camvid_sample", None, "train", None, train=False)
    for index, (_, label_path) in enumerate(ds.files):
        raw = np.asarray(Image.open(label_path))
        if (raw == 11).any():
            break
    else:
        pytest.fail("no sample label contains the unlabelled value 11")
    label = ds[index][1].numpy()
    assert (label[raw == 11] == 255).all()
    np.testing.assert_array_equal(label[raw != 11], raw[raw != 11])
    assert 11 not in label


def test_sample_max_items_and_dataloader() -> None:
    ds = build_dataset("camvid_sample", None, "train", (64, 64), train=True, max_items=4)
    assert len(ds) == 4 and len(ds.files) == 4
    images, labels = next(iter(torch.utils.data.DataLoader(ds, batch_size=2)))
    assert images.shape == (2, 3, 64, 64) and labels.shape == (2, 64, 64)


# Training transform: geometry keeps image and label aligned -----------------------------------


def _check_aligned(image: torch.Tensor, label: torch.Tensor) -> None:
    """Asserts the pixel colours agree with the labels; padding is black with label 255."""
    pixels = _denormalise(image)
    lab = label.numpy()
    pad = lab == 255
    assert np.abs(pixels[pad]).max(initial=0.0) < 1e-2  # padded image pixels are 0
    dist = np.linalg.norm(pixels[:, :, None, :] - PALETTE[None, None], axis=-1)  # [H, W, 4]
    nearest, closest = dist.argmin(-1), dist.min(-1)
    pure = (~pad) & (closest < 30.0)  # pixels not blended across a class boundary
    assert pure.sum() >= 0.85 * (~pad).sum()
    mismatch = (nearest[pure] != lab[pure]).mean()
    assert mismatch < 0.005, f"image and label disagree on {mismatch:.1%} of pixels"


def test_train_transform_keeps_alignment(colour_camvid: Path) -> None:
    ds = build_dataset(
        "camvid", colour_camvid, "train", (48, 64), train=True, scale_range=(0.5, 2.0),
        base_size=(60, 80), photometric=False,
    )  # fmt: skip
    padded = 0
    for seed in range(12):
        torch.manual_seed(seed)
        image, label = ds[0]
        assert image.shape == (3, 48, 64) and label.shape == (48, 64)
        assert set(label.unique().tolist()) <= {0, 1, 2, 3, 255}
        _check_aligned(image, label)
        padded += int((label == 255).any())
    assert 0 < padded < 12  # small scales pad, large ones do not


def test_train_flip_happens_and_is_joint(colour_camvid: Path) -> None:
    ds = build_dataset(
        "camvid", colour_camvid, "train", (60, 80), train=True, scale_range=(1.0, 1.0),
        base_size=(60, 80), photometric=False,
    )  # fmt: skip
    original = torch.from_numpy(_synthetic_label()).long()
    seen = set()
    for seed in range(16):
        torch.manual_seed(seed)
        image, label = ds[0]
        _check_aligned(image, label)
        if torch.equal(label, original):
            seen.add("plain")
        elif torch.equal(label, original.flip(-1)):
            seen.add("flipped")
        else:
            pytest.fail("label is neither the original nor its mirror image")
    assert seen == {"plain", "flipped"}


def test_train_base_size_and_padding(colour_camvid: Path) -> None:
    # The 60x80 image is fitted into base 30x40 (scale 1) then padded to the 60x80 crop.
    ds = build_dataset(
        "camvid", colour_camvid, "train", (60, 80), train=True, scale_range=(1.0, 1.0),
        base_size=(30, 40), hflip=False, photometric=False,
    )  # fmt: skip
    torch.manual_seed(0)
    image, label = ds[0]
    assert int((label != 255).sum()) == 30 * 40
    _check_aligned(image, label)


def test_photometric_changes_image_only(colour_camvid: Path) -> None:
    kwargs = dict(scale_range=(1.0, 1.0), base_size=(60, 80), hflip=False)
    plain = build_dataset("camvid", colour_camvid, "train", (60, 80), True, photometric=False, **kwargs)
    jitter = build_dataset("camvid", colour_camvid, "train", (60, 80), True, photometric=True, **kwargs)
    torch.manual_seed(3)
    img_a, lbl_a = plain[0]
    torch.manual_seed(3)
    img_b, lbl_b = jitter[0]
    assert torch.equal(lbl_a, lbl_b)
    assert not torch.allclose(img_a, img_b)


def test_train_requires_crop_size(colour_camvid: Path) -> None:
    with pytest.raises(ValueError, match="crop_size"):
        build_dataset("camvid", colour_camvid, "train", None, train=True)


# ADE20K and Cityscapes loaders ----------------------------------------------------------------


def _make_ade(
    root: Path, label: np.ndarray, sub: str = "training", stem: str = "ADE_x_0001"
) -> Path:
    h, w = label.shape
    _save(root / "images" / sub / f"{stem}.jpg", np.full((h, w, 3), 128, dtype=np.uint8))
    _save(root / "annotations" / sub / f"{stem}.png", label)
    return root


def test_ade20k_loader_maps_labels(tmp_path: Path) -> None:
    raw = np.array([[0, 1, 2, 150], [150, 75, 0, 1]], dtype=np.uint8).repeat(4, 0).repeat(4, 1)
    root = _make_ade(tmp_path / "ADEChallengeData2016", raw)
    _make_ade(root, raw, sub="validation", stem="ADE_val_0001")
    ds = build_dataset("ade20k", root, "train", (16, 16), train=False)
    assert len(ds) == 1 and ds.info.num_classes == 150
    image, label = ds[0]
    assert image.shape == (3, 16, 16) and label.shape == raw.shape
    expected = np.where(raw == 0, 255, raw.astype(np.int64) - 1)
    np.testing.assert_array_equal(label.numpy(), expected)
    val = build_dataset("ade20k", root, "val", (16, 16), train=False)
    assert val.files[0][0].parent.name == "validation"
    torch.manual_seed(0)
    image, label = build_dataset("ade20k", root, "train", (8, 8), train=True)[0]
    assert image.shape == (3, 8, 8) and set(label.unique().tolist()) <= {0, 1, 74, 149, 255}


def test_ade20k_bad_label_value(tmp_path: Path) -> None:
    raw = np.full((8, 8), 3, dtype=np.uint8)
    raw[0, 0] = 151
    root = _make_ade(tmp_path / "ade", raw)
    ds = build_dataset("ade20k", root, "train", None, train=False)
    with pytest.raises(ValueError, match=r"ADE_x_0001\.png.*\[151\]"):
        ds[0]


def test_ade20k_missing_annotation(tmp_path: Path) -> None:
    root = _make_ade(tmp_path / "ade", np.ones((8, 8), dtype=np.uint8))
    (root / "annotations" / "training" / "ADE_x_0001.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"ADE_x_0001\.png"):
        build_dataset("ade20k", root, "train", None, train=False)


def _make_cityscapes(root: Path, label: np.ndarray) -> Path:
    h, w = label.shape
    stem = "aachen_000000_000019"
    city_img = root / "leftImg8bit" / "train" / "aachen"
    _save(city_img / f"{stem}_leftImg8bit.png", np.zeros((h, w, 3), np.uint8))
    _save(root / "gtFine" / "train" / "aachen" / f"{stem}_gtFine_labelIds.png", label)
    return root


def test_cityscapes_loader_maps_label_ids(tmp_path: Path) -> None:
    raw = np.arange(34, dtype=np.uint8).reshape(2, 17).repeat(3, 0)
    root = _make_cityscapes(tmp_path / "cityscapes", raw)
    ds = build_dataset("cityscapes", root, "train", (6, 17), train=False)
    assert len(ds) == 1 and ds.info.num_classes == 19
    label = ds[0][1].numpy()
    table = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10,
             24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}  # fmt: skip
    expected = np.vectorize(lambda v: table.get(int(v), 255))(raw)
    np.testing.assert_array_equal(label, expected)


def test_cityscapes_bad_label_and_layout(tmp_path: Path) -> None:
    raw = np.full((4, 4), 7, dtype=np.uint8)
    raw[1, 1] = 40
    root = _make_cityscapes(tmp_path / "cs", raw)
    with pytest.raises(ValueError, match=r"labelIds\.png.*\[40\]"):
        build_dataset("cityscapes", root, "train", None, train=False)[0]
    with pytest.raises(FileNotFoundError, match=re.escape(str(root / "leftImg8bit" / "val"))):
        build_dataset("cityscapes", root, "val", None, train=False)


# Bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["camvid", "ade20k", "cityscapes"])
def test_root_none_needs_dataset_root(name: str) -> None:
    with pytest.raises(ValueError, match=r"dataset\.root="):
        build_dataset(name, None, "train", (8, 8), train=True)


def test_missing_root_names_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        build_dataset("camvid", missing, "train", (8, 8), train=True)


def test_wrong_layout_names_expected_files(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "train.txt"))):
        build_dataset("camvid", tmp_path, "train", (8, 8), train=True)
    with pytest.raises(FileNotFoundError, match=r"images/training.*Expected layout"):
        build_dataset("ade20k", tmp_path, "train", (8, 8), train=True)


def test_unknown_split(colour_camvid: Path) -> None:
    with pytest.raises(ValueError, match="train, val, test"):
        build_dataset("camvid", colour_camvid, "training", (8, 8), train=True)


def test_list_references_missing_file(colour_camvid: Path) -> None:
    with (colour_camvid / "train.txt").open("a") as fh:
        fh.write("/SegNet/CamVid/train/ghost.png /SegNet/CamVid/trainannot/ghost.png\n")
    with pytest.raises(FileNotFoundError, match=r"train\.txt:2 references .*ghost\.png"):
        build_dataset("camvid", colour_camvid, "train", (8, 8), train=True)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_image_names_file(colour_camvid: Path, damage: str) -> None:
    path = colour_camvid / "train" / "a.png"
    data = path.read_bytes()
    path.write_bytes(b"this is not an image" if damage == "garbage" else data[: len(data) // 2])
    ds = build_dataset("camvid", colour_camvid, "train", None, train=False)
    with pytest.raises(OSError, match=r"cannot read image file .*a\.png"):
        ds[0]


def test_size_mismatch_names_both_files(tmp_path: Path) -> None:
    pair = (np.zeros((12, 12, 3), np.uint8), np.zeros((10, 10), np.uint8))
    ds = build_dataset("camvid", _make_camvid(tmp_path, {"b": pair}), "train", None, train=False)
    with pytest.raises(ValueError, match=r"train/b\.png.*trainannot/b\.png"):
        ds[0]


def test_label_values_out_of_range_named(tmp_path: Path) -> None:
    label = np.zeros((8, 8), np.uint8)
    label[0, :2] = (12, 200)
    root = _make_camvid(tmp_path, {"c": (np.zeros((8, 8, 3), np.uint8), label)})
    ds = build_dataset("camvid", root, "train", (8, 8), train=True)
    with pytest.raises(ValueError, match=r"trainannot/c\.png contains values \[12, 200\]"):
        ds[0]


def test_multichannel_label_rejected(tmp_path: Path) -> None:
    pair = (np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8, 3), np.uint8))
    ds = build_dataset("camvid", _make_camvid(tmp_path, {"d": pair}), "train", None, train=False)
    with pytest.raises(ValueError, match=r"trainannot/d\.png.*single-channel"):
        ds[0]


# Full CamVid (shared, read-only) --------------------------------------------------------------


@pytest.mark.skipif(not FULL_CAMVID.is_dir(), reason="full CamVid absent at ../shared/data/CamVid")
def test_full_camvid_split_sizes() -> None:
    splits = ("train", "val", "test")
    sets = {s: build_dataset("camvid", FULL_CAMVID, s, (360, 480), train=False) for s in splits}
    assert {s: len(d) for s, d in sets.items()} == {"train": 367, "val": 101, "test": 233}
    image, label = sets["test"][0]
    assert image.shape == (3, 360, 480) and label.shape == (360, 480)
    assert set(label.unique().tolist()) <= CAMVID_VALUES


# Specs and the registry ------------------------------------------------------------------------


def test_builtin_specs_are_registered_and_complete() -> None:
    from tokred.data import DatasetSpec, get_spec
    from tokred.data.datasets import ade20k_lut, camvid_lut, cityscapes_lut
    from tokred.plugins import DATASETS

    for name in DATASET_NAMES:
        spec = DATASETS.get(name)
        assert isinstance(spec, DatasetSpec) and spec is get_spec(name) and spec.name == name
        assert len(spec.palette) == spec.num_classes == len(spec.class_names)
        assert all(len(c) == 3 and all(0 <= v <= 255 for v in c) for c in spec.palette)
        assert spec.eval_split in spec.splits and spec.layout
        assert spec.lut_array().shape == (256,)
    assert len(set(get_spec("ade20k").palette)) == 150  # distinct colours
    np.testing.assert_array_equal(camvid_lut()[[0, 10, 11, 12, 255]], [0, 10, 255, -1, 255])
    np.testing.assert_array_equal(ade20k_lut()[[0, 1, 150, 151]], [255, 0, 149, -1])
    np.testing.assert_array_equal(cityscapes_lut()[[0, 7, 33, 34]], [255, 0, 18, -1])
    assert get_spec("camvid_sample").default_root == default_sample_root()


def test_test_pipeline_resize_rules_and_errors() -> None:
    from tokred.data import TestPipeline, get_spec

    ade = get_spec("ade20k").test_pipeline
    assert ade.output_size(375, 500) == (512, 683)  # short side -> 512
    assert ade.output_size(2000, 500) == (2048, 512)  # long side capped at 2048
    assert ade.output_size(100, 1000) == (205, 2048)
    assert get_spec("cityscapes").test_pipeline.output_size(1024, 2048) == (1024, 2048)
    assert get_spec("camvid").test_pipeline.output_size(360, 480) == (360, 480)
    with pytest.raises(ValueError, match="none, keep_ratio, exact"):
        TestPipeline(resize="fit")
    with pytest.raises(ValueError, match="crop"):
        TestPipeline(mode="slide")
    with pytest.raises(ValueError, match="whole, slide"):
        TestPipeline(mode="tiles")


def test_spec_validation_errors() -> None:
    from tokred.data import DatasetSpec

    with pytest.raises(ValueError, match="2 class names"):
        DatasetSpec("x", 3, class_names=("a", "b"))
    with pytest.raises(ValueError, match="ignore_index=1 is a valid class id"):
        DatasetSpec("x", 3, ignore_index=1)
    with pytest.raises(ValueError, match="outside 0..2"):
        DatasetSpec("x", 3, lut=tuple([5] * 256))
    with pytest.raises(ValueError, match="eval_split 'test'"):
        DatasetSpec("x", 3, splits=("train", "val"), eval_split="test")


def test_unknown_name_suggests_a_close_match() -> None:
    with pytest.raises(ValueError, match="did you mean 'camvid'"):
        dataset_info("camvd")


def test_a_runtime_registered_spec_is_a_dataset_everywhere(tmp_path: Path) -> None:
    """Adding a data set = one spec (a python file) + its configs/dataset/<name>.yaml: the spec alone makes
    build_dataset, dataset_info, the name lists and the protocol settings work."""
    from tokred.data import DatasetSpec, TestPipeline, dataset_names, eval_inference
    from tokred.data.spec import lut_from_mapping
    from tokred.plugins import DATASETS

    def files(root: Path, split: str) -> list[tuple[Path, Path]]:
        return [(p, root / "masks" / p.name) for p in sorted((root / split).glob("*.png"))]

    root = tmp_path / "tiny"
    label = np.array([[0, 1], [9, 2]], dtype=np.uint8).repeat(8, 0).repeat(8, 1)
    _save(root / "val" / "a.png", np.zeros((16, 16, 3), np.uint8))
    _save(root / "masks" / "a.png", label)
    spec = DatasetSpec("_tiny", 3, class_names=("x", "y", "z"), palette=((0, 0, 0), (1, 1, 1), (2, 2, 2)),
                       layout="root/{split}/*.png and root/masks/*.png", files=files, splits=("val",),
                       eval_split="val", lut=lut_from_mapping({0: 0, 1: 1, 2: 2}, ignored=(9,)),
                       test_pipeline=TestPipeline(resize="exact", scale=(32, 32), mode="whole"))
    DATASETS.register("_tiny", spec)
    try:
        assert "_tiny" in dataset_names() and dataset_info("_tiny") is spec
        ds = build_dataset("_tiny", root, "val", None, train=False, test_pipeline="protocol")
        image, lbl = ds[0]
        assert image.shape == (3, 32, 32) and lbl.shape == (16, 16)
        assert set(lbl.unique().tolist()) == {0, 1, 2, 255}
        assert eval_inference("_tiny", "protocol").mode == "whole"
        with pytest.raises(ValueError, match="root is None"):
            build_dataset("_tiny", None, "val", None, train=False)
        with pytest.raises(ValueError, match="valid splits: val"):
            build_dataset("_tiny", root, "train", None, train=False)
    finally:
        DATASETS.unregister("_tiny")
    with pytest.raises(ValueError, match="valid names are"):
        dataset_info("_tiny")
