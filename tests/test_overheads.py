"""Reducer overheads (``tokred.measure.overheads``), several models in one interleaved loop (``compare_many``) and
``python -m tokred bench bench.layouts=[...]``."""

import json
import time

import pytest
import torch

import tokred.reducers.tome as tome_mod
from tokred.measure import compare_many, measure_overheads
from tokred.measure.overheads import Component, timed_components
from tokred.models.segmenter import build_segmenter
from tokred.state import TokenState


def _seg(merger="none", pruner="none", **kwargs):
    torch.manual_seed(0)
    return build_segmenter("test_vit", num_classes=5, crop_size=(64, 96), merger=merger, pruner=pruner,
                           **kwargs).eval()


def test_timed_components_counts_the_time_inside_and_restores_everything():
    seg = _seg("tome", merger_kwargs={"r": 4})
    original_match, original_merge = tome_mod.bipartite_soft_matching, TokenState.merge
    with timed_components(seg, components=[Component("sleep", "time:sleep")]) as clock:
        assert time.sleep is not _sleep_ref
        time.sleep(0.03)
        time.sleep(0.02)
    assert time.sleep is _sleep_ref
    assert clock.calls["sleep"] == 2 and clock.seconds["sleep"] >= 0.05
    with timed_components(seg) as clock:
        with torch.inference_mode():
            seg(torch.randn(2, 3, 64, 96))
    assert tome_mod.bipartite_soft_matching is original_match and TokenState.merge is original_merge
    depth = len(seg.encoder.vit.blocks)
    assert clock.calls["tome.matching"] == depth  # r=4 merges in every block
    assert clock.calls["tokens.gather_scatter"] >= depth  # one merge per block, plus the final restore
    assert "cropr.scorer" not in clock.calls and "dcts.policy_cnn" not in clock.calls
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in seg.modules())


_sleep_ref = time.sleep


def test_an_unknown_component_is_named_in_the_error():
    with pytest.raises(AttributeError, match="'mine.scorer'.*no_such_fn"):
        with timed_components(_seg(), components=[Component("mine.scorer", "tokred.state:no_such_fn")]):
            pass


def test_measure_overheads_reports_module_components_as_a_share_of_the_unreduced_forward():
    seg = _seg(pruner="cropr", pruner_kwargs={"r": 4})
    base = _seg()
    base.load_state_dict(seg.state_dict(), strict=False)
    out = measure_overheads(seg, base, torch.randn(2, 3, 64, 96), repeats=2, warmup=0)
    comps = out["components"]
    assert set(comps) >= {"cropr.scorer", "prune.selection", "tokens.gather_scatter"}
    n_modules = len(seg.encoder.reducers[-1].cropr_modules)
    assert comps["cropr.scorer"]["calls"] == n_modules
    for c in comps.values():
        assert c["seconds"] > 0
        assert c["percent_of_unreduced"] == pytest.approx(100 * c["seconds"] / out["baseline_forward_seconds"])
    # components run inside the reduced forward: together they cannot take longer than it
    assert sum(c["seconds"] for c in comps.values()) <= out["forward_seconds"] * 1.05
    with pytest.raises(ValueError, match="repeats"):
        measure_overheads(seg, base, torch.randn(1, 3, 64, 96), repeats=0)


def test_compare_many_pairs_every_model_with_the_reference_repeat_by_repeat():
    ticks = iter(range(10_000))

    def timer():
        return float(next(ticks))

    class Slow(torch.nn.Module):  # every forward advances the fake clock by `cost` ticks
        def __init__(self, cost):
            super().__init__()
            self.cost = cost

        def forward(self, x):
            for _ in range(self.cost - 1):
                next(ticks)
            return x

    res = compare_many([Slow(2), Slow(4), Slow(8)], reference=2, batch_size=1, image_hw=(4, 4), warmup=0,
                       repeats=4, timer=timer, gflops=[1.0, 2.0, 4.0])
    assert [r["speedup"] for r in res] == pytest.approx([4.0, 2.0, 1.0])
    assert [r["gflops_ratio"] for r in res] == pytest.approx([4.0, 2.0, 1.0])
    assert res[0]["efficiency"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="reference index 3"):
        compare_many([Slow(1)] * 3, reference=3, batch_size=1, image_hw=(4, 4))


def test_bench_layouts_writes_one_metrics_file_per_layout(tmp_path, tokred_cli):
    res = tokred_cli("bench", "experiment=smoke", "merger=dcts", "pruner=early_exit", "pruner.threshold=0.05",
                     "dataset.crop_size=[128,160]", "dataset.base_size=[128,160]", "merger.levels=[2,4,8]",
                     "merger.thresholds=[0.5,0.5,0.5]", "bench.layouts=[padded,packed]", "bench.overheads=true",
                     "bench.batch_size=2", "bench.repeats=2", "bench.warmup=0", "bench.flops_images=2",
                     f"bench.output_dir={tmp_path}", "bench.run_name=step")
    assert res.returncode == 0, res.stderr[-3000:]
    by_layout = {json.loads(p.read_text())["layout"]: json.loads(p.read_text())
                 for p in tmp_path.glob("*/metrics.json")}
    assert set(by_layout) == {"padded", "packed"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_packed", "step_padded"]
    pad, pack = by_layout["padded"], by_layout["packed"]
    assert pad["layout_speedup"] == 1.0 and pack["layout_reference"] == "padded" and pack["layout_speedup"] > 0
    # both against the same unreduced reference, timed in the same loop
    assert (pad["throughput_detail"]["baseline"]["per_repeat_images_per_second"]
            == pack["throughput_detail"]["baseline"]["per_repeat_images_per_second"])
    assert pad["gflops_ratio"] == pack["gflops_ratio"] > 1
    assert "dcts.policy_cnn" in pack["overheads"]["components"]
    assert "early_exit.heads" in pack["overheads"]["components"]


def test_bench_layouts_rejects_an_unknown_layout(tmp_path, tokred_cli):
    res = tokred_cli("bench", "experiment=smoke", "bench.layouts=[padded,jagged]", f"bench.output_dir={tmp_path}",
                     "bench.batch_size=1", "bench.repeats=1", "bench.warmup=0")
    assert res.returncode != 0
    assert "bench.layouts" in res.stderr and "jagged" in res.stderr and "'packed'" in res.stderr
    assert not any(tmp_path.iterdir())


def test_bench_overheads_only_times_the_components_without_a_throughput_pair(tmp_path, tokred_cli):
    res = tokred_cli("bench", "experiment=smoke", "merger=tome", "merger.r=4", "bench.overheads=only",
                     "bench.batch_size=2", "bench.repeats=2", "bench.warmup=0", "bench.threads=1",
                     f"bench.output_dir={tmp_path}")
    assert res.returncode == 0, res.stderr[-3000:]
    (out,) = list(tmp_path.glob("*/metrics.json"))
    assert out.parent.name.startswith("overheads_tome_")
    m = json.loads(out.read_text())
    over = m["overheads"]
    assert over["threads"] == 1 and over["batch_size"] == 2 and over["device"]
    assert over["components"]["tome.matching"]["percent_of_unreduced"] > 0
    assert m["images_per_second"] is None and m["throughput_detail"] is None
    assert "tome.matching" in res.stdout
