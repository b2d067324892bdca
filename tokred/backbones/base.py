"""The backbone-adapter protocol: what tokred's encoder loop asks a backbone family.

The encoder (``tokred.encoder.Encoder``) owns one generic loop; an adapter answers, for one family of timm
models, how to embed an image (patch embedding, position embedding resampled to the grid, prefix tokens), how
to run one block's attention branch with an additive per-key bias and expose its keys, the MLP branch, the
final norm, and the backbone facts (timm names: ``embed_dim``, ``num_heads``, ``depth``, ``patch_size``,
``num_prefix_tokens``). Adapters drive the backbone's own, unmodified submodules: they never replace a block's
``forward`` or ``__class__``.

An adapter is a plain object holding the model (not an ``nn.Module``: the encoder registers the model itself,
so checkpoints keep the ``encoder.vit.`` prefix). Families register through ``tokred.plugins.BACKBONES``
(entry-point group ``tokred.backbones``); ``tokred.backbones.adapter_for(model)`` picks the one whose
``matches(model)`` is True.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from tokred.state import TokenState

__all__ = ["BackboneAdapter"]


class BackboneAdapter:
    """Base class of backbone adapters; subclasses implement ``matches``, the attention and MLP branches.

    The embedding helpers below cover timm's absolute-position ViTs (``patch_embed``, ``pos_embed``,
    ``cls_token``, ``reg_token``, ``no_embed_class``, ``pos_drop``, ``norm_pre``, ``norm``), which both
    built-in families share; override them for other layouts.

    Args:
        model: the timm backbone.

    Raises:
        TypeError: the model lacks a part the adapter drives (names the part); raised by ``check``.
    """

    #: Per-token state fields the attention branch reads (the encoder recomputes ``attention_inputs`` only when
    #: one of them changed since the previous block).
    reads_fields: tuple[str, ...] = ()

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.check()

    # ------------------------------------------------------------------ matching
    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        """True when this adapter drives ``model`` (e.g. ``isinstance(model, timm's VisionTransformer)``)."""
        raise NotImplementedError(f"{cls.__name__} must implement matches(model)")

    def check(self) -> None:
        """Validates that the model has what the adapter drives.

        Raises:
            TypeError / ValueError: a missing part or an unsupported option, naming it and the fix.
        """

    # ------------------------------------------------------------------ backbone facts (timm names)
    @property
    def blocks(self) -> Sequence[nn.Module]:
        return self.model.blocks

    @property
    def embed_dim(self) -> int:
        return int(self.model.embed_dim)

    @property
    def depth(self) -> int:
        return len(self.model.blocks)

    @property
    def num_heads(self) -> int:
        return int(self.model.blocks[0].attn.num_heads)

    @property
    def patch_size(self) -> tuple[int, int]:
        return tuple(self.model.patch_embed.patch_size)

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.model.num_prefix_tokens)

    # ------------------------------------------------------------------ embedding
    def patch_embed(self, image: Tensor) -> Tensor:
        """``[B, 3, H, W]`` -> ``[B, H0, W0, C]`` patch embeddings (no position embedding)."""
        x = self.model.patch_embed(image)
        if x.dim() == 3:  # timm flattened output
            ph, pw = self.patch_size
            B, _, C = x.shape
            x = x.reshape(B, image.shape[-2] // ph, image.shape[-1] // pw, C)
        return x

    def pos_embed(self, grid_size: tuple[int, int]) -> tuple[Tensor, Tensor | None]:
        """Absolute position embeddings at ``grid_size`` (resampled from the model's own when the grid differs).

        Returns:
            ``([1, H0*W0, C] patch position embeddings, [1, P, C] prefix position embeddings or None)``; zeros
            for the patches when the model has no absolute position embedding (RoPE only).
        """
        from timm.layers import resample_abs_pos_embed

        m = self.model
        pe = getattr(m, "pos_embed", None)
        if pe is None:
            H0, W0 = grid_size
            ref = m.patch_embed.proj.weight
            return ref.new_zeros(1, H0 * W0, self.embed_dim), None
        n_prefix_pe = 0 if m.no_embed_class else self.num_prefix_tokens
        prefix_pe = pe[:, :n_prefix_pe] if n_prefix_pe else None
        patch_pe = pe[:, n_prefix_pe:]
        own = tuple(m.patch_embed.grid_size)
        if tuple(grid_size) != own:
            patch_pe = resample_abs_pos_embed(patch_pe, new_size=list(grid_size), old_size=list(own),
                                              num_prefix_tokens=0)
        return patch_pe, prefix_pe

    def prefix_tokens(self, batch: int) -> Tensor | None:
        """``[B, P, C]`` class/register tokens with their position embedding added (None when P = 0)."""
        m = self.model
        parts = [t.expand(batch, -1, -1) for t in (getattr(m, "cls_token", None), getattr(m, "reg_token", None))
                 if t is not None]
        if not parts:
            return None
        prefix = torch.cat(parts, 1)
        _, prefix_pe = self.pos_embed(tuple(m.patch_embed.grid_size))
        return prefix if prefix_pe is None else prefix + prefix_pe

    def finish_embedding(self, x: Tensor) -> Tensor:
        """Applies the backbone's post-embedding layers (``pos_drop``, ``norm_pre``) to ``[B, N, C]`` tokens."""
        return self.model.norm_pre(self.model.pos_drop(x))

    def final_norm(self, x: Tensor) -> Tensor:
        """The backbone's final norm on ``[B, N, C]`` tokens."""
        return self.model.norm(x)

    # ------------------------------------------------------------------ blocks
    def attention_inputs(self, state: TokenState) -> Any:
        """Extra per-step input of ``attention`` computed from the state (default None).

        Called outside gradient-checkpointed regions, and again only when a field in ``reads_fields`` changed.
        """
        return None

    def attention(self, block: nn.Module, x: Tensor, bias: Tensor | None, extra: Any) -> tuple[Tensor, Tensor]:
        """One block's attention branch: ``x`` -> ``(branch output, keys)``; the encoder adds the residual.

        Args:
            block: ``blocks[i]``.
            x: ``[B, N, C]`` tokens entering the block.
            bias: ``[B, 1, 1, N]`` additive per-key logit bias (``log(size)``, ``-inf`` on padding), or None.
            extra: what ``attention_inputs`` returned for the current state.

        Returns:
            ``([B, N, C] drop_path(layer_scale(attn(norm1(x)))), [B, num_heads, N, head_dim] keys)``.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement attention()")

    def mlp(self, block: nn.Module, x: Tensor) -> Tensor:
        """One block's MLP branch ``[B, N, C]`` -> ``[B, N, C]`` (without the residual)."""
        raise NotImplementedError(f"{type(self).__name__} must implement mlp()")

    # ------------------------------------------------------------------ packed layout (optional)
    #: True when ``packed_attention`` is implemented: the encoder may then run blocks on packed tokens.
    supports_packed: bool = False

    def packed_attention(self, block: nn.Module, x: Tensor, layout: Any, bias: Tensor | None,
                         extra: Any) -> tuple[Tensor, Tensor]:
        """``attention`` on packed tokens (``tokred.packing``): ``x [T, C]`` -> ``([T, C] branch output,
        [T, num_heads, head_dim] keys)``, attention block-diagonal per image with the per-key ``bias [T]``.
        The MLP branch runs through ``mlp`` unchanged (it acts per token)."""
        raise NotImplementedError(f"{type(self).__name__} does not run packed batches (supports_packed=False)")

    def reference_forward(self, image: Tensor) -> Tensor:
        """The backbone's own ``forward_features`` ``[B, 3, H, W]`` -> ``[B, P + N0, C]`` (tests, benchmarks)."""
        return self.model.forward_features(image)


def sdpa(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, dropout_p: float) -> Tensor:
    """``F.scaled_dot_product_attention`` of ``[B, h, N, hd]`` tensors with an optional ``[B, 1, 1, N]`` bias."""
    if bias is not None:
        bias = bias.to(q.dtype)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p)


def missing_parts(obj: Any, parts: Sequence[str]) -> list[str]:
    """Names in ``parts`` that ``obj`` lacks (dotted names look into submodules)."""
    out = []
    for p in parts:
        o = obj
        for a in p.split("."):
            if not hasattr(o, a):
                out.append(p)
                break
            o = getattr(o, a)
    return out
