"""Segmenter decoders (Strudel et al., ICCV 2021, Sec. 3.2) on the restored full patch grid, and their registry.

A decoder never learns that reduction happened: it receives ``[B, C, H0, W0]`` grid features (every patch
holding its token's features, see ``TokenState.restore``) and returns ``[B, K, H0, W0]`` patch logits.
Multi-level decoders also name encoder blocks in ``out_indices``; ``Segmenter`` asks the encoder for those
taps and passes them as ``taps={block index: [B, C, H0, W0]}`` (full grids, reduced cells restored).

Decoders are looked up in ``tokred.plugins.DECODERS`` (builtins ``linear``, ``mask_transformer``; others come
from the ``tokred.decoders`` entry-point group or ``DECODERS.register``).
"""

from __future__ import annotations

import difflib
import inspect
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from tokred.plugins import DECODERS

__all__ = ["DECODERS", "Decoder", "LinearDecoder", "MaskTransformerDecoder", "build_decoder"]


class Decoder(nn.Module):
    """Base class of every decoder: ``[B, C, H0, W0]`` restored grid (+ optional taps) -> ``[B, K, H0, W0]``.

    Subclasses take ``(embed_dim, num_classes, **kwargs)`` in their constructor (``build_decoder`` checks the
    kwargs against it) and set ``out_indices`` to the 0-based encoder blocks whose outputs they read.

    Attributes:
        out_indices: 0-based block indices of the encoder taps this decoder reads (default: none).
    """

    out_indices: tuple[int, ...] = ()

    def forward(self, grid: Tensor, taps: dict[int, Tensor] | None = None) -> Tensor:  # pragma: no cover
        """``grid [B, C, H0, W0]`` final-normed features, ``taps {i: [B, C, H0, W0]}`` -> ``[B, K, H0, W0]``."""
        raise NotImplementedError


class LinearDecoder(Decoder):
    """Per-patch linear classifier (Segmenter "linear" decoder, Strudel et al. 2021, Sec. 3.2).

    Args:
        embed_dim: encoder width ``C``.
        num_classes: ``K``.
    """

    def __init__(self, embed_dim: int, num_classes: int) -> None:
        super().__init__()
        self.head = nn.Linear(embed_dim, num_classes)

    def forward(self, grid: Tensor, taps: dict[int, Tensor] | None = None) -> Tensor:
        """``[B, C, H0, W0]`` -> ``[B, K, H0, W0]`` patch logits (taps unused)."""
        return self.head(grid.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class MaskTransformerDecoder(Decoder):
    """Segmenter mask transformer (Strudel et al. 2021, Sec. 3.2): patch tokens and one learned embedding per
    class go through ``num_layers`` transformer blocks; masks are scalar products of L2-normalised patch and
    class embeddings, then a LayerNorm over the ``K`` classes.

    Args:
        embed_dim: encoder width ``C``.
        num_classes: ``K``.
        d_model: decoder width (default ``embed_dim``).
        num_layers: transformer blocks (Segmenter: 2).
        num_heads: heads (default ``d_model // 64``, at least 1).
        drop_path_rate: stochastic depth in the decoder blocks.
        qkv_bias: biases on the blocks' query/key/value projection. The Segmenter authors' and mmseg's
            released checkpoints have them (set ``decoder.kwargs.qkv_bias=true`` to load those); tokred's
            default is ``False`` so that its own earlier checkpoints keep loading.

    Raises:
        ValueError: ``d_model`` not divisible by ``num_heads``.
    """

    def __init__(self, embed_dim: int, num_classes: int, d_model: int | None = None, num_layers: int = 2,
                 num_heads: int | None = None, drop_path_rate: float = 0.0, qkv_bias: bool = False) -> None:
        super().__init__()
        d_model = d_model or embed_dim
        num_heads = num_heads or max(1, d_model // 64)
        if d_model % num_heads:
            raise ValueError(f"decoder d_model {d_model} is not divisible by num_heads {num_heads}; "
                             "set decoder.kwargs.num_heads to a divisor")
        self.num_classes = num_classes
        self.proj_in = nn.Linear(embed_dim, d_model)
        self.cls_emb = nn.Parameter(torch.zeros(1, num_classes, d_model))
        dpr = torch.linspace(0, drop_path_rate, num_layers).tolist()
        self.blocks = nn.ModuleList(
            Block(d_model, num_heads, mlp_ratio=4.0, qkv_bias=qkv_bias, drop_path=d) for d in dpr)
        self.norm = nn.LayerNorm(d_model)
        self.proj_patch = nn.Linear(d_model, d_model, bias=False)
        self.proj_classes = nn.Linear(d_model, d_model, bias=False)
        self.mask_norm = nn.LayerNorm(num_classes)
        trunc_normal_(self.cls_emb, std=0.02)

    def forward(self, grid: Tensor, taps: dict[int, Tensor] | None = None) -> Tensor:
        """``[B, C, H0, W0]`` -> ``[B, K, H0, W0]`` mask logits (taps unused)."""
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


def _constructor_kwargs(cls: type) -> tuple[list[str], bool]:
    """Keyword names a decoder class accepts after ``(embed_dim, num_classes)``, and whether it takes ``**kw``."""
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]  # drop self
    names = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    return [n for n in names if n not in ("embed_dim", "num_classes")], any(p.kind == p.VAR_KEYWORD for p in params)


def build_decoder(name: str, embed_dim: int, num_classes: int, **kwargs: Any) -> Decoder:
    """Builds the decoder registered as ``name`` in ``tokred.plugins.DECODERS``.

    Args:
        name: registered decoder name (``linear``, ``mask_transformer``, plug-ins).
        embed_dim: encoder width ``C``.
        num_classes: ``K``.
        **kwargs: constructor arguments (``configs/decoder/<name>.yaml`` ``kwargs``).

    Raises:
        ValueError: unknown name (valid names and close matches listed), or a kwarg the decoder's constructor
            does not take (names it and the valid ones).
        TypeError: the registered object is not a ``Decoder`` subclass.
    """
    valid = DECODERS.names()
    if name not in valid:
        close = difflib.get_close_matches(str(name), valid, n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown decoder {name!r}; valid: {', '.join(valid)}{hint} (decoder=<name>)")
    cls = DECODERS.get(name)
    if not (isinstance(cls, type) and issubclass(cls, Decoder)):
        raise TypeError(f"decoder {name!r} ({DECODERS.provenance(name)['target']}) must be a subclass of "
                        f"tokred.models.decoders.Decoder, got {cls!r}")
    accepted, open_kwargs = _constructor_kwargs(cls)
    unknown = [k for k in kwargs if k not in accepted]
    if unknown and not open_kwargs:
        hints = [f"{k!r} (did you mean {difflib.get_close_matches(k, accepted, n=1)[0]!r}?)"
                 if difflib.get_close_matches(k, accepted, n=1) else repr(k) for k in unknown]
        raise ValueError(f"decoder {name!r} takes no argument {', '.join(hints)}; valid decoder.kwargs: "
                         f"{', '.join(accepted) or '(none)'}")
    return cls(embed_dim, num_classes, **kwargs)
