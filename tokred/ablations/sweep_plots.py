"""The Pareto plot of the training-free sweeps: mIoU against GFLOPs per image, one curve per sweep (and cell,
seed), the grid's trained cells as labelled points."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

__all__ = ["plot_sweeps", "trained_cells"]


def trained_cells(protocol_dir: str | Path) -> pd.DataFrame:
    """The grid's trained cells to draw: ``<protocol_dir>/summary.csv``, else ``summarize`` in memory (nothing is
    written); an empty table when the folder has no finished run."""
    csv = Path(protocol_dir) / "summary.csv"
    if csv.is_file():
        return pd.read_csv(csv)
    from tokred.ablations.summary import summarize

    try:
        return summarize(protocol_dir)
    except FileNotFoundError:
        return pd.DataFrame(columns=["cell", "miou_pct", "gflops"])


def _value_text(parameter: str, value: float) -> str:
    return f"{int(value)}" if parameter == "r" else f"{value:g}"


def plot_sweeps(table: pd.DataFrame, cells: pd.DataFrame, path: str | Path, title: str = "") -> Path:
    """Draws ``pareto_sweeps.png``: mIoU (%) against GFLOPs per image.

    Each (sweep, cell, seed) of ``table`` is one line through its values in GFLOPs order, every point tagged
    with its value and the value the cell was trained at drawn larger; every trained cell of ``cells`` with a
    finite mIoU and GFLOPs is a grey square labelled with its name.

    Args:
        table: sweep rows (``tokred.ablations.sweeps.SWEEP_COLUMNS``: ``sweep``, ``cell``, ``seed``,
            ``parameter``, ``value``, ``miou_pct``, ``gflops``, ``at_trained_value``).
        cells: the grid's summary (``summary.csv``: ``cell``, ``miou_pct``, ``gflops``); may be empty.
        path: the PNG to write (its folder must exist).
        title: the figure title (the protocol's name).

    Returns:
        ``path``.

    Raises:
        ValueError: ``table`` lacks one of the columns above.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    need = ("sweep", "cell", "seed", "parameter", "value", "miou_pct", "gflops", "at_trained_value")
    missing = [c for c in need if c not in table.columns]
    if missing:
        raise ValueError(f"plot_sweeps: the sweep table lacks columns {missing}; pass run_sweeps' table")
    path = Path(path)
    colors = matplotlib.colormaps["tab10"].colors
    fig, ax = plt.subplots(figsize=(8.0, 5.2))
    groups = list(table.groupby(["sweep", "cell", "seed"], sort=False))
    for i, ((sweep, cell, seed), g) in enumerate(groups):
        g = g[np.isfinite(g["gflops"].astype(float)) & np.isfinite(g["miou_pct"].astype(float))]
        if g.empty:
            continue
        g = g.sort_values(["gflops", "value"])
        color = colors[i % len(colors)]
        param = str(g["parameter"].iloc[0])
        ax.plot(g["gflops"], g["miou_pct"], "-o", color=color, ms=4, lw=1.4,
                label=f"{sweep} on {cell} (seed {seed}): {param} = "
                      + ", ".join(_value_text(param, v) for v in sorted(g["value"])))
        trained = g[g["at_trained_value"].astype(bool)]
        ax.plot(trained["gflops"], trained["miou_pct"], "o", ms=9, mfc="none", mec=color, mew=1.6)
        same: dict[tuple[float, float], list[str]] = {}  # values at one point share a tag ("0.7, 0.8")
        for x, y, v in zip(g["gflops"], g["miou_pct"], g["value"]):
            same.setdefault((float(x), float(y)), []).append(_value_text(param, v))
        for (x, y), texts in same.items():
            ax.annotate(", ".join(texts), (x, y), xytext=(3, 4), textcoords="offset points", fontsize=6, color=color)
    pts = _finite(cells)
    if len(pts):
        ax.plot(pts["gflops"], pts["miou_pct"], "s", color="#444444", ms=5, label="trained cells (summary.csv)")
        for x, y, name in zip(pts["gflops"], pts["miou_pct"], pts["cell"]):
            ax.annotate(str(name), (x, y), xytext=(4, -9), textcoords="offset points", fontsize=6, color="#444444")
    ax.set_xlabel("GFLOPs per image (fvcore)")
    ax.set_ylabel("mIoU (%)")
    ax.set_title(f"training-free sweeps {title}".strip() + "\n(large ring: the value the cell was trained at)",
                 fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return path


def _finite(cells: Any) -> pd.DataFrame:
    if cells is None or not len(cells) or not {"cell", "miou_pct", "gflops"} <= set(cells.columns):
        return pd.DataFrame(columns=["cell", "miou_pct", "gflops"])
    c = cells[["cell", "miou_pct", "gflops"]].copy()
    c["miou_pct"] = pd.to_numeric(c["miou_pct"], errors="coerce")
    c["gflops"] = pd.to_numeric(c["gflops"], errors="coerce")
    return c[np.isfinite(c["miou_pct"]) & np.isfinite(c["gflops"])]
