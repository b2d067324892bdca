"""Aggregating a protocol folder: ``summarize`` (one row per cell, medians over seeds, Pareto fronts) and
``write_summary`` (summary.csv, summary.md and the plots)."""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tokred.ablations.grid import BASELINE_CELL, read_protocol
from tokred.ablations.plots import plot_learning_curves, plot_summary
from tokred.io import atomic_write
from tokred.jobs.summary import SELF_CHECK_TOLERANCE, busy_timing

__all__ = ["SUMMARY_COLUMNS", "pareto_front", "summarize", "write_summary"]

log = logging.getLogger(__name__)

_RUN_DIR = re.compile(r"^(?P<cell>.+?)_seed(?P<seed>\d+)(?:-(?P<dup>\d+))?$")
_NUMERIC = ("miou", "gflops", "gflops_ratio", "images_per_second", "speedup", "efficiency", "token_reduction",
            "halted_fraction", "batch_size", "train_seconds")
#: summary.csv columns, in order.
SUMMARY_COLUMNS = ("cell", "method", "mode", "budget", "miou_pct", "miou_spread_pct", "delta_miou_pct", "gflops",
                   "gflops_ratio", "images_per_second", "speedup", "efficiency", "token_reduction", "halted_fraction",
                   "device", "precision", "batch_size", "seeds", "num_seeds", "train_seconds", "pareto_gflops",
                   "pareto_images_per_second", "tokens_per_block", "timed_seeds", "busy_seeds", "paired_delta_pct",
                   "paired_delta_min_pct", "paired_delta_max_pct", "paired_seeds", "exceeds_spread")
#: Columns measured by the clock: their medians skip the runs whose timing self-check failed.
_TIMED = ("images_per_second", "speedup", "efficiency")


def pareto_front(cost: Sequence[float], quality: Sequence[float], lower_cost_is_better: bool = True) -> np.ndarray:
    """Which points are Pareto-optimal (no other point is at least as good on both axes and better on one).

    Args:
        cost: ``[M]`` cost per point (GFLOPs: lower is better; im/s: pass ``lower_cost_is_better=False``).
        quality: ``[M]`` quality per point (mIoU, higher is better).
        lower_cost_is_better: direction of the first axis.

    Returns:
        ``[M]`` bool mask; points with a NaN coordinate are never on the front.
    """
    c = np.asarray(cost, dtype=float) * (1.0 if lower_cost_is_better else -1.0)  # [M], lower is better
    q = np.asarray(quality, dtype=float)  # [M], higher is better
    ok = np.isfinite(c) & np.isfinite(q)
    # dominated[i]: some j with c_j <= c_i, q_j >= q_i and one strict
    le = (c[None, :] <= c[:, None]) & (q[None, :] >= q[:, None])  # [M_i, M_j]
    strict = (c[None, :] < c[:, None]) | (q[None, :] > q[:, None])
    dominated = (le & strict & ok[None, :]).any(1)
    return ok & ~dominated


def _cell_and_seed(run_dir: str) -> tuple[str, int | None, int]:
    name = Path(run_dir).name
    m = _RUN_DIR.match(name)
    if m is None:
        return name, None, 0
    return m["cell"], int(m["seed"]), int(m["dup"] or 0)


def _column(df: pd.DataFrame, name: str) -> pd.Series:
    return df[name] if name in df.columns else pd.Series([None] * len(df), index=df.index, dtype=object)


def _join(values: Iterable[Any]) -> str:
    keep = (v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v)))
    return ", ".join(dict.fromkeys(str(v) for v in keep))


def summarize(protocol_dir: str | Path) -> pd.DataFrame:
    """One row per cell from the runs of a protocol folder: medians over seeds and the comparisons.

    Reads ``<protocol_dir>/runs/<cell>_seed<k>/metrics.json`` (``tokred.results.load_results``) and, when
    present, ``protocol.json`` (cell modes, budgets, order, reference cell). Numbers are medians over seeds;
    ``miou_spread_pct`` is max - min over seeds (0 with one seed). ``delta_miou_pct`` is in percentage points
    against the reference cell (``none``): median of this cell minus median of the reference.

    Paired comparison (every cell, off-the-shelf and baseline rows included): for each seed ``k`` both the cell
    and the reference finished, the paired delta is ``mIoU(cell, seed k) - mIoU(reference, seed k)`` in pp.
    ``paired_delta_pct`` is their median, ``paired_delta_min_pct`` / ``paired_delta_max_pct`` their range and
    ``paired_seeds`` their number (0, deltas NaN, when no seed pairs). ``exceeds_spread`` is True only when
    (1) at least 2 seeds are paired, (2) every paired delta has the same strict sign (all > 0 or all < 0) and
    (3) ``|paired_delta_pct|`` is strictly larger than the reference cell's ``miou_spread_pct``; otherwise the
    difference is within seed noise and must not be ranked on.

    Timing: a run whose unreduced model, timed against itself in the same process
    (``throughput_detail.self_check_speedup``), is off 1 by more than ``SELF_CHECK_TOLERANCE`` was measured on a
    busy machine (``tokred.jobs.summary.busy_timing``, the rule of ``tokred run``'s warning); its
    ``images_per_second``, ``speedup`` and ``efficiency`` are left out of the medians (NaN when every seed of the
    cell was busy), the other columns keep it. ``timed_seeds`` counts the seeds whose timing counts,
    ``busy_seeds`` lists those set aside (comma-separated, empty when none). Runs without a self-check count as
    timed.

    Pareto membership (mIoU vs GFLOPs, lower is better; mIoU vs im/s, higher is better) is computed over the
    fine-tune cells only, so that every point on a front saw the same training steps; the baseline and off-the-shelf
    rows are shown but never on a front.

    Args:
        protocol_dir: ``<root>/<protocol>``.

    Returns:
        A DataFrame with ``SUMMARY_COLUMNS`` (``tokens_per_block`` holds the per-block mean live tokens, median
        over seeds, a list; ``paired_seeds`` an int, ``exceeds_spread`` a bool).

    Raises:
        FileNotFoundError: no metrics.json under ``<protocol_dir>/runs``.
    """
    from tokred.results import load_results

    protocol_dir = Path(protocol_dir)
    proto = read_protocol(protocol_dir) or {}
    cells_rec: dict[str, Any] = proto.get("cells", {})
    reference = proto.get("reference", "none")
    raw = load_results(protocol_dir / "runs")
    parsed = [_cell_and_seed(d) for d in raw["run_dir"]]
    raw["cell"] = [p[0] for p in parsed]
    raw["_dup"] = [p[2] for p in parsed]
    seed_col = _column(raw, "seed")
    raw["seed"] = [p[1] if p[1] is not None else s for p, s in zip(parsed, seed_col)]
    dups = raw.duplicated(["cell", "seed"], keep=False)
    if dups.any():
        log.warning("several finished runs for %s; keeping the latest of each",
                    sorted(set(map(tuple, raw.loc[dups, ["cell", "seed"]].astype(str).values.tolist()))))
        raw = raw.sort_values("_dup").drop_duplicates(["cell", "seed"], keep="last")
    if "method" not in raw.columns:
        raw["method"] = [
            "+".join(n for n in (m, p) if n and n != "none") or "none"
            for m, p in zip(_column(raw, "merger.name"), _column(raw, "pruner.name"))]
    for k in _NUMERIC:
        raw[k] = pd.to_numeric(_column(raw, k), errors="coerce")
    check = pd.to_numeric(_column(raw, "throughput_detail.self_check_speedup"), errors="coerce")
    raw["_busy"] = check.map(busy_timing).astype(bool).to_numpy()
    if raw["_busy"].any():
        log.warning("timing self-check off 1 by more than %.2f (a busy machine) in %s: their im/s, speedup and "
                    "efficiency are left out of the medians; rerun those cells alone to time them",
                    SELF_CHECK_TOLERANCE, sorted(Path(d).name for d in raw.loc[raw["_busy"], "run_dir"]))
    rows = []
    for cell, g in raw.groupby("cell", sort=False):
        rec = cells_rec.get(cell, {})
        mode = rec.get("mode") or ("baseline" if cell == BASELINE_CELL else "finetune")
        miou = 100.0 * g["miou"]
        tpb = [t for t in _column(g, "tokens_per_block") if isinstance(t, list) and t]
        depth = min((len(t) for t in tpb), default=0)
        timed = g[~g["_busy"]]
        rows.append({
            "cell": cell, "method": _join(g["method"]), "mode": mode, "budget": rec.get("budget", ""),
            "miou_pct": miou.median(),
            "miou_spread_pct": float(miou.max() - miou.min()) if miou.notna().any() else np.nan,
            **{k: g[k].median() for k in ("gflops", "gflops_ratio", "token_reduction", "halted_fraction",
                                         "batch_size")},
            **{k: timed[k].median() for k in _TIMED},
            "device": _join(_column(g, "device")), "precision": _join(_column(g, "precision")),
            "seeds": ",".join(str(s) for s in sorted(s for s in g["seed"] if s is not None)),
            "num_seeds": len(g), "train_seconds": g["train_seconds"].sum(min_count=1),
            "tokens_per_block": np.median(np.array([t[:depth] for t in tpb], dtype=float), 0).tolist() if tpb else None,
            "timed_seeds": len(timed),
            "busy_seeds": ",".join(str(s) for s in sorted(s for s in g.loc[g["_busy"], "seed"] if s is not None)),
        })
    table = pd.DataFrame(rows)
    order = [BASELINE_CELL, *proto.get("cell_order", [])]
    rank = {c: i for i, c in enumerate(dict.fromkeys(order))}
    table["_rank"] = [rank.get(c, len(rank)) for c in table["cell"]]
    table = table.sort_values(["_rank", "cell"], kind="stable").drop(columns="_rank").reset_index(drop=True)
    ref = table.loc[table["cell"] == reference, "miou_pct"]
    if ref.empty:
        log.warning("reference cell %r has no finished run; delta mIoU is left empty", reference)
        table["delta_miou_pct"] = np.nan
    else:
        table["delta_miou_pct"] = table["miou_pct"] - float(ref.iloc[0])
    paired = _paired(raw, table, reference)
    for col in paired.columns:
        table[col] = paired[col].to_numpy()
    ft = (table["mode"] == "finetune").to_numpy()
    for name, col, lower in (("pareto_gflops", "gflops", True),
                             ("pareto_images_per_second", "images_per_second", False)):
        mask = np.zeros(len(table), dtype=bool)
        if ft.any():
            mask[ft] = pareto_front(table.loc[ft, col], table.loc[ft, "miou_pct"], lower_cost_is_better=lower)
        table[name] = mask
    return table[list(SUMMARY_COLUMNS)]


def _paired(raw: pd.DataFrame, table: pd.DataFrame, reference: str) -> pd.DataFrame:
    """Per-seed paired deltas of every cell against ``reference`` (rule: ``summarize``), aligned with ``table``."""
    by_seed = {cell: {int(s): 100.0 * float(m) for s, m in zip(g["seed"], g["miou"])
                      if s is not None and not pd.isna(s) and np.isfinite(m)}
               for cell, g in raw.groupby("cell", sort=False)}
    ref = by_seed.get(reference, {})
    spread = table.loc[table["cell"] == reference, "miou_spread_pct"]
    ref_spread = float(spread.iloc[0]) if not spread.empty else np.nan
    rows = []
    for cell in table["cell"]:
        mine = by_seed.get(cell, {})
        deltas = np.array([mine[s] - ref[s] for s in sorted(set(mine) & set(ref))], dtype=float)  # [S] pp
        if deltas.size == 0:
            rows.append({"paired_delta_pct": np.nan, "paired_delta_min_pct": np.nan, "paired_delta_max_pct": np.nan,
                         "paired_seeds": 0, "exceeds_spread": False})
            continue
        med = float(np.median(deltas))
        same_sign = bool((deltas > 0).all() or (deltas < 0).all())
        exceeds = deltas.size >= 2 and same_sign and np.isfinite(ref_spread) and abs(med) > ref_spread
        rows.append({"paired_delta_pct": med, "paired_delta_min_pct": float(deltas.min()),
                     "paired_delta_max_pct": float(deltas.max()), "paired_seeds": int(deltas.size),
                     "exceeds_spread": bool(exceeds)})
    return pd.DataFrame(rows, index=table.index).astype({"paired_seeds": int, "exceeds_spread": bool})


def _paired_text(r: Any, reference: str) -> tuple[str, str]:
    """``(paired delta with its range and count, verdict)`` for summary.md."""
    if r.paired_seeds == 0:
        return "-", "no paired seed"
    text = f"{_pp(r.paired_delta_pct, signed=True)} [{_pp(r.paired_delta_min_pct, signed=True)}, " \
           f"{_pp(r.paired_delta_max_pct, signed=True)}] ({r.paired_seeds} seed{'s' if r.paired_seeds > 1 else ''})"
    if r.cell == reference:
        return text, "reference"
    if r.paired_seeds < 2:
        return text, "1 seed: no spread"
    return text, "exceeds spread" if r.exceeds_spread else "within spread"


def _timed_text(r: Any) -> str:
    """``timed / seeds`` and the busy seeds set aside, for summary.md."""
    text = f"{r.timed_seeds}/{r.num_seeds}"
    return f"{text} (busy: seed {r.busy_seeds})" if r.busy_seeds else text


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, (bool, np.bool_)):
        return "yes" if v else ""
    if isinstance(v, (float, np.floating)):
        return f"{v:.{digits}g}" if abs(v) >= 1 or v == 0 else f"{v:.3f}"
    return str(v)


def _pp(v: Any, signed: bool = False) -> str:
    """Percent / percentage points with two decimals."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:+.2f}" if signed else f"{v:.2f}"


def _hours(seconds: float | None) -> str:
    if seconds is None or (isinstance(seconds, float) and math.isnan(seconds)):
        return "-"
    return f"{seconds / 3600:.2f} h ({seconds:.0f} s)"


def write_summary(table: pd.DataFrame, protocol_dir: str | Path) -> dict[str, Path]:
    """Writes ``summary.csv``, ``summary.md`` and the plots next to them.

    Args:
        table: ``summarize(protocol_dir)``.
        protocol_dir: ``<root>/<protocol>``.

    Returns:
        ``{"csv", "md", "miou_vs_gflops", "miou_vs_images_per_second", "tokens_per_block"}`` -> path, and
        ``"learning_curves"`` when runs logged ``val_miou``.
    """
    from tabulate import tabulate

    protocol_dir = Path(protocol_dir)
    proto = read_protocol(protocol_dir) or {}
    out = {"csv": protocol_dir / "summary.csv", "md": protocol_dir / "summary.md"}
    csv = table.copy()
    csv["tokens_per_block"] = [json.dumps([round(v, 2) for v in t]) if isinstance(t, list) else "" for t in
                               csv["tokens_per_block"]]
    atomic_write(out["csv"], csv.to_csv(index=False, float_format="%.6g"))
    out.update(plot_summary(table, protocol_dir, title=protocol_dir.name))

    runs = protocol_dir / "runs"
    curves = plot_learning_curves(runs, protocol_dir / "learning_curves.png",
                                  int(proto.get("identity", {}).get("baseline_epochs") or 0), protocol_dir.name)
    if curves is not None:
        out["learning_curves"] = curves
    hw = _hardware(runs)
    ident = proto.get("identity", {})
    invocations = proto.get("invocations", [])
    reference = proto.get("reference", "none")
    headers = ["cell", "method", "mode", "budget", "mIoU (%)", "±", "Δ mIoU (pp)", "paired Δ (pp)", "vs spread",
               "GFLOPs", "GFLOPs ratio", "speedup", "efficiency", "timed", "token red.", "halted", "device", "prec.",
               "batch", "seeds", "front"]
    rows = []
    for r in table.itertuples(index=False):
        front = "".join(s for s, on in (("G", r.pareto_gflops), ("S", r.pareto_images_per_second)) if on)
        rows.append([r.cell, r.method, r.mode, r.budget, _pp(r.miou_pct), _pp(r.miou_spread_pct),
                     _pp(r.delta_miou_pct, signed=True), *_paired_text(r, reference), _fmt(r.gflops),
                     _fmt(r.gflops_ratio), _fmt(r.speedup), _fmt(r.efficiency), _timed_text(r),
                     _fmt(r.token_reduction),
                     _fmt(r.halted_fraction), r.device, r.precision, _fmt(r.batch_size), r.seeds, front])
    lines = [f"# Ablation grid `{protocol_dir.name}`", ""]
    if ident:
        lines += [f"Protocol overrides: `{' '.join(ident.get('overrides', []) + ident.get('extra_overrides', []))}`. "
                  f"The unreduced `baseline` trains {ident.get('baseline_epochs')} epochs from scratch; every "
                  f"finetune cell (the unreduced `none` included) trains {ident.get('finetune_epochs')} more epochs "
                  "from the baseline checkpoint (`init_from`, reducer parameters from their init"
                  + (f"; fine-tune overrides `{' '.join(ident['finetune_overrides'])}`"
                     if ident.get("finetune_overrides") else "")
                  + "), so they all see the same steps; off_the_shelf cells evaluate the baseline checkpoint with "
                  "the reducer on.", ""]
    if invocations:
        lines += ["Commands (from protocol.json):", ""]
        lines += [f"- `{inv.get('command')}` ({inv.get('started_utc')}, {_hours(inv.get('wall_seconds'))})"
                  for inv in invocations]
        lines += [""]
    train_total = table["train_seconds"].sum(min_count=1)
    lines += [f"Hardware: {hw}.", "",
              f"Wall time: training {_hours(train_total)} summed over runs (metrics.json train_seconds); "
              f"all `tokred ablate` invocations {_hours(proto.get('total_wall_seconds'))} (protocol.json).", "",
              tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True), "",
              "mIoU is the median over seeds (± = max - min over seeds). Δ mIoU is the difference of medians "
              f"against the `{reference}` cell; paired Δ is the median over seeds k of (this cell's seed k - "
              f"`{reference}` seed k) [min, max] over the paired seeds. vs spread: `exceeds spread` only when at "
              f"least 2 seeds pair, every paired Δ has the same sign and |paired Δ| is larger than the `{reference}` "
              "cell's spread (±); `within spread` differences are seed noise: rows keep the grid's order and are "
              "not ranked on them. Absolute images/s depend on the machine's load when each run was measured, so "
              "they are only in summary.csv; speedup and efficiency are measured side by side with the unreduced "
              "model in the same process, and a run whose unreduced model timed against itself is off 1 by more "
              f"than {SELF_CHECK_TOLERANCE:g} (a busy machine) is left out of them: timed = seeds whose timing "
              "counts / seeds. GFLOPs per image (fvcore, one multiply-add = one flop, mean "
              "over eval images); GFLOPs ratio = unreduced / this; speedup = im/s over the unreduced model measured "
              "side by side in the same process; efficiency = speedup / GFLOPs ratio; token red. = N0 / tokens "
              "entering block 1; halted = fraction of tokens that left before the last block. front: on the Pareto "
              "front of mIoU vs GFLOPs (G) or vs im/s (S), over finetune cells (medians, not "
              "tested against the spread).",
              "",
              "![mIoU vs GFLOPs](miou_vs_gflops.png)", "", "![mIoU vs im/s](miou_vs_images_per_second.png)", "",
              "![tokens per block](tokens_per_block.png)", ""]
    if curves is not None:
        lines += ["Learning curves (val mIoU every `train.val_every` epochs, training loss per epoch; the "
                  "fine-tuned `none` cell after the baseline):", "", "![learning curves](learning_curves.png)", ""]
    atomic_write(out["md"], "\n".join(lines))
    return out


def _hardware(runs: Path) -> str:
    """Devices, precision and versions the runs report (from their metrics.json provenance)."""
    from tokred.results import load_results

    try:
        df = load_results(runs)
    except FileNotFoundError:
        return "-"
    parts = []
    for col, label in (("provenance.gpu_name", "GPU"), ("provenance.cpu_name", "CPU"), ("device", "measured on"),
                       ("versions.torch", "torch"), ("provenance.hostname", "host")):
        v = _join(_column(df, col))
        if v:
            parts.append(f"{label} {v}")
    return "; ".join(parts) or "-"
