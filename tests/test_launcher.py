"""A Hydra sweep through a real launcher plugin (hydra-joblib-launcher, local worker processes) gives the same
runs as Hydra's basic launcher: the launcher decides where a job runs, never what it computes.

The SLURM launcher (hydra-submitit-launcher, ``uv sync --extra cluster``) takes the same sweep with
``hydra/launcher=submitit_slurm``; README "Sweeps, clusters and several GPUs" documents it.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # not even the hydra_plugins namespace
        return False


pytestmark = pytest.mark.skipif(
    not _installed("hydra_plugins.hydra_joblib_launcher"),
    reason="hydra-joblib-launcher is not installed (it is in the dev group: uv sync, or pip install tokred[dev])")

SEEDS = (0, 1)
# The smallest end-to-end run that still trains: timm's test_vit on 64x64 crops (4x4 patches), one training
# step, two eval images, no GFLOPs count and no im/s timing (those are measured, not launcher-dependent).
TINY = ("experiment=smoke", "train.max_iters=1", "dataset.crop_size=[64,64]", "dataset.base_size=[64,64]",
        "eval.max_items=2", "eval.flops_images=0", "eval.bench=false")


def _sweep(out: Path, *launcher: str) -> subprocess.Popen:
    """Starts ``python -m tokred run -m seed=0,1 ...`` writing runs to ``out/runs/seed<k>``."""
    args = [sys.executable, "-m", "tokred", "run", "-m", f"seed={','.join(map(str, SEEDS))}", *TINY,
            f"output_dir={out / 'runs'}", "run_name=seed${seed}", f"hydra.sweep.dir={out / 'multirun'}", *launcher]
    return subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "TQDM_DISABLE": "1"})


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory):
    """The same two-seed sweep through the basic launcher and through joblib (2 worker processes), run at
    the same time (each spends most of its time importing torch, one core each)."""
    outs = {"basic": tmp_path_factory.mktemp("basic"), "joblib": tmp_path_factory.mktemp("joblib")}
    procs = {"basic": _sweep(outs["basic"]),
             "joblib": _sweep(outs["joblib"], "hydra/launcher=joblib", "hydra.launcher.n_jobs=2")}
    for name, proc in procs.items():
        log, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"{name} sweep failed:\n{log[-3000:]}"
        procs[name] = log
    return outs, procs


@pytest.mark.slow
def test_joblib_sweep_matches_basic_launcher(sweeps):
    outs, logs = sweeps
    assert "Joblib.Parallel(n_jobs=2" in logs["joblib"]  # the plugin really launched the jobs
    metrics = {}
    for name, out in outs.items():
        # one run directory per seed, named by run_name=seed${seed}: no -2 from two jobs racing for a name
        assert sorted(p.name for p in (out / "runs").iterdir()) == [f"seed{s}" for s in SEEDS], name
        for s in SEEDS:
            metrics[name, s] = json.loads((out / "runs" / f"seed{s}" / "metrics.json").read_text())
            assert metrics[name, s]["seed"] == s
    for s in SEEDS:
        basic, joblib = metrics["basic", s], metrics["joblib", s]
        assert joblib["miou"] == basic["miou"], s
        assert joblib["per_class_iou"] == basic["per_class_iou"], s
        assert joblib["final_losses"] == basic["final_losses"], s
    assert metrics["basic", 0]["miou"] != metrics["basic", 1]["miou"]  # the seed matters, so the test can fail
