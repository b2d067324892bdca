"""Seeds in ablation grids: paired deltas against the reference cell and the spread test in summary.csv/.md;
the protocol's ``finetune_overrides`` (validation, generated cell files, protocol identity)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf

import tokred.ablations.runner as runner
from tokred.ablations import BASELINE_CELL, Grid, load_grid, summarize, write_summary
from tokred.ablations.grid import identity_differences, protocol_identity, write_cell_configs
from tokred.ablations.summary import SUMMARY_COLUMNS

REPO = Path(__file__).resolve().parents[1]

# mIoU (fraction) per cell and seed; the reference `none` spreads 2 pp over its three seeds
MIOU = {
    BASELINE_CELL: {0: 0.48, 1: 0.49, 2: 0.47},
    "none": {0: 0.50, 1: 0.51, 2: 0.52},
    "better": {0: 0.55, 1: 0.54, 2: 0.56},   # +5 +3 +4: same sign, beyond the spread
    "worse": {0: 0.45, 1: 0.47, 2: 0.46},    # -5 -4 -6
    "mixed": {0: 0.56, 1: 0.50, 2: 0.55},    # +6 -1 +3: median beyond the spread, signs differ
    "small": {0: 0.51, 1: 0.52, 2: 0.53},    # +1 +1 +1: same sign, within the spread
    "partial": {0: 0.60, 2: 0.62},           # two seeds pair
    "single": {0: 0.70},                     # one seed: never beyond the spread
    "offshelf": {0: 0.40, 1: 0.41, 2: 0.42},  # off the shelf pairs with the reference too
}
MODES = {BASELINE_CELL: "baseline", "offshelf": "off_the_shelf"}


def _protocol(root: Path) -> Path:
    for cell, seeds in MIOU.items():
        for seed, miou in seeds.items():
            d = root / "runs" / f"{cell}_seed{seed}"
            d.mkdir(parents=True)
            (d / "metrics.json").write_text(json.dumps({
                "miou": miou, "gflops": 5.0, "gflops_ratio": 2.0, "images_per_second": 10.0 + seed,
                "speedup": 1.5, "efficiency": 0.75, "token_reduction": 1.0, "halted_fraction": 0.0,
                "device": "Test CPU", "precision": "fp32", "batch_size": 2, "seed": seed, "method": cell,
                "tokens_per_block": [4.0, 4.0], "train_seconds": 1.0}))
    cells = [c for c in MIOU if c != BASELINE_CELL]
    (root / "protocol.json").write_text(json.dumps({
        "reference": "none", "cell_order": cells,
        "cells": {c: {"mode": MODES.get(c, "finetune"), "budget": ""} for c in cells}}))
    return root


def _paired(cell: str) -> list[float]:
    ref = MIOU["none"]
    return [100 * (v - ref[s]) for s, v in sorted(MIOU[cell].items()) if s in ref]


def test_paired_deltas_per_seed(tmp_path):
    table = summarize(_protocol(tmp_path)).set_index("cell")
    assert list(SUMMARY_COLUMNS[-7:]) == ["timed_seeds", "busy_seeds", "paired_delta_pct", "paired_delta_min_pct",
                                         "paired_delta_max_pct", "paired_seeds", "exceeds_spread"]
    for cell in MIOU:
        deltas = _paired(cell)
        row = table.loc[cell]
        assert row["paired_seeds"] == len(deltas), cell
        np.testing.assert_allclose(row["paired_delta_pct"], np.median(deltas), err_msg=cell)
        np.testing.assert_allclose(row["paired_delta_min_pct"], min(deltas), err_msg=cell)
        np.testing.assert_allclose(row["paired_delta_max_pct"], max(deltas), err_msg=cell)
    # the paired median differs from the difference of medians where seeds do not move together
    assert not np.isclose(table.loc["mixed", "paired_delta_pct"], table.loc["mixed", "delta_miou_pct"])
    np.testing.assert_allclose(table.loc["none", "miou_spread_pct"], 2.0)


def test_exceeds_spread_both_ways(tmp_path):
    flag = summarize(_protocol(tmp_path)).set_index("cell")["exceeds_spread"]
    assert flag.dtype == bool
    assert flag[["better", "worse", "partial", "offshelf"]].all()
    assert not flag[["none", "mixed", "small", "single"]].any()


def test_no_reference_run_pairs_nothing(tmp_path):
    _protocol(tmp_path)
    for seed in MIOU["none"]:
        (tmp_path / "runs" / f"none_seed{seed}" / "metrics.json").unlink()
    table = summarize(tmp_path).set_index("cell")
    assert (table["paired_seeds"] == 0).all() and not table["exceeds_spread"].any()
    assert table["paired_delta_pct"].isna().all()


def _md_rows(md: str) -> dict[str, str]:
    return {line.split("|")[1].strip(): line for line in md.splitlines() if line.startswith("| ")}


def test_markdown_marks_differences_within_spread(tmp_path):
    d = _protocol(tmp_path)
    write_summary(summarize(d), d)
    md = (d / "summary.md").read_text()
    rows = _md_rows(md)
    for cell in ("mixed", "small"):
        assert "within spread" in rows[cell], cell
    for cell in ("better", "worse", "partial", "offshelf"):
        assert "exceeds spread" in rows[cell] and "within spread" not in rows[cell], cell
    assert "within spread" not in rows["single"] and "exceeds spread" not in rows["single"]
    header = [h.strip() for h in rows["cell"].split("|")]
    assert "im/s" not in header and "speedup" in header and "efficiency" in header
    assert "machine's load" in md and "not ranked" in md
    # rows keep the grid's order, not an mIoU ranking
    assert list(rows)[1:] == [BASELINE_CELL, *[c for c in MIOU if c != BASELINE_CELL]]
    csv = pd.read_csv(d / "summary.csv").set_index("cell")
    assert "images_per_second" in csv.columns and list(csv.columns) == list(SUMMARY_COLUMNS[1:])
    assert csv.loc["better", "exceeds_spread"] and not csv.loc["small", "exceeds_spread"]


def _retime(root: Path, cell: str, seed: int, self_check: float | None, speedup: float) -> None:
    f = root / "runs" / f"{cell}_seed{seed}" / "metrics.json"
    m = json.loads(f.read_text())
    m.update(speedup=speedup, efficiency=speedup / m["gflops_ratio"], images_per_second=100.0 * speedup,
             throughput_detail=None if self_check is None else {"self_check_speedup": self_check})
    f.write_text(json.dumps(m))


def test_runs_timed_on_a_busy_machine_are_left_out_of_the_timing_medians(tmp_path, caplog):
    d = _protocol(tmp_path)
    for seed, (check, speedup) in enumerate([(1.02, 1.2), (0.55, 3.0), (1.0, 1.4)]):  # seed 1: busy, off by 0.45
        _retime(d, "better", seed, check, speedup)
    for seed, check in enumerate([0.5, 1.6, 0.7]):  # every seed busy
        _retime(d, "worse", seed, check, 2.0)
    for seed, (check, speedup) in enumerate([(None, 1.1), (1.09, 1.3), (0.91, 1.5)]):  # no check / just inside
        _retime(d, "small", seed, check, speedup)
    with caplog.at_level("WARNING", logger="tokred.ablations.summary"):
        table = summarize(d).set_index("cell")
    assert "better_seed1" in caplog.text and "worse_seed0" in caplog.text and "small_seed" not in caplog.text
    row = table.loc["better"]
    assert row["timed_seeds"] == 2 and row["busy_seeds"] == "1"
    np.testing.assert_allclose(row["speedup"], 1.3)  # median of 1.2 and 1.4; the busy 3.0 would make it 1.4
    np.testing.assert_allclose(row["images_per_second"], 130.0)
    np.testing.assert_allclose(row["efficiency"], 0.65)
    # quality and cost columns keep the busy seed
    assert row["num_seeds"] == 3 and row["paired_seeds"] == 3
    np.testing.assert_allclose(row["miou_pct"], 55.0)
    worse = table.loc["worse"]
    assert worse["timed_seeds"] == 0 and worse["busy_seeds"] == "0,1,2"
    assert np.isnan(worse["speedup"]) and np.isnan(worse["efficiency"]) and np.isnan(worse["images_per_second"])
    np.testing.assert_allclose(worse["gflops"], 5.0)
    small = table.loc["small"]
    assert small["timed_seeds"] == 3 and small["busy_seeds"] == ""
    np.testing.assert_allclose(small["speedup"], 1.3)
    write_summary(summarize(d), d)  # the plots take a cell without timing
    rows = _md_rows((d / "summary.md").read_text())
    assert "2/3 (busy: seed 1)" in rows["better"] and "0/3 (busy: seed 0,1,2)" in rows["worse"]
    assert "3/3" in rows["small"] and "busy" not in rows["small"]
    csv = pd.read_csv(d / "summary.csv", keep_default_na=False).set_index("cell")
    assert csv.loc["better", "busy_seeds"] == "1" and int(csv.loc["better", "timed_seeds"]) == 2


# ---------------------------------------------------------------------------------------------- finetune_overrides
FT = ["train.lr=5.0e-5", "train.warmup_iters=0"]


def _spec(**changes):
    spec = {"protocol": "p", "overrides": ["model=test_vit"], "finetune_overrides": FT, "cells": {
        "none": {"overrides": []}, "tome": {"overrides": ["merger=tome", "merger.r=2"]},
        "offshelf": {"overrides": ["merger=tome", "merger.r=2"], "mode": "off_the_shelf"}}}
    return {**spec, **changes}


def test_finetune_overrides_reach_finetune_cells_only(tmp_path):
    from hydra import compose, initialize_config_dir

    from tokred.ablations.grid import Cell
    from tokred.config import config_dir

    grid = Grid.from_mapping(_spec())
    assert grid.finetune_overrides == tuple(FT)
    baseline = Cell(BASELINE_CELL, (), "baseline")
    write_cell_configs(tmp_path, grid, [baseline, *grid.cells], tmp_path / "runs")
    files = {c: OmegaConf.load(tmp_path / "experiment" / "ablation" / f"{c}.yaml")
             for c in (BASELINE_CELL, "none", "tome", "offshelf")}
    for c in ("none", "tome"):
        assert files[c].train.lr == 5.0e-5 and files[c].train.warmup_iters == 0, c
    for c in (BASELINE_CELL, "offshelf"):
        assert "lr" not in files[c].train and "warmup_iters" not in files[c].train, c
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        default = compose(config_name="config")
        cfg = compose(config_name="config", overrides=[f"hydra.searchpath=[file://{tmp_path}]",
                                                       "experiment=ablation/tome"])
        base = compose(config_name="config", overrides=[f"hydra.searchpath=[file://{tmp_path}]",
                                                        f"experiment=ablation/{BASELINE_CELL}"])
    assert cfg.train.lr == 5.0e-5 and cfg.train.warmup_iters == 0 and cfg.merger.name == "tome"
    assert base.train.lr == default.train.lr and base.train.warmup_iters == default.train.warmup_iters


@pytest.mark.parametrize("value, match", [
    (["train.lr=1e-4,2e-4"], "sweep"),
    (["~train.lr"], "deletes"),
    (["train.epochs=3"], "finetune_epochs"),
    (["init_from=/x.pth"], "sets init_from"),
    (["merger.r=4"], "reducers"),
    ("train.lr=1e-4", "list"),
])
def test_bad_finetune_overrides_are_refused(value, match):
    with pytest.raises(ValueError, match=match):
        Grid.from_mapping(_spec(finetune_overrides=value))


def test_finetune_overrides_clashing_with_a_cell_or_the_protocol_are_refused(tmp_path):
    spec = _spec()
    spec["cells"] = {**spec["cells"], "fast": {"overrides": ["merger=tome", "train.lr=1e-3"]}}
    with pytest.raises(ValueError, match=r"cell 'fast' overrides \['train.lr'\]"):
        Grid.from_mapping(spec)
    # an off-the-shelf cell does not train: its keys do not clash
    spec["cells"]["fast"]["mode"] = "off_the_shelf"
    Grid.from_mapping(spec)
    grid = dataclasses.replace(Grid.from_mapping(_spec()), root=tmp_path, overrides=("model=test_vit", "train.lr=1e-3"))
    with pytest.raises(ValueError, match="finetune_overrides set \\['train.lr'\\]"):
        runner._check_overrides(grid, [])
    with pytest.raises(ValueError, match="finetune_overrides set \\['train.warmup_iters'\\]"):
        runner._check_overrides(dataclasses.replace(grid, overrides=("model=test_vit",)), ["train.warmup_iters=5"])


def test_committed_protocol_keeps_its_identity():
    """An absent or empty finetune_overrides gives exactly the identity recorded before the key existed."""
    path = REPO / "results" / "ablations" / "camvid_vit-tiny_384x512" / "protocol.json"
    recorded = json.loads(path.read_text())["identity"]
    assert "finetune_overrides" not in recorded
    grid = load_grid("camvid_cpu")  # its file sets finetune_overrides: []
    assert grid.finetune_overrides == ()
    grid = dataclasses.replace(grid, finetune_epochs=recorded["finetune_epochs"])  # as it was run
    assert protocol_identity(grid, recorded["extra_overrides"]) == recorded
    assert identity_differences(recorded, protocol_identity(grid, recorded["extra_overrides"])) == {}
    changed = protocol_identity(dataclasses.replace(grid, finetune_overrides=tuple(FT)), [])
    assert identity_differences(recorded, changed) == {"finetune_overrides": (None, FT)}


def test_changed_finetune_overrides_are_refused(tmp_path):
    grid = dataclasses.replace(Grid.from_mapping(_spec()), root=tmp_path)
    identity = protocol_identity(grid, [])
    assert identity["finetune_overrides"] == FT
    grid.protocol_dir.mkdir()
    (grid.protocol_dir / "protocol.json").write_text(json.dumps({"identity": identity, "cells": {}}))
    runner._check_protocol(grid.protocol_dir, identity, grid.cells)  # the same: accepted
    for other in ((), ("train.lr=1.0e-4", "train.warmup_iters=0")):  # removed, changed
        new = protocol_identity(dataclasses.replace(grid, finetune_overrides=other), [])
        with pytest.raises(ValueError, match="another protocol.*finetune_overrides"):
            runner._check_protocol(grid.protocol_dir, new, grid.cells)
    # a record with an empty list equals one without the key
    empty = {**identity, "finetune_overrides": []}
    (grid.protocol_dir / "protocol.json").write_text(json.dumps({"identity": empty, "cells": {}}))
    runner._check_protocol(grid.protocol_dir, protocol_identity(dataclasses.replace(grid, finetune_overrides=()), []),
                           grid.cells)
