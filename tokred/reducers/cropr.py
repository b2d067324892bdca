"""Token Cropr: learned cross-attention pruning with last-layer fusion (Bergner, Lippert, Mahendran, CVPR 2025).

One Cropr module sits after each chosen block (by default every block except the last two). A module holds
``M`` learned queries that cross-attend to the tokens:

* **Score** (Sec. 3.2): the score of token ``n`` is its attention logit summed over the queries and heads,
  ``s_n = sum_m sum_h <q_m^h, k_n^h> = <sum_m q_m, k_n>`` with ``k_n = key(norm(x_n))``. The sum over heads
  of per-head dot products is the dot product over the full width, and no softmax sits between the logits
  and the sum, so the sum over queries can be taken first: the score is ONE dot product per token with the
  summed query (``CroprModule.score``, the only path used for selection, in training and in inference).
  Logits are unscaled (``1/sqrt(head_dim)`` scaling would not change the ranking).
* **Selection** (Sec. 3.2): each image removes its ``r`` lowest-scoring tokens (``select_topk`` of
  ``tokred.reducers.prune``, shared by every scored pruner). Prefix tokens are never removed, padding slots
  are never chosen. Removed tokens go to the state's bank with their features (``TokenState.split``).
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

* Budgets come from ``schedule.budgets_for(depth, n_b, progress, blocks)`` indexed by BLOCK, per image from
  the live patch tokens ``n_b`` it brings to the first module (``ScoredPruner.budget``): the module after
  block ``i`` removes ``budgets[i]`` tokens. A keep ratio is spread over the blocks that have a module
  (``0 .. depth - 3`` by default), so ``keep_ratio=0.5`` keeps half of each image's tokens. With the default
  constant schedule every module removes ``r``. Requested and removed counts per block are recorded.
* Too large a budget: ``setup`` raises ``ValueError`` when, at the training grid (``info.grid_size``) and the
  full budget (progress 1), no patch token would remain after some module. At forward time (other image
  sizes, sliding windows, tokens already merged) each image's budget is CLIPPED to its own live count minus
  one, so at least one patch token per image stays live and a batch equals its images run alone.
* The aggregation attends to every valid token, prefix included, with the state's attention bias
  (``-inf`` on padding, ``log(size)`` when proportional attention is on), so merged supertokens and padded
  batches from a merger are handled; supertokens are scored and pruned like any token.
* ``num_queries`` different from ``H0 * W0`` is accepted when it equals ``(H0 // f) * (W0 // f)`` for an
  integer ``f``: the queries then form a coarser ``(H0 // f, W0 // f)`` prediction grid.
* No query projection (the queries are free parameters, a linear map of them adds nothing); optional
  LayerNorm before the key path (``pre_norm``), optional key and value projections, ``num_heads`` heads with
  an output projection when ``num_heads > 1``; defaults as the public code: no norm, no projections, one head.

Differences from the reference code (benbergner/cropr, ``segm/cropr.py`` and its ViT):

* Token order: the reference reorders the kept tokens by descending score; tokred keeps their relative
  (raster) order. The blocks are permutation-equivariant once position embeddings are added, so this
  changes only float rounding, and restore goes through the token map either way.
* First module: the reference removes one token more than ``R`` in the first module, also during warm-up
  ("to account for the class token"; EVA-02-L at 512 px, R = 40: 1025 tokens -> 144 before the last block);
  tokred removes exactly ``r`` unless ``first_extra=1``.
* Warm-up: the reference raises ``R`` once per epoch (integer steps over the first half of the epochs);
  tokred's ``Warmup`` schedule ramps it with every training step (``progress``, rounded).
* Query init: the reference draws the queries from a normal with std ``embed_dim ** -0.5`` truncated at
  +-2 std; tokred's default truncates at +-2 absolute (in effect untruncated); ``query_init="reference"``
  gives the reference's.
* Score in training: the reference takes the score from the same logits as its softmax aggregation; tokred
  always uses the summed-query dot product (equal up to float rounding, one code path for selection).
* Budgets: the reference removes a fixed ``R`` from every image and has no padding; tokred clips the budget
  per image (see above), supports padded batches and merged supertokens, and takes a schedule per block.
* Protection: the reference protects the class token (index 0) only; tokred protects every prefix token
  (class token and registers).
* Last-layer fusion: the reference puts the pruned tokens back at their stored indices; tokred appends the
  bank (``TokenState.unbank``) and restores raster order through the token map (same final-block output up
  to rounding, by permutation equivariance).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from timm.layers import Mlp, trunc_normal_
from torch import Tensor, nn

from tokred.reducers.base import BackboneInfo
from tokred.reducers.prune import ScoredPruner
from tokred.schedules import Schedule
from tokred.state import AuxOutput, TokenState

__all__ = ["Cropr", "CroprModule", "QUERY_INITS"]

QUERY_INITS = ("normal", "reference")


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
        query_init: ``"normal"``: queries drawn from N(0, 1 / embed_dim) (timm's ``trunc_normal_`` cuts at
            +-2 absolute, i.e. at about +-28 std for ``embed_dim`` 192: in effect untruncated);
            ``"reference"``: the public code's init, the same std truncated at +-2 std.

    Raises:
        ValueError: ``num_heads`` does not divide ``embed_dim``, ``num_queries`` < 1, or an unknown
            ``query_init``.
    """

    def __init__(self, embed_dim: int, num_queries: int, num_classes: int, num_heads: int = 1,
                 mlp_ratio: float = 4.0, pre_norm: bool = False, key_proj: bool = False,
                 value_proj: bool = False, query_init: str = "normal") -> None:
        super().__init__()
        if query_init not in QUERY_INITS:
            raise ValueError(f"Cropr query_init={query_init!r} is not one of {QUERY_INITS}")
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
        std = embed_dim ** -0.5  # logits <q, x> of order 1 at init
        if query_init == "reference":
            trunc_normal_(self.queries, std=std, a=-2 * std, b=2 * std)  # cut at +-2 std
        else:
            trunc_normal_(self.queries, std=std)  # cut at +-2 absolute: in effect N(0, std^2)
        trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    @property
    def num_queries(self) -> int:
        return self.queries.shape[0]

    def keys(self, x: Tensor) -> Tensor:
        """``[B, N, C]`` tokens -> ``[B, N, C]`` keys (``key(norm(x))``)."""
        return self.key(self.norm(x))

    def score(self, x: Tensor) -> Tensor:
        """Token scores: the attention logits summed over queries and heads, as one dot product per token.

        ``sum_{h, m} <q_m^h, k_n^h> = <sum_m q_m, k_n>`` because no softmax sits before the sum and the heads
        split the width; equals the full ``[B, num_heads, M, N]`` logits summed over heads and queries. No
        gradient (selection is not differentiable).

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


class Cropr(ScoredPruner):
    """Token Cropr pruner (Bergner, Lippert, Mahendran, CVPR 2025); see the module docstring for the method.

    A ``ScoredPruner``: selection, budgets, protection of prefix tokens and last-layer fusion are shared
    (``tokred.reducers.prune``); Cropr supplies the score (``CroprModule.score``) and the auxiliary heads.

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
        first_extra: tokens the first module removes in addition to its budget; the reference code removes
            one (EVA-02-L at 512 px, R = 40: 1025 tokens -> 144 before the last block); default 0.
        query_init: ``"normal"`` (default) or ``"reference"`` (truncated at +-2 std), see ``CroprModule``.

    Raises:
        ValueError: negative ``r``, ``aux_weight`` or ``first_extra``; ``blocks`` negative or not strictly
            increasing; an unknown ``query_init``; and in ``setup``: ``blocks`` outside ``[0, depth - 1)``, a
            budget that leaves no patch token after a module at the training grid, a ``num_queries`` that
            forms no prediction grid, ``num_heads`` not dividing ``embed_dim``.
    """

    label: ClassVar[str] = "Cropr"

    def __init__(self, r: int = 8, schedule: Schedule | Mapping[str, Any] | None = None,
                 blocks: Sequence[int] | None = None, num_queries: int | None = None,
                 last_layer_fusion: bool = True, aux_weight: float = 1.0, num_heads: int = 1,
                 mlp_ratio: float = 4.0, pre_norm: bool = False, key_proj: bool = False,
                 value_proj: bool = False, first_extra: int = 0, query_init: str = "normal") -> None:
        super().__init__(r=r, schedule=schedule, blocks=blocks, last_layer_fusion=last_layer_fusion,
                         first_extra=first_extra)
        if aux_weight < 0:
            raise ValueError(f"Cropr aux_weight must be >= 0, got {aux_weight}")
        if num_queries is not None and num_queries < 1:
            raise ValueError(f"Cropr num_queries must be >= 1 or null (one per patch cell), got {num_queries}")
        if query_init not in QUERY_INITS:
            raise ValueError(f"Cropr query_init={query_init!r} is not one of {QUERY_INITS}")
        self.num_queries_config = num_queries
        self.aux_weight = float(aux_weight)
        self.num_heads = int(num_heads)
        self.mlp_ratio = float(mlp_ratio)
        self.pre_norm = bool(pre_norm)
        self.key_proj = bool(key_proj)
        self.value_proj = bool(value_proj)
        self.query_init = query_init
        self.query_grid: tuple[int, int] | None = None
        self.cropr_modules = nn.ModuleList()
        self._module_of_block: dict[int, int] = {}

    @classmethod
    def example_config(cls) -> dict[str, Any]:
        """``r = 6`` per module: 4 modules on a depth-6 ``test_vit`` prune 24 of about 80 patch tokens."""
        return {"r": 6}

    def setup(self, info: BackboneInfo) -> None:
        """Resolves the blocks, checks the budgets (``ScoredPruner.setup``), creates one ``CroprModule`` each.

        Raises:
            ValueError: see the class docstring.
        """
        super().setup(info)
        self.query_grid = _query_grid(info.grid_size, self.num_queries_config)
        num_queries = self.query_grid[0] * self.query_grid[1]
        self._module_of_block = {b: j for j, b in enumerate(self.blocks)}
        self.cropr_modules = nn.ModuleList(
            CroprModule(info.embed_dim, num_queries, info.num_classes, num_heads=self.num_heads,
                        mlp_ratio=self.mlp_ratio, pre_norm=self.pre_norm, key_proj=self.key_proj,
                        value_proj=self.value_proj, query_init=self.query_init)
            for _ in self.blocks)

    def extra_config(self) -> dict[str, Any]:
        return {**super().extra_config(),
                "num_queries": None if self.query_grid is None else self.query_grid[0] * self.query_grid[1],
                "query_grid": None if self.query_grid is None else list(self.query_grid),
                "aux_weight": self.aux_weight, "num_heads": self.num_heads, "mlp_ratio": self.mlp_ratio,
                "pre_norm": self.pre_norm, "key_proj": self.key_proj, "value_proj": self.value_proj,
                "query_init": self.query_init}

    # ------------------------------------------------------------------ hooks
    def score(self, block: int, x: Tensor, state: TokenState) -> Tensor:
        """``[B, N]`` scores of the module after ``block`` (``CroprModule.score``, the summed-query dot product)."""
        return self.cropr_modules[self._module_of_block[block]].score(x)

    def on_block(self, block: int, x: Tensor, state: TokenState) -> tuple[Tensor, TokenState]:
        """After ``block``: the auxiliary prediction (training only), then the shared top-k pruning.

        Args:
            block: 0-based block index.
            x: ``[B, N, C]`` tokens.
            state: the token state.

        Returns:
            ``(x' [B, N - r, C] (plus padding when images removed different counts), state)``.
        """
        if block not in self._module_of_block:
            return x, state
        if self.training:
            mod = self.cropr_modules[self._module_of_block[block]]
            feats = mod.aggregate(x.detach(), state.attn_bias(x.dtype))  # [B, M, C]; no loss reaches the backbone
            logits = mod.predict(feats)  # [B, M, K]
            B, M, K = logits.shape
            logits = logits.transpose(1, 2).reshape(B, K, *self.query_grid)  # [B, K, h, w]
            state = state.add_aux(AuxOutput(name=f"cropr_{block}", logits=logits, weight=self.aux_weight,
                                            target="downsample"))
        return super().on_block(block, x, state)
