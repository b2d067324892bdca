"""Adapter for timm's ``VisionTransformer`` (DeiT / DeiT-III LayerScale, AugReg, MAE, DINOv2 with registers).

Drives the unmodified timm ``Block`` (``norm1, attn, ls1, drop_path1, norm2, mlp, ls2, drop_path2``) and
``Attention`` (``qkv, q_norm, k_norm, norm, gate, proj``), so LayerScale, qk-norm, drop-path and gradient
checkpointing behave exactly as in timm. Attention runs through ``F.scaled_dot_product_attention`` with the
encoder's per-key bias.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from tokred.backbones.base import BackboneAdapter, missing_parts, sdpa

__all__ = ["VisionTransformerAdapter", "vit_attention"]

_BLOCK_PARTS = ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2")
_ATTN_PARTS = ("attn.qkv", "attn.q_norm", "attn.k_norm", "attn.proj", "attn.num_heads", "attn.head_dim")


def vit_attention(attn: nn.Module, x: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor]:
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
    out = sdpa(q, k, v, bias, attn.attn_drop.p if attn.training else 0.0)  # [B, h, N, hd]
    out = out.transpose(1, 2).reshape(B, N, attn.num_heads * attn.head_dim)
    out = getattr(attn, "norm", nn.Identity())(out)
    if gate is not None:
        out = out * gate
    return attn.proj_drop(attn.proj(out)), k


class VisionTransformerAdapter(BackboneAdapter):
    """timm ``VisionTransformer`` with absolute position embeddings and pre-norm ``Block``s.

    Args:
        model: a ``timm.models.vision_transformer.VisionTransformer``.

    Raises:
        TypeError: a block or its attention lacks a part tokred drives (names it).
        ValueError: the model has no absolute position embedding.
    """

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        from timm.models.vision_transformer import VisionTransformer

        return isinstance(model, VisionTransformer)

    def check(self) -> None:
        for i, blk in enumerate(self.model.blocks):
            missing = missing_parts(blk, _BLOCK_PARTS + _ATTN_PARTS)
            if missing:
                raise TypeError(f"block {i} ({type(blk).__name__}) lacks {missing}; tokred's VisionTransformer "
                                "adapter drives timm's standard pre-norm Block with Attention")
        if getattr(self.model, "pos_embed", None) is None:
            raise ValueError("tokred needs a ViT with absolute position embeddings (vit.pos_embed is None)")

    def attention(self, block: nn.Module, x: Tensor, bias: Tensor | None, extra: Any) -> tuple[Tensor, Tensor]:
        out, k = vit_attention(block.attn, block.norm1(x), bias)
        return block.drop_path1(block.ls1(out)), k

    def mlp(self, block: nn.Module, x: Tensor) -> Tensor:
        return block.drop_path2(block.ls2(block.mlp(block.norm2(x))))

    supports_packed = True

    def packed_attention(self, block: nn.Module, x: Tensor, layout: Any, bias: Tensor | None,
                         extra: Any) -> tuple[Tensor, Tensor]:
        from tokred.packing import packed_vit_attention

        out, k = packed_vit_attention(block.attn, block.norm1(x), layout, bias)
        return block.drop_path1(block.ls1(out)), k
