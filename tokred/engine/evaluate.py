"""Evaluation: confusion-matrix mIoU, per-class IoU, pixel accuracy; whole-image and sliding-window inference."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from tokred.state import TokenState

__all__ = ["ConfusionMatrix", "evaluate", "slide_inference"]


@dataclass
class ConfusionMatrix:
    """Accumulates a ``[K, K]`` confusion matrix (rows: ground truth, columns: prediction).

    Attributes:
        num_classes: ``K``.
        ignore_index: label value left out of every metric.
    """

    num_classes: int
    ignore_index: int = 255
    mat: Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.mat = torch.zeros(self.num_classes, self.num_classes, dtype=torch.long)

    def update(self, pred: Tensor, target: Tensor) -> None:
        """Adds ``pred [B, H, W]`` against ``target [B, H, W]`` (same size).

        Raises:
            ValueError: shapes differ, or the target holds values outside ``[0, K)`` and the ignore value.
        """
        if pred.shape != target.shape:
            raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
        keep = target != self.ignore_index
        t, p = target[keep].long(), pred[keep].long()
        if t.numel() and (t.min() < 0 or t.max() >= self.num_classes):
            raise ValueError(f"target holds labels outside [0, {self.num_classes}) and {self.ignore_index}: "
                             f"{sorted(set(t[(t < 0) | (t >= self.num_classes)].unique().tolist()))[:10]}")
        k = self.num_classes
        self.mat += torch.bincount(t.cpu() * k + p.cpu(), minlength=k * k).reshape(k, k)

    def merge(self, other: ConfusionMatrix) -> None:
        self.mat += other.mat

    def iou(self) -> Tensor:
        """``[K]`` IoU per class; NaN for classes absent from both prediction and ground truth."""
        m = self.mat.double()
        tp = m.diag()
        union = m.sum(0) + m.sum(1) - tp
        return torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, float("nan")))

    def summary(self, class_names: Iterable[str] | None = None) -> dict[str, Any]:
        """``{"miou", "per_class_iou", "pixel_accuracy", "mean_accuracy"}`` as fractions in [0, 1].

        mIoU averages the classes present in the ground truth or the prediction (NaN classes left out).
        """
        iou = self.iou()
        m = self.mat.double()
        gt = m.sum(1)
        acc = torch.where(gt > 0, m.diag() / gt.clamp_min(1), torch.full_like(gt, float("nan")))
        names = list(class_names) if class_names is not None else [str(i) for i in range(self.num_classes)]
        return {
            "miou": float(torch.nanmean(iou)) if torch.isfinite(iou).any() else float("nan"),
            "per_class_iou": {n: (None if v != v else float(v)) for n, v in zip(names, iou.tolist())},
            "pixel_accuracy": float(m.diag().sum() / m.sum().clamp_min(1)),
            "mean_accuracy": float(torch.nanmean(acc)) if torch.isfinite(acc).any() else float("nan"),
        }


def slide_inference(model: nn.Module, image: Tensor, crop: tuple[int, int], stride: tuple[int, int],
                    num_classes: int, on_state: Callable[[TokenState], None] | None = None) -> Tensor:
    """Sliding-window inference (Segmenter / mmseg ``slide`` mode): overlapping crops, logits averaged.

    Args:
        model: a ``Segmenter``.
        image: ``[B, 3, H, W]``; padded (zeros) up to the crop where smaller.
        crop: ``(h, w)`` px window, multiples of the patch size.
        stride: ``(sh, sw)`` px.
        num_classes: ``K``.
        on_state: called with every window's token state (token accounting).

    Returns:
        ``[B, K, H, W]`` averaged logits.
    """
    B, _, H, W = image.shape
    ch, cw = crop
    ph, pw = max(ch - H, 0), max(cw - W, 0)
    if ph or pw:
        image = F.pad(image, (0, pw, 0, ph))
    Hp, Wp = image.shape[-2:]
    logits = image.new_zeros(B, num_classes, Hp, Wp)
    count = image.new_zeros(1, 1, Hp, Wp)
    rows = list(range(0, max(Hp - ch, 0) + 1, stride[0]))
    cols = list(range(0, max(Wp - cw, 0) + 1, stride[1]))
    if rows[-1] + ch < Hp:
        rows.append(Hp - ch)
    if cols[-1] + cw < Wp:
        cols.append(Wp - cw)
    for y in rows:
        for x in cols:
            out = model(image[:, :, y:y + ch, x:x + cw])
            if on_state is not None:
                on_state(out.state)
            logits[:, :, y:y + ch, x:x + cw] += out.logits.float()
            count[:, :, y:y + ch, x:x + cw] += 1
    return (logits / count)[:, :, :H, :W]


@torch.inference_mode()
def evaluate(model: nn.Module, loader: Iterable[tuple[Tensor, Tensor]], num_classes: int, device: torch.device,
             ignore_index: int = 255, mode: str = "whole", crop: tuple[int, int] | None = None,
             stride: tuple[int, int] | None = None, class_names: Iterable[str] | None = None,
             on_state: Callable[[TokenState], None] | None = None, amp: bool = False,
             progress: bool = True) -> dict[str, Any]:
    """Evaluates a segmenter: logits are bilinearly resized to each label's resolution, then argmax.

    Args:
        model: a ``Segmenter``.
        loader: yields ``(image [B, 3, H, W], label [B, h, w])``; labels may be at the original resolution.
        num_classes: ``K``.
        device: where the model runs.
        mode: ``"whole"`` (the image in one pass) or ``"slide"`` (windows of ``crop`` px at ``stride`` px).
        on_state: called with the token state of every forward (token accounting).
        amp: bf16 autocast (CUDA only).

    Returns:
        ``ConfusionMatrix.summary`` plus ``"num_images"``.

    Raises:
        ValueError: unknown mode, or ``slide`` without ``crop``.
    """
    if mode not in ("whole", "slide"):
        raise ValueError(f"eval.mode must be 'whole' or 'slide', got {mode!r}")
    if mode == "slide" and crop is None:
        raise ValueError("eval.mode=slide needs the crop size (dataset.crop_size)")
    model.eval()
    cm = ConfusionMatrix(num_classes, ignore_index)
    n = 0
    use_amp = amp and device.type == "cuda"
    for image, label in tqdm(loader, desc="eval", leave=False, disable=not progress):
        image, label = image.to(device, non_blocking=True), label.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            if mode == "slide":
                st = stride or (crop[0] * 2 // 3, crop[1] * 2 // 3)
                logits = slide_inference(model, image, crop, st, num_classes, on_state)
            else:
                out = model(image, label)  # only oracle policies read the label (an upper-bound baseline)
                if on_state is not None:
                    on_state(out.state)
                logits = out.logits
        if logits.shape[-2:] != label.shape[-2:]:
            logits = F.interpolate(logits.float(), size=label.shape[-2:], mode="bilinear", align_corners=False)
        cm.update(logits.argmax(1), label)
        n += image.shape[0]
    result = cm.summary(class_names)
    result["num_images"] = n
    return result
