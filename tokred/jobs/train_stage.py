"""The training stage of ``python -m tokred run``: data loader, optimizer, schedule, resume, DDP wrapper."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from tokred.config import build_datasets, make_loader
from tokred.engine.checkpoint import load_checkpoint
from tokred.engine.distributed import is_main_process, world_size
from tokred.models.checkpoints import load_state_dict_checked
from tokred.models.segmenter import Segmenter

__all__ = ["train_stage"]

log = logging.getLogger("tokred")


def train_stage(cfg: DictConfig, model: Segmenter, device: torch.device, run_dir: Path) -> dict[str, Any]:
    from tokred.engine.train import build_optimizer, build_scheduler, train

    ds = build_datasets(cfg, train=True)
    sampler = torch.utils.data.distributed.DistributedSampler(ds, shuffle=True) if world_size() > 1 else None
    t = cfg.train
    loader = make_loader(ds, int(t.batch_size), True, int(t.num_workers), sampler)
    if len(loader) == 0:
        raise ValueError(f"train.batch_size={t.batch_size} is larger than the training set ({len(ds)} images); "
                         "lower it")
    opt = build_optimizer(model, t.optimizer, float(t.lr), float(t.weight_decay), float(t.momentum))
    total = int(t.epochs) * len(loader)
    if t.max_iters is not None:
        total = min(total, int(t.max_iters))
    sched = build_scheduler(opt, total, int(t.warmup_iters), float(t.poly_power))
    start_epoch = 0
    if cfg.resume:
        ckpt = load_checkpoint(run_dir / "last.pth")
        load_state_dict_checked(model, ckpt["model"], f"resume=true: checkpoint {run_dir / 'last.pth'}",
                                allowed_missing=())
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        start_epoch = int(ckpt["epoch"])
        log.info("resumed %s at epoch %d", run_dir, start_epoch)
    net: torch.nn.Module = model
    if world_size() > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True)
    t0 = time.perf_counter()
    losses = train(net, loader, opt, sched, device, int(t.epochs), run_dir=run_dir if is_main_process() else None,
                   start_epoch=start_epoch, amp=bool(t.amp), grad_clip=t.grad_clip, max_iters=t.max_iters,
                   checkpoint_every=int(t.checkpoint_every),
                   checkpoint_extra={"config": OmegaConf.to_container(cfg, resolve=True)}, sampler=sampler)
    return {"train_seconds": time.perf_counter() - t0, "train_images": len(ds), "final_losses": losses}
