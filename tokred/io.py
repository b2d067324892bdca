"""Written once: the one atomic file writer, run-directory naming, eval-mode context and policy cache path.

Everything tokred writes (metrics.json, checkpoints, protocol.json, policy networks) goes through
``atomic_file``: the data lands in a temporary file in the target's folder and is renamed over the target,
so a reader never sees half a file. The exclusive variant refuses to replace an existing file, even one that
a concurrent writer created meanwhile. Importing this module does not import torch.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

__all__ = ["atomic_file", "atomic_write", "atomic_write_json", "eval_mode", "new_run_dir", "policy_cache_path",
           "unique_path"]

#: Folder of the trained dCTS/CTS policy networks that ``run`` and ``train-policy`` share.
POLICY_CACHE_DIR = Path("results/cache/policy")
_RUN_NAME = re.compile(r"[\w.+=,-]+")


def _exists_error(path: Path) -> FileExistsError:
    return FileExistsError(f"{path} already exists; choose another name or folder (tokred never overwrites "
                           "results), or delete the file")


@contextlib.contextmanager
def atomic_file(path: str | Path, exclusive: bool = False) -> Iterator[Path]:
    """Yields a temporary path beside ``path``; on a clean exit the file written there becomes ``path``.

    Args:
        path: the target file (parent folders are created).
        exclusive: refuse to replace an existing file; the final step is a hard link, which fails when the
            name exists (so two concurrent writers cannot both succeed).

    Raises:
        FileExistsError: ``exclusive`` and ``path`` exists (before or after writing).
    """
    path = Path(path)
    if exclusive and path.exists():
        raise _exists_error(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        if not exclusive:
            os.replace(tmp, path)
            return
        try:
            os.link(tmp, path)
        except FileExistsError as err:
            raise _exists_error(path) from err
        except OSError:  # a file system without hard links: check, then rename
            if path.exists():
                raise _exists_error(path) from None
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write(path: str | Path, data: bytes | str, exclusive: bool = False) -> Path:
    """Writes ``data`` (text as UTF-8) to ``path`` atomically and fsyncs it; see ``atomic_file``.

    Returns:
        ``path``.

    Raises:
        FileExistsError: ``exclusive`` and ``path`` exists.
    """
    raw = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    with atomic_file(path, exclusive=exclusive) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(raw)
            fh.flush()
            os.fsync(fh.fileno())
    return Path(path)


def atomic_write_json(path: str | Path, obj: Any, exclusive: bool = False,
                      default: Callable[[Any], Any] | None = str) -> Path:
    """Writes ``obj`` as indented JSON (trailing newline) atomically.

    Args:
        default: converter for values JSON lacks (``json.dumps(default=...)``); ``str`` unless given.

    Raises:
        FileExistsError: ``exclusive`` and ``path`` exists.
        TypeError: a value ``default`` cannot convert.
    """
    return atomic_write(path, json.dumps(obj, indent=2, default=default) + "\n", exclusive=exclusive)


def unique_path(path: str | Path, keep_suffix: bool = True) -> Path:
    """``path`` if nothing exists there, else the first free ``<stem>-2<suffix>``, ``-3``, ...

    Args:
        keep_suffix: number before the suffix (files: ``a.png`` -> ``a-2.png``); False numbers the whole
            name (run directories: ``tome_r0.5`` -> ``tome_r0.5-2``).
    """
    path = Path(path)
    stem, suffix = (path.stem, path.suffix) if keep_suffix else (path.name, "")
    out, k = path, 1
    while out.exists():
        k += 1
        out = path.with_name(f"{stem}-{k}{suffix}")
    return out


def new_run_dir(parent: str | Path, name: str) -> Path:
    """Creates and returns a fresh run directory ``parent/name`` (``name-2``, ... when taken).

    Raises:
        ValueError: ``name`` holds characters other than letters, digits and ``. + = , - _``.
    """
    if not _RUN_NAME.fullmatch(name):
        raise ValueError(f"run name {name!r} may only hold letters, digits and . + = , - _; rename it")
    while True:
        path = unique_path(Path(parent) / name, keep_suffix=False)
        try:
            path.mkdir(parents=True)
            return path
        except FileExistsError:  # a concurrent run took the name meanwhile: try the next one
            continue


@contextlib.contextmanager
def eval_mode(model: Any) -> Iterator[Any]:
    """Puts ``model`` (an ``nn.Module``) in eval mode and restores every submodule's train flag on exit.

    Yields:
        ``model``.
    """
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in flags:
            m.training = training


def policy_cache_path(dataset: str, crop_hw: Sequence[int], policy_backbone: str, levels: Sequence[int],
                      root: str | Path = POLICY_CACHE_DIR, normalization: str | None = None) -> Path:
    """Where the trained policy network for a data set, crop, policy backbone and levels lives.

    Args:
        dataset: data set name (``camvid``).
        crop_hw: ``(H, W)`` px of the crops it was trained on.
        policy_backbone: the policy network's backbone name (``dCTS`` ``policy_backbone``).
        levels: superpatch levels (e.g. ``[2]`` for 2x2 windows).
        root: the cache folder (``results/cache/policy``; the ablation grid uses ``<protocol>/policy``).
        normalization: the input normalisation's name when it is not ImageNet's (a policy trained on other
            input statistics is another file).

    Returns:
        ``root/<dataset>_<H>x<W>_<policy_backbone>_L<levels joined by ->[_<normalization>].safetensors``.
    """
    h, w = (int(v) for v in crop_hw)
    tag = "-".join(str(int(v)) for v in levels)
    norm = "" if normalization in (None, "imagenet", "deit") else "_" + "".join(
        c if c.isalnum() or c in "-." else "-" for c in str(normalization))
    return Path(root) / f"{dataset}_{h}x{w}_{policy_backbone}_L{tag}{norm}.safetensors"
