"""What a protocol's runs were made from, recorded in ``protocol.json`` and checked on every rerun.

Two fields join the protocol's identity (``grid.protocol_identity``):

* ``data``: a fingerprint of what the runs read, from :func:`data_fingerprint`: per split, the number of
  ``(image, label)`` pairs, a SHA-1 of their file names relative to the data root (``list_sha1``), the total
  bytes of the listed images, the pixel histogram of the label files (stored value -> pixels, before the data
  set's label mapping) and a SHA-1 of the decoded label maps (``labels_sha1``). ``dataset.root`` stays an
  execution key: the same data at another path gives the same fingerprint; other data is refused.
* ``code``: :func:`code_version`, tokred's version plus the git commit and dirty flag of its work tree (None
  outside git). Another version is refused unless the grid sets ``allow_code_change: true``; then
  ``code_history`` gains an entry, and each entry lists the runs that finished under it.

Label maps are decoded once: per-file results are cached in ``results/cache/fingerprint/`` keyed by the
resolved path, size and mtime_ns (as ``tokred.preflight`` does), so CamVid's 701 labels cost 1.7 s on 2 CPU
cores the first time and 0.15 s (a stat per file) afterwards. Records written before these fields existed are
upgraded on their first rerun (the runs already there are listed under ``code: null``, version unknown).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["FINGERPRINT_CACHE_DIR", "FINGERPRINT_VERSION", "attribute_runs", "check_provenance", "code_version",
           "data_fingerprint", "describe_code", "stamp_record"]

log = logging.getLogger(__name__)

#: Folder of the cache of per-label-file statistics.
FINGERPRINT_CACHE_DIR = Path("results/cache/fingerprint")
#: Bump when the fingerprint's definition changes (a record of another version is re-recorded, with a warning).
FINGERPRINT_VERSION = 1


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------------------------- code
def code_version() -> dict[str, Any]:
    """``{"tokred": version, "git_commit": sha or None, "git_dirty": bool or None}`` of the running code.

    The commit and dirty flag come from ``git`` in the tokred package's folder (``git rev-parse HEAD``); both are
    None without git or outside a work tree (an installed wheel). Never raises.
    """
    import tokred
    from tokred.measure.provenance import git_state

    state = git_state()
    return {"tokred": tokred.__version__, "git_commit": state["git_commit"], "git_dirty": state["git_dirty"]}


def describe_code(code: Mapping[str, Any] | None) -> str:
    """``tokred 0.1.0 at 81374e5 (dirty)`` (``unknown (recorded before code versions)`` for None)."""
    if not code:
        return "unknown (recorded before code versions)"
    commit = code.get("git_commit")
    where = f" at {str(commit)[:12]}" if commit else " (no git commit)"
    return f"tokred {code.get('tokred')}{where}{' (dirty)' if code.get('git_dirty') else ''}"


# ---------------------------------------------------------------------------------------------- data
def _label_stats(path: Path) -> dict[str, Any]:
    """``{"sha1": of the decoded map, "hist": {stored value: pixels}}`` of one label file."""
    from PIL import Image

    with Image.open(path) as im:
        raw = np.asarray(im)
    flat = raw.astype(np.int64, copy=False).ravel()
    counts = np.bincount(flat[flat >= 0], minlength=1)
    digest = hashlib.sha1(f"{raw.dtype.str}{list(raw.shape)}".encode())
    digest.update(np.ascontiguousarray(raw).tobytes())
    return {"sha1": digest.hexdigest(), "hist": {str(v): int(c) for v, c in enumerate(counts) if c}}


def _cached_label_stats(labels: Sequence[Path], cache_dir: Path | None, dataset: str) -> list[dict[str, Any]]:
    from tokred.io import atomic_write_json

    cache_path = None if cache_dir is None else Path(cache_dir) / f"{dataset}.json"
    cache: dict[str, Any] = {}
    if cache_path is not None:
        try:
            data = json.loads(cache_path.read_text(encoding="utf-8"))
            if isinstance(data, dict) and data.get("version") == FINGERPRINT_VERSION:
                cache = dict(data.get("files") or {})
        except (OSError, ValueError):
            cache = {}
    keys, out, todo = [], {}, []
    for p in labels:
        st = p.stat()
        key, stamp = str(p.resolve()), [int(st.st_size), int(st.st_mtime_ns)]
        keys.append(key)
        hit = cache.get(key)
        if isinstance(hit, dict) and hit.get("stamp") == stamp and key not in out:
            out[key] = hit
        elif key not in out:
            out[key] = {"stamp": stamp}
            todo.append((key, p))
    if todo:
        with ThreadPoolExecutor(max(1, min(4, os.cpu_count() or 1))) as pool:
            for (key, _), stats in zip(todo, pool.map(lambda kp: _label_stats(kp[1]), todo)):
                out[key].update(stats)
                cache[key] = out[key]
        if cache_path is not None:
            try:
                atomic_write_json(cache_path, {"version": FINGERPRINT_VERSION, "files": cache})
            except OSError as err:  # a read-only checkout: fingerprints still work, only slower next time
                log.warning("fingerprint cache %s not written (%s)", cache_path, err)
    return [out[k] for k in keys]


def _relative(path: Path, root: Path) -> str:
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return path.name


def data_fingerprint(dataset: str, root: str | Path | None, splits: Sequence[str],
                     cache_dir: str | Path | None = FINGERPRINT_CACHE_DIR) -> dict[str, Any]:
    """Fingerprint of the splits a grid reads (see the module docstring); independent of where ``root`` is.

    Args:
        dataset: registered data set name (``tokred.data.info.get_spec``).
        root: the data set folder; None: the spec's ``default_root`` (the embedded CamVid sample).
        splits: the split names read (training, evaluation, policy validation), e.g. ``["train", "test"]``.
        cache_dir: folder of the per-label-file cache; None: no cache.

    Returns:
        ``{"version", "dataset", "splits": {split: {"pairs", "list_sha1", "image_bytes", "label_pixels",
        "labels_sha1"}}}``.

    Raises:
        ValueError: unknown data set or split, no root.
        FileNotFoundError: a missing root, list file or listed file (the data set's own message).
        OSError: a label file that cannot be decoded.
    """
    from tokred.data.info import get_spec

    spec = get_spec(dataset)
    base = Path(root).expanduser() if root else spec.default_root
    if base is None:
        raise ValueError(f"dataset {spec.name!r} needs a root folder; pass dataset.root=/path/to/{spec.name}")
    out: dict[str, Any] = {}
    for split in dict.fromkeys(str(s) for s in splits):
        pairs = spec.list_files(base, split)
        names = "".join(f"{_relative(i, base)}\t{_relative(lb, base)}\n" for i, lb in pairs)
        stats = _cached_label_stats([Path(lb) for _, lb in pairs], None if cache_dir is None else Path(cache_dir),
                                    spec.name)
        hist: dict[int, int] = {}
        labels = hashlib.sha1()
        for s in stats:
            labels.update(s["sha1"].encode())
            for v, c in s["hist"].items():
                hist[int(v)] = hist.get(int(v), 0) + int(c)
        out[split] = {"pairs": len(pairs), "list_sha1": hashlib.sha1(names.encode()).hexdigest(),
                      "image_bytes": sum(Path(i).stat().st_size for i, _ in pairs),
                      "label_pixels": {str(v): hist[v] for v in sorted(hist)}, "labels_sha1": labels.hexdigest()}
    return {"version": FINGERPRINT_VERSION, "dataset": spec.name, "splits": dict(sorted(out.items()))}


def _data_diffs(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """What differs between two fingerprints, one phrase per split and kind (file list, images, labels)."""
    if old.get("dataset") != new.get("dataset"):
        return [f"data set: recorded {old.get('dataset')!r}, now {new.get('dataset')!r}"]
    diffs = []
    o_splits, n_splits = dict(old.get("splits") or {}), dict(new.get("splits") or {})
    for split in sorted(set(o_splits) | set(n_splits)):
        o, n = o_splits.get(split), n_splits.get(split)
        if o is None or n is None:
            diffs.append(f"split {split!r}: {'not read before' if o is None else 'no longer read'} (splits recorded "
                         f"{sorted(o_splits)}, now {sorted(n_splits)})")
            continue
        if o.get("list_sha1") != n.get("list_sha1"):  # other files: their images and labels differ too
            diffs.append(f"split {split!r} lists other files (recorded {o.get('pairs')} pairs, now {n.get('pairs')}; "
                         "file names differ)")
            continue
        if o.get("image_bytes") != n.get("image_bytes"):
            diffs.append(f"images of split {split!r} differ (recorded {o.get('image_bytes')} bytes in all, now "
                         f"{n.get('image_bytes')})")
        o_hist, n_hist = dict(o.get("label_pixels") or {}), dict(n.get("label_pixels") or {})
        if o_hist != n_hist:
            changed = [f"value {v}: {o_hist.get(v, 0)} -> {n_hist.get(v, 0)} px"
                       for v in sorted(set(o_hist) | set(n_hist), key=int) if o_hist.get(v) != n_hist.get(v)]
            diffs.append(f"label statistics of split {split!r} differ (pixels per label value, recorded -> now: "
                         f"{'; '.join(changed[:5])}{'; ...' if len(changed) > 5 else ''})")
        elif o.get("labels_sha1") != n.get("labels_sha1"):
            diffs.append(f"label statistics of split {split!r} differ (label maps changed, same pixel histogram)")
    return diffs


# ---------------------------------------------------------------------------------------------- record
def check_provenance(old: Mapping[str, Any] | None, data: Mapping[str, Any], code: Mapping[str, Any],
                     allow_code_change: bool, protocol_dir: Path) -> list[str]:
    """Refuses a rerun on other data or (without ``allow_code_change``) other code; writes nothing.

    Args:
        old: the recorded ``protocol.json`` (None: a new protocol folder).
        data: :func:`data_fingerprint` of this invocation.
        code: :func:`code_version` of this invocation.
        allow_code_change: accept another code version (recorded in ``code_history`` by :func:`stamp_record`).
        protocol_dir: the protocol folder, for the messages.

    Returns:
        Notes to log: the fields an old record lacks (recorded now), an accepted code change.

    Raises:
        ValueError: the data fingerprint differs (names each split and what differs) or the code version
            differs without ``allow_code_change`` (names both versions); each message gives the fix.
    """
    if old is None:
        return []
    notes = []
    where = protocol_dir / "protocol.json"
    old_data = old.get("data")
    if not old_data:
        notes.append(f"{where} predates data fingerprints; recording this data's now (dataset {data['dataset']}, "
                     f"splits {', '.join(data['splits'])})")
    elif old_data.get("version") != data.get("version"):
        log.warning("%s holds a data fingerprint of version %s (now %s); recording the new one", where,
                    old_data.get("version"), data.get("version"))
    else:
        diffs = _data_diffs(old_data, data)
        if diffs:
            raise ValueError(f"{protocol_dir} holds runs on other data: {'; '.join(diffs)}. The same data at another "
                             "dataset.root is accepted, other data would be mixed into the same summary; give these "
                             "runs a new protocol name (grid.protocol=...) or another output folder (grid.root=...)")
    if "code" not in old:
        notes.append(f"{where} predates code versions; recording {describe_code(code)} now (the runs already "
                     "there are listed under an unknown version in code_history)")
    elif _same_code(old["code"], code):
        pass
    elif not allow_code_change:
        raise ValueError(f"{protocol_dir} holds runs made with {describe_code(old['code'])}; this is "
                         f"{describe_code(code)}. Run the recorded code, or pass grid.allow_code_change=true to "
                         "continue under this version (recorded in protocol.json code_history), or give these runs "
                         "a new protocol name (grid.protocol=...) or another output folder (grid.root=...)")
    else:
        notes.append(f"code changed from {describe_code(old['code'])} to {describe_code(code)} "
                     "(grid.allow_code_change=true); recorded in code_history")
    return notes


def _same_code(a: Mapping[str, Any] | None, b: Mapping[str, Any] | None) -> bool:
    keys = ("tokred", "git_commit", "git_dirty")
    return a is not None and b is not None and all(a.get(k) == b.get(k) for k in keys)


def stamp_record(record: dict[str, Any], old: Mapping[str, Any] | None, data: Mapping[str, Any],
                 code: Mapping[str, Any], finished: Sequence[str]) -> dict[str, Any]:
    """Adds ``data``, ``code`` and ``code_history`` to a new protocol.json (``record``, modified in place).

    ``code_history`` is a list of ``{"code", "since_utc", "runs"}``, oldest first: a new entry when the code
    version differs from the last one; an old record without versions first gets ``{"code": null, "runs":
    <finished>}`` for the runs made under an unknown version. :func:`attribute_runs` fills in ``runs``.

    Args:
        record: the protocol.json about to be written.
        old: the recorded protocol.json, or None.
        data: :func:`data_fingerprint`.
        code: :func:`code_version`.
        finished: names of the run folders already holding results (``<cell>_seed<k>``).

    Returns:
        ``record``.
    """
    history = [dict(h) for h in (old or {}).get("code_history", [])]
    if old is not None and "code" not in old and not history:
        history.append({"code": None, "since_utc": None, "runs": sorted(finished)})
    if not history or not _same_code(history[-1].get("code"), code):
        history.append({"code": dict(code), "since_utc": _now(), "runs": []})
    record.update({"data": dict(data), "code": dict(code), "code_history": history})
    attribute_runs(record, finished)
    return record


def attribute_runs(record: dict[str, Any], finished: Sequence[str]) -> dict[str, Any]:
    """Lists each finished run not yet in ``record["code_history"]`` under its last (current) entry.

    Returns:
        ``record`` (modified in place; unchanged without a ``code_history``).
    """
    history = record.get("code_history") or []
    if not history:
        return record
    seen = {r for h in history for r in h.get("runs", [])}
    history[-1]["runs"] = [*history[-1].get("runs", []), *sorted(r for r in finished if r not in seen)]
    return record
