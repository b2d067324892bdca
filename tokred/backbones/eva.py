"""Adapter for timm's ``Eva`` (EVA-02: rotary position embedding, SwiGLU MLP, gamma layer scale, scale-norm).

EVA-02 (Fang et al., "EVA-02: A Visual Representation for Neon Genesis", 2023, Sec. 2) adds 2-D rotary
position embedding (RoPE) to the queries and keys of the patch tokens (prefix tokens get none) on top of an
absolute position embedding. timm computes the RoPE table for the whole ``H0 x W0`` grid; tokred computes it
**per token from the state's position field** ``state.pos`` ``[B, N, 2]`` (row, col in patch units), with the
same formula as timm's ``RotaryEmbeddingCat`` (``index`` or ``pixel`` coordinates, ``ref_feat_shape`` rescaling,
``grid_offset``, interleaved or half layout), so:

* an unmerged patch token gets exactly timm's RoPE for its patch (tested against ``rope.get_embed``);
* a merged token (ToMe, uniform pooling) or a dCTS supertoken gets the RoPE of the size-weighted **centroid** of
  the patches it holds (a fractional position: tokred's choice; the rotation is a smooth function of position,
  so the centroid is the natural single position of a region, and a merge of two neighbours sits between them).

Keys exposed to reducers (ToMe's matching metric) are taken after ``k_norm`` and **before** the rotation: the
rotation would make identical contents at different positions look dissimilar.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tokred.backbones.base import BackboneAdapter, missing_parts, sdpa
from tokred.state import POS, TokenState

__all__ = ["EvaAdapter", "rope_at"]

_BLOCK_PARTS = ("norm1", "attn", "gamma_1", "drop_path1", "norm2", "mlp", "gamma_2", "drop_path2")
_ATTN_PARTS = ("attn.q_norm", "attn.k_norm", "attn.norm", "attn.proj", "attn.num_heads", "attn.head_dim")


def rope_at(rope: nn.Module, pos: Tensor, grid_size: tuple[int, int]) -> Tensor:
    """timm ``RotaryEmbeddingCat`` sin/cos embedding at arbitrary (fractional) grid positions.

    Args:
        rope: the model's ``RotaryEmbeddingCat`` (its ``bands``, ``grid_type``, ``ref_feat_shape``,
            ``grid_offset``, ``rotate_half``).
        pos: ``[B, N, 2]`` (row, col) in patch units.
        grid_size: ``(H0, W0)`` patches of the image (the grid timm would build the table for).

    Returns:
        ``[B, N, 2 * head_dim]`` concatenated ``(sin, cos)``, timm's ``apply_rot_embed_cat`` layout; at integer
        positions it equals ``rope.get_embed(shape=grid_size)`` row for row.
    """
    coords = []
    for axis, s in enumerate(grid_size):
        t = pos[..., axis].float()
        if rope.grid_type == "index":
            t = t + rope.grid_offset
        else:  # "pixel": linspace(-1, 1, s)
            t = t * (2.0 / max(s - 1, 1)) - 1.0
        if rope.ref_feat_shape is not None:
            t = t / s * rope.ref_feat_shape[axis]
        coords.append(t)
    grid = torch.stack(coords, -1)  # [B, N, 2]
    angle = (grid.unsqueeze(-1) * rope.bands.float()).flatten(-2)  # [B, N, 2 * bands]
    sin, cos = angle.sin(), angle.cos()
    if rope.rotate_half:
        sin, cos = torch.cat([sin, sin], -1), torch.cat([cos, cos], -1)
    else:
        sin, cos = sin.repeat_interleave(2, -1), cos.repeat_interleave(2, -1)
    return torch.cat([sin, cos], -1)


def _rotate(t: Tensor, emb: Tensor, half: bool) -> Tensor:
    """Applies the rotary embedding ``emb [B, 1, N, 2 hd]`` to ``t [B, h, N, hd]`` (timm's rotation)."""
    from timm.layers import apply_rot_embed_cat

    return apply_rot_embed_cat(t, emb, half=half)


class EvaAdapter(BackboneAdapter):
    """timm ``Eva`` / EVA-02 with pre-norm ``EvaBlock`` and ``EvaAttention`` (fused or separate qkv).

    Args:
        model: a ``timm.models.eva.Eva``.

    Raises:
        TypeError: a block or attention of a kind tokred does not drive (post-norm blocks, ``attn_type="rope"``).
        ValueError: a RoPE variant tokred cannot evaluate per token (mixed, DINOv3, 'xy' indexing,
            coordinate augmentation) or patch dropout; the message names the option to turn off.
    """

    reads_fields = (POS,)

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        from timm.models.eva import Eva

        return isinstance(model, Eva)

    def check(self) -> None:
        from timm.layers.pos_embed_sincos import RotaryEmbeddingCat
        from timm.models.eva import EvaAttention, EvaBlock

        m = self.model
        for i, blk in enumerate(m.blocks):
            if type(blk) is not EvaBlock or type(blk.attn) is not EvaAttention:
                raise TypeError(f"block {i} is {type(blk).__name__} with {type(blk.attn).__name__}; tokred's Eva "
                                "adapter drives pre-norm EvaBlock with EvaAttention (use_post_norm=False, "
                                "attn_type='eva')")
            missing = missing_parts(blk, _BLOCK_PARTS + _ATTN_PARTS)
            if missing:
                raise TypeError(f"block {i} ({type(blk).__name__}) lacks {missing}")
        if getattr(m, "patch_drop", None) is not None:
            raise ValueError("tokred's Eva adapter does not support patch dropout; set patch_drop_rate=0")
        rope = getattr(m, "rope", None)
        if rope is None:
            return
        if getattr(m, "rope_mixed", False) or type(rope) is not RotaryEmbeddingCat:
            raise ValueError(f"RoPE {type(rope).__name__} is not supported per token; tokred evaluates timm's "
                             "RotaryEmbeddingCat (rope_type='cat', EVA-02)")
        if rope.grid_type not in ("index", "pixel") or rope.grid_indexing != "ij":
            raise ValueError(f"RoPE grid_type={rope.grid_type!r}, grid_indexing={rope.grid_indexing!r} is not "
                             "supported; tokred supports 'index' or 'pixel' grids with 'ij' indexing")
        if getattr(rope, "aug_active", False):
            raise ValueError("RoPE coordinate augmentation (rope_shift/jitter/rescale_coords) is not supported; "
                             "set them to None")

    @property
    def num_heads(self) -> int:
        return int(self.model.blocks[0].attn.num_heads)

    # ------------------------------------------------------------------ RoPE from per-token positions
    def attention_inputs(self, state: TokenState) -> Tensor | None:
        """``[B, 1, N - P, 2 * head_dim]`` RoPE sin/cos of the patch tokens from ``state.pos`` (None without RoPE).

        Raises:
            ValueError: the state carries no positions, or they are not aligned with the tokens.
        """
        rope = getattr(self.model, "rope", None)
        if rope is None:
            return None
        pos = state.pos
        if pos is None:
            raise ValueError("EVA RoPE needs per-token positions: state.fields['pos'] is missing; build states "
                             "with TokenState.initial or call state.with_positions()")
        if pos.shape[:2] != state.size.shape:
            raise ValueError(f"state.fields['pos'] has {pos.shape[1]} rows but the state {state.size.shape[1]} "
                             "tokens; a reducer changed the tokens without TokenState.merge/split/unbank")
        return rope_at(rope, pos[:, state.num_prefix_tokens:], state.grid_size).unsqueeze(1)

    # ------------------------------------------------------------------ blocks
    def attention(self, block: nn.Module, x: Tensor, bias: Tensor | None, extra: Any) -> tuple[Tensor, Tensor]:
        """EvaBlock's attention branch with RoPE ``extra`` ``[B, 1, N - P, 2 hd]`` on the patch tokens."""
        attn = block.attn
        h = block.norm1(x)
        B, N, _ = h.shape
        gate = attn.gate(h).sigmoid() if getattr(attn, "gate", None) is not None else None
        if attn.qkv is not None:
            bias_qkv = None if attn.q_bias is None else torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
            qkv = F.linear(h, attn.qkv.weight, bias_qkv).reshape(B, N, 3, attn.num_heads, -1)
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, h, N, hd]
        else:
            q, k, v = (p(h).reshape(B, N, attn.num_heads, -1).transpose(1, 2)
                       for p in (attn.q_proj, attn.k_proj, attn.v_proj))
        q, k = attn.q_norm(q), attn.k_norm(k)
        keys = k
        if extra is not None:
            P, half = attn.num_prefix_tokens, bool(getattr(attn, "rotate_half", False))
            q = torch.cat([q[:, :, :P], _rotate(q[:, :, P:], extra, half)], 2).type_as(v)
            k = torch.cat([k[:, :, :P], _rotate(k[:, :, P:], extra, half)], 2).type_as(v)
        out = sdpa(q, k, v, bias, attn.attn_drop.p if attn.training else 0.0)  # [B, h, N, hd]
        out = attn.norm(out.transpose(1, 2).reshape(B, N, -1))
        if gate is not None:
            out = out * gate
        out = attn.proj_drop(attn.proj(out))
        if block.gamma_1 is not None:
            out = block.gamma_1 * out
        return block.drop_path1(out), keys

    def mlp(self, block: nn.Module, x: Tensor) -> Tensor:
        out = block.mlp(block.norm2(x))
        if block.gamma_2 is not None:
            out = block.gamma_2 * out
        return block.drop_path2(out)
