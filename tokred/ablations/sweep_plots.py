"""The Pareto plot of the training-free sweeps: mIoU against GFLOPs per image, one curve per sweep and cell (the
median over its seeds), the grid's trained cells as labelled points."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tokred.ablations.sweeps import EVAL_KEY, ROW_KEY, _key

__all__ = ["median_curve", "plot_rows", "plot_sweeps", "trained_cells"]


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


def plot_rows(rows: pd.DataFrame, wanted: Iterable[tuple[str, ...]]) -> pd.DataFrame:
    """The rows of a sweeps folder that ``pareto_sweeps.png`` draws after a call that evaluated ``wanted``.

    Every row evaluated the way this call's rows were (same ``EVAL_KEY``: split, images, mode, GFLOPs images),
    whatever its cell or seed, so seeds swept by earlier calls stay on the plot; rows of other evaluation
    settings (a smoke run with ``eval.max_items``) are left out. Duplicate keys keep the last row.

    Args:
        rows: ``sweeps.csv`` as read (``SWEEP_COLUMNS``).
        wanted: ``ROW_KEY`` tuples (``tokred.ablations.sweeps._key``) of this call's points.

    Returns:
        The selected rows, index reset.
    """
    n = len(EVAL_KEY)  # ROW_KEY ends with EVAL_KEY
    evals = {k[-n:] for k in wanted}
    keep = [_key(r)[-n:] in evals for r in rows.to_dict("records")]
    return rows[keep].drop_duplicates(list(ROW_KEY), keep="last").reset_index(drop=True)


def plot_sweeps(table: pd.DataFrame, cells: pd.DataFrame, path: str | Path, title: str = "") -> Path:
    """Draws ``pareto_sweeps.png``: mIoU (%) against GFLOPs per image.

    Each (sweep, cell) of ``table`` is one line through its values in GFLOPs order (``median_curve``: the median
    over its seeds, each seed also drawn as a thin line when there are several), every point tagged with its
    value and the value the cell was trained at drawn larger; every trained cell of ``cells`` with a
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
    finite = table[np.isfinite(table["gflops"].astype(float)) & np.isfinite(table["miou_pct"].astype(float))]
    for i, ((sweep, cell), g) in enumerate(finite.groupby(["sweep", "cell"], sort=False)):
        color = colors[i % len(colors)]
        param = str(g["parameter"].iloc[0])
        seeds = sorted(int(s) for s in g["seed"].unique())
        if len(seeds) > 1:  # each seed thin, the median over seeds drawn as the curve
            for _, gs in g.groupby("seed"):
                gs = gs.sort_values(["gflops", "value"])
                ax.plot(gs["gflops"], gs["miou_pct"], "-", color=color, lw=0.8, alpha=0.35)
        med = median_curve(g)
        which = f"seed {seeds[0]}" if len(seeds) == 1 else "median of seeds " + ", ".join(map(str, seeds))
        ax.plot(med["gflops"], med["miou_pct"], "-o", color=color, ms=4, lw=1.4,
                label=f"{sweep} on {cell} ({which}): {param} = "
                      + ", ".join(_value_text(param, v) for v in sorted(med["value"])))
        trained = med[med["at_trained_value"]]
        ax.plot(trained["gflops"], trained["miou_pct"], "o", ms=9, mfc="none", mec=color, mew=1.6)
        same: dict[tuple[float, float], list[str]] = {}  # values at one point share a tag ("0.7, 0.8")
        for x, y, v in zip(med["gflops"], med["miou_pct"], med["value"]):
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
    ax.set_title(f"training-free sweeps {title}".strip() + "\n(large ring: the value the cell was trained at; "
                 "thin lines: single seeds)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return path


def median_curve(rows: pd.DataFrame) -> pd.DataFrame:
    """One sweep's curve over seeds: per value, the median mIoU and GFLOPs of its seeds.

    Args:
        rows: the rows of one sweep and cell (``value``, ``seed``, ``miou_pct``, ``gflops``, ``at_trained_value``),
            any number of seeds.

    Returns:
        ``value, miou_pct, gflops, at_trained_value, seeds`` (seeds holding the value), in GFLOPs order.
    """
    g = rows.assign(at_trained_value=rows["at_trained_value"].map(_truth), miou_pct=rows["miou_pct"].astype(float),
                    gflops=rows["gflops"].astype(float))
    med = g.groupby("value", as_index=False).agg(miou_pct=("miou_pct", "median"), gflops=("gflops", "median"),
                                                 at_trained_value=("at_trained_value", "any"),
                                                 seeds=("seed", "nunique"))
    return med.sort_values(["gflops", "value"]).reset_index(drop=True)


def _truth(v: Any) -> bool:
    """A CSV cell as a bool (``True`` / ``"True"`` / 1)."""
    return v.strip().lower() in ("true", "1") if isinstance(v, str) else bool(v)


def _finite(cells: Any) -> pd.DataFrame:
    if cells is None or not len(cells) or not {"cell", "miou_pct", "gflops"} <= set(cells.columns):
        return pd.DataFrame(columns=["cell", "miou_pct", "gflops"])
    c = cells[["cell", "miou_pct", "gflops"]].copy()
    c["miou_pct"] = pd.to_numeric(c["miou_pct"], errors="coerce")
    c["gflops"] = pd.to_numeric(c["gflops"], errors="coerce")
    return c[np.isfinite(c["miou_pct"]) & np.isfinite(c["gflops"])]
