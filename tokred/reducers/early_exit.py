"""STEP early-exit pruning: confident tokens halt after chosen blocks and keep their exit prediction.

Implements the early exit of STEP (Szczepanski, Poreba, Haroun, arXiv 2509.14165, 2025; VISAPP 2025 version
by Proust et al.), reconstructed after DToP (Tang et al., "Dynamic Token Pruning in Plain Vision Transformers
for Semantic Segmentation", ICCV 2023, Sec. 3), since the full STEP text is not available
(``/work/shared/papers/methods.md`` sections 1 and 3):

1. After each exit block an auxiliary head predicts per-token class logits ``[B, N, K]``.
2. A token's confidence is its maximum softmax probability. Tokens above the threshold ``p0`` are halted,
   except the ``top_k`` most confident candidates of each predicted class in each image, which stay live so
   that every class keeps context in the later blocks (DToP Sec. 3.2).
3. Halted tokens leave the encoder (they are neither queries nor keys of any later block) and go to the
   state's bank with their exit logits; the Segmenter writes those logits into the final map at every cell
   the token covers, so a halted supertoken (dCTS, size > 1) fixes the label of all its cells.

Block indices: ``exit_blocks`` are **0-based** block indices, as everywhere in tokred (timm's ``blocks``):
the head of exit ``i`` reads the output of ``blocks[i]`` (hook ``on_block(i, ...)``). The papers count from
1: DToP's "after blocks 6 and 8" of ViT-B is ``exit_blocks=[5, 7]``. Loss names and stats use the same
0-based index (``exit_5``, ``halted_exit_5``).

Differences from the reference code (DToP, zbwxp/Dynamic-Token-Pruning; STEP's code is not public):
    * Heads: DToP's exit heads are SegViT attention-to-mask decoders (three layers, a sigmoid mask gated by a
      per-query class score); tokred's default is a per-token linear head, and ``head="atm"`` is one
      attention-to-mask layer whose similarities are used directly as class logits.
    * Halted tokens: DToP writes the halted tokens' mask logits into a per-image canvas; tokred banks the
      tokens with their exit logits (``TokenState.split``) and the Segmenter writes them into the final map
      at every cell the token covers, so halted supertokens (dCTS) fix all their cells.
    * Batches: every image halts its own tokens; images that keep different counts are padded (``valid``),
      padded slots never halt, and a batch equals its images run one by one.
    * Ties in the top-k per class are broken by token order (earlier first), deterministically.
    * Schedule ``halt_from``: STEP and DToP train the exit heads jointly with the backbone (a base model with
      the heads' auxiliary losses and no halting, then fine-tuning with halting). tokred's option ``halt_from``
      (a fraction of training in ``[0, 1]``) does both in one run: while the training progress
      (``self.progress``, set by the trainer) is below ``halt_from``, the heads get their auxiliary losses
      but no token halts, so freshly initialised heads (confidence near ``1 / K``) do not halt tokens on noise;
      from ``halt_from`` on, tokens halt as configured. Evaluation always halts as configured. ``0.0`` (the
      default) halts from the first step.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from timm.layers import Mlp, trunc_normal_
from torch import Tensor, nn

from tokred.reducers.base import BackboneInfo, Pruner
from tokred.state import AuxOutput, TokenState

__all__ = ["EarlyExit", "EXIT_HEADS", "LinearExitHead", "AttentionToMaskExitHead", "select_halted",
           "default_exit_blocks", "default_threshold"]


# ---------------------------------------------------------------------------------------------- defaults
def default_exit_blocks(depth: int) -> list[int]:
    """Default 0-based exit blocks for a backbone of ``depth`` blocks.

    DToP's choices (1-based in the paper: after blocks 8 and 16 of ViT-L, 6 and 8 of ViT-T/S/B): ``[7, 15]``
    for ``depth >= 24``, ``[5, 7]`` for ``9 <= depth < 24``. Shallower test backbones (e.g. timm ``test_vit``,
    depth 6) get exits after one and two thirds of the depth, ``[depth // 3 - 1, 2 * depth // 3 - 1]``
    (``[1, 3]`` for depth 6), clipped to ``[0, depth - 2]`` with duplicates removed.

    Raises:
        ValueError: ``depth < 2`` (no block is followed by another, so no exit is possible).
    """
    if depth < 2:
        raise ValueError(f"early exit needs a backbone depth of at least 2 blocks, got depth={depth}")
    if depth >= 24:
        return [7, 15]
    if depth >= 9:
        return [5, 7]
    return sorted({min(max(b, 0), depth - 2) for b in (depth // 3 - 1, 2 * depth // 3 - 1)})


def default_threshold(depth: int) -> float:
    """Default confidence threshold ``p0``: 0.95 for ViT-L (``depth >= 24``), else 0.9 (DToP Sec. 4.1)."""
    return 0.95 if depth >= 24 else 0.9


# ---------------------------------------------------------------------------------------------- selection
@torch.no_grad()
def select_halted(logits: Tensor, eligible: Tensor, threshold: float, top_k: int) -> tuple[Tensor, Tensor]:
    """Which tokens halt: confident ones, except the ``top_k`` most confident of each class (DToP Sec. 3.2).

    A token is a candidate when it is eligible and its maximum softmax probability is strictly above
    ``threshold``. Within each image and each predicted class, the ``top_k`` most confident candidates stay
    live (ties broken by token order, earlier first); the other candidates halt. Vectorised: two stable sorts
    bring tokens into (class, descending confidence) order and each token's rank inside its class group is
    its sorted position minus the group's start.

    Args:
        logits: ``[B, N, K]`` per-token class logits.
        eligible: ``[B, N]`` (bool) tokens that may halt (False for prefix and padding tokens).
        threshold: ``p0`` in ``(0, 1]``; with 1.0 nothing halts (a probability is never above 1).
        top_k: candidates kept live per class and image, ``>= 0``.

    Returns:
        ``(halt [B, N] bool, predicted class [B, N] long)``.
    """
    B, N, K = logits.shape
    conf, pred = logits.float().softmax(-1).max(-1)  # [B, N] each
    cand = eligible & (conf > threshold)  # [B, N]
    if top_k == 0:
        return cand, pred
    group = torch.where(cand, pred, torch.full_like(pred, K))  # non-candidates in group K (ignored)
    by_conf = torch.argsort(conf, dim=1, descending=True, stable=True)  # [B, N]
    by_group = torch.argsort(group.gather(1, by_conf), dim=1, stable=True)  # [B, N]
    order = by_conf.gather(1, by_group)  # [B, N] tokens in (group, -confidence) order
    counts = torch.zeros(B, K + 1, dtype=torch.long, device=logits.device).scatter_add(
        1, group, torch.ones_like(group))  # [B, K + 1]
    start = counts.cumsum(1) - counts  # [B, K + 1] first sorted position of each group
    pos = torch.arange(N, device=logits.device).expand(B, N)
    rank_sorted = pos - start.gather(1, group.gather(1, order))  # [B, N] rank inside the group
    rank = torch.empty_like(rank_sorted).scatter_(1, order, rank_sorted)  # [B, N] back to token order
    return cand & (rank >= top_k), pred


# ---------------------------------------------------------------------------------------------- heads
class LinearExitHead(nn.Module):
    """Per-token linear classifier: ``LayerNorm`` then ``Linear(embed_dim, num_classes)`` (the cheap default).

    Args:
        embed_dim: token width ``C``.
        num_classes: ``K``.
        num_heads: unused (uniform head signature).
    """

    def __init__(self, embed_dim: int, num_classes: int, num_heads: int = 1) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(embed_dim)
        self.fc = nn.Linear(embed_dim, num_classes)
        trunc_normal_(self.fc.weight, std=0.02)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: Tensor, attn_bias: Tensor | None) -> Tensor:
        """``x [B, N, C]`` -> ``[B, N, K]`` logits; ``attn_bias`` is ignored (tokens are classified alone)."""
        return self.fc(self.norm(x))


class AttentionToMaskExitHead(nn.Module):
    """One attention-to-mask layer (after SegViT's ATM, Zhang et al. NeurIPS 2022, Sec. 3.1; DToP's heads).

    One learned query per class cross-attends to the tokens (pre-norm, residual, then an MLP); the scaled
    similarity between each updated class query and each token's key, averaged over heads, is that token's
    logit for the class. tokred's choice: these similarities are used directly as per-token class logits
    (softmax over classes gives the confidence), where SegViT gates a sigmoid mask with a per-query class
    score; one decoder layer instead of DToP's three keeps the head small.

    Args:
        embed_dim: token width ``C``.
        num_classes: ``K``.
        num_heads: attention heads (must divide ``embed_dim``).

    Raises:
        ValueError: ``embed_dim`` is not divisible by ``num_heads``.
    """

    def __init__(self, embed_dim: int, num_classes: int, num_heads: int = 1) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"ATM exit head: embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.queries = nn.Parameter(torch.zeros(num_classes, embed_dim))
        self.token_norm = nn.LayerNorm(embed_dim)
        self.query_norm = nn.LayerNorm(embed_dim)
        self.to_q = nn.Linear(embed_dim, embed_dim)
        self.to_kv = nn.Linear(embed_dim, 2 * embed_dim)
        self.proj = nn.Linear(embed_dim, embed_dim)
        self.mlp_norm = nn.LayerNorm(embed_dim)
        self.mlp = Mlp(embed_dim, 2 * embed_dim)
        self.mask_norm = nn.LayerNorm(embed_dim)
        self.to_mask = nn.Linear(embed_dim, embed_dim)
        trunc_normal_(self.queries, std=0.02)

    def forward(self, x: Tensor, attn_bias: Tensor | None) -> Tensor:
        """Per-token class logits.

        Args:
            x: ``[B, N, C]`` tokens (prefix and padding included).
            attn_bias: ``[B, 1, 1, N]`` additive key bias (``-inf`` on padding, ``log(size)`` with
                proportional attention) or None.

        Returns:
            ``[B, N, K]`` logits.
        """
        B, N, C = x.shape
        K = self.queries.shape[0]
        h, hd = self.num_heads, self.head_dim
        kv = self.to_kv(self.token_norm(x)).reshape(B, N, 2, h, hd).permute(2, 0, 3, 1, 4)
        k, v = kv.unbind(0)  # [B, h, N, hd] each
        q0 = self.queries.to(x.dtype).expand(B, K, C)  # [B, K, C]
        q = self.to_q(self.query_norm(q0)).reshape(B, K, h, hd).transpose(1, 2)  # [B, h, K, hd]
        bias = None if attn_bias is None else attn_bias.to(q.dtype)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # [B, h, K, hd]
        cls = q0 + self.proj(a.transpose(1, 2).reshape(B, K, C))  # [B, K, C]
        cls = cls + self.mlp(self.mlp_norm(cls))
        m = self.to_mask(self.mask_norm(cls)).reshape(B, K, h, hd).transpose(1, 2)  # [B, h, K, hd]
        sim = (m @ k.transpose(-1, -2)).mean(1) * hd ** -0.5  # [B, K, N] attention-to-mask logits
        return sim.transpose(1, 2)


EXIT_HEADS: dict[str, type[nn.Module]] = {"linear": LinearExitHead, "atm": AttentionToMaskExitHead}


# ---------------------------------------------------------------------------------------------- the pruner
class EarlyExit(Pruner):
    """STEP / DToP early exit: confident tokens halt after the exit blocks and keep their exit logits.

    See the module docstring for the rule. At every exit block ``b`` (0-based, hook ``on_block(b)``):

    - the exit head predicts ``[B, N, K]`` logits for the live tokens;
    - in training, an ``AuxOutput`` named ``exit_{b}`` holds the head's logits on the patch grid with a mask of
      the cells still live at this exit (cells halted at an earlier exit are ignored by its loss);
    - when halting is on, the selected tokens are banked with their logits (``TokenState.split``); prefix
      tokens never halt, padding slots are never halted;
    - stats: ``halted_exit_{b}`` ``[B]`` (tokens halted at this exit) and ``halted_per_class`` ``[B, K]``
      (tokens halted per predicted class, summed over exits); ``split`` adds ``banked`` totals.

    Training recipe (DToP Sec. 3.3, STEP): train a base model with the heads' auxiliary losses and no halting
    (``threshold=1.0`` or ``halting=False``), then fine-tune with halting on. With halting on, tokens also
    halt in training, so the later blocks and the decoder learn with the reduced token set; the kept exit
    logits are not detached, so the main loss at halted cells trains the head that halted them (in addition
    to the auxiliary loss). The halting decision itself is taken without gradient. ``halt_from`` does both
    stages in one run: no halting in training before that fraction of training, halting after it.

    With halting off, the heads run only in training (for their auxiliary losses); at inference they are
    skipped and the output equals the model without the pruner.

    Args:
        exit_blocks: 0-based indices of the blocks whose output a head reads, strictly increasing, each in
            ``[0, depth - 2]``; None: by depth (``default_exit_blocks``: ``[7, 15]`` for depth 24, ``[5, 7]``
            for depth 9-23, ``[depth // 3 - 1, 2 * depth // 3 - 1]`` below, i.e. ``[1, 3]`` for ``test_vit``).
        threshold: confidence threshold ``p0`` in ``(0, 1]`` (max softmax probability); None: 0.95 for
            depth >= 24 (ViT-L), else 0.9 (DToP). ``1.0`` disables halting (heads still trained).
        top_k: most confident candidates per class and image that stay live (DToP: 5), ``>= 0``.
        head: ``"linear"`` (LayerNorm + Linear per token, default) or ``"atm"`` (one attention-to-mask layer).
        aux_weight: weight of each exit head's cross-entropy, ``>= 0``.
        halting: False disables halting whatever the threshold (base-model training).
        halt_from: fraction of training in ``[0, 1]`` before which no token halts in training (heads still
            get their auxiliary losses; see the module docstring); 0.0 halts from the first step. Evaluation
            (``eval()``) always halts as configured, whatever the progress.
        target_accuracy: when set, ``python -m tokred run``/``eval`` replace ``threshold`` after training by the
            lowest ``p0`` at which the exit heads' predictions on the cells above it reach this accuracy on the
            training split (``tokred.jobs.calibrate.calibrate_exit_threshold``; the training split because the
            embedded sample has no split besides the evaluation one; an under-trained head gets ``p0 = 1``,
            no halting). A tokred addition: STEP and DToP fix ``p0`` by hand.

    Raises:
        ValueError: a negative exit block or not strictly increasing (``exit_blocks``), a threshold outside
            ``(0, 1]``, ``top_k < 0``, an unknown ``head``, ``aux_weight < 0``, ``halt_from`` outside
            ``[0, 1]``; in ``setup``, an exit block
            above ``depth - 2``.
    """

    kind: ClassVar[str] = "pruner"

    def __init__(self, exit_blocks: Sequence[int] | None = None, threshold: float | None = None, top_k: int = 5,
                 head: str = "linear", aux_weight: float = 1.0, halting: bool = True,
                 target_accuracy: float | None = None, halt_from: float = 0.0) -> None:
        super().__init__()
        if isinstance(halt_from, bool) or not isinstance(halt_from, (int, float)) or not 0.0 <= halt_from <= 1.0:
            raise ValueError(f"halt_from (fraction of training before which no token halts) must be a number in "
                             f"[0, 1], got {halt_from!r}; 0.0 halts from the first step")
        #: training progress from which tokens halt in training (before it: heads trained, nothing halts)
        self.halt_from = float(halt_from)
        if target_accuracy is not None and not 0.0 < float(target_accuracy) <= 1.0:
            raise ValueError(f"target_accuracy must be in (0, 1] (accuracy of the cells that would halt) or null, "
                             f"got {target_accuracy}")
        #: calibrate ``threshold`` after training so halted cells reach this accuracy (tokred.jobs.calibrate)
        self.target_accuracy = None if target_accuracy is None else float(target_accuracy)
        if exit_blocks is not None:
            exit_blocks = list(exit_blocks)
            if not exit_blocks:
                raise ValueError("exit_blocks is empty; name at least one 0-based block index, or null for the "
                                 "default by depth (use pruner=none for no early exit)")
            if any(isinstance(b, bool) or int(b) != b for b in exit_blocks):
                raise ValueError(f"exit_blocks must be integers (0-based block indices), got {exit_blocks}")
            exit_blocks = [int(b) for b in exit_blocks]
            if min(exit_blocks) < 0:
                raise ValueError(f"exit_blocks are 0-based block indices (>= 0, as timm's blocks), got "
                                 f"{exit_blocks}")
            if any(a >= b for a, b in zip(exit_blocks, exit_blocks[1:])):
                raise ValueError(f"exit_blocks must be strictly increasing, got {exit_blocks}")
        if threshold is not None and not 0.0 < threshold <= 1.0:
            raise ValueError(f"threshold (p0, a softmax probability) must be in (0, 1], got {threshold}; "
                             "1.0 disables halting")
        if isinstance(top_k, bool) or int(top_k) != top_k or top_k < 0:
            raise ValueError(f"top_k (tokens kept live per class) must be an integer >= 0, got {top_k}")
        if head not in EXIT_HEADS:
            raise ValueError(f"unknown exit head {head!r}; valid: {', '.join(EXIT_HEADS)}")
        if aux_weight < 0:
            raise ValueError(f"aux_weight must be >= 0, got {aux_weight}")
        self._requested_blocks = exit_blocks
        self._requested_threshold = threshold
        self.exit_blocks: list[int] | None = exit_blocks  # resolved in setup
        self.threshold: float | None = None if threshold is None else float(threshold)
        self.top_k = int(top_k)
        self.head = head
        self.aux_weight = float(aux_weight)
        self.halting = bool(halting)
        self.heads = nn.ModuleList()
        self._head_of_block: dict[int, int] = {}  # 0-based block -> index into heads (configuration)

    def setup(self, info: BackboneInfo) -> None:
        """Resolves exit blocks and threshold by depth and creates one exit head per exit.

        Raises:
            ValueError: an exit block above ``depth - 2`` (``exit_blocks``), or ``depth < 2``.
        """
        super().setup(info)
        depth = info.depth
        blocks = self._requested_blocks if self._requested_blocks is not None else default_exit_blocks(depth)
        if max(blocks) > depth - 2:
            raise ValueError(f"exit_blocks {blocks} (0-based) must lie in [0, depth - 2] = [0, {depth - 2}] "
                             f"for this backbone (depth {depth}); an exit after the last block saves nothing")
        self.exit_blocks = list(blocks)
        self.threshold = self._requested_threshold if self._requested_threshold is not None \
            else default_threshold(depth)
        cls = EXIT_HEADS[self.head]
        self.heads = nn.ModuleList(cls(info.embed_dim, info.num_classes, info.num_heads) for _ in blocks)
        self._head_of_block = {b: j for j, b in enumerate(blocks)}

    @property
    def halts(self) -> bool:
        """True when tokens may halt (``halting`` on and ``threshold < 1``)."""
        return self.halting and self.threshold is not None and self.threshold < 1.0

    @property
    def halts_now(self) -> bool:
        """True when tokens halt in this forward: ``halts``, and in training ``progress >= halt_from``."""
        return self.halts and not (self.training and self.progress < self.halt_from)

    @classmethod
    def identity_config(cls) -> dict[str, Any]:
        """``threshold=1.0``: no token halts and the prediction equals the model without the pruner."""
        return {"threshold": 1.0}

    @classmethod
    def example_config(cls) -> dict[str, Any]:
        """A halting configuration for untrained heads: their confidence is near ``1 / num_classes``, so a low
        ``p0`` (0.05, below ``1 / K`` for up to 20 classes) makes every token a candidate and only the most
        confident token of each predicted class stays live."""
        return {"threshold": 0.05, "top_k": 1}

    def extra_config(self) -> dict[str, Any]:
        return {"exit_blocks": self.exit_blocks, "threshold": self.threshold, "top_k": self.top_k,
                "target_accuracy": self.target_accuracy,
                "head": self.head, "aux_weight": self.aux_weight, "halting": self.halting,
                # recorded when set: results written before the option existed read as halt_from 0.0
                **({"halt_from": self.halt_from} if self.halt_from > 0.0 else {})}

    def on_block(self, block: int, x: Tensor, state: TokenState) -> tuple[Tensor, TokenState]:
        """At an exit block: exit head, auxiliary output (training), halting of confident tokens.

        Args:
            block: 0-based block index (an exit runs where ``block`` is in ``exit_blocks``).
            x: ``[B, N, C]`` tokens after the block.
            state: token state aligned with ``x``.

        Returns:
            ``(x' [B, N', C], state)`` with the halted tokens banked with their ``[B, N, K]`` exit logits.
        """
        j = self._head_of_block.get(block)
        if j is None:
            return x, state
        name = block  # 0-based, as exit_blocks
        B, N, _ = x.shape
        K = self.info.num_classes
        if not self.training and not self.halts:  # heads only serve losses and halting
            zeros = torch.zeros(B, dtype=torch.long, device=x.device)
            state = state.add_stat(f"halted_exit_{name}", zeros)
            return x, state.add_stat("halted_per_class", zeros.new_zeros(B, K))
        logits = self.heads[j](x, state.attn_bias(x.dtype))  # [B, N, K]
        if self.training:
            grid, live = state.restore_live(logits)  # [B, K, H0, W0], [B, H0, W0]
            state = state.add_aux(AuxOutput(name=f"exit_{name}", logits=grid, weight=self.aux_weight, mask=live))
        if not self.halts_now:  # halting off, or training before halt_from: heads trained, nothing halts
            zeros = torch.zeros(B, dtype=torch.long, device=x.device)
            state = state.add_stat(f"halted_exit_{name}", zeros)
            return x, state.add_stat("halted_per_class", zeros.new_zeros(B, K))
        eligible = state.valid_mask().clone()  # [B, N]
        eligible[:, :state.num_prefix_tokens] = False
        halt, pred = select_halted(logits.detach(), eligible, self.threshold, self.top_k)  # [B, N] each
        per_class = torch.zeros(B, K + 1, dtype=torch.long, device=x.device).scatter_add(
            1, torch.where(halt, pred, K), halt.long())[:, :K]  # [B, K]
        state = state.add_stat(f"halted_exit_{name}", halt.sum(1)).add_stat("halted_per_class", per_class)
        return state.split(x, ~halt, block=block, logits=logits)
