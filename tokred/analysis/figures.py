"""PNG figures of ``tokred analyze`` (matplotlib, Agg backend): one function per figure, each returns the path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

__all__ = ["reliability_figure", "halted_by_class_figure", "superpatch_figure", "tokens_figure", "sweep_figure"]


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    plt = _plt()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def reliability_figure(bins: pd.DataFrame, summary: pd.DataFrame, path: Path) -> Path:
    """Reliability diagram per exit head: accuracy per confidence bin against the diagonal, ECE in the title."""
    plt = _plt()
    exits = list(summary["block"])
    fig, axes = plt.subplots(1, len(exits), figsize=(3.6 * len(exits), 3.6), squeeze=False)
    for ax, e in zip(axes[0], exits):
        b = bins[bins["block"] == e]
        width = float(b["hi"].iloc[0] - b["lo"].iloc[0])
        centers = (b["lo"] + b["hi"]) / 2
        ax.bar(centers, b["accuracy"].fillna(0), width=width * 0.95, color="tab:blue", edgecolor="k", lw=0.4,
               label="accuracy")
        ax.plot(centers, b["mean_confidence"], "o", color="tab:red", ms=4, label="mean confidence")
        share = b["count"] / max(float(b["count"].sum()), 1.0)
        ax.bar(centers, share, width=width * 0.95, color="0.6", alpha=0.5, label="share of cells")
        ax.plot([0, 1], [0, 1], "k--", lw=0.8)
        row = summary[summary["block"] == e].iloc[0]
        if "p0" in row and pd.notna(row["p0"]):
            ax.axvline(float(row["p0"]), color="tab:green", lw=1, ls=":", label=f"p0 = {float(row['p0']):g}")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence (max softmax)")
        ax.set_ylabel("accuracy")
        ax.set_title(f"exit after block {e} (0-based): ECE {row['ece']:.3f}", fontsize=9)
        ax.legend(fontsize=7, loc="upper left")
    return _save(fig, path)


def halted_by_class_figure(table: pd.DataFrame, depth: int, path: Path) -> Path:
    """Stacked bars per class: share of the class's pixels halted at each exit (the rest: live to the end)."""
    plt = _plt()
    t = table[(table["class"] != "(no label)") & (table["block"] < depth)]
    classes = list(dict.fromkeys(table.loc[table["class"] != "(no label)", "class"]))
    fig, ax = plt.subplots(figsize=(max(5.0, 0.55 * len(classes) + 2), 3.6))
    bottom = np.zeros(len(classes))
    for e in sorted(t["block"].unique()):
        share = t[t["block"] == e].set_index("class").reindex(classes)["pixel_share"].fillna(0).to_numpy()
        ax.bar(classes, share, bottom=bottom, label=f"halted after block {e}")
        bottom += share
    ax.set_ylim(0, 1)
    ax.set_ylabel("share of the class's pixels")
    ax.set_title("pixels halted per class and exit", fontsize=9)
    ax.tick_params(axis="x", rotation=45, labelsize=8)
    if len(t):
        ax.legend(fontsize=7)
    return _save(fig, path)


def superpatch_figure(table: pd.DataFrame, path: Path) -> Path:
    """Per class, the share of its cells held by tokens of each size (1, 4, 16, 64 ... patches)."""
    plt = _plt()
    t = table[table["class"] != "(no label)"]
    classes = list(dict.fromkeys(t["class"]))
    sizes = sorted(t["size"].unique())
    cmap = plt.get_cmap("viridis")
    fig, ax = plt.subplots(figsize=(max(5.0, 0.55 * len(classes) + 2), 3.6))
    bottom = np.zeros(len(classes))
    for j, s in enumerate(sizes):
        share = t[t["size"] == s].set_index("class").reindex(classes)["class_cell_share"].fillna(0).to_numpy()
        ax.bar(classes, share, bottom=bottom, color=cmap(j / max(len(sizes) - 1, 1)), label=f"{s} patches")
        bottom += share
    ax.set_ylim(0, 1)
    ax.set_ylabel("share of the class's cells")
    ax.set_title("superpatch size per class (cells held by tokens of each size)", fontsize=9)
    ax.tick_params(axis="x", rotation=45, labelsize=8)
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, path)


def tokens_figure(per_image: pd.DataFrame, depth: int, n0: int, path: Path) -> Path:
    """Left: live tokens entering each block over images (box plots); right: GFLOPs per image histogram."""
    plt = _plt()
    cols = [f"tokens_block_{i}" for i in range(depth) if f"tokens_block_{i}" in per_image]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    if cols:
        a.boxplot([per_image[c].to_numpy() for c in cols])
        a.set_xticks(range(1, len(cols) + 1), [str(i + 1) for i in range(len(cols))])
        a.axhline(n0, color="0.5", ls="--", lw=0.8)
    a.set_xlabel("block (1-based)")
    a.set_ylabel("live patch tokens per image")
    a.set_title(f"tokens per block over {len(per_image)} images (N0 = {n0})", fontsize=9)
    for col, lab in (("gflops_analytic", "analytic encoder"), ("gflops_measured", "fvcore, whole model")):
        if col in per_image and per_image[col].notna().any():
            b.hist(per_image[col].dropna(), bins=20, alpha=0.6, label=lab)
    b.set_xlabel("GFLOPs per image")
    b.set_ylabel("images")
    b.legend(fontsize=7)
    b.set_title("GFLOPs per image", fontsize=9)
    return _save(fig, path)


def sweep_figure(table: pd.DataFrame, name: str, path: Path) -> Path:
    """DToP-style curve: mIoU against analytic GFLOPs over the swept values, and halted / kept shares."""
    plt = _plt()
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    a.plot(table["gflops_analytic"], table["miou"] * 100, "o-")
    points: dict[tuple[float, float], list[str]] = {}  # equal points share one label ("p0=0.05, 0.1")
    for _, r in table.iterrows():
        points.setdefault((float(r["gflops_analytic"]), float(r["miou"]) * 100), []).append(f"{r[name]:g}")
    for (x, y), labels in points.items():
        a.annotate(f"{name}={', '.join(labels)}", (x, y), fontsize=7, textcoords="offset points", xytext=(3, 3))
    a.set_xlabel("GFLOPs per image (analytic encoder)")
    a.set_ylabel("mIoU (%)")
    a.set_title(f"mIoU vs GFLOPs over {name}", fontsize=9)
    x = np.arange(len(table))
    b.plot(x, table["halted_fraction"], "o-", label="halted tokens")
    b.plot(x, table["halted_patch_fraction"], "s-", label="halted patches")
    b.plot(x, table["token_blocks_ratio"], "^-", label="token-blocks / unreduced")
    b.set_xticks(x)
    b.set_xticklabels([str(v) for v in table[name]], fontsize=7)
    b.set_xlabel(name)
    b.set_ylim(0, 1.05)
    b.legend(fontsize=7)
    b.set_title(f"token shares over {name}", fontsize=9)
    return _save(fig, path)
