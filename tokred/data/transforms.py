"""Joint image/label transforms built from ``torchvision.transforms.v2``.

Images travel as ``tv_tensors.Image`` (uint8, [3, H, W]) and labels as ``tv_tensors.Mask``
(uint8, [1, H, W], already mapped to train ids with 255 = ignore), so every geometric
transform is applied to both with the right interpolation (bilinear for the image, nearest for
the label) while photometric transforms touch the image only. Every pipeline ends with the conversion to
float in [0, 1] and the per-channel normalisation ``(x - mean) / std`` that the model's weights need
(``mean`` / ``std`` arguments, default ImageNet's; see :mod:`tokred.data.normalization`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from tokred.data.spec import IGNORE_INDEX, IMAGENET_MEAN, IMAGENET_STD, TestPipeline

__all__ = ["SegTransform", "build_eval_transform", "build_protocol_transform", "build_train_transform"]

#: Callable taking (image uint8 [3, H, W], label uint8 [1, H, W]) and returning
#: (image float32 [3, H', W'], label int64 [1, H'', W'']).
SegTransform = Callable[[tv_tensors.Image, tv_tensors.Mask], tuple[torch.Tensor, torch.Tensor]]


def _check_hw(value: tuple[int, int], what: str) -> tuple[int, int]:
    """Validates a (height, width) pair in px.

    Args:
        value: Pair of positive ints (H, W) in px.
        what: Name of the argument, for the error message.

    Returns:
        The pair as a tuple of two ints.

    Raises:
        ValueError: If ``value`` is not two positive integers.
    """
    try:
        h, w = (int(v) for v in value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} must be a pair (H, W) of positive ints in px, got {value!r}") from exc
    if h <= 0 or w <= 0:
        raise ValueError(f"{what} must be a pair (H, W) of positive ints in px, got {value!r}")
    return h, w


def _to_float_normalised(mean: Sequence[float], std: Sequence[float]) -> list[v2.Transform]:
    """Returns the dtype conversion (uint8 -> float in [0, 1]) and ``(x - mean) / std`` steps of all pipelines."""
    mean, std = [float(v) for v in mean], [float(v) for v in std]
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ValueError(f"mean and std must be 3 numbers each (R, G, B; std > 0), got mean={mean} std={std}")
    return [
        v2.ToDtype({tv_tensors.Image: torch.float32, tv_tensors.Mask: torch.int64}, scale=True),
        v2.Normalize(mean=mean, std=std),
    ]


def build_train_transform(
    crop_size: tuple[int, int],
    scale_range: tuple[float, float] = (0.5, 2.0),
    base_size: tuple[int, int] | None = None,
    hflip: bool = True,
    photometric: bool = True,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> v2.Compose:
    """Builds the training augmentation pipeline.

    Steps: random rescale so the image fits ``base_size`` times a factor drawn uniformly from
    ``scale_range`` (aspect ratio kept), random crop to ``crop_size`` (where the rescaled image
    is smaller, the image is padded with 0 and the label with 255 = ignore), optional random
    horizontal flip, optional colour jitter (image only), conversion to float in [0, 1] and
    normalisation with ``mean`` / ``std``.

    Args:
        crop_size: Output size (H, W) in px.
        scale_range: (min, max) of the random scale factor applied on top of ``base_size``.
        base_size: Reference size (H, W) in px that the image is fitted into (keeping its
            aspect ratio) before the random scale; defaults to ``crop_size``.
        hflip: Whether to flip horizontally with probability 0.5.
        photometric: Whether to apply brightness/contrast/saturation/hue jitter to the image.
        mean / std: per-channel RGB normalisation of the [0, 1] image (3 floats each).

    Returns:
        A v2 transform mapping (image uint8 [3, H, W], label uint8 [1, H, W]) to
        (image float32 [3, crop_H, crop_W], label int64 [1, crop_H, crop_W]).

    Raises:
        ValueError: If a size is not two positive ints, ``scale_range`` is not
            ``0 < min <= max``, or mean / std are not 3 numbers (std > 0).
    """
    crop_h, crop_w = _check_hw(crop_size, "crop_size")
    base_h, base_w = _check_hw(base_size if base_size is not None else crop_size, "base_size")
    lo, hi = (float(s) for s in scale_range)
    if not 0.0 < lo <= hi:
        raise ValueError(f"scale_range must satisfy 0 < min <= max, got {scale_range!r}")
    steps: list[v2.Transform] = [
        # Note: ScaleJitter takes its target size as (width, height).
        v2.ScaleJitter(target_size=(base_w, base_h), scale_range=(lo, hi), antialias=True),
        v2.RandomCrop(
            (crop_h, crop_w),
            pad_if_needed=True,
            fill={tv_tensors.Image: 0, tv_tensors.Mask: IGNORE_INDEX},
        ),
    ]
    if hflip:
        steps.append(v2.RandomHorizontalFlip(p=0.5))
    if photometric:
        steps.append(v2.ColorJitter(brightness=0.25, contrast=0.25, saturation=0.25, hue=0.05))
    steps.extend(_to_float_normalised(mean, std))
    return v2.Compose(steps)


def build_eval_transform(crop_size: tuple[int, int] | None, mean: Sequence[float] = IMAGENET_MEAN,
                         std: Sequence[float] = IMAGENET_STD) -> v2.Compose:
    """Builds the evaluation pipeline for the image.

    The image is resized (bilinear, antialiased) to exactly ``crop_size`` (or kept at its size
    when ``crop_size`` is None), converted to float and normalised. The label is NOT resized:
    the dataset applies this transform to the image alone and returns the label at its original
    resolution, so metrics are computed at full label resolution after the evaluator upsamples
    the logits to the label's size.

    Args:
        crop_size: Network input size (H, W) in px, or None to keep the image's size.
        mean / std: per-channel RGB normalisation of the [0, 1] image (3 floats each).

    Returns:
        A v2 transform mapping image uint8 [3, H, W] to float32 [3, crop_H, crop_W]
        (or [3, H, W] when ``crop_size`` is None).

    Raises:
        ValueError: If ``crop_size`` is given and is not two positive ints, or bad mean / std.
    """
    steps: list[v2.Transform] = []
    if crop_size is not None:
        size = _check_hw(crop_size, "crop_size")
        steps.append(v2.Resize(size, interpolation=v2.InterpolationMode.BILINEAR, antialias=True))
    steps.extend(_to_float_normalised(mean, std))
    return v2.Compose(steps)


class _ProtocolResize(v2.Transform):
    """Resizes each image (bilinear, antialiased) to ``pipeline.output_size(H, W)``: a size per image."""

    def __init__(self, pipeline: TestPipeline) -> None:
        super().__init__()
        self.pipeline = pipeline

    def forward(self, image: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        size = self.pipeline.output_size(int(image.shape[-2]), int(image.shape[-1]))
        if tuple(image.shape[-2:]) == tuple(size):
            return image
        return v2.functional.resize(image, list(size), interpolation=v2.InterpolationMode.BILINEAR, antialias=True)


def build_protocol_transform(pipeline: TestPipeline, mean: Sequence[float] = IMAGENET_MEAN,
                             std: Sequence[float] = IMAGENET_STD) -> v2.Compose:
    """Builds the evaluation pipeline of a data set's protocol (mmseg ``test_pipeline``) for the image.

    The image is resized by the protocol's rule (``none``: native size; ``keep_ratio``: e.g. ADE20K short
    side 512 px, long side <= 2048 px; ``exact``), converted to float and normalised. As in
    :func:`build_eval_transform` the label is left at its original resolution.

    Args:
        pipeline: the data set's :class:`TestPipeline`.
        mean / std: per-channel RGB normalisation of the [0, 1] image (3 floats each).

    Returns:
        A v2 transform mapping image uint8 [3, H, W] to float32 [3, H', W'] with
        ``(H', W') = pipeline.output_size(H, W)`` px (sizes differ between images).
    """
    return v2.Compose([_ProtocolResize(pipeline), *_to_float_normalised(mean, std)])
