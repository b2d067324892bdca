"""Tests of the measurement protocol: GFLOPs (attention included, per image), benchmark structure and errors,
token accounting, provenance, metrics.json writing and loading."""

from __future__ import annotations

import json
import re

import pytest
import torch
from torch import Tensor, nn

import tokred
from tokred.measure import (
    BenchmarkOOMError,
    TokenAccounting,
    analytic_vit_gflops,
    benchmark,
    combine_gflops,
    compare,
    count_gflops,
    pair_summary,
    provenance,
)
from tokred.reducers import Merger, Pruner, register_reducer, unregister_reducer
from tokred.results import METRICS_FIELDS, assemble_metrics, load_results, validate_metrics, write_metrics
from tokred.state import TokenState

# A ViT wide enough that norms/biases (not in the analytic count) stay far below 1% of the total.
WIDE = {"embed_dim": 256, "depth": 2, "num_heads": 4, "mlp_ratio": 4}
SDPA = "aten::scaled_dot_product_attention"


# ------------------------------------------------------------------------------------------- test reducers
class _HalvePruner(Pruner):
    """Banks every second patch token right after the embedding (image-independent)."""

    def on_embed(self, x, state, ctx):
        P = state.num_prefix_tokens
        keep = (torch.arange(x.shape[1], device=x.device) - P) % 2 == 0  # [N]
        return state.split(x, keep.expand(x.shape[0], -1), block=-1)


class _SignPruner(Pruner):
    """Keeps every patch token of images with positive mean, half of them otherwise."""

    def on_embed(self, x, state, ctx):
        P = state.num_prefix_tokens
        half = ((torch.arange(x.shape[1], device=x.device) - P) % 2 == 0).expand(x.shape[0], -1)  # [B, N]
        positive = ctx.image.mean((1, 2, 3)) > 0  # [B]
        return state.split(x, half | positive[:, None], block=-1)


class _KeySimilarity(Merger):
    """Computes a ToMe-like key similarity and a matrix-vector score in its attention hook (costs to attribute)
    and changes nothing."""

    def on_attention(self, block, x, state, keys):
        sim = keys @ keys.transpose(-1, -2)  # [B, h, N, N]
        score = x @ x[0, 0]  # [B, N]: a 1-D right operand
        return x + 0 * (sim.mean() + score.mean()), state


class _BoolScalarPruner(Pruner):
    """Halves the patch tokens like _HalvePruner, building the mask with Python-bool scalar ops that torch.jit
    tracing cannot record as such (full, scatter, ==, where, masked_fill)."""

    def on_embed(self, x, state, ctx):
        B, N, _ = x.shape
        P = state.num_prefix_tokens
        odd = torch.arange(P + 1, N, 2, device=x.device).expand(B, -1)  # [B, N0 / 2]
        drop = torch.full((B, N), False).scatter(1, odd, True)  # [B, N]
        keep = torch.where(drop == True, False, True).masked_fill(~drop, True)  # noqa: E712
        return state.split(x, keep, block=-1)


@pytest.fixture
def registered():
    names = {"_test_halve": _HalvePruner, "_test_sign": _SignPruner, "_test_keysim": _KeySimilarity,
             "_test_boolscalar": _BoolScalarPruner}
    for name, cls in names.items():
        register_reducer(name, cls)
    yield names
    for name in names:
        unregister_reducer(name)


def _wide(**kw):
    return tokred.build_segmenter("test_vit", num_classes=5, crop_size=(64, 96), backbone_kwargs=WIDE, **kw)


def _small(**kw):
    return tokred.build_segmenter("test_vit", num_classes=5, crop_size=(64, 96), **kw)


def _n0(hw):
    return (hw[0] // 16) * (hw[1] // 16)


# ------------------------------------------------------------------------------------------- GFLOPs
@pytest.mark.parametrize("hw", [(64, 96), (128, 192)])
def test_plain_vit_gflops_match_analytic_with_attention(hw):
    torch.manual_seed(0)
    seg = _wide()
    images = torch.randn(1, 3, *hw)
    res = count_gflops(seg, images)
    n0 = _n0(hw)
    analytic = analytic_vit_gflops(WIDE["embed_dim"], WIDE["depth"], n0 + 1, WIDE["mlp_ratio"], num_patches=n0)
    assert abs(res["by_module"]["encoder"] / analytic - 1) < 0.01
    assert res["by_module"]["reducers"] == 0
    assert sum(res["by_module"].values()) == pytest.approx(res["gflops"], rel=1e-9)
    assert SDPA not in res["skipped_ops"] and "linear" in res["by_operator"]
    assert "multiply-add" in res["flop_convention"]
    # without the handle attention goes missing: exactly depth * 2 N^2 d multiply-adds
    without = count_gflops(seg, images, handles={SDPA: None})
    attn = WIDE["depth"] * 2 * (n0 + 1) ** 2 * WIDE["embed_dim"] / 1e9
    torch.testing.assert_close(res["gflops"] - without["gflops"], attn, rtol=1e-6, atol=0)
    assert without["gflops"] < res["gflops"]


def test_halving_reducer_lowers_encoder_gflops(registered):
    torch.manual_seed(0)
    hw = (128, 192)
    n0 = _n0(hw)
    images = torch.randn(1, 3, *hw)
    plain = count_gflops(_wide(), images)
    halved = count_gflops(_wide(pruner="_test_halve"), images)
    analytic = analytic_vit_gflops(WIDE["embed_dim"], WIDE["depth"], 1 + n0 // 2, WIDE["mlp_ratio"],
                                   num_patches=n0)
    assert abs(halved["by_module"]["encoder"] / analytic - 1) < 0.01
    assert halved["by_module"]["encoder"] < 0.55 * plain["by_module"]["encoder"]
    # the decoder runs on the restored full grid: its cost does not change
    assert halved["by_module"]["decoder"] == pytest.approx(plain["by_module"]["decoder"])


def test_dynamic_count_averages_per_image_counts(registered):
    torch.manual_seed(0)
    seg = _small(pruner="_test_sign")
    pos = torch.rand(1, 3, 64, 96) + 0.1
    neg = -torch.rand(1, 3, 64, 96) - 0.1
    single = [count_gflops(seg, img)["gflops"] for img in (pos, neg)]
    both = count_gflops(seg, torch.cat([pos, neg]))
    assert single[1] < single[0]
    assert both["per_image"] == pytest.approx(single)
    assert both["gflops"] == pytest.approx(sum(single) / 2)
    assert (both["gflops_min"], both["gflops_max"]) == pytest.approx((single[1], single[0]))
    assert both["num_images"] == 2
    merged = combine_gflops([count_gflops(seg, pos), count_gflops(seg, neg)])
    assert merged["gflops"] == pytest.approx(both["gflops"])
    assert merged["by_module"] == pytest.approx(both["by_module"])


def test_reducer_hook_maths_is_attributed_to_the_reducer(registered):
    seg = _small(merger="_test_keysim")
    hw = (64, 96)
    res = count_gflops(seg, torch.randn(1, 3, *hw))
    n = _n0(hw) + 1
    heads, head_dim, depth, embed_dim = 2, 32, 6, 64  # test_vit
    expected = depth * (heads * n * n * head_dim + n * embed_dim) / 1e9  # keys @ keys^T and x @ v per block
    assert res["by_reducer"]["_test_keysim"] == pytest.approx(expected)
    assert res["by_module"]["reducers"] == pytest.approx(expected)
    plain = count_gflops(_small(), torch.randn(1, 3, *hw))
    assert res["by_module"]["encoder"] == pytest.approx(plain["by_module"]["encoder"])
    # the hooks are restored after counting
    assert "on_attention" not in vars(seg.encoder.reducers[0]) and "forward" not in vars(seg.encoder.reducers[0])


def test_bool_scalar_ops_trace_and_count_like_the_plain_equivalent(registered):
    torch.manual_seed(0)
    images = torch.randn(1, 3, 64, 96)
    plain_ops = count_gflops(_small(pruner="_test_halve"), images)
    bool_ops = count_gflops(_small(pruner="_test_boolscalar"), images)
    assert bool_ops["by_module"]["encoder"] == pytest.approx(plain_ops["by_module"]["encoder"])
    seg = _small(pruner="_test_boolscalar").eval()
    with torch.no_grad():
        assert seg(images).state.tokens_per_block[0].tolist() == [12]


def test_count_restores_training_mode_and_checks_shapes():
    seg = _small().train()
    count_gflops(seg, torch.randn(1, 3, 64, 96))
    assert all(m.training for m in seg.modules())
    with pytest.raises(ValueError, match="images"):
        count_gflops(seg, torch.randn(3, 64, 96))


def test_analytic_per_block_counts_and_mlp_ratio():
    uniform = analytic_vit_gflops(64, 3, 25, mlp_ratio=3, num_patches=24)
    assert analytic_vit_gflops(64, 3, [25, 25, 25], mlp_ratio=3, num_patches=24) == pytest.approx(uniform)
    reduced = analytic_vit_gflops(64, 3, [25, 13, 13], mlp_ratio=3, num_patches=24)
    assert reduced < uniform
    with pytest.raises(ValueError, match="depth"):
        analytic_vit_gflops(64, 3, [25, 13])


# ------------------------------------------------------------------------------------------- benchmark
class _FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class _CostModel(nn.Module):
    """Advances a fake clock by ``cost`` seconds per forward and logs its calls."""

    def __init__(self, clock: _FakeClock, cost: float, name: str, log: list[str]) -> None:
        super().__init__()
        self.clock, self.cost, self.name, self.log = clock, cost, name, log
        self.w = nn.Parameter(torch.ones(1))

    def forward(self, x: Tensor) -> Tensor:
        self.clock.t += self.cost
        self.log.append(self.name)
        return x * self.w


def test_benchmark_fields_and_arithmetic():
    clock, log = _FakeClock(), []
    res = benchmark(_CostModel(clock, 0.25, "a", log), batch_size=4, image_hw=(32, 48), warmup=2, repeats=5,
                    timer=clock)
    assert res["images_per_second"] == pytest.approx(4 / 0.25)
    assert res["per_repeat_images_per_second"] == pytest.approx([16.0] * 5)
    assert len(log) == 2 + 5
    for key in ("images_per_second_iqr", "images_per_second_min", "images_per_second_max", "device_name",
                "peak_memory_mib", "peak_memory_kind", "threads", "warmup", "iters_per_repeat"):
        assert key in res
    assert (res["batch_size"], res["precision"], res["device"], res["repeats"]) == (4, "fp32", "cpu", 5)
    assert res["threads"] == torch.get_num_threads() and res["peak_memory_mib"] > 0
    json.dumps(res)


def test_benchmark_runs_a_segmenter_in_bf16_on_cpu():
    seg = _small().train()
    res = benchmark(seg, batch_size=1, image_hw=(64, 96), precision="bf16", warmup=1, repeats=2, threads=1)
    assert res["precision"] == "bf16" and res["images_per_second"] > 0 and res["threads"] == 1
    assert all(m.training for m in seg.modules())
    # parameters are not turned into inference tensors: training still works afterwards
    img = torch.randn(1, 3, 64, 96)
    seg.losses(seg(img), torch.zeros(1, 64, 96, dtype=torch.long))["loss"].backward()
    assert seg.decoder.head.weight.grad is not None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_benchmark_on_cuda_reports_gpu_memory():
    res = benchmark(_small(), batch_size=2, image_hw=(64, 96), device="cuda", precision="bf16", warmup=1,
                    repeats=2)
    assert res["device"].startswith("cuda:") and res["peak_memory_kind"] == "cuda_max_allocated"
    assert res["device_name"] == torch.cuda.get_device_name(torch.device(res["device"]))
    assert res["peak_memory_mib"] > 0


def test_compare_interleaves_and_computes_speedup_and_efficiency():
    clock, log = _FakeClock(), []
    fast, slow = _CostModel(clock, 0.5, "r", log), _CostModel(clock, 1.0, "b", log)
    res = compare(fast, slow, batch_size=2, image_hw=(16, 16), warmup=0, repeats=4, gflops_reduced=1.0,
                  gflops_baseline=4.0, timer=clock)
    assert "".join(log) == "rbbrrbbr"  # ABBA order
    assert res["speedup"] == pytest.approx(2.0)
    assert res["gflops_ratio"] == pytest.approx(4.0)
    assert res["efficiency"] == pytest.approx(0.5)
    assert res["reduced"]["images_per_second"] == pytest.approx(4.0)
    assert res["baseline"]["images_per_second"] == pytest.approx(2.0)
    no_flops = pair_summary([3.0, 6.0, 9.0], [3.0, 3.0, 3.0])
    assert no_flops["speedup"] == pytest.approx(2.0) and no_flops["efficiency"] is None
    with pytest.raises(ValueError, match="paired"):
        pair_summary([1.0], [1.0, 2.0])


def test_benchmark_rejects_unknown_device_and_precision():
    model = nn.Identity()
    with pytest.raises(ValueError, match=r"tpu.*available devices: cpu"):
        benchmark(model, 1, (16, 16), device="tpu", repeats=1, warmup=0)
    with pytest.raises(ValueError, match=r"'fp16'.*fp32, bf16"):
        benchmark(model, 1, (16, 16), precision="fp16", repeats=1, warmup=0)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"cuda.*not available.*cpu"):
            benchmark(model, 1, (16, 16), device="cuda", repeats=1, warmup=0)


def test_benchmark_out_of_memory_names_the_batch_size():
    class _Oom(nn.Module):
        def forward(self, x):
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    with pytest.raises(BenchmarkOOMError, match=r"batch_size=8.*batch_size=4"):
        benchmark(_Oom(), 8, (16, 16), repeats=1, warmup=1)


# ------------------------------------------------------------------------------------------- tokens
def _hand_states() -> tuple[TokenState, TokenState]:
    """Batch 1: two images, N0 = 6, one prefix token; after block 0 image 0 keeps 4 patches, image 1 keeps 2.
    Batch 2: one image whose 6 patches are merged into 3 tokens before block 0, then 1 halted after block 0."""
    B, P = 2, 1
    s = TokenState.initial(B, (2, 3), P, torch.device("cpu"))
    x = torch.randn(B, P + 6, 4)
    s = s.record_block_entry()
    keep = torch.tensor([[1, 1, 1, 1, 1, 0, 0], [1, 1, 0, 1, 0, 0, 0]], dtype=torch.bool)
    x, s = s.split(x, keep, block=0)
    s1 = s.record_block_entry().add_stat("halted_class_2", torch.tensor([1.0, 3.0]))

    t = TokenState.initial(1, (2, 3), P, torch.device("cpu"))
    y = torch.randn(1, P + 6, 4)
    y, t = t.merge(y, torch.tensor([[0, 1, 1, 2, 2, 3, 3]]), 4)
    t = t.record_block_entry()
    y, t = t.split(y, torch.tensor([[1, 1, 1, 0]], dtype=torch.bool), block=0)
    t2 = t.record_block_entry()
    return s1, t2


def test_token_accounting_on_hand_made_states():
    s1, s2 = _hand_states()
    acc = TokenAccounting(histogram_bins=4)
    acc.update(s1)
    first = acc.summary()
    assert first["tokens_per_block"] == pytest.approx([6.0, 3.0])  # padding of image 1 not counted
    assert first["tokens_per_block_min"] == [6.0, 2.0] and first["tokens_per_block_max"] == [6.0, 4.0]
    assert first["token_reduction"] == pytest.approx(1.0)
    assert first["halted_fraction"] == pytest.approx(6 / 12)
    assert first["halted_patch_fraction"] == pytest.approx(6 / 12)
    assert first["banked_after_block"] == {"0": pytest.approx({"mean": 3.0, "fraction": 0.5})}
    assert first["halted_stats"] == {"halted_class_2": pytest.approx(2.0)}

    acc.update(s2)
    both = acc.summary()
    assert both["num_images"] == 3
    assert both["tokens_per_block"] == pytest.approx([(6 + 6 + 3) / 3, (4 + 2 + 2) / 3])
    assert both["token_reduction"] == pytest.approx(6 / 5)
    assert both["halted_fraction"] == pytest.approx(7 / 15)
    assert both["halted_patch_fraction"] == pytest.approx((6 + 2) / 18)
    dist = both["tokens_first_block"]
    assert dist["quantiles"]["0.0"] == 3 and dist["quantiles"]["1.0"] == 6
    assert sum(dist["histogram"]["counts"]) == 3
    json.dumps(both)


def test_token_accounting_needs_states():
    acc = TokenAccounting()
    with pytest.raises(ValueError, match="update"):
        acc.summary()
    with pytest.raises(ValueError, match="tokens_per_block"):
        acc.update(TokenState.initial(1, (2, 2), 1, torch.device("cpu")))


def test_token_accounting_of_a_real_forward(registered):
    seg = _small(pruner="_test_halve").eval()
    acc = TokenAccounting()
    with torch.no_grad():
        acc.update(seg(torch.randn(2, 3, 64, 96)).state)
    out = acc.summary()
    assert out["tokens_per_block"] == pytest.approx([12.0] * 6)
    assert out["token_reduction"] == pytest.approx(2.0)
    assert out["halted_fraction"] == pytest.approx(0.5)  # banked before block 0 count as entered
    assert out["banked_after_block"]["-1"]["mean"] == pytest.approx(12.0)


# ------------------------------------------------------------------------------------------- provenance
def test_provenance_records_versions_and_reducer_sources(registered):
    p = provenance({"merger": "none", "pruner": "_test_halve"})
    assert p["versions"]["torch"] == torch.__version__ and p["versions"]["tokred"] == tokred.__version__
    assert p["reducer_sources"]["merger"]["distribution"] == "tokred"
    assert p["reducer_sources"]["pruner"]["distribution"] == "<runtime>"
    assert p["git_commit"] is None or re.fullmatch(r"[0-9a-f]{40}", p["git_commit"])
    assert p["hostname"] and p["cpu_name"]
    json.dumps(p)
    with pytest.raises(KeyError):
        provenance({"merger": "no_such_reducer"})


# ------------------------------------------------------------------------------------------- results
def _metrics(miou: float = 0.5, merger: str = "none") -> dict:
    clock = _FakeClock()
    thr = compare(_CostModel(clock, 0.5, "r", []), _CostModel(clock, 1.0, "b", []), batch_size=2,
                  image_hw=(16, 16), warmup=0, repeats=2, gflops_reduced=1.0, gflops_baseline=2.0, timer=clock)
    acc = TokenAccounting()
    for s in _hand_states():
        acc.update(s)
    gflops = {"gflops": 1.0, "by_module": {"encoder": 0.9, "decoder": 0.1}}
    return assemble_metrics(
        model="test_vit", dataset="camvid", crop_size=(64, 96), decoder="linear", merger={"name": merger},
        pruner={"name": "none"}, schedule={"kind": "constant", "r": 0}, seed=0,
        quality={"miou": miou, "per_class_iou": [miou, 1 - miou], "pixel_accuracy": 0.9},
        provenance=provenance({"merger": "none", "pruner": "none"}), gflops=gflops, throughput=thr,
        tokens=acc.summary())


def test_assembled_metrics_hold_every_field_and_writer_refuses_overwrite(tmp_path):
    m = _metrics()
    assert validate_metrics(m) == []
    assert m["speedup"] == pytest.approx(2.0) and m["efficiency"] == pytest.approx(1.0)
    assert m["images_per_second"] == pytest.approx(4.0) and m["device"]
    assert set(METRICS_FIELDS) <= set(m)
    assert validate_metrics({k: v for k, v in m.items() if k != "gflops"}) == ["gflops"]
    assert validate_metrics({**m, "merger": "tome"}) == ["merger.name"]
    path = tmp_path / "run" / "metrics.json"
    write_metrics(path, m)
    assert json.loads(path.read_text())["miou"] == 0.5
    with pytest.raises(FileExistsError, match=re.escape(str(path))):
        write_metrics(path, _metrics(miou=0.7))
    assert json.loads(path.read_text())["miou"] == 0.5
    write_metrics(path, _metrics(miou=0.7), overwrite=True)
    assert json.loads(path.read_text())["miou"] == 0.7
    assert [p.name for p in path.parent.iterdir()] == ["metrics.json"]  # no temporary files left


def test_load_results_builds_one_row_per_run(tmp_path):
    write_metrics(tmp_path / "runs" / "a" / "metrics.json", _metrics(0.4, "none"))
    write_metrics(tmp_path / "runs" / "nested" / "b" / "metrics.json", _metrics(0.6, "tome"))
    df = load_results(tmp_path / "runs")
    assert len(df) == 2
    assert list(df["miou"]) == [0.4, 0.6]
    assert list(df["merger.name"]) == ["none", "tome"]
    assert "versions.torch" in df.columns and "gflops_detail.by_module.encoder" in df.columns
    assert df["run_dir"].iloc[1].endswith("b")
    assert len(load_results([tmp_path / "runs" / "a", tmp_path / "runs" / "a" / "metrics.json"])) == 1
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no metrics.json"):
        load_results(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_results(tmp_path / "missing")


# ------------------------------------------------------------------------------------------- windows
def test_token_accounting_sums_the_windows_of_one_image():
    s1, s2 = _hand_states()
    acc = TokenAccounting()
    acc.update(s1, torch.tensor([0, 0]))  # two windows of image 0
    acc.update(s2, [1])
    out = acc.summary()
    assert out["num_images"] == 2 and out["num_windows"] == 3 and out["windows_per_image"] == pytest.approx(1.5)
    assert out["num_patches"] == pytest.approx((12 + 6) / 2)
    assert out["tokens_per_block"] == pytest.approx([(12 + 3) / 2, (6 + 2) / 2])
    assert out["tokens_per_block_min"] == [3.0, 2.0] and out["tokens_per_block_max"] == [12.0, 6.0]
    assert out["token_reduction"] == pytest.approx(18 / 15)
    assert out["halted_fraction"] == pytest.approx(7 / 15)
    with pytest.raises(ValueError, match="image_ids has 1 entries"):
        acc.update(s1, [3])


def test_window_gflops_are_summed_per_image():
    from tokred.measure.flops import count_gflops_windows

    seg = _small().eval()
    torch.manual_seed(0)
    one_window = torch.randn(3, 64, 64)
    two_windows = torch.randn(3, 64, 112)  # windows at x = 0 and the clamped 48
    res = count_gflops_windows(seg, [one_window, two_windows], "slide", (64, 64), (48, 48))
    single = count_gflops(seg, one_window[None])["gflops"]
    assert res["windows"] == [1, 2] and res["windows_per_image"] == pytest.approx(1.5)
    assert res["per_image"] == pytest.approx([single, 2 * single], rel=1e-6)
    assert sum(res["by_module"].values()) == pytest.approx(res["gflops"], rel=1e-6)
    assert res["image_hw"] == [[64, 64], [64, 112]]
    whole = count_gflops_windows(seg, [torch.randn(3, 40, 56)], "whole")  # padded to 48x64
    assert whole["windows"] == [1]
    assert whole["gflops"] == pytest.approx(count_gflops(seg, torch.randn(1, 3, 48, 64))["gflops"], rel=1e-6)
