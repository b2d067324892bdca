"""Evaluation the mmseg way: window placement, sliding inference against a plain loop, mixed-size batches,
padding of sizes that are not patch multiples, per-image token accounting under windows, and the ADE20K /
Cityscapes protocols end to end on tiny folders of their official layouts."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.testing import assert_close
from torch.utils.data import DataLoader

from tokred import build_segmenter
from tokred.data import TestPipeline, build_dataset, eval_collate, eval_inference, get_spec
from tokred.engine.evaluate import evaluate, forward_inputs, segment_images, window_boxes
from tokred.measure import TokenAccounting
from tokred.plugins import DATASETS

K = 3


@pytest.fixture(scope="module")
def seg():
    torch.manual_seed(0)
    return build_segmenter("test_vit", K, (64, 64)).eval()


def _save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_window_boxes_clamp_the_last_window_to_the_border():
    boxes = window_boxes(96, 192, (64, 64), (48, 48))
    assert [b[:2] for b in boxes[::4]] == [(0, 64), (32, 96)]  # second row shifted back to end at 96
    assert [b[2:] for b in boxes[:4]] == [(0, 64), (48, 112), (96, 160), (128, 192)]
    assert len(boxes) == 8
    assert window_boxes(64, 64, (64, 64), (48, 48)) == [(0, 64, 0, 64)]
    with pytest.raises(ValueError, match="positive"):
        window_boxes(64, 64, (64, 64), (0, 48))


def test_slide_equals_a_plain_loop_over_windows(seg):
    """96x192 px stands in for Cityscapes' 1024x2048: window 64, stride 48, overlaps averaged."""
    torch.manual_seed(1)
    image = torch.randn(3, 96, 192)
    with torch.no_grad():
        acc = torch.zeros(K, 96, 192)
        cnt = torch.zeros(1, 96, 192)
        for y in (0, 32):  # rows: 0 and the clamped 96 - 64
            for x in (0, 48, 96, 128):  # columns: every 48 px, the last clamped to 192 - 64
                acc[:, y:y + 64, x:x + 64] += seg(image[None, :, y:y + 64, x:x + 64]).logits[0]
                cnt[:, y:y + 64, x:x + 64] += 1
        expected = acc / cnt
        states = []
        got = segment_images(seg, [image], K, "slide", (64, 64), (48, 48), batch_size=3,
                             on_state=lambda s, ids: states.append(ids.tolist()))
    assert_close(got[0], expected, atol=1e-4, rtol=1e-4)
    assert states == [[0, 0, 0], [0, 0, 0], [0, 0]]  # 8 windows, 3 per forward, all of image 0


def test_whole_mode_pads_sizes_that_are_not_patch_multiples(seg):
    torch.manual_seed(2)
    image = torch.randn(3, 40, 56)
    with torch.no_grad():
        got = segment_images(seg, [image], K, "whole")[0]
        padded = torch.nn.functional.pad(image, (0, 8, 0, 8))  # 48x64, multiples of 16
        expected = seg(padded[None]).logits[0, :, :40, :56]
    assert got.shape == (K, 40, 56)
    assert_close(got, expected, atol=1e-5, rtol=1e-5)
    (x, t), = forward_inputs(seg, image, "whole", target=torch.zeros(20, 28, dtype=torch.long))
    assert x.shape == (3, 48, 64) and t.shape == (48, 64)
    assert (t[40:] == 255).all() and (t[:40, :56] == 0).all()


def test_small_image_is_padded_up_to_the_window(seg):
    image = torch.randn(3, 40, 50)
    pairs = forward_inputs(seg, image, "slide", (64, 64), (48, 48))
    assert len(pairs) == 1 and pairs[0][0].shape == (3, 64, 64)
    with torch.no_grad():
        assert segment_images(seg, [image], K, "slide", (64, 64), (48, 48))[0].shape == (K, 40, 50)


def test_batch_of_mixed_sizes_equals_images_one_by_one(seg):
    torch.manual_seed(3)
    images = [torch.randn(3, 64, 96), torch.randn(3, 40, 56), torch.randn(3, 64, 96)]
    with torch.no_grad():
        together = segment_images(seg, images, K, "whole", batch_size=2)
        alone = [segment_images(seg, [im], K, "whole")[0] for im in images]
    for a, b in zip(together, alone):
        assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_eval_collate_batches_what_default_collate_cannot():
    items = [(torch.zeros(3, 32, 48), torch.zeros(30, 40, dtype=torch.long)),
             (torch.zeros(3, 48, 32), torch.zeros(45, 30, dtype=torch.long))]
    with pytest.raises(RuntimeError):
        next(iter(DataLoader(items, batch_size=2)))
    images, labels = next(iter(DataLoader(items, batch_size=2, collate_fn=eval_collate)))
    assert [tuple(i.shape) for i in images] == [(3, 32, 48), (3, 48, 32)]
    assert [tuple(lb.shape) for lb in labels] == [(30, 40), (45, 30)]


def test_evaluate_scores_at_label_resolution_and_accounts_windows_per_image(seg):
    """A model that predicts the label perfectly scores 1.0 only if logits are resized to each label's size."""

    class Oracle(torch.nn.Module):
        encoder = seg.encoder

        def forward(self, image, target=None):
            out = seg(image)
            logits = torch.nn.functional.one_hot(target.clamp(0, K - 1), K).permute(0, 3, 1, 2).float() * 10
            return dataclasses.replace(out, logits=logits)

    labels = [torch.randint(0, K, (24, 48)).repeat_interleave(2, 0).repeat_interleave(2, 1),
              torch.randint(0, K, (20, 30)).repeat_interleave(2, 0).repeat_interleave(2, 1)]
    images = [torch.randn(3, 96, 192), torch.randn(3, 80, 120)]  # network inputs at 2x the label size
    acc = TokenAccounting()
    res = evaluate(Oracle(), [(images, labels)], K, torch.device("cpu"), mode="slide", crop=(64, 64),
                   stride=(48, 48), on_state=acc.update, progress=False, batch_size=2)
    assert res["num_images"] == 2 and res["miou"] == pytest.approx(1.0) and res["pixel_accuracy"] == 1.0
    tokens = acc.summary()
    n_win = [len(window_boxes(96, 192, (64, 64), (48, 48))), len(window_boxes(80, 120, (64, 64), (48, 48)))]
    assert tokens["num_images"] == 2 and tokens["num_windows"] == sum(n_win) == 8 + 6
    assert tokens["windows_per_image"] == pytest.approx(7.0)
    assert tokens["num_patches"] == pytest.approx(16 * 7.0)  # per image: 16 patches per window, summed
    assert tokens["tokens_per_block"][0] == pytest.approx(16 * 7.0)


def test_eval_inference_protocol_or_crop():
    ade = eval_inference("ade20k", "protocol", (384, 512), "whole", None)
    assert (ade.mode, ade.crop, ade.stride) == ("slide", (512, 512), (480, 480))
    cs = eval_inference("cityscapes", "protocol")
    assert (cs.mode, cs.crop, cs.stride) == ("slide", (768, 768), (512, 512))
    assert eval_inference("camvid", "protocol").mode == "whole"
    crop = eval_inference("camvid", "crop", (384, 512), "slide", None)
    assert (crop.mode, crop.crop, crop.stride) == ("slide", (384, 512), (256, 341))
    with pytest.raises(ValueError, match="protocol, crop"):
        eval_inference("camvid", "mmseg")


# Official layouts in tmp_path, evaluated in slide mode at batch size 2 -------------------------------------


def _ade_folder(root: Path, sizes: list[tuple[int, int]]) -> Path:
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate(sizes):
        _save(root / "images" / "validation" / f"ADE_val_{i:08d}.jpg", rng.integers(0, 255, (h, w, 3), np.uint8))
        _save(root / "annotations" / "validation" / f"ADE_val_{i:08d}.png",
              rng.integers(0, 4, (h, w)).astype(np.uint8))  # 0 = other (ignored), 1..3 = classes 0..2
    return root


def _cityscapes_folder(root: Path, n: int, hw: tuple[int, int]) -> Path:
    rng = np.random.default_rng(1)
    for i in range(n):
        stem = f"frankfurt_000000_{i:06d}"
        _save(root / "leftImg8bit" / "val" / "frankfurt" / f"{stem}_leftImg8bit.png",
              rng.integers(0, 255, (*hw, 3), np.uint8))
        _save(root / "gtFine" / "val" / "frankfurt" / f"{stem}_gtFine_labelIds.png",
              rng.choice([0, 7, 8, 11], size=hw).astype(np.uint8))
    return root


def test_ade20k_protocol_resizes_short_side_to_512_keeping_aspect(tmp_path):
    root = _ade_folder(tmp_path / "ADEChallengeData2016", [(30, 40), (50, 20)])
    ds = build_dataset("ade20k", root, "val", None, train=False, test_pipeline="protocol")
    shapes = [tuple(ds[i][0].shape[-2:]) for i in range(2)]
    assert shapes == [(512, 683), (1280, 512)]  # 40 * 512 / 30 = 682.7 rounds half up to 683
    assert tuple(ds[0][1].shape) == (30, 40)  # labels stay at their original resolution
    crop = build_dataset("ade20k", root, "val", (64, 64), train=False, test_pipeline="crop")
    assert tuple(crop[1][0].shape[-2:]) == (64, 64)


@pytest.fixture
def tiny_protocols():
    """ADE20K and Cityscapes specs with their layouts and label maps but CPU-sized protocols."""
    ade = dataclasses.replace(get_spec("ade20k"), name="_ade_tiny", test_pipeline=TestPipeline(
        resize="keep_ratio", scale=(64, 256), mode="slide", crop=(64, 64), stride=(48, 48)))
    cs = dataclasses.replace(get_spec("cityscapes"), name="_cs_tiny", test_pipeline=TestPipeline(
        resize="keep_ratio", scale=(64, 128), mode="slide", crop=(64, 64), stride=(32, 32)))
    DATASETS.register("_ade_tiny", ade)
    DATASETS.register("_cs_tiny", cs)
    yield
    DATASETS.unregister("_ade_tiny")
    DATASETS.unregister("_cs_tiny")


@pytest.mark.parametrize("name", ["_ade_tiny", "_cs_tiny"])
def test_official_layouts_evaluate_in_slide_mode_at_batch_two(tmp_path, seg, tiny_protocols, name):
    if name == "_ade_tiny":
        root = _ade_folder(tmp_path / "ADEChallengeData2016", [(30, 40), (36, 30), (32, 32)])
    else:
        root = _cityscapes_folder(tmp_path / "cityscapes", 3, (32, 64))
    ds = build_dataset(name, root, "val", None, train=False, test_pipeline="protocol")
    loader = DataLoader(ds, batch_size=2, collate_fn=eval_collate)
    s = eval_inference(name, "protocol")
    acc = TokenAccounting()
    res = evaluate(seg, loader, K, torch.device("cpu"), mode=s.mode, crop=s.crop, stride=s.stride,
                   on_state=acc.update, progress=False)
    assert res["num_images"] == 3 and 0.0 <= res["miou"] <= 1.0
    tokens = acc.summary()
    expected = [len(window_boxes(*ds.info.test_pipeline.output_size(*lb.shape), s.crop, s.stride))
                for _, lb in (ds[i] for i in range(3))]
    assert tokens["num_images"] == 3 and tokens["num_windows"] == sum(expected)
    assert max(expected) > 1  # the protocol really slides
