"""Labels on the patch grid and per token: the ground truth the analysis compares token fates against.

Convention (used by every table of ``tokred analyze``): a patch cell's label is the **majority** class of its
non-ignored pixels (the label nearest-resized to the network input first); a cell whose pixels are all ignored
has the ignore label. A token's label is the majority class of the non-ignored pixels of all its cells, and
the token is *uniform* when those pixels hold exactly one class.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from tokred.state import TokenState, bank_code

__all__ = ["cell_class_counts", "majority_label", "token_class_counts", "token_slots"]


def cell_class_counts(labels: Tensor, grid_size: tuple[int, int], num_classes: int,
                      ignore_index: int = 255) -> Tensor:
    """Pixels of each class inside each patch cell.

    Args:
        labels: ``[B, H, W]`` (long) train ids at the network input's resolution (H, W px multiples of the
            grid), ``ignore_index`` for ignored pixels.
        grid_size: ``(H0, W0)`` patches.
        num_classes: ``K``.
        ignore_index: label value counted in no class.

    Returns:
        ``[B, K, H0, W0]`` (float) pixel counts.

    Raises:
        ValueError: H or W is not a multiple of the grid.
    """
    B, H, W = labels.shape
    H0, W0 = grid_size
    if H % H0 or W % W0:
        raise ValueError(f"labels of {H}x{W} px do not tile the {H0}x{W0} patch grid")
    valid = (labels != ignore_index) & (labels >= 0) & (labels < num_classes)
    onehot = F.one_hot(torch.where(valid, labels, 0), num_classes).to(torch.float32)  # [B, H, W, K]
    onehot = onehot * valid.unsqueeze(-1)
    per = onehot.reshape(B, H0, H // H0, W0, W // W0, num_classes).sum((2, 4))  # [B, H0, W0, K]
    return per.permute(0, 3, 1, 2).contiguous()


def majority_label(counts: Tensor, ignore_index: int = 255) -> Tensor:
    """``[B, K, ...]`` class counts -> ``[B, ...]`` (long) majority class, ``ignore_index`` where all are zero."""
    lab = counts.argmax(1)
    return torch.where(counts.sum(1) > 0, lab, torch.full_like(lab, ignore_index))


def token_slots(state: TokenState) -> tuple[Tensor, int]:
    """Unified slot of every cell's token: live token ``t`` -> ``t``, bank slot ``j`` -> ``N + j``.

    Returns:
        ``([B, N0] long slots, N + M slots in all)``.
    """
    N = state.size.shape[1]
    M = 0 if state.bank is None else state.bank.num_slots
    tm = state.token_map
    return torch.where(tm >= 0, tm, N + bank_code(tm)), N + M


def token_class_counts(state: TokenState, counts: Tensor) -> tuple[Tensor, Tensor]:
    """Per token of the final state: how many cells it holds and its pixels per class.

    Args:
        state: a final token state (live tokens and bank).
        counts: ``[B, K, H0, W0]`` pixel counts per cell (``cell_class_counts``).

    Returns:
        ``([B, S] cells per slot, [B, S, K] pixels per class)`` over the ``S = N + M`` unified slots of
        ``token_slots`` (prefix tokens and padding hold 0 cells).
    """
    B, K = counts.shape[:2]
    slot, S = token_slots(state)  # [B, N0]
    flat = counts.flatten(2).transpose(1, 2)  # [B, N0, K]
    pix = flat.new_zeros(B, S, K).scatter_add(1, slot.unsqueeze(-1).expand(-1, -1, K), flat)
    cells = flat.new_zeros(B, S).scatter_add(1, slot, torch.ones_like(slot, dtype=flat.dtype))
    return cells, pix
