"""Reproduction configs compose; the GFLOPs derivation of ToMe's r; the published-vs-tokred printer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from tokred.config import config_dir, inference_settings, input_normalization
from tokred.reproduce import PUBLISHED, format_comparison, identify, main, segmenter_gflops
from tokred.structured import reducer_kwargs, register_configs, validate

EXPERIMENTS = sorted(p.stem for p in (Path(config_dir()) / "experiment" / "reproduce").glob("*.yaml"))


def _compose(name: str, *overrides: str):
    register_configs()
    with initialize_config_dir(str(config_dir()), version_base=None):
        return compose("config", overrides=[f"experiment=reproduce/{name}", *overrides])


def test_every_published_row_has_a_config():
    assert sorted(p.experiment.split("/")[1] for p in PUBLISHED) == EXPERIMENTS


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_configs_compose(name):
    overrides = [f"experiment=reproduce/{name}", "checkpoint=/ckpt/checkpoint.pth"]
    cfg = _compose(name, overrides[1])
    validate(cfg, overrides)  # every key is read, root types kept
    assert cfg.dataset.name == "ade20k" and cfg.decoder.name == "mask_transformer"
    assert cfg.decoder.kwargs.qkv_bias is True and cfg.checkpoint_format == "auto"
    merger, kwargs = reducer_kwargs(cfg)["merger"]
    assert cfg.model.normalization == "vit"  # every reproduction names its input mean/std (0.5 / 0.5)
    assert input_normalization(cfg).mean == (0.5, 0.5, 0.5) and input_normalization(cfg).std == (0.5, 0.5, 0.5)
    if name.startswith("tome") or name == "seg_l16_ade20k":  # the released ViT-L model: mmseg's 640x640 protocol
        assert cfg.dataset.protocol == "640x640" and inference_settings(cfg).stride == (608, 608)
    if name.startswith("tome"):
        assert merger == "tome" and cfg.model.name == "vit_large" and list(cfg.dataset.crop_size) == [640, 640]
    if name == "cts_s16_ade20k":
        assert merger == "cts" and kwargs["num_windows"] == 103


def test_released_checkpoint_is_required():
    from omegaconf.errors import InterpolationToMissingValueError

    cfg = _compose("tome_20")
    with pytest.raises(InterpolationToMissingValueError, match="released_checkpoint"):
        _ = cfg.checkpoint
    assert _compose("tome_20", "released_checkpoint=/c.pth").checkpoint == "/c.pth"


def test_analytic_gflops_match_the_published_budgets():
    base = segmenter_gflops((640, 640))
    assert 665 < base < 680  # ALGM (fvcore) reports 672 for Segmenter ViT-L/16 mask at 640x640
    assert segmenter_gflops((512, 512)) < 0.62 * base  # 658.98 is not the 512x512 cost
    for name, budgets in (("tome_20", [28] * 24), ("tome_30", [42] * 24),
                          ("tome_50", [int(104 - 104 / 23 * i) for i in range(24)])):
        row = next(p for p in PUBLISHED if p.experiment == f"reproduce/{name}")
        ratio = segmenter_gflops((640, 640), budgets) / base
        assert abs(ratio - row.gflops / row.baseline_gflops) < 0.003, name
    with pytest.raises(ValueError, match="budgets"):
        segmenter_gflops((640, 640), [1] * 25)


def test_linear_schedule_of_tome_50_is_the_derived_one():
    from tokred.reducers.registry import create_reducer

    _, kwargs = reducer_kwargs(_compose("tome_50", "checkpoint=x"))["merger"]
    tome = create_reducer("tome", **kwargs)
    assert tome.schedule.budgets(24, 1601) == [int(104 - 104 / 23 * i) for i in range(24)]


def test_analytic_gflops_equal_the_traced_operator_sums():
    import torch

    from tokred.measure import count_gflops
    from tokred.models.segmenter import build_segmenter

    for r in (0, 4):
        torch.manual_seed(0)
        seg = build_segmenter("test_vit", 5, (128, 160), decoder="mask_transformer",
                              merger="tome" if r else "none", merger_kwargs={"r": r} if r else None)
        ops = count_gflops(seg, torch.randn(1, 3, 128, 160))["by_operator"]
        traced = sum(ops.get(k, 0.0) for k in ("conv", "linear", "matmul", "scaled_dot_product_attention"))
        analytic = segmenter_gflops((128, 160), [r] * 6, embed_dim=64, depth=6, num_heads=2,
                                    num_classes=5, mlp_ratio=3.0)  # timm's test_vit: MLP ratio 3
        assert abs(analytic - traced) < 1e-3 * traced, (r, analytic, traced)


def _metrics(miou, gflops, merger=None):
    return {"miou": miou, "gflops": gflops, "model": "vit_large", "dataset": "ade20k",
            "merger": merger or {"name": "none"}, "pruner": {"name": "none"},
            "gflops_detail": {"baseline_gflops": 672.6}}


def test_printer_puts_tokred_beside_published():
    table = format_comparison({"reproduce/tome_20": _metrics(0.5123, 526.0, {"name": "tome", "r": 28})})
    lines = table.splitlines()
    assert lines[0].startswith("| experiment | method | mIoU pub. | mIoU tokred")
    row = next(line for line in lines if "reproduce/tome_20" in line).split(" | ")
    assert row[2:9] == ["51.66", "51.23", "-0.43", "516.2", "526.0", "78.3%", "78.2%"]
    assert "not run here" in next(line for line in lines if "reproduce/tome_30" in line)
    with pytest.raises(ValueError, match="valid experiments"):
        format_comparison({"reproduce/nope": _metrics(0.5, 1.0)})


def test_cli_recognises_runs(tmp_path, capsys):
    path = tmp_path / "run" / "metrics.json"
    path.parent.mkdir()
    path.write_text(json.dumps(_metrics(0.5182, 672.6)))
    assert identify(_metrics(0.5, 1.0, {"name": "tome", "r": 42})) == "reproduce/tome_30"
    assert identify({**_metrics(0.5, 1.0), "dataset": "camvid"}) is None
    assert main([str(path.parent), "--text"]) == 0
    out = capsys.readouterr().out
    assert "reproduce/seg_l16_ade20k" in out and "51.82" in out and "+0.00" in out
