"""Early-exit p0 calibrated after training (pruner.target_accuracy, tokred.jobs.calibrate)."""

import json

import torch

from tokred.jobs.calibrate import pick_threshold


def test_pick_threshold_is_the_lowest_p0_reaching_the_accuracy():
    conf = torch.tensor([0.3, 0.45, 0.55, 0.65, 0.75, 0.85, 0.95, 0.96])
    right = torch.tensor([False, False, True, False, True, True, True, True])
    p0, curve = pick_threshold(conf, right, 0.8, grid=(0.2, 0.4, 0.6, 0.7, 0.9))
    assert p0 == 0.6  # above 0.6: 4 of 5 right (0.8); above 0.4: 5 of 7 (0.71)
    assert [c["p0"] for c in curve] == [0.2, 0.4, 0.6, 0.7, 0.9] and abs(curve[2]["accuracy"] - 0.8) < 1e-6
    assert pick_threshold(conf, right, 1.0, grid=(0.97, 0.99))[0] == 1.0  # no cell above 0.97


def test_run_records_the_calibration_and_uses_it(tmp_path, tokred_cli):
    res = tokred_cli("run", "experiment=smoke", "pruner=early_exit", "pruner.target_accuracy=0.01",
                     "dataset.crop_size=[128,160]", "dataset.base_size=[128,160]", "eval.bench=false",
                     f"output_dir={tmp_path}", "run_name=c")
    assert res.returncode == 0, res.stderr[-3000:]
    m = json.loads((tmp_path / "c" / "metrics.json").read_text())
    cal = m["exit_calibration"]
    assert cal["split"] == "train" and cal["cells"] > 0 and cal["target_accuracy"] == 0.01
    assert m["reducer_config"]["pruner"]["threshold"] == cal["threshold"]
    above = [c for c in cal["curve"] if c["share_above"] > 0]
    assert cal["threshold"] == (above[0]["p0"] if above else 1.0)  # any accuracy >= 1%: the lowest with cells
