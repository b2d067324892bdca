"""Calibration of the early-exit threshold ``p0`` after training (``pruner.target_accuracy``).

An exit head trained for a few epochs never reaches DToP's ``p0 = 0.9`` and halts nothing; a fixed low ``p0``
would halt tokens whatever their accuracy. With ``target_accuracy`` set, the run measures, with halting off,
every exit head's confidence and correctness on every labelled cell of the training split (the heads'
logits on the exit blocks' restored outputs, ``tokred.analysis.calibration``: exact for the linear head) and
sets ``p0`` to the lowest value of a grid at which the cells above it are right at least ``target_accuracy``
of the time, pooled over the exits (one ``p0`` for all exits, as DToP). No value reaching it: ``p0 = 1.0``.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

__all__ = ["P0_GRID", "calibrate_exit_threshold", "pick_threshold"]

log = logging.getLogger("tokred")

#: Candidate thresholds (softmax probabilities), ascending.
P0_GRID: tuple[float, ...] = tuple(round(0.05 * i, 2) for i in range(4, 20)) + (0.97, 0.99)


def pick_threshold(conf: torch.Tensor, correct: torch.Tensor, target: float,
                   grid: tuple[float, ...] = P0_GRID) -> tuple[float, list[dict[str, float]]]:
    """The lowest ``p0`` of ``grid`` whose cells above it reach accuracy ``target`` (1.0 if none), and the curve.

    Args:
        conf: ``[M]`` max softmax probability of the cells; correct: ``[M]`` (bool) prediction == label.
    """
    curve, chosen = [], 1.0
    for p in grid:
        above = conf > p
        n = int(above.sum())
        acc = float(correct[above].double().mean()) if n else float("nan")
        curve.append({"p0": p, "accuracy": acc, "share_above": n / max(int(conf.numel()), 1)})
        if n and acc >= target and chosen == 1.0:
            chosen = p
    return chosen, curve


@torch.no_grad()
def calibrate_exit_threshold(cfg: DictConfig, model: torch.nn.Module, device: torch.device) -> dict[str, Any] | None:
    """Sets the early exit's ``threshold`` from ``target_accuracy`` (module docstring); None when not asked.

    Returns:
        ``{"target_accuracy", "threshold", "split", "cells", "curve"}`` (recorded in metrics.json).
    """
    from tokred.analysis.calibration import exit_cell_logits, tap_blocks
    from tokred.analysis.cells import cell_class_counts, majority_label
    from tokred.config import build_datasets, make_loader
    from tokred.io import eval_mode

    pruner = next((r for r in model.reducers if getattr(r, "target_accuracy", None) is not None), None)
    if pruner is None:
        return None
    split = str(cfg.dataset.train_split)
    ds = build_datasets(cfg, train=False, split=split)
    loader = make_loader(ds, int(cfg.eval.batch_size), False, int(cfg.train.num_workers))
    K, ignore = int(cfg.dataset.num_classes), int(cfg.dataset.ignore_index)
    confs, rights = [], []
    saved = pruner.threshold
    pruner.threshold = 1.0  # nothing halts: every cell is seen by every exit head
    try:
        with eval_mode(model), tap_blocks(model.encoder, pruner.exit_blocks):
            for images, labels in loader:
                for image, label in zip(images, labels):  # eval batches are lists (mixed sizes)
                    image = image[None].to(device)
                    label = F.interpolate(label[None, None].float(), size=image.shape[-2:],
                                          mode="nearest")[:, 0].long().to(device)
                    out = model(image, label)
                    grid = tuple(out.grid_logits.shape[-2:])
                    lab = majority_label(cell_class_counts(label, grid, K, ignore), ignore)  # [1, H0, W0]
                    for logits in exit_cell_logits(pruner, out.state.taps).values():
                        conf, pred = logits.softmax(1).max(1)  # [1, H0, W0]
                        keep = lab != ignore
                        confs.append(conf[keep].cpu())
                        rights.append((pred == lab)[keep].cpu())
    finally:
        pruner.threshold = saved
    conf, right = torch.cat(confs), torch.cat(rights)
    p0, curve = pick_threshold(conf, right, float(pruner.target_accuracy))
    pruner.threshold = p0
    log.info("early exit: p0 calibrated to %s (cells above it %.1f%% right on the %s split, target %s; %d cells)",
             p0, 100 * next((c["accuracy"] for c in curve if c["p0"] == p0), float("nan")), split,
             pruner.target_accuracy, int(conf.numel()))
    return {"target_accuracy": pruner.target_accuracy, "threshold": p0, "split": split, "cells": int(conf.numel()),
            "curve": curve}
