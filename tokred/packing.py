"""Packed token layout: the live tokens of a batch concatenated, and block-diagonal attention over them.

tokred's padded layout keeps ``[B, N, C]`` tokens with a ``valid [B, N]`` mask, so padded slots still run
through every qkv, projection and MLP. The packed layout (issue 12) keeps only the ``T = valid.sum()`` live
tokens, ``[T, C]``, image after image, each image's tokens in their original order, plus the metadata
variable-length attention kernels take: ``cu_seqlens [B + 1]`` (int32 offsets, FlashAttention's convention)
and per-token ``image_ids [T]``. Linear layers, norms and MLPs run on ``[T, C]`` unchanged; attention must be
block-diagonal per image (``packed_attention``), with proportional attention's per-key bias ``log(size)``
(ToMe, Bolya et al. 2023, Sec. 3) packed to ``[T]``.

Usage::

    packed = pack(x, state.valid)                       # [B, N, C] -> data [T, C]
    bias = pack_key_bias(state.attn_bias, packed.layout)  # [B, 1, 1, N] or [B, N] -> [T]
    y = packed_vit_attention(block.attn, packed.data, packed.layout, bias)[0]  # [T, C]
    x2, valid2 = unpack(packed.with_data(y))            # back to [B, N, C], zeros on padding

Backends of ``packed_attention`` (``backend=``), all exact up to float rounding:

- ``"loop"``: one ``F.scaled_dot_product_attention`` per image over views of the packed buffer; runs of
  consecutive images with equal length share one batched call (all-equal batches: a single call on views,
  no padding copy). Any device and dtype, bias, dropout and autograd. Python overhead grows with B.
- ``"padded"``: re-pads q, k, v to ``[B, h, Nmax, hd]`` and makes one SDPA call with a ``[B, 1, 1, Nmax]``
  additive mask (``-inf`` on padding, the bias elsewhere); the reference and fallback. Any device, bias,
  dropout, autograd; pays the padding FLOPs again inside attention and three copies.
- ``"flex"``: ``torch.nn.attention.flex_attention`` with a document mask (``BlockMask`` of
  ``image_ids[q] == image_ids[k]``, cached on the layout) and a ``score_mod`` adding ``key_bias[k]``.
  CUDA: compiled (one ``torch.compile(flex_attention)`` wrapper per process; torch.compile recompiles for a
  new T and may mark T dynamic after the second), bias and autograd, no dropout. NOT RUN HERE (no GPU on the
  development machine). CPU: forward only (torch refuses backward on CPU), eager and unfused (it
  materialises ``[h, T, T]`` scores; 27x today's padded call), so tests use it as an independent check.
- ``"nested"``: nested jagged tensors (``torch.nested.nested_tensor_from_jagged``) through SDPA. No bias
  (``key_bias`` must be None); dropout and autograd. Works on CPU in torch 2.15 (math fallback, tested;
  6-13x today's padded call); on CUDA it reaches the fused flash / memory-efficient kernels (NOT RUN HERE).
- ``"varlen"``: ``torch.nn.attention.varlen.varlen_attn`` (FlashAttention / cuDNN varlen), when the installed
  torch has it (2.15 does). CUDA only, fp16/bf16, no bias, no dropout. NOT RUN HERE.
- ``"auto"``: CPU -> ``"loop"`` (measured fastest, numbers in ``packed_attention``); CUDA -> ``"padded"`` (the
  fused SDPA kernel on the re-padded batch; the norms, projections and MLP still run packed). ``"flex"`` is
  opt-in until its compile-per-token-count behaviour is measured on a GPU (none was lent to this work).

Every availability check is done at call time (``available_backends``), so importing this module never
needs CUDA, flex attention, nested tensors or varlen.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["BACKENDS", "PackLayout", "Packed", "available_backends", "layout_from_lengths", "layout_from_valid",
           "pack", "pack_key_bias", "pack_tensor", "packed_attention", "packed_vit_attention", "unpack"]

BACKENDS = ("auto", "loop", "padded", "flex", "nested", "varlen")


@dataclasses.dataclass(frozen=True, eq=False)
class PackLayout:
    """Where each packed token came from; shared by every tensor packed from the same ``valid``.

    Attributes:
        cu_seqlens: ``[B + 1]`` int32 offsets; image ``b`` owns packed rows ``cu_seqlens[b]:cu_seqlens[b + 1]``.
        image_ids: ``[T]`` long, the image of each packed token.
        positions: ``[T]`` long, each token's slot in its padded row (``unpack`` puts it back there).
        lengths: ``[B]`` long, live tokens per image.
        lengths_list: the same as Python ints (read once at packing; kernels need host-side lengths).
        seq_len: ``N``, the padded row length the layout was built from.
    """

    cu_seqlens: Tensor
    image_ids: Tensor
    positions: Tensor
    lengths: Tensor
    lengths_list: tuple[int, ...]
    seq_len: int
    _cache: dict = dataclasses.field(default_factory=dict, repr=False)

    @property
    def batch(self) -> int:
        return len(self.lengths_list)

    @property
    def total(self) -> int:
        """``T``, the number of packed tokens."""
        return sum(self.lengths_list)

    @property
    def max_len(self) -> int:
        return max(self.lengths_list, default=0)

    @property
    def device(self) -> torch.device:
        return self.image_ids.device

    def valid(self, N: int | None = None) -> Tensor:
        """``[B, N]`` bool mask of the slots ``unpack`` fills (N defaults to ``seq_len``)."""
        N = self.seq_len if N is None else N
        out = torch.zeros(self.batch * N, dtype=torch.bool, device=self.device)
        return out.index_fill_(0, self.image_ids * N + self.positions, True).view(self.batch, N)

    def rank(self) -> Tensor:
        """``[T]`` long, each token's index among its image's live tokens (0 .. length - 1)."""
        if "rank" not in self._cache:
            starts = self.cu_seqlens[:-1].long()
            self._cache["rank"] = torch.arange(self.total, device=self.device) - starts[self.image_ids]
        return self._cache["rank"]


@dataclasses.dataclass(frozen=True, eq=False)
class Packed:
    """Packed tokens ``data [T, ...]`` with their ``layout``."""

    data: Tensor
    layout: PackLayout

    @property
    def cu_seqlens(self) -> Tensor:
        return self.layout.cu_seqlens

    @property
    def image_ids(self) -> Tensor:
        return self.layout.image_ids

    @property
    def lengths(self) -> Tensor:
        return self.layout.lengths

    def with_data(self, data: Tensor) -> Packed:
        """The same layout around new ``[T, ...]`` data (e.g. a block's output).

        Raises:
            ValueError: ``data`` does not have T rows.
        """
        _check_rows(data, self.layout, "data")
        return Packed(data, self.layout)


def _check_rows(t: Tensor, layout: PackLayout, name: str) -> None:
    if t.dim() < 1 or t.shape[0] != layout.total:
        raise ValueError(f"{name} has shape {tuple(t.shape)}; expected [T, ...] with T = {layout.total} packed "
                         f"tokens (lengths {list(layout.lengths_list)})")


def _make_layout(image_ids: Tensor, positions: Tensor, lengths: Tensor, seq_len: int) -> PackLayout:
    cu = torch.zeros(lengths.numel() + 1, dtype=torch.int32, device=lengths.device)
    cu[1:] = lengths.cumsum(0)
    return PackLayout(cu, image_ids, positions, lengths, tuple(int(n) for n in lengths.tolist()), seq_len)


def layout_from_valid(valid: Tensor) -> PackLayout:
    """The layout of the ``True`` slots of ``valid [B, N]`` (bool), row-major (image order, then slot order).

    Raises:
        ValueError: ``valid`` is not a 2-D bool tensor.
    """
    if valid.dim() != 2 or valid.dtype != torch.bool:
        raise ValueError(f"valid has shape {tuple(valid.shape)} and dtype {valid.dtype}; expected [B, N] bool")
    B, N = valid.shape
    flat = valid.reshape(-1).nonzero().squeeze(1)  # [T], one host sync (T is data-dependent)
    return _make_layout(flat // N, flat % N, valid.sum(1), N)


def layout_from_lengths(lengths: Tensor | Sequence[int], N: int | None = None,
                        device: torch.device | str | None = None) -> PackLayout:
    """The layout of images holding their ``lengths [B]`` tokens left-aligned in rows of ``N`` (default max).

    Raises:
        ValueError: a negative length, or one larger than ``N``.
    """
    lengths = torch.as_tensor(lengths, dtype=torch.long, device=device)
    if lengths.dim() != 1:
        raise ValueError(f"lengths has shape {tuple(lengths.shape)}; expected [B]")
    ls = lengths.tolist()
    N = max(ls, default=0) if N is None else int(N)
    if any(n < 0 or n > N for n in ls):
        raise ValueError(f"lengths {ls} must lie in [0, N = {N}]")
    image_ids = torch.repeat_interleave(torch.arange(len(ls), device=lengths.device), lengths)
    starts = lengths.cumsum(0) - lengths  # [B] first packed row of each image
    positions = torch.arange(sum(ls), device=lengths.device) - starts[image_ids]  # left-aligned slots
    layout = _make_layout(image_ids, positions, lengths, N)
    layout._cache["rank"] = positions
    return layout


def pack_tensor(t: Tensor, layout: PackLayout) -> Tensor:
    """Packs a per-token tensor ``[B, N, ...]`` (features, sizes, positions, bias) into ``[T, ...]``.

    Differentiable (a gather). Raises:
        ValueError: ``t`` is not ``[B, N, ...]`` with the layout's B and N.
    """
    B, N = layout.batch, layout.seq_len
    if t.dim() < 2 or tuple(t.shape[:2]) != (B, N):
        raise ValueError(f"tensor to pack has shape {tuple(t.shape)}; expected [B, N, ...] = [{B}, {N}, ...] "
                         "matching valid")
    return t.reshape(B * N, *t.shape[2:]).index_select(0, layout.image_ids * N + layout.positions)


def pack(x: Tensor, valid: Tensor) -> Packed:
    """Packs the live tokens of ``x [B, N, C]`` (``valid [B, N]`` bool) into ``Packed(data [T, C], layout)``.

    Within each image the live tokens keep their order; ``unpack`` is the exact inverse. Differentiable in x.

    Raises:
        ValueError: ``valid`` is not ``[B, N]`` bool, or ``x`` is not ``[B, N, ...]`` with the same B, N.
    """
    if valid.dim() == 2 and (x.dim() < 2 or tuple(x.shape[:2]) != tuple(valid.shape)):
        raise ValueError(f"x has shape {tuple(x.shape)} but valid has shape {tuple(valid.shape)}; expected x "
                         f"[B, N, C] with [B, N] = {list(valid.shape)}")
    layout = layout_from_valid(valid)
    return Packed(pack_tensor(x, layout), layout)


def pack_key_bias(bias: Tensor, layout: PackLayout) -> Tensor:
    """Packs a per-key attention bias ``[B, N]`` or ``[B, 1, 1, N]`` (``TokenState.attn_bias``) into ``[T]``.

    Padded slots (``-inf`` in the padded layout) are dropped with the padding; the packed bias is finite
    wherever the padded one was finite on live keys.

    Raises:
        ValueError: the shape is neither ``[B, N]`` nor ``[B, 1, 1, N]`` for the layout's B and N.
    """
    B, N = layout.batch, layout.seq_len
    if bias.dim() == 4 and tuple(bias.shape) == (B, 1, 1, N):
        bias = bias.reshape(B, N)
    if tuple(bias.shape) != (B, N):
        raise ValueError(f"key bias has shape {tuple(bias.shape)}; expected [B, N] or [B, 1, 1, N] with "
                         f"B = {B}, N = {N}")
    return pack_tensor(bias, layout)


def unpack(packed: Packed, N: int | None = None, fill: float = 0.0) -> tuple[Tensor, Tensor]:
    """Re-pads ``packed.data [T, ...]`` to ``[B, N, ...]``: each token back at its slot, ``fill`` elsewhere.

    Args:
        packed: the packed tokens.
        N: padded row length; default the ``N`` packing started from. Must exceed every token's slot.

    Returns:
        ``(x [B, N, ...], valid [B, N] bool)``; differentiable in ``packed.data``.

    Raises:
        ValueError: ``N`` is smaller than a token's slot needs, or data does not have T rows.
    """
    layout = packed.layout
    _check_rows(packed.data, layout, "packed data")
    N = layout.seq_len if N is None else int(N)
    if N != layout.seq_len and layout.total and N <= int(layout.positions.max()):
        raise ValueError(f"unpack to N = {N} slots, but a token sits at slot {int(layout.positions.max())}; "
                         f"expected N > {int(layout.positions.max())}")
    data = packed.data
    out = data.new_full((layout.batch * N, *data.shape[1:]), fill)
    out = out.index_copy(0, layout.image_ids * N + layout.positions, data)
    return out.view(layout.batch, N, *data.shape[1:]), layout.valid(N)


# ---------------------------------------------------------------------------------------------- backends
def _flex_module() -> Any | None:
    try:
        return importlib.import_module("torch.nn.attention.flex_attention")
    except ImportError:
        return None


def _varlen_fn() -> Any | None:
    try:
        return getattr(importlib.import_module("torch.nn.attention.varlen"), "varlen_attn", None)
    except ImportError:
        return None


def available_backends(device: torch.device | str = "cpu", requires_grad: bool = False,
                       with_bias: bool = False, dropout: bool = False) -> tuple[str, ...]:
    """The concrete backends (not ``auto``) usable for a call with these properties on this torch."""
    dev = torch.device(device).type
    out = ["loop", "padded"]
    if _flex_module() is not None and not dropout and (dev == "cuda" or not requires_grad):
        out.append("flex")
    if hasattr(torch.nested, "nested_tensor_from_jagged") and not with_bias:
        out.append("nested")
    if dev == "cuda" and _varlen_fn() is not None and not with_bias and not dropout:
        out.append("varlen")
    return tuple(out)


def _heads_first(t: Tensor, s: int, e: int, n_img: int) -> Tensor:
    # packed rows s:e of n_img images of equal length -> [n_img, h, L, hd] view
    return t[s:e].unflatten(0, (n_img, -1)).transpose(1, 2)


def _loop(q, k, v, layout, key_bias, dropout_p, scale):
    outs, lens, cu = [], layout.lengths_list, 0
    b = 0
    while b < len(lens):  # one SDPA call per run of consecutive images with equal length
        e_img = b
        while e_img + 1 < len(lens) and lens[e_img + 1] == lens[b]:
            e_img += 1
        n_img, L = e_img - b + 1, lens[b]
        s, e = cu, cu + n_img * L
        cu, b = e, e_img + 1
        if L == 0:
            continue
        mask = None if key_bias is None else key_bias[s:e].view(n_img, 1, 1, L).to(q.dtype)
        o = F.scaled_dot_product_attention(_heads_first(q, s, e, n_img), _heads_first(k, s, e, n_img),
                                           _heads_first(v, s, e, n_img), attn_mask=mask, dropout_p=dropout_p,
                                           scale=scale)  # [n_img, h, L, hd]
        outs.append(o.transpose(1, 2).flatten(0, 1))  # [n_img * L, h, hd]
    if not outs:
        return v.new_zeros(v.shape)
    return outs[0] if len(outs) == 1 else torch.cat(outs, 0)


def _padded(q, k, v, layout, key_bias, dropout_p, scale):
    B, L = layout.batch, layout.max_len
    idx = layout.image_ids * L + layout.rank()  # [T] slot in the [B * L] left-aligned padding

    def pad(t):  # [T, h, d] -> [B, h, L, d]
        return t.new_zeros(B * L, *t.shape[1:]).index_copy(0, idx, t).view(B, L, *t.shape[1:]).transpose(1, 2)

    valid = torch.zeros(B * L, dtype=torch.bool, device=q.device).index_fill_(0, idx, True).view(B, L)
    valid[:, 0] |= layout.lengths == 0  # an empty image attends to one zero key, so no NaN reaches backward
    mask = torch.zeros(B * L, dtype=q.dtype, device=q.device)
    if key_bias is not None:
        mask = mask.index_copy(0, idx, key_bias.to(q.dtype))
    mask = mask.view(B, L).masked_fill(~valid, float("-inf")).view(B, 1, 1, L)
    o = F.scaled_dot_product_attention(pad(q), pad(k), pad(v), attn_mask=mask, dropout_p=dropout_p, scale=scale)
    return o.transpose(1, 2).reshape(B * L, o.shape[1], o.shape[3]).index_select(0, idx)  # [T, h, hd_v]


@functools.lru_cache(maxsize=1)
def _compiled_flex():
    return torch.compile(_flex_module().flex_attention)  # GPU path, NOT RUN HERE


def _block_mask(layout: PackLayout):
    if "block_mask" not in layout._cache:
        ids, T = layout.image_ids, layout.total

        def document(b, h, q_idx, kv_idx):
            return ids[q_idx] == ids[kv_idx]

        layout._cache["block_mask"] = _flex_module().create_block_mask(document, None, None, T, T,
                                                                       device=layout.device)
    return layout._cache["block_mask"]


def _flex(q, k, v, layout, key_bias, scale):
    flex = _flex_module()
    score_mod = None
    if key_bias is not None:
        kb = key_bias.to(q.dtype)

        def score_mod(score, b, h, q_idx, kv_idx):
            return score + kb[kv_idx]

    fn = _compiled_flex() if q.is_cuda else flex.flex_attention  # CPU: eager, forward only
    if not q.is_cuda:  # reached only with grad disabled; torch checks requires_grad even under no_grad
        q, k, v = q.detach(), k.detach(), v.detach()
    qs, ks, vs = (t.unsqueeze(0).transpose(1, 2) for t in (q, k, v))  # [1, h, T, hd]
    o = fn(qs, ks, vs, score_mod=score_mod, block_mask=_block_mask(layout), scale=scale)
    return o.transpose(1, 2).squeeze(0)


def _nested(q, k, v, layout, dropout_p, scale):
    offsets = layout.cu_seqlens.long()
    lo, hi = min(layout.lengths_list), layout.max_len

    def nj(t):  # [T, h, d] -> nested [B, h, j, d]
        return torch.nested.nested_tensor_from_jagged(t, offsets=offsets, min_seqlen=lo, max_seqlen=hi).transpose(1, 2)

    o = F.scaled_dot_product_attention(nj(q), nj(k), nj(v), dropout_p=dropout_p, scale=scale)
    return o.transpose(1, 2).values()


def _varlen(q, k, v, layout, scale):  # CUDA FlashAttention / cuDNN varlen, NOT RUN HERE
    cu, L = layout.cu_seqlens, layout.max_len
    return _varlen_fn()(q, k, v, cu, cu, L, L, scale=scale)


def packed_attention(q: Tensor, k: Tensor, v: Tensor, layout: PackLayout | Packed, key_bias: Tensor | None = None,
                     backend: str = "auto", dropout_p: float = 0.0, scale: float | None = None) -> Tensor:
    """Block-diagonal (per image) scaled dot-product attention on packed tokens.

    ``out[t] = softmax_j(q[t] . k[j] * scale + key_bias[j]) v[j]`` over the keys ``j`` of ``t``'s image only:
    for each image the same as ``F.scaled_dot_product_attention`` on its own tokens with a per-key additive
    mask, i.e. the padded layout's attention with its ``-inf`` padding bias.

    Backend choice for ``auto`` on CPU, measured by ``uv run --frozen python
    results/scripts/bench_packed_attention.py --repeats 7 --flex-compiled`` (ViT-B: 12 heads x 64, batch 8,
    fp32, no grad, 1 thread, 2-core Intel Xeon shared with other jobs; median time ratios to today's padded
    ``vit_attention`` call in the same process, ABBA repeats; lengths mean 512 max 1024 / all 1024):
    ``loop`` 0.34 / 0.98, ``padded`` 1.17 / 1.24, ``flex`` eager 27 / (not run, T > 4096), flex compiled
    1.20 / 3.83, ``nested`` (no bias) 6.4 / 12.7. So ``auto`` is ``loop`` on CPU.

    Args:
        q, k: ``[T, h, hd]`` packed queries and keys (heads second, as ``qkv`` reshapes them).
        v: ``[T, h, hd_v]`` packed values.
        layout: the ``PackLayout`` (or the ``Packed``) the tokens were packed with.
        key_bias: ``[T]`` additive per-key logit bias (proportional attention's ``log(size)``), or None.
            Finite values; an image whose keys are all ``-inf`` gets NaN (as in SDPA).
        backend: one of ``BACKENDS`` (see the module docstring for each one's constraints).
        dropout_p: attention dropout (``loop``, ``padded``, ``nested`` only).
        scale: logit scale, default ``hd ** -0.5``.

    Returns:
        ``[T, h, hd_v]`` attention output, packed like ``q``.

    Raises:
        ValueError: a shape mismatch (naming the shapes and what was expected), an unknown backend (naming the
            valid ones), or a backend that cannot serve this call (names why and what can).
    """
    if isinstance(layout, Packed):
        layout = layout.layout
    if backend not in BACKENDS:
        raise ValueError(f"unknown packed attention backend {backend!r}; expected one of {list(BACKENDS)}")
    T = layout.total
    if q.dim() != 3 or q.shape[0] != T:
        raise ValueError(f"q has shape {tuple(q.shape)}; expected [T, heads, head_dim] with T = {T}")
    if k.shape != q.shape or v.dim() != 3 or v.shape[:2] != q.shape[:2]:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: expected k with q's shape "
                         "and v [T, heads, head_dim_v] with q's T and heads")
    if key_bias is not None and tuple(key_bias.shape) != (T,):
        raise ValueError(f"key_bias has shape {tuple(key_bias.shape)}; expected [T] = [{T}] (pack_key_bias "
                         "turns a [B, N] / [B, 1, 1, N] bias into it)")
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, key_bias) if t is not None)
    usable = available_backends(q.device, grad, key_bias is not None, dropout_p > 0)
    if backend == "auto":
        # CUDA: the fused padded kernel until flex's recompiles per token count are measured on a GPU
        backend = "padded" if q.is_cuda else "loop"
    if backend not in usable:
        raise ValueError(f"packed attention backend {backend!r} cannot serve this call (device {q.device.type}, "
                         f"grad {grad}, bias {key_bias is not None}, dropout {dropout_p}); usable: {list(usable)}")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if backend == "loop":
        return _loop(q, k, v, layout, key_bias, dropout_p, scale)
    if backend == "padded":
        return _padded(q, k, v, layout, key_bias, dropout_p, scale)
    if backend == "flex":
        return _flex(q, k, v, layout, key_bias, scale)
    if backend == "nested":
        return _nested(q, k, v, layout, dropout_p, scale)
    return _varlen(q, k, v, layout, scale)


def packed_vit_attention(attn: nn.Module, x: Tensor, layout: PackLayout, key_bias: Tensor | None = None,
                         backend: str = "auto") -> tuple[Tensor, Tensor]:
    """``tokred.backbones.vit.vit_attention`` on packed tokens: a timm ``Attention``'s own weights on ``[T, C]``.

    Args:
        attn: a timm ``Attention`` (qkv, q_norm, k_norm, optional norm and gate, proj).
        x: ``[T, C]`` packed, normalised tokens.
        layout: their ``PackLayout``.
        key_bias: ``[T]`` per-key logit bias or None.
        backend: as in ``packed_attention``.

    Returns:
        ``(out [T, C], keys [T, num_heads, head_dim])``; the keys (after k_norm) are ToMe's metric.

    Raises:
        ValueError: ``x`` is not ``[T, C]``, or as ``packed_attention``.
    """
    if x.dim() != 2:
        raise ValueError(f"x has shape {tuple(x.shape)}; expected packed tokens [T, C]")
    T = x.shape[0]
    h, hd = attn.num_heads, attn.head_dim
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    q, k, v = attn.qkv(x).view(T, 3, h, hd).unbind(1)  # each [T, h, hd]
    q, k = attn.q_norm(q), attn.k_norm(k)  # timm's q/k norms act on head_dim only
    out = packed_attention(q, k, v, layout, key_bias, backend, attn.attn_drop.p if attn.training else 0.0)
    out = getattr(attn, "norm", nn.Identity())(out.reshape(T, h * hd))
    if gate is not None:
        out = out * gate
    return attn.proj_drop(attn.proj(out)), k
