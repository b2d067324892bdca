"""Segmenter decoders (Strudel et al., ICCV 2021, Sec. 3.2) on the restored full patch grid.

A decoder never learns that reduction happened: it receives ``[B, C, H0, W0]`` grid features (every patch
holding its token's features, see ``TokenState.restore``) and returns ``[B, K, H0, W0]`` patch logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block
from torch import Tensor, nn

__all__ = ["LinearDecoder", "MaskTransformerDecoder", "DECODERS", "build_decoder"]


class LinearDecoder(nn.Module):
    """Per-patch linear classifier (Segmenter "linear" decoder).

    Args:
        embed_dim: encoder width ``C``.
        num_classes: ``K``.
    """

    def __init__(self, embed_dim: int, num_classes: int) -> None:
        super().__init__()
        self.head = nn.Linear(embed_dim, num_classes)

    def forward(self, grid: Tensor) -> Tensor:
        """``[B, C, H0, W0]`` -> ``[B, K, H0, W0]`` patch logits."""
        return self.head(grid.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class MaskTransformerDecoder(nn.Module):
    """Segmenter mask transformer: patch tokens and one learned embedding per class go through
    ``num_layers`` transformer blocks; masks are scalar products of L2-normalised patch and class embeddings.

    Args:
        embed_dim: encoder width ``C``.
        num_classes: ``K``.
        d_model: decoder width (default ``embed_dim``).
        num_layers: transformer blocks (Segmenter: 2).
        num_heads: heads (default ``d_model // 64``, at least 1).
        drop_path_rate: stochastic depth in the decoder blocks.
    """

    def __init__(self, embed_dim: int, num_classes: int, d_model: int | None = None, num_layers: int = 2,
                 num_heads: int | None = None, drop_path_rate: float = 0.0) -> None:
        super().__init__()
        d_model = d_model or embed_dim
        num_heads = num_heads or max(1, d_model // 64)
        if d_model % num_heads:
            raise ValueError(f"decoder d_model {d_model} is not divisible by num_heads {num_heads}")
        self.num_classes = num_classes
        self.proj_in = nn.Linear(embed_dim, d_model)
        self.cls_emb = nn.Parameter(torch.zeros(1, num_classes, d_model))
        dpr = torch.linspace(0, drop_path_rate, num_layers).tolist()
        self.blocks = nn.ModuleList(Block(d_model, num_heads, mlp_ratio=4.0, drop_path=d) for d in dpr)
        self.norm = nn.LayerNorm(d_model)
        self.proj_patch = nn.Linear(d_model, d_model, bias=False)
        self.proj_classes = nn.Linear(d_model, d_model, bias=False)
        self.mask_norm = nn.LayerNorm(num_classes)
        trunc_normal_(self.cls_emb, std=0.02)

    def forward(self, grid: Tensor) -> Tensor:
        """``[B, C, H0, W0]`` -> ``[B, K, H0, W0]`` mask logits."""
        B, C, H0, W0 = grid.shape
        x = self.proj_in(grid.flatten(2).transpose(1, 2))  # [B, N0, D]
        x = torch.cat([x, self.cls_emb.expand(B, -1, -1)], 1)  # [B, N0 + K, D]
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)
        patches = F.normalize(self.proj_patch(x[:, :-self.num_classes]), dim=-1)  # [B, N0, D]
        classes = F.normalize(self.proj_classes(x[:, -self.num_classes:]), dim=-1)  # [B, K, D]
        masks = self.mask_norm(patches @ classes.transpose(1, 2))  # [B, N0, K]
        return masks.transpose(1, 2).reshape(B, self.num_classes, H0, W0)


DECODERS = {"linear": LinearDecoder, "mask_transformer": MaskTransformerDecoder}


def build_decoder(name: str, embed_dim: int, num_classes: int, **kwargs) -> nn.Module:
    """Builds a decoder by name.

    Raises:
        ValueError: unknown name (valid names listed).
    """
    if name not in DECODERS:
        raise ValueError(f"unknown decoder {name!r}; valid: {', '.join(DECODERS)}")
    return DECODERS[name](embed_dim, num_classes, **kwargs)
