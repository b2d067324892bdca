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

Everything but the score (block placement, budgets clipped per image, protection of prefix tokens and
padding, top-k, banking, last-layer fusion) comes from tokred's ``ScoredPruner``, exactly as for Cropr.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from tokred import TokenState
from tokred.reducers import ScoredPruner
from tokred.schedules import Schedule
from tokred_baselines._tokens import first_patch

__all__ = ["RandomPrune"]

_SEED_STRIDE = 1_000_003  # (seed, block) -> one generator seed; a prime keeps nearby pairs apart


class RandomPrune(ScoredPruner):
    """Prunes ``r`` pseudo-random tokens after chosen blocks into the bank (Token Cropr's random baseline).

    Args:
        r: tokens removed after each pruning block (the base budget of ``schedule``); each image's budget is
            clipped to leave it at least one live patch token.
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

    label: ClassVar[str] = "random_prune"

    def __init__(self, r: int = 8, schedule: Schedule | Mapping[str, Any] | None = None,
                 blocks: Sequence[int] | None = None, seed: int = 0, last_layer_fusion: bool = True) -> None:
        if seed < 0:
            raise ValueError(f"random_prune seed must be >= 0, got {seed}")
        super().__init__(r=r, schedule=schedule, blocks=blocks, last_layer_fusion=last_layer_fusion)
        self.seed = int(seed)

    @classmethod
    def example_config(cls) -> dict[str, Any]:
        """6 tokens after each of blocks 0-3 of ``test_vit`` (depth 6): 80 -> 56 patch tokens on 8 x 10."""
        return {"r": 6}

    def extra_config(self) -> dict[str, Any]:
        cfg = super().extra_config()
        cfg.pop("first_extra")  # not a parameter of this baseline
        return {**cfg, "seed": self.seed}

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

    def score(self, block: int, x: Tensor, state: TokenState) -> Tensor:
        """``[B, N]``: each token's score is its first (lowest-index) patch's entry of ``patch_scores``.

        Prefix tokens and padding slots (which cover no patch) get any value; ``ScoredPruner`` protects them.
        """
        N0 = state.num_patches
        first = first_patch(state, x.shape[1])  # [B, N], N0 for prefix and padding
        return self.patch_scores(block, N0, x.device)[first.clamp_max(N0 - 1)]  # [B, N]
