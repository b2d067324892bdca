"""Training loop: AdamW or SGD, linear warm-up then poly decay, bf16 autocast on CUDA, atomic checkpoints
that resume exactly, and a clean stop on SIGINT/SIGTERM.

Exact resume (issue 15): a checkpoint holds the model, optimizer and scheduler state, the position in
training (epoch, batches done in that epoch, iteration), the running loss sums of the epoch in progress and
every random state (``tokred.engine.checkpoint.rng_state``: torch CPU and CUDA, NumPy, Python). The data
order and augmentation do not use the global generators (``tokred.engine.sampler``), so a run resumed from
any checkpoint continues with the same batches and the same model randomness (dropout, drop path, random
pruners) as the uninterrupted run: on CPU its metrics are bit-identical.
"""

from __future__ import annotations

import csv
import logging
import math
import signal
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.optim.lr_scheduler import LinearLR, LRScheduler, PolynomialLR, SequentialLR
from tqdm.auto import tqdm

from tokred.engine.checkpoint import rng_state, save_checkpoint, set_rng_state
from tokred.engine.distributed import is_main_process, rank, world_size
from tokred.io import atomic_file

__all__ = ["StopOnSignal", "TrainingInterrupted", "build_optimizer", "build_scheduler", "train"]

log = logging.getLogger(__name__)


class TrainingInterrupted(Exception):
    """Training stopped on SIGINT/SIGTERM after finishing its current step and writing ``checkpoint``.

    Attributes:
        signum: the signal received (``signal.SIGINT`` = 2, ``signal.SIGTERM`` = 15).
        checkpoint: the checkpoint written at the stop (None on ranks other than 0 or without a run folder).
        epoch / iteration: where training stopped (epoch 0-based, iterations done).
    """

    def __init__(self, signum: int, checkpoint: Path | None, epoch: int, iteration: int) -> None:
        self.signum, self.checkpoint, self.epoch, self.iteration = signum, checkpoint, epoch, iteration
        name = signal.Signals(signum).name
        where = f"; checkpoint {checkpoint}" if checkpoint is not None else ""
        super().__init__(f"training stopped by {name} at epoch {epoch + 1}, iteration {iteration}{where}")

    @property
    def exit_code(self) -> int:
        """The shell's convention for a process ended by a signal: 128 + signal number (130, 143)."""
        return 128 + int(self.signum)


class StopOnSignal:
    """Context manager: SIGINT/SIGTERM set :attr:`signum` instead of killing the process, so the loop can
    finish its step and checkpoint; a second SIGINT interrupts at once (KeyboardInterrupt).

    Handlers are installed only in the main thread (elsewhere the object is inert) and restored on exit.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        log.warning("received %s: finishing the current step, then writing a checkpoint (press Ctrl-C again to "
                    "stop at once, without a checkpoint)", signal.Signals(signum).name)

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old.clear()

    def requested(self, device: torch.device) -> int | None:
        """The signal any rank received (all ranks agree, so they stop at the same step), or None."""
        if world_size() <= 1:
            return self.signum
        import torch.distributed as dist

        flag = torch.tensor([self.signum or 0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item()) or None


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


def _trim_log(path: Path, epochs_done: int) -> None:
    """Keeps the header and the rows of the first ``epochs_done`` epochs of ``train_log.csv`` (a run killed
    after logging an epoch but before its checkpoint repeats that epoch on resume)."""
    if not path.is_file():
        return
    rows = list(csv.reader(path.read_text().splitlines()))
    kept = rows[:1] + [r for r in rows[1:] if r and int(r[0]) <= epochs_done]
    if kept != rows:
        with atomic_file(path) as tmp, open(tmp, "w", newline="") as f:
            csv.writer(f).writerows(kept)


def _batches_per_epoch(loader: Any, sampler: Any) -> int:
    if sampler is not None and hasattr(sampler, "batches_per_epoch"):
        return int(sampler.batches_per_epoch)
    return len(loader)


def train(model: nn.Module, loader: Iterable[tuple[Tensor, Tensor]], optimizer: torch.optim.Optimizer,
          scheduler: LRScheduler, device: torch.device, epochs: int, run_dir: Path | None = None,
          start_epoch: int = 0, amp: bool = True, grad_clip: float | None = 1.0, max_iters: int | None = None,
          checkpoint_every: int = 1, checkpoint_extra: dict[str, Any] | None = None,
          sampler: Any = None, progress: bool = True, resume: dict[str, Any] | None = None,
          stop: StopOnSignal | None = None,
          epoch_end: Callable[[int], dict[str, float]] | None = None) -> dict[str, float]:
    """Trains ``model`` (a ``Segmenter`` or its DDP wrapper) until epoch ``epochs`` (or ``max_iters``).

    Every ``checkpoint_every`` epochs, at the end and when stopped by a signal, rank 0 writes
    ``run_dir/last.pth`` atomically (see the module docstring for what it holds). Per-epoch mean losses go
    to ``run_dir/train_log.csv``; under DDP they are averaged over the ranks.

    Args:
        loader: yields ``(image [B, 3, H, W], label [B, H, W])``.
        start_epoch: first epoch to run (0-based), when ``resume`` is not given.
        sampler: the loader's sampler; ``set_epoch(epoch, offset)`` is called each epoch (``ResumableSampler``
            skips the ``offset`` samples already seen when resuming mid-epoch).
        resume: a checkpoint written by this function: training continues at its position with its random
            states and loss sums (checkpoints without them continue at their epoch, not exactly).
        stop: a :class:`StopOnSignal` in effect (default: one is installed for the duration of training).
        epoch_end: called on rank 0 as ``epoch_end(epoch)`` (1-based) after each epoch, in eval mode under
            ``torch.no_grad``; the values it returns (e.g. ``{"val_miou": ...}``, NaN where not measured) become
            extra ``train_log.csv`` columns, so it must return the same keys every epoch.
        max_iters: stop after this many iterations in total (smoke runs).

    Returns:
        The last epoch's mean losses (``{"loss": ..., "loss_main": ..., ...}``).

    Raises:
        FloatingPointError: the loss became NaN/inf (names the epoch and iteration).
        TrainingInterrupted: SIGINT/SIGTERM arrived; the step in progress was finished and checkpointed.
    """
    if stop is None:
        with StopOnSignal() as own:
            return train(model, loader, optimizer, scheduler, device, epochs, run_dir, start_epoch, amp, grad_clip,
                         max_iters, checkpoint_every, checkpoint_extra, sampler, progress, resume, own, epoch_end)
    seg = model.module if hasattr(model, "module") else model
    per_epoch = _batches_per_epoch(loader, sampler)
    total = epochs * per_epoch if max_iters is None else min(max_iters, epochs * per_epoch)
    epoch_step, sums, n = 0, {}, 0
    if resume is not None:
        start_epoch = int(resume["epoch"])
        epoch_step = int(resume.get("epoch_step", 0))
        it = int(resume.get("iteration", start_epoch * per_epoch + epoch_step))
        # the checkpoint holds the sums over all ranks: rank 0 carries them on, the others restart at 0
        sums = {k: (float(v) if rank() == 0 else 0.0) for k, v in (resume.get("loss_sums") or {}).items()}
        n = int(resume.get("loss_count", 0)) if rank() == 0 else 0
        if "rng" in resume:
            set_rng_state(resume["rng"])
        else:
            log.warning("the checkpoint holds no random state (written by an older tokred): the resumed run "
                        "continues, but not bit-identically")
    else:
        it = start_epoch * per_epoch
    use_amp = amp and device.type == "cuda"
    means: dict[str, float] = {}
    log_path = None if run_dir is None else Path(run_dir) / "train_log.csv"
    if log_path is not None:
        _trim_log(log_path, start_epoch)

    def checkpoint(epoch: int, step: int) -> Path | None:
        """Writes ``last.pth`` on rank 0 (called on every rank: the epoch's loss sums are summed over them)."""
        total_sums, total_n = _sum_over_ranks(sums, n, device)
        if run_dir is None or not is_main_process():
            return None
        return save_checkpoint(Path(run_dir) / "last.pth", {
            "model": seg.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "epoch": epoch, "epoch_step": step, "iteration": it, "loss_sums": total_sums, "loss_count": total_n,
            "rng": rng_state(), **(checkpoint_extra or {})})

    for epoch in range(start_epoch, epochs):
        if it >= total:
            break
        model.train()
        if sampler is not None and hasattr(sampler, "set_epoch"):
            if epoch_step and hasattr(sampler, "batch_size"):
                sampler.set_epoch(epoch, offset=epoch_step * int(sampler.batch_size))
            else:
                sampler.set_epoch(epoch)
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{epochs}", leave=False, initial=epoch_step, total=per_epoch,
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
            epoch_step += 1
            n += 1
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
            signum = stop.requested(device)
            if signum is not None and it < total and epoch_step < per_epoch:
                raise TrainingInterrupted(signum, checkpoint(epoch, epoch_step), epoch, it)
        bar.close()
        means = _mean_over_ranks(sums, n, device)
        epoch_step, sums, n = 0, {}, 0
        if is_main_process():
            extra: dict[str, float] = {}
            if epoch_end is not None:
                model.eval()
                with torch.no_grad():
                    extra = dict(epoch_end(epoch + 1))
                model.train()
            log.info("epoch %d/%d  %s", epoch + 1, epochs,
                     "  ".join(f"{k}={v:.4f}" for k, v in {**means, **extra}.items() if math.isfinite(v)))
            if log_path is not None:
                new = not log_path.exists()
                with open(log_path, "a", newline="") as f:
                    w = csv.writer(f)
                    if new:
                        w.writerow(["epoch", "iteration", "lr", *means, *extra])
                    w.writerow([epoch + 1, it, scheduler.get_last_lr()[0], *means.values(), *extra.values()])
        last = epoch + 1 == epochs or it >= total
        signum = stop.requested(device)
        if (epoch + 1) % max(checkpoint_every, 1) == 0 or last or signum is not None:
            path = checkpoint(epoch + 1, 0)
            if signum is not None:  # also after the last step: the run stops before its evaluation
                raise TrainingInterrupted(signum, path, epoch + 1, it)
    return means


def _sum_over_ranks(sums: dict[str, float], n: int, device: torch.device) -> tuple[dict[str, float], int]:
    """Per-loss sums and step counts added over the ranks (unchanged without DDP)."""
    if world_size() <= 1 or not sums:
        return dict(sums), n
    import torch.distributed as dist

    keys = list(sums)  # every rank builds its losses in the same order
    t = torch.tensor([sums[k] for k in keys] + [float(n)], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return {k: float(t[i]) for i, k in enumerate(keys)}, int(t[-1].item())


def _mean_over_ranks(sums: dict[str, float], n: int, device: torch.device) -> dict[str, float]:
    """Per-loss means over every step of the epoch on every rank (plain means without DDP)."""
    total, count = _sum_over_ranks(sums, n, device)
    return {k: v / max(count, 1) for k, v in total.items()}
