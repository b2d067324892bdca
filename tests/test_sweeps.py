"""Training-free sweeps (``tokred.ablations.sweeps``) on a tiny grid trained for real: none, early exit, dCTS and
Cropr cells of timm's test_vit on the embedded CamVid sample (the launches run in this process; ``slow``: the
module's grid trains in about 15 s, the sweeps take about 10 s more on one CPU thread)."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tokred.ablations import Cell, load_grid, run_grid
from tokred.ablations.sweeps import SWEEP_COLUMNS, SWEEPS, run_sweeps
from tokred.preflight import PreflightError
from tokred.structured import ConfigError

VALUES = {"tome_r": [0, 8, 16], "dcts_tau": [0.3, 0.5, 0.9], "early_exit_p0": [0.0, 0.2, 0.9, 1.0],
          "cropr_r": [0, 8, 16]}
CELLS = (Cell("none", ()),
         Cell("early_exit_p90", ("pruner=early_exit", "pruner.threshold=0.9", "pruner.target_accuracy=null")),
         Cell("dcts_t50", ("merger=dcts", "merger.levels=[2,4]", "merger.thresholds=[0.5,0.5]",
                           "merger.target_precision=null")),
         Cell("cropr_r8", ("pruner=cropr", "pruner.r=8")))


class _InProcess:
    """Stands in for ``subprocess`` in the grid runner: its ``python -m tokred ...`` launches go through
    ``tokred.__main__.main`` in this process (with the child's environment); anything else runs for real."""

    def __init__(self, run_tokred) -> None:
        self._run = run_tokred

    def __getattr__(self, name):
        return getattr(subprocess, name)

    def run(self, argv, *args, env=None, cwd=None, **kwargs):
        argv = [str(a) for a in argv]
        if argv[:3] != [sys.executable, "-m", "tokred"] or args:
            return subprocess.run(argv, *args, env=env, cwd=cwd, **kwargs)
        with pytest.MonkeyPatch.context() as mp:
            for k, v in (env or {}).items():
                mp.setenv(k, v)
            res = self._run(*argv[3:], cwd=Path.cwd() if cwd is None else Path(cwd))
        sys.stderr.write(res.stderr[-3000:])
        return subprocess.CompletedProcess(argv, res.returncode, res.stdout, res.stderr)


@pytest.fixture(scope="module")
def swept(tmp_path_factory, tokred_cli):
    """The tiny grid (baseline + the four cells, 128x160 px, 2 iterations each) and its sweeps."""
    import tokred.ablations.runner as runner

    grid = load_grid("smoke")
    keep = [o for o in grid.overrides if not o.startswith(("dataset.crop_size", "dataset.base_size"))]
    grid = dataclasses.replace(grid, root=tmp_path_factory.mktemp("sweeps"), protocol="tiny", cells=CELLS,
                               overrides=(*keep, "dataset.crop_size=[128,160]", "dataset.base_size=[128,160]",
                                          "policy.min_steps=1", "eval.bench=false"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(runner, "subprocess", _InProcess(tokred_cli))
        run_grid(grid)
    table, folder = run_sweeps(grid.protocol_dir, values=VALUES, progress=False)
    return grid.protocol_dir, table, folder


def _curve(table: pd.DataFrame, sweep: str) -> pd.DataFrame:
    return table[table["sweep"] == sweep].sort_values("value").reset_index(drop=True)


def _metrics(protocol_dir: Path, cell: str) -> dict:
    return json.loads((protocol_dir / "runs" / f"{cell}_seed0" / "metrics.json").read_text())


@pytest.mark.slow
def test_every_sweep_on_its_cell(swept):
    protocol_dir, table, folder = swept
    assert folder == protocol_dir / "sweeps"
    cells = table.groupby("sweep")["cell"].unique().map(list).to_dict()
    assert cells == {"tome_r": ["none"], "dcts_tau": ["dcts_t50"], "early_exit_p0": ["early_exit_p90"],
                     "cropr_r": ["cropr_r8"]}
    for name, values in VALUES.items():
        assert sorted(_curve(table, name)["value"]) == values, name
        assert (_curve(table, name)["parameter"] == SWEEPS[name].parameter).all()
    csv = pd.read_csv(folder / "sweeps.csv")
    assert tuple(csv.columns) == SWEEP_COLUMNS and len(csv) == sum(map(len, VALUES.values()))
    assert (folder / "pareto_sweeps.png").stat().st_size > 10_000


@pytest.mark.slow
def test_tome_r0_is_the_unreduced_model_and_larger_r_costs_less(swept):
    protocol_dir, table, _ = swept
    tome = _curve(table, "tome_r")
    r0 = tome.iloc[0]
    assert r0["gflops"] == pytest.approx(r0["unreduced_gflops"], rel=1e-9)
    assert r0["gflops"] == pytest.approx(_metrics(protocol_dir, "none")["gflops"], rel=1e-9)
    assert r0["miou_pct"] == pytest.approx(100 * _metrics(protocol_dir, "none")["miou"], abs=1e-6)
    assert np.all(np.diff(tome["gflops"]) < 0) and np.all(np.diff(tome["token_block_fraction"]) < 0)
    cropr = _curve(table, "cropr_r")
    assert cropr["gflops"].iloc[0] == pytest.approx(cropr["unreduced_gflops"].iloc[0], rel=1e-9)
    assert np.all(np.diff(cropr["gflops"]) < 0) and np.all(np.diff(cropr["halted_fraction"]) > 0)


@pytest.mark.slow
def test_thresholds_move_the_budget_the_right_way(swept):
    _, table, _ = swept
    p0 = _curve(table, "early_exit_p0")
    assert np.all(np.diff(p0["halted_fraction"]) <= 1e-12)  # a higher p0 never halts more
    assert p0["halted_fraction"].iloc[0] > 0 and p0["halted_fraction"].iloc[-1] == 0  # p0 0 halts, 1 never
    assert p0["gflops"].iloc[0] < p0["gflops"].iloc[-1]
    tau = _curve(table, "dcts_tau")
    assert np.all(np.diff(tau["token_reduction"]) <= 1e-12)  # a higher tau accepts fewer superpatches
    assert tau["token_reduction"].iloc[0] > 1


@pytest.mark.slow
def test_the_trained_value_reproduces_the_cells_metrics(swept):
    protocol_dir, table, _ = swept
    for sweep, cell in (("dcts_tau", "dcts_t50"), ("early_exit_p0", "early_exit_p90"), ("cropr_r", "cropr_r8")):
        row = table[(table["sweep"] == sweep) & table["at_trained_value"]]
        assert len(row) == 1, sweep
        m = _metrics(protocol_dir, cell)
        assert row["miou_pct"].item() == pytest.approx(100 * m["miou"], abs=1e-6), sweep
        assert row["gflops"].item() == pytest.approx(m["gflops"], rel=1e-9), sweep


@pytest.mark.slow
def test_rerun_resumes_row_by_row(swept, monkeypatch):
    import tokred.jobs.run as run_mod

    protocol_dir, table, folder = swept
    calls = []
    real = run_mod._evaluate_and_measure
    monkeypatch.setattr(run_mod, "_evaluate_and_measure", lambda *a, **k: calls.append(1) or real(*a, **k))
    again, folder2 = run_sweeps(protocol_dir, values=VALUES, progress=False)
    assert folder2 == folder and calls == []
    cols = ["sweep", "cell", "value", "miou_pct", "gflops", "halted_fraction"]
    pd.testing.assert_frame_equal(again[cols], table[cols])
    more, _ = run_sweeps(protocol_dir, values={**VALUES, "tome_r": [0, 4, 8, 16]}, only=["tome_r"], progress=False)
    assert len(calls) == 1 and sorted(more["value"]) == [0, 4, 8, 16]
    assert len(pd.read_csv(folder / "sweeps.csv")) == sum(map(len, VALUES.values())) + 1


@pytest.mark.slow
def test_changed_checkpoint_goes_to_a_new_folder(swept, tmp_path):
    import torch

    protocol_dir, _, _ = swept
    copy = tmp_path / "tiny"
    shutil.copytree(protocol_dir, copy)
    ckpt = copy / "runs" / "none_seed0" / "last.pth"
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    state["model"] = {k: v + 0.01 if v.is_floating_point() else v for k, v in state["model"].items()}
    torch.save(state, ckpt)
    before = (copy / "sweeps" / "sweeps.csv").read_bytes()
    table, folder = run_sweeps(copy, values={"tome_r": [0]}, only=["tome_r"], progress=False)
    assert folder == copy / "sweeps-2" and len(table) == 1
    assert (copy / "sweeps" / "sweeps.csv").read_bytes() == before


def test_bad_sweep_names_values_and_overrides(tmp_path):
    (tmp_path / "runs").mkdir()
    with pytest.raises(ConfigError, match=r"unknown sweep 'nope'.*tome_r"):
        run_sweeps(tmp_path, only=["nope"])
    with pytest.raises(ConfigError, match="unknown sweep 'tome'"):
        run_sweeps(tmp_path, values={"tome": [0]})
    with pytest.raises(ConfigError, match="whole number"):
        run_sweeps(tmp_path, values={"tome_r": [1.5]}, only=["tome_r"])
    with pytest.raises(ConfigError, match=r"\[0, 1\]"):
        run_sweeps(tmp_path, values={"early_exit_p0": [1.5]}, only=["early_exit_p0"])
    with pytest.raises(ConfigError, match="model=vit_tiny"):
        run_sweeps(tmp_path, overrides=["model=vit_tiny"])
    with pytest.raises(PreflightError, match=r"tome_r needs a finished run of none or baseline.*a cropr cell"):
        run_sweeps(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["runs"]  # nothing written


@pytest.mark.slow
def test_a_cell_of_another_method_is_refused(swept):
    protocol_dir, _, _ = swept
    with pytest.raises(ConfigError, match="dcts_t50: that cell runs dcts.*pruner=cropr"):
        run_sweeps(protocol_dir, only=["cropr_r"], cells={"cropr_r": "dcts_t50"})


@pytest.mark.slow
def test_missing_cells_are_skipped_and_none_finished_is_an_error(swept, caplog):
    protocol_dir, _, _ = swept
    with pytest.raises(PreflightError, match="cropr_r needs a finished run of ghost"):
        run_sweeps(protocol_dir, only=["cropr_r"], cells={"cropr_r": "ghost"})
    with caplog.at_level(logging.INFO, logger="tokred.ablations.sweeps"):
        table, _ = run_sweeps(protocol_dir, values={"tome_r": [0]}, only=["tome_r", "cropr_r"],
                              cells={"cropr_r": "ghost"}, progress=False)
    assert set(table["sweep"]) == {"tome_r"}
    assert any("cropr_r skipped" in r.getMessage() and "ghost" in r.getMessage() for r in caplog.records)


@pytest.mark.slow
def test_cli_sweep(swept, tokred_cli):
    protocol_dir, _, folder = swept
    common = ["grid=smoke", f"grid.root={protocol_dir.parent}", "grid.protocol=tiny"]
    res = tokred_cli("sweep", *common, "sweep.only=[tome_r]", "sweep.values.tome_r=[0,12]", "device=cpu",
                     "eval.max_items=1")
    assert res.returncode == 0, res.stderr[-3000:]
    assert str(folder / "sweeps.csv") in res.stdout
    csv = pd.read_csv(folder / "sweeps.csv")
    one = csv[(csv["sweep"] == "tome_r") & (csv["num_images"] == 1)]
    assert sorted(one["value"]) == [0, 12]  # eval.max_items reached the run's configuration: new rows
    bad = tokred_cli("sweep", *common, "sweep.only=[nope]")
    assert bad.returncode == 2 and "unknown sweep 'nope'" in bad.stderr
    assert tokred_cli("sweep", *common, "+sweep.values.nope=[1]").returncode == 2
    nogrid = tokred_cli("sweep")
    assert nogrid.returncode == 2 and "needs the grid" in nogrid.stderr
    assert os.path.isfile(folder / "pareto_sweeps.png")


# ---------------------------------------------------------------------------------- the plot over seeds (fast)
def _row(seed: int, value: float, miou: float, gflops: float, trained: bool, max_items: object = "") -> dict:
    return {"sweep": "tome_r", "cell": "none", "seed": seed, "parameter": "r", "value": value, "miou_pct": miou,
            "gflops": gflops, "at_trained_value": trained, "checkpoint_sha256": f"sha{seed}", "eval_split": "test",
            "eval_max_items": max_items, "eval_mode": "whole", "flops_images": 8}


def test_the_plot_keeps_seeds_of_earlier_calls_and_drops_other_evaluations(tmp_path):
    from tokred.ablations.sweep_plots import plot_rows
    from tokred.ablations.sweeps import _key

    rows = pd.DataFrame([_row(0, 0, 40.0, 2.0, True), _row(0, 8, 39.0, 1.5, False),
                         _row(1, 0, 42.0, 2.0, True), _row(1, 8, 40.0, 1.5, False),
                         _row(1, 8, 10.0, 1.5, False, max_items=8)])  # a smoke run on 8 images
    path = tmp_path / "sweeps.csv"
    rows.to_csv(path, index=False)
    rows = pd.read_csv(path)  # as run_sweeps reads them back
    wanted = {_key(r) for r in rows.to_dict("records") if r["seed"] == 1 and pd.isna(r["eval_max_items"])}
    drawn = plot_rows(rows, wanted)
    assert sorted(zip(drawn["seed"], drawn["value"])) == [(0, 0), (0, 8), (1, 0), (1, 8)]  # seed 0 stays
    assert 10.0 not in set(drawn["miou_pct"])  # the 8-image evaluation is not mixed in
    smoke = plot_rows(rows, {_key(rows.to_dict("records")[-1])})
    assert list(smoke["miou_pct"]) == [10.0]


def test_the_curve_is_the_median_over_seeds(tmp_path):
    from tokred.ablations.sweep_plots import median_curve, plot_sweeps

    rows = pd.DataFrame([_row(0, 0, 40.0, 2.0, True), _row(0, 8, 39.0, 1.5, False), _row(0, 16, 30.0, 1.0, False),
                         _row(1, 0, 42.0, 2.0, True), _row(1, 8, 40.0, 1.5, False),
                         _row(2, 0, 47.0, 2.0, True), _row(2, 8, 38.0, 1.5, False), _row(2, 16, 34.0, 1.0, False)])
    rows["at_trained_value"] = rows["at_trained_value"].astype(str)  # "True" / "False" as in a CSV read as text
    med = median_curve(rows)
    assert list(med["value"]) == [16, 8, 0]  # GFLOPs order
    np.testing.assert_allclose(med["miou_pct"], [32.0, 39.0, 42.0])
    assert list(med["seeds"]) == [2, 3, 3] and list(med["at_trained_value"]) == [False, False, True]
    out = plot_sweeps(rows, pd.DataFrame(), tmp_path / "pareto_sweeps.png", title="t")
    assert out.stat().st_size > 10_000
