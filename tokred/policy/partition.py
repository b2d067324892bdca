"""Superpatch partition of the patch grid: a quadtree of nested, aligned windows (dCTS / CTS).

Implements tokred's reconstruction of dCTS (STEP, Szczepanski et al. arXiv 2509.14165, Sec. "dCTS"; see
``shared/papers/methods.md`` Sec. 1) and its special case CTS (Lu et al. CVPR 2023, Sec. 3.2; methods.md
Sec. 2). Pure, vectorised functions: no per-image Python loop, only small loops over levels.

Geometry. A *level* ``L`` is a window of ``L x L`` patches (``L * patch_size`` px per side). Level-``L`` windows
tile the grid from its top-left corner, aligned to multiples of ``L``: window ``(i, j)`` covers patch rows
``[i*L, (i+1)*L)`` and columns ``[j*L, (j+1)*L)``. Windows that would cross the bottom or right border are not
formed, so a grid of ``(H0, W0)`` patches has ``(H0 // L, W0 // L)`` level-``L`` windows. Because levels are
powers of two, windows of different levels are nested: a level-``L`` window lies inside exactly one window of
every coarser level that exists there, so an accepted coarse window either contains or avoids a finer one.

Token order. Every token is identified by its *anchor*, the raster index ``r * W0 + c`` of its top-left
patch. Tokens are numbered in raster order of their anchors (row-major over the top-left patches), so with
no window accepted token ``t`` is patch ``t``: the standard ViT order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "Partition", "check_levels", "normalize_thresholds", "num_windows", "quadtree_partition",
    "topk_partition", "partition_from_windows", "window_any", "upsample_windows",
]


@dataclass(frozen=True)
class Partition:
    """One partition of every image's patch grid into single patches and superpatches.

    Attributes:
        grid_size: ``(H0, W0)`` patches.
        label_map: ``[B, N0]`` (long) token id of every patch, in ``[0, num_tokens[b])``; tokens are numbered in
            raster order of their top-left patch (see module docstring).
        anchor: ``[B, N]`` (long) raster index of each token's top-left patch; 0 on padding slots.
        level: ``[B, N]`` (long) patches per side of each token (1 = single patch); 0 on padding slots.
        valid: ``[B, N]`` (bool) False on padding slots (images with fewer than ``N = max_b num_tokens`` tokens).
        num_tokens: ``[B]`` (long) tokens per image.
        accepted: level ``L`` -> ``[B, H0 // L, W0 // L]`` (bool) windows that became one supertoken.
    """

    grid_size: tuple[int, int]
    label_map: Tensor
    anchor: Tensor
    level: Tensor
    valid: Tensor
    num_tokens: Tensor
    accepted: dict[int, Tensor]

    @property
    def size(self) -> Tensor:
        """``[B, N]`` (long) patches per token (``level ** 2``; 0 on padding)."""
        return self.level * self.level

    @property
    def row(self) -> Tensor:
        """``[B, N]`` (long) patch row of each token's top-left patch."""
        return self.anchor // self.grid_size[1]

    @property
    def col(self) -> Tensor:
        """``[B, N]`` (long) patch column of each token's top-left patch."""
        return self.anchor % self.grid_size[1]


# ---------------------------------------------------------------------------------------------- validation
def check_levels(levels: Sequence[int], name: str = "levels") -> tuple[int, ...]:
    """Validates superpatch levels and returns them sorted ascending.

    Args:
        levels: patches per window side, each a power of two >= 2 (1 = single patches is implicit).
        name: parameter name used in error messages.

    Raises:
        ValueError: empty, duplicated, not integers, or not powers of two >= 2.
    """
    try:
        out = tuple(sorted(int(L) for L in levels))
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} must be a list of integers such as [2, 4, 8, 16], got {levels!r}") from err
    if not out:
        raise ValueError(f"{name} is empty; give at least one window size, e.g. [2]")
    if len(set(out)) != len(out):
        raise ValueError(f"{name} {list(levels)} has duplicates; list each window size once")
    bad = [L for L in out if L < 2 or L & (L - 1)]
    if bad:
        raise ValueError(f"{name} must be powers of two >= 2 (patches per window side, e.g. [2, 4, 8, 16]); "
                         f"{bad} are not")
    return out


def normalize_thresholds(thresholds: Mapping | Sequence[float] | float | None, levels: Sequence[int],
                         default: float = 0.5, name: str = "thresholds") -> dict[int, float]:
    """Per-level acceptance thresholds ``tau_L`` as a dict.

    Args:
        thresholds: ``{level: tau}`` (keys may be strings, e.g. from YAML), a list aligned with ``levels``
            sorted ascending, one float for every level, or None (``default`` for every level).
        levels: the levels in use.
        default: threshold used when ``thresholds`` is None.
        name: parameter name used in error messages.

    Returns:
        ``{L: tau_L}`` for every level in ``levels``.

    Raises:
        ValueError: wrong length or keys, or a value outside ``[0, 1]``.
    """
    levels = tuple(sorted(int(L) for L in levels))
    if thresholds is None:
        out = {L: float(default) for L in levels}
    elif isinstance(thresholds, (int, float)):
        out = {L: float(thresholds) for L in levels}
    elif isinstance(thresholds, Mapping):
        out = {int(k): float(v) for k, v in thresholds.items()}
        if set(out) != set(levels):
            raise ValueError(f"{name} has keys {sorted(out)} but levels are {list(levels)}; give one threshold "
                             "per level")
    else:
        vals = [float(v) for v in thresholds]
        if len(vals) != len(levels):
            raise ValueError(f"{name} has {len(vals)} values but there are {len(levels)} levels {list(levels)}; "
                             "give one threshold per level (ascending level order) or a {level: value} dict")
        out = dict(zip(levels, vals))
    bad = {L: t for L, t in out.items() if not 0.0 <= t <= 1.0}
    if bad:
        raise ValueError(f"{name} must lie in [0, 1] (scores are probabilities; 1 accepts nothing); got {bad}")
    return out


def num_windows(grid_size: tuple[int, int], level: int) -> tuple[int, int]:
    """``(H0 // L, W0 // L)`` windows of a level that fit inside the grid (border-crossing ones are not formed)."""
    return grid_size[0] // level, grid_size[1] // level


# ---------------------------------------------------------------------------------------------- helpers
def window_any(mask: Tensor, level: int) -> Tensor:
    """Whether any cell of each level-``L`` window is set.

    Args:
        mask: ``[B, H0, W0]`` (bool) cells.
        level: ``L`` patches per window side.

    Returns:
        ``[B, H0 // L, W0 // L]`` (bool).
    """
    B, H0, W0 = mask.shape
    h, w = H0 // level, W0 // level
    m = mask[:, : h * level, : w * level].reshape(B, h, level, w, level)  # [B, h, L, w, L]
    return m.any(dim=4).any(dim=2)


def upsample_windows(win: Tensor, level: int, grid_size: tuple[int, int]) -> Tensor:
    """Spreads per-window values onto the cells they cover; cells outside every window get 0/False.

    Args:
        win: ``[B, H0 // L, W0 // L]`` per-window values.
        level: ``L``.
        grid_size: ``(H0, W0)``.

    Returns:
        ``[B, H0, W0]`` per-cell values.
    """
    B, h, w = win.shape
    H0, W0 = grid_size
    up = win.repeat_interleave(level, dim=1).repeat_interleave(level, dim=2)  # [B, h*L, w*L]
    out = win.new_zeros(B, H0, W0)
    out[:, : h * level, : w * level] = up
    return out


def _flat_rank(key: Tensor, descending: bool) -> tuple[Tensor, Tensor]:
    """Stable sort of ``key [B, M]``: returns ``(order [B, M], rank [B, M])`` (rank of every element)."""
    order = torch.argsort(key, dim=1, descending=descending, stable=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(key.shape[1], device=key.device).expand_as(order))
    return order, rank


# ---------------------------------------------------------------------------------------------- selection
def quadtree_partition(scores: Mapping[int, Tensor], grid_size: tuple[int, int], thresholds: Mapping[int, float],
                       min_tokens: int | None = None, max_tokens: int | None = None) -> Partition:
    """dCTS selection, coarse to fine, with optional token caps (methods.md Sec. 1, tokred reconstruction).

    From the coarsest level down: a level-``L`` window is accepted when its score is ``> tau_L`` and none of
    its cells is covered by an already accepted (coarser) window; by nesting, such a window is then fully
    uncovered. Cells left at the end stay single patches.

    Caps (patch tokens, prefix tokens not counted; both best effort, documented choices):
        * ``max_tokens``: while an image has more tokens, the highest-scoring still-uncovered windows of the
          *finest* level are accepted as well (each saves ``L_min**2 - 1`` tokens). If every finest window is
          taken and the image is still above the cap, it stays above.
        * ``min_tokens`` (applied after ``max_tokens``): while an image has fewer tokens, accepted windows
          are rejected lowest score first, over all levels; a rejected window becomes single patches (it is
          not re-split into finer windows). A rejected large window can overshoot ``max_tokens``.

    Args:
        scores: level ``L`` -> ``[B, H0 // L, W0 // L]`` homogeneity scores in ``[0, 1]``.
        grid_size: ``(H0, W0)`` patches.
        thresholds: level ``L`` -> ``tau_L`` (see ``normalize_thresholds``); a score must be strictly above it,
            so ``tau_L = 1`` accepts nothing.
        min_tokens: optional lower bound on patch tokens per image.
        max_tokens: optional upper bound on patch tokens per image.

    Returns:
        The ``Partition``.

    Raises:
        ValueError: a level without a threshold, or a score map whose shape does not match the grid.
    """
    levels = sorted(scores, reverse=True)
    any_score = next(iter(scores.values()))
    B, device = any_score.shape[0], any_score.device
    H0, W0 = grid_size
    covered = torch.zeros(B, H0, W0, dtype=torch.bool, device=device)
    accepted: dict[int, Tensor] = {}
    for L in levels:
        if L not in thresholds:
            raise ValueError(f"no threshold for level {L}; thresholds cover {sorted(thresholds)}")
        s = scores[L]
        if tuple(s.shape) != (B, *num_windows(grid_size, L)):
            raise ValueError(f"scores for level {L} have shape {tuple(s.shape)}, expected "
                             f"{(B, *num_windows(grid_size, L))} for grid_size {tuple(grid_size)}")
        acc = (s > thresholds[L]) & ~window_any(covered, L)  # [B, h, w]
        accepted[L] = acc
        covered = covered | upsample_windows(acc, L, grid_size)
    if max_tokens is not None:
        accepted = _apply_max_tokens(scores, accepted, grid_size, max_tokens)
    if min_tokens is not None:
        accepted = _apply_min_tokens(scores, accepted, grid_size, min_tokens)
    return partition_from_windows(accepted, grid_size)


def _count_tokens(accepted: Mapping[int, Tensor], grid_size: tuple[int, int]) -> Tensor:
    """``[B]`` patch tokens of a window selection: ``N0 - sum_L accepted_L * (L**2 - 1)``."""
    n0 = grid_size[0] * grid_size[1]
    saved = sum(a.flatten(1).sum(1) * (L * L - 1) for L, a in accepted.items())
    return n0 - saved


def _apply_max_tokens(scores: Mapping[int, Tensor], accepted: dict[int, Tensor], grid_size: tuple[int, int],
                      max_tokens: int) -> dict[int, Tensor]:
    L = min(accepted)
    gain = L * L - 1
    covered = torch.zeros(accepted[L].shape[0], *grid_size, dtype=torch.bool, device=accepted[L].device)
    for Lc, a in accepted.items():
        covered = covered | upsample_windows(a, Lc, grid_size)  # [B, H0, W0]
    s = scores[L].flatten(1)  # [B, M]
    eligible = ~window_any(covered, L).flatten(1)  # [B, M] fully uncovered finest windows
    excess = (_count_tokens(accepted, grid_size) - max_tokens).clamp_min(0)  # [B]
    need = (excess + gain - 1) // gain  # [B] windows to add
    key = torch.where(eligible, s, torch.full_like(s, -float("inf")))
    _, rank = _flat_rank(key, descending=True)
    add = eligible & (rank < need[:, None])  # [B, M]
    out = dict(accepted)
    out[L] = accepted[L] | add.reshape(accepted[L].shape)
    return out


def _apply_min_tokens(scores: Mapping[int, Tensor], accepted: dict[int, Tensor], grid_size: tuple[int, int],
                      min_tokens: int) -> dict[int, Tensor]:
    levels = sorted(accepted)
    acc = torch.cat([accepted[L].flatten(1) for L in levels], 1)  # [B, M_all]
    s = torch.cat([scores[L].flatten(1).to(torch.float32) for L in levels], 1)
    gain = torch.cat([torch.full((accepted[L][0].numel(),), L * L - 1, device=acc.device) for L in levels])  # [M_all]
    deficit = (min_tokens - _count_tokens(accepted, grid_size)).clamp_min(0)  # [B]
    key = torch.where(acc, s, torch.full_like(s, float("inf")))
    order, _ = _flat_rank(key, descending=False)  # lowest-scoring accepted windows first
    g_sorted = gain[order] * acc.gather(1, order)  # [B, M_all]
    before = g_sorted.cumsum(1) - g_sorted  # tokens regained by the windows rejected before this one
    reject_sorted = acc.gather(1, order) & (before < deficit[:, None])
    reject = torch.zeros_like(acc).scatter(1, order, reject_sorted)
    acc = acc & ~reject
    out, start = {}, 0
    for L in levels:
        m = accepted[L][0].numel()
        out[L] = acc[:, start:start + m].reshape(accepted[L].shape)
        start += m
    return out


def topk_partition(scores: Tensor, grid_size: tuple[int, int], num_windows_k: int, level: int = 2) -> Partition:
    """CTS selection: the ``K`` highest-scoring level-``L`` windows of every image (Lu et al. CVPR 2023, Sec. 3.2).

    Every image gets exactly ``K`` supertokens, so every image has ``N0 - K * (L**2 - 1)`` tokens and the batch
    needs no padding. Ties are broken by raster order (stable sort).

    Args:
        scores: ``[B, H0 // L, W0 // L]`` homogeneity scores.
        grid_size: ``(H0, W0)`` patches.
        num_windows_k: ``K`` windows shared per image.
        level: ``L`` (CTS: 2).

    Returns:
        The ``Partition``.

    Raises:
        ValueError: ``K`` is negative or larger than the number of windows.
    """
    B = scores.shape[0]
    m = scores[0].numel()
    if not 0 <= num_windows_k <= m:
        raise ValueError(f"num_windows={num_windows_k} but a grid of {tuple(grid_size)} patches has only {m} "
                         f"level-{level} windows; choose num_windows in [0, {m}]")
    _, rank = _flat_rank(scores.reshape(B, m).to(torch.float32), descending=True)
    acc = (rank < num_windows_k).reshape(scores.shape)  # [B, h, w]
    return partition_from_windows({level: acc}, grid_size)


def partition_from_windows(accepted: Mapping[int, Tensor], grid_size: tuple[int, int]) -> Partition:
    """Builds the token map and per-token fields from accepted, non-overlapping windows.

    Args:
        accepted: level ``L`` -> ``[B, H0 // L, W0 // L]`` (bool) accepted windows; windows of different levels
            must not overlap (a precondition, not checked: the selection functions guarantee it).
        grid_size: ``(H0, W0)``.

    Returns:
        The ``Partition`` (tokens in raster order of their top-left patch).
    """
    H0, W0 = grid_size
    n0 = H0 * W0
    any_acc = next(iter(accepted.values()))
    B, device = any_acc.shape[0], any_acc.device
    rows = torch.arange(H0, device=device)[:, None]
    cols = torch.arange(W0, device=device)[None, :]
    anchor = (rows * W0 + cols).expand(B, H0, W0)  # [B, H0, W0] top-left patch of each cell's token
    level = torch.ones(B, H0, W0, dtype=torch.long, device=device)
    for L, acc in accepted.items():
        up = upsample_windows(acc, L, grid_size)  # [B, H0, W0]
        anchor_L = ((rows // L) * L) * W0 + (cols // L) * L  # [H0, W0]
        anchor = torch.where(up, anchor_L, anchor)
        level = torch.where(up, torch.full_like(level, L), level)
    anchor = anchor.reshape(B, n0)
    level = level.reshape(B, n0)
    is_anchor = anchor == torch.arange(n0, device=device)  # [B, N0]
    token_at = is_anchor.long().cumsum(1) - 1  # [B, N0] token id at anchors
    label_map = token_at.gather(1, anchor)  # [B, N0]
    num_tokens = is_anchor.sum(1)  # [B]
    n = int(num_tokens.max())
    order = torch.argsort((~is_anchor).to(torch.int8), dim=1, stable=True)[:, :n]  # [B, N] anchors, raster order
    valid = torch.arange(n, device=device)[None, :] < num_tokens[:, None]  # [B, N]
    tok_anchor = torch.where(valid, order, torch.zeros_like(order))
    tok_level = torch.where(valid, level.gather(1, order), torch.zeros_like(order))
    return Partition(grid_size=(H0, W0), label_map=label_map, anchor=tok_anchor, level=tok_level, valid=valid,
                     num_tokens=num_tokens, accepted={L: a for L, a in accepted.items()})
