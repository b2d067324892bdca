"""The training stage of ``python -m tokred run``: data order, optimizer, schedule, exact resume, DDP wrapper."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from tokred.config import build_datasets, make_loader
from tokred.engine.checkpoint import load_checkpoint
from tokred.engine.distributed import is_main_process, rank, world_size
from tokred.engine.sampler import ResumableSampler, SeededDataset
from tokred.models.checkpoints import load_state_dict_checked
from tokred.models.segmenter import Segmenter

__all__ = ["train_stage"]

log = logging.getLogger("tokred")


def train_stage(cfg: DictConfig, model: Segmenter, device: torch.device, run_dir: Path) -> dict[str, Any]:
    """Trains ``model`` as ``cfg.train`` says (resuming ``run_dir/last.pth`` when ``resume=true``).

    The order of the training images and their augmentation come from ``(seed, epoch)`` only
    (:class:`~tokred.engine.sampler.ResumableSampler`): under torchrun each rank takes its share of every
    global batch (``train.batch_size`` per rank), so N processes see the batches one process sees with
    N x ``train.batch_size``. After training every reducer's ``progress`` is 1 (the warm-up is over), so
    evaluation, GFLOPs and timing see the trained budget.

    With ``train.val_every=k`` (k > 0) the model is evaluated on ``train.val_split`` after every k-th epoch and
    the last one: the learning curve, ``val_miou`` (fraction, 0..1) per epoch in ``train_log.csv`` (NaN on the
    epochs in between); the time it takes is part of ``train_seconds``.

    Returns:
        ``{"train_seconds", "train_images", "final_losses"}``.

    Raises:
        ValueError: the training set is smaller than one global batch, or the checkpoint does not match.
        TrainingInterrupted: SIGINT/SIGTERM; the checkpoint was written (``tokred.engine.train``).
    """
    from tokred.engine.train import build_optimizer, build_scheduler, train

    ds = build_datasets(cfg, train=True)
    t = cfg.train
    try:
        sampler = ResumableSampler(len(ds), int(t.batch_size), int(cfg.seed), rank(), world_size())
    except ValueError as err:
        raise ValueError(f"train.batch_size={t.batch_size} on {world_size()} process(es): {err}") from None
    loader = make_loader(SeededDataset(ds), int(t.batch_size), True, int(t.num_workers), sampler,
                         generator=torch.Generator().manual_seed(int(cfg.seed)))
    opt = build_optimizer(model, t.optimizer, float(t.lr), float(t.weight_decay), float(t.momentum))
    total = int(t.epochs) * sampler.batches_per_epoch
    if t.max_iters is not None:
        total = min(total, int(t.max_iters))
    sched = build_scheduler(opt, total, int(t.warmup_iters), float(t.poly_power))
    resume = None
    if cfg.resume:
        resume = load_checkpoint(run_dir / "last.pth")
        load_state_dict_checked(model, resume["model"], f"resume=true: checkpoint {run_dir / 'last.pth'}",
                                allowed_missing=())
        opt.load_state_dict(resume["optimizer"])
        sched.load_state_dict(resume["scheduler"])
        log.info("resumed %s at epoch %d, iteration %d", run_dir, int(resume["epoch"]) + 1,
                 int(resume.get("iteration", 0)))
    net: torch.nn.Module = model
    if world_size() > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True)
    t0 = time.perf_counter()
    last_epoch = -(-total // sampler.batches_per_epoch)  # the epoch max_iters ends in
    epoch_end = _validation(cfg, model, device, last_epoch) if int(t.get("val_every") or 0) > 0 else None
    losses = train(net, loader, opt, sched, device, int(t.epochs), run_dir=run_dir if is_main_process() else None,
                   amp=bool(t.amp), grad_clip=t.grad_clip, max_iters=t.max_iters,
                   checkpoint_every=int(t.checkpoint_every),
                   checkpoint_extra={"config": OmegaConf.to_container(cfg, resolve=True)}, sampler=sampler,
                   resume=resume, epoch_end=epoch_end)
    model.set_progress(1.0)
    return {"train_seconds": time.perf_counter() - t0, "train_images": len(ds), "final_losses": losses}


def _validation(cfg: DictConfig, model: Segmenter, device: torch.device, last_epoch: int):
    """``epoch_end`` for :func:`tokred.engine.train.train`: mIoU on ``train.val_split`` every ``train.val_every``
    epochs (and after the last), as the evaluation job infers (``eval.mode``, crop-size images).

    Raises:
        ValueError: ``train.val_split`` is the evaluation split (the curve would select on the test set).
    """
    from tokred.config import inference_settings
    from tokred.engine.evaluate import evaluate

    t = cfg.train
    split = str(t.get("val_split") or "val")
    if split == str(cfg.eval.split):
        raise ValueError(f"train.val_split={split} is also eval.split: the learning curve must not be drawn on "
                         "the split the results are reported on; give another split (e.g. train.val_split=val)")
    every = int(t.val_every)
    ds = build_datasets(cfg, train=False, split=split)
    loader = make_loader(ds, int(cfg.eval.batch_size), False, 0)
    inf = inference_settings(cfg)
    log.info("learning curve: mIoU on %s (%d images) every %d epochs", split, len(ds), every)

    def epoch_end(epoch: int) -> dict[str, float]:
        if epoch % every and epoch != last_epoch:
            return {"val_miou": float("nan")}
        q = evaluate(model, loader, int(cfg.dataset.num_classes), device, int(cfg.dataset.ignore_index),
                     mode=inf.mode, crop=inf.crop, stride=inf.stride, amp=bool(t.amp),
                     batch_size=int(cfg.eval.batch_size), progress=False)
        return {"val_miou": float(q["miou"])}

    return epoch_end
