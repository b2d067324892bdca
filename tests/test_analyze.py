"""``python -m tokred analyze``: the STEP "where do tokens go" folder on the embedded sample (tiny test_vit).

One checkpoint (a freshly built model's state dict in tokred's ``{"model": ...}`` format) and one full analysis
are shared by the module; dCTS uses the oracle policy (so windows merge without a trained policy) and the early
exit a low p0 with top_k 1 (untrained heads are barely confident, so tokens halt).
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

OVERRIDES = ["experiment=smoke", "merger=dcts", "merger.policy=oracle", "merger.levels=[2,4,8]",
             "merger.thresholds=[0.5,0.5,0.5]", "pruner=early_exit", "pruner.threshold=0.05", "pruner.top_k=1",
             "pruner.target_accuracy=null", "merger.target_precision=null",
             "dataset.crop_size=[128,160]", "dataset.base_size=[128,160]", "preflight.check=off"]
QUICK = ["analyze.p0_sweep=[]", "analyze.tau_sweep=[]", "analyze.gallery=[]", "analyze.flops_images=0"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    import torch
    from hydra import compose, initialize_config_dir

    from tokred.config import build_model_from_config, config_dir
    from tokred.engine.checkpoint import save_checkpoint
    from tokred.structured import register_configs

    register_configs()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("config", overrides=OVERRIDES)
    torch.manual_seed(0)
    seg = build_model_from_config(cfg)
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "last.pth", {"model": seg.state_dict()})


@pytest.fixture(scope="module")
def analysis(tokred_cli, checkpoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("analysis") / "step"
    r = tokred_cli("analyze", *OVERRIDES, f"checkpoint={checkpoint}", f"analyze.out={out}",
                   "analyze.flops_images=1", "analyze.p0_sweep=[0.05,0.1,0.3,1.0]", "analyze.tau_sweep=[0.5,1.0]")
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def _table(folder: Path, name: str) -> pd.DataFrame:
    return pd.read_csv(folder / "tables" / f"{name}.csv")


def test_folder_holds_report_tables_and_figures(analysis):
    report = (analysis / "report.md").read_text()
    for section in ("a) Halting per exit and class", "b) Exit-head calibration", "c) Superpatches",
                    "d) Tokens and GFLOPs per image", "e) Training-free sweeps", "f) Gallery"):
        assert f"## {section}" in report
    assert "python -m tokred analyze" in report and "hardware:" in report
    for name in ("exits", "exits_by_class", "iou_halted_vs_live", "calibration", "calibration_bins",
                 "superpatch_by_size", "superpatch_by_class", "per_image", "per_image_summary", "sweep_p0",
                 "sweep_tau"):
        assert (analysis / "tables" / f"{name}.csv").is_file() and (analysis / "tables" / f"{name}.json").is_file()
    for png in ("halted_by_class", "reliability", "superpatch_sizes", "tokens_per_block", "sweep_p0", "sweep_tau"):
        assert (analysis / "figures" / f"{png}.png").stat().st_size > 1000
        assert f"figures/{png}.png" in report
    gallery = sorted(p.name for p in (analysis / "gallery").glob("*.png"))
    rules = {r for g in gallery for r in g.split("_0", 1)[0].split("+")}  # CamVid stems start with 0
    assert rules == {"most_halting", "least_halting", "most_tokens", "fewest_tokens", "worst_halted_error"}
    assert 1 <= len(gallery) <= 2  # two images: one picture per image, named after every rule that picked it
    assert all(f"gallery/{g}" in report for g in gallery)
    summary = json.loads((analysis / "summary.json").read_text())
    assert summary["num_images"] == 2 and 0 <= summary["miou"] <= 1


def test_halted_counts_equal_token_accounting(analysis, tokred_cli, checkpoint, tmp_path):
    """The per-exit table (counted from the bank) against TokenAccounting of an independent ``tokred eval``."""
    r = tokred_cli("eval", *OVERRIDES, f"checkpoint={checkpoint}", f"output_dir={tmp_path}", "run_name=ev",
                   "eval.flops_images=0", "eval.bench=false")
    assert r.returncode == 0, r.stderr[-3000:]
    tokens = json.loads((tmp_path / "ev" / "metrics.json").read_text())["tokens_detail"]
    exits = _table(analysis, "exits")
    n = tokens["num_images"]
    assert n == 2
    expected = {int(b): v["mean"] * n for b, v in tokens["banked_after_block"].items()}
    assert expected and sum(expected.values()) > 0, "nothing halted: the test would prove nothing"
    assert {int(b): float(t) for b, t in zip(exits["block"], exits["tokens_halted"])} == expected
    # by predicted class, summed over exits: the pruner's own halted_per_class counter
    by_class = _table(analysis, "exits_by_class")
    assert by_class["tokens_halted_pred"].sum() == pytest.approx(tokens["halted_stats"]["halted_per_class"] * n)
    # the same pass's own accounting agrees too, and every halted cell's recomputed confidence is above p0
    own = json.loads((analysis / "tables" / "token_accounting.json").read_text())
    assert own["banked_after_block"] == tokens["banked_after_block"]
    assert (_table(analysis, "calibration")["halted_cells_above_p0"] == 1.0).all()


def test_p0_sweep_is_monotone_in_halted_fraction(analysis):
    sweep = _table(analysis, "sweep_p0").sort_values("p0")
    halted = sweep["halted_fraction"].to_numpy()
    assert (halted[:-1] >= halted[1:]).all(), sweep
    assert halted[0] > 0 and halted[-1] == 0  # p0 = 1.0 halts nothing
    # the configured p0 (0.05) is a sweep point and reproduces the main pass
    own = json.loads((analysis / "tables" / "token_accounting.json").read_text())
    row = sweep[sweep["configured"]]
    assert row["p0"].tolist() == [0.05]
    assert row["halted_fraction"].item() == pytest.approx(own["halted_fraction"])
    tau = _table(analysis, "sweep_tau")
    assert tau.loc[tau["tau"] == 1.0, "token_reduction"].item() == pytest.approx(1.0)  # tau = 1 merges nothing


def test_superpatch_and_calibration_tables_add_up(analysis):
    by_size = _table(analysis, "superpatch_by_size")
    assert (by_size["cells"].sum()) == 2 * 8 * 10  # every cell of both 8 x 10 grids held by one token
    assert set(by_size["size"]) <= {1, 4, 16, 64} and (by_size["size"] > 1).any()
    assert ((by_size["uniform_fraction"] >= 0) & (by_size["uniform_fraction"] <= 1)).all()
    bins = _table(analysis, "calibration_bins")
    cal = _table(analysis, "calibration")
    assert len(bins) == 10 * len(cal)
    assert bins.groupby("block")["count"].sum().to_dict() == dict(zip(cal["block"], cal["cells"]))
    assert ((cal["ece"] >= 0) & (cal["ece"] <= 1)).all()


def test_second_call_writes_a_new_folder(analysis, tokred_cli, checkpoint):
    before = (analysis / "report.md").read_bytes()
    r = tokred_cli("analyze", *OVERRIDES, *QUICK, f"checkpoint={checkpoint}", f"analyze.out={analysis}")
    assert r.returncode == 0, r.stderr[-3000:]
    second = analysis.with_name(analysis.name + "-2")
    assert (second / "report.md").is_file()
    assert (analysis / "report.md").read_bytes() == before


@pytest.mark.parametrize("slot, skipped, kept", [
    ("merger", "c) superpatches: no embedding-time merger", "## a) Halting per exit and class"),
    ("pruner", "a) halting per exit and b) calibration: no early exit", "## c) Superpatches"),
])
def test_one_reducer_model_skips_the_other_sections(tokred_cli, checkpoint, tmp_path, slot, skipped, kept):
    import torch

    from tokred.engine.checkpoint import save_checkpoint

    ov = [o for o in OVERRIDES if not o.startswith(slot)]
    sd = torch.load(checkpoint, weights_only=True)["model"]
    if slot == "pruner":  # the loader refuses tensors the model has no place for: drop the exit heads
        sd = {k: v for k, v in sd.items() if ".heads." not in k}
    ckpt = save_checkpoint(tmp_path / "one.pth", {"model": sd})
    r = tokred_cli("analyze", *ov, *QUICK, f"{slot}=none", f"checkpoint={ckpt}", "analyze.gallery=[]",
                   f"analyze.out={tmp_path / 'a'}")
    assert r.returncode == 0, r.stderr[-3000:]
    report = (tmp_path / "a" / "report.md").read_text()
    assert "## Skipped sections" in report and skipped in report and kept in report
    assert ("## c) Superpatches" in report) == (slot == "pruner")
    assert ("## b) Exit-head calibration" in report) == (slot == "merger")


@pytest.mark.parametrize("extra, message", [
    (["checkpoint=/nonexistent/last.pth"], "no such file"),
    (["eval.split=nosuchsplit"], "eval.split=nosuchsplit"),
    (["merger=none", "pruner=none"], "has neither"),
])
def test_errors_are_clear_and_write_nothing(tokred_cli, checkpoint, tmp_path, extra, message):
    ov = [o for o in OVERRIDES if not o.startswith(("merger", "pruner"))] if "merger=none" in extra else OVERRIDES
    r = tokred_cli("analyze", *ov, f"checkpoint={checkpoint}", *extra, f"analyze.out={tmp_path / 'x'}")
    assert r.returncode == 2, (r.stdout[-2000:], r.stderr[-2000:])
    assert message in r.stderr
    assert not (tmp_path / "x").exists()


def test_reliability_bins_ece_and_sweep_thresholds():
    import torch

    from tokred.analysis.calibration import ReliabilityBins

    rb = ReliabilityBins(10)
    # bin [0.9, 1): confidence 0.95, 2 of 4 right (gap 0.45); bin [0.5, 0.6): 0.55, 1 of 2 right (gap 0.05)
    rb.update(torch.tensor([0.95, 0.95, 0.95, 0.95, 0.55, 0.55]), torch.tensor([1, 1, 0, 0, 1, 0]).bool())
    assert rb.ece() == pytest.approx(4 / 6 * 0.45 + 2 / 6 * 0.05)
    assert rb.accuracy() == pytest.approx(0.5) and rb.total == 6
    assert rb.thresholds_for_shares((0.66,)) == [0.6]  # 4 of 6 predictions at >= 0.6
    assert ReliabilityBins(10).thresholds_for_shares() == [] and ReliabilityBins(10).ece() != ReliabilityBins(10).ece()


def test_cell_labels_are_the_patch_majority():
    import torch

    from tokred.analysis.cells import cell_class_counts, majority_label

    lab = torch.full((1, 4, 8), 255)
    lab[0, :, :4] = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1], [0, 0, 0, 1], [255, 255, 255, 255]])  # cell (0, 0)
    lab[0, :3, 4:] = 2  # cell (0, 1): 12 pixels of class 2, 4 ignored
    counts = cell_class_counts(lab, (1, 2), 3)
    assert counts[0, :, 0, 0].tolist() == [7, 5, 0] and counts[0, :, 0, 1].tolist() == [0, 0, 12]
    assert majority_label(counts).tolist() == [[[0, 2]]]
    assert majority_label(torch.zeros(1, 3, 1, 1)).item() == 255  # a fully ignored cell
