"""Training of the dCTS / CTS policy network on window homogeneity labels.

CTS (Lu et al. CVPR 2023, Sec. 3.3 and 4.1) trains its policy on its own with AdamW at lr 5e-5 on the labels
"window holds one class"; tokred does the same for every dCTS level (methods.md Sec. 1): binary
cross-entropy per window, averaged over the windows that count (see ``tokred.policy.labels`` for ignore
pixels) and then over levels.

Validation reports, per level ``L``, precision and recall of "uniform" at ``tau_L``, and for the full
coarse-to-fine partition at those thresholds the fraction of accepted supertokens that are truly uniform
(their labelled pixels hold at most one class) and the mean token ratio (tokens / patches). It also samples
each level's precision/recall curve (``pr_curves``, saved in the checkpoint's sidecar), from which
``calibrated_thresholds`` picks per level the lowest ``tau`` reaching a target precision: dCTS's
``target_precision`` option, so an under-trained policy that scores every window high does not merge the
whole image (a calibration on validation labels; STEP fixes its thresholds by hand).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from tokred.policy.labels import DEFAULT_ALL_IGNORE, DEFAULT_PARTIAL_IGNORE, resize_labels, window_labels
from tokred.policy.network import PolicyNet, save_policy
from tokred.policy.partition import normalize_thresholds, quadtree_partition

__all__ = ["CURVE_THRESHOLDS", "calibrated_thresholds", "evaluate_policy", "policy_loss", "precision_recall_curve",
           "train_policy"]

log = logging.getLogger(__name__)


def _collate(batch: Sequence[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """Stacks ``(image [3, H, W], label [H', W'])`` items; labels are nearest-resized to their image's size
    (evaluation data sets keep labels at the original resolution)."""
    images = torch.stack([img for img, _ in batch])
    labels = torch.stack([resize_labels(lab[None], tuple(img.shape[-2:]))[0] for img, lab in batch])
    return images, labels.long()


def policy_loss(logits: Mapping[int, Tensor], label: Tensor, patch_size: int, ignore_index: int = 255,
                all_ignore: str = DEFAULT_ALL_IGNORE, partial_ignore: str = DEFAULT_PARTIAL_IGNORE) -> Tensor:
    """Mean over levels of the masked BCE between window logits and ground-truth uniformity.

    Args:
        logits: level ``L`` -> ``[B, H0 // L, W0 // L]`` policy logits.
        label: ``[B, H, W]`` (long) labels at the policy input's resolution, ``ignore_index`` ignored.
        patch_size: px per patch side.

    Returns:
        Scalar loss (0 when no window counts).
    """
    losses = []
    for L, lo in logits.items():
        target, mask = window_labels(label, L, patch_size, ignore_index, all_ignore, partial_ignore)
        if mask.any():
            bce = F.binary_cross_entropy_with_logits(lo.float(), target, reduction="none")  # [B, h, w]
            losses.append((bce * mask).sum() / mask.sum())
    if not losses:
        return next(iter(logits.values())).sum() * 0.0
    return torch.stack(losses).mean()


@torch.no_grad()
def evaluate_policy(policy: PolicyNet, loader: DataLoader, thresholds: Mapping[int, float], device: torch.device,
                    ignore_index: int = 255, all_ignore: str = DEFAULT_ALL_IGNORE,
                    partial_ignore: str = DEFAULT_PARTIAL_IGNORE,
                    progress: bool = True) -> dict[str, float]:
    """Validation loss, per-level precision/recall, and the quality of the induced partition.

    Returns:
        ``{"val_loss", "precision_L{L}", "recall_L{L}", "uniform_fraction", "token_ratio"}``: precision and
        recall of "uniform" at ``tau_L`` over counted windows; ``uniform_fraction`` = accepted supertokens
        (all levels, coarse-to-fine partition) whose labelled pixels hold at most one class; ``token_ratio`` =
        mean patch tokens / patches. NaN where undefined (no positive prediction, no accepted window).
    """
    policy.eval()
    p = policy.patch_size
    seen: dict[int, list[Tensor]] = {L: [] for L in policy.levels}  # per level: [scores; uniform] of counted windows
    tp = {L: 0 for L in policy.levels}
    fp, fn = dict(tp), dict(tp)
    loss_sum, n_batches, acc_total, acc_uniform, ratio_sum, n_images = 0.0, 0, 0, 0, 0.0, 0
    for image, label in tqdm(loader, desc="policy val", leave=False, disable=not progress):
        image, label = image.to(device), label.to(device)
        logits = policy(image)
        loss_sum += float(policy_loss(logits, label, p, ignore_index, all_ignore, partial_ignore))
        n_batches += 1
        scores = {L: lo.sigmoid() for L, lo in logits.items()}
        grid = (image.shape[-2] // p, image.shape[-1] // p)
        part = quadtree_partition(scores, grid, thresholds)
        for L in policy.levels:
            target, mask = window_labels(label, L, p, ignore_index, all_ignore, partial_ignore)
            pred = scores[L] > thresholds[L]
            pos = target > 0.5
            seen[L].append(torch.stack([scores[L][mask].float(), pos[mask].float()]).cpu())
            tp[L] += int((pred & pos & mask).sum())
            fp[L] += int((pred & ~pos & mask).sum())
            fn[L] += int((~pred & pos & mask).sum())
            uniform, _ = window_labels(label, L, p, ignore_index, "positive", "positive")
            acc = part.accepted[L]
            acc_total += int(acc.sum())
            acc_uniform += int((acc & (uniform > 0.5)).sum())
        ratio_sum += float((part.num_tokens.float() / (grid[0] * grid[1])).sum())
        n_images += image.shape[0]
    out = {"val_loss": loss_sum / max(n_batches, 1)}
    for L in policy.levels:
        out[f"precision_L{L}"] = tp[L] / (tp[L] + fp[L]) if tp[L] + fp[L] else math.nan
        out[f"recall_L{L}"] = tp[L] / (tp[L] + fn[L]) if tp[L] + fn[L] else math.nan
    out["uniform_fraction"] = acc_uniform / acc_total if acc_total else math.nan
    out["token_ratio"] = ratio_sum / max(n_images, 1)
    out["pr_curves"] = {str(L): precision_recall_curve(torch.cat(seen[L], dim=1)) for L in policy.levels
                        if seen[L]}
    return out


#: Thresholds at which the validation precision/recall curves are sampled (``tau`` in [0, 1]).
CURVE_THRESHOLDS: tuple[float, ...] = tuple(round(0.05 * i, 2) for i in range(1, 20)) + (0.97, 0.99)


def precision_recall_curve(pairs: Tensor) -> list[dict[str, float]]:
    """Precision, recall and accepted share of "score > tau" for every ``tau`` of ``CURVE_THRESHOLDS``.

    Args:
        pairs: ``[2, W]`` scores (sigmoid, in [0, 1]) and targets (1 = uniform window) of the counted windows.

    Returns:
        ``[{"tau", "precision" (NaN when nothing is accepted), "recall", "accepted"}]``, ascending ``tau``.
    """
    score, pos = pairs[0], pairs[1] > 0.5
    rows = []
    for tau in CURVE_THRESHOLDS:
        pred = score > tau
        n_pred, n_tp, n_pos = int(pred.sum()), int((pred & pos).sum()), int(pos.sum())
        rows.append({"tau": tau, "precision": n_tp / n_pred if n_pred else math.nan,
                     "recall": n_tp / n_pos if n_pos else math.nan,
                     "accepted": n_pred / max(int(score.numel()), 1)})
    return rows


def calibrated_thresholds(curves: Mapping[str, Sequence[Mapping[str, float]]], levels: Sequence[int],
                          target_precision: float) -> dict[int, float]:
    """Per level, the smallest sampled ``tau`` whose validation precision reaches ``target_precision``.

    A level whose curve never reaches it (or has no curve) gets ``tau = 1.0``: it accepts nothing, so the
    policy never merges windows it cannot tell apart at that precision.

    Raises:
        ValueError: ``target_precision`` outside ``(0, 1]``.
    """
    if not 0.0 < float(target_precision) <= 1.0:
        raise ValueError(f"target_precision must be in (0, 1], got {target_precision}")
    out = {}
    for L in sorted(int(v) for v in levels):
        ok = [r["tau"] for r in curves.get(str(L), ()) if r["precision"] == r["precision"]  # not NaN
              and r["precision"] >= target_precision]
        out[L] = float(min(ok)) if ok else 1.0
    return out


def train_policy(dataset_train: Dataset, dataset_val: Dataset | None, policy: PolicyNet, epochs: int,
                 lr: float = 5e-5, batch_size: int = 8, device: str | torch.device = "cpu",
                 out_path: str | Path | None = None, weight_decay: float = 0.01,
                 thresholds: Mapping | Sequence[float] | float | None = None, ignore_index: int = 255,
                 all_ignore: str = DEFAULT_ALL_IGNORE, partial_ignore: str = DEFAULT_PARTIAL_IGNORE,
                 num_workers: int = 0,
                 max_steps: int | None = None, seed: int = 0, progress: bool = True,
                 keep: str = "best") -> dict[str, Any]:
    """Trains the policy with AdamW on per-window BCE (CTS recipe: AdamW, lr 5e-5), validates, saves.

    With ``dataset_val`` the validation BCE is measured after every epoch (``curve`` in the result and the
    sidecar: the policy's learning curve); ``keep="best"`` then keeps the weights of the epoch with the lowest
    validation loss (model selection on the validation split, never the test split), ``"last"`` the last ones.

    Args:
        dataset_train: items ``(image [3, H, W] normalised float, label [H, W] long, 255 = ignore)`` of one
            size per batch (training crops), e.g. ``tokred.data.build_dataset(name, root, "train", crop, True)``.
        dataset_val: same item format (labels may be at another resolution: nearest-resized to the image), or
            None to skip validation.
        policy: the ``PolicyNet`` to train (its levels and patch size define the windows).
        epochs: passes over ``dataset_train``.
        lr: AdamW learning rate.
        batch_size: images per step.
        device: where to train.
        out_path: ``.safetensors`` or ``.pth`` file for the trained policy (+ ``.json`` sidecar with its
            configuration and these metrics); None = do not save.
        weight_decay: AdamW weight decay.
        thresholds: ``tau_L`` for the validation metrics (see ``normalize_thresholds``; default 0.5).
        ignore_index / all_ignore / partial_ignore: label handling (``tokred.policy.labels``).
        num_workers: DataLoader workers.
        max_steps: stop after this many optimiser steps in total (smoke runs); None = all epochs.
        seed: shuffling seed.
        progress: show tqdm progress bars.
        keep: ``"best"`` (lowest validation loss; the last epoch without ``dataset_val``) or ``"last"``.

    Returns:
        ``{"epochs", "steps", "train_loss" (mean of the last epoch), "curve" ([{"epoch", "train_loss",
        "val_loss"}], with ``dataset_val``), "kept_epoch", validation metrics of the kept weights (see
        ``evaluate_policy``), "out_path"}``.

    Raises:
        ValueError: ``epochs`` < 1, ``batch_size`` < 1, an unknown ``keep``, or bad thresholds / ignore modes.
    """
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs ({epochs}) and batch_size ({batch_size}) must be >= 1")
    if keep not in ("best", "last"):
        raise ValueError(f"policy keep={keep!r}: use 'best' (lowest validation loss) or 'last'")
    taus = normalize_thresholds(thresholds, policy.levels)
    device = torch.device(device)
    policy.to(device).requires_grad_(True)
    gen = torch.Generator().manual_seed(seed)
    train_loader = DataLoader(dataset_train, batch_size=batch_size, shuffle=True, generator=gen,
                              num_workers=num_workers, collate_fn=_collate, drop_last=False,
                              persistent_workers=num_workers > 0)  # not restarted every (short) epoch
    opt = torch.optim.AdamW(policy.parameters(), lr=lr, weight_decay=weight_decay)
    val_loader = None if dataset_val is None else DataLoader(dataset_val, batch_size=batch_size, shuffle=False,
                                                             num_workers=num_workers, collate_fn=_collate)
    curve: list[dict[str, float]] = []
    best: tuple[float, int, dict[str, torch.Tensor]] | None = None
    steps, train_loss = 0, math.nan
    p = policy.patch_size
    for epoch in range(epochs):
        policy.train()
        total, count = 0.0, 0
        bar = tqdm(train_loader, desc=f"policy epoch {epoch + 1}/{epochs}", leave=False, disable=not progress)
        for image, label in bar:
            image, label = image.to(device), label.to(device)
            loss = policy_loss(policy(image), label, p, ignore_index, all_ignore, partial_ignore)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps += 1
            total += float(loss.detach())
            count += 1
            bar.set_postfix(loss=f"{total / count:.4f}")
            if max_steps is not None and steps >= max_steps:
                break
        train_loss = total / max(count, 1)
        if val_loader is None:
            log.info("policy epoch %d/%d: train loss %.4f", epoch + 1, epochs, train_loss)
        else:
            val_loss = _val_loss(policy, val_loader, device, ignore_index, all_ignore, partial_ignore)
            curve.append({"epoch": epoch + 1, "train_loss": train_loss, "val_loss": val_loss})
            log.info("policy epoch %d/%d: train loss %.4f, val loss %.4f", epoch + 1, epochs, train_loss, val_loss)
            if keep == "best" and (best is None or val_loss < best[0]):
                best = (val_loss, epoch + 1, {k: v.detach().clone() for k, v in policy.state_dict().items()})
        if max_steps is not None and steps >= max_steps:
            break
    metrics: dict[str, Any] = {"epochs": epoch + 1, "steps": steps, "train_loss": train_loss,
                               "kept_epoch": epoch + 1}
    if best is not None:
        policy.load_state_dict(best[2])
        metrics["kept_epoch"] = best[1]
        if best[1] != epoch + 1:
            log.info("policy: keeping epoch %d (lowest validation loss %.4f)", best[1], best[0])
    if curve:
        metrics["curve"] = curve
    if val_loader is not None:
        metrics.update(evaluate_policy(policy, val_loader, taus, device, ignore_index, all_ignore, partial_ignore,
                                       progress))
        log.info("policy validation: %s", {k: round(v, 4) for k, v in metrics.items() if isinstance(v, float)})
        for L, rows in metrics.get("pr_curves", {}).items():
            log.info("policy level %s: precision at tau 0.5 / 0.7 / 0.9: %s", L,
                     " / ".join(f"{r['precision']:.3f}" for r in rows if r["tau"] in (0.5, 0.7, 0.9)))
    policy.eval()
    metrics["out_path"] = None
    if out_path is not None:
        metrics["out_path"] = str(save_policy(policy, out_path, {k: v for k, v in metrics.items() if k != "out_path"}))
    return metrics


@torch.no_grad()
def _val_loss(policy: PolicyNet, loader: DataLoader, device: torch.device, ignore_index: int, all_ignore: str,
              partial_ignore: str) -> float:
    """The ``val_loss`` of :func:`evaluate_policy` (mean over batches of the per-window BCE), without the rest."""
    policy.eval()
    total, count = 0.0, 0
    for image, label in loader:
        image, label = image.to(device), label.to(device)  # _collate resized the labels to the images
        loss = policy_loss(policy(image), label, policy.patch_size, ignore_index, all_ignore, partial_ignore)
        total += float(loss)
        count += 1
    policy.train()
    return total / max(count, 1)
