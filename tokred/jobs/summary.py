"""The summary ``python -m tokred run`` prints: what happened to the tokens, what it cost, how sure the timing is.

One table with quality, token accounting (reduction at the embedding, halted share, token-blocks processed
relative to the unreduced model: the one figure that means the same for mergers and pruners), GFLOPs ratio
and the measured speedup with its spread over repeats, then warnings where the numbers should not be read
at face value: a speedup whose repeats spread widely, an unreduced model timed against itself that deviates
from 1 (a busy machine), a GFLOPs saving that the clock does not show.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

__all__ = ["SELF_CHECK_TOLERANCE", "busy_timing", "print_summary", "summary_warnings"]

#: |self-check speedup - 1| above this means the machine was too busy for the timings to be trusted.
SELF_CHECK_TOLERANCE = 0.1
_SPREAD_TOLERANCE = 0.25  # IQR / median of the per-repeat speedups above this: a wide spread


def _fmt(v: Any, pct: bool = False) -> str:
    if v is None:
        return "-"
    return f"{100 * v:.2f}" if pct else (f"{v:.3g}" if isinstance(v, float) else str(v))


def _speedup(m: dict[str, Any]) -> str:
    s = m.get("speedup")
    if s is None:
        return "-"
    iqr = (m.get("throughput_detail") or {}).get("speedup_iqr")
    return f"{s:.3g} (IQR {iqr[0]:.3g}-{iqr[1]:.3g})" if iqr else f"{s:.3g}"


def busy_timing(self_check: float | None) -> bool:
    """True when the unreduced model timed against itself (``throughput_detail.self_check_speedup``) is off 1 by
    more than ``SELF_CHECK_TOLERANCE``: the machine was busy and the run's im/s and speedup are not to be trusted.
    None or NaN (no self-check) is False."""
    return self_check is not None and abs(self_check - 1.0) > SELF_CHECK_TOLERANCE


def summary_warnings(m: dict[str, Any]) -> list[str]:
    """Plain-language warnings about a run's metrics (empty when everything reads as measured)."""
    out = []
    detail = m.get("throughput_detail") or {}
    check = detail.get("self_check_speedup")
    if busy_timing(check):
        out.append(f"the unreduced model timed against itself gave speedup {check:.3g} (should be 1): the machine "
                   "was busy; rerun the timing alone (python -m tokred bench ...) before reading im/s or speedup")
    s, iqr = m.get("speedup"), detail.get("speedup_iqr")
    if s and iqr and (iqr[1] - iqr[0]) / s > _SPREAD_TOLERANCE:
        out.append(f"the speedup's repeats spread widely (IQR {iqr[0]:.3g}-{iqr[1]:.3g} around {s:.3g}); raise "
                   "eval.bench_repeats or time it alone")
    ratio = m.get("gflops_ratio")
    if ratio and s and ratio > 1.2 and s < 1.0:
        out.append(f"{ratio:.3g}x fewer GFLOPs but no measured speedup ({s:.3g}): look at what the reducer itself "
                   "costs (gflops_detail by module: a policy CNN, exit heads) and at padding")
    return out


def print_summary(run_dir: Path, m: dict[str, Any], analyze_hint: str | None = None) -> None:
    """Writes the run's summary table, per-class IoU and warnings to stdout."""
    from tabulate import tabulate

    tokens = m.get("tokens_detail") or {}
    rows = [["method", m.get("method")], ["model", m.get("model", {}).get("name")],
            ["dataset / split", f"{m.get('dataset', {}).get('name')} / {m.get('eval_split')}"],
            ["images evaluated", m.get("num_images")],
            ["mIoU (%)", _fmt(m.get("miou"), True)], ["pixel acc (%)", _fmt(m.get("pixel_accuracy"), True)],
            ["tokens at embedding (N0 / tokens)", _fmt(m.get("token_reduction"))],
            ["halted before the last block (%)", _fmt(m.get("halted_fraction"), True)],
            ["token-blocks processed (% of none)", _fmt(m.get("token_block_fraction"), True)],
            ["tokens entering block 0 (mean)", _fmt((tokens.get("tokens_first_block") or {}).get("mean"))],
            ["GFLOPs / image", _fmt(m.get("gflops"))], ["GFLOPs ratio vs none", _fmt(m.get("gflops_ratio"))],
            ["im/s", _fmt(m.get("images_per_second"))], ["speedup vs none (measured)", _speedup(m)],
            ["device", m.get("device")]]
    sys.stdout.write(tabulate(rows, tablefmt="simple") + "\n")
    per_class = m.get("per_class_iou") or {}
    if per_class:
        sys.stdout.write(tabulate([[k, _fmt(v, True)] for k, v in per_class.items()], headers=["class", "IoU (%)"],
                                  tablefmt="simple") + "\n")
    for w in summary_warnings(m):
        sys.stdout.write(f"warning: {w}\n")
    sys.stdout.write(f"results: {run_dir}\n")
    if analyze_hint:
        sys.stdout.write(f"where the tokens went: {analyze_hint}\n")
