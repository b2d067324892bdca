"""Input normalisation follows the weights: the names and explicit values of ``model.normalization``, each rule of
``auto`` (Segmenter's variant.yml, mmseg, a tokred run, init_from, a timm tag, .npz, the ImageNet default), the
transforms really applying the values, and bad values named with the key and the valid options."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from omegaconf import OmegaConf
from PIL import Image
from torchvision import tv_tensors

from tokred.config import build_datasets, input_normalization
from tokred.data.normalization import IMAGENET, NAMED, VIT, parse_normalization
from tokred.data.spec import IMAGENET_MEAN, IMAGENET_STD, TestPipeline
from tokred.data.transforms import build_eval_transform, build_protocol_transform, build_train_transform
from tokred.models.checkpoints import checkpoint_normalization

COLOUR = (51, 102, 204)  # one RGB colour over the whole image


def _cfg(**model) -> OmegaConf:
    """A config with the keys ``input_normalization`` reads (what composition gives, without Hydra)."""
    top = {k: model.pop(k) for k in ("checkpoint", "checkpoint_format", "init_from") if k in model}
    base = {"model": {"name": "vit_tiny", "pretrained": None, "checkpoint": None, "normalization": "auto", **model},
            "checkpoint": None, "checkpoint_format": "auto", "init_from": None, **top}
    return OmegaConf.create(base)


def _expected(mean, std) -> torch.Tensor:
    return (torch.tensor(COLOUR, dtype=torch.float32) / 255 - torch.tensor(mean)) / torch.tensor(std)


# parsing ---------------------------------------------------------------------------------------------------


def test_names_and_explicit_values():
    assert parse_normalization("auto") is None and parse_normalization(None) is None
    assert parse_normalization("vit").mean == (0.5, 0.5, 0.5) and parse_normalization("VIT").std == (0.5, 0.5, 0.5)
    assert parse_normalization("imagenet").mean == IMAGENET_MEAN
    assert parse_normalization("deit").std == IMAGENET_STD  # Segmenter's name for ImageNet's statistics
    custom = parse_normalization({"mean": [0.1, 0.2, 0.3], "std": [1, 2, 4]})
    assert (custom.mean, custom.std, custom.name) == ((0.1, 0.2, 0.3), (1.0, 2.0, 4.0), "custom")
    assert set(NAMED) == {"imagenet", "vit", "deit"}


@pytest.mark.parametrize("value, match", [
    ("half", r"model.normalization='half' unknown; valid: auto, imagenet, vit, deit, or \{mean"),
    ("imagnet", r"did you mean 'imagenet'\?"),
    ({"mean": [0.5] * 3}, r"exactly the keys mean and std .*valid: auto, imagenet, vit"),
    ({"mean": [0.5, 0.5], "std": [0.5] * 3}, r"model.normalization: .*mean must be 3 numbers .*valid: auto"),
    ({"mean": [0.5] * 3, "std": [0.5, 0.0, 0.5]}, r"std must be positive"),
    (0.5, r"model.normalization=0.5 \(float\) is not a normalisation; valid: auto"),
])
def test_bad_values_name_the_key_and_the_options(value, match):
    with pytest.raises(ValueError, match=match):
        parse_normalization(value)


def test_a_bad_value_fails_at_model_build_before_any_run_folder():
    from hydra import compose, initialize_config_dir

    from tokred.config import build_model_from_config, config_dir
    from tokred.structured import register_configs

    register_configs()
    with initialize_config_dir(str(config_dir()), version_base=None):
        cfg = compose("config", overrides=["model=test_vit", "model.normalization=half"])
        assert input_normalization(compose("config", overrides=["model=test_vit"])).name == "imagenet"
        explicit = compose("config", overrides=["model=test_vit", "model.normalization={mean:[0,0,0],std:[1,1,1]}"])
        assert input_normalization(explicit).mean == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="model.normalization='half' unknown"):
        build_model_from_config(cfg)


# the rules of auto -------------------------------------------------------------------------------------------


def _segmenter_keys() -> dict:
    return {"model": {"encoder.blocks.0.norm1.weight": torch.ones(2), "decoder.cls_emb": torch.zeros(1, 2, 2)}}


def _mmseg_keys() -> dict:
    return {"meta": {"iter": 1}, "state_dict": {"backbone.cls_token": torch.zeros(1, 1, 2),
                                                  "decode_head.cls_emb": torch.zeros(1, 2, 2)}}


def _tokred_keys() -> dict:
    return {"model": {"encoder.vit.cls_token": torch.zeros(1, 1, 2)}, "epoch": 1}


@pytest.mark.parametrize("variant, expected", [
    ({"dataset_kwargs": {"normalization": "vit"}}, VIT),
    ({"dataset_kwargs": {"normalization": "deit"}}, IMAGENET),  # DeiT backbones: ImageNet statistics
    ({"net_kwargs": {"normalization": "deit"}}, IMAGENET),
    ({"dataset_kwargs": {"dataset": "ade20k"}}, VIT),  # no normalization entry: the authors' ViT default
    (None, VIT),  # no variant.yml
])
def test_segmenter_checkpoint_follows_its_variant_yml(tmp_path, variant, expected):
    torch.save(_segmenter_keys(), tmp_path / "checkpoint.pth")
    if variant is not None:
        (tmp_path / "variant.yml").write_text(yaml.safe_dump(variant))
    for fmt in ("auto", "segmenter"):
        got = input_normalization(_cfg(checkpoint=str(tmp_path / "checkpoint.pth"), checkpoint_format=fmt))
        assert (got.mean, got.std) == (expected.mean, expected.std)
        assert ("authors' ViT default" in got.source) == (variant is None or "normalization" not in str(variant))


def test_segmenter_variant_with_an_unknown_name_is_refused(tmp_path):
    torch.save(_segmenter_keys(), tmp_path / "checkpoint.pth")
    (tmp_path / "variant.yml").write_text(yaml.safe_dump({"dataset_kwargs": {"normalization": "clip"}}))
    with pytest.raises(ValueError, match=r"variant.yml dataset_kwargs.normalization='clip' unknown; valid"):
        input_normalization(_cfg(checkpoint=str(tmp_path / "checkpoint.pth")))


def test_mmseg_checkpoint_is_vit(tmp_path):
    torch.save(_mmseg_keys(), tmp_path / "iter_160000.pth")
    got = input_normalization(_cfg(checkpoint=str(tmp_path / "iter_160000.pth")))
    assert (got.mean, got.std, got.name) == ((0.5,) * 3, (0.5,) * 3, "vit") and "127.5" in got.source
    assert checkpoint_normalization(tmp_path / "iter_160000.pth", "mmseg").name == "vit"
    with pytest.raises(ValueError, match="unknown checkpoint_format 'mmsegmentation'"):
        checkpoint_normalization(tmp_path / "iter_160000.pth", "mmsegmentation")


def test_tokred_checkpoint_follows_the_run_that_wrote_it(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    torch.save(_tokred_keys(), run / "last.pth")
    ckpt = str(run / "last.pth")
    assert input_normalization(_cfg(checkpoint=ckpt)).name == "imagenet"  # a bare file: tokred's default
    # a run from before model.normalization existed trained with ImageNet even from an AugReg tag
    old = {"model": {"name": "vit_tiny", "pretrained": "vit_tiny_patch16_224.augreg_in21k_ft_in1k"}}
    (run / "config.yaml").write_text(yaml.safe_dump(old))
    got = input_normalization(_cfg(checkpoint=ckpt))
    assert got.name == "imagenet" and "predates" in got.source
    # a newer run resolves its own config (here auto -> its timm tag's 0.5 / 0.5)
    (run / "config.yaml").write_text(yaml.safe_dump({**old, "model": {**old["model"], "normalization": "auto"}}))
    got = input_normalization(_cfg(checkpoint=ckpt))
    assert got.mean == (0.5, 0.5, 0.5) and "timm pretrained_cfg" in got.source
    # the recorded value in metrics.json wins
    rec = {"name": "custom", "mean": [0.1, 0.2, 0.3], "std": [0.3, 0.2, 0.1], "source": "x"}
    (run / "metrics.json").write_text(json.dumps({"normalization": rec}))
    assert input_normalization(_cfg(checkpoint=ckpt)).mean == (0.1, 0.2, 0.3)
    assert input_normalization(_cfg(init_from=ckpt)).std == (0.3, 0.2, 0.1)  # fine-tuning from it: the same
    # an explicit setting always wins
    assert input_normalization(_cfg(checkpoint=ckpt, normalization="vit")).name == "vit"


@pytest.mark.parametrize("name, tag, expected", [
    ("vit_small", "vit_small_patch16_384.augreg_in21k_ft_in1k", VIT),
    ("vit_large", "augreg_in21k_ft_in1k", VIT),  # a bare tag of the model's architecture
    ("dinov2_small_reg", "vit_small_patch14_reg4_dinov2.lvd142m", IMAGENET),
    ("dinov2_small_reg", "true", IMAGENET),  # the architecture's default tag
])
def test_timm_tag_gives_its_pretrained_cfg(name, tag, expected):
    got = input_normalization(_cfg(name=name, pretrained=tag))  # timm's registry only: nothing is downloaded
    assert (got.mean, got.std) == (expected.mean, expected.std) and "pretrained_cfg" in got.source
    eva = input_normalization(_cfg(name="eva02_large", pretrained="eva02_large_patch14_224.mim_m38m"))
    assert eva.mean[0] == pytest.approx(0.48145466)  # CLIP's statistics, neither of the named ones


def test_unknown_tag_lists_close_names():
    with pytest.raises(ValueError, match="close names"):
        input_normalization(_cfg(name="vit_small", pretrained="vit_small_patch16_384.augreg_in21k_ft_in"))


def test_defaults_npz_and_missing_files():
    assert input_normalization(_cfg()).name == "imagenet"  # random init: what tokred always trained with
    assert input_normalization(_cfg(checkpoint="/nowhere/checkpoint.pth")).name == "imagenet"  # preflight reports
    got = input_normalization(OmegaConf.merge(_cfg(), {"model": {"checkpoint": "/w/ViT-B_16.npz"}}))
    assert got.name == "vit" and "big_vision" in got.source


# the transforms use the values --------------------------------------------------------------------------------


@pytest.mark.parametrize("norm", [IMAGENET, VIT, parse_normalization({"mean": [0.2, 0.4, 0.6], "std": [0.1, 1, 2]})])
def test_a_constant_colour_normalises_to_the_expected_number(norm):
    image = tv_tensors.Image(torch.tensor(COLOUR, dtype=torch.uint8).view(3, 1, 1).expand(3, 24, 32).clone())
    label = tv_tensors.Mask(torch.zeros(1, 24, 32, dtype=torch.uint8))
    want = _expected(norm.mean, norm.std)
    outs = [build_eval_transform(None, norm.mean, norm.std)(image),
            build_eval_transform((16, 16), norm.mean, norm.std)(image),
            build_protocol_transform(TestPipeline("keep_ratio", (48, 64)), norm.mean, norm.std)(image),
            build_train_transform((16, 16), scale_range=(2.0, 2.0), hflip=False, photometric=False,
                                  mean=norm.mean, std=norm.std)(image, label)[0]]
    for out in outs:
        torch.testing.assert_close(out.mean(dim=(1, 2)), want, atol=1e-5, rtol=0)
        torch.testing.assert_close(out.amax(dim=(1, 2)), out.amin(dim=(1, 2)), atol=1e-5, rtol=0)


def test_build_datasets_normalises_every_split_with_the_resolved_values(tmp_path):
    root = tmp_path / "camvid"
    for split in ("train", "test"):
        (root / split).mkdir(parents=True)
        (root / f"{split}annot").mkdir()
        Image.fromarray(np.full((36, 48, 3), COLOUR, np.uint8)).save(root / split / "a.png")
        Image.fromarray(np.zeros((36, 48), np.uint8)).save(root / f"{split}annot" / "a.png")
        (root / f"{split}.txt").write_text(f"/SegNet/CamVid/{split}/a.png /SegNet/CamVid/{split}annot/a.png\n")
    data = {"name": "camvid", "root": str(root), "crop_size": [32, 32], "base_size": [32, 32],
            "scale_range": [1.0, 1.0], "train_split": "train", "test_pipeline": "crop", "protocol": None}
    for value, (mean, std) in (("vit", ((0.5,) * 3, (0.5,) * 3)), ("auto", (IMAGENET_MEAN, IMAGENET_STD)),
                               ({"mean": [0.1, 0.1, 0.1], "std": [2, 2, 2]}, ((0.1,) * 3, (2.0,) * 3))):
        cfg = OmegaConf.merge(_cfg(normalization=value),
                              {"dataset": data, "eval": {"split": "test", "max_items": None}})
        want = _expected(mean, std)
        for ds in (build_datasets(cfg, train=False), build_datasets(cfg, train=False, split="train")):
            torch.testing.assert_close(ds[0][0].mean(dim=(1, 2)), want, atol=1e-5, rtol=0)
            assert (ds.mean, ds.std) == (tuple(mean), tuple(std))
        train = build_datasets(cfg, train=True)  # colour jitter moves the values: check the last step instead
        assert (train.mean, train.std) == (tuple(mean), tuple(std)) and len(train[0][0]) == 3
        last = train._transform.transforms[-1]
        assert (tuple(last.mean), tuple(last.std)) == (tuple(mean), tuple(std))


def test_library_default_is_the_specs():
    from tokred.data import build_dataset

    ds = build_dataset("camvid_sample", None, "val", (32, 32), train=False, max_items=1)
    assert (ds.mean, ds.std) == (IMAGENET_MEAN, IMAGENET_STD)
    vit = build_dataset("camvid_sample", None, "val", (32, 32), train=False, max_items=1, normalization=VIT)
    a, b = ds[0][0], vit[0][0]
    raw = a * torch.tensor(IMAGENET_STD).view(3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    torch.testing.assert_close(b, (raw - 0.5) / 0.5, atol=1e-5, rtol=0)


def test_record_is_what_metrics_json_holds():
    rec = VIT.record()
    assert rec == {"name": "vit", "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "source": ""}
    assert json.loads(json.dumps(rec)) == rec


# metrics.json ----------------------------------------------------------------------------------------------------


def test_runs_record_the_normalisation_and_an_eval_follows_it(tmp_path, tokred_cli):
    args = ("experiment=smoke", f"output_dir={tmp_path}", "eval.bench=false", "eval.flops_images=0",
            "train.max_iters=1", "eval.max_items=1")
    res = tokred_cli("run", *args, "run_name=a", "model.normalization={mean:[0.4,0.4,0.4],std:[0.3,0.3,0.3]}")
    assert res.returncode == 0, res.stderr[-3000:]
    rec = json.loads((tmp_path / "a" / "metrics.json").read_text())["normalization"]
    assert (rec["name"], rec["mean"], rec["std"]) == ("custom", [0.4] * 3, [0.3] * 3)
    res = tokred_cli("eval", *args, "run_name=b", f"checkpoint={tmp_path / 'a' / 'last.pth'}")
    assert res.returncode == 0, res.stderr[-3000:]
    rec = json.loads((tmp_path / "b" / "metrics.json").read_text())["normalization"]
    assert rec["mean"] == [0.4] * 3 and rec["source"] == f"recorded in {tmp_path / 'a' / 'metrics.json'}"
    res = tokred_cli("run", *args, "run_name=c", "model.normalization=half")
    assert res.returncode != 0 and "model.normalization='half' unknown; valid: auto, imagenet, vit" in res.stderr
    assert not (tmp_path / "c").exists()  # refused before any run folder
