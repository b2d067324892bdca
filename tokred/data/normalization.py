"""Input normalisation: the per-channel mean/std the model's weights were trained with.

Normalisation belongs to the weights, not to the data set: the Segmenter authors' ViT checkpoints and mmseg's
Segmenter configs use mean = std = 0.5 (Segmenter's ``normalization: vit``; mmseg's 127.5 on 0..255 pixels), DeiT
and DINOv2 backbones use ImageNet's statistics (Segmenter's ``deit``), and each timm pretrained tag carries its own
in its ``pretrained_cfg``. ``model.normalization`` names one (:data:`NAMED`), gives ``{mean: [...], std: [...]}``,
or is ``auto``: :func:`tokred.config.input_normalization` then follows the weights (rules in its docstring).

All values are for RGB images scaled to [0, 1]: ``x' = (x - mean) / std`` per channel.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tokred.data.spec import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["AUTO", "IMAGENET", "NAMED", "VIT", "Normalization", "parse_normalization"]

#: The config value that asks tokred to follow the weights.
AUTO = "auto"


@dataclass(frozen=True)
class Normalization:
    """Per-channel RGB normalisation of images scaled to [0, 1].

    Attributes:
        mean: 3 floats, subtracted per channel.
        std: 3 positive floats, divided by per channel.
        name: ``imagenet``, ``vit``, ``custom`` or the timm tag whose ``pretrained_cfg`` it is.
        source: where it came from, in words (``model.normalization=vit``, ``variant.yml beside X``, ...).

    Raises:
        ValueError: not 3 values each, or a std that is not positive.
    """

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    name: str = "custom"
    source: str = ""

    def __post_init__(self) -> None:
        mean, std = _three(self.mean, "mean"), _three(self.std, "std")
        if min(std) <= 0:
            raise ValueError(f"normalisation std must be positive, got {std}")
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)

    def record(self) -> dict[str, Any]:
        """``{"name", "mean", "std", "source"}`` for ``metrics.json``."""
        return {"name": self.name, "mean": list(self.mean), "std": list(self.std), "source": self.source}


def _three(values: Any, what: str) -> tuple[float, float, float]:
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError) as err:
        raise ValueError(f"normalisation {what} must be 3 numbers (R, G, B), got {values!r}") from err
    if len(out) != 3:
        raise ValueError(f"normalisation {what} must be 3 numbers (R, G, B), got {len(out)}: {values!r}")
    return out  # type: ignore[return-value]


#: ImageNet statistics (timm's IMAGENET_DEFAULT_*; DeiT, DINOv2; tokred's training default so far).
IMAGENET = Normalization(IMAGENET_MEAN, IMAGENET_STD, "imagenet")
#: mean = std = 0.5 (Google's ViT / AugReg weights, the Segmenter authors' ``vit``, mmseg's 127.5 / 127.5).
VIT = Normalization((0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "vit")
#: Names ``model.normalization`` (and Segmenter's ``variant.yml``) may give; ``deit`` is Segmenter's name for ImageNet.
NAMED: dict[str, Normalization] = {"imagenet": IMAGENET, "vit": VIT, "deit": IMAGENET}


def _options() -> str:
    return f"{AUTO}, {', '.join(NAMED)}, or {{mean: [r, g, b], std: [r, g, b]}}"


def parse_normalization(value: Any, key: str = "model.normalization") -> Normalization | None:
    """``value`` as a :class:`Normalization`, or None for ``auto`` (and None / null, the same).

    Args:
        value: ``"auto"``, a name of :data:`NAMED` (case-insensitive), or a mapping with ``mean`` and ``std``
            (3 numbers each, for [0, 1] images).
        key: how messages name the setting.

    Raises:
        ValueError: an unknown name (with a close match), a mapping without exactly ``mean`` and ``std``, or
            values that are not 3 numbers / a non-positive std; each names ``key`` and the valid options.
    """
    if value is None:
        return None
    if isinstance(value, str):
        name = value.strip().lower()
        if name == AUTO:
            return None
        if name in NAMED:
            found = NAMED[name]
            return Normalization(found.mean, found.std, found.name, f"{key}={value}")
        close = difflib.get_close_matches(name, [AUTO, *NAMED], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"{key}={value!r} unknown{hint}; valid: {_options()}")
    if isinstance(value, Mapping) or hasattr(value, "keys"):
        keys = {str(k) for k in value.keys()}
        if keys != {"mean", "std"}:
            raise ValueError(f"{key}={dict(value)!r} must have exactly the keys mean and std (got "
                             f"{', '.join(sorted(keys)) or 'none'}); valid: {_options()}")
        try:
            return Normalization(tuple(value["mean"]), tuple(value["std"]), "custom", f"{key} (explicit)")
        except (TypeError, ValueError) as err:
            raise ValueError(f"{key}: {err}; valid: {_options()}") from None
    raise ValueError(f"{key}={value!r} ({type(value).__name__}) is not a normalisation; valid: {_options()}")
