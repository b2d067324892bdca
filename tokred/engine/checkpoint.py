"""Atomic checkpoints (``tokred.io.atomic_file``): written to a temporary file beside the target, then renamed.

Checkpoints hold tensors and plain Python values only, so ``torch.load(weights_only=True)`` reads them and no
pickled code runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tokred.io import atomic_file

__all__ = ["save_checkpoint", "load_checkpoint"]


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> Path:
    """Writes ``payload`` (state dicts, epoch, ...) to ``path`` atomically; a crash never leaves a half file."""
    path = Path(path)
    with atomic_file(path) as tmp:
        torch.save(payload, tmp)
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Reads a tokred checkpoint without executing pickled code.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file is corrupt or not a tokred checkpoint (no ``"model"`` state dict).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise ValueError(f"checkpoint {path} could not be read ({err}); the file may be truncated") from err
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise ValueError(f"{path} is not a tokred checkpoint (no 'model' entry); for backbone weights use "
                         "model.checkpoint=PATH")
    return ckpt
