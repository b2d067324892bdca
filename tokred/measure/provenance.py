"""Where a result came from: code version, library versions, machine, and the source of every reducer."""

from __future__ import annotations

import datetime as _dt
import platform
import socket
import subprocess
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

import tokred
from tokred.measure.bench import cpu_name
from tokred.reducers.registry import reducer_provenance

__all__ = ["git_state", "provenance"]

_PACKAGES = ("torch", "timm", "fvcore", "numpy", "hydra-core", "torchvision")


def _git(args: list[str], cwd: Path) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_state(path: str | Path | None = None) -> dict[str, Any]:
    """Commit and dirty flag of the git work tree holding ``path`` (default: the tokred package).

    Returns:
        ``{"git_commit": sha or None, "git_dirty": bool or None}``; None when not in a git repository or git
        is missing. Dirty means modified tracked files (untracked files are ignored).
    """
    cwd = Path(path) if path is not None else Path(tokred.__file__).resolve().parent
    commit = _git(["rev-parse", "HEAD"], cwd)
    if commit is None:
        return {"git_commit": None, "git_dirty": None}
    status = _git(["status", "--porcelain", "--untracked-files=no"], cwd)
    return {"git_commit": commit, "git_dirty": None if status is None else bool(status)}


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def provenance(reducers: Mapping[str, str] | None = None, repo_path: str | Path | None = None) -> dict[str, Any]:
    """Provenance record for metrics.json.

    Args:
        reducers: slot -> registered reducer name, e.g. ``{"merger": "tome", "pruner": "none"}``.
        repo_path: a path inside the git work tree to describe (default: where tokred is imported from).

    Returns:
        ``git_commit`` (sha or None outside git), ``git_dirty`` (tracked files modified; None outside git),
        ``versions`` (``{"tokred", "python", "torch", "timm", "fvcore", "numpy", "hydra-core", "torchvision",
        "cuda"}``; None for missing ones), ``hostname``, ``platform``, ``cpu_name``, ``gpu_name`` (None without
        CUDA), ``gpu_count``, ``reducer_sources`` (``{slot: {"name", "distribution", "version", "target"}}``),
        ``created_utc`` (ISO 8601).

    Raises:
        KeyError: a reducer name that is not registered (the registry lists valid names).
    """
    versions: dict[str, str | None] = {"tokred": tokred.__version__, "python": platform.python_version()}
    versions.update({p: _version(p) for p in _PACKAGES})
    versions["torch"] = torch.__version__
    versions["cuda"] = torch.version.cuda
    gpu = torch.cuda.get_device_name(torch.cuda.current_device()) if torch.cuda.is_available() else None
    sources = {slot: reducer_provenance(name) for slot, name in (reducers or {}).items()}
    return {
        **git_state(repo_path),
        "versions": versions,
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "cpu_name": cpu_name(),
        "gpu_name": gpu,
        "gpu_count": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "reducer_sources": sources,
        "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
