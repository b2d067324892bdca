"""Errors before work: every split a run will read and every checkpoint it will open, checked up front.

:func:`preflight_run` is meant to run after the model is built and before the run directory exists or any
training step runs (``python -m tokred run`` does not call it yet: issue 15). It collects EVERY problem (an
empty split list, a missing, truncated or undecodable image, an image/label size mismatch, label values
outside the data set's classes, an unreadable checkpoint, a checkpoint of another model) and raises one
:class:`PreflightError` that names each file and its fix,
so a failure writes nothing and the corrected rerun keeps the run name.

Cost: every image and label is decoded in full (``PIL.Image.load``, so a truncated file is caught, which
``verify()`` would miss). Pairs already validated are remembered in ``results/cache/preflight/`` keyed by
(path, size, mtime_ns) of both files and the check's parameters (label table, classes, ignore index), so
ADE20K's 25k pairs are decoded once. ``preflight.check``: ``full`` (default), ``list`` (listing and existence
only) or ``off`` (no data checks; checkpoints are still opened).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig

__all__ = ["CHECKS", "PREFLIGHT_CACHE_DIR", "PreflightError", "preflight_run", "validate_pairs"]

log = logging.getLogger(__name__)

#: Values of ``preflight.check``.
CHECKS: tuple[str, ...] = ("full", "list", "off")
#: Folder of the caches of validated image/label pairs (one JSON file per data set and check parameters).
PREFLIGHT_CACHE_DIR = Path("results/cache/preflight")
_VERSION = 1  # bump when the per-pair check changes: old cache entries are then ignored
_PROGRESS_MIN = 200  # show a progress bar from this many pairs to decode


class PreflightError(ValueError):
    """A run would fail on its data or checkpoints; ``problems`` lists each one (file and fix)."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"preflight found {len(self.problems)} problem(s) before any work; nothing was written "
                         f"(no run folder):\n{lines}")


# ---------------------------------------------------------------------------------------------- data
def _stat(path: Path) -> tuple[int, int]:
    st = path.stat()
    return int(st.st_size), int(st.st_mtime_ns)


def _check_pair(image: Path, label: Path, lut: np.ndarray, num_classes: int, ignore_index: int) -> list[str]:
    """Problems of one pair: undecodable files, size mismatch, label values outside the classes."""
    from PIL import Image, ImageFile

    ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file must fail, never decode to grey
    problems = []
    size = None
    try:
        with Image.open(image) as im:
            im.load()
            size = (im.height, im.width)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        problems.append(f"image {image} cannot be decoded ({err}); re-export or replace it (it is truncated or "
                        "not an image), or remove its line from the split list")
    try:
        with Image.open(label) as im:
            im.load()
            raw = np.asarray(im)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        problems.append(f"label {label} cannot be decoded ({err}); re-export or replace it")
        return problems
    if raw.ndim != 2:
        problems.append(f"label {label} has shape {list(raw.shape)}, not a single-channel [H, W] map; save labels "
                        "as 8-bit grayscale or palette PNG")
        return problems
    if size is not None and size != raw.shape:
        problems.append(f"image {image} is {size[0]}x{size[1]} px but label {label} is {raw.shape[0]}x"
                        f"{raw.shape[1]} px (HxW); the pair must have the same size")
    values = np.unique(raw).astype(np.int64)
    stored_ok = (values >= 0) & (values < 256)
    mapped = np.full(values.shape, -1, dtype=np.int64)
    mapped[stored_ok] = lut[values[stored_ok]]
    bad = values[(mapped < 0) | ((mapped >= num_classes) & (mapped != ignore_index))]
    if bad.size:
        problems.append(f"label {label} holds values {bad.tolist()[:20]} outside the data set's classes "
                        f"(train ids 0..{num_classes - 1}, ignore {ignore_index} after its label mapping); fix the "
                        "label encoding or choose the matching dataset= / dataset.num_classes")
    return problems


def _cache_file(cache_dir: Path, params: Mapping[str, Any]) -> Path:
    digest = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir / f"{params['dataset']}_{digest}.json"


def _read_cache(path: Path, params: Mapping[str, Any]) -> dict[str, list[int]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("params") != params or not isinstance(data.get("ok"), dict):
        return {}
    return data["ok"]


def validate_pairs(pairs: Sequence[tuple[Path, Path]], lut: np.ndarray, num_classes: int, ignore_index: int,
                   dataset: str, cache_dir: str | Path | None = PREFLIGHT_CACHE_DIR) -> tuple[list[str], int]:
    """Decodes and checks every ``(image, label)`` pair not already validated (see the module docstring).

    Args:
        pairs: ``(image path, label path)`` of one or more splits.
        lut: ``int16 [256]`` stored label value -> train id (-1 = invalid), the data set's mapping.
        num_classes: ``K``; mapped labels must be in ``0 .. K-1`` or ``ignore_index``.
        ignore_index: label value excluded from loss and mIoU.
        dataset: data set name (names the cache file).
        cache_dir: folder of the cache of validated pairs; None: no cache.

    Returns:
        ``(problems, number of pairs taken from the cache)``; each problem names the file and its fix.
    """
    from tokred.io import atomic_write_json

    lut = np.asarray(lut, dtype=np.int64)
    params = {"dataset": dataset, "version": _VERSION, "lut": lut.tolist(), "num_classes": int(num_classes),
              "ignore_index": int(ignore_index)}
    cache_path = None if cache_dir is None else _cache_file(Path(cache_dir), params)
    ok = {} if cache_path is None else _read_cache(cache_path, params)
    todo, keys, cached = [], {}, 0
    for image, label in dict.fromkeys((Path(i), Path(lb)) for i, lb in pairs):
        key = f"{image.resolve()}\t{label.resolve()}"
        try:
            stamp = [*_stat(image), *_stat(label)]
        except OSError:
            stamp = None
        if stamp is not None and ok.get(key) == stamp:
            cached += 1
            continue
        todo.append((image, label))
        keys[(image, label)] = (key, stamp)
    problems: list[str] = []
    if todo:
        from tqdm import tqdm

        workers = max(1, min(8, os.cpu_count() or 1))
        with ThreadPoolExecutor(workers) as pool, tqdm(total=len(todo), desc=f"preflight {dataset}", unit="pair",
                                                       disable=len(todo) < _PROGRESS_MIN, leave=False) as bar:
            results = pool.map(lambda p: _check_pair(p[0], p[1], lut, num_classes, ignore_index), todo)
            for pair, found in zip(todo, results):
                bar.update(1)
                problems.extend(found)
                key, stamp = keys[pair]
                if not found and stamp is not None:
                    ok[key] = stamp
        if cache_path is not None:
            try:
                atomic_write_json(cache_path, {"params": params, "ok": ok})
            except OSError as err:  # a read-only checkout: checking still works, only slower next time
                log.warning("preflight cache %s not written (%s)", cache_path, err)
    return problems, cached


def _splits_read(cfg: DictConfig) -> dict[str, int | None]:
    """``{split: max items or None (all)}`` of every split this run will read, in reading order."""
    from tokred.jobs.policy import fitting_slot, policy_path

    splits: dict[str, int | None] = {}
    found = fitting_slot(cfg)
    if found is not None and not (policy_path(cfg, found[1]).exists() and cfg.policy.reuse):
        splits[str(cfg.dataset.train_split)] = None  # the policy trains on the train split
        splits[str(cfg.policy.val_split)] = None
    if int(cfg.train.epochs) > 0 and not cfg.get("checkpoint"):
        splits[str(cfg.dataset.train_split)] = None
    split, max_items = str(cfg.eval.split), cfg.eval.get("max_items")
    if split not in splits:  # evaluation reads the first eval.max_items pairs only
        splits[split] = None if max_items is None else int(max_items)
    return splits


def _check_data(cfg: DictConfig, mode: str, cache_dir: Path | None, problems: list[str]) -> dict[str, Any]:
    from tokred.data.info import get_spec

    d = cfg.dataset
    spec = get_spec(str(d.name))
    root = Path(d.root).expanduser() if d.get("root") else spec.default_root
    if root is None:
        problems.append(f"dataset {spec.name!r} needs a root folder; pass dataset.root=/path/to/{spec.name}")
        return {}
    report: dict[str, Any] = {}
    pairs: list[tuple[Path, Path]] = []
    for split, max_items in _splits_read(cfg).items():
        try:
            files = spec.list_files(root, split)
        except (FileNotFoundError, ValueError) as err:
            msg = str(err)
            text = msg if (f"split {split!r}" in msg or str(root) in msg) else f"split {split!r} of {root}: {msg}"
            if text not in problems:  # a missing root is one problem, not one per split
                problems.append(text)
            continue
        if not files:
            problems.append(f"split {split!r} of {root} lists no images; add pairs or choose another split")
            continue
        files = files if max_items is None else files[:max_items]
        report[split] = {"root": str(root), "files": len(files)}
        pairs.extend(files)
    if mode == "full" and pairs:
        found, cached = validate_pairs(pairs, spec.lut_array(), int(d.num_classes), int(d.ignore_index), spec.name,
                                       cache_dir)
        problems.extend(found)
        report["decoded"] = len(set(pairs)) - cached
        report["cached"] = cached
    return report


# ---------------------------------------------------------------------------------------------- checkpoints
def _check_checkpoints(cfg: DictConfig, model, run_dir: Path | None, problems: list[str]) -> dict[str, str]:
    from tokred.engine.checkpoint import load_checkpoint
    from tokred.models.checkpoints import check_segmentation_checkpoint, read_checkpoint, summarise_mismatch

    own = model.state_dict()
    opened: dict[str, str] = {}

    def attempt(what: str, path: Any, check) -> None:
        opened[what] = str(path)
        try:
            msg = check(Path(str(path)))
        except (FileNotFoundError, ValueError) as err:
            msg = f"{what}: {err}"
        if msg:
            problems.append(msg)

    def check_whole(p: Path) -> None:
        check_segmentation_checkpoint(model, p, str(cfg.get("checkpoint_format", "auto")))  # raises on a mismatch

    if cfg.get("checkpoint"):
        attempt("checkpoint", cfg.checkpoint, check_whole)
    if cfg.get("init_from") and not cfg.get("resume"):
        attempt("init_from", cfg.init_from,
                lambda p: summarise_mismatch(own, load_checkpoint(p)["model"], f"init_from={p}"))
    if cfg.get("resume"):
        from tokred.config import named_run_dir

        last = (run_dir or named_run_dir(cfg)) / "last.pth"
        attempt("resume", last, lambda p: summarise_mismatch(own, load_checkpoint(p)["model"],
                                                             f"resume=true: checkpoint {p}", allowed_missing=()))
    backbone = cfg.model.get("checkpoint")
    if backbone and Path(str(backbone)).suffix != ".npz":
        vit = {k[len("encoder.vit."):]: v for k, v in own.items() if k.startswith("encoder.vit.")}

        def check_backbone(p: Path) -> str | None:
            sd = read_checkpoint(p)
            if any(k.startswith("encoder.vit.") for k in sd):
                sd = {k[len("encoder.vit."):]: v for k, v in sd.items() if k.startswith("encoder.vit.")}
            sd = {k: v for k, v in sd.items() if k in vit and k != "pos_embed"}  # pos_embed is resampled
            return summarise_mismatch(vit, sd, f"model.checkpoint={p}", strict=False)

        attempt("model.checkpoint", backbone, check_backbone)
    for r in model.reducers:
        path = getattr(r, "policy_checkpoint", None)
        if not path:
            continue
        policy = getattr(r, "policy", None)
        theirs = policy.state_dict() if policy is not None else {}

        def check_policy(p: Path, theirs=theirs, kind=r.kind) -> str | None:
            sd = read_checkpoint(p)
            if any(k.startswith("heads.") for k in sd):  # a tokred policy; plain timm CNN weights fill the backbone
                return summarise_mismatch(theirs, sd, f"{kind}.policy_checkpoint={p}", strict=False)
            return None

        attempt(f"{r.kind}.policy_checkpoint", path, check_policy)
    return opened


def preflight_run(cfg: DictConfig, model, run_dir: str | Path | None = None,
                  cache_dir: str | Path | None = None) -> dict[str, Any]:
    """Lists and validates every split ``run`` will read and opens every checkpoint it will load.

    Call it after the model is built and before the run directory is created or any step runs; it writes
    nothing but the cache of validated pairs and never modifies ``model``.

    Args:
        cfg: the composed tokred config of the run (``preflight.check``: full | list | off, default full;
            ``preflight.cache_dir`` optional).
        model: the built ``Segmenter``; checkpoints are compared with its ``state_dict()`` (keys and shapes).
        run_dir: the run directory ``resume=true`` continues (default ``output_dir/<run name>``).
        cache_dir: folder of validated pairs (default ``preflight.cache_dir`` or ``results/cache/preflight``).

    Returns:
        What was checked: ``{"check": mode, "splits": {split: {"root", "files"}, "decoded": n, "cached": n},
        "checkpoints": {option: path}, "seconds": s}``.

    Raises:
        PreflightError: (a ``ValueError``) one message listing every problem, each naming the file and the fix.
        ValueError: an unknown ``preflight.check``.
    """
    start = time.perf_counter()
    pf = cfg.get("preflight") or {}
    mode = str(pf.get("check", "full"))
    if mode not in CHECKS:
        raise ValueError(f"preflight.check={mode!r} unknown; valid: {', '.join(CHECKS)}")
    if cache_dir is None:
        cache_dir = pf.get("cache_dir") or PREFLIGHT_CACHE_DIR
    problems: list[str] = []
    splits = {} if mode == "off" else _check_data(cfg, mode, Path(cache_dir), problems)
    opened = _check_checkpoints(cfg, model, None if run_dir is None else Path(run_dir), problems)
    if problems:
        raise PreflightError(problems)
    report = {"check": mode, "splits": splits, "checkpoints": opened,
              "seconds": round(time.perf_counter() - start, 3)}
    log.info("preflight (%s): %s; checkpoints %s (%.1f s)", mode,
             ", ".join(f"{k} {v['files']} pairs" for k, v in splits.items() if isinstance(v, dict)) or "no data",
             ", ".join(opened) or "none", report["seconds"])
    return report
