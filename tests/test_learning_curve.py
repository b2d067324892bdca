"""The learning curve (issue 13): ``train.val_every`` evaluates the model on a validation split during training
and logs ``val_miou`` in train_log.csv; the grid draws it (``learning_curves.png``)."""

import math

import pandas as pd
import pytest
import torch

from tokred.ablations.plots import plot_learning_curves
from tokred.engine import build_optimizer, build_scheduler
from tokred.engine.train import train
from tokred.models.segmenter import build_segmenter


def _loader():
    g = torch.Generator().manual_seed(0)
    items = [(torch.randn(3, 32, 48, generator=g), (torch.arange(48) >= 24).long().expand(32, 48).clone())
             for _ in range(4)]
    return torch.utils.data.DataLoader(items, batch_size=2)


def test_epoch_end_runs_in_eval_mode_without_grad_and_fills_the_log(tmp_path):
    torch.manual_seed(0)
    seg = build_segmenter("test_vit", 2, (32, 48))
    opt = build_optimizer(seg, "adamw", lr=1e-3)
    seen = []

    def epoch_end(epoch):
        seen.append((epoch, seg.training, torch.is_grad_enabled()))
        return {"val_miou": 0.1 * epoch if epoch % 2 == 0 else float("nan")}

    train(seg, _loader(), opt, build_scheduler(opt, 6), torch.device("cpu"), epochs=3, run_dir=tmp_path,
          progress=False, epoch_end=epoch_end)
    assert seen == [(1, False, False), (2, False, False), (3, False, False)]
    assert seg.training  # back in train mode after the callback
    log = pd.read_csv(tmp_path / "train_log.csv")
    assert list(log.columns[-1:]) == ["val_miou"] and len(log) == 3
    assert math.isnan(log["val_miou"][0]) and log["val_miou"][1] == pytest.approx(0.2)


def test_run_logs_validation_miou_every_k_epochs_and_the_last(tmp_path, tokred_cli):
    # the sample: 16 train images, batch 2 -> 8 steps an epoch; max_iters 20 ends in epoch 3 of 5
    res = tokred_cli("run", "experiment=smoke", f"output_dir={tmp_path}", "run_name=curve", "eval.bench=false",
                     "train.epochs=5", "train.max_iters=20", "train.val_every=2", "train.val_split=train")
    assert res.returncode == 0, res.stderr[-3000:]
    log = pd.read_csv(tmp_path / "curve" / "train_log.csv")
    assert log["epoch"].tolist() == [1, 2, 3]
    measured = log["val_miou"].notna().tolist()
    assert measured == [False, True, True]  # epoch 2 (every 2) and epoch 3 (the last one run)
    assert ((log["val_miou"].dropna() >= 0) & (log["val_miou"].dropna() <= 1)).all()


def test_curve_on_the_eval_split_is_refused(tmp_path, tokred_cli):
    res = tokred_cli("run", "experiment=smoke", f"output_dir={tmp_path}", "train.val_every=1",
                     "train.val_split=val")  # the sample's eval split
    assert res.returncode != 0
    assert "train.val_split=val is also eval.split" in res.stderr + res.stdout


def test_learning_curves_plot_draws_baseline_and_shifted_finetune(tmp_path):
    runs = tmp_path / "runs"
    for cell, epochs, v0 in (("baseline", 4, 0.1), ("none", 2, 0.4)):
        d = runs / f"{cell}_seed0"
        d.mkdir(parents=True)
        pd.DataFrame({"epoch": range(1, epochs + 1), "iteration": range(epochs), "lr": 0.0,
                      "loss": [1.0 / e for e in range(1, epochs + 1)],
                      "val_miou": [v0 + 0.05 * e for e in range(epochs)]}).to_csv(d / "train_log.csv", index=False)
    out = plot_learning_curves(runs, tmp_path / "curves.png", baseline_epochs=4, title="t")
    assert out == tmp_path / "curves.png" and out.stat().st_size > 1000
    (runs / "none_seed0" / "train_log.csv").unlink()
    (runs / "baseline_seed0" / "train_log.csv").write_text("epoch,iteration,lr,loss\n1,1,0.0,1.0\n")
    assert plot_learning_curves(runs, tmp_path / "none.png") is None  # no val_miou logged: nothing drawn
    assert not (tmp_path / "none.png").exists()
