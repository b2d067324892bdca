"""Uniform pooling: bigger patches everywhere, the content-blind counterpart of CTS / dCTS superpatches.

Every aligned ``window x window`` patch window becomes one token, the size-weighted mean of the tokens in
it (``TokenState.merge``), so a ViT with ``patch_size`` 16 px and ``window = 2`` sees 32 px tokens. CTS
(Lu, de Geus, Dubbelman, CVPR 2023) and dCTS (STEP, methods.md Sec. 1) share a token only where the
content is uniform; this baseline shares everywhere, which shows what content-awareness buys at the same
token count. Unlike CTS's supertoken embedding (pixels pooled, then embedded), the tokens are pooled after
the patch embedding, so it works at any block and for any backbone.

Documented choices:
    * Windows are aligned on the patch grid from the top-left corner; where ``H0`` or ``W0`` is not a
      multiple of ``window``, the partial windows along the bottom and right borders stay single patches.
    * A token belongs to the window of the first patch it covers (lowest raster index, from
      ``state.token_map``); tokens already banked by a pruner are left alone, the live tokens of a window
      are merged among themselves.
    * Output order: by the raster index of the window's top-left patch (single patches: their own index),
      i.e. the unreduced order. Images that end with different counts are padded (``state.valid``).
    * Proportional attention (``log(size)`` added to the attention logits, ToMe Eq. 1) is off by default;
      every merged token has the same size, so it only reweighs the border patches.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

from tokred import BackboneInfo, Merger, TokenState
from tokred_baselines._tokens import first_patch

if TYPE_CHECKING:
    from tokred import EmbedContext

__all__ = ["UniformPool"]


class UniformPool(Merger):
    """Merges every aligned ``window x window`` patch window into one token (size-weighted mean).

    Args:
        window: patches per window side (1 = no merging, 2 = 2x2 patches per token, ...).
        block: 0-based block BEFORE which the windows are merged; 0 = right after the patch embedding
            (the ``on_embed`` hook), ``i > 0`` = between block ``i - 1`` and block ``i``.
        proportional_attention: add ``log(size)`` to every key's attention logit from then on.

    Raises:
        ValueError: ``window`` < 1 or ``block`` < 0; and in ``setup``: ``block`` >= depth or a ``window``
            larger than the training grid.
    """

    kind: ClassVar[str] = "merger"

    def __init__(self, window: int = 2, block: int = 0, proportional_attention: bool = False) -> None:
        super().__init__()
        if int(window) < 1:
            raise ValueError(f"uniform_pool window must be >= 1 patch per side, got {window}")
        if int(block) < 0:
            raise ValueError(f"uniform_pool block must be a 0-based block index >= 0, got {block}")
        self.window = int(window)
        self.block = int(block)
        self.proportional_attention = bool(proportional_attention)

    @classmethod
    def identity_config(cls) -> dict[str, Any]:
        """``window = 1``: every window is one patch, nothing merges."""
        return {"window": 1}

    @classmethod
    def example_config(cls) -> dict[str, Any]:
        """2x2 windows right after the embedding: 8 x 10 patches -> 20 tokens."""
        return {"window": 2}

    def setup(self, info: BackboneInfo) -> None:
        """Checks ``block`` against the depth and ``window`` against the training grid.

        Raises:
            ValueError: ``block`` >= depth, or ``window`` larger than a side of ``info.grid_size``.
        """
        super().setup(info)
        if self.block >= info.depth:
            raise ValueError(f"uniform_pool block={self.block} but the backbone has depth {info.depth} "
                             f"(0-based blocks 0..{info.depth - 1}); lower block")
        H0, W0 = info.grid_size
        if self.window > min(H0, W0):
            raise ValueError(f"uniform_pool window={self.window} patches is larger than the grid_size "
                             f"{tuple(info.grid_size)} of the crop; use window <= {min(H0, W0)}")

    def extra_config(self) -> dict[str, Any]:
        return {"window": self.window, "block": self.block, "proportional_attention": self.proportional_attention}

    # ------------------------------------------------------------------ hooks
    def on_embed(self, x: Tensor, state: TokenState, ctx: EmbedContext) -> tuple[Tensor, TokenState]:
        """Pools right after the embedding when ``block == 0``."""
        if self.block == 0:
            return self.pool(x, state)
        return x, state

    def on_block_start(self, block: int, x: Tensor, state: TokenState) -> tuple[Tensor, TokenState]:
        """Pools before block ``block`` when ``block > 0``."""
        if block == self.block and block > 0:
            return self.pool(x, state)
        return x, state

    # ------------------------------------------------------------------ the merge
    def window_assignment(self, state: TokenState, num_tokens: int) -> tuple[Tensor, int, Tensor]:
        """Destination slot of every token: prefix tokens stay, live tokens go to their window's slot.

        Args:
            state: the token state.
            num_tokens: ``N``, slots of the current ``x [B, N, C]``.

        Returns:
            ``(assign [B, N] (long) slot in [0, N'), N' = P + max groups per image, [B] groups per image)``.
            Padding slots are sent to the first patch slot, whose size they do not change.
        """
        P = state.num_prefix_tokens
        H0, W0 = state.grid_size
        N0 = H0 * W0
        w = self.window
        first = first_patch(state, num_tokens)  # [B, N], N0 for prefix / padding
        is_patch = first < N0
        f = first.clamp_max(N0 - 1)
        row, col = f // W0, f % W0  # [B, N] patches
        inside = (row < H0 // w * w) & (col < W0 // w * w)  # whole windows only; border stays single
        key = torch.where(inside, (row // w * w) * W0 + col // w * w, f)  # [B, N] window's top-left patch
        key = torch.where(is_patch, key, torch.full_like(key, N0))
        B = key.shape[0]
        present = torch.zeros(B, N0 + 1, dtype=torch.bool, device=key.device).scatter(1, key, True)[:, :N0]
        slot = present.long().cumsum(1) - 1  # [B, N0] rank of each present group in raster order
        groups = present.sum(1)  # [B]
        n_out = P + int(groups.max())
        assign = P + slot.gather(1, key.clamp_max(N0 - 1)).clamp_min(0)  # [B, N]
        prefix = torch.arange(num_tokens, device=key.device).expand(B, num_tokens) < P
        assign = torch.where(prefix, torch.arange(num_tokens, device=key.device).expand(B, num_tokens), assign)
        return assign, n_out, groups

    def pool(self, x: Tensor, state: TokenState) -> tuple[Tensor, TokenState]:
        """Merges the live tokens of every aligned window into one token.

        Args:
            x: ``[B, N, C]`` tokens.
            state: the token state.

        Returns:
            ``(x' [B, P + G, C], state)``, ``G`` the largest number of groups (windows plus border patches)
            in any image: ``(H0 // w) * (W0 // w) + H0 * W0 - (H0 // w * w) * (W0 // w * w)`` when nothing
            was reduced before. Tokens merged away per image go to ``state.stats["uniform_pool_merged"]``.
        """
        if self.window == 1:
            return x, state
        assign, n_out, groups = self.window_assignment(state, x.shape[1])
        before = state.live_patch_tokens()  # [B]
        if state.valid is None and bool((groups != groups.max()).any()):
            # images end with different counts: an explicit validity mask lets merge mark the empty slots
            state = replace(state, valid=state.valid_mask())
        x, state = state.merge(x, assign, n_out)
        if state.valid is not None and bool(state.valid.all()):
            state = replace(state, valid=None)
        if self.proportional_attention and not state.proportional_attention:
            state = replace(state, proportional_attention=True)
        return x, state.add_stat("uniform_pool_merged", before - groups)
