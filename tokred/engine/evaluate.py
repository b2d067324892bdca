"""Evaluation: confusion-matrix mIoU, per-class IoU, pixel accuracy; whole-image and sliding-window inference.

Inference follows mmsegmentation's ``whole`` and ``slide`` modes:

* ``whole``: one forward per image; an image whose size is not a multiple of patch_size is padded (zeros,
  bottom/right) and the logits cropped back.
* ``slide``: an image smaller than the window is padded up to it; windows of ``crop`` px start every ``stride``
  px, the last row/column of windows is clamped to end at the border (mmseg's ``min(y + crop, H) - crop``), and
  overlapping logits are averaged with a count map.

Logits are then resized (bilinear) to the label's ORIGINAL resolution before argmax. Every window (and every
image in whole mode) is its own row of a forward with its own token state; windows of the images of a loader
batch are forwarded ``batch_size`` at a time (``eval.batch_size``), whatever their image sizes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from tokred.state import TokenState

__all__ = ["ConfusionMatrix", "evaluate", "forward_inputs", "segment_images", "slide_inference", "window_boxes"]

#: ``on_state(state, image_ids)``: the final token state of a forward and, per row, ``[B] long`` the index of
#: the image it belongs to (windows of one image share it); :meth:`TokenAccounting.update` has this signature.
StateCallback = Callable[[TokenState, Tensor], None]


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


def window_boxes(height: int, width: int, crop: tuple[int, int], stride: tuple[int, int]
                 ) -> list[tuple[int, int, int, int]]:
    """Sliding windows over an image, as mmseg's ``slide`` mode places them.

    ``ceil((H - crop_h) / stride_h) + 1`` rows (likewise columns) start every ``stride`` px; each window is then
    shifted back so it ends inside the image (``y1 = min(y0 + crop_h, H)``, ``y0 = max(y1 - crop_h, 0)``).

    Args:
        height / width: image size in px (after padding up to the window where smaller).
        crop: ``(crop_h, crop_w)`` px window.
        stride: ``(stride_h, stride_w)`` px step.

    Returns:
        ``[(y0, y1, x0, x1)]`` px, row-major.

    Raises:
        ValueError: a non-positive window or stride.
    """
    (ch, cw), (sh, sw) = crop, stride
    if min(ch, cw, sh, sw) <= 0:
        raise ValueError(f"window {crop} and stride {stride} px must be positive")
    rows = max(height - ch + sh - 1, 0) // sh + 1
    cols = max(width - cw + sw - 1, 0) // sw + 1
    boxes = []
    for i in range(rows):
        y1 = min(i * sh + ch, height)
        y0 = max(y1 - ch, 0)
        for j in range(cols):
            x1 = min(j * sw + cw, width)
            x0 = max(x1 - cw, 0)
            boxes.append((y0, y1, x0, x1))
    return boxes


def _patch_size(model: nn.Module) -> tuple[int, int]:
    ps = getattr(getattr(model, "encoder", None), "patch_size", None)
    if ps is None:
        return 1, 1
    return (int(ps), int(ps)) if isinstance(ps, int) else (int(ps[0]), int(ps[1]))


def _aligned_target(label: Tensor | None, hw: tuple[int, int], padded: tuple[int, int], ignore_index: int
                    ) -> Tensor | None:
    """``[h, w]`` label -> ``[Hp, Wp]``: nearest-resized to the network input ``hw``, padded with the ignore value."""
    if label is None:
        return None
    t = label
    if tuple(t.shape[-2:]) != tuple(hw):
        t = F.interpolate(t[None, None].float(), size=hw, mode="nearest")[0, 0].to(label.dtype)
    ph, pw = padded[0] - hw[0], padded[1] - hw[1]
    return F.pad(t, (0, pw, 0, ph), value=ignore_index) if ph or pw else t


def _padded_size(h: int, w: int, mode: str, crop: tuple[int, int] | None, patch: tuple[int, int]
                 ) -> tuple[int, int]:
    """Slide: at least the window; whole: the next multiple of patch_size (px)."""
    if mode == "slide":
        return max(h, crop[0]), max(w, crop[1])  # type: ignore[index]
    return -(-h // patch[0]) * patch[0], -(-w // patch[1]) * patch[1]


def forward_inputs(model: nn.Module, image: Tensor, mode: str = "whole", crop: tuple[int, int] | None = None,
                   stride: tuple[int, int] | None = None, target: Tensor | None = None,
                   ignore_index: int = 255) -> list[tuple[Tensor, Tensor | None]]:
    """The network inputs :func:`segment_images` forwards for one image: the padded image or its windows.

    Args:
        model: the segmenter (its ``encoder.patch_size`` sets whole-mode padding).
        image: ``[3, H, W]`` normalised image.
        mode / crop / stride: as in :func:`segment_images`.
        target: optional ``[h, w]`` label (any resolution), resized (nearest) to ``H, W`` and cut like the image.
        ignore_index: fill value of padded label pixels.

    Returns:
        ``(input [3, h, w], target [h, w] or None)`` pairs: one in whole mode, one per window (``window_boxes``
        order) in slide mode.

    Raises:
        ValueError: unknown mode or slide without ``crop``.
    """
    if mode not in ("whole", "slide"):
        raise ValueError(f"eval.mode must be 'whole' or 'slide', got {mode!r}")
    if mode == "slide" and crop is None:
        raise ValueError("eval.mode=slide needs the window size (dataset.crop_size or the dataset's protocol)")
    h, w = int(image.shape[-2]), int(image.shape[-1])
    hp, wp = _padded_size(h, w, mode, crop, _patch_size(model))
    img = F.pad(image, (0, wp - w, 0, hp - h)) if (hp, wp) != (h, w) else image
    tgt = _aligned_target(target, (h, w), (hp, wp), ignore_index)
    if mode == "whole":
        return [(img, tgt)]
    st = stride or (crop[0] * 2 // 3, crop[1] * 2 // 3)  # type: ignore[index]
    return [(img[:, y0:y1, x0:x1], None if tgt is None else tgt[y0:y1, x0:x1])
            for y0, y1, x0, x1 in window_boxes(hp, wp, crop, st)]  # type: ignore[arg-type]


def segment_images(model: nn.Module, images: Sequence[Tensor], num_classes: int, mode: str = "whole",
                   crop: tuple[int, int] | None = None, stride: tuple[int, int] | None = None,
                   batch_size: int | None = None, targets: Sequence[Tensor] | None = None,
                   on_state: StateCallback | None = None, first_image_id: int = 0, ignore_index: int = 255
                   ) -> list[Tensor]:
    """Logits of each image at its input resolution, by whole-image or sliding-window inference.

    Args:
        model: a ``Segmenter`` (``model(image [B, 3, H, W], target [B, H, W] | None).logits [B, K, H, W]``).
        images: ``[3, H_i, W_i]`` normalised images, sizes may differ (any size: padded as the mode needs).
        num_classes: ``K``.
        mode: ``"whole"`` or ``"slide"``.
        crop: ``(h, w)`` px window of slide mode, a multiple of patch_size.
        stride: ``(sh, sw)`` px step of slide mode; None = 2/3 of the window.
        batch_size: rows per forward (images in whole mode, windows in slide mode); None = ``len(images)``.
        targets: optional ``[h_i, w_i]`` labels (any resolution): resized (nearest) and cropped like the
            image and passed to the forward (only oracle policies read them).
        on_state: called as ``on_state(state, image_ids [B] long)`` after every forward.
        first_image_id: id of ``images[0]`` in ``image_ids`` (a running count over the evaluation).
        ignore_index: fill value of padded target pixels.

    Returns:
        ``[K, H_i, W_i]`` float32 logits per image (padding cropped off).

    Raises:
        ValueError: unknown mode; slide without ``crop``; ``targets`` not one per image.
    """
    if mode not in ("whole", "slide"):
        raise ValueError(f"eval.mode must be 'whole' or 'slide', got {mode!r}")
    if mode == "slide" and crop is None:
        raise ValueError("eval.mode=slide needs the window size (dataset.crop_size or the dataset's protocol)")
    if targets is not None and len(targets) != len(images):
        raise ValueError(f"{len(targets)} targets for {len(images)} images")
    chunk = max(int(batch_size or len(images)), 1)
    ph, pw = _patch_size(model)
    # One entry per forward row: (image index, y0, y1, x0, x1) in the padded image.
    pieces: list[tuple[int, int, int, int, int]] = []
    padded: list[Tensor] = []
    padded_targets: list[Tensor | None] = []
    for i, img in enumerate(images):
        h, w = int(img.shape[-2]), int(img.shape[-1])
        hp, wp = _padded_size(h, w, mode, crop, (ph, pw))
        padded.append(F.pad(img, (0, wp - w, 0, hp - h)) if (hp, wp) != (h, w) else img)
        padded_targets.append(None if targets is None else
                              _aligned_target(targets[i].to(img.device), (h, w), (hp, wp), ignore_index))
        if mode == "slide":
            st = stride or (crop[0] * 2 // 3, crop[1] * 2 // 3)  # type: ignore[index]
            pieces.extend((i, *box) for box in window_boxes(hp, wp, crop, st))  # type: ignore[arg-type]
        else:
            pieces.append((i, 0, hp, 0, wp))
    sums = [img.new_zeros(num_classes, *img.shape[-2:], dtype=torch.float32) for img in padded]
    counts = [img.new_zeros(1, *img.shape[-2:], dtype=torch.float32) for img in padded]
    # Forwards stack equal shapes: rows are grouped by input size (whole mode), then cut into chunks.
    by_size: dict[tuple[int, int], list[int]] = {}
    for k, (_, y0, y1, x0, x1) in enumerate(pieces):
        by_size.setdefault((y1 - y0, x1 - x0), []).append(k)
    groups = [rows[j:j + chunk] for rows in by_size.values() for j in range(0, len(rows), chunk)]
    for group in groups:
        rows = [pieces[k] for k in group]
        x = torch.stack([padded[i][:, y0:y1, x0:x1] for i, y0, y1, x0, x1 in rows])
        t = None
        if targets is not None:
            t = torch.stack([padded_targets[i][y0:y1, x0:x1] for i, y0, y1, x0, x1 in rows]).long()  # type: ignore
        out = model(x, t)
        if on_state is not None:
            ids = torch.tensor([first_image_id + r[0] for r in rows], dtype=torch.long)
            on_state(out.state, ids)
        logits = out.logits.float()
        for (i, y0, y1, x0, x1), lg in zip(rows, logits):
            sums[i][:, y0:y1, x0:x1] += lg
            counts[i][:, y0:y1, x0:x1] += 1
    results = []
    for img, s, c in zip(images, sums, counts):
        h, w = int(img.shape[-2]), int(img.shape[-1])
        results.append((s / c)[:, :h, :w])
    return results


def slide_inference(model: nn.Module, image: Tensor, crop: tuple[int, int], stride: tuple[int, int],
                    num_classes: int, on_state: Callable[[TokenState], None] | None = None) -> Tensor:
    """Sliding-window inference of a stacked batch (Segmenter / mmseg ``slide`` mode), logits averaged.

    Forwards of ``B`` windows each (``B * windows`` rows in all; see :func:`segment_images`).

    Args:
        model: a ``Segmenter``.
        image: ``[B, 3, H, W]``; padded (zeros) up to the window where smaller.
        crop: ``(h, w)`` px window, multiples of patch_size.
        stride: ``(sh, sw)`` px.
        num_classes: ``K``.
        on_state: called with every forward's token state (batch ``B`` windows).

    Returns:
        ``[B, K, H, W]`` averaged logits.
    """
    cb = None if on_state is None else (lambda state, ids: on_state(state))
    B = image.shape[0]
    per_image = segment_images(model, list(image), num_classes, "slide", crop, stride, batch_size=B,
                               on_state=cb)
    return torch.stack(per_image)


def _as_lists(images: Tensor | Sequence[Tensor], labels: Tensor | Sequence[Tensor]
              ) -> tuple[list[Tensor], list[Tensor]]:
    if isinstance(images, Tensor):
        images = list(images) if images.dim() == 4 else [images]
    if isinstance(labels, Tensor):
        labels = list(labels) if labels.dim() == 3 else [labels]
    if len(images) != len(labels):
        raise ValueError(f"loader gave {len(images)} images and {len(labels)} labels in one batch")
    return list(images), list(labels)


@torch.inference_mode()
def evaluate(model: nn.Module, loader: Iterable[tuple[Any, Any]], num_classes: int, device: torch.device,
             ignore_index: int = 255, mode: str = "whole", crop: tuple[int, int] | None = None,
             stride: tuple[int, int] | None = None, class_names: Iterable[str] | None = None,
             on_state: StateCallback | None = None, amp: bool = False, progress: bool = True,
             batch_size: int | None = None) -> dict[str, Any]:
    """Evaluates a segmenter: logits are bilinearly resized to each label's ORIGINAL resolution, then argmax.

    Args:
        model: a ``Segmenter``.
        loader: yields ``(images, labels)``: stacked ``[B, 3, H, W]`` / ``[B, h, w]``, or lists of
            ``[3, H_i, W_i]`` / ``[h_i, w_i]`` of different sizes (``tokred.data.eval_collate``).
        num_classes: ``K``.
        device: where the model runs.
        ignore_index: label value left out of the metrics.
        mode: ``"whole"`` (each image in one pass, padded to a multiple of patch_size) or ``"slide"``
            (windows of ``crop`` px every ``stride`` px; None = 2/3 of the window). The data set's protocol
            gives them: ``tokred.data.eval_inference``.
        crop / stride: ``(H, W)`` px.
        class_names: names for ``per_class_iou``.
        on_state: called as ``on_state(state, image_ids [B] long)`` after every forward (token accounting,
            e.g. ``TokenAccounting().update``); ``image_ids`` count images over the whole evaluation, so the
            windows of one image can be summed.
        amp: bf16 autocast (CUDA only).
        progress: show a progress bar.
        batch_size: rows per forward (images in whole mode, windows in slide mode); None = the loader's batch.

    Returns:
        ``ConfusionMatrix.summary`` plus ``"num_images"``.

    Raises:
        ValueError: unknown mode, ``slide`` without ``crop``, or a batch with unequal image and label counts.
    """
    if mode not in ("whole", "slide"):
        raise ValueError(f"eval.mode must be 'whole' or 'slide', got {mode!r}")
    if mode == "slide" and crop is None:
        raise ValueError("eval.mode=slide needs the window size (dataset.crop_size or the dataset's protocol)")
    model.eval()
    cm = ConfusionMatrix(num_classes, ignore_index)
    n = 0
    use_amp = amp and device.type == "cuda"
    for images, labels in tqdm(loader, desc="eval", leave=False, disable=not progress):
        images, labels = _as_lists(images, labels)
        images = [im.to(device, non_blocking=True) for im in images]
        labels = [lb.to(device, non_blocking=True) for lb in labels]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            # only oracle policies read the targets (an upper-bound baseline)
            logits = segment_images(model, images, num_classes, mode, crop, stride, batch_size=batch_size,
                                    targets=labels, on_state=on_state, first_image_id=n, ignore_index=ignore_index)
        for lg, lb in zip(logits, labels):
            if lg.shape[-2:] != lb.shape[-2:]:
                lg = F.interpolate(lg[None], size=lb.shape[-2:], mode="bilinear", align_corners=False)[0]
            cm.update(lg.argmax(0)[None], lb[None])
        n += len(images)
    result = cm.summary(class_names)
    result["num_images"] = n
    return result
