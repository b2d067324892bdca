"""``python -m tokred analyze checkpoint=RUN/last.pth merger=dcts pruner=early_exit [analyze.out=FOLDER]``.

"Where do tokens go?" (the STEP analysis) over a whole split (``eval.split``, ``eval.max_items``): one pass
with progress bar accumulates halting per exit and class, halted vs live accuracy, exit-head calibration,
superpatch sizes and uniformity, tokens and GFLOPs per image (``tokred.analysis.accumulate``); then the
training-free ``p0`` and ``tau`` sweeps (``tokred.analysis.sweeps``), fvcore GFLOPs on a few images and a
gallery of token-fate pictures picked by rule (``tokred.analysis.gallery``). Everything goes into a new folder,
``analyze.out`` or ``results/analysis/<method>_<split>`` (``-2``, ``-3`` ... when taken; never overwritten):
``report.md``, ``summary.json``, ``tables/*.csv|json``, ``figures/*.png``, ``gallery/*.png``.

Options (``analyze:`` in ``configs/config.yaml``): ``out``, ``output_dir``, ``batch_size`` (null:
``eval.batch_size``), ``p0_sweep`` / ``tau_sweep`` (lists; null: the defaults below, the configured value
added; the default p0 sweep also gets the reliability-bin edges at which about 75%, 50% and 25% of the first
exit's live cells are above the threshold; ``[]`` skips), ``sweep_max_items`` (images per sweep point; null:
the whole split), ``flops_images`` (images whose GFLOPs fvcore counts), ``gallery`` (rules), ``bins``
(reliability bins), ``progress``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf

__all__ = ["analyze_job", "DEFAULT_P0_SWEEP", "DEFAULT_TAU_SWEEP"]

log = logging.getLogger(__name__)

DEFAULT_P0_SWEEP = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)
DEFAULT_TAU_SWEEP = (0.1, 0.3, 0.5, 0.7, 0.9, 1.0)
_DEFAULTS: dict[str, Any] = {"out": None, "output_dir": "results/analysis", "batch_size": None, "p0_sweep": None,
                             "tau_sweep": None, "sweep_max_items": None, "flops_images": 4,
                             "gallery": ["most_halting", "least_halting", "most_tokens", "fewest_tokens",
                                         "worst_halted_error"], "bins": 10, "progress": True}


def _options(cfg: DictConfig) -> dict[str, Any]:
    given = cfg.get("analyze") or {}
    opts = dict(_DEFAULTS)
    opts.update(OmegaConf.to_container(given, resolve=True) if isinstance(given, DictConfig) else dict(given))
    return opts


def _command() -> str:
    try:
        from hydra.core.hydra_config import HydraConfig

        return " ".join(["python -m tokred analyze", *HydraConfig.get().overrides.task])
    except ValueError:  # not under Hydra (a library call)
        return "python -m tokred analyze (called from Python)"


def _with_configured(given: Any, default: tuple[float, ...], configured: float | None) -> list[float]:
    """The sweep values (``given``, else ``default``) plus the configured value, ascending; ``[]`` stays empty."""
    values = [float(v) for v in (default if given is None else given)]
    if values and configured is not None and float(configured) not in values:
        values.append(float(configured))
    return sorted(set(values))


def _reducers(seg: Any) -> tuple[Any, Any]:
    """``(embedding-time merger or None, early exit or None)`` of the built model."""
    from tokred.reducers.early_exit import EarlyExit

    merger = next((r for r in seg.reducers if getattr(r, "replaces_embedding", False)), None)
    pruner = next((r for r in seg.reducers if isinstance(r, EarlyExit)), None)
    return merger, pruner


def _check_inputs(cfg: DictConfig) -> None:
    from tokred.preflight import PreflightError

    if not cfg.checkpoint:
        raise PreflightError(["tokred analyze needs a trained model: checkpoint=RUN/last.pth (a tokred run's "
                              "checkpoint, or a released Segmenter/mmseg one with checkpoint_format)"])
    if not Path(str(cfg.checkpoint)).is_file():
        raise PreflightError([f"checkpoint={cfg.checkpoint}: no such file; pass the last.pth of a tokred run "
                              "(results/runs/<run>/last.pth)"])


def _dataset(cfg: DictConfig):
    from tokred.config import build_datasets
    from tokred.preflight import PreflightError

    try:
        return build_datasets(cfg, train=False)
    except (ValueError, KeyError, FileNotFoundError) as err:
        raise PreflightError([f"dataset={cfg.dataset.name} eval.split={cfg.eval.split}: {err}"]) from None


def analyze_job(cfg: DictConfig) -> Path:
    """Writes the analysis folder of ``checkpoint=`` on ``eval.split`` (see the module docstring).

    Returns:
        The folder written.

    Raises:
        PreflightError: no ``checkpoint=`` or no such file; an unknown split or unreadable data set.
        ConfigError: a model with neither an embedding-time merger (dCTS/CTS) nor an early exit.
        ValueError: a checkpoint that does not fit the model (``load_segmentation_checkpoint``'s message).
    """
    from tokred.config import build_model_from_config, method_name, resolve_device
    from tokred.io import eval_mode, new_run_dir
    from tokred.models.checkpoints import load_segmentation_checkpoint
    from tokred.structured import ConfigError

    t_start = time.time()
    opts = _options(cfg)
    _check_inputs(cfg)
    seg = build_model_from_config(cfg)
    merger, pruner = _reducers(seg)
    if merger is None and pruner is None:
        raise ConfigError(f"tokred analyze studies superpatches and early exits, but merger={cfg.merger.name} "
                          f"pruner={cfg.pruner.name} has neither; use merger=dcts and/or pruner=early_exit "
                          "(sections a, b, c, e and f would all be empty)")
    load_segmentation_checkpoint(seg, cfg.checkpoint, str(cfg.get("checkpoint_format", "auto")))
    ds = _dataset(cfg)
    device = resolve_device(cfg.device)
    seg = seg.to(device)
    method = method_name(cfg)
    split = str(cfg.eval.split)
    if opts["out"]:
        out = Path(str(opts["out"]))
        folder = new_run_dir(out.parent, out.name)
    else:
        folder = new_run_dir(Path(str(opts["output_dir"])), f"{method}_{split}")
    log.info("analysis of %s on %s/%s (%d images) -> %s", method, cfg.dataset.name, split, len(ds), folder)
    from tokred.analysis.write import write_outputs

    try:
        with eval_mode(seg), torch.no_grad():
            result = _analyze(cfg, opts, seg, merger, pruner, ds, device, folder)
        write_outputs(cfg, opts, folder, result, method=method, split=split, command=_command(),
                      seconds=time.time() - t_start)
    except BaseException:
        log.error("tokred analyze stopped; the partial output in %s has no report.md", folder)
        raise
    log.info("analysis written to %s", folder / "report.md")
    return folder


def _analyze(cfg: DictConfig, opts: dict[str, Any], seg: Any, merger: Any, pruner: Any, ds: Any,
             device: torch.device, folder: Path) -> dict[str, Any]:
    """The passes: main accumulation, fvcore GFLOPs subset, sweeps, gallery; returns everything to write."""
    from tqdm.auto import tqdm

    from tokred.analysis import FateAccumulator, exit_cell_logits, tap_blocks
    from tokred.analysis.calibration import exact_for
    from tokred.analysis.gallery import draw_gallery, pick_images
    from tokred.analysis.sweeps import iterate_split, sweep
    from tokred.data import dataset_info
    from tokred.measure.tokens import TokenAccounting
    from tokred.reducers.dcts import CTS, DCTS
    from tokred.viz import palette

    info = dataset_info(str(cfg.dataset.name))
    K = int(cfg.dataset.num_classes)
    names = list(info.class_names)[:K] if info.class_names else [str(k) for k in range(K)]
    enc = seg.encoder
    depth = int(enc.depth)
    mlp = getattr(getattr(enc.adapter.blocks[0], "mlp", None), "fc1", None)
    mlp_ratio = float(mlp.out_features) / enc.embed_dim if mlp is not None else 4.0
    dims = (int(enc.embed_dim), int(enc.num_prefix_tokens), int(enc.patch_size[0]), mlp_ratio)
    crop = tuple(int(v) for v in cfg.dataset.crop_size)
    bs = int(opts["batch_size"] or cfg.eval.batch_size)
    ignore = int(cfg.dataset.ignore_index)
    progress = bool(opts["progress"])
    halting = pruner is not None and pruner.halts
    exits = list(pruner.exit_blocks) if pruner is not None else []
    acc = FateAccumulator(K, depth, exits, names, ignore, superpatches=merger is not None,
                          threshold=pruner.threshold if pruner is not None else None, encoder_dims=dims,
                          bins=int(opts["bins"]))
    accounting = TokenAccounting()
    calibrate = pruner is not None
    workers = int(cfg.train.num_workers)
    batches = iterate_split(ds, bs, crop, device, num_workers=workers)
    total = -(-len(ds) // bs)
    with tap_blocks(enc, exits if calibrate else ()):
        for ids, files, images, labels in tqdm(batches, total=total, desc="analyze", disable=not progress):
            out = seg(images, labels)
            accounting.update(out.state, ids)
            lg = exit_cell_logits(pruner, out.state.taps) if calibrate else None
            acc.update(out, labels, ids, files, lg)
    per_image = acc.per_image()

    # fvcore GFLOPs on a few images spread over the split
    measured = None
    n_flops = int(opts["flops_images"] or 0)
    if n_flops > 0:
        from tokred.config import spread_indices
        from tokred.measure.flops import count_gflops

        idx = sorted({int(i) for i in spread_indices(len(ds), min(n_flops, len(ds)))})
        (_, _, ims, lbs), = list(iterate_split(ds, len(idx), crop, device, indices=idx))
        measured = count_gflops(seg, ims, lbs)
        per_image["gflops_measured"] = per_image["image"].map(dict(zip(idx, measured["per_image"])))

    # training-free sweeps
    def make_batches() -> Any:
        return iterate_split(ds, bs, crop, device, max_items=opts["sweep_max_items"], num_workers=workers)

    kw = {"num_classes": K, "ignore_index": ignore, "encoder_dims": dims, "depth": depth}
    sweeps: dict[str, pd.DataFrame] = {}
    skipped: list[str] = []
    if pruner is not None:
        values = _with_configured(opts["p0_sweep"], DEFAULT_P0_SWEEP, pruner.threshold)
        if opts["p0_sweep"] is None and exits:  # default sweep: add thresholds where the first exit's heads
            # make about 75%, 50%, 25% of the live cells candidates (barely trained heads rarely reach 0.5)
            values = sorted(set(values) | set(acc.calib[exits[0]].thresholds_for_shares()))
        if values:
            sweeps["p0"] = sweep(seg, pruner, "threshold", [(v, v) for v in values], make_batches, "p0", progress,
                                 **kw)
            sweeps["p0"]["configured"] = sweeps["p0"]["p0"] == float(pruner.threshold)
    else:
        skipped.append("p0 sweep (no early exit)")
    if isinstance(merger, DCTS) and not isinstance(merger, CTS):
        from tokred.policy.partition import normalize_thresholds

        taus = set(merger.thresholds.values())
        values = _with_configured(opts["tau_sweep"], DEFAULT_TAU_SWEEP, taus.pop() if len(taus) == 1 else None)
        if values:
            pairs = [(v, normalize_thresholds(v, merger.levels)) for v in values]
            sweeps["tau"] = sweep(seg, merger, "thresholds", pairs, make_batches, "tau", progress, **kw)
            sweeps["tau"]["configured"] = [normalize_thresholds(v, merger.levels) == merger.thresholds
                                           for v in sweeps["tau"]["tau"]]
    else:
        skipped.append("tau sweep (no dCTS merger)")

    # gallery
    picks = pick_images(per_image, list(opts["gallery"] or ()), halting=halting,
                        merging=merger is not None)
    mean, std = getattr(ds, "mean", (0.485, 0.456, 0.406)), getattr(ds, "std", (0.229, 0.224, 0.225))
    gallery = draw_gallery(seg, picks, lambda ix: iterate_split(ds, 1, crop, device, indices=ix),
                           folder / "gallery", palette(info.name, K), names, mean, std,
                           f"{'+'.join(r for r in (cfg.merger.name, cfg.pruner.name) if r != 'none')}",
                           per_image)
    from tokred.measure.flops import analytic_vit_gflops

    n0 = (crop[0] // dims[2]) * (crop[1] // dims[2])
    unreduced = analytic_vit_gflops(dims[0], depth, n0 + dims[1], mlp_ratio=mlp_ratio, patch_size=dims[2],
                                    num_patches=n0)
    return {"acc": acc, "per_image": per_image, "unreduced_gflops_analytic": unreduced,
            "accounting": accounting.summary(), "measured": measured,
            "sweeps": sweeps, "skipped": skipped, "gallery": gallery, "merger": merger, "pruner": pruner,
            "exact_calibration": pruner is not None and exact_for(pruner), "depth": depth,
            "n0": n0, "crop": crop, "dataset": str(cfg.dataset.name),
            "device": str(device)}
