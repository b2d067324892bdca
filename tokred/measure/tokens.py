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

Sliding-window evaluation (``eval.mode=slide``, the ADE20K/Cityscapes protocols): every window is its own
forward with its own token state, and ``update(state, image_ids)`` says which image each row belongs to. Per
image, every count is the SUM over its windows (tokens entering block ``i`` over all windows, ``N0`` = patches of
all windows), so "per image" keeps meaning the cost of segmenting one image; ``windows_per_image`` reports how
many windows that took (1 in whole mode).
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import torch
from torch import Tensor

from tokred.state import TokenState

__all__ = ["TokenAccounting"]

_EXIT_KEY = re.compile(r"^banked_after_block_(-?\d+)$")
_BUDGET_KEY = re.compile(r"^(merger|pruner)_r(_requested)?_(\d+)$")  # tokred.reducers.base.record_budget
_QUANTILES = (0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0)


class TokenAccounting:
    """Accumulates token counts over evaluated batches; ``summary()`` gives JSON-ready numbers.

    Args:
        histogram_bins: bins of the histogram of tokens entering block 0 per image.

    Raises:
        ValueError: ``histogram_bins`` < 1.

    Example::

        acc = TokenAccounting()
        evaluate(seg, loader, ..., on_state=acc.update)   # calls acc.update(state, image_ids)
        metrics.update(acc.summary())
    """

    def __init__(self, histogram_bins: int = 10) -> None:
        if histogram_bins < 1:
            raise ValueError(f"histogram_bins must be >= 1, got {histogram_bins}")
        self.histogram_bins = histogram_bins
        self.reset()

    def reset(self) -> None:
        """Forgets everything accumulated."""
        self._counts: dict[int, np.ndarray] = {}  # image id -> [depth] tokens entering each block, summed over windows
        self._patches: dict[int, float] = {}  # image id -> N0 summed over its windows
        self._windows: dict[int, int] = {}
        self._next_id = 0
        self._stats: dict[str, float] = {}

    @property
    def num_images(self) -> int:
        """Distinct images seen (windows of one image count once)."""
        return len(self._counts)

    def update(self, state: TokenState, image_ids: Tensor | list[int] | None = None) -> None:
        """Adds one forward's final state.

        Args:
            state: the final ``TokenState`` of a forward (``SegOutput.state``), batch ``B`` (images or windows).
            image_ids: ``[B]`` ints: the image each row belongs to (rows sharing an id are windows of one image,
                possibly spread over several forwards); None = every row is a new image.

        Raises:
            ValueError: the state recorded no block entries (not a state returned by the encoder), or
                ``image_ids`` does not have ``B`` entries.
        """
        if not state.tokens_per_block:
            raise ValueError("state.tokens_per_block is empty; pass the final state of a forward (SegOutput.state)")
        counts = torch.stack([t.detach().to("cpu", torch.float64) for t in state.tokens_per_block])  # [depth, B]
        depth, batch = counts.shape
        if image_ids is None:
            ids = list(range(self._next_id, self._next_id + batch))
        else:
            ids = [int(i) for i in (image_ids.tolist() if isinstance(image_ids, Tensor) else image_ids)]
            if len(ids) != batch:
                raise ValueError(f"image_ids has {len(ids)} entries for a state of batch {batch}")
        self._next_id = max(self._next_id, max(ids) + 1)
        cols = counts.numpy().T  # [B, depth]
        for img, col in zip(ids, cols):
            prev = self._counts.get(img)
            if prev is None:
                self._counts[img] = col.copy()
            else:
                if len(prev) < depth:
                    prev = np.pad(prev, (0, depth - len(prev)))
                prev[:depth] += col
                self._counts[img] = prev
            self._patches[img] = self._patches.get(img, 0.0) + float(state.num_patches)
            self._windows[img] = self._windows.get(img, 0) + 1
        for name, value in state.stats.items():
            self._stats[name] = self._stats.get(name, 0.0) + float(value.detach().to(torch.float64).sum())

    def summary(self) -> dict[str, Any]:
        """Pooled numbers over every image seen (plain python types, JSON-serialisable).

        Returns:
            ``num_images``; ``num_patches`` (mean ``N0`` per image, summed over its windows);
            ``windows_per_image`` (mean windows per image; 1.0 in whole mode), ``num_windows`` (forward rows);
            ``tokens_per_block`` (mean live patch tokens entering each block per image, summed over its
            windows, one float per block), ``tokens_per_block_min``, ``tokens_per_block_max`` (over images);
            ``token_reduction`` (N0 / tokens entering block 0: what a merger did at the embedding);
            ``token_block_fraction`` (token-blocks processed / ``depth * N0``: one figure that means the same for
            mergers and pruners, 1.0 for the unreduced model); ``halted_fraction``; ``halted_patch_fraction``;
            ``banked_after_block``
            (``{block index (0-based, str): {"mean": tokens per image, "fraction": of tokens entered}}``);
            ``halted_stats`` (``{"halted_*" stat: mean per image}``); ``other_stats`` (any other stat: mean per
            image); ``budgets`` (``{slot: {block (0-based, str): {"requested", "effective"}}}``: the mean ``r``
            per image the merger/pruner's schedule asked for and the ``r`` it removed after clipping);
            ``tokens_first_block`` (per-image distribution of tokens entering block 0: ``mean``,
            ``quantiles`` ``{q: value}``, ``histogram`` ``{"bin_edges", "counts"}``).

        Raises:
            ValueError: nothing was accumulated.
        """
        if self.num_images == 0:
            raise ValueError("TokenAccounting.summary(): no state was added; call update(state) in the eval loop")
        n = self.num_images
        depth = max(len(c) for c in self._counts.values())
        per_image = np.stack([np.pad(c, (0, depth - len(c))) for c in self._counts.values()])  # [n, depth]
        sums = per_image.sum(0)
        means = (sums / n).tolist()
        num_patches = sum(self._patches.values())
        before_block0 = sum(v for k, v in self._stats.items() if (m := _EXIT_KEY.match(k)) and int(m[1]) < 0)
        entered = float(sums[0]) + before_block0
        banked = self._stats.get("banked", 0.0)
        exits = {}
        for k, v in self._stats.items():
            if m := _EXIT_KEY.match(k):
                exits[m[1]] = {"mean": v / n, "fraction": v / entered if entered else 0.0}
        halted = {k: v / n for k, v in sorted(self._stats.items()) if k.startswith("halted_")}
        known = {"banked", "banked_patches", "pruner_tokens_in"}
        budgets: dict[str, dict[str, dict[str, float]]] = {}
        for k, v in self._stats.items():
            if m := _BUDGET_KEY.match(k):
                row = budgets.setdefault(m[1], {}).setdefault(m[3], {})
                row["requested" if m[2] else "effective"] = v / n
        budgets = {slot: dict(sorted(rows.items(), key=lambda kv: int(kv[0])))
                   for slot, rows in sorted(budgets.items())}
        other = {k: v / n for k, v in sorted(self._stats.items())
                 if k not in known and not k.startswith("halted_") and not _EXIT_KEY.match(k)
                 and not _BUDGET_KEY.match(k)}
        windows = sum(self._windows.values())
        return {
            "num_images": n,
            "num_patches": num_patches / n,
            "windows_per_image": windows / n,
            "num_windows": windows,
            "tokens_per_block": means,
            "tokens_per_block_min": per_image.min(0).tolist(),
            "tokens_per_block_max": per_image.max(0).tolist(),
            "token_reduction": (num_patches / n) / means[0] if means[0] > 0 else float("inf"),
            "token_block_fraction": sum(means) / (depth * num_patches / n) if num_patches else 0.0,
            "halted_fraction": banked / entered if entered else 0.0,
            "halted_patch_fraction": self._stats.get("banked_patches", 0.0) / num_patches,
            "banked_after_block": dict(sorted(exits.items(), key=lambda kv: int(kv[0]))),
            "halted_stats": halted,
            "other_stats": other,
            "budgets": budgets,
            "tokens_first_block": self._distribution(per_image[:, 0]),
        }

    def _distribution(self, first: np.ndarray) -> dict[str, Any]:
        t = torch.from_numpy(np.ascontiguousarray(first, dtype=np.float64))
        qs = torch.quantile(t, torch.tensor(_QUANTILES, dtype=torch.float64)).tolist()
        lo, hi = t.min().item(), t.max().item()
        if hi == lo:  # one value: a single bin around it
            lo, hi = lo - 0.5, hi + 0.5
        counts = torch.histc(t, bins=self.histogram_bins, min=lo, max=hi)
        edges = torch.linspace(lo, hi, self.histogram_bins + 1, dtype=torch.float64)
        return {"mean": t.mean().item(), "quantiles": {str(q): v for q, v in zip(_QUANTILES, qs)},
                "histogram": {"bin_edges": edges.tolist(), "counts": [int(c) for c in counts.tolist()]}}
