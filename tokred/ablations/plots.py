"""Plots of a grid summary: mIoU vs GFLOPs and vs im/s (Pareto fronts, labels placed without overlaps) and
the live tokens entering each block per cell."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

__all__ = ["plot_summary"]

_FAMILY_COLORS = {"none": "#555555", "tome": "#1f77b4", "cts": "#2ca02c", "dcts": "#17becf", "early_exit": "#d62728",
                  "cropr": "#ff7f0e"}


def _family_colors(methods: Iterable[str]) -> dict[str, Any]:
    """A distinct colour per method: fixed ones for the built-ins, unused tab10/tab20 colours for the rest."""
    import matplotlib
    from matplotlib.colors import to_hex

    spare = [to_hex(c) for c in (*matplotlib.colormaps["tab10"].colors, *matplotlib.colormaps["tab20"].colors)]
    spare = [c for c in dict.fromkeys(spare) if c not in _FAMILY_COLORS.values()
             and len({c[1:3], c[3:5], c[5:7]}) > 1]  # no greys
    out: dict[str, Any] = {}
    for m in dict.fromkeys(methods):
        out[m] = _FAMILY_COLORS.get(m) or spare[len([k for k in out if k not in _FAMILY_COLORS]) % len(spare)]
    return out


def _label_offsets() -> list[tuple[float, float]]:
    """Candidate label offsets (points): 8 directions at growing distances, nearest first."""
    out = []
    for radius in (9.0, 15.0, 24.0, 36.0, 50.0):
        for k in range(16):
            a = math.radians(22.5 * k + 11.25)
            out.append((round(radius * math.cos(a), 1), round(radius * math.sin(a), 1)))
    return out


def _anchor(dx: float, dy: float) -> tuple[str, str]:
    """Text alignment that puts a label on the side of its point given by the offset direction."""
    r = math.hypot(dx, dy) or 1.0
    ha = "left" if dx / r > 0.35 else ("right" if dx / r < -0.35 else "center")
    va = "bottom" if dy / r > 0.35 else ("top" if dy / r < -0.35 else "center")
    return ha, va


def _place_labels(ax: Any, xs: Sequence[float], ys: Sequence[float], labels: Sequence[str]) -> None:
    """Labels points without overlaps.

    Greedy: each label (crowded points first) takes the candidate offset of least cost, where the cost counts
    overlap with labels already placed, with every point's marker, crossings of leader lines already drawn,
    leaving the axes, and (a little) the distance; a leader line joins labels set away from their point.
    """
    fig = ax.figure
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    pts = ax.transData.transform(np.column_stack([xs, ys]))  # [M, 2] display px
    axbox = ax.get_window_extent(renderer)
    px_per_pt = fig.dpi / 72.0
    marker = 6.0 * px_per_pt  # half-size of a marker's box, px
    boxes: list[Any] = []
    leaders: list[tuple[np.ndarray, np.ndarray]] = []
    dist = np.linalg.norm(pts[:, None] - pts[None], axis=-1)  # [M, M]
    order = np.argsort(-(dist < 60 * px_per_pt).sum(1), kind="stable")  # crowded points first
    for i in order:
        best, best_cost = (9.0, 0.0), math.inf
        for dx, dy in _label_offsets():
            ha, va = _anchor(dx, dy)
            t = ax.annotate(labels[i], (xs[i], ys[i]), xytext=(dx, dy), textcoords="offset points", fontsize=7,
                            ha=ha, va=va)
            bb = t.get_window_extent(renderer).expanded(1.04, 1.2)
            t.remove()
            cost = sum(_overlap(bb, b) for b in boxes)
            cost += sum(_overlap_xy(bb, px - marker, py - marker, px + marker, py + marker) for px, py in pts) * 2.0
            for a, b in leaders:
                seg = a[None] + np.linspace(0, 1, 12)[:, None] * (b - a)[None]  # [12, 2] px
                cost += 200.0 * float(((seg[:, 0] > bb.x0) & (seg[:, 0] < bb.x1) & (seg[:, 1] > bb.y0)
                                       & (seg[:, 1] < bb.y1)).any())
            if not (bb.x0 >= axbox.x0 and bb.x1 <= axbox.x1 and bb.y0 >= axbox.y0 and bb.y1 <= axbox.y1):
                cost += 1e6
            cost += math.hypot(dx, dy) * px_per_pt * 1.5
            if cost < best_cost:
                best, best_cost = (dx, dy), cost
        dx, dy = best
        far = math.hypot(dx, dy) > 10
        ha, va = _anchor(dx, dy)
        t = ax.annotate(labels[i], (xs[i], ys[i]), xytext=(dx, dy), textcoords="offset points", fontsize=7, ha=ha,
                        va=va, arrowprops={"arrowstyle": "-", "lw": 0.5, "color": "0.55", "shrinkA": 1,
                                           "shrinkB": 3} if far else None)
        boxes.append(t.get_window_extent(renderer).expanded(1.04, 1.2))
        if far:
            leaders.append((pts[i], pts[i] + np.array([dx, dy]) * px_per_pt))


def _overlap_xy(a: Any, x0: float, y0: float, x1: float, y1: float) -> float:
    w = min(a.x1, x1) - max(a.x0, x0)
    h = min(a.y1, y1) - max(a.y0, y0)
    return max(w, 0.0) * max(h, 0.0)


def _overlap(a: Any, b: Any) -> float:
    return _overlap_xy(a, b.x0, b.y0, b.x1, b.y1)


def _scatter(table: pd.DataFrame, col: str, front_col: str, xlabel: str, title: str, lower_is_better: bool) -> Any:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.0, 5.6), dpi=130)
    t = table[np.isfinite(table[col].astype(float)) & np.isfinite(table["miou_pct"].astype(float))]
    colors = _family_colors(t["method"])
    for fam in colors:
        for mode, marker, filled in (("finetune", "o", True), ("off_the_shelf", "s", False), ("baseline", "D", False)):
            s = t[(t["method"] == fam) & (t["mode"] == mode)]
            if s.empty:
                continue
            c = colors[fam]
            ax.scatter(s[col], s["miou_pct"], marker=marker, s=36, zorder=3, edgecolors=c,
                       facecolors=c if filled else "none", linewidths=1.2,
                       label=fam if mode == "finetune" else f"{fam} ({mode.replace('_', ' ')})")
            if (s["miou_spread_pct"] > 0).any():
                ax.errorbar(s[col], s["miou_pct"], yerr=s["miou_spread_pct"] / 2, fmt="none", ecolor=c, lw=0.8)
    f = t[t[front_col]].sort_values(col)
    if len(f):
        ax.step(f[col], f["miou_pct"], where="post" if lower_is_better else "pre", color="k", lw=1.0, alpha=0.6,
                zorder=2, label="Pareto front (finetune cells)")
        ax.scatter(f[col], f["miou_pct"], s=140, facecolors="none", edgecolors="k", linewidths=1.0, zorder=4)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("mIoU (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if len(t):
        xs, ys = t[col].astype(float).to_numpy(), t["miou_pct"].astype(float).to_numpy()
        xr = (xs.max() - xs.min()) or max(abs(xs.max()), 1e-9) * 0.1
        yr = (ys.max() - ys.min()) or 1.0
        ax.set_xlim(xs.min() - 0.3 * xr, xs.max() + 0.3 * xr)
        ax.set_ylim(ys.min() - 0.2 * yr, ys.max() + 0.25 * yr)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    if len(t):
        _place_labels(ax, t[col].astype(float).tolist(), t["miou_pct"].astype(float).tolist(), t["cell"].tolist())
    return fig


def plot_summary(table: pd.DataFrame, out_dir: str | Path, title: str = "") -> dict[str, Path]:
    """Draws mIoU vs GFLOPs and mIoU vs im/s (Pareto fronts highlighted, points labelled) and the live tokens
    entering each block per cell, as PNG files in ``out_dir``.

    Args:
        table: ``summarize`` output.
        out_dir: folder of the PNG files.
        title: prefix of the plot titles (the protocol).

    Returns:
        ``{"miou_vs_gflops", "miou_vs_images_per_second", "tokens_per_block"}`` -> path.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for key, col, front, xlabel, lower in (
            ("miou_vs_gflops", "gflops", "pareto_gflops", "GFLOPs per image (fvcore)", True),
            ("miou_vs_images_per_second", "images_per_second", "pareto_images_per_second", "im/s", False)):
        fig = _scatter(table, col, front, xlabel, f"{title}: mIoU vs {xlabel.split(' ')[0]}", lower)
        paths[key] = out_dir / f"{key}.png"
        fig.savefig(paths[key])
        plt.close(fig)

    fig, ax = plt.subplots(figsize=(8.0, 4.8), dpi=130)
    colors = _family_colors(table["method"])
    styles = ("-", "--", "-.", ":")
    variant: dict[str, int] = {}
    top = 0.0
    for r in table.itertuples(index=False):
        tpb = r.tokens_per_block
        if not isinstance(tpb, list) or not tpb:
            continue
        top = max(top, max(tpb))
        blocks = np.arange(1, len(tpb) + 1)
        if r.mode == "baseline":
            ax.plot(blocks, tpb, color="0.35", lw=3.0, alpha=0.5, label=r.cell, zorder=1)
            continue
        k = variant.get(r.method, 0)
        variant[r.method] = k + 1
        off = r.mode != "finetune"
        ax.plot(blocks, tpb, color=colors[r.method], lw=1.0 if off else 1.5, ls=styles[k % len(styles)],
                marker="s" if off else "o", ms=2.5, label=f"{r.cell} (off the shelf)" if off else r.cell, zorder=2)
    ax.set_ylim(0, top * 1.06 if top else 1)
    depth = max((len(t) for t in table["tokens_per_block"] if isinstance(t, list)), default=0)
    if depth:
        ax.set_xticks(np.arange(1, depth + 1))
    ax.set_xlabel("block (1-based)")
    ax.set_ylabel("live patch tokens entering the block\n(mean over eval images)")
    ax.set_title(f"{title}: tokens per block", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    paths["tokens_per_block"] = out_dir / "tokens_per_block.png"
    fig.savefig(paths["tokens_per_block"])
    plt.close(fig)
    return paths


def plot_learning_curves(runs_dir: str | Path, out_path: str | Path, baseline_epochs: int = 0,
                         title: str = "", cells: Sequence[str] = ("baseline", "none")) -> Path | None:
    """The learning curves of the grid: validation mIoU (``val_miou`` of ``train_log.csv``, written with
    ``train.val_every``) and the training loss per epoch of ``cells``, one line per seed; finetune cells are drawn
    after the baseline (epoch ``baseline_epochs + e``), so a fine-tune that loses accuracy shows as a drop.

    Args:
        runs_dir: ``<protocol>/runs`` (``<cell>_seed<k>/train_log.csv``).
        out_path: the PNG file.
        baseline_epochs: the baseline's epochs (where finetune curves start).
        cells: cells to draw (``baseline`` first).

    Returns:
        ``out_path``, or None when no drawn run logged ``val_miou`` (nothing is written).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    logs = []
    for cell in cells:
        for log_path in sorted(Path(runs_dir).glob(f"{cell}_seed*/train_log.csv")):
            df = pd.read_csv(log_path)
            seed = log_path.parent.name.rsplit("_seed", 1)[-1]
            if "val_miou" in df and df["val_miou"].notna().any():
                logs.append((cell, seed, df))
    if not logs:
        return None
    fig, (ax_m, ax_l) = plt.subplots(1, 2, figsize=(10.0, 4.0), dpi=130)
    colors = {c: plt.get_cmap("tab10")(i) for i, c in enumerate(cells)}
    styles = ("-", "--", "-.", ":")
    for cell, seed, df in logs:
        shift = 0 if cell == "baseline" else baseline_epochs
        ls = styles[int(seed) % len(styles)] if seed.isdigit() else "-"
        v = df.dropna(subset=["val_miou"])
        ax_m.plot(v["epoch"] + shift, 100 * v["val_miou"], ls=ls, marker="o", ms=3, color=colors[cell],
                  label=f"{cell} seed {seed}")
        ax_l.plot(df["epoch"] + shift, df["loss"], ls=ls, color=colors[cell], label=f"{cell} seed {seed}")
    if baseline_epochs:
        for ax in (ax_m, ax_l):
            ax.axvline(baseline_epochs + 0.5, color="0.6", lw=0.8)
    ax_m.set_ylabel("val mIoU (%)")
    ax_l.set_ylabel("training loss (epoch mean)")
    for ax in (ax_m, ax_l):
        ax.set_xlabel("epoch (finetune cells after the baseline's)")
        ax.grid(alpha=0.3)
    ax_m.legend(fontsize=7)
    fig.suptitle(f"{title}: learning curves", fontsize=10)
    fig.tight_layout()
    out_path = Path(out_path)
    fig.savefig(out_path)
    plt.close(fig)
    return out_path
