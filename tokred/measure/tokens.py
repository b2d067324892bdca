"""Token accounting over an evaluation: live tokens per block, reduction after embedding, halted fractions.

Reads only the final ``TokenState`` of each evaluated batch: ``tokens_per_block`` (live patch tokens entering
each block, one ``[B]`` tensor per block, padding already excluded) and the per-image ``stats`` that
``TokenState.split`` records (``"banked"``, ``"banked_after_block_{i}"``, ``"banked_patches"``) plus any
``"halted_*"`` counters a pruner adds. Cheap enough to call once per batch inside the eval loop: one
device-to-host copy per block and stat.

Definitions (all over every image seen, pooled):

* ``token_reduction`` = ``N0`` / mean tokens entering block 0 (how much an embedding-time merger such as dCTS
  shrinks the sequence; 1.0 for a plain ViT).
* ``halted_fraction`` = tokens that left the encoder early (``"banked"``) / tokens that entered it, where
  "entered" is the count entering block 0 plus tokens banked before block 0 (``banked_after_block_{i}`` with
  ``i < 0``). Cropr's last-layer fusion re-admits banked tokens before the last block: they still count as
  having left, because they skipped the blocks in between.
* ``halted_patch_fraction`` = patches held by tokens that left (``"banked_patches"``) / ``N0``.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from tokred.state import TokenState

__all__ = ["TokenAccounting"]

_EXIT_KEY = re.compile(r"^banked_after_block_(-?\d+)$")
_QUANTILES = (0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0)


class TokenAccounting:
    """Accumulates token counts over evaluated batches; ``summary()`` gives JSON-ready numbers.

    Args:
        histogram_bins: bins of the histogram of tokens entering block 0 per image.

    Example::

        acc = TokenAccounting()
        for images, _ in loader:
            acc.update(seg(images).state)
        metrics.update(acc.summary())
    """

    def __init__(self, histogram_bins: int = 10) -> None:
        if histogram_bins < 1:
            raise ValueError(f"histogram_bins must be >= 1, got {histogram_bins}")
        self.histogram_bins = histogram_bins
        self.reset()

    def reset(self) -> None:
        """Forgets everything accumulated."""
        self.num_images = 0
        self._num_patches = 0.0  # sum of N0 over images
        self._block_sum: list[float] = []
        self._block_min: list[float] = []
        self._block_max: list[float] = []
        self._block_count: list[int] = []
        self._first_block: list[int] = []  # tokens entering block 0, one per image
        self._stats: dict[str, float] = {}

    def update(self, state: TokenState) -> None:
        """Adds one batch's final state.

        Args:
            state: the final ``TokenState`` of a forward (``SegOutput.state``), batch ``B``.

        Raises:
            ValueError: the state recorded no block entries (not a state returned by the encoder).
        """
        if not state.tokens_per_block:
            raise ValueError("state.tokens_per_block is empty; pass the final state of a forward (SegOutput.state)")
        counts = torch.stack([t.detach().to("cpu", torch.float64) for t in state.tokens_per_block])  # [depth, B]
        depth, batch = counts.shape
        while len(self._block_sum) < depth:
            self._block_sum.append(0.0)
            self._block_min.append(float("inf"))
            self._block_max.append(float("-inf"))
            self._block_count.append(0)
        sums, mins, maxs = counts.sum(1).tolist(), counts.min(1).values.tolist(), counts.max(1).values.tolist()
        for i in range(depth):
            self._block_sum[i] += sums[i]
            self._block_min[i] = min(self._block_min[i], mins[i])
            self._block_max[i] = max(self._block_max[i], maxs[i])
            self._block_count[i] += batch
        self._first_block.extend(int(v) for v in counts[0].tolist())
        for name, value in state.stats.items():
            self._stats[name] = self._stats.get(name, 0.0) + float(value.detach().to(torch.float64).sum())
        self.num_images += batch
        self._num_patches += float(state.num_patches * batch)

    def summary(self) -> dict[str, Any]:
        """Pooled numbers over every image seen (plain python types, JSON-serialisable).

        Returns:
            ``num_images``; ``num_patches`` (mean ``N0``); ``tokens_per_block`` (mean live patch tokens entering
            each block, one float per block), ``tokens_per_block_min``, ``tokens_per_block_max``;
            ``token_reduction``; ``halted_fraction``; ``halted_patch_fraction``; ``banked_after_block``
            (``{block index (0-based, str): {"mean": tokens per image, "fraction": of tokens entered}}``);
            ``halted_stats`` (``{"halted_*" stat: mean per image}``); ``other_stats`` (any other stat: mean per
            image); ``tokens_first_block`` (per-image distribution of tokens entering block 0: ``mean``,
            ``quantiles`` ``{q: value}``, ``histogram`` ``{"bin_edges", "counts"}``).

        Raises:
            ValueError: nothing was accumulated.
        """
        if self.num_images == 0:
            raise ValueError("TokenAccounting.summary(): no state was added; call update(state) in the eval loop")
        n = self.num_images
        means = [s / c for s, c in zip(self._block_sum, self._block_count)]
        before_block0 = sum(v for k, v in self._stats.items() if (m := _EXIT_KEY.match(k)) and int(m[1]) < 0)
        entered = self._block_sum[0] + before_block0
        banked = self._stats.get("banked", 0.0)
        exits = {}
        for k, v in self._stats.items():
            if m := _EXIT_KEY.match(k):
                exits[m[1]] = {"mean": v / n, "fraction": v / entered if entered else 0.0}
        halted = {k: v / n for k, v in sorted(self._stats.items()) if k.startswith("halted_")}
        known = {"banked", "banked_patches"}
        other = {k: v / n for k, v in sorted(self._stats.items())
                 if k not in known and not k.startswith("halted_") and not _EXIT_KEY.match(k)}
        return {
            "num_images": n,
            "num_patches": self._num_patches / n,
            "tokens_per_block": means,
            "tokens_per_block_min": list(self._block_min),
            "tokens_per_block_max": list(self._block_max),
            "token_reduction": (self._num_patches / n) / means[0] if means[0] > 0 else float("inf"),
            "halted_fraction": banked / entered if entered else 0.0,
            "halted_patch_fraction": self._stats.get("banked_patches", 0.0) / self._num_patches,
            "banked_after_block": dict(sorted(exits.items(), key=lambda kv: int(kv[0]))),
            "halted_stats": halted,
            "other_stats": other,
            "tokens_first_block": self._distribution(),
        }

    def _distribution(self) -> dict[str, Any]:
        t = torch.tensor(self._first_block, dtype=torch.float64)
        qs = torch.quantile(t, torch.tensor(_QUANTILES, dtype=torch.float64)).tolist()
        lo, hi = t.min().item(), t.max().item()
        if hi == lo:  # one value: a single bin around it
            lo, hi = lo - 0.5, hi + 0.5
        counts = torch.histc(t, bins=self.histogram_bins, min=lo, max=hi)
        edges = torch.linspace(lo, hi, self.histogram_bins + 1, dtype=torch.float64)
        return {"mean": t.mean().item(), "quantiles": {str(q): v for q, v in zip(_QUANTILES, qs)},
                "histogram": {"bin_edges": edges.tolist(), "counts": [int(c) for c in counts.tolist()]}}
