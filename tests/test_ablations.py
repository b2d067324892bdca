"""Ablation grids: validation before training, the smoke grid end to end, skip on rerun, aggregation."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tokred.ablations import BASELINE_CELL, Cell, Grid, load_grid, pareto_front, run_grid, summarize, write_summary


def _smoke(root: Path, cells: tuple[str, ...] = ("none", "tome_r8"), **changes) -> Grid:
    grid = load_grid("smoke")
    keep = tuple(c for c in grid.cells if c.name in cells)
    return dataclasses.replace(grid, root=root, cells=keep, **changes)


class _InProcessLaunches:
    """Stands in for ``subprocess`` in ``tokred.ablations.runner``: the grid's ``python -m tokred run -m ...``
    commands (checked to be exactly that) go through ``tokred.__main__.main`` in this process, the same Hydra
    multiruns and exit codes without a fresh interpreter's torch/timm import per stage; anything else is passed
    to the real ``subprocess``."""

    def __init__(self, run_tokred) -> None:
        self._run_tokred, self.launched = run_tokred, []

    def __getattr__(self, name):
        return getattr(subprocess, name)

    def run(self, argv, *args, env=None, cwd=None, **kwargs):
        argv = [str(a) for a in argv]
        if argv[:3] != [sys.executable, "-m", "tokred"] or args or set(kwargs) - {"check", "timeout"}:
            return subprocess.run(argv, *args, env=env, cwd=cwd, **kwargs)  # not a plain tokred launch
        self.launched.append(argv[3:])
        with pytest.MonkeyPatch.context() as mp:  # the child's environment, for the in-process call
            for k in set(os.environ) - set(env or os.environ):
                mp.delenv(k)
            for k, v in (env or {}).items():
                mp.setenv(k, v)
            res = self._run_tokred(*argv[3:], cwd=Path.cwd() if cwd is None else Path(cwd))
        sys.stderr.write(res.stderr[-3000:])  # shown by pytest if the grid fails
        if kwargs.get("check") and res.returncode != 0:
            raise subprocess.CalledProcessError(res.returncode, argv, res.stdout, res.stderr)
        return subprocess.CompletedProcess(argv, res.returncode, res.stdout, res.stderr)


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tokred_cli):
    """The smoke grid (baseline + none + tome_r8) run once, end to end, through the multiruns (run in this
    process: ``_InProcessLaunches``; tests/test_cli.py runs the command in a real process)."""
    import tokred.ablations.runner as runner

    root = tmp_path_factory.mktemp("ablations")
    grid = _smoke(root)
    launches = _InProcessLaunches(tokred_cli)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(runner, "subprocess", launches)
        table = run_grid(grid)
    return grid, table


@pytest.mark.slow
def test_smoke_grid_end_to_end(finished):
    grid, table = finished
    d = grid.protocol_dir
    assert list(table["cell"]) == [BASELINE_CELL, "none", "tome_r8"]
    for name in ("summary.csv", "summary.md", "miou_vs_gflops.png", "miou_vs_images_per_second.png",
                 "tokens_per_block.png"):
        assert (d / name).is_file() and (d / name).stat().st_size > 0, name
    csv = pd.read_csv(d / "summary.csv")
    assert list(csv["cell"]) == [BASELINE_CELL, "none", "tome_r8"]
    assert csv.loc[csv["cell"] == "none", "delta_miou_pct"].item() == 0.0
    tome = table.set_index("cell").loc["tome_r8"]
    assert tome["method"] == "tome" and tome["mode"] == "finetune"
    assert tome["tokens_per_block"][-1] < tome["tokens_per_block"][0]  # ToMe merged tokens away
    assert tome["gflops_ratio"] > 1.0
    # fine-tunes start from the baseline checkpoint; the baseline trained from scratch
    ft = json.loads((d / "runs" / "tome_r8_seed0" / "metrics.json").read_text())
    assert ft["init_from"].endswith(f"{BASELINE_CELL}_seed0/last.pth")
    assert ft["train"]["epochs"] == grid.finetune_epochs
    assert "init_from" not in json.loads((d / "runs" / f"{BASELINE_CELL}_seed0" / "metrics.json").read_text())
    proto = json.loads((d / "protocol.json").read_text())
    assert proto["identity"]["protocol"] == grid.protocol
    assert proto["invocations"][-1]["wall_seconds"] > 0 and proto["total_wall_seconds"] > 0
    md = (d / "summary.md").read_text()
    assert "Hardware:" in md and "Wall time:" in md and "tome_r8" in md


@pytest.mark.slow
def test_rerun_skips_finished_runs(finished):
    grid, _ = finished
    metrics = grid.protocol_dir / "runs" / "tome_r8_seed0" / "metrics.json"
    before = metrics.stat().st_mtime_ns
    run_grid(grid)
    assert metrics.stat().st_mtime_ns == before
    proto = json.loads((grid.protocol_dir / "protocol.json").read_text())
    assert proto["invocations"][-1]["launched"] == []  # nothing was started
    assert sorted(p.name for p in (grid.protocol_dir / "runs").iterdir()) == [
        f"{BASELINE_CELL}_seed0", "none_seed0", "tome_r8_seed0"]


@pytest.mark.slow
def test_optional_cell_with_missing_reducer_is_skipped(finished, caplog):
    grid, _ = finished
    extra = Cell("ghost", ("pruner.name=not_installed_reducer",), optional=True)
    with caplog.at_level(logging.WARNING, logger="tokred.ablations"):
        table = run_grid(dataclasses.replace(grid, cells=(*grid.cells, extra)))
    assert "ghost" not in set(table["cell"])
    assert any("ghost" in r.getMessage() and "not_installed_reducer" in r.getMessage() for r in caplog.records)


@pytest.mark.slow
def test_protocol_mismatch_is_refused(finished):
    grid, _ = finished
    with pytest.raises(ValueError, match="another protocol"):
        run_grid(dataclasses.replace(grid, overrides=(*grid.overrides, "train.lr=1.0e-3")))
    with pytest.raises(ValueError, match="another protocol"):
        run_grid(grid, extra_overrides=["train.max_iters=3"])
    changed = tuple(dataclasses.replace(c, overrides=("merger=tome", "merger.r=4")) if c.name == "tome_r8" else c
                    for c in grid.cells)
    with pytest.raises(ValueError, match="new name"):
        run_grid(dataclasses.replace(grid, cells=changed))


@pytest.mark.slow
def test_cli_ablate_reuses_finished_grid(finished, monkeypatch):
    from tokred.__main__ import main

    monkeypatch.setattr(sys, "argv", list(sys.argv))  # main() rewrites argv for Hydra
    grid, _ = finished
    csv = grid.protocol_dir / "summary.csv"
    csv.unlink()
    assert main(["ablate", "grid=smoke", f"grid.root={grid.root}", "~grid.cells.early_exit_p90",
                 "~grid.cells.random_prune_r8"]) == 0
    assert list(pd.read_csv(csv)["cell"]) == [BASELINE_CELL, "none", "tome_r8"]
    proto = json.loads((grid.protocol_dir / "protocol.json").read_text())
    assert proto["invocations"][-1]["command"].startswith("python -m tokred ablate grid=smoke")
    assert proto["invocations"][-1]["launched"] == []


def test_unknown_reducer_fails_before_training(tmp_path):
    grid = _smoke(tmp_path, cells=("none",))
    bad = Cell("bogus", ("merger.name=no_such_reducer",))
    with pytest.raises(ValueError, match="unknown reducer no_such_reducer"):
        run_grid(dataclasses.replace(grid, cells=(*grid.cells, bad)))
    assert not grid.protocol_dir.exists()  # no protocol.json, no run directory


def test_missing_data_root_fails_before_training(tmp_path):
    grid = _smoke(tmp_path, cells=("none",))
    grid = dataclasses.replace(grid, overrides=tuple(o for o in grid.overrides if not o.startswith("dataset="))
                               + ("dataset=camvid",), execution=(*grid.execution, f"dataset.root={tmp_path}/nowhere"))
    with pytest.raises(ValueError, match="does not exist"):
        run_grid(grid)
    assert not grid.protocol_dir.exists()


def test_reserved_and_clashing_overrides_are_refused(tmp_path):
    grid = _smoke(tmp_path, cells=("none",))
    with pytest.raises(ValueError, match="grid.finetune_epochs"):
        run_grid(grid, extra_overrides=["train.epochs=5"])
    clash = Cell("crop", ("merger=tome", "dataset.crop_size=[128,128]"))
    with pytest.raises(ValueError, match="protocol sets"):
        run_grid(dataclasses.replace(grid, cells=(*grid.cells, clash)))
    assert not grid.protocol_dir.exists()


def test_grid_spec_errors():
    base = {"protocol": "p", "overrides": [], "cells": {"none": {"overrides": []}}}
    assert Grid.from_mapping(base).reference == "none"
    with pytest.raises(ValueError, match="reserved"):
        Grid.from_mapping({**base, "cells": {"none": {}, BASELINE_CELL: {}}})
    with pytest.raises(ValueError, match="mode"):
        Grid.from_mapping({**base, "cells": {"none": {}, "x": {"mode": "train"}}})
    with pytest.raises(ValueError, match="reference"):
        Grid.from_mapping({**base, "cells": {"tome": {"overrides": ["merger=tome"]}}})
    with pytest.raises(ValueError, match="cell name"):
        Grid.from_mapping({**base, "cells": {"none": {}, "a,b": {}}})
    for name in ("camvid_cpu", "camvid_gpu", "smoke"):
        grid = load_grid(name)
        assert grid.reference in {c.name for c in grid.cells}


# ---------------------------------------------------------------------------------------------- aggregation
def _fake_run(runs: Path, name: str, seed: int, miou: float, gflops: float, ims: float, method: str,
              tokens: list[float]) -> None:
    d = runs / f"{name}_seed{seed}"
    d.mkdir(parents=True)
    metrics = {"miou": miou, "gflops": gflops, "gflops_ratio": 10.0 / gflops, "images_per_second": ims,
               "speedup": ims / 10.0, "efficiency": 1.0, "token_reduction": 1.0, "halted_fraction": 0.0,
               "device": "Test CPU", "precision": "fp32", "batch_size": 2, "seed": seed, "method": method,
               "tokens_per_block": tokens, "train_seconds": 1.5}
    (d / "metrics.json").write_text(json.dumps(metrics))


def test_summarize_hand_made_runs(tmp_path):
    runs = tmp_path / "runs"
    flat = [100.0, 100.0, 100.0]
    _fake_run(runs, BASELINE_CELL, 0, 0.40, 10.0, 10.0, "none", flat)
    _fake_run(runs, "none", 0, 0.50, 10.0, 10.0, "none", flat)
    _fake_run(runs, "none", 1, 0.52, 10.0, 12.0, "none", flat)
    _fake_run(runs, "fast", 0, 0.45, 5.0, 20.0, "tome", [100.0, 80.0, 60.0])        # cheaper, worse: on the fronts
    _fake_run(runs, "dominated", 0, 0.44, 6.0, 15.0, "cropr", [100.0, 90.0, 70.0])  # worse and costlier than fast
    _fake_run(runs, "offshelf", 0, 0.60, 4.0, 30.0, "tome", [100.0, 50.0, 25.0])
    (tmp_path / "protocol.json").write_text(json.dumps({
        "reference": "none", "cell_order": ["none", "fast", "dominated", "offshelf"],
        "cells": {"none": {"mode": "finetune", "budget": "unreduced"}, "fast": {"mode": "finetune", "budget": "r=8"},
                  "dominated": {"mode": "finetune"}, "offshelf": {"mode": "off_the_shelf"}}}))
    table = summarize(tmp_path).set_index("cell")
    assert list(table.index) == [BASELINE_CELL, "none", "fast", "dominated", "offshelf"]
    np.testing.assert_allclose(table.loc["none", "miou_pct"], 51.0)  # median of 50 and 52
    np.testing.assert_allclose(table.loc["none", "miou_spread_pct"], 2.0)
    assert table.loc["none", "seeds"] == "0,1" and table.loc["none", "num_seeds"] == 2
    np.testing.assert_allclose(table.loc["none", "images_per_second"], 11.0)
    np.testing.assert_allclose(table.loc["fast", "delta_miou_pct"], -6.0)
    np.testing.assert_allclose(table.loc[BASELINE_CELL, "delta_miou_pct"], -11.0)
    np.testing.assert_allclose(table.loc["offshelf", "delta_miou_pct"], 9.0)
    assert table.loc["fast", "budget"] == "r=8"
    # fronts over finetune cells only: the off-the-shelf and baseline rows never sit on them
    assert table["pareto_gflops"].to_dict() == {BASELINE_CELL: False, "none": True, "fast": True,
                                                "dominated": False, "offshelf": False}
    assert table["pareto_images_per_second"].to_dict() == table["pareto_gflops"].to_dict()
    paths = write_summary(summarize(tmp_path), tmp_path)
    for p in paths.values():
        assert p.is_file() and p.stat().st_size > 0
    assert "+9.00" in (tmp_path / "summary.md").read_text()


def test_summarize_keeps_latest_duplicate_and_works_without_protocol(tmp_path):
    runs = tmp_path / "runs"
    _fake_run(runs, "none", 0, 0.30, 10.0, 10.0, "none", [4.0])
    d = runs / "none_seed0-2"  # a second finished run of the same cell and seed
    d.mkdir()
    (d / "metrics.json").write_text((runs / "none_seed0" / "metrics.json").read_text().replace("0.3,", "0.5,"))
    table = summarize(tmp_path)
    assert list(table["cell"]) == ["none"]
    np.testing.assert_allclose(table["miou_pct"].item(), 50.0)


def test_pareto_front():
    cost = [1.0, 2.0, 3.0, 2.0, np.nan]
    quality = [0.1, 0.5, 0.4, 0.5, 0.9]
    assert pareto_front(cost, quality).tolist() == [True, True, False, True, False]
    assert pareto_front(cost, quality, lower_cost_is_better=False).tolist() == [False, True, True, True, False]


def test_recorded_name_form_selects_the_reducer_schema(tmp_path):
    """Cells recorded as ``pruner.name=X +pruner.r=16`` (older grids) select X like ``pruner=X``, so X's
    schema types ``r`` (none's schema would refuse it when the generated experiment file is composed)."""
    from hydra import compose, initialize_config_dir

    from tokred.ablations.grid import write_cell_configs
    from tokred.config import config_dir
    from tokred.structured import reducer_kwargs

    grid = Grid.from_mapping({"protocol": "p", "overrides": ["model=test_vit"], "reference": "old", "cells": {
        "old": {"overrides": ["pruner.name=cropr", "+pruner.r=3"], "mode": "finetune", "budget": "r=3"}}})
    cell = next(c for c in grid.cells if c.name == "old")
    write_cell_configs(tmp_path, grid, [cell], tmp_path / "runs")
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"hydra.searchpath=[file://{tmp_path}]",
                                                       "experiment=ablation/old"])
    assert reducer_kwargs(cfg)["pruner"][0] == "cropr" and reducer_kwargs(cfg)["pruner"][1]["r"] == 3
