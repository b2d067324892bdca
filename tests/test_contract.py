"""The contract every registered reducer (built-in or plugin) must meet, parametrised over the registry.

A reducer opts in by existing: ``identity_config()`` (zero budget) and ``example_config()`` (a reducing
configuration for a tiny backbone) are the only knobs it provides. Every reducer runs on three tiny backbone
families (ids ``vit``, ``dinov2``, ``eva02``): timm's ``test_vit`` (patch 16), a DINOv2 layout (patch 14,
4 registers, LayerScale, ``no_embed_class``) and an EVA-02 layout (RoPE from per-token positions, SwiGLU,
gamma layer scale), each on an 8 x 10 patch grid.
"""

import pytest
import torch
from torch.testing import assert_close

from tokred import build_segmenter
from tokred.reducers.registry import available_reducers, get_reducer_class

NAMES = sorted(available_reducers())
CROP = (128, 160)  # 8 x 10 patches of 16 px
K = 5
# backbone id -> (tokred model name, crop px giving an 8 x 10 grid)
BACKBONES = {"vit": ("test_vit", CROP), "dinov2": ("test_dinov2", (112, 140)), "eva02": ("test_eva", (112, 140))}
OTHER = [b for b in BACKBONES if b != "vit"]


def _build(name: str, kwargs: dict, backbone: str = "vit", **extra):
    cls = get_reducer_class(name)
    slot = "pruner" if cls.kind == "pruner" else "merger"
    torch.manual_seed(0)
    model, crop = BACKBONES[backbone]
    return build_segmenter(model, num_classes=K, crop_size=crop, **{slot: name, f"{slot}_kwargs": kwargs},
                           **extra)


def _inputs(batch: int = 2, seed: int = 1, crop: tuple[int, int] = CROP):
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(batch, 3, *crop, generator=g)
    # piecewise-constant labels so that uniformity-driven reducers (oracle superpatches) have work to do
    tgt = torch.zeros(batch, *crop, dtype=torch.long)
    tgt[:, :, crop[1] // 2:] = 1
    tgt[:, crop[0] // 2:, : crop[1] // 4] = 2
    return img, tgt


@pytest.mark.parametrize("layerscale", [False, True], ids=["plain", "layerscale"])
@pytest.mark.parametrize("name", NAMES)
def test_zero_budget_reproduces_plain_timm(name, layerscale):
    bk = {"init_values": 0.1} if layerscale else {}
    seg = _build(name, get_reducer_class(name).identity_config(), backbone_kwargs=bk).eval()
    img, tgt = _inputs()
    with torch.no_grad():
        x, state = seg.encoder(img, tgt)
        ref = seg.encoder.vit.forward_features(img)
        assert_close(x, ref, atol=1e-5, rtol=1e-5)
        plain = build_segmenter("test_vit", num_classes=K, crop_size=CROP, backbone_kwargs=bk).eval()
        plain.load_state_dict(seg.state_dict(), strict=False)
        assert_close(seg(img, tgt).logits, plain(img).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("backbone", OTHER)
def test_zero_budget_reproduces_backbone_forward_features(backbone, name):
    """DINOv2 (registers, LayerScale, patch 14) and EVA-02 (RoPE, SwiGLU) rows of the zero-budget contract."""
    seg = _build(name, get_reducer_class(name).identity_config(), backbone).eval()
    img, tgt = _inputs(crop=BACKBONES[backbone][1])
    with torch.no_grad():
        x, state = seg.encoder(img, tgt)
        assert_close(x, seg.encoder.vit.forward_features(img), atol=1e-5, rtol=1e-5)
    assert state.pos is not None and state.pos.shape[:2] == state.size.shape


@pytest.mark.parametrize("name", NAMES)
def test_example_config_reduces_and_restores_full_grid(name):
    cls = get_reducer_class(name)
    seg = _build(name, cls.example_config()).eval()
    img, tgt = _inputs()
    with torch.no_grad():
        out = seg(img, tgt)
    H0, W0 = CROP[0] // 16, CROP[1] // 16
    assert out.logits.shape == (2, K, *CROP) and torch.isfinite(out.logits).all()
    assert out.grid_logits.shape == (2, K, H0, W0)
    st = out.state
    assert len(st.tokens_per_block) == seg.encoder.depth
    assert st.token_map.shape == (2, H0 * W0)
    x, _ = seg.encoder(img, tgt)
    assert st.restore(x).shape == (2, seg.encoder.embed_dim, H0, W0)
    if name != "none":
        counts = torch.stack(st.tokens_per_block)  # [depth, B]
        banked = st.stats.get("banked", torch.zeros(2))
        assert bool((counts < H0 * W0).any()) or bool((banked > 0).any()), f"{name} example_config reduced nothing"


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("backbone", list(BACKBONES))
def test_backward_and_gradient_checkpointing(backbone, name):
    cls = get_reducer_class(name)
    img, tgt = _inputs(crop=BACKBONES[backbone][1])
    results = []
    for ckpt in (False, True):
        seg = _build(name, cls.example_config(), backbone, grad_checkpointing=ckpt).train()
        torch.manual_seed(5)
        out = seg(img, tgt)
        loss = seg.losses(out, tgt)["loss"]
        loss.backward()
        grads = {n: p.grad.clone() for n, p in seg.named_parameters() if p.grad is not None}
        assert grads and all(torch.isfinite(g).all() for g in grads.values())
        assert any(n.startswith("encoder.vit.blocks") for n in grads)
        results.append((loss.detach(), grads))
    assert_close(results[0][0], results[1][0], atol=1e-5, rtol=1e-5)
    for n, g in results[0][1].items():
        assert_close(results[1][1][n], g, atol=1e-4, rtol=1e-4, msg=lambda m, n=n: f"{n}: {m}")


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("backbone", list(BACKBONES))
def test_batch_of_two_equals_two_singles(backbone, name):
    seg = _build(name, get_reducer_class(name).example_config(), backbone).eval()
    img, tgt = _inputs(seed=7, crop=BACKBONES[backbone][1])
    tgt[1] = torch.flip(tgt[1], dims=[-1])  # the two images differ in content and labels
    img[1] = img[1] * 0.5 + 0.3
    with torch.no_grad():
        both = seg(img, tgt).logits
        singles = torch.cat([seg(img[i:i + 1], tgt[i:i + 1]).logits for i in range(2)])
    assert_close(both, singles, atol=1e-4, rtol=1e-4)
