"""results/scripts/gpu_grid.sh --dry-run: the prepared GPU check runs end to end on CPU with tiny settings.

The dry run composes and runs the same command lines as the GPU run (one ``tokred ablate`` per cell of
configs/grid/camvid_gpu_quick.yaml, ``tokred bench`` at bf16 for each method, the summary and the tables), so a
broken override or a renamed key fails here, before any GPU time is spent. One interpreter start per stage
(seconds each), hence ``slow`` and a reduced set of cells and benchmarks (the full dry run: ``bash
results/scripts/gpu_grid.sh --dry-run``, about 3 minutes on 2 cores).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "results" / "scripts" / "gpu_grid.sh"


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("TOKRED_GPU_DRY_RUN"),
                    reason="about 2 minutes: run before spending GPU time, `nox -s gpu_dry_run` or "
                           "TOKRED_GPU_DRY_RUN=1 pytest tests/test_gpu_script.py")
@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                    reason="gpu_grid.sh needs bash and coreutils' timeout")
def test_gpu_grid_dry_run(tmp_path: Path) -> None:
    results, out = tmp_path / "results", tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable, "RESULTS_DIR": str(results), "OUT": str(out),
           "CELLS": "none dcts_t50", "BENCH_METHODS": "dcts", "OMP_NUM_THREADS": "1",
           "WHEEL_DIR": str(tmp_path / "no-wheels")}  # the test environment has the packages already
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]

    stages = (results / "stages.tsv").read_text().splitlines()
    assert [s.split("\t")[:2] for s in stages[1:]] == [
        ["baseline_and_none", "0"], ["cell_dcts_t50", "0"], ["summary", "0"], ["bench_dcts", "0"]]

    proto = results / "ablations" / "camvid_vit-small_768x1024_quick"
    for run in ("baseline_seed0", "none_seed0", "dcts_t50_seed0"):
        assert (proto / "runs" / run / "metrics.json").is_file(), run
    assert list((proto / "policy").glob("*.safetensors")), "the dCTS cell trained its policy network"
    summary = (results / "summary.md").read_text()
    assert "dcts_t50" in summary and "none" in summary

    for method in ("dcts",):
        m = json.loads((results / "bench" / method / "metrics.json").read_text())
        reduced = m["throughput_detail"]["reduced"]
        assert reduced["device"] == "cpu" and reduced["device_name"], reduced
        assert reduced["precision"] == "bf16" and reduced["batch_size"] == 2
    bench_md = (results / "bench.md").read_text()
    assert m["throughput_detail"]["reduced"]["device_name"] in bench_md
    assert "dcts_t50_seed0" in bench_md  # the dCTS row timed the fine-tuned cell's checkpoint
    assert "bf16" in (results / "bench.csv").read_text()

    # what comes back from the device machine: at most 8 files, no checkpoints in the archive
    sent = sorted(p.name for p in out.iterdir())
    assert sent == sorted(["gpu_grid.log", "stages.tsv", "env.txt", "summary.md", "summary.csv", "bench.md",
                           "bench.csv", "results.tar.gz"])
    with tarfile.open(out / "results.tar.gz") as tar:
        names = tar.getnames()
    assert any(n.endswith("dcts_t50_seed0/metrics.json") for n in names)
    assert not any(n.endswith((".pth", ".safetensors")) for n in names)
