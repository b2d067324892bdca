"""Data set factory: name + root + split -> :class:`SegmentationDataset`; eval collate and inference settings.

Names resolve through :data:`tokred.plugins.DATASETS` (:func:`tokred.data.info.get_spec`), so a plugin data set
(one :class:`~tokred.data.spec.DatasetSpec`) is built exactly like a built-in one.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor

from tokred.data.datasets import SegmentationDataset
from tokred.data.info import get_spec
from tokred.data.normalization import Normalization

__all__ = ["TEST_PIPELINES", "InferenceSettings", "build_dataset", "default_sample_root", "eval_collate",
           "eval_inference"]

logger = logging.getLogger(__name__)

#: Values of ``dataset.test_pipeline``: ``protocol`` = the data set's published test pipeline (mmseg resize
#: rule, whole/slide mode, window, stride); ``crop`` = resize every eval image to ``dataset.crop_size`` and
#: infer with ``eval.mode``/``eval.stride`` (tokred's original protocol, the one the committed CamVid results use).
TEST_PIPELINES: tuple[str, ...] = ("protocol", "crop")


def default_sample_root() -> Path:
    """Returns the folder of the CamVid sample embedded in the package.

    Returns:
        Path of ``tokred/data/camvid_sample`` (SegNet layout, splits "train" and "val").
    """
    return Path(__file__).resolve().parent / "camvid_sample"


def _check_pipeline(test_pipeline: str) -> str:
    if test_pipeline not in TEST_PIPELINES:
        raise ValueError(f"dataset.test_pipeline={test_pipeline!r} unknown; valid: {', '.join(TEST_PIPELINES)}")
    return test_pipeline


def build_dataset(
    name: str,
    root: str | Path | None,
    split: str,
    crop_size: tuple[int, int] | None,
    train: bool,
    scale_range: tuple[float, float] = (0.5, 2.0),
    base_size: tuple[int, int] | None = None,
    hflip: bool = True,
    photometric: bool = True,
    max_items: int | None = None,
    test_pipeline: str = "crop",
    protocol: str | None = None,
    normalization: Normalization | None = None,
) -> SegmentationDataset:
    """Builds a segmentation data set.

    Items are ``(image, label)`` with image float32 [3, H, W] (normalised with ``normalization``) and label
    int64 [H, W] (train ids, 255 = ignore). With ``train=True`` both are randomly rescaled, cropped to
    ``crop_size`` (padding: image 0, label 255) and flipped together, and the image is colour-jittered. With
    ``train=False`` the image is resized (bilinear) to ``crop_size`` (kept at its size if ``crop_size`` is
    None), or with ``test_pipeline="protocol"`` by the data set's protocol (ADE20K: short side 512 px, so
    sizes differ: batch with :func:`eval_collate`); the label stays at its ORIGINAL resolution, so the
    evaluator upsamples logits to the label's size.

    Args:
        name: a registered data set (``tokred.data.dataset_names()``: camvid, camvid_sample, ade20k,
            cityscapes, plus plugins).
        root: data set folder; may be None only for a spec with ``default_root`` ("camvid_sample").
        split: one of the spec's splits ("train", "val", "test" where it exists).
        crop_size: training crop / eval input size (H, W) in px; None allowed for eval only.
        train: whether to apply training augmentation.
        scale_range: (min, max) random scale on top of ``base_size`` (training).
        base_size: size (H, W) in px the image is fitted into (aspect kept) before the random scale; defaults
            to ``crop_size`` (training).
        hflip: random horizontal flip (training).
        photometric: colour jitter on the image (training).
        max_items: keep only the first ``max_items`` pairs (in list/sorted order); None = all.
        test_pipeline: eval only: ``"crop"`` (resize to ``crop_size``) or ``"protocol"`` (the spec's
            ``test_pipeline`` resize rule).
        protocol: with ``test_pipeline="protocol"``: a named variant of the spec's protocols
            (``dataset.protocol``, e.g. ADE20K ``640x640``); None = the default one.
        normalization: the mean/std the model's weights need (:class:`~tokred.data.normalization.Normalization`,
            ``tokred.config.input_normalization`` for a config); None = the spec's ``mean``/``std`` (ImageNet).

    Returns:
        A :class:`SegmentationDataset` with ``.info`` (the spec) and ``.files``.

    Raises:
        ValueError: unknown name (lists the registered ones), unknown split, test pipeline or protocol variant
            (lists the valid ones), ``root`` None for a
            data set that needs one, bad sizes, or ``max_items`` < 1.
        FileNotFoundError: missing root, wrong layout or a listed file missing (names the path and the
            expected layout).
    """
    spec = get_spec(name)
    _check_pipeline(test_pipeline)
    pipeline = spec.protocol(protocol)
    if root is None:
        if spec.default_root is None:
            raise ValueError(
                f"dataset {spec.name!r} needs a root folder but root is None. "
                f"Fix: pass dataset.root=/path/to/{spec.name} (e.g. dataset.root=../shared/data/CamVid "
                "for CamVid). Expected layout: " + (spec.layout or "see the data set's spec")
            )
        root = spec.default_root
    root_path = Path(root).expanduser()
    files = spec.list_files(root_path, split)
    if max_items is not None:
        if max_items < 1:
            raise ValueError(f"max_items must be >= 1 or None, got {max_items}")
        files = files[:max_items]
    mean, std = (spec.mean, spec.std) if normalization is None else (normalization.mean, normalization.std)
    logger.info("dataset %s/%s from %s: %d items (train=%s, test_pipeline=%s%s, mean=%s, std=%s)", spec.name,
                split, root_path, len(files), train, test_pipeline, f" {protocol}" if protocol else "", mean, std)
    return SegmentationDataset(
        files, spec, spec.lut_array(), train=train, crop_size=crop_size, scale_range=scale_range,
        base_size=base_size, hflip=hflip, photometric=photometric,
        test_pipeline=pipeline if (not train and test_pipeline == "protocol") else None, mean=mean, std=std,
    )


def eval_collate(batch: Sequence[tuple[Tensor, Tensor]]) -> tuple[list[Tensor], list[Tensor]]:
    """``collate_fn`` for evaluation loaders: keeps images of different sizes as lists.

    ``torch``'s default collate stacks, which fails as soon as two images (protocol resize) or two labels
    (original resolutions) differ in size. :func:`tokred.engine.evaluate.evaluate` takes these lists.

    Args:
        batch: ``(image [3, H_i, W_i], label [h_i, w_i])`` items.

    Returns:
        ``(images, labels)``: two lists of ``len(batch)`` tensors, in batch order.

    Raises:
        ValueError: an item is not an ``(image, label)`` pair.
    """
    images, labels = [], []
    for i, item in enumerate(batch):
        if len(item) != 2:
            raise ValueError(f"eval_collate: item {i} has {len(item)} fields; expected (image, label)")
        images.append(item[0])
        labels.append(item[1])
    return images, labels


@dataclass(frozen=True)
class InferenceSettings:
    """How :func:`tokred.engine.evaluate.evaluate` infers: ``mode`` (whole | slide), ``crop`` and ``stride``
    (H, W) px of the windows (None in whole mode for stride; crop is then unused)."""

    mode: str
    crop: tuple[int, int] | None
    stride: tuple[int, int] | None


def eval_inference(name: str, test_pipeline: str, crop_size: Sequence[int] | None = None, mode: str = "whole",
                   stride: Sequence[int] | None = None, protocol: str | None = None) -> InferenceSettings:
    """The inference settings of an evaluation: the data set's protocol, or ``eval.*`` with ``crop``.

    Args:
        name: registered data set.
        test_pipeline: ``"protocol"`` (the spec's mode, window and stride; ``mode``/``stride`` are ignored) or
            ``"crop"`` (``mode``, window ``crop_size``, ``stride``; None = 2/3 of the window).
        crop_size: ``dataset.crop_size`` (H, W) px.
        mode: ``eval.mode``: ``whole`` | ``slide``.
        stride: ``eval.stride`` (H, W) px or None.
        protocol: ``dataset.protocol``: a named variant of the spec's protocols (ADE20K ``640x640``); None = the
            default one. Used with ``"protocol"`` only.

    Returns:
        :class:`InferenceSettings` to pass as ``evaluate(..., mode=s.mode, crop=s.crop, stride=s.stride)``.

    Raises:
        ValueError: unknown data set, test pipeline, protocol variant or mode; ``slide`` without a window.
    """
    spec = get_spec(name)
    if _check_pipeline(test_pipeline) == "protocol":
        p = spec.protocol(protocol)
        return InferenceSettings(p.mode, p.crop, p.stride)
    if mode not in ("whole", "slide"):
        raise ValueError(f"eval.mode must be 'whole' or 'slide', got {mode!r}")
    crop = None if crop_size is None else (int(crop_size[0]), int(crop_size[1]))
    if mode == "slide" and crop is None:
        raise ValueError("eval.mode=slide needs the window size dataset.crop_size")
    st = None if stride is None else (int(stride[0]), int(stride[1]))
    if mode == "slide" and st is None:
        st = (crop[0] * 2 // 3, crop[1] * 2 // 3)  # type: ignore[index]
    return InferenceSettings(mode, crop, st)
