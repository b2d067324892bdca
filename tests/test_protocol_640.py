"""ADE20K's 640x640 test protocol (mmseg's ade20k-640x640: keep-ratio resize to short side 640 px with the long side
at most 2560, slide 640x640 windows every 608 px), chosen with ``dataset=ade20k_640`` / ``dataset.protocol``, and
used by the reproduction configs of the released Segmenter ViT-L/16 model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image
from torch.utils.data import DataLoader

from tokred.config import build_datasets, config_dir, inference_settings
from tokred.data import build_dataset, eval_collate, eval_inference, get_spec
from tokred.engine.evaluate import evaluate, window_boxes
from tokred.measure import TokenAccounting
from tokred.structured import register_configs

#: (image H, W) px -> (resized H, W) px and sliding windows at 640x640 / stride 608, worked out by hand:
#: factor = min(640 / short, 2560 / long); rows = ceil((H' - 640) / 608) + 1, likewise columns.
CASES = {
    (480, 640): ((640, 853), 2),  # x 4/3: 853.3 -> 853; columns: ceil(213 / 608) + 1 = 2
    (512, 2048): ((640, 2560), 5),  # x 1.25: long side exactly 2560; columns: ceil(1920 / 608) + 1 = 5
    (300, 1500): ((512, 2560), 5),  # long side binds: x 1.7067, short side 512 < 640 (one padded row)
    (1000, 700): ((914, 640), 2),  # x 0.914: 914.3 -> 914; rows: ceil(274 / 608) + 1 = 2
}


def _ade_folder(root: Path, sizes) -> Path:
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate(sizes):
        for sub, arr in (("images", rng.integers(0, 255, (h, w, 3), np.uint8)),
                         ("annotations", rng.integers(0, 4, (h, w)).astype(np.uint8))):
            path = root / sub / "validation" / f"ADE_val_{i:08d}.{'jpg' if sub == 'images' else 'png'}"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr).save(path)
    return root


def _compose(*overrides: str):
    register_configs()
    with initialize_config_dir(str(config_dir()), version_base=None):
        return compose("config", overrides=list(overrides))


def test_the_640_protocol_is_mmsegs():
    p = get_spec("ade20k").protocol("640x640")
    assert (p.resize, p.scale, p.mode, p.crop, p.stride) == ("keep_ratio", (640, 2560), "slide", (640, 640),
                                                             (608, 608))
    assert get_spec("ade20k").protocol(None) == get_spec("ade20k").protocol("512x512") == \
        get_spec("ade20k").test_pipeline  # the default stays the 512x512 one
    for (h, w), (size, windows) in CASES.items():
        assert p.output_size(h, w) == size
        assert len(window_boxes(*size, p.crop, p.stride)) == windows


def test_an_unknown_variant_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"dataset.protocol='640' unknown for dataset 'ade20k' \(did you mean "
                                         r"'640x640'\?\); valid: default, 512x512, 640x640"):
        get_spec("ade20k").protocol("640")
    with pytest.raises(ValueError, match="valid: default, 768x768"):
        eval_inference("cityscapes", "protocol", protocol="640x640")


def test_fixture_images_get_the_expected_size_and_windows(tmp_path):
    root = _ade_folder(tmp_path / "ADEChallengeData2016", list(CASES))
    ds = build_dataset("ade20k", root, "val", None, train=False, test_pipeline="protocol", protocol="640x640")
    s = eval_inference("ade20k", "protocol", protocol="640x640")
    assert (s.mode, s.crop, s.stride) == ("slide", (640, 640), (608, 608))
    for i, ((h, w), (size, windows)) in enumerate(CASES.items()):
        image, label = ds[i]
        assert tuple(image.shape) == (3, *size) and tuple(label.shape) == (h, w)  # labels keep their size
        assert len(window_boxes(*image.shape[-2:], s.crop, s.stride)) == windows


def test_config_selects_it_and_the_reproduce_configs_use_it(tmp_path):
    root = _ade_folder(tmp_path / "ADEChallengeData2016", [(480, 640)])
    cfg = _compose("dataset=ade20k_640", f"dataset.root={root}", "model=test_vit")
    assert cfg.dataset.name == "ade20k" and list(cfg.dataset.crop_size) == [640, 640]
    assert cfg.dataset.protocol == "640x640" and list(cfg.dataset.base_size) == [640, 2560]
    assert tuple(build_datasets(cfg, train=False)[0][0].shape[-2:]) == (640, 853)
    s = inference_settings(cfg)
    assert (s.mode, s.crop, s.stride) == ("slide", (640, 640), (608, 608))
    plain = _compose("dataset=ade20k", f"dataset.root={root}", "model=test_vit")
    assert plain.dataset.protocol is None and tuple(build_datasets(plain, train=False)[0][0].shape[-2:]) == (512, 683)
    for name in ("seg_l16_ade20k", "tome_20", "tome_30", "tome_50"):
        r = _compose(f"experiment=reproduce/{name}", "checkpoint=/c.pth")
        assert r.dataset.protocol == "640x640" and list(r.dataset.crop_size) == [640, 640], name
        assert inference_settings(r).stride == (608, 608)
    back = _compose("experiment=reproduce/seg_l16_ade20k", "checkpoint=/c.pth", "dataset.protocol=512x512",
                    "dataset.crop_size=[512,512]")
    assert inference_settings(back).crop == (512, 512) and inference_settings(back).stride == (480, 480)


def test_slide_evaluation_counts_the_expected_windows_at_batch_two(tmp_path):
    from tokred import build_segmenter

    sizes = [(480, 640), (512, 2048), (300, 1500)]
    root = _ade_folder(tmp_path / "ADEChallengeData2016", sizes)
    ds = build_dataset("ade20k", root, "val", None, train=False, test_pipeline="protocol", protocol="640x640")
    s = eval_inference("ade20k", "protocol", protocol="640x640")
    torch.manual_seed(0)
    seg = build_segmenter("test_vit", 150, (640, 640)).eval()
    acc = TokenAccounting()
    res = evaluate(seg, DataLoader(ds, batch_size=2, collate_fn=eval_collate), 150, torch.device("cpu"),
                   mode=s.mode, crop=s.crop, stride=s.stride, on_state=acc.update, progress=False, batch_size=2)
    assert res["num_images"] == 3
    assert acc.summary()["num_windows"] == sum(CASES[hw][1] for hw in sizes) == 12


def test_a_spec_refuses_a_protocol_that_is_not_a_test_pipeline():
    from tokred.data import DatasetSpec

    with pytest.raises(ValueError, match="protocol 'big' is a str, not a TestPipeline"):
        DatasetSpec("x", 3, protocols={"big": "640"})
    spec = DatasetSpec("x", 3, protocols={"big": get_spec("ade20k").protocol("640x640")})
    assert spec.protocol("big").crop == (640, 640) and dict(spec.protocols) == {"big": spec.protocol("big")}


def test_an_unknown_variant_fails_at_model_build_before_any_run_folder():
    from tokred.config import build_model_from_config

    with pytest.raises(ValueError, match="dataset.protocol='600x600' unknown for dataset 'ade20k'"):
        build_model_from_config(_compose("dataset=ade20k", "model=test_vit", "dataset.protocol=600x600"))


def test_camvid_native_slide_protocol_has_four_windows():
    from tokred.data.build import eval_inference

    s = eval_inference("camvid", "protocol", None, "whole", None, "slide")
    assert (s.mode, s.crop, s.stride) == ("slide", (240, 320), (120, 160))
    rows = (360 - 240) // 120 + 1
    cols = (480 - 320) // 160 + 1
    assert rows * cols == 4
    assert eval_inference("camvid", "protocol").mode == "whole"
