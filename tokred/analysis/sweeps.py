"""Reading a split at the network input size, and training-free threshold sweeps at evaluation time.

The analysis segments every image whole at ``dataset.crop_size`` (images resized bilinearly when the split's
pipeline gives another size, labels nearest-resized to it) so that every image has the same patch grid; its
mIoU is therefore measured at the input resolution, not at the label's original one as ``tokred eval`` does.

Sweeps (DToP Sec. 4 draws mIoU against GFLOPs over thresholds): the reducers' thresholds are plain attributes
of the built model, set for one pass and restored afterwards, no retraining:

* early exit ``p0``: ``EarlyExit.threshold`` (a token halts when its exit head's max softmax probability is
  above it; 1.0 halts nothing);
* dCTS ``tau``: ``DCTS.thresholds`` (``{level: tau}``; one value for every level; 1.0 accepts no window).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from tokred.engine.evaluate import ConfusionMatrix
from tokred.measure.flops import analytic_vit_gflops
from tokred.measure.tokens import TokenAccounting

__all__ = ["iterate_split", "light_pass", "set_attribute", "sweep"]


def iterate_split(ds: Any, batch_size: int, crop: tuple[int, int], device: torch.device,
                  max_items: int | None = None, indices: Sequence[int] | None = None, num_workers: int = 0
                  ) -> Iterator[tuple[list[int], list[str], Tensor, Tensor]]:
    """Batches of the split at the input size, read by ``tokred.config.make_loader`` (in order).

    Args:
        ds: an evaluation ``SegmentationDataset`` (items ``(image [3, H, W], label [h, w])``).
        batch_size: images per forward.
        crop: ``(H, W)`` px network input.
        device: where the tensors go.
        max_items: the first ``max_items`` images only (None: all).
        indices: these images only (overrides ``max_items``).
        num_workers: data-loader worker processes.

    Yields:
        ``(indices, file names, images [B, 3, H, W], labels [B, H, W] long)``.
    """
    from torch.utils.data import Subset

    from tokred.config import make_loader

    n = len(ds) if max_items is None else min(len(ds), int(max_items))
    idx = [int(i) for i in indices] if indices is not None else list(range(n))
    sub = ds if idx == list(range(len(ds))) else Subset(ds, idx)
    files = getattr(ds, "files", None)
    pos = 0
    for images, labels in make_loader(sub, max(int(batch_size), 1), False, int(num_workers)):
        chunk = idx[pos:pos + len(images)]
        pos += len(images)
        ims, lbs = [], []
        for im, lb in zip(images, labels):
            if tuple(im.shape[-2:]) != tuple(crop):
                im = F.interpolate(im[None], size=crop, mode="bilinear", align_corners=False)[0]
            if tuple(lb.shape[-2:]) != tuple(crop):
                lb = F.interpolate(lb[None, None].float(), size=crop, mode="nearest")[0, 0].long()
            ims.append(im)
            lbs.append(lb.long())
        names = [files[i][0].name if files is not None else str(i) for i in chunk]
        yield chunk, names, torch.stack(ims).to(device), torch.stack(lbs).to(device)


@contextlib.contextmanager
def set_attribute(obj: Any, name: str, value: Any) -> Iterator[None]:
    """Sets ``obj.name = value`` for the duration of the block, then restores the old value."""
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


@torch.no_grad()
def light_pass(seg: nn.Module, batches: Iterator[tuple[list[int], list[str], Tensor, Tensor]], num_classes: int,
               ignore_index: int, encoder_dims: tuple[int, int, int, float], depth: int) -> dict[str, Any]:
    """mIoU (input resolution), token accounting and analytic GFLOPs of one pass.

    Returns:
        ``miou``, ``halted_fraction`` (tokens), ``halted_patch_fraction``, ``token_reduction`` (``N0`` / tokens
        entering block 0), ``token_blocks_ratio`` (token-blocks processed / the unreduced ``depth * N0``),
        ``gflops_analytic`` (mean per image), ``num_images``.
    """
    cm = ConfusionMatrix(num_classes, ignore_index)
    acc = TokenAccounting()
    embed_dim, P, patch, mlp_ratio = encoder_dims
    gflops: list[float] = []
    blocks_ratio: list[float] = []
    for _, _, images, labels in batches:
        out = seg(images, labels)
        cm.update(out.logits.argmax(1), labels)
        acc.update(out.state)
        n0 = out.state.num_patches
        tpb = torch.stack([t.cpu() for t in out.state.tokens_per_block], 1).numpy()  # [B, depth]
        for row in tpb:
            gflops.append(analytic_vit_gflops(embed_dim, depth, [int(n) + P for n in row], mlp_ratio=mlp_ratio,
                                              patch_size=patch, num_patches=n0))
            blocks_ratio.append(float(row.sum()) / (depth * n0))
    s = acc.summary()
    return {"miou": cm.summary()["miou"], "halted_fraction": s["halted_fraction"],
            "halted_patch_fraction": s["halted_patch_fraction"], "token_reduction": s["token_reduction"],
            "token_blocks_ratio": float(np.mean(blocks_ratio)), "gflops_analytic": float(np.mean(gflops)),
            "num_images": s["num_images"]}


def sweep(seg: nn.Module, target: Any, attribute: str, values: Sequence[Any], make_batches: Any,
          name: str, progress: bool = True, **pass_kwargs: Any) -> pd.DataFrame:
    """One ``light_pass`` per value of ``target.attribute``.

    Args:
        seg: the segmenter (eval mode).
        target: the reducer whose attribute is swept.
        attribute: e.g. ``"threshold"`` (early exit) or ``"thresholds"`` (dCTS).
        values: ``(label, attribute value)`` pairs: the label goes into the table's ``name`` column.
        make_batches: callable returning a fresh batch iterator (``iterate_split``).
        name: the table's first column (``p0``, ``tau``).
        progress: show a progress bar.
        pass_kwargs: forwarded to ``light_pass``.

    Returns:
        One row per value: ``name`` and the ``light_pass`` numbers.
    """
    rows = []
    for label, value in tqdm(list(values), desc=f"sweep {name}", leave=False, disable=not progress):
        with set_attribute(target, attribute, value):
            rows.append({name: label, **light_pass(seg, make_batches(), **pass_kwargs)})
    return pd.DataFrame(rows)
