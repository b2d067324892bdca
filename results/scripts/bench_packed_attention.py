"""Packed vs padded attention and linear layers at ViT-B shapes, side by side in one process (issue 12).

    uv run --frozen python results/scripts/bench_packed_attention.py [--repeats 5] [--flex-compiled]

ViT-B/16: embed 768, 12 heads x 64, batch 8, fp32, inference (no grad), 1 thread. Two batches of per-image
token counts: ``unequal`` (mean 512, max 1024, as dCTS leaves a 1024x1024 image after merging) and ``equal``
(all 1024). Every variant of a table runs once per repeat, in forward order on even repeats and reversed
order on odd ones (ABBA), after one warm-up call each; the table gives each variant's median time and the
median over repeats of its time / the reference's time in the same repeat.

Attention reference: the padded layout as tokred runs it today (``vit_attention``: ``[B, h, Nmax, hd]`` views of
an already padded qkv output, one SDPA call with the ``[B, 1, 1, Nmax]`` -inf/log(size) mask, output back to
``[B, Nmax, C]``). ``packed:<backend>`` times ``tokred.packing.packed_attention`` on ``[T, h, hd]``; the
``padded`` backend includes its re-pad and gather copies. FlexAttention on CPU is eager (unfused, it
materialises ``[h, T, T]`` scores), so it runs only when T <= 4096; ``--flex-compiled`` adds
``torch.compile(flex_attention)`` (compiled before timing, not counted). Linear table: norm1 + qkv + proj +
norm2 + MLP (768 -> 3072 -> 768, GELU) of one block on packed ``[T, C]`` vs padded ``[B * Nmax, C]`` tokens.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from tokred.packing import available_backends, layout_from_lengths, packed_attention

EMBED, HEADS, HD, BATCH = 768, 12, 64, 8
LENGTHS = {
    "unequal": [1024, 256, 384, 512, 640, 128, 768, 384],  # mean 512, max 1024
    "equal": [1024] * BATCH,
}


def _time(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def abba(variants: dict, repeats: int, ref: str) -> list[tuple[str, float, float]]:
    """``[(name, median seconds, median ratio to ref)]``; variants alternate forward / reversed order."""
    names = list(variants)
    for n in names:  # warm-up
        variants[n]()
    times = {n: [] for n in names}
    for r in range(repeats):
        for n in (names if r % 2 == 0 else names[::-1]):
            times[n].append(_time(variants[n]))
    return [(n, statistics.median(times[n]),
             statistics.median(a / b for a, b in zip(times[n], times[ref]))) for n in names]


def attention_variants(lengths: list[int], flex_compiled: bool) -> dict:
    g = torch.Generator().manual_seed(0)
    layout = layout_from_lengths(lengths)
    T, L = layout.total, layout.max_len
    q, k, v = (torch.randn(T, HEADS, HD, generator=g) for _ in range(3))
    bias = torch.randint(1, 5, (T,), generator=g).float().log()  # log(size), sizes 1..4 patches
    # today's padded layout: tensors already padded, mask -inf on padding and log(size) elsewhere
    idx = layout.image_ids * L + layout.positions

    # (as vit_attention: [B, h, N, hd] views of qkv's [B, N, 3, h, hd] output, result back to [B, N, C])
    qkv = torch.stack([t.new_zeros(BATCH * L, HEADS, HD).index_copy(0, idx, t) for t in (q, k, v)], 1)
    pq, pk, pv = qkv.view(BATCH, L, 3, HEADS, HD).permute(2, 0, 3, 1, 4).unbind(0)
    mask = torch.full((BATCH * L,), float("-inf")).index_copy(0, idx, bias).view(BATCH, 1, 1, L)

    def today():
        o = F.scaled_dot_product_attention(pq, pk, pv, attn_mask=mask)
        return o.transpose(1, 2).reshape(BATCH, L, EMBED)

    out = {"padded layout (today)": today}
    usable = available_backends("cpu", requires_grad=False, with_bias=True)
    for b in ("loop", "padded", "flex"):
        if b in usable and (b != "flex" or T <= 4096):
            out[f"packed:{b}"] = lambda b=b: packed_attention(q, k, v, layout, bias, backend=b)
    if flex_compiled and "flex" in usable:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        ids = layout.image_ids
        bm = create_block_mask(lambda b, h, qi, ki: ids[qi] == ids[ki], None, None, T, T, device="cpu")
        cflex = torch.compile(flex_attention, dynamic=False)
        fq, fk, fv = (t.unsqueeze(0).transpose(1, 2) for t in (q, k, v))

        def run_cflex():
            return cflex(fq, fk, fv, score_mod=lambda s, b, h, qi, ki: s + bias[ki], block_mask=bm)

        t0 = time.perf_counter()
        run_cflex()
        print(f"  (flex compile: {time.perf_counter() - t0:.1f} s, not counted)")
        out["packed:flex compiled"] = run_cflex
    # no-bias comparison for the backends that take none (nested jagged tensors)
    if "nested" in available_backends("cpu", requires_grad=False, with_bias=False):
        out["packed:nested (no bias)"] = lambda: packed_attention(q, k, v, layout, None, backend="nested")
        out["packed:loop (no bias)"] = lambda: packed_attention(q, k, v, layout, None, backend="loop")
    return out


class _BlockLinears(nn.Module):
    """The token-wise parts of a ViT-B block: norm1, qkv, proj, norm2, MLP (attention itself left out)."""

    def __init__(self) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(EMBED), nn.LayerNorm(EMBED)
        self.qkv, self.proj = nn.Linear(EMBED, 3 * EMBED), nn.Linear(EMBED, EMBED)
        self.fc1, self.fc2 = nn.Linear(EMBED, 4 * EMBED), nn.Linear(4 * EMBED, EMBED)

    def forward(self, x):
        qkv = self.qkv(self.norm1(x))
        x = x + self.proj(qkv[..., :EMBED])  # stands in for attention's output; same shapes and FLOPs
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


def linear_variants(lengths: list[int]) -> dict:
    g = torch.Generator().manual_seed(1)
    block = _BlockLinears().eval()
    T, L = sum(lengths), max(lengths)
    packed = torch.randn(T, EMBED, generator=g)
    padded = torch.randn(BATCH, L, EMBED, generator=g)
    return {"padded [B, Nmax, C]": lambda: block(padded), "packed [T, C]": lambda: block(packed)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--flex-compiled", action="store_true")
    a = p.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
    print(f"torch {torch.__version__}, 1 thread, ViT-B (C={EMBED}, {HEADS} heads x {HD}), batch {BATCH}, fp32, "
          f"no grad, {a.repeats} ABBA repeats")
    with torch.inference_mode():
        for name, lengths in LENGTHS.items():
            T, L = sum(lengths), max(lengths)
            print(f"\n== {name}: lengths {lengths} (T = {T}, B * Nmax = {BATCH * L}, padding waste "
                  f"{BATCH * L / T:.2f}x)")
            for title, variants, ref in [
                ("attention", attention_variants(lengths, a.flex_compiled), "padded layout (today)"),
                ("linear layers of a block", linear_variants(lengths), "padded [B, Nmax, C]"),
            ]:
                rows = abba(variants, a.repeats, ref)
                print(f"  {title:<28} {'median ms':>10} {'ratio vs ' + ref:>34}")
                for n, t, r in rows:
                    print(f"  {n:<28} {t * 1e3:>10.1f} {r:>34.2f}")


if __name__ == "__main__":
    main()
