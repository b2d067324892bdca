"""Whole released segmentation checkpoints: Segmenter authors' / mmseg / tokred layouts -> tokred Segmenter.

The exporters below write a tokred model's weights under the key names and shapes of the public model
definitions (Segmenter: segm/model/vit.py + decoder.py; mmseg: backbones/vit.py + segmenter_mask_head.py,
FCNHead with num_convs=0 for the linear head), so that a round trip must reproduce the logits exactly.
"""

from __future__ import annotations

import pickle

import pytest
import torch
import yaml

from tokred.models.checkpoints import detect_format, load_segmentation_checkpoint, read_checkpoint
from tokred.models.segmenter import build_segmenter

CROP = (64, 80)  # grid 4 x 5 (not square: variant.yml's image_size is needed to resample)
K = 4
BLOCK_PARTS = ("norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
               "attn.proj.bias", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias",
               "mlp.fc2.weight", "mlp.fc2.bias")
MMSEG_PARTS = ("ln1.weight", "ln1.bias", "attn.attn.in_proj_weight", "attn.attn.in_proj_bias",
               "attn.attn.out_proj.weight", "attn.attn.out_proj.bias", "ln2.weight", "ln2.bias",
               "ffn.layers.0.0.weight", "ffn.layers.0.0.bias", "ffn.layers.1.weight", "ffn.layers.1.bias")


def _vit_t(decoder="mask_transformer", crop=CROP, num_classes=K, seed=0, qkv_bias=True, **kw):
    """ViT-T/16 (embed_dim 192, depth 12, num_heads 3) Segmenter, random weights, eval mode."""
    torch.manual_seed(seed)
    dk = {"num_layers": 2, "qkv_bias": qkv_bias} if decoder == "mask_transformer" else {}
    return build_segmenter("vit_tiny", num_classes, crop, decoder=decoder, decoder_kwargs=dk, **kw).eval()


def _segmenter_layout(seg) -> dict:
    """Segmenter authors' checkpoint.pth: {"model": ..., "optimizer": ..., "n_cls": ..., "epoch": ...}."""
    t = seg.state_dict()
    m = {"encoder.cls_token": t["encoder.vit.cls_token"], "encoder.pos_embed": t["encoder.vit.pos_embed"],
         "encoder.patch_embed.proj.weight": t["encoder.vit.patch_embed.proj.weight"],
         "encoder.patch_embed.proj.bias": t["encoder.vit.patch_embed.proj.bias"],
         "encoder.norm.weight": t["encoder.vit.norm.weight"], "encoder.norm.bias": t["encoder.vit.norm.bias"],
         "encoder.head.weight": torch.randn(1000, 192), "encoder.head.bias": torch.zeros(1000)}  # unused head
    for i in range(12):
        for part in BLOCK_PARTS:
            m[f"encoder.blocks.{i}.{part}"] = t[f"encoder.vit.blocks.{i}.{part}"]
    if "decoder.head.weight" in t:  # DecoderLinear: head = Linear(d_encoder, n_cls)
        m["decoder.head.weight"], m["decoder.head.bias"] = t["decoder.head.weight"], t["decoder.head.bias"]
    else:  # MaskTransformer
        m["decoder.cls_emb"] = t["decoder.cls_emb"]
        m["decoder.proj_dec.weight"] = t["decoder.proj_in.weight"]
        m["decoder.proj_dec.bias"] = t["decoder.proj_in.bias"]
        for i in range(2):
            for part in BLOCK_PARTS:
                m[f"decoder.blocks.{i}.{part}"] = t[f"decoder.blocks.{i}.{part}"]
        m["decoder.decoder_norm.weight"] = t["decoder.norm.weight"]
        m["decoder.decoder_norm.bias"] = t["decoder.norm.bias"]
        m["decoder.proj_patch"] = t["decoder.proj_patch.weight"].t().contiguous()  # used as x @ proj_patch
        m["decoder.proj_classes"] = t["decoder.proj_classes.weight"].t().contiguous()
        m["decoder.mask_norm.weight"] = t["decoder.mask_norm.weight"]
        m["decoder.mask_norm.bias"] = t["decoder.mask_norm.bias"]
    return {"model": m, "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4}]}, "n_cls": K, "epoch": 63}


def _mmseg_layout(seg) -> dict:
    """mmseg checkpoint: {"meta": ..., "state_dict": backbone.* / decode_head.* / auxiliary_head.*}."""
    t = seg.state_dict()
    m = {"backbone.cls_token": t["encoder.vit.cls_token"], "backbone.pos_embed": t["encoder.vit.pos_embed"],
         "backbone.patch_embed.projection.weight": t["encoder.vit.patch_embed.proj.weight"],
         "backbone.patch_embed.projection.bias": t["encoder.vit.patch_embed.proj.bias"],
         "backbone.ln1.weight": t["encoder.vit.norm.weight"], "backbone.ln1.bias": t["encoder.vit.norm.bias"],
         "auxiliary_head.conv_seg.weight": torch.randn(K, 192, 1, 1)}
    for i in range(12):
        for mm, ours in zip(MMSEG_PARTS, BLOCK_PARTS):
            m[f"backbone.layers.{i}.{mm}"] = t[f"encoder.vit.blocks.{i}.{ours}"]
    if "decoder.head.weight" in t:  # FCNHead(num_convs=0): conv_seg is a 1x1 conv
        m["decode_head.conv_seg.weight"] = t["decoder.head.weight"][:, :, None, None]
        m["decode_head.conv_seg.bias"] = t["decoder.head.bias"]
    else:
        m["decode_head.cls_emb"] = t["decoder.cls_emb"]
        m["decode_head.dec_proj.weight"], m["decode_head.dec_proj.bias"] = (t["decoder.proj_in.weight"],
                                                                            t["decoder.proj_in.bias"])
        for i in range(2):
            for mm, ours in zip(MMSEG_PARTS, BLOCK_PARTS):
                m[f"decode_head.layers.{i}.{mm}"] = t[f"decoder.blocks.{i}.{ours}"]
        for mm, ours in (("decoder_norm", "norm"), ("mask_norm", "mask_norm")):
            m[f"decode_head.{mm}.weight"] = t[f"decoder.{ours}.weight"]
            m[f"decode_head.{mm}.bias"] = t[f"decoder.{ours}.bias"]
        m["decode_head.patch_proj.weight"] = t["decoder.proj_patch.weight"]
        m["decode_head.classes_proj.weight"] = t["decoder.proj_classes.weight"]
    meta = {"epoch": 1, "iter": 160000, "mmseg_version": "0.30.0", "CLASSES": ("wall", "sky", "floor", "tree")}
    return {"meta": meta, "state_dict": m, "optimizer": {"state": {}, "param_groups": []}}


def _variant(decoder="mask_transformer", n_cls=K, image_size=CROP) -> dict:
    return {"net_kwargs": {"backbone": "vit_tiny_patch16_384", "d_model": 192, "n_heads": 3, "n_layers": 12,
                           "patch_size": 16, "image_size": list(image_size), "n_cls": n_cls,
                           "decoder": {"name": decoder, "n_layers": 2, "drop_path_rate": 0.0}},
            "dataset_kwargs": {"dataset": "ade20k", "crop_size": image_size[0]}}


def _logits(seg, img):
    with torch.no_grad():
        return seg(img).logits


IMG = torch.randn(1, 3, *CROP, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("decoder", ["linear", "mask_transformer"])
@pytest.mark.parametrize("fmt", ["segmenter", "mmseg", "tokred"])
def test_round_trip_reproduces_logits(tmp_path, fmt, decoder):
    src = _vit_t(decoder, seed=0)
    if fmt == "segmenter":
        ckpt = _segmenter_layout(src)
        (tmp_path / "variant.yml").write_text(yaml.safe_dump(_variant(decoder)))
    elif fmt == "mmseg":
        ckpt = _mmseg_layout(src)
    else:
        ckpt = {"model": src.state_dict(), "epoch": 2}
    path = tmp_path / "checkpoint.pth"
    torch.save(ckpt, path)
    assert detect_format(read_checkpoint(path)) == fmt
    dst = _vit_t(decoder, seed=1)
    assert not torch.allclose(_logits(dst, IMG), _logits(src, IMG))
    assert load_segmentation_checkpoint(dst, path) == fmt
    torch.testing.assert_close(_logits(dst, IMG), _logits(src, IMG), atol=1e-5, rtol=1e-5)


def test_pos_embed_is_resampled_to_the_models_grid(tmp_path):
    from timm.layers import resample_abs_pos_embed

    src = _vit_t(seed=0)
    torch.save(_segmenter_layout(src), tmp_path / "checkpoint.pth")
    (tmp_path / "variant.yml").write_text(yaml.safe_dump(_variant()))
    dst = _vit_t(seed=1, crop=(96, 96))  # grid 6 x 6 from 4 x 5
    load_segmentation_checkpoint(dst, tmp_path / "checkpoint.pth", format="segmenter")
    pe = dst.encoder.vit.pos_embed
    expected = resample_abs_pos_embed(src.encoder.vit.pos_embed, new_size=[6, 6], old_size=[4, 5],
                                      num_prefix_tokens=1)
    assert pe.shape == (1, 1 + 36, 192)
    torch.testing.assert_close(pe.data, expected)
    torch.testing.assert_close(dst.decoder.cls_emb, src.decoder.cls_emb)
    assert torch.isfinite(_logits(dst, torch.randn(1, 3, 96, 96))).all()


def test_variant_yml_that_disagrees_names_the_option(tmp_path):
    src = _vit_t(seed=0)
    torch.save(_segmenter_layout(src), tmp_path / "checkpoint.pth")
    (tmp_path / "variant.yml").write_text(yaml.safe_dump(_variant(decoder="linear", n_cls=150)))
    with pytest.raises(ValueError, match=r"n_cls=150 \(model: 4; set dataset.num_classes\).*decoder=linear"):
        load_segmentation_checkpoint(_vit_t(seed=1), tmp_path / "checkpoint.pth")


def test_shape_mismatch_names_tensor_shapes_and_option(tmp_path):
    torch.save(_mmseg_layout(_vit_t(num_classes=6)), tmp_path / "m.pth")
    with pytest.raises(ValueError, match=r"decoder.cls_emb has shape \(1, 6, 192\).*\(1, 4, 192\).*num_classes"):
        load_segmentation_checkpoint(_vit_t(), tmp_path / "m.pth")
    torch.save(_mmseg_layout(_vit_t()), tmp_path / "m.pth")
    with pytest.raises(ValueError, match="model="):  # ViT-T weights into a 64-wide test model
        load_segmentation_checkpoint(build_segmenter("test_vit", K, CROP, decoder="mask_transformer",
                                                     decoder_kwargs={"qkv_bias": True}), tmp_path / "m.pth")


def test_wrong_decoder_options_are_named(tmp_path):
    torch.save(_mmseg_layout(_vit_t()), tmp_path / "m.pth")
    with pytest.raises(ValueError, match=r"decoder.kwargs.qkv_bias=true"):
        load_segmentation_checkpoint(_vit_t(qkv_bias=False), tmp_path / "m.pth")
    with pytest.raises(ValueError, match=r"decoder="):
        load_segmentation_checkpoint(_vit_t("linear"), tmp_path / "m.pth")


def test_unknown_layout_and_format_errors(tmp_path):
    torch.save({"foo.bar": torch.zeros(2), "epoch": 1}, tmp_path / "x.pth")
    with pytest.raises(ValueError, match=r"segmenter, mmseg, tokred.*foo.bar"):
        load_segmentation_checkpoint(_vit_t(), tmp_path / "x.pth")
    torch.save(_segmenter_layout(_vit_t()), tmp_path / "s.pth")
    with pytest.raises(ValueError, match=r"no key of the 'mmseg' format"):
        load_segmentation_checkpoint(_vit_t(), tmp_path / "s.pth", format="mmseg")
    with pytest.raises(ValueError, match=r"did you mean 'mmseg'"):
        load_segmentation_checkpoint(_vit_t(), tmp_path / "s.pth", format="mmsge")


RAN = []


def _payload():
    RAN.append(True)
    return {}


class _Evil:
    def __reduce__(self):
        return (_payload, ())


def test_pickled_code_is_never_executed(tmp_path):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": {"backbone.x": _Evil()}}, f, protocol=2)
    with pytest.raises(ValueError, match="weights_only"):
        load_segmentation_checkpoint(_vit_t(), path)
    assert not RAN
