"""Training loop: AdamW or SGD, linear warm-up then poly decay, bf16 autocast on CUDA, atomic checkpoints."""

from __future__ import annotations

import csv
import logging
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim.lr_scheduler import LinearLR, LRScheduler, PolynomialLR, SequentialLR
from tqdm.auto import tqdm

from tokred.engine.checkpoint import save_checkpoint
from tokred.engine.distributed import is_main_process

__all__ = ["build_optimizer", "build_scheduler", "train"]

log = logging.getLogger(__name__)


def build_optimizer(model: nn.Module, name: str = "adamw", lr: float = 3e-4, weight_decay: float = 0.01,
                    momentum: float = 0.9) -> torch.optim.Optimizer:
    """AdamW or SGD (momentum) over trainable parameters; no weight decay on norms, biases and embeddings.

    Raises:
        ValueError: unknown optimizer name.
    """
    decay, no_decay = [], []
    for name_, p in model.named_parameters():
        if not p.requires_grad:
            continue
        plain = p.ndim <= 1 or name_.endswith(("pos_embed", "cls_token", "reg_token", "cls_emb"))
        (no_decay if plain else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)
    raise ValueError(f"unknown optimizer {name!r}; valid: adamw, sgd")


def build_scheduler(optimizer: torch.optim.Optimizer, total_iters: int, warmup_iters: int = 0,
                    power: float = 0.9) -> LRScheduler:
    """Linear warm-up over ``warmup_iters`` then poly decay to 0 at ``total_iters`` (stepped every iteration)."""
    warmup_iters = min(warmup_iters, max(total_iters - 1, 0))
    poly = PolynomialLR(optimizer, total_iters=max(total_iters - warmup_iters, 1), power=power)
    if warmup_iters <= 0:
        return poly
    warm = LinearLR(optimizer, start_factor=1e-3, end_factor=1.0, total_iters=warmup_iters)
    return SequentialLR(optimizer, [warm, poly], milestones=[warmup_iters])


def train(model: nn.Module, loader: Iterable[tuple[Tensor, Tensor]], optimizer: torch.optim.Optimizer,
          scheduler: LRScheduler, device: torch.device, epochs: int, run_dir: Path | None = None,
          start_epoch: int = 0, amp: bool = True, grad_clip: float | None = 1.0, max_iters: int | None = None,
          checkpoint_every: int = 1, checkpoint_extra: dict[str, Any] | None = None,
          sampler: Any = None, progress: bool = True) -> dict[str, float]:
    """Trains ``model`` (a ``Segmenter`` or its DDP wrapper) for ``epochs - start_epoch`` epochs.

    Every ``checkpoint_every`` epochs and at the end, rank 0 writes ``run_dir/last.pth`` atomically with the
    model, optimizer and scheduler state and the next epoch, so ``resume=true`` continues where it stopped.
    Per-epoch mean losses go to ``run_dir/train_log.csv``.

    Args:
        loader: yields ``(image [B, 3, H, W], label [B, H, W])``.
        max_iters: stop after this many iterations in total (smoke runs).

    Returns:
        The last epoch's mean losses (``{"loss": ..., "loss_main": ..., ...}``).

    Raises:
        FloatingPointError: the loss became NaN/inf (names the epoch and iteration).
    """
    seg = model.module if hasattr(model, "module") else model
    iters_per_epoch = len(loader)  # type: ignore[arg-type]
    total = epochs * iters_per_epoch if max_iters is None else min(max_iters, epochs * iters_per_epoch)
    it = start_epoch * iters_per_epoch
    use_amp = amp and device.type == "cuda"
    means: dict[str, float] = {}
    log_path = None if run_dir is None else Path(run_dir) / "train_log.csv"
    for epoch in range(start_epoch, epochs):
        if it >= total:
            break
        model.train()
        if sampler is not None and hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        sums: dict[str, float] = {}
        n = 0
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{epochs}", leave=False,
                   disable=not (progress and is_main_process()))
        for image, label in bar:
            if it >= total:
                break
            image, label = image.to(device, non_blocking=True), label.to(device, non_blocking=True)
            seg.set_progress(it / max(total, 1))
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                out = model(image, label)
                losses = seg.losses(out, label)
            loss = losses["loss"]
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"loss is {loss.item()} at epoch {epoch + 1}, iteration {it}; "
                                         "lower train.lr or enable train.grad_clip")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            optimizer.step()
            scheduler.step()
            it += 1
            n += 1
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
        means = {k: v / max(n, 1) for k, v in sums.items()}
        if is_main_process():
            log.info("epoch %d/%d  %s", epoch + 1, epochs, "  ".join(f"{k}={v:.4f}" for k, v in means.items()))
            if log_path is not None:
                new = not log_path.exists()
                with open(log_path, "a", newline="") as f:
                    w = csv.writer(f)
                    if new:
                        w.writerow(["epoch", "iteration", "lr", *means])
                    w.writerow([epoch + 1, it, scheduler.get_last_lr()[0], *means.values()])
            last = epoch + 1 == epochs or it >= total
            if run_dir is not None and ((epoch + 1) % max(checkpoint_every, 1) == 0 or last):
                save_checkpoint(Path(run_dir) / "last.pth", {
                    "model": seg.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "epoch": epoch + 1, "iteration": it,
                    **(checkpoint_extra or {})})
    return means
