"""Exit-head calibration: reliability bins, expected calibration error, exit-head logits on every live cell.

The early exit (``tokred.reducers.early_exit.EarlyExit``) computes its heads' logits at inference but keeps
only those of the tokens that halt (in the bank); the confidences of the tokens that stay live are not exposed.
The analysis gets them without touching the pruner: a forward pre-hook on the encoder (public PyTorch API)
asks for the *taps* of the exit blocks (``Encoder.forward(taps=...)``: the output of ``blocks[b]`` restored to
the patch grid, before the block's ``on_block`` hooks, i.e. exactly what exit head ``b`` reads), and the
analysis runs the pruner's head ``b`` on the restored cells.

For the default ``linear`` head (LayerNorm + Linear per token) this is exact: a cell holds a copy of its
token's features, so the head's output on the cell is the token's logits. For the ``atm`` head
(attention-to-mask, class queries attend over the tokens) the cells replace the tokens as keys (a supertoken
counts once per cell), so the confidences are an approximation; ``exact_for`` says which.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["ReliabilityBins", "exact_for", "exit_cell_logits", "tap_blocks"]


@contextlib.contextmanager
def tap_blocks(encoder: nn.Module, blocks: Sequence[int]) -> Iterator[None]:
    """While active, every ``encoder(...)`` call also taps ``blocks`` (``state.taps[b]`` ``[B, C, H0, W0]``).

    Taps the caller asked for (a decoder's ``out_indices``) are kept; only the tap set grows.
    """
    extra = tuple(int(b) for b in blocks)

    def pre(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        kwargs = dict(kwargs)
        kwargs["taps"] = tuple(sorted({*(int(t) for t in (kwargs.get("taps") or ())), *extra}))
        return args, kwargs

    handle = encoder.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def exact_for(pruner: nn.Module) -> bool:
    """True when the cell-wise head logits equal the per-token ones (``head="linear"``)."""
    return getattr(pruner, "head", None) == "linear"


@torch.no_grad()
def exit_cell_logits(pruner: nn.Module, taps: dict[int, Tensor]) -> dict[int, Tensor]:
    """Exit-head logits on every cell of the restored grid after each exit block.

    Args:
        pruner: an ``EarlyExit`` after ``setup`` (``exit_blocks`` and ``heads`` aligned).
        taps: ``block -> [B, C, H0, W0]`` restored block outputs (``state.taps``).

    Returns:
        ``block -> [B, K, H0, W0]`` logits; exits without a tap are left out.
    """
    out = {}
    for j, b in enumerate(pruner.exit_blocks or ()):
        grid = taps.get(int(b))
        if grid is None:
            continue
        B, C, H0, W0 = grid.shape
        x = grid.flatten(2).transpose(1, 2)  # [B, N0, C]
        logits = pruner.heads[j](x, None)  # [B, N0, K]
        out[int(b)] = logits.transpose(1, 2).reshape(B, -1, H0, W0).float()
    return out


class ReliabilityBins:
    """Equal-width confidence bins over ``[0, 1]``: count, summed confidence and correct predictions.

    Args:
        bins: number of bins (10 for the usual reliability diagram).
    """

    def __init__(self, bins: int = 10) -> None:
        if bins < 1:
            raise ValueError(f"calibration bins must be >= 1, got {bins}")
        self.bins = int(bins)
        self.count = np.zeros(self.bins)
        self.conf = np.zeros(self.bins)
        self.correct = np.zeros(self.bins)

    def update(self, conf: Tensor, correct: Tensor) -> None:
        """Adds ``conf [n]`` (max softmax probability) and ``correct [n]`` (bool) of ``n`` predictions."""
        idx = (conf.double() * self.bins).long().clamp(0, self.bins - 1).cpu().numpy()
        self.count += np.bincount(idx, minlength=self.bins)
        self.conf += np.bincount(idx, weights=conf.double().cpu().numpy(), minlength=self.bins)
        self.correct += np.bincount(idx, weights=correct.double().cpu().numpy(), minlength=self.bins)

    @property
    def total(self) -> float:
        return float(self.count.sum())

    def ece(self) -> float:
        """Expected calibration error: ``sum_b n_b / n * |accuracy_b - confidence_b|`` (NaN when empty)."""
        n = self.total
        if n == 0:
            return float("nan")
        nz = self.count > 0
        gap = np.abs(self.correct[nz] / self.count[nz] - self.conf[nz] / self.count[nz])
        return float((self.count[nz] / n * gap).sum())

    def rows(self) -> list[dict[str, float]]:
        """One dict per bin: ``lo``, ``hi``, ``count``, ``mean_confidence``, ``accuracy`` (NaN when empty)."""
        edges = np.linspace(0.0, 1.0, self.bins + 1)
        out = []
        for k in range(self.bins):
            c = self.count[k]
            out.append({"bin": k, "lo": float(edges[k]), "hi": float(edges[k + 1]), "count": int(c),
                        "mean_confidence": float(self.conf[k] / c) if c else float("nan"),
                        "accuracy": float(self.correct[k] / c) if c else float("nan")})
        return out

    def thresholds_for_shares(self, shares: tuple[float, ...] = (0.75, 0.5, 0.25)) -> list[float]:
        """Inner bin edges ``t`` at which the share of predictions with confidence ``>= t`` comes closest to each
        of ``shares`` (within 0.2 of it), ascending and without repeats: thresholds that make about that share
        of the tokens halting candidates (used to extend the default p0 sweep)."""
        n = self.total
        if n == 0 or self.bins < 2:
            return []
        above = self.count[::-1].cumsum()[::-1] / n  # [bins] share with confidence >= the bin's lower edge
        edges = np.linspace(0.0, 1.0, self.bins + 1)
        out = set()
        for target in shares:
            k = 1 + int(np.argmin(np.abs(above[1:] - target)))
            if abs(above[k] - target) <= 0.2:
                out.add(round(float(edges[k]), 6))
        return sorted(out)

    def mean_confidence(self) -> float:
        return float(self.conf.sum() / self.total) if self.total else float("nan")

    def accuracy(self) -> float:
        return float(self.correct.sum() / self.total) if self.total else float("nan")
