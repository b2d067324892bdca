"""Errors before work (issue 15): every split a run reads and every checkpoint it opens is checked up front,
each problem named with its file and fix, in one error (tokred.preflight)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

from tokred.config import build_model_from_config, config_dir
from tokred.data.build import default_sample_root
from tokred.engine.checkpoint import load_checkpoint, save_checkpoint
from tokred.models.checkpoints import load_state_dict_checked, read_checkpoint
from tokred.preflight import PreflightError, preflight_run

BASE = ["model=test_vit", "dataset=camvid", "dataset.crop_size=[32,32]", "train.epochs=1", "train.num_workers=0",
        "eval.bench=false", "eval.flops_images=1"]


def _cfg(root: Path, *overrides: str):
    with initialize_config_dir(config_dir(), version_base=None):
        return compose("config", overrides=[*BASE, f"dataset.root={root}", *overrides])


@pytest.fixture()
def camvid(tmp_path: Path) -> Path:
    """A 4-pair CamVid in the SegNet layout (train 2, val 1, test 1) copied from the embedded sample."""
    sample = default_sample_root()
    lines = (sample / "train.txt").read_text().split("\n")[:4]
    root = tmp_path / "CamVid"
    for split, chosen in (("train", lines[:2]), ("val", lines[2:3]), ("test", lines[3:4])):
        out = []
        for line in chosen:
            img, lbl = (e[len("/SegNet/CamVid/"):] for e in line.split())
            for src, dst in ((img, f"{split}/{Path(img).name}"), (lbl, f"{split}annot/{Path(lbl).name}")):
                (root / dst).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(sample / src, root / dst)
            out.append(f"/SegNet/CamVid/{split}/{Path(img).name} /SegNet/CamVid/{split}annot/{Path(lbl).name}")
        (root / f"{split}.txt").write_text("\n".join(out) + "\n")
    return root


def _test_pair(root: Path) -> tuple[Path, Path]:
    img, lbl = (root / e[len("/SegNet/CamVid/"):] for e in (root / "test.txt").read_text().split())
    return img, lbl


def test_valid_run_passes_and_reuses_the_cache(camvid: Path, tmp_path: Path) -> None:
    cfg = _cfg(camvid)
    model = build_model_from_config(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = preflight_run(cfg, model, cache_dir=tmp_path / "cache")
    assert report["splits"]["train"]["files"] == 2 and report["splits"]["test"]["files"] == 1
    assert report["splits"]["decoded"] == 3 and report["splits"]["cached"] == 0
    again = preflight_run(cfg, model, cache_dir=tmp_path / "cache")
    assert again["splits"]["cached"] == 3 and again["splits"]["decoded"] == 0
    _, lbl = _test_pair(camvid)
    os.utime(lbl, ns=(lbl.stat().st_atime_ns, lbl.stat().st_mtime_ns + 10**9))  # a changed file is checked again
    assert preflight_run(cfg, model, cache_dir=tmp_path / "cache")["splits"]["decoded"] == 1
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not (tmp_path / "results").exists()


def test_every_data_problem_is_listed_with_its_file_and_fix(camvid: Path, tmp_path: Path) -> None:
    webp, lbl = _test_pair(camvid)
    img = webp.with_suffix(".png")  # PNG: its header opens fine, only a full decode finds the truncation
    Image.open(webp).save(img)
    (camvid / "test.txt").write_text((camvid / "test.txt").read_text().replace(webp.name, img.name))
    img.write_bytes(img.read_bytes()[: img.stat().st_size // 2])  # truncated test image
    train_lbl = camvid / "trainannot" / sorted(os.listdir(camvid / "trainannot"))[0]
    arr = np.array(Image.open(train_lbl))
    arr[0, :3] = 200  # not a CamVid label value
    Image.fromarray(arr).save(train_lbl)
    cfg = _cfg(camvid)
    with pytest.raises(PreflightError) as info:
        preflight_run(cfg, build_model_from_config(cfg), cache_dir=tmp_path / "cache")
    msg = str(info.value)
    assert len(info.value.problems) == 2 and "nothing was written" in msg
    assert str(img) in msg and "re-export or replace" in msg
    assert str(train_lbl) in msg and "[200]" in msg and "dataset.num_classes" in msg


def test_empty_test_list_is_named(camvid: Path, tmp_path: Path) -> None:
    (camvid / "test.txt").write_text("")
    cfg = _cfg(camvid)
    with pytest.raises(ValueError, match=r"split 'test' of .*lists no images .*test\.txt.*add"):
        preflight_run(cfg, build_model_from_config(cfg), cache_dir=tmp_path / "cache")
    # the test split is read by the evaluation even when no training happens
    assert preflight_run(_cfg(camvid, "eval.split=val"), build_model_from_config(cfg),
                         cache_dir=tmp_path / "cache")["splits"]["val"]["files"] == 1


def test_random_bytes_checkpoint_is_named_in_tokreds_words(camvid: Path, tmp_path: Path) -> None:
    bad = tmp_path / "random.pth"
    bad.write_bytes(np.random.default_rng(0).bytes(4096))
    for load in (load_checkpoint, read_checkpoint):
        with pytest.raises(ValueError) as info:
            load(bad)
        assert str(bad) in str(info.value) and "not a PyTorch checkpoint" in str(info.value)
        assert "weights_only=False" not in str(info.value) and info.value.__cause__ is None
    ok = tmp_path / "ok.pth"
    save_checkpoint(ok, {"model": {"w": torch.ones(2)}})
    (tmp_path / "trunc.pth").write_bytes(ok.read_bytes()[:200])
    with pytest.raises(ValueError, match=r"trunc\.pth .*truncated or corrupt.*re-download"):
        load_checkpoint(tmp_path / "trunc.pth")
    cfg = _cfg(camvid, f"init_from={bad}")
    with pytest.raises(PreflightError, match=r"init_from: .*random\.pth is not a PyTorch checkpoint"):
        preflight_run(cfg, build_model_from_config(cfg), cache_dir=tmp_path / "cache")


def test_checkpoint_of_another_model_is_summarised(camvid: Path, tmp_path: Path) -> None:
    tiny = build_model_from_config(_cfg(camvid, "model=vit_tiny"))
    other = tmp_path / "vit_tiny.pth"
    save_checkpoint(other, {"model": tiny.state_dict()})
    big_crop = tmp_path / "crop64.pth"
    crop64 = build_model_from_config(_cfg(camvid, "dataset.crop_size=[64,64]"))
    save_checkpoint(big_crop, {"model": crop64.state_dict()})
    cfg = _cfg(camvid, f"init_from={other}", f"checkpoint={big_crop}", "train.epochs=0")
    model = build_model_from_config(cfg)
    with pytest.raises(PreflightError) as info:
        preflight_run(cfg, model, cache_dir=tmp_path / "cache")
    msg = str(info.value)
    assert f"init_from={other} is for another model" in msg and "keys differ in shape" in msg
    assert "did you mean model=vit_tiny?" in msg and "unexpected" in msg
    assert len(info.value.problems) == 1  # checkpoint= (only the grid differs) is resampled: it loads
    with pytest.raises(ValueError, match=r"resume.*is for another model.*patch grid differs.*dataset\.crop_size"):
        load_state_dict_checked(model, load_checkpoint(big_crop)["model"], f"resume=true: checkpoint {big_crop}")
    run_dir = tmp_path / "runs" / "r"
    run_dir.mkdir(parents=True)
    shutil.copy(big_crop, run_dir / "last.pth")
    with pytest.raises(PreflightError, match=r"resume=true: checkpoint .*last\.pth is for another model"):
        preflight_run(_cfg(camvid, "resume=true"), model, run_dir=run_dir, cache_dir=tmp_path / "cache")
