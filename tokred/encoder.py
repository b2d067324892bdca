"""tokred's encoder loop over the unmodified blocks of a timm ``VisionTransformer``, with reducer hooks.

The loop re-uses each block's own submodules (``norm1, attn, ls1, drop_path1, norm2, mlp, ls2, drop_path2``)
and never replaces a block's ``forward`` or ``__class__``, so LayerScale, qk-norm, drop-path and gradient
checkpointing behave as in timm. Attention runs through ``F.scaled_dot_product_attention`` with an optional
additive per-key bias: ``log(size)`` for proportional attention (ToMe) and ``-inf`` on padding slots when
images in a batch keep different token counts.

With no reducer (or reducers that do nothing), ``Encoder(vit)(image)`` equals ``vit.forward_features(image)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from tokred.reducers.base import Reducer
from tokred.state import TokenState

__all__ = ["EmbedContext", "Encoder", "attention"]

_BLOCK_PARTS = ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2")
_ATTN_PARTS = ("qkv", "q_norm", "k_norm", "proj", "num_heads", "head_dim")


@dataclass(frozen=True)
class EmbedContext:
    """What embedding-time hooks may read.

    Attributes:
        image: ``[B, 3, H, W]`` normalised input.
        target: ``[B, H, W]`` labels (only during training or for oracle policies), else None.
        encoder: the encoder, for its public embedding helpers (``patch_embed``, ``pos_embed``, ...).
    """

    image: Tensor
    target: Tensor | None
    encoder: Encoder


def attention(attn: nn.Module, x: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor]:
    """Runs a timm ``Attention`` module's own weights through ``F.scaled_dot_product_attention``.

    Args:
        attn: a timm ``Attention`` (qkv, q_norm, k_norm, norm, optional gate, proj).
        x: ``[B, N, C]`` normalised tokens.
        bias: ``[B, 1, 1, N]`` additive per-key logit bias (``-inf`` masks a key), or None.

    Returns:
        ``(out [B, N, C], keys [B, num_heads, N, head_dim])``; the keys (after k_norm) are ToMe's metric.
    """
    B, N, _ = x.shape
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    qkv = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)  # each [B, h, N, hd]
    q, k = attn.q_norm(q), attn.k_norm(k)
    if bias is not None:
        bias = bias.to(q.dtype)
    dropout = attn.attn_drop.p if attn.training else 0.0
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout)  # [B, h, N, hd]
    out = out.transpose(1, 2).reshape(B, N, attn.num_heads * attn.head_dim)
    out = getattr(attn, "norm", nn.Identity())(out)
    if gate is not None:
        out = out * gate
    out = attn.proj_drop(attn.proj(out))
    return out, k


def _attn_branch(blk: nn.Module, x: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor]:
    out, k = attention(blk.attn, blk.norm1(x), bias)
    return blk.drop_path1(blk.ls1(out)), k


def _mlp_branch(blk: nn.Module, x: Tensor) -> Tensor:
    return blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))


class Encoder(nn.Module):
    """A timm ViT whose forward is tokred's loop, calling each reducer's hooks (see ``tokred.reducers.base``).

    Args:
        vit: a timm ``VisionTransformer`` with absolute position embeddings and standard ``Block``s.
        reducers: hooks are called in this order (merger first, then pruner).
        grad_checkpointing: recompute each attention and MLP branch in backward (reducer hooks run outside
            the checkpointed regions, so their state is never recomputed).

    Raises:
        TypeError: the backbone's blocks or attention lack the parts tokred drives (names the missing part).
        ValueError: the backbone has no absolute position embedding, or more than one reducer replaces the
            embedding.
    """

    def __init__(self, vit: nn.Module, reducers: Sequence[Reducer] = (), grad_checkpointing: bool = False) -> None:
        super().__init__()
        for i, blk in enumerate(vit.blocks):
            missing = [p for p in _BLOCK_PARTS if not hasattr(blk, p)] + \
                      [f"attn.{p}" for p in _ATTN_PARTS if not hasattr(getattr(blk, "attn", None), p)]
            if missing:
                raise TypeError(f"block {i} ({type(blk).__name__}) lacks {missing}; tokred drives timm's standard "
                                "pre-norm Block with Attention")
        if getattr(vit, "pos_embed", None) is None:
            raise ValueError("tokred needs a ViT with absolute position embeddings (vit.pos_embed is None)")
        if sum(r.replaces_embedding for r in reducers) > 1:
            raise ValueError("at most one reducer may replace the patch embedding; got "
                             f"{[type(r).__name__ for r in reducers if r.replaces_embedding]}")
        self.vit = vit
        self.reducers = nn.ModuleList(reducers)
        self.grad_checkpointing = grad_checkpointing

    # ------------------------------------------------------------------ backbone facts (timm names)
    @property
    def embed_dim(self) -> int:
        return self.vit.embed_dim

    @property
    def depth(self) -> int:
        return len(self.vit.blocks)

    @property
    def num_heads(self) -> int:
        return self.vit.blocks[0].attn.num_heads

    @property
    def patch_size(self) -> tuple[int, int]:
        return tuple(self.vit.patch_embed.patch_size)

    @property
    def num_prefix_tokens(self) -> int:
        return self.vit.num_prefix_tokens

    def grid_size_for(self, image_hw: tuple[int, int]) -> tuple[int, int]:
        """``(H0, W0)`` patches for an image of ``image_hw`` px (floor division by the patch size)."""
        ph, pw = self.patch_size
        return image_hw[0] // ph, image_hw[1] // pw

    # ------------------------------------------------------------------ public embedding helpers
    def patch_embed(self, image: Tensor) -> Tensor:
        """``[B, 3, H, W]`` -> ``[B, H0, W0, C]`` patch embeddings (no position embedding)."""
        x = self.vit.patch_embed(image)
        if x.dim() == 3:  # timm flattened output
            B, _, C = x.shape
            x = x.reshape(B, *self.grid_size_for(image.shape[-2:]), C)
        return x

    def pos_embed(self, grid_size: tuple[int, int]) -> tuple[Tensor, Tensor | None]:
        """Position embeddings at ``grid_size``, resampled from the backbone's own when the grid differs.

        Returns:
            ``([1, H0*W0, C] patch position embeddings, [1, P, C] prefix position embeddings or None)``.
        """
        vit = self.vit
        pe = vit.pos_embed
        n_prefix_pe = 0 if vit.no_embed_class else vit.num_prefix_tokens
        prefix_pe = pe[:, :n_prefix_pe] if n_prefix_pe else None
        patch_pe = pe[:, n_prefix_pe:]
        if tuple(grid_size) != tuple(vit.patch_embed.grid_size):
            patch_pe = resample_abs_pos_embed(patch_pe, new_size=list(grid_size),
                                              old_size=list(vit.patch_embed.grid_size), num_prefix_tokens=0)
        return patch_pe, prefix_pe

    def prefix_tokens(self, batch: int) -> Tensor | None:
        """``[B, P, C]`` class/register tokens with their position embedding added (None when P = 0)."""
        vit = self.vit
        parts = [t.expand(batch, -1, -1) for t in (vit.cls_token, vit.reg_token) if t is not None]
        if not parts:
            return None
        prefix = torch.cat(parts, 1)
        _, prefix_pe = self.pos_embed(tuple(vit.patch_embed.grid_size))
        return prefix if prefix_pe is None else prefix + prefix_pe

    def finish_embedding(self, x: Tensor) -> Tensor:
        """Applies the backbone's post-embedding layers (pos_drop, norm_pre) to ``[B, N, C]`` tokens."""
        return self.vit.norm_pre(self.vit.pos_drop(x))

    def embed(self, image: Tensor) -> tuple[Tensor, TokenState]:
        """Standard ViT embedding: ``[B, 3, H, W]`` -> ``([B, P + N0, C], initial state)``."""
        patches = self.patch_embed(image)
        B, H0, W0, C = patches.shape
        patch_pe, _ = self.pos_embed((H0, W0))
        x = patches.reshape(B, H0 * W0, C) + patch_pe
        prefix = self.prefix_tokens(B)
        if prefix is not None:
            x = torch.cat([prefix, x], 1)
        x = self.finish_embedding(x)
        state = TokenState.initial(B, (H0, W0), self.num_prefix_tokens, x.device)
        return x, state

    # ------------------------------------------------------------------ the loop
    def forward(self, image: Tensor, target: Tensor | None = None) -> tuple[Tensor, TokenState]:
        """Embeds, runs every block with the reducers' hooks, applies the final norm.

        Args:
            image: ``[B, 3, H, W]`` normalised images; H and W multiples of the patch size.
            target: ``[B, H, W]`` labels, passed to embedding hooks (oracle policies); may be None.

        Returns:
            ``(x [B, N, C] final-normed live tokens, state)``; the bank holds halted/pruned tokens.

        Raises:
            ValueError: H or W is not a multiple of the patch size.
        """
        ph, pw = self.patch_size
        if image.shape[-2] % ph or image.shape[-1] % pw:
            raise ValueError(f"image size {tuple(image.shape[-2:])} px is not a multiple of the patch size "
                             f"{(ph, pw)}; pad or resize the input (the data pipeline's crop_size must be a multiple)")
        ctx = EmbedContext(image=image, target=target, encoder=self)
        embedder = next((r for r in self.reducers if r.replaces_embedding), None)
        x, state = embedder.embed(ctx) if embedder is not None else self.embed(image)
        reducers = list(self.reducers)
        for r in reducers:
            x, state = r.on_embed(x, state, ctx)
        attn_hooks = [r for r in reducers if r.uses_attention_hook]
        use_ckpt = self.grad_checkpointing and torch.is_grad_enabled()
        for i, blk in enumerate(self.vit.blocks):
            for r in reducers:
                x, state = r.on_block_start(i, x, state)
            state = state.record_block_entry()
            bias = state.attn_bias(torch.float32)
            if use_ckpt:
                a, keys = checkpoint(_attn_branch, blk, x, bias, use_reentrant=False)
            else:
                a, keys = _attn_branch(blk, x, bias)
            x = x + a
            for r in attn_hooks:
                x, state = r.on_attention(i, x, state, keys)
            x = x + (checkpoint(_mlp_branch, blk, x, use_reentrant=False) if use_ckpt else _mlp_branch(blk, x))
            for r in reducers:
                x, state = r.on_block(i, x, state)
        x = self.vit.norm(x)
        for r in reducers:
            x, state = r.on_final(x, state)
        return x, state

    def final_norm(self, x: Tensor) -> Tensor:
        """The backbone's final norm, for banked features that left before it."""
        return self.vit.norm(x)
