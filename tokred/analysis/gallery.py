"""Gallery of token-fate pictures (``tokred.viz.token_fate_figure``) for images picked by rule.

Rules (over the per-image table of ``FateAccumulator``; an image picked by several rules is drawn once, its file
named after all of them, e.g. ``most_halting+fewest_tokens_<stem>.png``):

* ``most_halting`` / ``least_halting``: largest / smallest share of cells whose token halted early;
* ``most_tokens`` / ``fewest_tokens``: most / fewest tokens after embedding (fewest = largest superpatches);
* ``worst_halted_error``: highest error of the halted cells (cells whose exit prediction differs from the
  cell label), among images with labelled halted cells.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

__all__ = ["RULES", "pick_images", "draw_gallery"]

#: rule -> (per-image column, pick the largest?)
RULES: dict[str, tuple[str, bool]] = {
    "most_halting": ("halted_cell_share", True),
    "least_halting": ("halted_cell_share", False),
    "most_tokens": ("tokens_embedded", True),
    "fewest_tokens": ("tokens_embedded", False),
    "worst_halted_error": ("halted_error", True),
}


def pick_images(per_image: pd.DataFrame, rules: Sequence[str], halting: bool, merging: bool) -> list[tuple[str, int]]:
    """``(rule, image index)`` for each applicable rule (halting rules need an early exit, token rules a merger).

    Raises:
        ValueError: an unknown rule (lists the valid ones).
    """
    out = []
    for rule in rules:
        if rule not in RULES:
            raise ValueError(f"analyze.gallery rule {rule!r} is unknown; valid: {', '.join(RULES)}")
        col, largest = RULES[rule]
        if (col.startswith("halted") and not halting) or (col == "tokens_embedded" and not merging):
            continue
        vals = per_image[col].dropna() if col in per_image else pd.Series(dtype=float)
        if vals.empty:
            continue
        row = vals.idxmax() if largest else vals.idxmin()
        out.append((rule, int(per_image.loc[row, "image"])))
    return out


def _rgb(image: Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    m = torch.tensor(mean, dtype=image.dtype).view(3, 1, 1)
    s = torch.tensor(std, dtype=image.dtype).view(3, 1, 1)
    return ((image.cpu() * s + m).clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()


@torch.no_grad()
def draw_gallery(seg: nn.Module, picks: Sequence[tuple[str, int]], batches: Any, folder: Path,
                 class_colors: np.ndarray, class_names: Sequence[str], mean: Sequence[float], std: Sequence[float],
                 title: str, per_image: pd.DataFrame) -> list[tuple[str, int, str, Path]]:
    """Draws one token-fate PNG per pick into ``folder``.

    Args:
        seg: the segmenter (eval mode).
        picks: ``(rule, image index)`` from ``pick_images``.
        batches: callable ``indices -> iterator`` of ``(indices, files, images, labels)`` (``iterate_split``).
        folder: where the PNGs go (``<rule>[+<rule>...]_<image stem>.png``).
        class_colors / class_names: the data set's palette and names.
        mean / std: the images' normalisation (to show them).
        title: figure title prefix.
        per_image: the per-image table (the value behind each rule goes into the title).

    Returns:
        ``(rule, image index, file name, PNG path)`` per pick (picks of one image share the PNG).
    """
    import matplotlib.pyplot as plt

    from tokred.viz import embedding_state, token_fate_figure

    folder.mkdir(parents=True, exist_ok=True)
    by_image: dict[int, list[str]] = {}
    for rule, idx in picks:
        by_image.setdefault(int(idx), []).append(rule)
    drawn = []
    for idx, rules in by_image.items():
        (_, files, images, labels), = list(batches([idx]))
        first = embedding_state(seg, images, labels)
        out = seg(images, labels)
        state = out.state
        depth = len(state.tokens_per_block)
        row = per_image.loc[per_image["image"] == idx].iloc[0]
        why = ", ".join(f"{r.replace('_', ' ')} ({RULES[r][0]} = {row[RULES[r][0]]:.3g})" for r in rules)
        fig = token_fate_figure(
            _rgb(images[0], mean, std), out.logits.argmax(1)[0].cpu().numpy(),
            first.token_map[0].view(*state.grid_size).cpu().numpy(),
            state.token_map[0].view(*state.grid_size).cpu().numpy(), state.cell_exit_block(depth)[0].cpu().numpy(),
            [float(t[0]) for t in state.tokens_per_block], depth, class_colors, tuple(class_names),
            title=f"{title}: {why}, {files[0]}")
        path = folder / f"{'+'.join(rules)}_{Path(files[0]).stem}.png"
        fig.savefig(path)
        plt.close(fig)
        drawn += [(rule, idx, files[0], path) for rule in rules]
    return drawn
