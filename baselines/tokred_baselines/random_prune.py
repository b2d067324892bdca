"""Random pruning: the content-blind pruner that Token Cropr compares its throughput against.

Token Cropr (Bergner, Lippert, Mahendran, CVPR 2025, abstract) reports that, once its auxiliary
heads are removed, its throughput is "close to that of a random pruner": a pruner that removes the same
number of tokens at the same blocks but picks them without looking at the content. ``RandomPrune`` is that
baseline, with the same placement, budget and last-layer fusion as tokred's ``cropr`` so that the two
differ only in how tokens are chosen.

Documented choice: "random" is a fixed pseudo-random score per (patch position, block), not a fresh draw
per forward. Block ``i`` draws ``u_i = rand(N0)`` from a ``torch.Generator`` seeded with ``(seed, i)``,
created on the fly (no per-forward state on the module); a token's score is ``u_i`` at the first patch it
covers (its lowest raster index, from ``state.token_map``), and the ``r`` lowest-scoring tokens are banked.
Consequences, each tested: results are reproducible; a batch equals its images run one by one (the choice
depends on the token's position only, never on the other images); training and inference prune alike.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from tokred import BackboneInfo, Pruner, TokenState
from tokred.schedules import Schedule, as_schedule
from tokred_baselines._tokens import first_patch

__all__ = ["RandomPrune"]

log = logging.getLogger(__name__)

_SEED_STRIDE = 1_000_003  # (seed, block) -> one generator seed; a prime keeps nearby pairs apart


class RandomPrune(Pruner):
    """Prunes ``r`` pseudo-random tokens after chosen blocks into the bank (Token Cropr's random baseline).

    Args:
        r: tokens removed after each pruning block (the base budget of ``schedule``), the same count in
            every image.
        schedule: budget schedule; None -> ``Constant(r)``; a Mapping -> ``build_schedule(r=r, **mapping)``.
            Budgets are indexed by block: the module after block ``i`` removes ``budgets[i]``.
        blocks: 0-based indices of the blocks AFTER which tokens are pruned, strictly increasing, each in
            ``[0, depth - 1)``; None -> every block except the last two (``0 .. depth - 3``, as Cropr).
        seed: seed of the per-block position scores (any int >= 0).
        last_layer_fusion: banked tokens rejoin the live set before the final block (Cropr Sec. 3.4); when
            False they stay in the bank and the decoder sees the features they were banked with.

    Raises:
        ValueError: negative ``r`` or ``seed``; ``blocks`` negative or not strictly increasing; a schedule
            that is neither a Schedule, a mapping nor None; and in ``setup``: ``blocks`` outside
            ``[0, depth - 1)`` or a budget that leaves no patch token at the training grid.
    """

    kind: ClassVar[str] = "pruner"

    def __init__(self, r: int = 8, schedule: Schedule | Mapping[str, Any] | None = None,
                 blocks: Sequence[int] | None = None, seed: int = 0, last_layer_fusion: bool = True) -> None:
        super().__init__()
        if r < 0:
            raise ValueError(f"random_prune r must be >= 0 (tokens removed per block), got {r}")
        if seed < 0:
            raise ValueError(f"random_prune seed must be >= 0, got {seed}")
        self.schedule: Schedule = as_schedule(schedule, r, "random_prune")
        self.r = int(r)
        self.seed = int(seed)
        self.last_layer_fusion = bool(last_layer_fusion)
        self.blocks_config = None if blocks is None else [int(b) for b in blocks]
        if self.blocks_config is not None:
            if any(b < 0 for b in self.blocks_config) or any(
                    a >= b for a, b in zip(self.blocks_config, self.blocks_config[1:])):
                raise ValueError(f"random_prune blocks must be 0-based, >= 0 and strictly increasing, "
                                 f"got {self.blocks_config}")
        self.blocks: tuple[int, ...] = ()

    @classmethod
    def identity_config(cls) -> dict[str, Any]:
        """``r = 0``: nothing pruned, the output equals the unreduced model's."""
        return {"r": 0}

    @classmethod
    def example_config(cls) -> dict[str, Any]:
        """6 tokens after each of blocks 0-3 of ``test_vit`` (depth 6): 80 -> 56 patch tokens on 8 x 10."""
        return {"r": 6}

    def setup(self, info: BackboneInfo) -> None:
        """Resolves the pruning blocks and checks the budget at the training grid.

        Raises:
            ValueError: a block outside ``[0, depth - 1)``, or fewer than one patch token left after some
                pruning block at ``info.grid_size`` and the full budget.
        """
        super().setup(info)
        depth = info.depth
        blocks = list(range(max(depth - 2, 0))) if self.blocks_config is None else self.blocks_config
        bad = [b for b in blocks if b >= depth - 1]
        if bad:
            raise ValueError(f"random_prune blocks {bad} are outside [0, {depth - 1}) for depth {depth} (0-based; "
                             "pruning after the final block removes nothing); drop them")
        n0 = info.grid_size[0] * info.grid_size[1]
        budgets = self.schedule.budgets(depth, n0, 1.0)
        n = n0
        for b in blocks:
            n -= budgets[b]
            if n < 1:
                raise ValueError(f"random_prune r={self.r} (schedule {self.schedule.config()}) leaves {n} of {n0} "
                                 f"patch tokens after block {b} at grid_size {tuple(info.grid_size)}; lower r or "
                                 "prune after fewer blocks")
        self.blocks = tuple(blocks)
        log.info("random_prune: after blocks %s (0-based), %d patch tokens left, fusion before block %d: %s",
                 list(blocks), n, depth - 1, self.last_layer_fusion)

    def extra_config(self) -> dict[str, Any]:
        return {"r": self.r, "schedule": self.schedule.config(),
                "blocks": list(self.blocks) if self.blocks else self.blocks_config, "seed": self.seed,
                "last_layer_fusion": self.last_layer_fusion}

    def patch_scores(self, block: int, num_patches: int, device: torch.device | None = None) -> Tensor:
        """The fixed pseudo-random score of every patch position for one block.

        Args:
            block: 0-based block index.
            num_patches: ``N0`` patches of the grid.
            device: where to put the scores (drawn on the CPU, so every device gets the same values).

        Returns:
            ``[N0]`` scores uniform in ``[0, 1)``, a function of ``(seed, block, N0)`` only.
        """
        g = torch.Generator().manual_seed(self.seed * _SEED_STRIDE + block)
        return torch.rand(num_patches, generator=g).to(device)

    def on_block_start(self, block: int, x: Tensor, state: TokenState) -> tuple[Tensor, TokenState]:
        """Last-layer fusion: before the final block every banked token rejoins the live set."""
        if self.last_layer_fusion and self.info is not None and block == self.info.depth - 1:
            return state.unbank(x)
        return x, state

    def on_block(self, block: int, x: Tensor, state: TokenState) -> tuple[Tensor, TokenState]:
        """After a pruning block, banks the ``r`` lowest-scoring tokens of every image.

        Prefix tokens and padding slots are never chosen; ``r`` is clipped so that at least one patch token
        per image stays live (other image sizes, tokens already merged).

        Args:
            block: 0-based block index.
            x: ``[B, N, C]`` tokens.
            state: the token state.

        Returns:
            ``(x' [B, N - r, C] (plus padding when images entered with different counts), state)``.
        """
        if block not in self.blocks:
            return x, state
        r = self.schedule.budgets(self.info.depth, state.num_patches, self.progress)[block]
        r = min(r, int(state.live_patch_tokens().min()) - 1)
        if r <= 0:
            return x, state
        N0 = state.num_patches
        first = first_patch(state, x.shape[1])  # [B, N], N0 for prefix and padding
        table = self.patch_scores(block, N0, x.device)  # [N0]
        scores = table[first.clamp_max(N0 - 1)]  # [B, N]
        scores = scores.masked_fill((first >= N0) | ~state.valid_mask(), float("inf"))
        drop = scores.topk(r, dim=1, largest=False).indices  # [B, r]
        keep = torch.ones_like(scores, dtype=torch.bool).scatter(1, drop, False)  # [B, N]
        return state.split(x, keep, block)
