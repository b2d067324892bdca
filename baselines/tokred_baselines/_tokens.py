"""Token-to-patch queries shared by the baselines, written on ``TokenState``'s public fields only."""

from __future__ import annotations

import torch
from torch import Tensor

from tokred import TokenState


def first_patch(state: TokenState, num_tokens: int) -> Tensor:
    """Raster index of the first (lowest-index) patch that each live token covers.

    Args:
        state: the token state (its ``token_map [B, N0]``).
        num_tokens: ``N``, slots of the current ``x [B, N, C]``.

    Returns:
        ``[B, N]`` (long) patch index in ``[0, N0)``; ``N0`` for slots that cover no patch (prefix tokens,
        padding).
    """
    B, N0 = state.token_map.shape
    live = state.token_map >= 0  # [B, N0], banked patches point at bank slots
    slot = torch.where(live, state.token_map, torch.full_like(state.token_map, num_tokens))  # [B, N0]
    patch = torch.arange(N0, device=slot.device).expand(B, N0)
    first = torch.full((B, num_tokens + 1), N0, dtype=torch.long, device=slot.device)
    first = first.scatter_reduce(1, slot, patch, reduce="amin", include_self=True)  # [B, N + 1]
    return first[:, :num_tokens]
