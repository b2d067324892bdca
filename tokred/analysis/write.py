"""Writes the analysis folder: tables, figures, ``summary.json`` and ``report.md`` (``tokred.jobs.analyze``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import DictConfig

from tokred.analysis import figures
from tokred.analysis.report import Report, dumps, write_summary, write_table

__all__ = ["write_outputs"]


def _hardware(reducers: dict[str, str]) -> dict[str, Any]:
    from tokred.measure.provenance import provenance

    try:
        return provenance(reducers)
    except (KeyError, ValueError):  # an unregistered name: describe the machine without reducer sources
        return provenance()


def _pct(v: Any) -> str:
    return "n/a" if v is None or v != v else f"{100 * float(v):.1f}%"


def write_outputs(cfg: DictConfig, opts: dict[str, Any], folder: Path, r: dict[str, Any], method: str, split: str,
                  command: str, seconds: float) -> None:
    """Writes every table, figure and the report of one analysis into ``folder``."""
    acc = r["acc"]
    depth, n0 = r["depth"], r["n0"]
    pruner, merger = r["pruner"], r["merger"]
    fig_dir = folder / "figures"
    hw = _hardware({"merger": str(cfg.merger.name), "pruner": str(cfg.pruner.name)})
    gfl, base = float(r["per_image"]["gflops_analytic"].mean()), float(r["unreduced_gflops_analytic"])
    m = r["measured"]
    measured = "" if m is None else f"; fvcore whole model {m['gflops']:.3f} GFLOPs on {m['num_images']} images"
    rep = Report(f"Where do tokens go: {method} on {r['dataset']} / {split}")
    head = acc.summary()
    tok = r["accounting"]
    rep.bullets([
        f"command: `{command}`",
        f"checkpoint: `{cfg.checkpoint}`; model {cfg.model.name}, decoder {cfg.decoder.name}, input "
        f"{r['crop'][0]}x{r['crop'][1]} px ({n0} patches), {acc.num_images} images, device {r['device']}",
        f"hardware: {hw.get('cpu_name')}; GPU {hw.get('gpu_name') or 'none'}; {hw.get('platform')}; torch "
        f"{hw.get('versions', {}).get('torch')}; git {hw.get('git_commit') or 'n/a'}"
        f"{' (dirty)' if hw.get('git_dirty') else ''}; {hw.get('created_utc')}; analysis took {seconds:.0f} s",
        f"reducers: merger {dumps(merger.extra_config()) if merger is not None else 'none'}; pruner "
        f"{dumps(pruner.extra_config()) if pruner is not None else 'none'}",
        f"headline: mIoU {_pct(head['miou'])} (at the input resolution), token reduction after embedding "
        f"{tok['token_reduction']:.2f}x, halted tokens {_pct(tok['halted_fraction'])}, halted patches "
        f"{_pct(tok['halted_patch_fraction'])}, GFLOPs per image (analytic encoder) {gfl:.3f} against "
        f"{base:.3f} unreduced ({base / gfl:.2f}x fewer){measured}",
    ])
    if r["skipped"] or merger is None or pruner is None:
        notes = list(r["skipped"])
        if pruner is None:
            notes += ["a) halting per exit and b) calibration: no early exit in this model"]
        if merger is None:
            notes += ["c) superpatches: no embedding-time merger (dCTS/CTS) in this model"]
        rep.section("Skipped sections", "\n".join(f"- {n}" for n in notes))
    summary: dict[str, Any] = {"command": command, "method": method, "split": split, "dataset": r["dataset"],
                               "checkpoint": str(cfg.checkpoint), **head, "token_accounting": tok,
                               "gflops_analytic": gfl, "unreduced_gflops_analytic": base,
                               "provenance": hw, "seconds": seconds}

    # a) halting per exit and class
    if pruner is not None:
        ex = acc.exits_summary()
        by_class = acc.exits_by_class()
        write_table(folder, "exits", ex)
        write_table(folder, "exits_by_class", by_class)
        iou = acc.iou_halted_vs_live()
        write_table(folder, "iou_halted_vs_live", iou)
        summary["exits"] = ex.to_dict(orient="records")
        rep.section("a) Halting per exit and class",
                    f"Exits after blocks {pruner.exit_blocks} (0-based), p0 = {pruner.threshold}, top_k = "
                    f"{pruner.top_k}. Cells are compared with the label downsampled to the patch grid by "
                    "**majority** of the non-ignored pixels of each patch; *halted* cells carry the exit head's "
                    "prediction, *continuing* cells are those still live after the exit (final prediction).")
        if tok["halted_fraction"] == 0:
            rep.text(f"**Nothing halted** at p0 = {pruner.threshold}: the exit heads never reach that confidence "
                     "on this split (see the calibration in b) and the p0 sweep in e) for thresholds that halt).")
        rep.table(ex, "exits")
        share = by_class[by_class["class"] != "(no label)"].pivot_table(index="class", columns="fate",
                                                                        values="pixel_share", sort=False)
        rep.text("Share of each class's pixels by fate (`exits_by_class.csv` also holds tokens by predicted class "
                 "and by label, cells and pixels):")
        rep.table(share.reset_index(), "exits_by_class", floatfmt=".3f")
        rep.text("IoU (cells) per class of the halted, continuing and live-to-the-end cells:")
        rep.table(iou, "iou_halted_vs_live", floatfmt=".3f")
        rep.figure(str(figures.halted_by_class_figure(by_class, depth, fig_dir / "halted_by_class.png")
                       .relative_to(folder)), "share of each class's pixels halted at each exit")

        # b) calibration
        bins, cal = acc.calibration()
        write_table(folder, "calibration_bins", bins)
        write_table(folder, "calibration", cal)
        summary["calibration"] = cal.to_dict(orient="records")
        how = ("exact (linear heads: the head applied to a cell equals the head applied to its token)"
               if r["exact_calibration"] else "approximate (ATM heads attend over cells instead of tokens)")
        rep.section("b) Exit-head calibration",
                    f"Confidence = max softmax probability of the exit head on every cell still live at that exit "
                    f"(labelled cells), {int(opts['bins'])} equal-width bins; ECE = sum over bins of "
                    f"count share x |accuracy - confidence|. The early exit exposes only the logits of the tokens "
                    f"it halts, so the analysis taps the exit blocks' outputs and runs each head on the restored "
                    f"cells: {how}. `halted_cells_above_p0` checks that every halted cell's recomputed confidence "
                    "is above p0 (1.0 expected for linear heads); `share_above_p0` is the share of live cells "
                    "above p0 (the top_k per class stay live).")
        if not cal.empty:
            rep.table(cal, "calibration")
            rep.figure(str(figures.reliability_figure(bins, cal, fig_dir / "reliability.png").relative_to(folder)),
                       "reliability diagram per exit head")

    # c) superpatches
    if merger is not None:
        sp, by_size = acc.superpatch_table(), acc.superpatch_by_size()
        write_table(folder, "superpatch_by_class", sp)
        write_table(folder, "superpatch_by_size", by_size)
        summary["superpatch_by_size"] = by_size.to_dict(orient="records")
        rep.section("c) Superpatches",
                    "Tokens after embedding by size (patches per token; dCTS: 1, 4, 16, 64 ...), read from the "
                    "final state (pruners never merge, so sizes are those after embedding). A token is *uniform* "
                    "when its non-ignored pixels hold one class; its class is the majority of its pixels.")
        rep.table(by_size, "superpatch_by_size")
        if not sp.empty:
            rep.figure(str(figures.superpatch_figure(sp, fig_dir / "superpatch_sizes.png").relative_to(folder)),
                       "share of each class's cells held by tokens of each size")

    # d) per image
    per_image = r["per_image"]
    write_table(folder, "per_image", per_image)
    dist = _summary_with(per_image)
    write_table(folder, "per_image_summary", dist)
    rep.section("d) Tokens and GFLOPs per image",
                "GFLOPs: `gflops_analytic` for every image from its tokens per block (tokred.measure.flops."
                "analytic_vit_gflops: blocks with prefix tokens plus the patch embedding of N0 patches; policy "
                "CNN, exit heads and decoder not included); `gflops_measured` = fvcore count of the whole model "
                f"on {0 if r['measured'] is None else r['measured']['num_images']} images spread over the split "
                "(tokred.measure.count_gflops).")
    keep = [m for m in dist["metric"] if not m.startswith("tokens_block_")] if not dist.empty else []
    rep.table(dist[dist["metric"].isin(keep)], "per_image_summary")
    blocks = dist[dist["metric"].str.startswith("tokens_block_")] if not dist.empty else dist
    if not blocks.empty:
        rep.text("Live patch tokens entering each block (0-based), over images:")
        rep.table(blocks[["metric", "mean", "std", "q0", "q0.05", "q0.5", "q0.95", "q1"]], floatfmt=".1f")
    if r["measured"] is not None:
        m = r["measured"]
        summary["gflops_measured"] = {k: m[k] for k in ("gflops", "gflops_std", "by_module", "num_images")}
        rep.text(f"fvcore: {m['gflops']:.3f} GFLOPs per image (std {m['gflops_std']:.3f}); by module "
                 f"{dumps(m['by_module'])}.")
    rep.figure(str(figures.tokens_figure(per_image, depth, n0, fig_dir / "tokens_per_block.png").relative_to(folder)),
               "live tokens entering each block and GFLOPs per image")

    # e) sweeps
    sections = []
    for name, table in r["sweeps"].items():
        write_table(folder, f"sweep_{name}", table)
        summary[f"sweep_{name}"] = table.to_dict(orient="records")
        sections.append((name, table, figures.sweep_figure(table, name, fig_dir / f"sweep_{name}.png")))
    if sections:
        rep.section("e) Training-free sweeps",
                    "Each value is one pass (no retraining) with the reducer's attribute set (`EarlyExit.threshold`"
                    " = p0; `DCTS.thresholds` = tau at every level). halted_fraction = tokens that left early / "
                    "tokens that entered; token_reduction = N0 / tokens entering block 0; token_blocks_ratio = "
                    "token-blocks processed / depth x N0; mIoU at the input resolution.")
        for name, table, png in sections:
            rep.table(table, f"sweep_{name}")
            rep.figure(str(png.relative_to(folder)), f"{name} sweep: mIoU vs GFLOPs and token shares")

    # f) gallery
    if r["gallery"]:
        rep.section("f) Gallery", "Token-fate pictures (tokred.viz.token_fate_figure) of images picked by rule: "
                    "most/least halting (share of cells halted), most/fewest tokens after embedding, worst error "
                    "of halted cells.")
        pictures: dict[Path, list[str]] = {}
        for rule, idx, name, path in r["gallery"]:
            pictures.setdefault(path, []).append(rule.replace("_", " "))
        for path, rules in pictures.items():
            idx, name = next((i, n) for _, i, n, p in r["gallery"] if p == path)
            rep.figure(str(path.relative_to(folder)), f"{', '.join(rules)}: image {idx} ({name})")
        summary["gallery"] = [{"rule": a, "image": b, "file": c, "png": str(d.relative_to(folder))}
                              for a, b, c, d in r["gallery"]]
    write_summary(folder, summary)
    from tokred.io import atomic_write_json

    atomic_write_json(folder / "tables" / "token_accounting.json", tok)
    rep.write(folder / "report.md")


def _summary_with(per_image: pd.DataFrame) -> pd.DataFrame:
    from tokred.analysis.accumulate import describe

    rows = [{"metric": c, **describe(per_image[c].dropna())} for c in per_image.columns
            if c not in ("image", "file") and pd.api.types.is_numeric_dtype(per_image[c])]
    return pd.DataFrame(rows)
