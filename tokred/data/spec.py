"""One description per data set: classes, palette, folder layout, label mapping and the test pipeline.

A :class:`DatasetSpec` is everything loaders, metrics and pictures need to know about a data set. Each data set
lives in one file (``tokred/data/camvid.py``, ``ade20k.py``, ``cityscapes.py``) that builds its spec and is
registered in :data:`tokred.plugins.DATASETS`; a plugin distribution adds one through the entry-point group
``tokred.datasets`` (or a test through ``DATASETS.register(name, spec)``), plus a ``configs/dataset/<name>.yaml``.

The test pipeline follows mmsegmentation's evaluation protocol (resize rule, then ``whole`` or ``slide``
inference with a window and stride); see :class:`TestPipeline`. A data set may name further variants in
``protocols`` (ADE20K: ``512x512`` and ``640x640``, as mmseg's ``ade20k-512x512`` / ``ade20k-640x640`` configs),
chosen with ``dataset.protocol=<name>`` (:meth:`DatasetSpec.protocol`).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = [
    "IGNORE_INDEX",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "INVALID_LABEL",
    "DatasetSpec",
    "FilesFn",
    "TestPipeline",
    "lut_from_mapping",
    "require_dir",
]

#: Label value that marks pixels excluded from the loss and from mIoU.
IGNORE_INDEX: int = 255
#: Entry of a lookup table marking a stored label value as invalid (loading such a label is an error).
INVALID_LABEL: int = -1

#: Per-channel RGB mean of ImageNet, for images scaled to [0, 1].
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
#: Per-channel RGB standard deviation of ImageNet, for images scaled to [0, 1].
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

#: ``files(root, split) -> [(image_path, label_path), ...]``; raises ``FileNotFoundError`` / ``ValueError``.
FilesFn = Callable[[Path, str], list[tuple[Path, Path]]]

_RESIZE_RULES = ("none", "keep_ratio", "exact")
_MODES = ("whole", "slide")


def _pair(value: Sequence[int] | None, what: str) -> tuple[int, int] | None:
    if value is None:
        return None
    h, w = (int(v) for v in value)
    if h <= 0 or w <= 0:
        raise ValueError(f"{what} must be two positive ints (H, W) in px, got {tuple(value)!r}")
    return h, w


@dataclass(frozen=True)
class TestPipeline:
    """The evaluation protocol of a data set (mmsegmentation's ``test_pipeline`` plus ``test_cfg``).

    Attributes:
        resize: ``"none"`` (native resolution), ``"keep_ratio"`` (scale by
            ``min(scale[0] / short side, scale[1] / long side)``, aspect ratio kept: mmseg's
            ``Resize(scale=(long, short), keep_ratio=True)``) or ``"exact"`` (resize to ``scale`` = (H, W) px).
        scale: ``(short, long)`` px bounds for ``keep_ratio``; ``(H, W)`` px for ``exact``; None for ``none``.
        mode: ``"whole"`` (one forward per image, padded to a multiple of patch_size) or ``"slide"``
            (windows of ``crop`` px every ``stride`` px, overlapping logits averaged).
        crop: ``(H, W)`` px window of ``slide`` mode, a multiple of patch_size.
        stride: ``(H, W)`` px step of ``slide`` mode.

    Raises:
        ValueError: unknown ``resize`` or ``mode`` (lists the valid ones), ``scale`` missing for a resize that
            needs it, or ``slide`` without ``crop``/``stride``.
    """

    __test__ = False  # not a pytest test class despite its name

    resize: str = "none"
    scale: tuple[int, int] | None = None
    mode: str = "whole"
    crop: tuple[int, int] | None = None
    stride: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.resize not in _RESIZE_RULES:
            raise ValueError(f"TestPipeline.resize={self.resize!r} unknown; valid: {', '.join(_RESIZE_RULES)}")
        if self.mode not in _MODES:
            raise ValueError(f"TestPipeline.mode={self.mode!r} unknown; valid: {', '.join(_MODES)}")
        object.__setattr__(self, "scale", _pair(self.scale, "TestPipeline.scale"))
        object.__setattr__(self, "crop", _pair(self.crop, "TestPipeline.crop"))
        object.__setattr__(self, "stride", _pair(self.stride, "TestPipeline.stride"))
        if self.resize != "none" and self.scale is None:
            raise ValueError(f"TestPipeline.resize={self.resize!r} needs scale=(.., ..) px")
        if self.mode == "slide" and (self.crop is None or self.stride is None):
            raise ValueError("TestPipeline.mode='slide' needs crop=(H, W) and stride=(H, W) px")

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """The network input size (H, W) px of an image of ``height`` x ``width`` px after the resize rule.

        ``keep_ratio`` rounds half up, as mmseg's ``Resize`` does.
        """
        if self.resize == "none":
            return height, width
        if self.resize == "exact":
            return self.scale  # type: ignore[return-value]
        short, long = self.scale  # type: ignore[misc]
        factor = min(short / min(height, width), long / max(height, width))
        return int(height * factor + 0.5), int(width * factor + 0.5)


def lut_from_mapping(mapping: Mapping[int, int], ignored: Sequence[int] = ()) -> tuple[int, ...]:
    """A 256-entry stored-value -> train-id table.

    Args:
        mapping: stored label value -> train id (``0 .. K-1`` or ``IGNORE_INDEX``).
        ignored: further stored values that map to ``IGNORE_INDEX``.

    Returns:
        256 ints; ``INVALID_LABEL`` (-1) for every value neither argument names.

    Raises:
        ValueError: a stored value outside 0..255.
    """
    lut = [INVALID_LABEL] * 256
    for raw, train_id in [*mapping.items(), *((v, IGNORE_INDEX) for v in ignored)]:
        if not 0 <= int(raw) < 256:
            raise ValueError(f"stored label value {raw} is outside 0..255 (8-bit label maps)")
        lut[int(raw)] = int(train_id)
    return tuple(lut)


def require_dir(path: Path, layout: str) -> None:
    """Raises ``FileNotFoundError`` naming ``path`` and the expected layout when ``path`` is not a directory."""
    if not path.is_dir():
        raise FileNotFoundError(
            f"expected directory {path} does not exist. Expected layout: {layout}. "
            "Fix: point dataset.root=... at the folder holding that layout."
        )


def missing_files_error(absent: Sequence[str], fix: str) -> FileNotFoundError:
    """One error for every missing file (the first 10 named, then a count), ending with ``fix``."""
    more = f" (and {len(absent) - 10} more)" if len(absent) > 10 else ""
    return FileNotFoundError("; ".join(absent[:10]) + more + f". {fix}")


def pair_with_labels(images: Sequence[Path], label_of: Callable[[Path], Path], layout: str
                     ) -> list[tuple[Path, Path]]:
    """``(image, label_of(image))`` for every image, in order.

    Raises:
        FileNotFoundError: images whose label does not exist (names every pair, up to 10, and the layout).
    """
    pairs = [(image, label_of(image)) for image in images]
    absent = [f"label {label} for image {image} does not exist" for image, label in pairs if not label.is_file()]
    if absent:
        raise missing_files_error(absent, f"Expected layout: {layout}")
    return pairs


def check_split(dataset: str, split: str, splits: Sequence[str]) -> None:
    """Raises ``ValueError`` naming the valid splits (and a close match) when ``split`` is not one of them."""
    if split not in splits:
        close = difflib.get_close_matches(str(split), list(splits), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"{dataset} split {split!r} unknown{hint}; valid splits: {', '.join(splits)}")


@dataclass(frozen=True)
class DatasetSpec:
    """Everything tokred knows about one semantic segmentation data set.

    Attributes:
        name: registry name (= ``configs/dataset/<name>.yaml`` stem).
        num_classes: ``K`` evaluated classes; train ids ``0 .. K-1``.
        ignore_index: label value excluded from loss and mIoU.
        class_names: ``K`` names indexed by train id.
        palette: ``[K, 3]`` RGB colours (0..255) indexed by train id; ``()`` lets pictures choose.
        mean / std: per-channel RGB normalisation of images scaled to [0, 1] that ``build_dataset`` applies when
            it is given none; the jobs always give the one the weights need (``model.normalization``,
            ``tokred.config.input_normalization``).
        layout: the official folder layout, in words (error messages quote it).
        files: ``files(root, split)`` -> ``[(image_path, label_path)]`` in a fixed order; raises
            ``FileNotFoundError`` naming the missing path and ``layout``, ``ValueError`` for an unknown split.
        splits: valid split names.
        eval_split: the split results are reported on.
        lut: 256 ints, stored label value -> train id (``ignore_index`` for ignored, -1 for invalid values).
        test_pipeline: the data set's default evaluation protocol (``dataset.test_pipeline=protocol``).
        protocols: named variants of the protocol (``dataset.protocol=<name>``), given as a mapping and stored
            as ``((name, TestPipeline), ...)``; may include the default under its own name.
        default_root: folder used when ``root`` is None (e.g. the embedded CamVid sample); None = root required.
        citation: what to cite when reporting numbers on it.

    Raises:
        ValueError: (at construction) class names or palette not ``K`` long, ``ignore_index`` a class id,
            a LUT that is not 256 long or maps to ids ``>= K``, or ``eval_split`` not in ``splits``.
    """

    name: str
    num_classes: int
    ignore_index: int = IGNORE_INDEX
    class_names: tuple[str, ...] = ()
    palette: tuple[tuple[int, int, int], ...] = ()
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    layout: str = ""
    files: FilesFn | None = field(default=None, compare=False)
    splits: tuple[str, ...] = ("train", "val")
    eval_split: str = "val"
    lut: tuple[int, ...] = ()
    test_pipeline: TestPipeline = field(default_factory=TestPipeline)
    protocols: Mapping[str, TestPipeline] | tuple[tuple[str, TestPipeline], ...] = ()
    default_root: Path | None = None
    citation: str = ""

    def __post_init__(self) -> None:
        k = self.num_classes
        if self.class_names and len(self.class_names) != k:
            raise ValueError(f"dataset {self.name!r}: {len(self.class_names)} class names for num_classes={k}")
        if self.palette and len(self.palette) != k:
            raise ValueError(f"dataset {self.name!r}: palette has {len(self.palette)} colours for num_classes={k}")
        if 0 <= self.ignore_index < k:
            raise ValueError(f"dataset {self.name!r}: ignore_index={self.ignore_index} is a valid class id "
                             f"(0..{k - 1}); use a value >= num_classes (255)")
        if self.lut:
            if len(self.lut) != 256:
                raise ValueError(f"dataset {self.name!r}: lut must have 256 entries, got {len(self.lut)}")
            bad = sorted({v for v in self.lut if v != INVALID_LABEL and v != self.ignore_index and not 0 <= v < k})
            if bad:
                raise ValueError(f"dataset {self.name!r}: lut maps to ids {bad[:10]} outside 0..{k - 1} and "
                                 f"ignore_index {self.ignore_index}")
        if self.splits and self.eval_split not in self.splits:
            raise ValueError(f"dataset {self.name!r}: eval_split {self.eval_split!r} is not one of {self.splits}")
        pairs = tuple(self.protocols.items()) if isinstance(self.protocols, Mapping) else tuple(self.protocols)
        for name, pipeline in pairs:
            if not isinstance(pipeline, TestPipeline):
                raise ValueError(f"dataset {self.name!r}: protocol {name!r} is a {type(pipeline).__name__}, "
                                 "not a TestPipeline")
        object.__setattr__(self, "protocols", tuple((str(n), p) for n, p in pairs))

    def protocol(self, name: str | None = None) -> TestPipeline:
        """The test pipeline named ``name`` (``dataset.protocol``); None or ``"default"``: ``test_pipeline``.

        Raises:
            ValueError: ``name`` is not one of ``protocols`` (lists the valid names).
        """
        if name is None or str(name) == "default":
            return self.test_pipeline
        named = dict(self.protocols)  # type: ignore[arg-type]
        if str(name) not in named:
            valid = ", ".join(["default", *named])
            close = difflib.get_close_matches(str(name), list(named), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"dataset.protocol={name!r} unknown for dataset {self.name!r}{hint}; valid: {valid}")
        return named[str(name)]

    def lut_array(self) -> np.ndarray:
        """``int16 [256]`` stored-value -> train-id table (-1 = invalid); identity on 0..K-1 when ``lut`` is empty."""
        if self.lut:
            return np.asarray(self.lut, dtype=np.int16)
        return np.asarray(lut_from_mapping({i: i for i in range(self.num_classes)}, [self.ignore_index]),
                          dtype=np.int16)

    def list_files(self, root: Path, split: str) -> list[tuple[Path, Path]]:
        """``(image, label)`` pairs of ``split`` under ``root`` (see ``files``).

        Raises:
            ValueError: unknown split (lists the valid ones), or the spec has no ``files`` function.
            FileNotFoundError: ``root`` or the layout is missing (names the path and the expected layout).
        """
        if self.files is None:
            raise ValueError(f"dataset {self.name!r} has no files(root, split) function; give one in its spec")
        if self.splits:
            check_split(self.name, split, self.splits)
        return self.files(Path(root), split)
