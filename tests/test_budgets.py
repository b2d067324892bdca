"""Per-image budgets (issue 12): every merger x pruner pair gives a batch the outputs of its images one by one,
keep ratios are of each image's own tokens over the blocks a reducer acts on, and clipped budgets are recorded."""

import logging

import pytest
import torch
from torch.testing import assert_close

from tokred import build_segmenter
from tokred.measure import TokenAccounting
from tokred.reducers.registry import available_reducers, get_reducer_class
from tokred.schedules import KeepRatio, Warmup, per_image_budgets

CROP = (128, 160)  # test_vit: 8 x 10 patches of 16 px
K = 5
MERGERS = sorted(n for n in available_reducers() if get_reducer_class(n).kind == "merger")
PRUNERS = sorted(n for n in available_reducers() if get_reducer_class(n).kind == "pruner")
KEEP_HALF = {"kind": "keep_ratio", "keep_ratio": 0.5}


def _inputs():
    """Three images whose labels differ in how uniform they are, so oracle superpatches give each its own
    token count: one class everywhere, two halves, a fine checkerboard of 2 x 2-patch squares."""
    g = torch.Generator().manual_seed(3)
    img = torch.randn(3, 3, *CROP, generator=g)
    tgt = torch.zeros(3, *CROP, dtype=torch.long)
    tgt[1, :, CROP[1] // 2:] = 1
    rows, cols = torch.meshgrid(torch.arange(CROP[0]) // 32, torch.arange(CROP[1]) // 32, indexing="ij")
    tgt[2] = (rows + cols) % 3
    return img, tgt


def _pair(merger: str, pruner: str, pruner_kwargs: dict | None = None):
    torch.manual_seed(0)
    return build_segmenter("test_vit", K, CROP, merger=merger, pruner=pruner,
                           merger_kwargs=get_reducer_class(merger).example_config(),
                           pruner_kwargs=pruner_kwargs or get_reducer_class(pruner).example_config()).eval()


@pytest.mark.parametrize("pruner", PRUNERS)
@pytest.mark.parametrize("merger", MERGERS)
def test_every_pair_batch_equals_its_images_one_by_one(merger, pruner):
    seg = _pair(merger, pruner)
    img, tgt = _inputs()
    with torch.no_grad():
        out = seg(img, tgt)
        singles = [seg(img[i:i + 1], tgt[i:i + 1]) for i in range(3)]
    assert_close(out.logits, torch.cat([s.logits for s in singles]), atol=1e-4, rtol=1e-4)
    if merger in ("dcts", "oracle_superpatches"):  # ground-truth superpatches: a count of its own per image
        assert len(set(out.state.tokens_per_block[0].tolist())) == 3
    for b, t in enumerate(out.state.tokens_per_block):  # every block's per-image count equals the single run's
        assert t.tolist() == [int(s.state.tokens_per_block[b][0]) for s in singles]


def test_keep_ratio_pruner_after_a_merger_is_per_image():
    """Cropr with a keep ratio after dCTS, which leaves images with different counts: each image keeps half of
    the tokens it brought, and the batch equals its singles (the old code took the ratio of N0)."""
    seg = build_segmenter("test_vit", K, CROP, merger="dcts", pruner="cropr",
                          merger_kwargs={"levels": (2, 4), "policy": "oracle"},
                          pruner_kwargs={"r": 0, "schedule": KEEP_HALF}).eval()
    img, tgt = _inputs()
    with torch.no_grad():
        out = seg(img, tgt)
        singles = [seg(img[i:i + 1], tgt[i:i + 1]) for i in range(3)]
    assert_close(out.logits, torch.cat([s.logits for s in singles]), atol=1e-4, rtol=1e-4)
    tokens_in = out.state.tokens_per_block[0]
    assert len(set(tokens_in.tolist())) > 1, "the merger should leave the images with different counts"
    after_pruning = out.state.tokens_per_block[4]  # entering block 4: after the modules of blocks 0-3
    expected = [max(1, -(-n // 2)) for n in tokens_in.tolist()]  # ceil(n / 2): half kept, at least one
    assert after_pruning.tolist() == expected


def test_keep_ratio_is_spread_over_the_active_blocks():
    k = KeepRatio(0.5)
    assert k.budgets_for(6, 80, 1.0, active=[0, 1, 2, 3]) == [10, 10, 10, 10, 0, 0]  # 40 of 80 kept
    assert sum(k.budgets(6, 80)[:4]) == 28  # over all six blocks: the first four remove 28 only
    assert KeepRatio(0.5, blocks=2).budgets_for(6, 80, 1.0, active=[0, 1, 2, 3]) == [20, 20, 0, 0, 0, 0]
    rows = per_image_budgets(Warmup(k, 0.5), 6, torch.tensor([80, 40, 80]), 0.25, active=[0, 1, 2, 3])
    assert rows.tolist() == [[5, 5, 5, 5, 0, 0], [2, 2, 2, 2, 0, 0], [5, 5, 5, 5, 0, 0]]


def test_cropr_keep_ratio_keeps_that_share():
    """``keep_ratio=0.5`` on test_vit's 80 patches: 40 live after the last pruning block (before: 52)."""
    seg = build_segmenter("test_vit", K, CROP, pruner="cropr", pruner_kwargs={"r": 0, "schedule": KEEP_HALF}).eval()
    with torch.no_grad():
        out = seg(_inputs()[0])
    assert out.state.tokens_per_block[4].tolist() == [40, 40, 40]


def test_budget_that_cannot_be_honoured_is_recorded_and_logged_once(caplog):
    seg = build_segmenter("test_vit", K, CROP, merger="tome", merger_kwargs={"r": 100000}).eval()
    acct = TokenAccounting()
    with caplog.at_level(logging.WARNING), torch.no_grad():
        for _ in range(2):
            acct.update(seg(_inputs()[0]).state)
    warnings = [r for r in caplog.records if "cannot be honoured" in r.getMessage()]
    assert len(warnings) == 1 and "ToMe" in warnings[0].getMessage() and "100000" in warnings[0].getMessage()
    budgets = acct.summary()["budgets"]["merger"]
    assert budgets["0"] == {"requested": 100000.0, "effective": 40.0}  # half of 80 mergeable tokens
    assert budgets["1"]["effective"] == 20.0
    assert "merger_r_0" not in acct.summary()["other_stats"]


@pytest.mark.parametrize("pruner", PRUNERS)
@pytest.mark.parametrize("merger", MERGERS)
def test_every_pair_packed_layout_equals_padded(merger, pruner, monkeypatch):
    """Blocks on packed tokens (real tokens only, block-diagonal attention) give the padded layout's outputs;
    reducers see the same padded tensors either way."""
    from tokred.encoder import Encoder

    calls = []
    run = Encoder._packed_block
    monkeypatch.setattr(Encoder, "_packed_block", lambda self, *a, **k: calls.append(1) or run(self, *a, **k))
    img, tgt = _inputs()
    out = {}
    for layout in ("padded", "packed"):
        seg = _pair(merger, pruner)
        seg.encoder.layout = layout
        with torch.no_grad():
            out[layout] = seg(img, tgt)
    assert_close(out["packed"].logits, out["padded"].logits, atol=1e-5, rtol=1e-5)
    counts = [t.tolist() for t in out["padded"].state.tokens_per_block]
    assert [t.tolist() for t in out["packed"].state.tokens_per_block] == counts
    if any(len(set(c)) > 1 for c in counts):  # images held different counts somewhere: packed blocks ran
        assert calls
