"""Atomic checkpoints (``tokred.io.atomic_file``): written to a temporary file beside the target, then renamed.

Checkpoints hold tensors and plain Python values only, so ``torch.load(weights_only=True)`` reads them and no
pickled code runs. Every failure to read a file is reported in tokred's words (:func:`read_torch_file`): the
file is named, the likely cause and the fix are given, and torch's own advice to load with pickled code
enabled is never repeated.
"""

from __future__ import annotations

import pickle
import random
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from tokred.io import atomic_file

__all__ = ["describe_load_error", "load_checkpoint", "read_torch_file", "rng_state", "save_checkpoint", "set_rng_state"]


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> Path:
    """Writes ``payload`` (state dicts, epoch, ...) to ``path`` atomically; a crash never leaves a half file."""
    path = Path(path)
    with atomic_file(path) as tmp:
        torch.save(payload, tmp)
    return path


def rng_state() -> dict[str, Any]:
    """Every global random state training uses (torch CPU, each CUDA device, NumPy, Python), as tensors and
    plain values so a checkpoint holding it loads with ``weights_only=True``."""
    import numpy as np

    name, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [str(name), torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss),
                      float(gauss)],
            "python": [int(version), torch.tensor(internal, dtype=torch.int64), gauss_next]}


def set_rng_state(state: dict[str, Any]) -> None:
    """Restores what :func:`rng_state` captured (CUDA states only where this machine has the same devices)."""
    import numpy as np

    torch.set_rng_state(state["torch"].cpu())
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(int(v) for v in internal.tolist()), gauss_next))


def _reason(err: BaseException) -> str:
    """The one informative line of a torch load error, without torch's advice (``weights_only=False`` ...)."""
    text = str(err)
    m = re.search(r"(?:Weights|Unpickler)[A-Za-z ]*error:\s*(.+?)(?:\n\s*\n|$)", text, flags=re.S)
    line = m.group(1) if m else (text.strip().splitlines() or [""])[0]
    line = " ".join(line.split())
    m = re.match(r"Unsupported global: GLOBAL (\S+)", line)
    if m:
        return f"e.g. {m.group(1)}"
    line = re.split(r"\. (?:This is an internal|Please use|If you|Re-running)", line)[0]
    if "weights_only" in line:  # never echo torch's advice about weights_only
        return type(err).__name__
    return line[:200] or type(err).__name__


def describe_load_error(path: str | Path, err: BaseException) -> str:
    """tokred's message for a failed ``torch.load(path, weights_only=True)``: names the file, cause and fix.

    Never suggests ``weights_only=False`` (that runs pickled code).
    """
    reason = _reason(err)
    path_size = _size(path)
    if isinstance(err, EOFError) or path_size == 0:
        return (f"checkpoint {path} is empty or truncated (it ended early: {reason}); "
                "re-download or re-save it, or pass another file")
    if isinstance(err, (RuntimeError, zipfile.BadZipFile)) and ("zip" in str(err).lower() or
                                                                 "central directory" in str(err)):
        return (f"checkpoint {path} ({path_size} bytes) is truncated or corrupt (an incomplete PyTorch zip archive: "
                f"{reason}); re-download or re-save it, or pass another file")
    if isinstance(err, pickle.UnpicklingError) and "Unsupported global" in str(err):
        return (f"checkpoint {path} holds pickled Python objects ({reason}) that tokred does not load: it reads "
                "files with torch.load(weights_only=True) and never runs pickled code; re-save only its tensors "
                "(e.g. torch.save(ckpt['state_dict'], 'weights.pth') in a trusted session), or pass another file")
    if isinstance(err, pickle.UnpicklingError):
        return (f"{path} is not a PyTorch checkpoint (it could not be unpickled: {reason}); re-download or pass "
                "another file")
    return (f"checkpoint {path} could not be read ({type(err).__name__}: {reason}); re-download or re-save it, "
            "or pass another file")


def _size(path: str | Path) -> int | None:
    try:
        return Path(path).stat().st_size
    except OSError:
        return None


def read_torch_file(path: str | Path, map_location: str | torch.device = "cpu", what: str = "checkpoint") -> Any:
    """``torch.load(path, weights_only=True)`` with every failure in tokred's words.

    Args:
        path: a ``.pth``/``.pt``/``.bin`` file written by ``torch.save``.
        map_location: device the tensors are loaded onto.
        what: how the message names the file's role (e.g. ``"init_from"``), used for a missing file.

    Raises:
        FileNotFoundError: no file at ``path`` (names it and the option to fix).
        ValueError: not a PyTorch file, truncated, or holding pickled Python objects (see
            :func:`describe_load_error`).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist; pass the path of an existing file")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile,
            AttributeError, ImportError, TypeError, IndexError, KeyError) as err:
        raise ValueError(describe_load_error(path, err)) from None


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Reads a tokred checkpoint without executing pickled code.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file is corrupt, truncated, not a PyTorch file (names the file and the fix, never
            suggesting ``weights_only=False``) or not a tokred checkpoint (no ``"model"`` state dict).
    """
    path = Path(path)
    ckpt = read_torch_file(path, map_location)
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise ValueError(f"{path} is not a tokred checkpoint (no 'model' entry); for backbone weights use "
                         "model.checkpoint=PATH")
    return ckpt
