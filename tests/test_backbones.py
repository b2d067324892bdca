"""Backbone adapters (timm VisionTransformer, DINOv2 layout, EVA-02 RoPE), encoder taps, pretrained tags."""

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from torch.testing import assert_close

from tokred import build_segmenter
from tokred.backbones import adapter_for
from tokred.backbones.eva import EvaAdapter, rope_at
from tokred.backbones.vit import VisionTransformerAdapter
from tokred.encoder import Encoder
from tokred.models.backbone import build_backbone, load_backbone_checkpoint
from tokred.state import TokenState, patch_centroids

EVA_CROP = (56, 70)  # 4 x 5 patches of 14 px


def test_adapter_for_picks_the_family_and_lists_registered_adapters():
    assert isinstance(adapter_for(build_backbone("test_vit", (32, 32))), VisionTransformerAdapter)
    assert isinstance(adapter_for(build_backbone("test_dinov2", EVA_CROP)), VisionTransformerAdapter)
    assert isinstance(adapter_for(build_backbone("test_eva", EVA_CROP)), EvaAdapter)
    with pytest.raises(TypeError, match=r"registered: .*eva \(EvaAdapter\).*vit \(VisionTransformerAdapter\)"):
        adapter_for(nn.Linear(2, 2))


@pytest.mark.parametrize("name", ["test_dinov2", "test_eva"], ids=["dinov2", "eva02"])
def test_loop_equals_forward_features_at_two_resolutions(name):
    model = build_backbone(name, EVA_CROP).eval()
    enc = Encoder(model)
    for hw in (EVA_CROP, (84, 56)):  # the second resamples pos_embed and rebuilds RoPE for a 6 x 4 grid
        img = torch.randn(2, 3, *hw)
        with torch.no_grad():
            assert_close(enc(img)[0], model.forward_features(img), atol=1e-5, rtol=1e-5)
    assert enc.num_prefix_tokens == (5 if name == "test_dinov2" else 1)
    assert enc.patch_size == (14, 14)


@pytest.mark.parametrize("grid", [(4, 5), (6, 3)])
def test_rope_at_integer_positions_is_timms_table(grid):
    rope = build_backbone("test_eva", EVA_CROP).rope
    st = TokenState.initial(1, grid, 1, torch.device("cpu"))
    assert_close(rope_at(rope, st.pos[:, 1:], grid)[0], rope.get_embed(shape=grid), atol=1e-6, rtol=1e-6)


def test_merged_token_gets_the_rope_of_its_centroid():
    enc = Encoder(build_backbone("test_eva", EVA_CROP))
    grid = (4, 5)
    x = torch.randn(1, 21, 64)
    st = TokenState.initial(1, grid, 1, torch.device("cpu"))
    assign = torch.cat([torch.tensor([0, 1, 1]), torch.arange(2, 20)])[None]  # patches (0,0), (0,1) -> one token
    _, merged = st.merge(x, assign, 20)
    assert_close(merged.pos[0, 1], torch.tensor([0.0, 0.5]))
    emb = enc.adapter.attention_inputs(merged)  # [1, 1, N - P, 2 * head_dim]
    centre = rope_at(enc.vit.rope, torch.tensor([[[0.0, 0.5]]]), grid)[0, 0]
    assert_close(emb[0, 0, 0], centre)
    ends = rope_at(enc.vit.rope, torch.tensor([[[0.0, 0.0], [0.0, 1.0]]]), grid)[0]
    assert not torch.allclose(emb[0, 0, 0], ends[0]) and not torch.allclose(emb[0, 0, 0], ends[1])
    assert_close(emb[0, 0, 1:], rope_at(enc.vit.rope, st.pos[:, 3:], grid)[0])  # untouched tokens keep theirs


def test_eva_attention_reads_positions():
    """Moving the tokens' positions changes the EVA output (RoPE), but not the ViT one (absolute pos_embed)."""
    from dataclasses import replace

    from tokred.reducers.base import Merger

    class Shift(Merger):
        def on_embed(self, x, state, ctx):
            return x, replace(state, fields={**state.fields, "pos": state.pos + 3.0})

    img = torch.randn(1, 3, *EVA_CROP)
    for name, moved in (("test_eva", True), ("test_dinov2", False)):
        model = build_backbone(name, EVA_CROP).eval()
        with torch.no_grad():
            same = torch.allclose(Encoder(model, [Shift()])(img)[0], model.forward_features(img), atol=1e-5)
        assert same != moved, name


@pytest.mark.parametrize("reducer,kwargs", [("tome", {"r": 8}), ("early_exit", {"threshold": 0.05, "top_k": 1}),
                                            ("cropr", {"r": 6}), ("dcts", {"levels": (2, 4), "policy": "oracle"})])
def test_positions_stay_the_centroids_of_the_held_patches(reducer, kwargs):
    slot = "pruner" if reducer in ("early_exit", "cropr") else "merger"
    torch.manual_seed(0)
    seg = build_segmenter("test_eva", 5, (112, 140), **{slot: reducer, f"{slot}_kwargs": kwargs}).eval()
    img = torch.randn(2, 3, 112, 140)
    tgt = torch.zeros(2, 112, 140, dtype=torch.long)
    tgt[:, :, 70:] = 1
    with torch.no_grad():
        st = seg(img, tgt).state
    m = 0 if st.bank is None else st.bank.num_slots
    live, banked = patch_centroids(st.token_map, st.grid_size, st.size.shape[1], m)
    P = st.num_prefix_tokens
    valid = st.valid_mask()[:, P:]
    assert_close(st.pos[:, P:][valid], live[:, P:][valid], atol=1e-4, rtol=1e-5)
    if st.bank is not None:
        assert_close(st.bank.fields["pos"][st.bank.valid], banked[st.bank.valid], atol=1e-4, rtol=1e-5)


def test_taps_are_restored_block_outputs():
    vit = build_backbone("test_vit", (64, 96)).eval()
    img = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        _, st = Encoder(vit)(img, taps=(1, 5))
        ref = vit.forward_intermediates(img, indices=[1, 5], norm=False, output_fmt="NCHW", intermediates_only=True)
    assert sorted(st.taps) == [1, 5]
    assert_close(st.taps[1], ref[0], atol=1e-5, rtol=1e-5)
    assert_close(st.taps[5], ref[1], atol=1e-5, rtol=1e-5)
    seg = build_segmenter("test_vit", 3, (64, 96), pruner="early_exit", pruner_kwargs={"threshold": 0.05, "top_k": 1})
    with torch.no_grad():
        _, st = seg.encoder(img, taps=(5,))
    assert st.bank is not None and st.taps[5].shape == (2, 64, 4, 6)  # halted cells filled from the bank
    with pytest.raises(ValueError, match="0-based block indices"):
        Encoder(vit)(img, taps=(6,))


def test_eva_checkpoint_round_trip_and_adapter_errors(tmp_path):
    src = build_backbone("test_eva", (56, 56))  # a square source grid: timm infers it from the pos_embed length
    path = tmp_path / "eva.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    dst = build_backbone("test_eva", (84, 56), checkpoint=path)
    assert_close(dst.blocks[1].mlp.fc1.weight, src.blocks[1].mlp.fc1.weight)  # SwiGLU (GluMlp) packed fc1
    assert_close(dst.blocks[1].attn.q_bias, src.blocks[1].attn.q_bias)
    assert dst.pos_embed.shape[1] == 1 + 6 * 4
    with pytest.raises(TypeError, match="EvaBlock"):
        Encoder(build_backbone("test_eva", EVA_CROP, use_post_norm=True))
    with pytest.raises(ValueError, match="npz"):
        load_backbone_checkpoint(src, _write(tmp_path / "w.npz", b"x"))
    with pytest.raises(ValueError, match="bad.npz"):
        load_backbone_checkpoint(build_backbone("test_vit", (32, 32)), _write(tmp_path / "bad.npz", b"not npz"))


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


# ---------------------------------------------------------------------------------------------- pretrained tags
@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """No network: HF_HUB_OFFLINE on (env and the already-imported constant) and an empty HF_HOME."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return tmp_path / "hf" / "hub"


def test_unknown_pretrained_tag_lists_close_names(offline_hub):
    with pytest.raises(ValueError, match=r"test_vit\.r160_in1k"):
        build_backbone("test_vit", (64, 64), pretrained="r160_in1kk")
    with pytest.raises(ValueError, match="not both"):
        build_backbone("test_vit", (64, 64), pretrained=True, checkpoint="w.pth")


def test_offline_without_cached_weights_names_tag_cache_and_checkpoint(offline_hub):
    with pytest.raises(FileNotFoundError) as err:
        build_backbone("test_vit", (64, 64), pretrained=True)
    msg = str(err.value)
    assert "test_vit.r160_in1k" in msg and str(offline_hub) in msg and "model.checkpoint=FILE" in msg


def test_offline_serves_cached_pretrained_weights(offline_hub):
    src = build_backbone("test_vit", (160, 160))
    snap = offline_hub / "models--timm--test_vit.r160_in1k" / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(snap / "model.safetensors"))
    (offline_hub / "models--timm--test_vit.r160_in1k" / "refs").mkdir()
    (offline_hub / "models--timm--test_vit.r160_in1k" / "refs" / "main").write_text("0" * 40)
    vit = build_backbone("test_vit", (64, 96), pretrained="test_vit.r160_in1k")
    assert_close(vit.blocks[3].attn.qkv.weight, src.blocks[3].attn.qkv.weight)
    assert vit.pos_embed.shape[1] == 1 + 4 * 6  # resampled to the crop's grid
