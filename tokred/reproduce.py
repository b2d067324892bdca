"""Reproduction table: tokred's ``metrics.json`` rows beside the published numbers they reproduce.

The experiments are ``configs/experiment/reproduce/*.yaml``; the published rows come from
Expedit-Segmenter's README tables (Liang et al., "Expediting Large-Scale Vision Transformer for Dense
Prediction without Fine-tuning", NeurIPS 2022; Segmenter ViT-L/16 mask with the official Segmenter weights,
ADE20K val) and the CTS paper (Lu, de Geus, Dubbelman, CVPR 2023). See ``baselines/PUBLISHED.md``.

Usage::

    python -m tokred.reproduce reproduce/tome_20=results/runs/<run>/metrics.json [more ...]
    python -m tokred.reproduce results/runs/*/metrics.json      # experiments recognised from the rows

Also ``segmenter_gflops``: the analytic cost used to choose ToMe's ``r`` for the GFLOPs budgets.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["PUBLISHED", "PublishedRow", "comparison_rows", "format_comparison", "identify", "main",
           "segmenter_gflops"]

_EXPEDIT = "Expedit-Segmenter README (NeurIPS 2022 code), ToMe table; Segmenter official weights, ADE20K val"


@dataclass(frozen=True)
class PublishedRow:
    """A published result and the tokred experiment that reproduces it.

    Attributes:
        experiment: config name under ``configs/experiment/`` (``reproduce/tome_20``).
        method: what the row measures.
        miou: published mIoU in %.
        gflops: published GFLOPs per image (None: not published).
        baseline_gflops: the unreduced model's published GFLOPs (for the cost ratio), or None.
        source: paper / table the numbers come from.
    """

    experiment: str
    method: str
    miou: float
    gflops: float | None
    baseline_gflops: float | None
    source: str


PUBLISHED: tuple[PublishedRow, ...] = (
    PublishedRow("reproduce/seg_l16_ade20k", "Segmenter ViT-L/16 mask", 51.82, 658.98, 658.98, _EXPEDIT),
    PublishedRow("reproduce/tome_20", "+ ToMe r%=20 (off the shelf)", 51.66, 516.23, 658.98, _EXPEDIT),
    PublishedRow("reproduce/tome_30", "+ ToMe r%=30 (off the shelf)", 50.96, 448.70, 658.98, _EXPEDIT),
    PublishedRow("reproduce/tome_50", "+ ToMe r%=50 (off the shelf)", 47.12, 321.29, 658.98, _EXPEDIT),
    PublishedRow("reproduce/cts_s16_ade20k", "Segmenter ViT-S/16 mask + CTS (30% fewer tokens)", 45.1, None, None,
                 "Lu et al., CVPR 2023 (ADE20K 512, baseline 45.0)"),
)


def segmenter_gflops(image_hw: tuple[int, int] = (640, 640), budgets: Sequence[int] = (), embed_dim: int = 1024,
                     depth: int = 24, num_heads: int = 16, num_classes: int = 150, decoder_layers: int = 2,
                     patch_size: int = 16, num_prefix_tokens: int = 1, mlp_ratio: float = 4.0) -> float:
    """Analytic GFLOPs (1e9 multiply-adds, fvcore's convention) of Segmenter with ToMe merging in its encoder.

    Per block with ``N`` tokens of width ``d``: qkv + projection ``4 N d^2`` and attention ``2 N^2 d`` on ``N``
    tokens; ToMe's bipartite similarity of head-averaged keys ``(M/2)^2 d / num_heads`` (``M = N - prefix``);
    then ``r`` merged away before the MLP ``2 mlp_ratio (N - r) d^2`` (ToMe merges between attention and MLP,
    Bolya et al. 2023, Sec. 3). Plus the patch embedding and the unreduced mask-transformer decoder on the full grid:
    input projection, its blocks over ``N0 + K`` tokens, the patch/class projections and the masks. Norms,
    softmax, the final upsampling and other elementwise ops are left out: the sum equals
    ``tokred.measure.count_gflops``' conv + linear + matmul + attention operators.

    Args:
        image_hw: ``(H, W)`` px of one window.
        budgets: tokens merged per block (ToMe's ``r_i``), empty for the unreduced model.
        embed_dim / depth / num_heads / mlp_ratio: the encoder's; the decoder has width ``embed_dim`` and
            MLP ratio 4 (Segmenter).
        num_classes: ``K``.

    Returns:
        GFLOPs of one window.

    Raises:
        ValueError: more budgets than blocks.
    """
    if len(budgets) > depth:
        raise ValueError(f"{len(budgets)} budgets for a depth-{depth} encoder; give at most one per block")
    d = embed_dim
    n0 = (image_hw[0] // patch_size) * (image_hw[1] // patch_size)
    n = n0 + num_prefix_tokens
    flops = n0 * 3 * patch_size * patch_size * d
    for i in range(depth):
        m = n - num_prefix_tokens
        r = min(int(budgets[i]) if i < len(budgets) else 0, m // 2)
        flops += 4 * n * d * d + 2 * n * n * d
        if r:
            flops += (m // 2) * (m - m // 2) * (d // num_heads)
        n -= r
        flops += int(2 * mlp_ratio * n * d * d)
    t = n0 + num_classes
    flops += n0 * d * d + decoder_layers * (12 * t * d * d + 2 * t * t * d)  # input projection, blocks
    flops += t * d * d + n0 * num_classes * d  # patch and class projections, masks
    return flops / 1e9


def identify(metrics: Mapping[str, Any]) -> str | None:
    """The reproduce experiment a metrics row belongs to (model, dataset, crop, merger, r), or None."""
    merger = metrics.get("merger") or {}
    name, r = merger.get("name", "none"), merger.get("r")
    if metrics.get("dataset") != "ade20k":
        return None
    if metrics.get("model") == "vit_large":
        if name == "none" and (metrics.get("pruner") or {}).get("name", "none") == "none":
            return "reproduce/seg_l16_ade20k"
        if name == "tome":
            return {28: "reproduce/tome_20", 42: "reproduce/tome_30", 52: "reproduce/tome_50"}.get(r)
    if metrics.get("model") == "vit_small" and name == "cts":
        return "reproduce/cts_s16_ade20k"
    return None


def comparison_rows(runs: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One dict per published row with tokred's numbers beside it (None where not run).

    Args:
        runs: experiment name -> metrics.json dict (``miou`` as a fraction in [0, 1], ``gflops``, optional
            ``gflops_detail.baseline_gflops``; see ``tokred.results``). tokred's mIoU is reported in %.

    Raises:
        ValueError: a run keyed by an experiment that has no published row (lists the valid ones).
    """
    known = {p.experiment for p in PUBLISHED}
    unknown = sorted(set(runs) - known)
    if unknown:
        raise ValueError(f"no published row for {unknown}; valid experiments: {', '.join(sorted(known))}")
    base_run = runs.get("reproduce/seg_l16_ade20k") or {}
    rows = []
    for p in PUBLISHED:
        run = runs.get(p.experiment)
        miou = None if run is None or run.get("miou") is None else 100.0 * float(run["miou"])  # fraction -> %
        gflops = None if run is None else run.get("gflops")
        base = (run or {}).get("gflops_detail", {}) or {}
        base_gflops = base.get("baseline_gflops") or base_run.get("gflops")
        rows.append({
            "experiment": p.experiment, "method": p.method, "published_miou": p.miou, "miou": miou,
            "delta_miou": None if miou is None else miou - p.miou,
            "published_gflops": p.gflops, "gflops": gflops,
            "published_ratio": None if p.gflops is None or not p.baseline_gflops else p.gflops / p.baseline_gflops,
            "ratio": None if gflops is None or not base_gflops else gflops / base_gflops,
            "source": p.source,
        })
    return rows


def _fmt(v: Any, spec: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return format(v, spec)


def format_comparison(runs: Mapping[str, Mapping[str, Any]], markdown: bool = True) -> str:
    """The comparison as a Markdown table (or aligned text): published vs tokred mIoU, GFLOPs and cost ratio.

    Rows without a tokred run say "not run here". Raises as ``comparison_rows``.
    """
    head = ["experiment", "method", "mIoU pub.", "mIoU tokred", "delta", "GFLOPs pub.", "GFLOPs tokred",
            "cost pub.", "cost tokred", "source"]
    body = []
    for r in comparison_rows(runs):
        ran = r["miou"] is not None
        body.append([r["experiment"], r["method"], _fmt(r["published_miou"], ".2f"),
                     _fmt(r["miou"], ".2f") if ran else "not run here", _fmt(r["delta_miou"], "+.2f"),
                     _fmt(r["published_gflops"], ".1f"), _fmt(r["gflops"], ".1f"),
                     _fmt(r["published_ratio"], ".1%"), _fmt(r["ratio"], ".1%"), r["source"]])
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(row) + " |" for row in body]
        return "\n".join(lines)
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in [head, *body])


def _load(path: str) -> dict[str, Any]:
    p = Path(path)
    if p.is_dir():
        p = p / "metrics.json"
    if not p.is_file():
        raise FileNotFoundError(f"{p} does not exist; give a run directory or its metrics.json")
    with open(p, encoding="utf-8") as f:
        return json.load(f)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: ``[EXPERIMENT=]RUN_DIR_OR_METRICS_JSON ...`` -> the comparison table on stdout."""
    parser = argparse.ArgumentParser(prog="python -m tokred.reproduce", description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="*", help="[reproduce/<name>=]results/runs/<run>[/metrics.json]")
    parser.add_argument("--text", action="store_true", help="aligned text instead of Markdown")
    args = parser.parse_args(argv)
    runs: dict[str, dict[str, Any]] = {}
    for item in args.runs:
        name, sep, path = item.partition("=")
        if not sep:
            name, path = "", item
        metrics = _load(path)
        name = name or identify(metrics) or ""
        if not name:
            parser.error(f"{path}: not recognised as a reproduce experiment; write reproduce/<name>={path}")
        runs[name] = metrics
    print(format_comparison(runs, markdown=not args.text))
    return 0


if __name__ == "__main__":
    sys.exit(main())
