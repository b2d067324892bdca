"""Backbones, local checkpoints, decoders, the segmenter pipeline."""

import pytest
import torch
from safetensors.torch import save_file
from torch.testing import assert_close

from tokred import build_segmenter
from tokred.encoder import Encoder
from tokred.models.backbone import build_backbone, load_backbone_checkpoint
from tokred.models.decoders import build_decoder


@pytest.mark.parametrize("kwargs", [{}, {"init_values": 0.1},
                                    {"qk_norm": True, "reg_tokens": 2, "class_token": False, "global_pool": "avg"}],
                         ids=["plain", "layerscale", "qknorm_registers"])
def test_encoder_loop_equals_timm(kwargs):
    vit = build_backbone("test_vit", (64, 96), **kwargs).eval()
    img = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        x, state = Encoder(vit)(img)
        assert_close(x, vit.forward_features(img), atol=1e-6, rtol=1e-6)
    assert state.num_prefix_tokens == vit.num_prefix_tokens


def test_encoder_other_resolution_resamples_pos_embed():
    vit = build_backbone("test_vit", (64, 96)).eval()
    img = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        x, st = Encoder(vit)(img)
        assert_close(x, vit.forward_features(img), atol=1e-5, rtol=1e-5)
    assert st.grid_size == (6, 8)


def test_image_not_multiple_of_patch_raises():
    enc = Encoder(build_backbone("test_vit", (64, 96)))
    with pytest.raises(ValueError, match="multiple of the patch size"):
        enc(torch.randn(1, 3, 70, 96))


def test_crop_not_multiple_of_patch_raises():
    with pytest.raises(ValueError, match="crop_size"):
        build_segmenter("test_vit", 3, (70, 96))


def test_unknown_backbone_lists_valid_names():
    with pytest.raises(ValueError, match="vit_tiny"):
        build_backbone("resnet50_oops", (64, 64))
    with pytest.raises(ValueError, match="Did you mean.*eva02_large"):
        build_backbone("eva02_larg", (56, 56))


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_timm_checkpoint_loads_and_resizes_pos_embed(tmp_path, suffix):
    src = build_backbone("test_vit", (32, 32))  # 2x2 grid
    path = tmp_path / f"w{suffix}"
    sd = {k: v.contiguous() for k, v in src.state_dict().items()}
    torch.save(sd, path) if suffix == ".pth" else save_file(sd, str(path))
    dst = build_backbone("test_vit", (64, 96), checkpoint=path)  # 4x6 grid
    assert dst.pos_embed.shape[1] == 1 + 4 * 6
    assert_close(dst.blocks[0].attn.qkv.weight, src.blocks[0].attn.qkv.weight)


def test_tokred_checkpoint_backbone_part_loads(tmp_path):
    seg = build_segmenter("test_vit", 3, (64, 96))
    path = tmp_path / "seg.pth"
    torch.save({"model": seg.state_dict()}, path)
    vit = build_backbone("test_vit", (64, 96), checkpoint=path)
    assert_close(vit.blocks[2].mlp.fc1.weight, seg.encoder.vit.blocks[2].mlp.fc1.weight)


def test_checkpoint_errors(tmp_path):
    vit = build_backbone("test_vit", (64, 96))
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_backbone_checkpoint(vit, tmp_path / "missing.pth")
    bad = tmp_path / "corrupt.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="corrupt.pth"):
        load_backbone_checkpoint(vit, bad)
    other = build_backbone("test_vit", (64, 96), embed_dim=32, num_heads=2)
    path = tmp_path / "other.safetensors"
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(path))
    with pytest.raises(ValueError, match="does not match backbone"):
        load_backbone_checkpoint(vit, path)


def test_pickled_code_is_not_executed(tmp_path):
    import pickle

    class Evil:
        def __reduce__(self):
            return (exec, ("raise SystemExit('pickled code ran')",))

    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"model": Evil()}, f)
    with pytest.raises(ValueError, match="evil.pth"):
        load_backbone_checkpoint(build_backbone("test_vit", (64, 96)), path)


@pytest.mark.parametrize("name", ["linear", "mask_transformer"])
def test_decoders_map_grid_to_class_logits(name):
    dec = build_decoder(name, 64, 7)
    out = dec(torch.randn(2, 64, 4, 6))
    assert out.shape == (2, 7, 4, 6)
    with pytest.raises(ValueError, match="linear"):
        build_decoder("fpn", 64, 7)


def test_segmenter_upsamples_and_ignores_index():
    seg = build_segmenter("test_vit", 4, (64, 96), decoder="mask_transformer")
    img = torch.randn(2, 3, 64, 96)
    out = seg(img)
    assert out.logits.shape == (2, 4, 64, 96)
    tgt = torch.full((2, 64, 96), 255, dtype=torch.long)
    tgt[:, :8] = 1
    loss = seg.losses(out, tgt)["loss"]
    # changing the logits only where the target is ignored leaves the loss unchanged
    logits2 = out.logits.clone()
    logits2[:, :, 8:] += 100
    from dataclasses import replace

    assert_close(seg.losses(replace(out, logits=logits2), tgt)["loss"], loss)
    loss.backward()


def test_reducer_in_wrong_slot_raises():
    from tokred.reducers.registry import register_reducer, unregister_reducer
    from tokred.reducers.base import Pruner

    class _P(Pruner):
        pass

    register_reducer("_test_pruner_slot", _P)
    try:
        with pytest.raises(ValueError, match="pruner"):
            build_segmenter("test_vit", 3, (64, 96), merger="_test_pruner_slot")
    finally:
        unregister_reducer("_test_pruner_slot")
