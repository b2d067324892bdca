"""Window homogeneity labels from ground truth: the policy's training targets and the oracle policy.

A level-``L`` window (``L x L`` patches, ``L * patch_size`` px per side, aligned as in
``tokred.policy.partition``) is *uniform* when its labelled pixels hold exactly one class (CTS, Lu et al.
CVPR 2023, Sec. 3.3; dCTS in STEP applies the same rule at every level, methods.md Sec. 1).

Ignore pixels (configurable; the defaults are CTS's labelling rule, tue-mps/cts-segmenter):
    * ``all_ignore``: windows whose pixels are all ``ignore_index``. CTS counts them as positive (sharing a
      token there costs nothing in the evaluation): default ``"positive"``.
    * ``partial_ignore``: windows mixing one class with ignore pixels. CTS counts them as negative (the window
      holds two label values): default ``"negative"``. ``"positive"`` is tokred's earlier rule (the labelled
      pixels agree, so sharing loses nothing that is evaluated).
    Each takes ``"positive"`` (target 1), ``"negative"`` (target 0) or ``"exclude"`` (target 0 and left out
    of the loss through the returned mask).

Difference from the reference code: CTS's ADE20K policy loader also leaves one-class-plus-ignore windows
in the outermost row and column of windows out of the loss; tokred applies one rule everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["DEFAULT_ALL_IGNORE", "DEFAULT_PARTIAL_IGNORE", "IGNORE_MODES", "window_labels", "oracle_scores",
           "resize_labels"]

IGNORE_MODES = ("positive", "negative", "exclude")
DEFAULT_ALL_IGNORE = "positive"  # CTS: an all-ignore window is uniform
DEFAULT_PARTIAL_IGNORE = "negative"  # CTS: one class plus ignore pixels is not uniform


def _check_mode(value: str, name: str) -> None:
    if value not in IGNORE_MODES:
        raise ValueError(f"{name}={value!r} is not one of {IGNORE_MODES}")


def resize_labels(label: Tensor, size: tuple[int, int]) -> Tensor:
    """Nearest-resizes ``[B, H', W']`` labels to ``size = (H, W)`` px (identity when the size already matches)."""
    if tuple(label.shape[-2:]) == tuple(size):
        return label
    return F.interpolate(label[:, None].float(), size=tuple(size), mode="nearest")[:, 0].to(label.dtype)


def window_labels(label: Tensor, level: int, patch_size: int, ignore_index: int = 255,
                  all_ignore: str = DEFAULT_ALL_IGNORE,
                  partial_ignore: str = DEFAULT_PARTIAL_IGNORE) -> tuple[Tensor, Tensor]:
    """Uniform / not-uniform target for every level-``L`` window of a label map.

    Args:
        label: ``[B, H, W]`` (long) class ids in px, ``ignore_index`` ignored. Only the part covered by whole
            windows (``H // (L * patch_size)`` rows of windows, same for columns) is read.
        level: ``L`` patches per window side (1 = single patches, also accepted).
        patch_size: px per patch side.
        ignore_index: label value of unlabelled pixels.
        all_ignore: treatment of all-ignore windows (see module docstring).
        partial_ignore: treatment of windows with one class plus ignore pixels.

    Returns:
        ``(target [B, H // (L*p), W // (L*p)] float in {0, 1}, mask [same] bool: windows that count in a loss)``.

    Raises:
        ValueError: unknown ignore mode, or ``level``/``patch_size`` below 1.
    """
    _check_mode(all_ignore, "all_ignore")
    _check_mode(partial_ignore, "partial_ignore")
    if level < 1 or patch_size < 1:
        raise ValueError(f"level ({level}) and patch_size ({patch_size}) must be >= 1")
    B, H, W = label.shape
    s = level * patch_size  # px per window side
    h, w = H // s, W // s
    lab = label[:, : h * s, : w * s].reshape(B, h, s, w, s)  # [B, h, s, w, s]
    known = lab != ignore_index
    has_known = known.any(4).any(2)  # [B, h, w]
    has_ignore = (~known).any(4).any(2)
    big = torch.iinfo(lab.dtype).max if not lab.dtype.is_floating_point else float("inf")
    lo = torch.where(known, lab, torch.full_like(lab, big)).amin(dim=(2, 4))  # [B, h, w]
    hi = torch.where(known, lab, torch.full_like(lab, -1)).amax(dim=(2, 4))
    one_class = has_known & (lo == hi)
    target = one_class & ~has_ignore
    mask = torch.ones_like(target)
    for region, mode in ((~has_known, all_ignore), (one_class & has_ignore, partial_ignore)):
        if mode == "positive":
            target = target | region
        elif mode == "exclude":
            mask = mask & ~region
    return target.to(torch.float32), mask


def oracle_scores(label: Tensor, levels: Sequence[int], patch_size: int, ignore_index: int = 255,
                  all_ignore: str = DEFAULT_ALL_IGNORE,
                  partial_ignore: str = DEFAULT_PARTIAL_IGNORE) -> dict[int, Tensor]:
    """Ground-truth homogeneity as policy scores: 1 for uniform windows, 0 otherwise (the oracle policy).

    Windows left out by ``"exclude"`` score 0 (never merged). Upper-bound baseline of methods.md Sec. 1.

    Args:
        label: ``[B, H, W]`` (long) labels at the input image's resolution.
        levels: window levels.
        patch_size: px per patch side.

    Returns:
        level ``L`` -> ``[B, H // (L*p), W // (L*p)]`` float scores in {0, 1}.
    """
    out = {}
    for L in levels:
        target, mask = window_labels(label, L, patch_size, ignore_index, all_ignore, partial_ignore)
        out[int(L)] = target * mask
    return out
