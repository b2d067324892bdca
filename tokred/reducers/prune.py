"""Scored pruning: one pure selection function and the base class of every pruner that only scores tokens.

A scored pruner (Token Cropr, Bergner et al. CVPR 2025, Sec. 3.2; the random-pruner baseline) removes, after
each chosen block, the ``r`` lowest-scoring tokens of every image into the state's bank. Everything except
the score is shared here: resolving the pruning blocks, the budget checks, protecting prefix tokens and
padding, the per-image top-k (``select_topk``), banking (``TokenState.split``) and the optional last-layer
fusion (Cropr Sec. 3.4). A subclass supplies ``score(block, x, state) -> [B, N]`` and its own parameters.

Budgets are per image (``ScoredPruner.budget``): image ``b``'s schedule is evaluated at its own token count
(a keep ratio of its own tokens, spread over the pruning blocks), and it removes ``min(r_b, live_b - 1)``
tokens, so at least one patch token of every image stays live and an image's choice never depends on the
other images of the batch (a batch of images with different live counts, e.g. after dCTS, equals its images
run one by one). Requested and removed counts are recorded per block (``record_budget``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from tokred.reducers.base import BackboneInfo, Pruner, record_budget
from tokred.schedules import Schedule, as_schedule, per_image_budgets
from tokred.state import TokenState

__all__ = ["ScoredPruner", "select_topk"]

log = logging.getLogger(__name__)

_TOKENS_IN = "pruner_tokens_in"  # per-image stat: live patch tokens at the first pruning block


@torch.no_grad()
def select_topk(scores: Tensor, num_drop: Tensor, protect: Tensor) -> Tensor:
    """Keep mask that drops the ``num_drop[b]`` lowest-scoring unprotected tokens of every image ``b``.

    Pure function, no gradient. Ties drop the earlier token first (stable sort). ``num_drop`` is clipped to
    the image's unprotected token count, so protected tokens are always kept.

    Args:
        scores: ``[B, N]`` token scores, higher = keep.
        num_drop: ``[B]`` (long) tokens to drop per image (``>= 0``).
        protect: ``[B, N]`` (bool) tokens never dropped (prefix tokens, padding slots).

    Returns:
        ``[B, N]`` (bool) True for the tokens kept.
    """
    B, N = scores.shape
    key = scores.float().masked_fill(protect, float("inf"))  # [B, N]
    order = key.argsort(dim=1, stable=True)  # [B, N] ascending: the lowest first
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(N, device=scores.device).expand(B, N))
    num_drop = torch.minimum(num_drop.to(scores.device), (~protect).sum(1))  # [B]
    return ~((rank < num_drop[:, None]) & ~protect)


class ScoredPruner(Pruner):
    """Base of the pruners that rank tokens by a score: after each block of ``blocks``, bank the lowest ones.

    Subclasses implement ``score`` and call ``super().__init__`` with the shared parameters below (and
    ``super().setup`` before creating their own modules). The budget of block ``i`` is
    ``schedule.budgets(depth, N0, progress)[i]`` (plus ``first_extra`` at the first pruning block), clipped
    per image to leave at least one live patch token.

    Args:
        r: tokens removed after each pruning block (the base budget of ``schedule``).
        schedule: budget schedule; None -> ``Constant(r)``; a Mapping -> ``build_schedule(r=r, **mapping)``.
        blocks: 0-based indices of the blocks AFTER which tokens are pruned, strictly increasing, each in
            ``[0, depth - 1)``; None -> every block except the last two (``0 .. depth - 3``, Cropr's placement).
        last_layer_fusion: banked tokens rejoin the live set before the final block (Cropr Sec. 3.4); when
            False they stay in the bank and the decoder sees the features they were banked with.
        first_extra: tokens removed by the first pruning block in addition to its budget (``>= 0``).

    Raises:
        ValueError: negative ``r`` or ``first_extra``; ``blocks`` negative or not strictly increasing; a
            schedule of another type; and in ``setup``: ``blocks`` outside ``[0, depth - 1)`` or a budget
            that leaves no patch token at the training grid.
    """

    kind: ClassVar[str] = "pruner"
    label: ClassVar[str] = "scored pruner"  # how messages name the pruner (its registry name)

    def __init__(self, r: int = 8, schedule: Schedule | Mapping[str, Any] | None = None,
                 blocks: Sequence[int] | None = None, last_layer_fusion: bool = True, first_extra: int = 0) -> None:
        super().__init__()
        name = self.label
        if r < 0:
            raise ValueError(f"{name} r must be >= 0 (tokens removed per pruning block), got {r}")
        if first_extra < 0:
            raise ValueError(f"{name} first_extra must be >= 0 (extra tokens removed by the first module), "
                             f"got {first_extra}")
        self.schedule: Schedule = as_schedule(schedule, r, name)
        self.r = int(r)
        self.first_extra = int(first_extra)
        self.last_layer_fusion = bool(last_layer_fusion)
        self.blocks_config = None if blocks is None else [int(b) for b in blocks]
        if self.blocks_config is not None:
            self._check_blocks(self.blocks_config, depth=None)
        self.blocks: tuple[int, ...] = ()

    # ------------------------------------------------------------------ configuration
    def _check_blocks(self, blocks: Sequence[int], depth: int | None) -> None:
        name = self.label
        if any(b < 0 for b in blocks):
            raise ValueError(f"{name} blocks={list(blocks)}: block indices are 0-based and must be >= 0")
        if any(b2 <= b1 for b1, b2 in zip(blocks, blocks[1:])):
            raise ValueError(f"{name} blocks={list(blocks)} must be strictly increasing (0-based block indices)")
        bad = [] if depth is None else [b for b in blocks if b >= depth - 1]
        if bad:
            raise ValueError(f"{name} blocks={list(blocks)}: {bad} are outside [0, {depth - 1}) for a depth-{depth} "
                             "backbone (0-based; pruning after the last block removes nothing); drop them")

    def setup(self, info: BackboneInfo) -> None:
        """Resolves the pruning blocks and checks the full budget at the training grid.

        Raises:
            ValueError: see the class docstring.
        """
        super().setup(info)
        depth = info.depth
        blocks = list(range(max(depth - 2, 0))) if self.blocks_config is None else list(self.blocks_config)
        self._check_blocks(blocks, depth)
        n0 = info.grid_size[0] * info.grid_size[1]
        budgets = self.schedule.budgets_for(depth, n0, 1.0, blocks)
        n = n0
        for j, b in enumerate(blocks):
            n -= budgets[b] + (self.first_extra if j == 0 else 0)
            if n < 1:
                raise ValueError(
                    f"{self.label} r={self.r} (schedule {self.schedule.config()}, first_extra "
                    f"{self.first_extra}) removes too many tokens: after block {b} {n} of {n0} patch tokens "
                    f"({info.grid_size[0]}x{info.grid_size[1]}) would remain (at least 1 must); lower r or prune "
                    "after fewer blocks")
        self.blocks = tuple(blocks)
        log.info("%s: pruning after blocks %s (0-based), %d patch tokens left, fusion before block %d: %s",
                 self.label, blocks, n, depth - 1, self.last_layer_fusion)

    def extra_config(self) -> dict[str, Any]:
        return {"r": self.r, "schedule": self.schedule.config(),
                "blocks": list(self.blocks) if self.blocks else self.blocks_config,
                "last_layer_fusion": self.last_layer_fusion, "first_extra": self.first_extra}

    @classmethod
    def identity_config(cls) -> dict[str, Any]:
        """``r = 0``: nothing pruned, the output equals the unreduced model's."""
        return {"r": 0}

    # ------------------------------------------------------------------ the subclass's part
    def score(self, block: int, x: Tensor, state: TokenState) -> Tensor:
        """``[B, N]`` score of every token of ``x [B, N, C]`` after ``block`` (higher = keep); no gradient needed.

        Prefix tokens and padding slots are protected by the caller whatever their score.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement score(block, x, state) -> [B, N]")

    # ------------------------------------------------------------------ budgets and hooks
    def num_drop(self, block: int, state: TokenState) -> Tensor:
        """``[B]`` (long) tokens removed per image after ``block`` (see :meth:`budget`)."""
        return self.budget(block, state)[1]

    def budget(self, block: int, state: TokenState) -> tuple[Tensor, Tensor]:
        """``(requested [B], removed [B])`` (long) after ``block``, per image from its own token count.

        Image ``b``'s budgets come from ``schedule.budgets_for(depth, n_b, progress, blocks)`` with ``n_b``
        the live patch tokens it brought to the first pruning block (so a keep ratio is of the image's own
        tokens and is spread over the pruning blocks only), plus ``first_extra`` at the first pruning block;
        the removal is clipped to leave the image at least one live patch token.

        Raises:
            RuntimeError: ``setup`` has not been called.
        """
        if self.info is None:
            raise RuntimeError(f"{type(self).__name__}.setup(info) must be called before the forward "
                               "(build_segmenter does it)")
        live = state.live_patch_tokens()  # [B]
        first = not self.blocks or block == self.blocks[0]
        counts = live if first or _TOKENS_IN not in state.stats else state.stats[_TOKENS_IN]
        requested = per_image_budgets(self.schedule, self.info.depth, counts, self.progress,
                                      self.blocks or None)[:, block]
        if self.blocks and block == self.blocks[0]:
            requested = requested + self.first_extra
        return requested, torch.minimum(requested, live - 1).clamp_min(0)
    def on_block_start(self, block: int, x: Tensor, state: TokenState) -> tuple[Tensor, TokenState]:
        """Last-layer fusion: before the final block every banked token rejoins the live set (Cropr Sec. 3.4)."""
        if self.last_layer_fusion and self.info is not None and block == self.info.depth - 1:
            return state.unbank(x)
        return x, state

    def on_block(self, block: int, x: Tensor, state: TokenState) -> tuple[Tensor, TokenState]:
        """After a pruning block, banks the lowest-scoring tokens of every image (``select_topk``).

        Args:
            block: 0-based block index.
            x: ``[B, N, C]`` tokens.
            state: the token state.

        Returns:
            ``(x' [B, N', C], state)``; images that removed different counts are padded (``state.valid``).
        """
        if block not in self.blocks:
            return x, state
        if block == self.blocks[0]:
            state = state.add_stat(_TOKENS_IN, state.live_patch_tokens())
        requested, drop = self.budget(block, state)  # [B], [B]
        state = record_budget(state, self, "pruner", block, requested, drop)
        if int(drop.max()) <= 0:
            return x, state
        with torch.no_grad():
            scores = self.score(block, x, state)  # [B, N]
        protect = ~state.valid_mask()  # padding is never chosen
        protect[:, :state.num_prefix_tokens] = True  # nor are prefix tokens
        keep = select_topk(scores, drop, protect)
        return state.split(x, keep, block)
