"""Packed token layout (tokred.packing): round trip, block-diagonal attention per backend, gradients, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from tokred.packing import (
    available_backends,
    layout_from_lengths,
    layout_from_valid,
    pack,
    pack_key_bias,
    pack_tensor,
    packed_attention,
    packed_vit_attention,
    unpack,
)

pytestmark = [pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile"),
              pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors is in prototype")]

TOL = dict(atol=1e-5, rtol=1e-5)
HEADS, HD = 3, 8


def _valid_from_lengths(lengths, N, shuffle=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    valid = torch.zeros(len(lengths), N, dtype=torch.bool)
    for b, n in enumerate(lengths):
        slots = torch.randperm(N, generator=g)[:n] if shuffle else torch.arange(n)
        valid[b, slots] = True
    return valid


def _reference(q, k, v, valid, bias):
    """Padded SDPA with a [B, 1, 1, N] -inf mask, built independently of tokred.packing, then packed."""
    mask = torch.zeros(valid.shape) if bias is None else bias.clone()
    mask = mask.masked_fill(~valid, float("-inf"))[:, None, None, :]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=mask)  # [B, h, N, hd]
    return out.transpose(1, 2)[valid]  # [T, h, hd], image order then slot order


def _inputs(lengths, N, seed, shuffle=True, grad=False):
    g = torch.Generator().manual_seed(seed)
    valid = _valid_from_lengths(lengths, N, shuffle, seed)
    q, k, v = (torch.randn(len(lengths), N, HEADS, HD, generator=g) for _ in range(3))
    bias = torch.rand(len(lengths), N, generator=g).mul(3).add(1).log()  # log(size), size in [1, 4]
    if grad:
        for t in (q, k, v, bias):
            t.requires_grad_(True)
    return q, k, v, bias, valid


LENGTHS = [
    [5, 1, 7, 7, 3, 1],   # unequal, two length-1 images, a run of equal lengths
    [1],                  # a single one-token image
    [4, 4, 4],            # all equal: one batched call in `loop`
    [9, 2, 1, 1, 6],
    [3, 0, 2],            # an image with no live token (forward only: its padded reference row is NaN)
]


# ---------------------------------------------------------------------------------------------- layout
def test_round_trip_exact_and_order_preserved():
    g = torch.Generator().manual_seed(0)
    valid = _valid_from_lengths([3, 0, 6, 1, 6], 6, shuffle=True)
    x = torch.randn(5, 6, 4, generator=g)
    packed = pack(x, valid)
    assert packed.data.shape == (16, 4)
    assert packed.cu_seqlens.dtype == torch.int32 and packed.cu_seqlens.tolist() == [0, 3, 3, 9, 10, 16]
    assert packed.image_ids.dtype == torch.long and packed.image_ids.tolist() == [0] * 3 + [2] * 6 + [3] + [4] * 6
    assert packed.lengths.tolist() == [3, 0, 6, 1, 6]
    assert torch.equal(packed.data, torch.cat([x[b][valid[b]] for b in range(5)]))  # order within each image
    x2, valid2 = unpack(packed)
    assert torch.equal(valid2, valid)
    assert torch.equal(x2, x * valid[..., None])  # exact, zeros on padding


def test_pack_any_trailing_shape_and_key_bias():
    valid = _valid_from_lengths([2, 4], 5, shuffle=True)
    layout = layout_from_valid(valid)
    size = torch.arange(10.0).view(2, 5)
    assert torch.equal(pack_tensor(size, layout), size[valid])
    bias = size.log()[:, None, None, :].masked_fill(~valid[:, None, None, :], float("-inf"))  # TokenState form
    packed_bias = pack_key_bias(bias, layout)
    assert packed_bias.shape == (6,) and torch.isfinite(packed_bias[size[valid] > 0]).all()
    assert torch.equal(pack_key_bias(size, layout), size[valid])
    x = torch.randn(2, 5, 3, 2)
    assert torch.equal(unpack(pack(x, valid))[0], x * valid[..., None, None])


def test_layout_from_lengths_left_aligned_and_unpack_to_longer_rows():
    layout = layout_from_lengths([2, 0, 3])
    assert layout.cu_seqlens.tolist() == [0, 2, 2, 5] and layout.seq_len == 3 and layout.max_len == 3
    assert layout.positions.tolist() == [0, 1, 0, 1, 2]
    data = torch.arange(5.0)[:, None]
    from tokred.packing import Packed

    x, valid = unpack(Packed(data, layout), N=4, fill=-1.0)
    assert x[..., 0].tolist() == [[0, 1, -1, -1], [-1, -1, -1, -1], [2, 3, 4, -1]]
    assert valid.tolist() == [[True, True, False, False], [False] * 4, [True, True, True, False]]


def test_round_trip_gradient():
    valid = _valid_from_lengths([3, 1, 4], 4, shuffle=True)
    x = torch.randn(3, 4, 5, requires_grad=True)
    w = torch.randn(3, 4, 5)
    (unpack(pack(x, valid))[0] * w).sum().backward()
    assert torch.equal(x.grad, w * valid[..., None])


# ---------------------------------------------------------------------------------------------- attention
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("lengths", LENGTHS, ids=lambda ls: "-".join(map(str, ls)))
def test_packed_attention_equals_padded_reference(lengths, with_bias):
    N = max(lengths) + 2
    q, k, v, bias, valid = _inputs(lengths, N, seed=len(lengths))
    layout = layout_from_valid(valid)
    ref = _reference(q, k, v, valid, bias if with_bias else None)
    pq, pk, pv = (pack_tensor(t, layout) for t in (q, k, v))
    pb = pack_key_bias(bias, layout) if with_bias else None
    backends = available_backends("cpu", requires_grad=False, with_bias=with_bias) + ("auto",)
    assert {"loop", "padded"} <= set(backends)
    for backend in backends:
        out = packed_attention(pq, pk, pv, layout, pb, backend=backend)
        assert out.shape == pq.shape
        assert_close(out, ref, **TOL, msg=lambda m: f"backend {backend}: {m}")


def test_flex_on_cpu_forward_matches_loop():
    if "flex" not in available_backends("cpu", requires_grad=False, with_bias=True):
        pytest.skip("this torch has no torch.nn.attention.flex_attention")
    q, k, v, bias, valid = _inputs([6, 1, 3, 3], 8, seed=7)
    layout = layout_from_valid(valid)
    pq, pk, pv = (pack_tensor(t, layout) for t in (q, k, v))
    pb = pack_key_bias(bias, layout)
    with torch.no_grad():
        for b in (None, pb):
            assert_close(packed_attention(pq, pk, pv, layout, b, backend="flex"),
                         packed_attention(pq, pk, pv, layout, b, backend="loop"), **TOL)


@pytest.mark.parametrize("with_bias", [False, True])
def test_packed_attention_backward_equals_padded_reference(with_bias):
    lengths = [5, 1, 7, 7, 3, 1]
    q, k, v, bias, valid = _inputs(lengths, 9, seed=3, grad=True)
    g = torch.randn(sum(lengths), HEADS, HD, generator=torch.Generator().manual_seed(1))
    leaves = (q, k, v, bias) if with_bias else (q, k, v)
    ref = torch.autograd.grad((_reference(q, k, v, valid, bias if with_bias else None) * g).sum(), leaves)
    layout = layout_from_valid(valid)
    backends = available_backends("cpu", requires_grad=True, with_bias=with_bias) + ("auto",)
    assert "flex" not in backends  # torch refuses FlexAttention backward on CPU
    for backend in backends:
        pq, pk, pv = (pack_tensor(t, layout) for t in (q, k, v))
        pb = pack_key_bias(bias, layout) if with_bias else None
        out = packed_attention(pq, pk, pv, layout, pb, backend=backend)
        grads = torch.autograd.grad((out * g).sum(), leaves)
        for name, a, b in zip("qkvb", grads, ref):
            assert_close(a, b, **TOL, msg=lambda m: f"backend {backend}, d{name}: {m}")


def test_packed_vit_attention_matches_vit_attention():
    from timm.models.vision_transformer import Attention

    from tokred.backbones.vit import vit_attention

    torch.manual_seed(0)
    attn = Attention(24, num_heads=4, qkv_bias=True, qk_norm=True, norm_layer=torch.nn.LayerNorm).eval()
    valid = _valid_from_lengths([5, 1, 3], 6, shuffle=True)
    x = torch.randn(3, 6, 24)
    size = torch.randint(1, 5, (3, 6)).float()
    bias = size.log().masked_fill(~valid, float("-inf"))[:, None, None, :]
    ref_out, ref_k = vit_attention(attn, x, bias)
    packed = pack(x, valid)
    out, keys = packed_vit_attention(attn, packed.data, packed.layout, pack_key_bias(bias, packed.layout))
    assert_close(out, ref_out[valid], **TOL)
    assert_close(keys, ref_k.transpose(1, 2)[valid], **TOL)


# ---------------------------------------------------------------------------------------------- errors
def test_clear_errors():
    valid = _valid_from_lengths([2, 3], 4)
    layout = layout_from_valid(valid)
    q = torch.randn(5, HEADS, HD)
    with pytest.raises(ValueError, match=r"x has shape \(2, 5, 3\) but valid has shape \(2, 4\)"):
        pack(torch.randn(2, 5, 3), valid)
    with pytest.raises(ValueError, match=r"expected \[B, N\] bool"):
        layout_from_valid(valid.float())
    with pytest.raises(ValueError, match=r"q has shape \(6, 3, 8\); expected \[T, heads, head_dim\] with T = 5"):
        packed_attention(torch.randn(6, HEADS, HD), q, q, layout)
    with pytest.raises(ValueError, match=r"k \(5, 2, 8\)"):
        packed_attention(q, torch.randn(5, 2, HD), q, layout)
    with pytest.raises(ValueError, match=r"key_bias has shape \(2, 4\); expected \[T\] = \[5\]"):
        packed_attention(q, q, q, layout, torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"expected \[B, N\] or \[B, 1, 1, N\] with B = 2, N = 4"):
        pack_key_bias(torch.zeros(2, 1, 4), layout)
    with pytest.raises(ValueError, match=r"unknown packed attention backend 'flash'; expected one of"):
        packed_attention(q, q, q, layout, backend="flash")
    with pytest.raises(ValueError, match=r"'nested' cannot serve this call.*bias True.*usable"):
        packed_attention(q, q, q, layout, torch.zeros(5), backend="nested")
    with pytest.raises(ValueError, match=r"'varlen' cannot serve this call \(device cpu"):
        packed_attention(q, q, q, layout, backend="varlen")
    if "flex" in available_backends("cpu"):
        with pytest.raises(ValueError, match=r"'flex' cannot serve this call.*grad True"):
            packed_attention(q.requires_grad_(), q, q, layout, backend="flex")
    with pytest.raises(ValueError, match=r"unpack to N = 2 slots, but a token sits at slot 2"):
        unpack(pack(torch.randn(2, 4, 1), valid), N=2)
    with pytest.raises(ValueError, match=r"lengths \[2, 5\] must lie in \[0, N = 4\]"):
        layout_from_lengths([2, 5], N=4)


# ---------------------------------------------------------------------------------------------- GPU (skipped here)
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_backends_match_loop(dtype):
    q, k, v, bias, valid = _inputs([37, 1, 130, 130, 64], 140, seed=5)
    layout = layout_from_valid(valid.cuda())
    pq, pk, pv = (pack_tensor(t.cuda().to(dtype), layout) for t in (q, k, v))
    pb = pack_key_bias(bias.cuda(), layout)
    tol = TOL if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    for b in (None, pb):
        ref = packed_attention(pq, pk, pv, layout, b, backend="loop")
        for backend in available_backends("cuda", requires_grad=True, with_bias=b is not None):
            if backend == "varlen" and dtype == torch.float32:
                continue  # FlashAttention / cuDNN varlen take fp16 / bf16 only
            assert_close(packed_attention(pq, pk, pv, layout, b, backend=backend), ref, **tol,
                         msg=lambda m: f"backend {backend}: {m}")
