"""Decoder registry, kwargs checking, encoder taps into decoders (plug-in path), pretrained forwarding."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import tokred.models.segmenter as segmenter_mod
from tokred.models.decoders import Decoder, LinearDecoder, MaskTransformerDecoder, build_decoder
from tokred.models.segmenter import build_segmenter
from tokred.plugins import DECODERS

CROP = (64, 80)  # px -> grid 4 x 5 patches of 16 px
GRID = (4, 5)
K = 3


class TapSum(Decoder):
    """Test plug-in: logits = 1x1 conv of the final grid + 1x1 convs of the taps of blocks 1 and 3."""

    out_indices = (1, 3)

    def __init__(self, embed_dim: int, num_classes: int, scale: float = 1.0) -> None:
        super().__init__()
        self.final = nn.Conv2d(embed_dim, num_classes, 1)
        self.levels = nn.ModuleDict({str(i): nn.Conv2d(embed_dim, num_classes, 1) for i in self.out_indices})
        self.scale = scale
        self.seen: dict[int, Tensor] = {}

    def forward(self, grid: Tensor, taps: dict[int, Tensor] | None = None) -> Tensor:
        assert taps is not None and sorted(taps) == list(self.out_indices)
        self.seen = dict(taps)
        out = self.final(grid)
        for i, t in taps.items():
            out = out + self.levels[str(i)](t)
        return self.scale * out


@pytest.fixture
def tap_sum():
    DECODERS.register("_test_tap_sum", TapSum)
    yield "_test_tap_sum"
    DECODERS.unregister("_test_tap_sum")


def _images(n: int = 2) -> Tensor:
    return torch.randn(n, 3, *CROP, generator=torch.Generator().manual_seed(0))


def test_builtins_are_registered_decoders():
    assert {"linear", "mask_transformer"} <= set(DECODERS.names())
    assert DECODERS.get("linear") is LinearDecoder and DECODERS.get("mask_transformer") is MaskTransformerDecoder
    assert LinearDecoder.out_indices == () and isinstance(build_decoder("linear", 64, K), Decoder)


def test_unknown_name_and_kwarg_errors_name_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown decoder 'mask_transfomer'.*did you mean mask_transformer"):
        build_decoder("mask_transfomer", 64, K)
    with pytest.raises(ValueError, match=r"'num_layer' \(did you mean 'num_layers'\?\).*d_model, num_layers"):
        build_decoder("mask_transformer", 64, K, num_layer=2)
    with pytest.raises(ValueError, match=r"'d_model'.*\(none\)"):
        build_decoder("linear", 64, K, d_model=64)
    dec = build_decoder("mask_transformer", 64, K, d_model=128, num_layers=1)
    assert len(dec.blocks) == 1 and dec.proj_in.out_features == 128


def test_registered_decoder_must_subclass_decoder():
    with pytest.raises(TypeError, match="must be a subclass of tokred.models.decoders.Decoder"):
        DECODERS.register("_test_not_decoder", nn.Identity)  # refused at registration
    assert "_test_not_decoder" not in DECODERS.names()
    with pytest.raises(ValueError, match="unknown decoder '_test_not_decoder'"):
        build_decoder("_test_not_decoder", 64, K)


def test_plugin_decoder_gets_taps_equal_to_timm_intermediates(tap_sum):
    torch.manual_seed(0)
    seg = build_segmenter("test_vit", K, CROP, decoder=tap_sum, decoder_kwargs={"scale": 2.0}).eval()
    img = _images()
    with torch.no_grad():
        out = seg(img)
        ref = seg.encoder.vit.forward_intermediates(img, indices=[1, 3], norm=False, output_fmt="NCHW",
                                                    intermediates_only=True)
    assert out.logits.shape == (2, K, *CROP) and out.grid_logits.shape == (2, K, *GRID)
    for i, r in zip((1, 3), ref):
        assert seg.decoder.seen[i].shape == (2, 64, *GRID)
        torch.testing.assert_close(seg.decoder.seen[i], r, atol=1e-5, rtol=1e-5)
    # the taps contribute: zeroing their projections changes the logits
    with torch.no_grad():
        for conv in seg.decoder.levels.values():
            conv.weight.zero_()
            conv.bias.zero_()
        assert not torch.allclose(seg(img).grid_logits, out.grid_logits)


@pytest.mark.parametrize("slot,name,kwargs", [("merger", "tome", {"r": 4}),
                                              ("pruner", "early_exit", {"threshold": 0.05, "top_k": 1})])
def test_taps_are_full_grids_under_reduction(tap_sum, slot, name, kwargs):
    torch.manual_seed(0)
    seg = build_segmenter("test_vit", K, CROP, decoder=tap_sum, **{slot: name, f"{slot}_kwargs": kwargs})
    img = _images()
    seg.eval()
    with torch.no_grad():
        out = seg(img)
    assert out.grid_logits.shape == (2, K, *GRID)
    for i in (1, 3):
        t = seg.decoder.seen[i]
        assert t.shape == (2, 64, *GRID) and torch.isfinite(t).all()
    seg.train()
    loss = seg.losses(seg(img), torch.randint(0, K, (2, *CROP)))["loss"]
    loss.backward()
    assert all(c.weight.grad is not None and c.weight.grad.abs().sum() > 0 for c in seg.decoder.levels.values())


def test_tome_merged_cells_share_a_tap_value(tap_sum):
    torch.manual_seed(0)
    seg = build_segmenter("test_vit", K, CROP, decoder=tap_sum, merger="tome", merger_kwargs={"r": 6}).eval()
    with torch.no_grad():
        seg(_images(1))
    cells = seg.decoder.seen[3][0].flatten(1).T  # [N0, C]
    distinct = torch.unique(cells.round(decimals=5), dim=0).shape[0]
    assert distinct < GRID[0] * GRID[1]  # merged tokens are copied back to every cell they hold


def test_plain_module_decoder_without_taps_still_works():
    torch.manual_seed(0)
    seg = build_segmenter("test_vit", K, CROP).eval()
    seg.decoder = nn.Conv2d(64, K, 1)  # not a Decoder: called with the grid only
    with torch.no_grad():
        assert seg(_images()).grid_logits.shape == (2, K, *GRID)


def test_pretrained_is_forwarded_to_build_backbone(monkeypatch):
    seen = {}
    real = segmenter_mod.build_backbone

    def spy(*args, **kwargs):
        seen.update(kwargs)
        kwargs.pop("pretrained", None)
        return real(*args, **kwargs)

    monkeypatch.setattr(segmenter_mod, "build_backbone", spy)
    build_segmenter("test_vit", K, CROP, pretrained="augreg_in21k")
    assert seen["pretrained"] == "augreg_in21k"
    seen.clear()
    build_segmenter("test_vit", K, CROP)
    assert "pretrained" not in seen
