"""Evaluation metrics, sliding-window inference, optimisers/schedules, atomic checkpoints."""

import math

import pytest
import torch
from torch.testing import assert_close

from tokred import build_segmenter
from tokred.engine import (ConfusionMatrix, build_optimizer, build_scheduler, evaluate, load_checkpoint,
                           save_checkpoint, slide_inference)


def test_confusion_matrix_hand_checked():
    cm = ConfusionMatrix(3, ignore_index=255)
    target = torch.tensor([[0, 0, 1, 1, 2, 255]])
    pred = torch.tensor([[0, 1, 1, 1, 0, 2]])
    cm.update(pred, target)
    s = cm.summary(["a", "b", "c"])
    # class a: tp1 fp1 fn1 -> 1/3 ; b: tp2 fp1 fn0 -> 2/3 ; c: tp0 fp0 fn1 -> 0
    assert s["per_class_iou"]["a"] == pytest.approx(1 / 3)
    assert s["per_class_iou"]["b"] == pytest.approx(2 / 3)
    assert s["per_class_iou"]["c"] == pytest.approx(0.0)
    assert s["miou"] == pytest.approx((1 / 3 + 2 / 3 + 0) / 3)
    assert s["pixel_accuracy"] == pytest.approx(3 / 5)


def test_confusion_matrix_absent_class_is_nan_and_left_out():
    cm = ConfusionMatrix(3)
    cm.update(torch.tensor([[0, 1]]), torch.tensor([[0, 1]]))
    s = cm.summary()
    assert s["per_class_iou"]["2"] is None and s["miou"] == pytest.approx(1.0)


def test_confusion_matrix_rejects_out_of_range_labels():
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match="outside"):
        cm.update(torch.tensor([[0, 1]]), torch.tensor([[0, 7]]))


def test_slide_equals_whole_when_window_covers_image():
    seg = build_segmenter("test_vit", 3, (64, 96)).eval()
    img = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        whole = seg(img).logits
        slide = slide_inference(seg, img, (64, 96), (32, 32), 3)
    assert_close(slide, whole)


def test_slide_covers_larger_image_and_counts_windows():
    seg = build_segmenter("test_vit", 3, (64, 64)).eval()
    img = torch.randn(1, 3, 96, 128)
    states = []
    with torch.no_grad():
        out = slide_inference(seg, img, (64, 64), (32, 32), 3, on_state=states.append)
    assert out.shape == (1, 3, 96, 128) and torch.isfinite(out).all()
    assert len(states) == 2 * 3  # rows 0,32 x cols 0,32,64


def test_evaluate_upsamples_to_label_resolution():
    seg = build_segmenter("test_vit", 3, (64, 96)).eval()
    data = [(torch.randn(2, 3, 64, 96), torch.randint(0, 3, (2, 45, 60)))]
    res = evaluate(seg, data, 3, torch.device("cpu"), progress=False)
    assert res["num_images"] == 2 and 0.0 <= res["miou"] <= 1.0
    with pytest.raises(ValueError, match="mode"):
        evaluate(seg, data, 3, torch.device("cpu"), mode="tiles")


def test_scheduler_warmup_then_poly_to_zero():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = build_optimizer(torch.nn.Linear(1, 1), "sgd", lr=1.0)
    sched = build_scheduler(opt, total_iters=10, warmup_iters=2, power=1.0)
    lrs = []
    for _ in range(10):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs[0] < lrs[1] < lrs[2] and lrs[2] == pytest.approx(1.0)
    assert lrs[-1] < lrs[3] and sched.get_last_lr()[0] == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match="adamw"):
        build_optimizer(torch.nn.Linear(1, 1), "lamb")
    del p


def test_optimizer_excludes_norms_and_biases_from_weight_decay():
    seg = build_segmenter("test_vit", 3, (64, 96))
    opt = build_optimizer(seg, "adamw", weight_decay=0.05)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert any(p is seg.encoder.vit.pos_embed for p in no_decay["params"])
    assert all(p.ndim > 1 for p in decay["params"])


def test_atomic_checkpoint_roundtrip_and_errors(tmp_path):
    path = tmp_path / "sub" / "last.pth"
    save_checkpoint(path, {"model": {"w": torch.ones(2)}, "epoch": 3})
    ck = load_checkpoint(path)
    assert ck["epoch"] == 3 and torch.equal(ck["model"]["w"], torch.ones(2))
    assert [p.name for p in path.parent.iterdir()] == ["last.pth"]  # no temporary left behind
    (tmp_path / "trunc.pth").write_bytes(path.read_bytes()[:20])
    with pytest.raises(ValueError, match="trunc.pth"):
        load_checkpoint(tmp_path / "trunc.pth")
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "nope.pth")
    torch.save({"w": torch.ones(1)}, tmp_path / "plain.pth")
    with pytest.raises(ValueError, match="not a tokred checkpoint"):
        load_checkpoint(tmp_path / "plain.pth")


def test_training_reduces_loss_on_a_fixed_batch():
    from tokred.engine import train

    torch.manual_seed(0)
    seg = build_segmenter("test_vit", 3, (64, 96))
    img = torch.randn(2, 3, 64, 96)
    tgt = torch.zeros(2, 64, 96, dtype=torch.long)
    tgt[:, :, 48:] = 1
    data = [(img, tgt)] * 4
    opt = build_optimizer(seg, "adamw", lr=1e-3)
    sched = build_scheduler(opt, total_iters=40, warmup_iters=0)
    first = train(seg, data, opt, sched, torch.device("cpu"), epochs=1, progress=False)["loss"]
    last = train(seg, data, opt, sched, torch.device("cpu"), epochs=10, start_epoch=9, progress=False)["loss"]
    assert math.isfinite(first) and last < first
