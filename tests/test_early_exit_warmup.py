"""Early exit's ``halt_from``: exit heads are trained (auxiliary outputs) before tokens start to halt in training;
evaluation always halts. On timm's test_vit (depth 6), as tests/test_early_exit.py."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from tokred import build_segmenter
from tokred.reducers.early_exit import EarlyExit

K = 5
CROP = (64, 96)  # px -> grid 4 x 6 patches
N0 = (CROP[0] // 16) * (CROP[1] // 16)
LOW = {"threshold": 0.05, "top_k": 1}  # untrained heads (confidence ~ 1 / K > 0.05): every token a candidate


def _seg(seed=0, **kwargs):
    torch.manual_seed(seed)
    return build_segmenter("test_vit", num_classes=K, crop_size=CROP, merger="none", pruner="early_exit",
                           pruner_kwargs=kwargs)


def _images(n=2, seed=1) -> Tensor:
    return torch.randn(n, 3, *CROP, generator=torch.Generator().manual_seed(seed))


def _halted(out) -> int:
    """Tokens halted at any exit, summed over the batch."""
    return sum(int(v.sum()) for k, v in out.state.stats.items() if k.startswith("halted_exit_"))


def test_training_before_halt_from_trains_heads_without_halting():
    seg = _seg(halt_from=0.5, **LOW).train()
    ee = seg.reducers[1]
    seg.set_progress(0.2)
    out = seg(_images())
    assert _halted(out) == 0
    assert [a.name for a in out.state.aux] == [f"exit_{b}" for b in ee.exit_blocks]
    for a in out.state.aux:
        assert a.mask.all()  # nothing halted at an earlier exit: every cell counts in every head's loss
    target = torch.randint(0, K, (2, *CROP), generator=torch.Generator().manual_seed(0))
    losses = seg.losses(out, target)
    losses["loss"].backward()
    assert all(h.fc.weight.grad is not None and h.fc.weight.grad.abs().sum() > 0 for h in ee.heads)


def test_training_after_halt_from_halts():
    seg = _seg(halt_from=0.5, **LOW).train()
    seg.set_progress(0.6)
    out = seg(_images())
    assert _halted(out) > 0
    assert out.state.aux  # heads still trained


def test_halt_from_zero_halts_from_the_first_step():
    seg = _seg(**LOW).train()
    seg.set_progress(0.0)
    assert _halted(seg(_images())) > 0


@pytest.mark.parametrize("progress", [0.0, 0.2, 1.0])
def test_evaluation_halts_whatever_the_progress(progress):
    seg = _seg(halt_from=0.5, **LOW)
    seg.train()
    seg.set_progress(progress)
    seg.eval()
    with torch.no_grad():
        warm = seg(_images())
        ref = _seg(halt_from=0.0, **LOW).eval()(_images())  # same seed: same weights
    assert _halted(warm) > 0
    torch.testing.assert_close(warm.state.stats["banked"], ref.state.stats["banked"])
    torch.testing.assert_close(warm.logits, ref.logits)


@pytest.mark.parametrize("bad", [-0.1, 1.5, "half", True, None])
def test_bad_halt_from_names_the_key_and_range(bad):
    with pytest.raises(ValueError, match=r"halt_from.*\[0, 1\]"):
        EarlyExit(halt_from=bad)


def test_halt_from_is_recorded_when_set():
    assert _seg(halt_from=0.25).reducers[1].extra_config()["halt_from"] == 0.25
    assert "halt_from" not in _seg().reducers[1].extra_config()  # as results written before the option


def test_config_group_carries_halt_from(tmp_path):
    from hydra import compose, initialize_config_dir

    from tokred.config import config_dir
    from tokred.structured import register_configs, reducer_kwargs

    register_configs()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        default = compose(config_name="config", overrides=["pruner=early_exit"])
        set_ = compose(config_name="config", overrides=["pruner=early_exit", "pruner.halt_from=0.3"])
    assert reducer_kwargs(default)["pruner"][1]["halt_from"] == 0.0
    assert reducer_kwargs(set_)["pruner"][1]["halt_from"] == 0.3
