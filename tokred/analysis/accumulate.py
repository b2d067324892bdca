"""One pass over a split: where the tokens went, at what accuracy, and what the superpatches covered.

``FateAccumulator.update`` reads one batch's ``SegOutput`` (final ``TokenState``, patch-grid and pixel logits)
and the labels at the network input's resolution; ``tables()`` returns pandas tables, ``summary()`` plain numbers.

Definitions (see ``tokred.analysis.cells`` for the cell and token labels):

* *fate* of a cell: the block after which its token left the encoder (``TokenState.cell_exit_block``), or
  ``depth`` ("live to the end"). A token halted at exit ``e`` carries its exit head's prediction to every cell
  it covers (STEP / DToP).
* per exit ``e`` and class: tokens halted (by their **predicted** class, as the pruner's ``halted_per_class``
  counts them, and by their label), cells and pixels halted (by the cells' / pixels' label), and the share of
  the class's pixels that halted there.
* accuracy / IoU of cells: the final patch-grid prediction (``grid_logits`` argmax: the exit logits at halted
  cells) against the cell's majority label; *halted at e* = cells whose token halted at exit ``e``,
  *continuing after e* = cells whose token was still live after exit ``e``.
* calibration: confidence (max softmax probability) of exit head ``e`` on every cell live at exit ``e``
  (``tokred.analysis.calibration``), correct when its argmax equals the cell label.
* superpatches: the tokens of the final state with the number of cells they hold (with an embedding-time
  merger such as dCTS and a pruner, that is the supertoken size after embedding: pruners never merge).
* GFLOPs per image: analytic (``tokred.measure.flops.analytic_vit_gflops``) from the tokens entering every
  block plus the prefix tokens and the patch embedding of ``N0`` patches; policy CNN, exit heads and decoder are
  not included (the job adds fvcore counts on a subset).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from tokred.analysis.calibration import ReliabilityBins
from tokred.analysis.cells import cell_class_counts, majority_label, token_class_counts
from tokred.engine.evaluate import ConfusionMatrix
from tokred.measure.flops import analytic_vit_gflops

__all__ = ["FateAccumulator", "describe"]

_QUANTILES = (0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0)


def describe(values: Sequence[float]) -> dict[str, float]:
    """``mean``, ``std`` (population) and the quantiles ``q0 .. q1`` of ``values`` (NaN when empty)."""
    v = np.asarray(list(values), dtype=np.float64)
    if v.size == 0:
        return {"mean": float("nan"), "std": float("nan"), **{f"q{q:g}": float("nan") for q in _QUANTILES}}
    return {"mean": float(v.mean()), "std": float(v.std()),
            **{f"q{q:g}": float(np.quantile(v, q)) for q in _QUANTILES}}


class FateAccumulator:
    """Accumulates the "where do tokens go" statistics of one split (see the module docstring).

    Args:
        num_classes: ``K``.
        depth: encoder blocks.
        exit_blocks: the early exit's 0-based exit blocks (empty without early exit).
        class_names: ``K`` names.
        ignore_index: ignored label value.
        superpatches: collect superpatch sizes (True with an embedding-time merger such as dCTS).
        threshold: the early exit's ``p0`` (to check halted cells against the recomputed confidences), or None.
        encoder_dims: ``(embed_dim, num_prefix_tokens, patch_size px, mlp_ratio)`` for the analytic GFLOPs.
        bins: reliability-diagram bins.
    """

    def __init__(self, num_classes: int, depth: int, exit_blocks: Sequence[int], class_names: Sequence[str],
                 ignore_index: int = 255, superpatches: bool = False, threshold: float | None = None,
                 encoder_dims: tuple[int, int, int, float] = (64, 1, 16, 4.0), bins: int = 10) -> None:
        self.K = int(num_classes)
        self.depth = int(depth)
        self.exit_blocks = [int(b) for b in exit_blocks]
        self.class_names = list(class_names) or [str(k) for k in range(self.K)]
        self.ignore_index = int(ignore_index)
        self.superpatches = bool(superpatches)
        self.threshold = threshold
        self.encoder_dims = encoder_dims
        self.bins = int(bins)
        self.pixel_cm = ConfusionMatrix(self.K, self.ignore_index)
        K1 = self.K + 1  # last column: no labelled pixel
        self.tokens_pred: dict[int, np.ndarray] = defaultdict(lambda: np.zeros(self.K))
        self.tokens_no_logits: dict[int, float] = defaultdict(float)
        self.tokens_true: dict[int, np.ndarray] = defaultdict(lambda: np.zeros(K1))
        self.cells: dict[int, np.ndarray] = defaultdict(lambda: np.zeros(K1))
        self.pixels: dict[int, np.ndarray] = defaultdict(lambda: np.zeros(self.K))
        self.cm_halted = {e: ConfusionMatrix(self.K, self.ignore_index) for e in self.exit_blocks}
        self.cm_continuing = {e: ConfusionMatrix(self.K, self.ignore_index) for e in self.exit_blocks}
        self.cm_end = ConfusionMatrix(self.K, self.ignore_index)
        self.calib = {e: ReliabilityBins(self.bins) for e in self.exit_blocks}
        self.live_cells = defaultdict(float)
        self.above_p0 = defaultdict(float)
        self.halted_checked = defaultdict(float)
        self.halted_above_p0 = defaultdict(float)
        self._sp_parts: list[pd.DataFrame] = []
        self.images: list[dict[str, Any]] = []

    # ------------------------------------------------------------------ accumulation
    @torch.no_grad()
    def update(self, out: Any, labels: Tensor, image_ids: Sequence[int], files: Sequence[str],
               exit_logits: dict[int, Tensor] | None = None) -> None:
        """Adds one batch.

        Args:
            out: the ``SegOutput`` of ``seg(images, labels)``: ``logits [B, K, H, W]``, ``grid_logits
                [B, K, H0, W0]``, ``state``.
            labels: ``[B, H, W]`` (long) labels at the input resolution (``ignore_index`` ignored).
            image_ids: ``B`` indices of the images in the split.
            files: ``B`` image file names (for the per-image table).
            exit_logits: ``exit block -> [B, K, H0, W0]`` exit-head logits on every cell
                (``tokred.analysis.calibration.exit_cell_logits``), or None (no calibration).
        """
        state = out.state
        labels = labels.to(out.logits.device)
        self.pixel_cm.update(out.logits.argmax(1), labels)
        grid = state.grid_size
        counts = cell_class_counts(labels, grid, self.K, self.ignore_index)  # [B, K, H0, W0]
        cell_lab = majority_label(counts, self.ignore_index)  # [B, H0, W0]
        fate = state.cell_exit_block(self.depth)  # [B, H0, W0]
        pred = out.grid_logits.argmax(1)  # [B, H0, W0]
        labelled = cell_lab != self.ignore_index
        lab_k = torch.where(labelled, cell_lab, self.K)  # [B, H0, W0] in [0, K]

        for e in sorted(set(fate.unique().tolist()) | set(self.exit_blocks) | {self.depth}):
            m = fate == e
            self.cells[e] += torch.bincount(lab_k[m], minlength=self.K + 1).cpu().numpy()
            self.pixels[e] += (counts * m.unsqueeze(1)).sum((0, 2, 3)).cpu().numpy()
        self.cm_end.update(pred[fate == self.depth], cell_lab[fate == self.depth])
        for e in self.exit_blocks:
            self.cm_halted[e].update(pred[fate == e], cell_lab[fate == e])
            self.cm_continuing[e].update(pred[fate > e], cell_lab[fate > e])

        cells_per_slot, pix = token_class_counts(state, counts)  # [B, S], [B, S, K]
        self._halted_tokens(state, pix)
        if exit_logits:
            self._calibration(exit_logits, fate, cell_lab, labelled)
        if self.superpatches:
            self._superpatch_part(state, cells_per_slot, pix)
        self._per_image(state, fate, pred, cell_lab, labelled, cells_per_slot, image_ids, files)

    def _halted_tokens(self, state: Any, pix: Tensor) -> None:
        bank = state.bank
        if bank is None:
            return
        N = state.size.shape[1]
        bpix = pix[:, N:]  # [B, M, K]
        has = bpix.sum(-1) > 0
        blab = torch.where(has, bpix.argmax(-1), self.K)  # [B, M]
        with_logits = bank.has_logits if bank.has_logits is not None else torch.zeros_like(bank.valid)
        bpred = bank.logits.argmax(-1) if bank.logits is not None else torch.zeros_like(bank.block)
        for e in bank.block[bank.valid].unique().tolist():
            m = bank.valid & (bank.block == e)
            self.tokens_true[e] += torch.bincount(blab[m], minlength=self.K + 1).cpu().numpy()
            ml = m & with_logits
            self.tokens_pred[e] += torch.bincount(bpred[ml], minlength=self.K).cpu().numpy()
            self.tokens_no_logits[e] += float((m & ~with_logits).sum())

    def _calibration(self, exit_logits: dict[int, Tensor], fate: Tensor, cell_lab: Tensor, labelled: Tensor) -> None:
        for e, lg in exit_logits.items():
            conf, cls = lg.float().softmax(1).max(1)  # [B, H0, W0]
            live = fate >= e
            m = live & labelled
            self.calib[e].update(conf[m], cls[m] == cell_lab[m])
            if self.threshold is not None:
                self.live_cells[e] += float(live.sum())
                self.above_p0[e] += float((conf[live] > self.threshold).sum())
                halted = fate == e
                self.halted_checked[e] += float(halted.sum())
                self.halted_above_p0[e] += float((conf[halted] > self.threshold).sum())

    def _superpatch_part(self, state: Any, cells: Tensor, pix: Tensor) -> None:
        N = state.size.shape[1]
        fate = torch.full_like(cells, self.depth, dtype=torch.long)
        if state.bank is not None:
            fate[:, N:] = state.bank.block
        present = cells > 0
        classes = (pix > 0).sum(-1)  # [B, S]
        lab = torch.where(pix.sum(-1) > 0, pix.argmax(-1), self.K)
        df = pd.DataFrame({"size": cells[present].long().cpu().numpy(),
                           "label": lab[present].cpu().numpy(),
                           "uniform": (classes[present] == 1).cpu().numpy(),
                           "fate": fate[present].cpu().numpy()})
        df["tokens"] = 1
        df["halted"] = df["fate"] < self.depth
        part = df.groupby(["size", "label"]).agg(tokens=("tokens", "sum"), uniform_tokens=("uniform", "sum"),
                                                 halted_tokens=("halted", "sum"))
        for e in self.exit_blocks:
            part[f"halted_exit_{e}"] = (df["fate"] == e).groupby([df["size"], df["label"]]).sum()
        self._sp_parts.append(part)

    def _per_image(self, state: Any, fate: Tensor, pred: Tensor, cell_lab: Tensor, labelled: Tensor,
                   cells_per_slot: Tensor, image_ids: Sequence[int], files: Sequence[str]) -> None:
        tpb = torch.stack([t.cpu() for t in state.tokens_per_block], 1).numpy() if state.tokens_per_block else None
        embed_dim, P, patch, mlp_ratio = self.encoder_dims
        n0 = state.num_patches
        for b, (idx, name) in enumerate(zip(image_ids, files)):
            halted = fate[b] < self.depth
            hl = halted & labelled[b]
            wrong = (pred[b] != cell_lab[b]) & hl
            row: dict[str, Any] = {"image": int(idx), "file": str(name)}
            cps = cells_per_slot[b]
            row["tokens_embedded"] = int(tpb[b, 0]) if tpb is not None else int((cps > 0).sum())
            row["supertokens"] = int((cps > 1).sum())
            row["halted_tokens"] = int(state.stats["banked"][b]) if "banked" in state.stats else 0
            row["halted_cell_share"] = float(halted.float().mean())
            row["halted_cells_labelled"] = int(hl.sum())
            row["halted_error"] = float(wrong.sum() / hl.sum()) if hl.any() else float("nan")
            right = ((pred[b] == cell_lab[b]) & labelled[b]).sum()
            row["cell_accuracy"] = float(right / labelled[b].sum().clamp_min(1))
            if tpb is not None:
                row["token_blocks"] = int(tpb[b].sum())
                row["gflops_analytic"] = analytic_vit_gflops(embed_dim, self.depth, [int(n) + P for n in tpb[b]],
                                                             mlp_ratio=mlp_ratio, patch_size=patch, num_patches=n0)
                for i, n in enumerate(tpb[b]):
                    row[f"tokens_block_{i}"] = int(n)
            self.images.append(row)

    # ------------------------------------------------------------------ results
    @property
    def num_images(self) -> int:
        return len(self.images)

    def _fates(self) -> list[int]:
        return sorted(set(self.cells) | set(self.exit_blocks) | set(self.tokens_true))

    def exits_by_class(self) -> pd.DataFrame:
        """Per fate (exit block, or ``depth`` = live to the end) and class: tokens, cells and pixels."""
        total_px = sum(self.pixels.values()) if self.pixels else np.zeros(self.K)
        rows = []
        for e in self._fates():
            for k in range(self.K + 1):
                named = k < self.K
                px = float(self.pixels[e][k]) if named else float("nan")
                rows.append({
                    "fate": "live to the end" if e == self.depth else f"halted after block {e}",
                    "block": e, "class": self.class_names[k] if named else "(no label)",
                    "tokens_halted_pred": float(self.tokens_pred[e][k]) if named and e != self.depth else 0.0,
                    "tokens_halted_label": float(self.tokens_true[e][k]) if e != self.depth else 0.0,
                    "cells": float(self.cells[e][k]), "pixels": px,
                    "class_pixels": float(total_px[k]) if named else float("nan"),
                    "pixel_share": px / float(total_px[k]) if named and total_px[k] > 0 else float("nan")})
        return pd.DataFrame(rows)

    def exits_summary(self) -> pd.DataFrame:
        """Per exit block: tokens halted (all classes), cells, pixel share, halted/continuing accuracy and mIoU."""
        rows = []
        total_cells = sum(float(c.sum()) for c in self.cells.values())
        for e in self.exit_blocks:
            h, c = self.cm_halted[e].summary(self.class_names), self.cm_continuing[e].summary(self.class_names)
            rows.append({"block": e, "tokens_halted": float(self.tokens_true[e].sum()),
                         "tokens_halted_per_image": float(self.tokens_true[e].sum()) / max(self.num_images, 1),
                         "cells_halted": float(self.cells[e].sum()),
                         "cell_share_halted": float(self.cells[e].sum()) / total_cells if total_cells else 0.0,
                         "halted_cell_accuracy": _acc(self.cm_halted[e]), "halted_miou": h["miou"],
                         "continuing_cell_accuracy": _acc(self.cm_continuing[e]), "continuing_miou": c["miou"]})
        return pd.DataFrame(rows)

    def iou_halted_vs_live(self) -> pd.DataFrame:
        """Per class IoU (cells) of the cells halted at each exit, continuing after it, and live to the end."""
        cols: dict[str, Any] = {"class": self.class_names}
        for e in self.exit_blocks:
            cols[f"halted_{e}"] = self.cm_halted[e].iou().numpy()
            cols[f"continuing_{e}"] = self.cm_continuing[e].iou().numpy()
        cols["live_to_end"] = self.cm_end.iou().numpy()
        return pd.DataFrame(cols)

    def calibration(self) -> tuple[pd.DataFrame, pd.DataFrame]:
        """``(bins per exit, summary per exit)``: reliability bins; ECE, mean confidence, accuracy, share > p0."""
        bins, summ = [], []
        for e in self.exit_blocks:
            rb = self.calib[e]
            if rb.total == 0:
                continue
            bins += [{"block": e, **r} for r in rb.rows()]
            row = {"block": e, "cells": rb.total, "ece": rb.ece(), "mean_confidence": rb.mean_confidence(),
                   "accuracy": rb.accuracy()}
            if self.threshold is not None:
                row["p0"] = self.threshold
                live = self.live_cells[e]
                row["share_above_p0"] = self.above_p0[e] / live if live else float("nan")
                chk = self.halted_checked[e]
                row["halted_cells_above_p0"] = self.halted_above_p0[e] / chk if chk else float("nan")
            summ.append(row)
        return pd.DataFrame(bins), pd.DataFrame(summ)

    def superpatch_table(self) -> pd.DataFrame:
        """Per token size (cells) and label: tokens, uniform tokens and fraction, halted tokens, share of cells."""
        if not self._sp_parts:
            return pd.DataFrame()
        df = pd.concat(self._sp_parts).groupby(level=[0, 1]).sum().reset_index()
        df["class"] = [self.class_names[k] if k < self.K else "(no label)" for k in df["label"]]
        df["uniform_fraction"] = df["uniform_tokens"] / df["tokens"]
        df["cells"] = df["size"] * df["tokens"]
        per_class_cells = df.groupby("label")["cells"].transform("sum")
        df["class_cell_share"] = df["cells"] / per_class_cells
        lead = ["size", "class", "tokens", "uniform_tokens", "uniform_fraction", "cells", "class_cell_share"]
        return df[lead + [c for c in df.columns if c not in lead and c != "label"]]

    def superpatch_by_size(self) -> pd.DataFrame:
        """Per token size, all classes pooled."""
        sp = self.superpatch_table()
        if sp.empty:
            return sp
        num = [c for c in sp.columns if c not in ("size", "class", "uniform_fraction", "class_cell_share")]
        g = sp.groupby("size")[num].sum().reset_index()
        g["uniform_fraction"] = g["uniform_tokens"] / g["tokens"]
        g["token_share"] = g["tokens"] / g["tokens"].sum()
        g["cell_share"] = g["cells"] / g["cells"].sum()
        return g

    def per_image(self) -> pd.DataFrame:
        return pd.DataFrame(self.images)

    def per_image_summary(self) -> pd.DataFrame:
        """Distribution over images (mean, std, quantiles) of every numeric per-image column."""
        df = self.per_image()
        rows = [{"metric": c, **describe(df[c].dropna())} for c in df.columns
                if c not in ("image", "file") and pd.api.types.is_numeric_dtype(df[c])]
        return pd.DataFrame(rows)

    def summary(self) -> dict[str, Any]:
        pix = self.pixel_cm.summary(self.class_names)
        return {"num_images": self.num_images, "miou": pix["miou"], "pixel_accuracy": pix["pixel_accuracy"],
                "per_class_iou": pix["per_class_iou"]}


def _acc(cm: ConfusionMatrix) -> float:
    m = cm.mat.double()
    return float(m.diag().sum() / m.sum()) if m.sum() > 0 else float("nan")
