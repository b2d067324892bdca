"""metrics.json: the one results schema of tokred, its writer (``tokred.io``), and a loader into a pandas DataFrame.

A run directory holds one ``metrics.json`` whose top level has every key of ``METRICS_FIELDS`` (a value may be
None when a measurement was not taken, e.g. no throughput run). ``assemble_metrics`` builds such a dict from
the outputs of ``tokred.measure`` (``count_gflops``, ``benchmark``/``compare``, ``TokenAccounting.summary``,
``provenance``) plus the run's configuration and quality numbers; ``load_results`` collects many runs into a
table with one row per run.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from tokred.io import atomic_write

__all__ = ["METRICS_FIELDS", "METRICS_FILENAME", "assemble_metrics", "load_results", "validate_metrics",
           "write_metrics"]

METRICS_FILENAME = "metrics.json"

#: Required top-level keys of metrics.json (methods.md Sec. 8: every number with its device, precision, batch).
METRICS_FIELDS: tuple[str, ...] = (
    # quality
    "miou", "per_class_iou", "pixel_accuracy",
    # cost
    "gflops", "images_per_second", "batch_size", "precision", "device", "peak_memory_mib",
    # tokens
    "tokens_per_block", "token_reduction", "halted_fraction",
    # against the unreduced baseline
    "speedup", "efficiency",
    # configuration
    "model", "dataset", "crop_size", "decoder", "merger", "pruner", "schedule", "seed",
    # provenance
    "git_commit", "versions", "reducer_sources",
)

#: Fields whose value must be a mapping with a ``"name"`` (the component and its parameters).
_NAMED_FIELDS = ("merger", "pruner")


def validate_metrics(d: Mapping[str, Any]) -> list[str]:
    """Missing keys of a metrics dict.

    Args:
        d: a metrics dict (e.g. from ``assemble_metrics`` or a loaded metrics.json).

    Returns:
        Names missing from ``METRICS_FIELDS``, in schema order, plus ``"merger.name"`` / ``"pruner.name"`` when
        those are present but not a mapping with a ``name``; empty when the dict is complete.
    """
    missing = [k for k in METRICS_FIELDS if k not in d]
    for k in _NAMED_FIELDS:
        if k in d and not (isinstance(d[k], Mapping) and "name" in d[k]):
            missing.append(f"{k}.name")
    return missing


def _json_default(obj: Any) -> Any:
    """Converts numpy / torch scalars and arrays, paths and tuples-in-sets to JSON types."""
    if hasattr(obj, "tolist"):  # numpy arrays and scalars, torch tensors
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    raise TypeError(f"metrics value of type {type(obj).__name__} is not JSON-serialisable: {obj!r}")


def write_metrics(path: str | Path, metrics: Mapping[str, Any], overwrite: bool = False) -> Path:
    """Writes ``metrics`` as JSON through ``tokred.io.atomic_write`` (temporary file, then rename).

    A reader never sees a half-written file; without ``overwrite`` an existing file is never replaced, even by
    a concurrent writer (exclusive write).

    Args:
        path: the metrics.json path (parent directories are created).
        metrics: the dict to write (see ``METRICS_FIELDS``); numpy/torch scalars are converted.
        overwrite: replace an existing file.

    Returns:
        The path written.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is False (names the path).
        TypeError: a value that cannot be written as JSON.
    """
    text = json.dumps(dict(metrics), indent=2, default=_json_default) + "\n"  # TypeError before any file
    try:
        return atomic_write(path, text, exclusive=not overwrite)
    except FileExistsError as err:
        raise FileExistsError(f"{path} already exists; choose another run directory or pass overwrite=True") from err


def _get(d: Mapping[str, Any] | None, key: str) -> Any:
    return None if d is None else d.get(key)


def assemble_metrics(*, model: str, dataset: str, crop_size: Iterable[int], decoder: str | Mapping[str, Any],
                     merger: Mapping[str, Any], pruner: Mapping[str, Any], schedule: Mapping[str, Any] | None,
                     seed: int, quality: Mapping[str, Any], provenance: Mapping[str, Any],
                     gflops: Mapping[str, Any] | None = None, throughput: Mapping[str, Any] | None = None,
                     tokens: Mapping[str, Any] | None = None,
                     extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Builds a complete metrics dict from the measurement outputs and the run's configuration.

    Measurements that were not taken (``gflops``/``throughput``/``tokens`` None) give None values, so the
    schema always holds. The full measurement dicts are kept under ``gflops_detail``, ``throughput_detail``,
    ``tokens_detail`` and ``provenance``.

    Args:
        model / dataset: names (e.g. ``"vit_small"``, ``"ade20k"``).
        crop_size: ``(H, W)`` px.
        decoder: name, or ``{"name": ..., **params}``.
        merger / pruner: ``{"name": registry name, **constructor params}`` (e.g. with ``extra_config()``).
        schedule: ``{"name"/"kind": ..., **params}`` or None when the reducers take no schedule.
        seed: the run's seed.
        quality: ``miou``, ``per_class_iou``, ``pixel_accuracy`` (and any more quality keys, copied as is).
        provenance: ``tokred.measure.provenance(...)``.
        gflops: ``count_gflops`` / ``combine_gflops`` output.
        throughput: ``benchmark`` output, or ``compare`` output (then ``speedup``/``efficiency`` are filled and the
            reduced model's numbers are reported).
        tokens: ``TokenAccounting.summary()``.
        extra: more top-level keys (e.g. ``experiment``, ``run_name``), added last.

    Returns:
        A dict with every key of ``METRICS_FIELDS``.

    Raises:
        ValueError: ``quality`` lacks ``miou``, or merger/pruner is not a mapping with a ``name``.
    """
    if "miou" not in quality:
        raise ValueError(f"quality must contain 'miou' (and per_class_iou, pixel_accuracy); got {sorted(quality)}")
    for slot, spec in (("merger", merger), ("pruner", pruner)):
        if not (isinstance(spec, Mapping) and "name" in spec):
            raise ValueError(f"{slot} must be a mapping with 'name' and its parameters, got {spec!r}")
    bench = throughput
    paired = throughput is not None and "reduced" in throughput
    if paired:
        bench = throughput["reduced"]
    out: dict[str, Any] = {
        "miou": quality["miou"],
        "per_class_iou": quality.get("per_class_iou"),
        "pixel_accuracy": quality.get("pixel_accuracy"),
        **{k: v for k, v in quality.items() if k not in ("miou", "per_class_iou", "pixel_accuracy")},
        "gflops": _get(gflops, "gflops"),
        "images_per_second": _get(bench, "images_per_second"),
        "batch_size": _get(bench, "batch_size"),
        "precision": _get(bench, "precision"),
        "device": _get(bench, "device_name"),
        "peak_memory_mib": _get(bench, "peak_memory_mib"),
        "tokens_per_block": _get(tokens, "tokens_per_block"),
        "token_reduction": _get(tokens, "token_reduction"),
        "halted_fraction": _get(tokens, "halted_fraction"),
        "budgets": _get(tokens, "budgets"),
        "token_block_fraction": _get(tokens, "token_block_fraction"),
        "speedup": throughput["speedup"] if paired else None,
        "efficiency": throughput["efficiency"] if paired else None,
        "model": model,
        "dataset": dataset,
        "crop_size": [int(v) for v in crop_size],
        "decoder": dict(decoder) if isinstance(decoder, Mapping) else {"name": decoder},
        "merger": dict(merger),
        "pruner": dict(pruner),
        "schedule": None if schedule is None else dict(schedule),
        "seed": seed,
        "git_commit": provenance.get("git_commit"),
        "versions": provenance.get("versions"),
        "reducer_sources": provenance.get("reducer_sources"),
        "gflops_detail": None if gflops is None else dict(gflops),
        "throughput_detail": None if throughput is None else dict(throughput),
        "tokens_detail": None if tokens is None else dict(tokens),
        "provenance": dict(provenance),
    }
    out.update(extra or {})
    return out


def _find_metrics(paths: str | Path | Iterable[str | Path]) -> list[Path]:
    if isinstance(paths, (str, Path)):
        paths = [paths]
    found: list[Path] = []
    roots = [Path(p) for p in paths]
    for root in roots:
        if root.is_file():
            found.append(root)
        elif root.is_dir():
            found.extend(sorted(root.rglob(METRICS_FILENAME)))
        else:
            raise FileNotFoundError(f"results path {root} does not exist")
    unique = list(dict.fromkeys(p.resolve() for p in found))
    if not unique:
        raise FileNotFoundError(f"no {METRICS_FILENAME} found under {', '.join(str(r) for r in roots) or '(nothing)'}; "
                                "pass run directories (or their parents) written by `tokred run`")
    return unique


def load_results(paths_or_dirs: str | Path | Iterable[str | Path]) -> pd.DataFrame:
    """Loads every metrics.json found below the given directories (or given directly) into one table.

    Args:
        paths_or_dirs: a run directory, a parent of many, a metrics.json file, or an iterable of these.

    Returns:
        A DataFrame with one row per run, nested dicts flattened into dotted columns (``merger.name``,
        ``versions.torch``, ``gflops_detail.by_module.encoder``; lists stay in one cell), plus ``run_dir``
        (the directory holding the file), sorted by ``run_dir``.

    Raises:
        FileNotFoundError: a given path does not exist, or no metrics.json was found.
        ValueError: a metrics.json that is not valid JSON or not an object (names the file).
    """
    rows = []
    for f in _find_metrics(paths_or_dirs):
        try:
            data = json.loads(f.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(f"{f} is not valid JSON ({err}); delete or rewrite it") from err
        if not isinstance(data, dict):
            raise ValueError(f"{f} holds a {type(data).__name__}, expected a JSON object")
        data["run_dir"] = str(f.parent)
        rows.append(data)
    df = pd.json_normalize(rows, sep=".")
    return df.sort_values("run_dir", kind="stable").reset_index(drop=True)
