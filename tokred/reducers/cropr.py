"""Token Cropr: learned cross-attention pruning with last-layer fusion (Bergner, Lippert, Mahendran, CVPR 2025).

One Cropr module sits after each chosen block (by default every block except the last two). A module holds
``M`` learned queries that cross-attend to the tokens:

* **Score** (Sec. 3.2): the score of token ``n`` is its attention logit summed over the queries and heads,
  ``s_n = sum_m sum_h <q_m^h, k_n^h> = <sum_m q_m, k_n>`` with ``k_n = key(norm(x_n))``. The sum over heads
  of per-head dot products is the dot product over the full width, and no softmax sits between the logits
  and the sum, so the sum over queries can be taken first: the score is ONE dot product per token with the
  summed query (``CroprModule.score``, the only path used for selection, in training and in inference).
  Logits are unscaled (``1/sqrt(head_dim)`` scaling would not change the ranking).
* **Selection** (Sec. 3.2): each image removes its ``r`` lowest-scoring tokens (the same ``r`` for every image,
  so a batch without padding keeps the same count everywhere). Prefix tokens are never removed, padding
  slots are never chosen. Removed tokens go to the state's bank with their features (``TokenState.split``).
* **Training** (Sec. 3.3): the module sees a detached copy of the tokens. Each query aggregates the tokens
  by softmax attention; a residual MLP and a linear head predict one class per query. For segmentation
  there is one query per cell of the patch grid, so the prediction is a ``[B, K, H0, W0]`` label map,
  trained with cross-entropy against the nearest-downsampled labels (``AuxOutput(target="downsample")``).
  Because of the detach the auxiliary losses train the queries, the MLP and the head only, never the
  backbone; selection is not differentiable, so the backbone is trained by the main loss alone.
  Total loss = main loss + ``aux_weight`` * sum of the auxiliary losses (paper: unweighted sum).
* **Inference**: the aggregation, MLP and head are not run; a module costs one key path (identity by
  default) and one dot product per token, plus the top-k.
* **Last-layer fusion** (Sec. 3.4): the pruned tokens are kept in the bank and rejoin the live set before the
  final block (``on_block_start(depth - 1)`` calls ``TokenState.unbank``), so the final block runs on all
  tokens; ``TokenState.restore`` returns them to raster order through the token map.
* **Warm-up** (Sec. 3.4): pass ``schedule={"kind": "warmup", "fraction": 0.5}`` to ramp ``r`` linearly from 0
  over the first half of training (through ``self.progress``); the paper does this, the default here is a
  constant ``r``.

Documented choices where the paper or its code leaves room:

* Budgets come from ``schedule.budgets(depth, N0, progress)`` indexed by BLOCK: the module after block ``i``
  removes ``budgets[i]`` tokens; budgets of blocks without a module are unused. With the default constant
  schedule every module removes ``r``.
* Too large a budget: ``setup`` raises ``ValueError`` when, at the training grid (``info.grid_size``) and the
  full budget (progress 1), fewer than ``num_prefix_tokens + 1`` tokens would remain after some module. At
  forward time (other image sizes, sliding windows, tokens already merged) the budget is CLIPPED so that at
  least one patch token per image stays live; it never raises there.
* The aggregation attends to every valid token, prefix included, with the state's attention bias
  (``-inf`` on padding, ``log(size)`` when proportional attention is on), so merged supertokens and padded
  batches from a merger are handled; supertokens are scored and pruned like any token.
* ``num_queries`` different from ``H0 * W0`` is accepted when it equals ``(H0 // f) * (W0 // f)`` for an
  integer ``f``: the queries then form a coarser ``(H0 // f, W0 // f)`` prediction grid.
* No query projection (the queries are free parameters, a linear map of them adds nothing); optional
  LayerNorm before the key path (``pre_norm``), optional key and value projections, ``num_heads`` heads with
  an output projection when ``num_heads > 1``; defaults as the public code: no norm, no projections, one head.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from timm.layers import Mlp, trunc_normal_
from torch import Tensor, nn

from tokred.reducers.base import BackboneInfo, Pruner
from tokred.schedules import Schedule, as_schedule
from tokred.state import AuxOutput, TokenState

__all__ = ["Cropr", "CroprModule"]

log = logging.getLogger(__name__)


class CroprModule(nn.Module):
    """One Cropr module: learned queries, the scorer's key path, and the training-only aggregation head.

    Implements Token Cropr (Bergner et al., CVPR 2025) Sec. 3.2-3.3 for one pruning position.

    Args:
        embed_dim: token width ``C``.
        num_queries: ``M`` learned queries (one per cell of the prediction grid).
        num_classes: ``K`` classes of the auxiliary head.
        num_heads: heads of the aggregation attention; must divide ``embed_dim``.
        mlp_ratio: hidden width of the residual MLP as a multiple of ``embed_dim``.
        pre_norm: LayerNorm on the tokens before keys and values.
        key_proj: linear key projection of the tokens (identity when False).
        value_proj: linear value projection of the tokens (identity when False).

    Raises:
        ValueError: ``num_heads`` does not divide ``embed_dim``, or ``num_queries`` < 1.
    """

    def __init__(self, embed_dim: int, num_queries: int, num_classes: int, num_heads: int = 1,
                 mlp_ratio: float = 4.0, pre_norm: bool = False, key_proj: bool = False,
                 value_proj: bool = False) -> None:
        super().__init__()
        if num_heads < 1 or embed_dim % num_heads:
            raise ValueError(f"Cropr num_heads={num_heads} must be >= 1 and divide embed_dim={embed_dim}")
        if num_queries < 1:
            raise ValueError(f"Cropr num_queries must be >= 1, got {num_queries}")
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.queries = nn.Parameter(torch.empty(num_queries, embed_dim))  # [M, C]
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6) if pre_norm else nn.Identity()
        self.key = nn.Linear(embed_dim, embed_dim, bias=False) if key_proj else nn.Identity()
        # training-only parts (aggregation, residual MLP, auxiliary head): unused in eval
        self.value = nn.Linear(embed_dim, embed_dim, bias=False) if value_proj else nn.Identity()
        self.proj = nn.Linear(embed_dim, embed_dim) if num_heads > 1 else nn.Identity()
        self.mlp_norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.mlp = Mlp(embed_dim, int(embed_dim * mlp_ratio))
        self.head_norm = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes)
        trunc_normal_(self.queries, std=embed_dim ** -0.5)  # logits <q, x> of order 1 at init
        trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    @property
    def num_queries(self) -> int:
        return self.queries.shape[0]

    def keys(self, x: Tensor) -> Tensor:
        """``[B, N, C]`` tokens -> ``[B, N, C]`` keys (``key(norm(x))``)."""
        return self.key(self.norm(x))

    def query_logits(self, x: Tensor) -> Tensor:
        """Full (unscaled) cross-attention logits of every query on every token.

        Reference path for the score; never used for selection (see ``score``).

        Args:
            x: ``[B, N, C]`` tokens.

        Returns:
            ``[B, num_heads, M, N]`` logits ``<q_m^h, k_n^h>``.
        """
        B, N, C = x.shape
        h, hd = self.num_heads, self.head_dim
        q = self.queries.to(x.dtype).reshape(-1, h, hd).transpose(0, 1)  # [h, M, hd]
        k = self.keys(x).reshape(B, N, h, hd).transpose(1, 2)  # [B, h, N, hd]
        return q.unsqueeze(0) @ k.transpose(-2, -1)  # [B, h, M, N]

    def score(self, x: Tensor) -> Tensor:
        """Token scores: the attention logits summed over queries and heads, as one dot product per token.

        ``sum_{h, m} <q_m^h, k_n^h> = <sum_m q_m, k_n>`` because no softmax sits before the sum and the heads
        split the width; equals ``query_logits(x).sum((1, 2))``. No gradient (selection is not differentiable).

        Args:
            x: ``[B, N, C]`` tokens.

        Returns:
            ``[B, N]`` scores (higher = keep).
        """
        with torch.no_grad():
            k = self.keys(x)  # [B, N, C]
            q_sum = self.queries.sum(0).to(k.dtype)  # [C]
            return k @ q_sum  # [B, N]

    def aggregate(self, x: Tensor, bias: Tensor | None) -> Tensor:
        """Softmax cross-attention of the queries over the tokens, then the residual MLP (training only).

        Args:
            x: ``[B, N, C]`` tokens (pass a detached copy to keep gradients off the backbone).
            bias: ``[B, 1, 1, N]`` additive per-key logit bias (``-inf`` on padding), or None.

        Returns:
            ``[B, M, C]`` one aggregated feature per query.
        """
        B, N, C = x.shape
        h, hd = self.num_heads, self.head_dim
        xn = self.norm(x)
        q = self.queries.to(x.dtype).reshape(1, -1, h, hd).transpose(1, 2).expand(B, -1, -1, -1)  # [B, h, M, hd]
        k = self.key(xn).reshape(B, N, h, hd).transpose(1, 2)  # [B, h, N, hd]
        v = self.value(xn).reshape(B, N, h, hd).transpose(1, 2)  # [B, h, N, hd]
        if bias is not None:
            bias = bias.to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # [B, h, M, hd]
        out = self.proj(out.transpose(1, 2).reshape(B, -1, C))  # [B, M, C]
        return out + self.mlp(self.mlp_norm(out))

    def predict(self, feats: Tensor) -> Tensor:
        """``[B, M, C]`` aggregated features -> ``[B, M, K]`` auxiliary class logits."""
        return self.head(self.head_norm(feats))


def _query_grid(grid_size: tuple[int, int], num_queries: int | None) -> tuple[int, int]:
    """Prediction grid ``(h, w)`` with ``h * w = num_queries``: the patch grid or a coarser one.

    Raises:
        ValueError: ``num_queries`` is not ``(H0 // f) * (W0 // f)`` for any integer ``f >= 1``.
    """
    H0, W0 = grid_size
    if num_queries is None:
        return H0, W0
    for f in range(1, min(H0, W0) + 1):
        if (H0 // f) * (W0 // f) == num_queries:
            return H0 // f, W0 // f
    raise ValueError(f"Cropr num_queries={num_queries} does not form a prediction grid for the training grid "
                     f"{H0}x{W0} patches: use null (one query per patch, {H0 * W0}) or (H0 // f) * (W0 // f) "
                     f"for an integer f (e.g. {(H0 // 2) * (W0 // 2)})")


class Cropr(Pruner):
    """Token Cropr pruner (Bergner, Lippert, Mahendran, CVPR 2025); see the module docstring for the method.

    Args:
        r: tokens removed by each module (the base budget of ``schedule``).
        schedule: budget schedule; None -> ``Constant(r)``; a Mapping -> ``build_schedule(r=r, **mapping)``
            (e.g. ``{"kind": "warmup", "fraction": 0.5}`` for the paper's warm-up). Budgets are per block.
        blocks: 0-based indices of the blocks AFTER which a module prunes, strictly increasing, each in
            ``[0, depth - 1)``; None -> every block except the last two (``0 .. depth - 3``; the paper's
            "after each block except the last two").
        num_queries: queries per module; None -> one per patch cell of the training grid (``H0 * W0``).
        last_layer_fusion: pruned tokens rejoin before the final block (Sec. 3.4); when False they stay in
            the bank and the decoder sees their banked features.
        aux_weight: weight of every auxiliary loss (paper: 1, unweighted sum).
        num_heads: heads of the aggregation attention (1 in the paper's segmentation setting).
        mlp_ratio: hidden width of the residual aggregation MLP, as a multiple of ``embed_dim``.
        pre_norm: LayerNorm on the tokens before keys/values.
        key_proj: linear key projection (identity when False).
        value_proj: linear value projection (identity when False).

    Raises:
        ValueError: negative ``r`` or ``aux_weight``; ``blocks`` negative or not strictly increasing; and in
            ``setup``: ``blocks`` outside ``[0, depth - 1)``, a budget that leaves fewer than
            ``num_prefix_tokens + 1`` tokens after a module at the training grid, a ``num_queries`` that forms
            no prediction grid, ``num_heads`` not dividing ``embed_dim``.
    """

    kind: ClassVar[str] = "pruner"

    def __init__(self, r: int = 8, schedule: Schedule | Mapping[str, Any] | None = None,
                 blocks: Sequence[int] | None = None, num_queries: int | None = None,
                 last_layer_fusion: bool = True, aux_weight: float = 1.0, num_heads: int = 1,
                 mlp_ratio: float = 4.0, pre_norm: bool = False, key_proj: bool = False,
                 value_proj: bool = False) -> None:
        super().__init__()
        if r < 0:
            raise ValueError(f"Cropr r must be >= 0 (tokens removed per module), got {r}")
        if aux_weight < 0:
            raise ValueError(f"Cropr aux_weight must be >= 0, got {aux_weight}")
        if num_queries is not None and num_queries < 1:
            raise ValueError(f"Cropr num_queries must be >= 1 or null (one per patch cell), got {num_queries}")
        self.schedule: Schedule = as_schedule(schedule, r, "Cropr")
        self.r = int(r)
        self.blocks_config = None if blocks is None else [int(b) for b in blocks]
        if self.blocks_config is not None:
            self._check_blocks(self.blocks_config, depth=None)
        self.num_queries_config = num_queries
        self.last_layer_fusion = bool(last_layer_fusion)
        self.aux_weight = float(aux_weight)
        self.num_heads = int(num_heads)
        self.mlp_ratio = float(mlp_ratio)
        self.pre_norm = bool(pre_norm)
        self.key_proj = bool(key_proj)
        self.value_proj = bool(value_proj)
        self.blocks: tuple[int, ...] = ()
        self.query_grid: tuple[int, int] | None = None
        self.cropr_modules = nn.ModuleList()
        self._module_of_block: dict[int, int] = {}

    @classmethod
    def identity_config(cls) -> dict[str, Any]:
        """``r = 0``: nothing pruned, the segmenter's output equals the unreduced model's."""
        return {"r": 0}

    @classmethod
    def example_config(cls) -> dict[str, Any]:
        """``r = 6`` per module: 4 modules on a depth-6 ``test_vit`` prune 24 of about 80 patch tokens."""
        return {"r": 6}

    # ------------------------------------------------------------------ configuration
    @staticmethod
    def _check_blocks(blocks: Sequence[int], depth: int | None) -> None:
        if any(b < 0 for b in blocks):
            raise ValueError(f"Cropr blocks={list(blocks)}: block indices are 0-based and must be >= 0")
        if any(b2 <= b1 for b1, b2 in zip(blocks, blocks[1:])):
            raise ValueError(f"Cropr blocks={list(blocks)} must be strictly increasing (0-based block indices)")
        if depth is not None and any(b >= depth - 1 for b in blocks):
            raise ValueError(f"Cropr blocks={list(blocks)}: a module may follow blocks 0..{depth - 2} of a depth-"
                             f"{depth} backbone (not the last block, whose output is final)")

    def setup(self, info: BackboneInfo) -> None:
        """Creates one ``CroprModule`` per position and checks the budgets against the training grid.

        Raises:
            ValueError: see the class docstring.
        """
        super().setup(info)
        depth = info.depth
        blocks = list(range(depth - 2)) if self.blocks_config is None else list(self.blocks_config)
        self._check_blocks(blocks, depth)
        n0 = info.grid_size[0] * info.grid_size[1]
        budgets = self.schedule.budgets(depth, n0, 1.0)
        remaining, n = [], n0
        for b in blocks:
            n -= budgets[b]
            remaining.append(n)
            if n < 1:
                raise ValueError(
                    f"Cropr r={self.r} (schedule {self.schedule.config()}) removes too many tokens: after block {b} "
                    f"only {n} of {n0} patch tokens ({info.grid_size[0]}x{info.grid_size[1]}) would remain, fewer "
                    f"than num_prefix_tokens + 1 = {info.num_prefix_tokens + 1} tokens; lower r or use fewer blocks")
        self.query_grid = _query_grid(info.grid_size, self.num_queries_config)
        num_queries = self.query_grid[0] * self.query_grid[1]
        self.blocks = tuple(blocks)
        self._module_of_block = {b: j for j, b in enumerate(blocks)}
        self.cropr_modules = nn.ModuleList(
            CroprModule(info.embed_dim, num_queries, info.num_classes, num_heads=self.num_heads,
                        mlp_ratio=self.mlp_ratio, pre_norm=self.pre_norm, key_proj=self.key_proj,
                        value_proj=self.value_proj)
            for _ in blocks)
        log.info("Cropr: modules after blocks %s (0-based), patch tokens left after each: %s, fusion before block %d: %s",
                 list(blocks), remaining, depth - 1, self.last_layer_fusion)

    def module_at(self, block: int) -> CroprModule:
        """The module that prunes after ``block`` (0-based).

        Raises:
            KeyError: no module at that block (valid blocks listed).
        """
        if block not in self._module_of_block:
            raise KeyError(f"Cropr has no module after block {block}; modules after blocks {list(self.blocks)}")
        return self.cropr_modules[self._module_of_block[block]]

    def extra_config(self) -> dict[str, Any]:
        return {"r": self.r, "schedule": self.schedule.config(),
                "blocks": list(self.blocks) if self.blocks else self.blocks_config,
                "num_queries": None if self.query_grid is None else self.query_grid[0] * self.query_grid[1],
                "query_grid": None if self.query_grid is None else list(self.query_grid),
                "last_layer_fusion": self.last_layer_fusion, "aux_weight": self.aux_weight,
                "num_heads": self.num_heads, "mlp_ratio": self.mlp_ratio, "pre_norm": self.pre_norm,
                "key_proj": self.key_proj, "value_proj": self.value_proj}

    # ------------------------------------------------------------------ hooks
    def on_block_start(self, block: int, x: Tensor, state: TokenState) -> tuple[Tensor, TokenState]:
        """Last-layer fusion: before the final block every banked token rejoins the live set (Sec. 3.4)."""
        if self.last_layer_fusion and self.info is not None and block == self.info.depth - 1:
            return state.unbank(x)
        return x, state

    def on_block(self, block: int, x: Tensor, state: TokenState) -> tuple[Tensor, TokenState]:
        """After ``block``: score, add the auxiliary prediction (training), bank the ``r`` lowest tokens.

        Args:
            block: 0-based block index.
            x: ``[B, N, C]`` tokens.
            state: the token state.

        Returns:
            ``(x' [B, N - r, C] (plus padding when images had different counts), state)``.
        """
        if block not in self._module_of_block:
            return x, state
        mod = self.cropr_modules[self._module_of_block[block]]
        r = self.schedule.budgets(self.info.depth, state.num_patches, self.progress)[block]
        if self.training:
            x_in = x.detach()  # the auxiliary loss never reaches the backbone
            feats = mod.aggregate(x_in, state.attn_bias(x.dtype))  # [B, M, C]
            logits = mod.predict(feats)  # [B, M, K]
            B, M, K = logits.shape
            logits = logits.transpose(1, 2).reshape(B, K, *self.query_grid)  # [B, K, h, w]
            state = state.add_aux(AuxOutput(name=f"cropr_{block}", logits=logits, weight=self.aux_weight,
                                            target="downsample"))
        else:
            x_in = x
        # clip at forward time: at least one patch token per image stays live
        r = min(r, int(state.live_patch_tokens().min()) - 1)
        if r <= 0:
            return x, state
        scores = mod.score(x_in)  # [B, N]
        P = state.num_prefix_tokens
        protect = ~state.valid_mask()  # padding is never chosen
        protect[:, :P] = True  # nor are prefix tokens
        scores = scores.masked_fill(protect, float("inf"))
        drop = scores.topk(r, dim=1, largest=False).indices  # [B, r]
        keep = torch.ones_like(protect).scatter(1, drop, False)  # [B, N]
        return state.split(x, keep, block)
