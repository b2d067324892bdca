"""Token-fate pictures: embedding-time layout, panels, the PNG written and never overwritten."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tokred.models.segmenter import build_segmenter
from tokred.io import unique_path
from tokred.jobs.viz import viz_job
from tokred.viz import _boundaries, embedding_state, find_label, token_fate_figure

SAMPLE = Path(__file__).resolve().parents[1] / "tokred" / "data" / "camvid_sample" / "val" / "0016E5_07959.webp"


@pytest.fixture
def compose():
    import hydra
    from hydra.core.global_hydra import GlobalHydra

    from tokred.__main__ import config_dir

    GlobalHydra.instance().clear()  # another test may have left a Hydra app initialised
    with hydra.initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        yield lambda overrides: hydra.compose(config_name="config", overrides=overrides)
    GlobalHydra.instance().clear()


def test_viz_job_writes_png_and_never_overwrites(compose, tmp_path):
    out = tmp_path / "fate.png"
    cfg = compose(["model=test_vit", "dataset.crop_size=[64,96]", "merger=tome", "merger.r=2", "pruner=early_exit",
                   "pruner.threshold=0.05", "device=cpu", f"viz.image={SAMPLE}", f"viz.out={out}"])
    first = viz_job(cfg)
    assert first == out and out.stat().st_size > 0
    data = out.read_bytes()
    second = viz_job(cfg)
    assert second == tmp_path / "fate-2.png" and second.stat().st_size > 0
    assert out.read_bytes() == data


def test_viz_job_needs_an_image(compose):
    with pytest.raises(ValueError, match=r"viz.image=PATH"):
        viz_job(compose(["model=test_vit", "dataset.crop_size=[64,96]"]))


def test_token_fate_figure_panels():
    H0, W0, depth = 4, 6, 3
    rgb = np.zeros((64, 96, 3), dtype=np.uint8)
    embed_map = np.arange(H0 * W0).reshape(H0, W0)
    embed_map[:2, :2] = 0  # one 2x2 supertoken
    exit_block = np.full((H0, W0), depth)
    exit_block[3] = 1  # the bottom row left after block 2 (1-based)
    fig = token_fate_figure(rgb, np.zeros((64, 96), dtype=np.int64), embed_map, embed_map, exit_block,
                            [21.0, 21.0, 15.0], depth, np.array([[255, 0, 0], [0, 255, 0]], dtype=np.uint8),
                            ("a", "b"), title="t")
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[0] == "tokens after embedding: 21 of 24 patches"
    assert titles[1] == "token fate: 6 of 24 cells left early"
    assert titles[2:] == ["prediction", "live tokens per block"]
    legend = [t.get_text() for t in fig.axes[1].get_legend().get_texts()]
    assert legend == ["left after block 2", "live to the end"]
    assert len(fig.axes[3].patches) == depth  # one bar per block


def test_boundaries_follow_token_changes():
    tm = np.array([[0, 0, 1], [0, 0, 1]])
    seg = _boundaries(tm, (16, 16))  # [S, 2, 2] px
    assert seg.shape == (2, 2, 2)  # two vertical unit edges between column 1 and 2, no horizontal ones
    np.testing.assert_allclose(seg[:, :, 0], 31.5)


@torch.no_grad()
def test_embedding_state_shows_oracle_supertokens():
    seg = build_segmenter("test_vit", num_classes=11, crop_size=(256, 256), merger="dcts",
                          merger_kwargs={"policy": "oracle", "thresholds": 0.5}).eval()
    image = torch.randn(1, 3, 256, 256)
    target = torch.full((1, 256, 256), 3, dtype=torch.long)  # one class everywhere: one 16x16-patch supertoken
    state = embedding_state(seg, image, target)
    assert torch.unique(state.token_map).numel() == 1
    assert int(seg(image, target).state.tokens_per_block[0][0]) == 1


def test_find_label_and_unique_path(tmp_path):
    assert find_label(SAMPLE) == SAMPLE.parent.parent / "valannot" / "0016E5_07959.png"
    assert find_label(tmp_path / "x.png") is None
    p = tmp_path / "a.png"
    assert unique_path(p) == p
    p.write_bytes(b"x")
    (tmp_path / "a-2.png").write_bytes(b"x")
    assert unique_path(p) == tmp_path / "a-3.png"
