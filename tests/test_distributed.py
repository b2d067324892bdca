"""Real scale-out on CPU (issue 15): ``torchrun --nproc_per_node=2`` over gloo against one process."""

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
COMMON = ["experiment=smoke", "train.max_iters=null", "train.epochs=3", "eval.bench=false", "seed=1",
          "run_name=r", "device=cpu", "dataset.crop_size=[64,80]", "dataset.base_size=[64,80]"]


def _losses(run: Path) -> list[float]:
    with open(run / "train_log.csv") as f:
        return [float(row["loss"]) for row in csv.DictReader(f)]


@pytest.mark.skipif(sys.platform == "win32", reason="torchrun with gloo on POSIX")
def test_torchrun_two_ranks_match_one_process_and_resume(tmp_path, wait_for_epoch):
    """2 ranks x batch 2 against 1 process x batch 4: the same loss curve; SIGTERM to torchrun stops both
    ranks at one step with a checkpoint, and ``resume=true`` under torchrun finishes the run."""
    one = subprocess.Popen([sys.executable, "-m", "tokred", "run", *COMMON, "train.batch_size=4",
                            f"output_dir={tmp_path / 'one'}"], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                "-m", "tokred", "run", *COMMON, "train.batch_size=2", f"output_dir={tmp_path / 'two'}"]
    two = subprocess.Popen(torchrun, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run = tmp_path / "two" / "r"
    wait_for_epoch(run, two, 1)
    two.send_signal(signal.SIGTERM)
    _, err = two.communicate(timeout=300)
    assert two.returncode != 0 and "stopped by SIGTERM" in err, err[-3000:]
    assert "resume with:" in err and "torchrun --nproc_per_node=2" in err
    assert not (run / "metrics.json").exists()
    again = subprocess.run([*torchrun, "resume=true"], cwd=ROOT, env=ENV, capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    _, err_one = one.communicate(timeout=600)
    assert one.returncode == 0, err_one[-3000:]
    curve_one, curve_two = _losses(tmp_path / "one" / "r"), _losses(run)
    print("loss per epoch, 1 process x batch 4:", curve_one, "\n2 ranks x batch 2 (SIGTERM, resumed):", curve_two)
    assert len(curve_one) == len(curve_two) == 3
    assert curve_two == pytest.approx(curve_one, rel=1e-4, abs=1e-5)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    # only rank 0 writes: one run folder, no second copy
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["r"]
