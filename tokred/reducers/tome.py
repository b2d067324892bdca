"""ToMe: Token Merging (Bolya et al., "Token Merging: Your ViT But Faster", ICLR 2023), for dense prediction.

Between the attention and the MLP of every block (paper Sec. 3, Fig. 1), ``r_i`` tokens are merged away by
bipartite soft matching on the attention keys, and merged tokens carry their size (patches per token) for
the size-weighted mean and for proportional attention (``log(size)`` added to every key's attention logit).

Every known difference from the reference code (facebookresearch/ToMe) is listed in ``ToMe``'s docstring.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from tokred.reducers.base import BackboneInfo, Merger, record_budget
from tokred.schedules import Constant, Explicit, Linear, Schedule, Warmup, as_schedule, per_image_budgets
from tokred.state import TokenState

if TYPE_CHECKING:
    from tokred.encoder import EmbedContext

__all__ = ["MergeAssignment", "PARTITIONS", "bipartite_soft_matching", "ToMe"]

PARTITIONS = ("patches", "reference")


@dataclass(frozen=True)
class MergeAssignment:
    """Result of a matching: where every token goes, for ``TokenState.merge(x, assign, n_out)``.

    Attributes:
        assign: ``[B, N]`` (long) output slot of every token, in ``[0, n_out)``.
        n_out: ``N'``, output slots (``N - min_b num_merged[b]``).
        num_merged: ``[B]`` (long) tokens merged away in each image (the image's clipped ``r``).
        max_merged: ``max_b num_merged[b]`` as a Python int (0: the assignment is the identity).
    """

    assign: Tensor
    n_out: int
    num_merged: Tensor
    max_merged: int


def _identity(batch: int, n: int, device: torch.device) -> MergeAssignment:
    assign = torch.arange(n, device=device).expand(batch, n)
    return MergeAssignment(assign, n, torch.zeros(batch, dtype=torch.long, device=device), 0)


@torch.no_grad()
def bipartite_soft_matching(metric: Tensor, r: int | Tensor, num_protected: int = 0, valid: Tensor | None = None,
                            partition: str = "patches") -> MergeAssignment:
    """Bipartite soft matching of ToMe (Bolya et al., ICLR 2023, Sec. 3 "Token Merging", Fig. 1).

    Pure function, computed under ``no_grad``: apply the result with ``TokenState.merge`` (or
    ``tokred.state.merge_tokens``) to any tensor aligned with the tokens.

    Steps, per image:
        1. The first ``num_protected`` tokens (class token, registers) are never merged nor merged into and
           keep slots ``[0, P)``.
        2. The tokens split alternately into sets A and B. ``partition="patches"`` (default): over the
           ``M = N - P`` tokens after the prefix, A = their even positions (``ceil(M / 2)`` tokens), B = the
           odd ones. ``partition="reference"``: over the whole sequence as the reference code does, A = even
           indices ``0, 2, ...`` (the class token is A's first, protected), B = odd indices.
        3. Cosine similarity of the metric between every A and every B token (one batched matmul); each A
           token's best B match (on ties the first B token).
        4. The ``r_b`` A tokens with the highest best-match similarity (ties: the earlier A token) are
           merged into their B partners; several A tokens may share a partner.

    ``r_b = min(r, mergeable valid A tokens, mergeable valid B tokens)``: without padding that is ToMe's "at
    most half the mergeable tokens", ``min(r, floor(M / 2))``. Padded slots (``valid`` False) and prefix
    tokens get similarity ``-inf`` as A rows and B columns, so they are never merged nor receive a merge.

    Output order (deterministic): prefix tokens at ``[0, P)``, then the surviving valid tokens, then the
    surviving padded slots in their order, then, for images that merged more than ``min_b r_b`` tokens, empty
    trailing slots that receive no token (``TokenState.merge`` marks them invalid). A merged A token goes to
    its partner's slot. The valid survivors are in their original relative order with ``"patches"``; with
    ``"reference"`` they follow the reference code: unmerged A tokens (in original order when a prefix is
    protected, else by descending best-match similarity), then every B token in original order.

    Args:
        metric: ``[B, N, D]`` per-token matching features (ToMe: attention keys averaged over heads).
        r: tokens to merge away per image (ToMe's ``r``): an int for every image, or ``[B]`` (long) one per
            image; clipped as above.
        num_protected: ``P``, leading tokens never merged.
        valid: ``[B, N]`` (bool) False for padding slots, or None when every slot is valid.
        partition: ``"patches"`` or ``"reference"`` (see steps 2 and the output order).

    Returns:
        ``MergeAssignment`` with ``assign [B, N]``, ``n_out``, ``num_merged [B]``.

    Raises:
        ValueError: ``r < 0``, ``num_protected`` outside ``[0, N]``, or an unknown ``partition``.
    """
    B, N, _ = metric.shape
    P = int(num_protected)
    r_img = torch.as_tensor(r, dtype=torch.long, device=metric.device).expand(B)  # [B]
    r_hi = int(r_img.max()) if B else 0
    if B and int(r_img.min()) < 0:
        raise ValueError(f"r must be >= 0 (tokens merged away), got {r}")
    if not 0 <= P <= N:
        raise ValueError(f"num_protected must be in [0, N={N}], got {num_protected}")
    if partition not in PARTITIONS:
        raise ValueError(f"partition={partition!r} is not one of {PARTITIONS}")
    device = metric.device
    start = P if partition == "patches" else 0
    idx_a = torch.arange(start, N, 2, device=device)  # [nA] token index of each A token
    idx_b = torch.arange(start + 1, N, 2, device=device)  # [nB]
    n_a = idx_a.numel()
    open_a, open_b = idx_a >= P, idx_b >= P  # prefix tokens take no part
    if r_hi == 0 or not bool(open_b.any()):
        return _identity(B, N, device)
    m = F.normalize(metric.float(), dim=-1)  # [B, N, D]
    scores = m[:, idx_a] @ m[:, idx_b].transpose(1, 2)  # [B, nA, nB] cosine similarity A x B
    if valid is None:
        ok_a, ok_b = open_a.expand(B, -1), open_b.expand(B, -1)
        num_merged = r_img.clamp(max=min(int(open_a.sum()), int(open_b.sum())))  # [B]
        valid_full = torch.ones(B, N, dtype=torch.bool, device=device)
    else:
        ok_a, ok_b = valid[:, idx_a] & open_a, valid[:, idx_b] & open_b  # [B, nA], [B, nB]
        num_merged = torch.minimum(torch.minimum(ok_a.sum(1), ok_b.sum(1)), r_img)  # [B]
        valid_full = valid
    r_min, r_max = torch.stack([num_merged.min(), num_merged.max()]).tolist()
    if r_max == 0:
        return _identity(B, N, device)
    scores = scores.masked_fill(~ok_b[:, None, :], float("-inf"))
    scores = scores.masked_fill(~ok_a[:, :, None], float("-inf"))
    best, partner = scores.max(dim=-1)  # [B, nA] best similarity, index of the best B token
    order = best.argsort(dim=1, descending=True, stable=True)  # [B, nA]
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(n_a, device=device).expand(B, n_a))
    merged_a = rank < num_merged[:, None]  # [B, nA] the r_b best-matched A tokens
    merged = torch.zeros(B, N, dtype=torch.bool, device=device)
    merged[:, idx_a] = merged_a
    # output slot = rank of a sort key among the survivors (distinct keys): valid ones, padded ones, merged
    index = torch.arange(N, device=device).expand(B, N)
    key = index.clone()
    if partition == "reference":
        in_a = torch.zeros(N, dtype=torch.bool, device=device)
        in_a[idx_a] = True
        a_key = index[:, idx_a] if P > 0 else rank  # unmerged A: original order, or by similarity without prefix
        key[:, idx_a] = N + a_key
        key = torch.where(in_a | (index < P), key, 2 * N + index)  # B tokens after the A tokens
        key = torch.where(index < P, index, key)  # prefix first
    key = torch.where(valid_full, key, 3 * N + index)
    key = torch.where(merged, 4 * N + index, key)
    slot = torch.empty_like(key).scatter_(1, key.argsort(dim=1), index.contiguous())  # [B, N]
    partner_slot = slot.gather(1, idx_b[partner])  # [B, nA] slot of each A token's B partner
    assign = slot.clone()
    assign[:, idx_a] = torch.where(merged_a, partner_slot, slot[:, idx_a])
    return MergeAssignment(assign, N - r_min, num_merged, r_max)


def _uses_num_tokens(schedule: Schedule) -> bool:
    """Whether the schedule's budgets depend on the token count (True for unknown schedule types)."""
    if isinstance(schedule, (Constant, Linear, Explicit)):
        return False
    if isinstance(schedule, Warmup):
        return _uses_num_tokens(schedule.inner)
    return True


class ToMe(Merger):
    """Token Merging (Bolya et al., ICLR 2023, Sec. 3) between attention and MLP of every block.

    In block ``i`` (0-based) the state's tokens are matched on the block's attention keys averaged over
    heads ``[B, N, head_dim]`` and ``r_i`` of them are merged away by size-weighted mean
    (``bipartite_soft_matching`` + ``TokenState.merge``); ``r_i`` comes from ``schedule`` (ToMe Sec. 4
    "token schedules": constant, ``(r, inflection)`` linear ramp, explicit list) and is clipped per image
    to half the mergeable tokens. Prefix tokens are never merged. Every patch stays live: ``restore`` gives
    each patch its merged token's features.

    Differences from the reference code (facebookresearch/ToMe, ``tome/merge.py`` and ``tome/patch/timm.py``):
        * Integration: the reference swaps each timm block's ``__class__`` and copies its forward; on current
          timm that drops LayerScale (outputs change even at r = 0) and keeps per-forward state in a shared
          list (breaks gradient checkpointing). Here the encoder owns the loop over the unmodified blocks and
          calls ``on_attention``; all per-forward data lives in the ``TokenState``.
        * Partition and order (the default ``partition="patches"``): A/B alternate over the patch tokens
          after the prefix, and the survivors keep their relative (raster) order, so the next block's split
          still alternates over spatial neighbours. The reference alternates over the whole sequence (the
          class token is A's first token, protected by a ``-inf`` row) and outputs the unmerged A tokens
          (sorted back to their original order when the class token is protected, else in descending
          best-match similarity), then all B tokens. ``partition="reference"`` reproduces that partition and
          order exactly for one class token; further prefix tokens (registers) are protected too and stay
          in front, where the reference would let them merge.
        * Source tracking: instead of the reference's dense ``[B, N, N0]`` source matrix, the state's token
          map ``[B, N0]`` is composed with every merge (one gather) and ``TokenState.restore`` gives each patch
          the features of its token, which dense prediction needs.
        * Ties: tokred sorts stably (ties go to the earlier A token); the reference's sort is not stable.
        * Padding (images holding different token counts after a pruner) is supported: padded slots neither
          merge nor receive merges, and each image clips its own ``r`` (so a batch equals its singles).

    Documented choices:
        * Schedules that depend on the token count (``keep_ratio``) see each image's own valid patch tokens
          entering block 0 (``tokred.schedules.per_image_budgets``), so a batch equals its images one by one;
          this reads the counts back from the device once per block.
        * The requested and the merged (clipped) ``r`` of every block are recorded per image
          (``record_budget``: ``tokens_detail.budgets`` in metrics.json), and a budget the model cannot
          honour (more than half the mergeable tokens) is logged once.
        * Proportional attention (Sec. 3 "Tracking token size") is switched on in ``on_embed``; it adds
          ``log(size)`` per key, 0 while no token is merged. With ``proportional_attention=False`` ToMe
          leaves the state's flag as it found it.
        * With padding each image merges its own clipped ``r_b``; images that merge more hold empty
          trailing (invalid) slots until the batch's token count catches up.
        * Each merge adds the per-image count to ``state.stats["merged"]`` ``[B]``.

    Args:
        r: tokens merged away per block (the base budget of ``schedule``).
        schedule: budget schedule; None -> ``Constant(r)``; a Mapping -> ``build_schedule(r=r, **mapping)``
            (a mapping's own ``r`` wins); or a ``Schedule``.
        proportional_attention: add ``log(size)`` to every key's attention logit (ToMe Eq. 1).
        partition: ``"patches"`` (default) or ``"reference"``: how tokens split into A and B and how the
            survivors are ordered (see above and ``bipartite_soft_matching``).

    Raises:
        ValueError: ``r < 0``, an unknown ``partition``, ``schedule`` of another type, or a schedule spec
            ``build_schedule`` rejects (e.g. a keep_ratio outside (0, 1]); in ``setup``, a schedule that does
            not fit the backbone's depth (e.g. an explicit list longer than depth).
    """

    def __init__(self, r: int = 8, schedule: Schedule | Mapping[str, Any] | None = None,
                 proportional_attention: bool = True, partition: str = "patches") -> None:
        super().__init__()
        if r < 0:
            raise ValueError(f"ToMe r must be >= 0 (tokens merged away per block), got {r}")
        if partition not in PARTITIONS:
            raise ValueError(f"ToMe partition={partition!r} is not one of {PARTITIONS}")
        self.partition = partition
        self.r = int(r)
        self.schedule: Schedule = as_schedule(schedule, r, "ToMe")
        self.proportional_attention = bool(proportional_attention)
        self._schedule_uses_num_tokens = _uses_num_tokens(self.schedule)

    def setup(self, info: BackboneInfo) -> None:
        """Checks the schedule against the backbone's depth.

        Raises:
            ValueError: the schedule does not fit ``info.depth`` (raised by the schedule).
        """
        super().setup(info)
        self.schedule.budgets(info.depth, info.grid_size[0] * info.grid_size[1], 1.0)

    def extra_config(self) -> dict[str, Any]:
        return {"r": self.r, "schedule": self.schedule.config(), "proportional_attention": self.proportional_attention,
                "partition": self.partition}

    @classmethod
    def identity_config(cls) -> dict[str, Any]:
        return {"r": 0}

    @classmethod
    def example_config(cls) -> dict[str, Any]:
        return {"r": 8}  # 80 patch tokens on test_vit's 8 x 10 grid -> 32 after 6 blocks

    def budgets(self, num_tokens: int) -> list[int]:
        """Per-block budgets ``r_i`` (tokens merged away in 0-based block i) at the current ``progress``.

        Args:
            num_tokens: patch tokens entering block 0.

        Raises:
            RuntimeError: ``setup`` has not been called (the depth is unknown).
        """
        if self.info is None:
            raise RuntimeError("ToMe.setup(info) must be called before the forward (build_segmenter does it)")
        return self.schedule.budgets(self.info.depth, num_tokens, self.progress)

    def on_embed(self, x: Tensor, state: TokenState, ctx: EmbedContext) -> tuple[Tensor, TokenState]:
        if self.proportional_attention and not state.proportional_attention:
            state = replace(state, proportional_attention=True)
        return x, state

    def on_attention(self, block: int, x: Tensor, state: TokenState, keys: Tensor) -> tuple[Tensor, TokenState]:
        """Merges ``r_block`` tokens of ``x`` ``[B, N, C]`` matched on ``keys`` ``[B, num_heads, N, head_dim]``.

        Returns:
            ``(x' [B, N', C], state)`` with ``N' <= N``.
        """
        if self.info is None:
            raise RuntimeError("ToMe.setup(info) must be called before the forward (build_segmenter does it)")
        counts = state.tokens_per_block[0] if state.tokens_per_block else state.live_patch_tokens()  # [B]
        if self._schedule_uses_num_tokens:  # each image's budget from its own token count
            requested = per_image_budgets(self.schedule, self.info.depth, counts, self.progress)[:, block]
        else:
            requested = torch.full_like(counts, self.budgets(state.num_patches)[block])
        if int(requested.max()) == 0:
            return x, state
        match = bipartite_soft_matching(keys.mean(1), requested, state.num_prefix_tokens, state.valid,
                                        self.partition)  # keys.mean(1): [B, N, head_dim]
        state = record_budget(state, self, "merger", block, requested, match.num_merged)
        if match.max_merged == 0:
            return x, state
        x, state = state.merge(x, match.assign, match.n_out)
        return x, state.add_stat("merged", match.num_merged)
