"""The printed run summary: one token figure for mergers and pruners, the speedup's spread, busy-machine warnings."""

import torch

from tokred import build_segmenter
from tokred.jobs.summary import print_summary, summary_warnings
from tokred.measure import TokenAccounting


def _fraction(**kwargs) -> float:
    seg = build_segmenter("test_vit", 5, (128, 160), **kwargs).eval()
    acct = TokenAccounting()
    with torch.no_grad():
        acct.update(seg(torch.randn(2, 3, 128, 160)).state)
    return acct.summary()["token_block_fraction"]


def test_token_block_fraction_means_the_same_for_mergers_and_pruners():
    assert _fraction() == 1.0
    # ToMe r=8 on 80 patches over 6 blocks: 80 + 72 + 64 + 56 + 48 + 40 entering the blocks
    assert abs(_fraction(merger="tome", merger_kwargs={"r": 8}) - 360 / 480) < 1e-9
    # Cropr r=6 after blocks 0-3, fused back before the last block: 80 + 74 + 68 + 62 + 56 + 80
    assert abs(_fraction(pruner="cropr", pruner_kwargs={"r": 6}) - 420 / 480) < 1e-9


def test_warnings_for_a_busy_machine_a_wide_spread_and_flops_without_speed(capsys, tmp_path):
    quiet = {"speedup": 1.8, "gflops_ratio": 2.0,
             "throughput_detail": {"speedup_iqr": [1.75, 1.85], "self_check_speedup": 1.02}}
    assert summary_warnings(quiet) == []
    busy = {"speedup": 0.96, "gflops_ratio": 4.07,
            "throughput_detail": {"speedup_iqr": [0.6, 2.12], "self_check_speedup": 0.884}}
    w = summary_warnings(busy)
    assert len(w) == 3 and "0.884" in w[0] and "0.6-2.12" in w[1] and "4.07x fewer GFLOPs" in w[2]
    print_summary(tmp_path, {**busy, "method": "dcts+early_exit", "miou": 0.5, "token_block_fraction": 0.25},
                  analyze_hint="python -m tokred analyze checkpoint=X")
    out = capsys.readouterr().out
    assert "0.96 (IQR 0.6-2.12)" in out and "25.00" in out and out.count("warning:") == 3
    assert "where the tokens went: python -m tokred analyze checkpoint=X" in out
