"""From a composed tokred config to objects: the model, the device, data sets, loaders and run names.

These builders are the bridge between Hydra and the library, shared by every job and by notebooks::

    from hydra import compose, initialize_config_dir
    from tokred.config import build_model_from_config, config_dir
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        seg = build_model_from_config(compose("config", overrides=["merger=tome"]))

Importing this module does not import torch (``python -m tokred --help`` stays fast); the builders import it
when called.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import DictConfig, OmegaConf

if TYPE_CHECKING:
    import torch

    from tokred.models.segmenter import Segmenter

__all__ = ["baseline_like", "build_datasets", "build_model_from_config", "config_dir", "default_run_name",
           "eval_images", "eval_labels", "inference_settings", "make_loader", "method_name", "resolve_device",
           "seed_everything", "spread_indices", "test_pipeline"]


def config_dir() -> str:
    """The Hydra config folder: the repository's ``configs/`` (source checkout) or the packaged copy
    (``tokred.structured.config_root``, the one place that knows).

    Raises:
        FileNotFoundError: neither holds a ``config.yaml`` (a broken install).
    """
    from tokred.structured import config_root

    return str(config_root())


def resolve_device(spec: str) -> torch.device:
    """``auto`` -> cuda when available else cpu; otherwise the named device (``cpu``, ``cuda``, ``cuda:N``).

    Raises:
        ValueError: not a device name, or a CUDA device that is not available here (lists the ones that are).
    """
    import torch

    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(spec)
    except RuntimeError as err:
        raise ValueError(f"device={spec!r} is not a device name; use auto, cpu, cuda or cuda:N") from err
    if dev.type == "cuda":
        n = torch.cuda.device_count()
        if n == 0 or (dev.index is not None and dev.index >= n):
            avail = ["cpu"] + [f"cuda:{i}" for i in range(n)]
            raise ValueError(f"device={spec!r} is not available here; available: {', '.join(avail)}")
    elif dev.type != "cpu":
        raise ValueError(f"device={spec!r} is not supported; use auto, cpu, cuda or cuda:N")
    return dev


def seed_everything(seed: int) -> None:
    """Seeds Python's, NumPy's and torch's generators."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------------- model
def build_model_from_config(cfg: DictConfig) -> Segmenter:
    """Builds the ``Segmenter`` that ``cfg`` (the composed tokred config) describes.

    Raises:
        ValueError / KeyError: unknown names or impossible configurations, with the valid choices.
    """
    from tokred.models.segmenter import build_segmenter

    m = cfg.model
    backbone_kwargs = dict(OmegaConf.to_container(m.backbone_kwargs, resolve=True) or {})
    for key in ("embed_dim", "depth", "num_heads"):
        backbone_kwargs.setdefault(key, int(m[key]))
    from tokred.structured import reducer_kwargs

    reducers = reducer_kwargs(cfg)
    (merger, merger_kwargs), (pruner, pruner_kwargs) = reducers["merger"], reducers["pruner"]
    return build_segmenter(
        model=m.name, num_classes=int(cfg.dataset.num_classes), crop_size=tuple(cfg.dataset.crop_size),
        decoder=cfg.decoder.name, decoder_kwargs=OmegaConf.to_container(cfg.decoder.kwargs, resolve=True),
        merger=merger, merger_kwargs=merger_kwargs, pruner=pruner, pruner_kwargs=pruner_kwargs,
        backbone_kwargs=backbone_kwargs, checkpoint=m.checkpoint, drop_path_rate=float(m.drop_path_rate),
        grad_checkpointing=bool(cfg.train.grad_checkpointing), ignore_index=int(cfg.dataset.ignore_index),
        pretrained=m.get("pretrained"))


def baseline_like(cfg: DictConfig, model: Segmenter) -> Segmenter:
    """The unreduced model with ``model``'s backbone and decoder weights, in eval mode (for cost ratios)."""
    base_cfg = cfg.copy()
    OmegaConf.set_struct(base_cfg, False)
    base_cfg.merger = {"name": "none"}
    base_cfg.pruner = {"name": "none"}
    base_cfg.model.checkpoint = None
    if "pretrained" in base_cfg.model:
        base_cfg.model.pretrained = None  # the weights come from `model` below
    baseline = build_model_from_config(base_cfg)
    baseline.load_state_dict(model.state_dict(), strict=False)
    return baseline.eval()


def method_name(cfg: DictConfig) -> str:
    """``none``, ``tome``, ``dcts+early_exit``, ... from the merger and pruner names."""
    names = [n for n in (cfg.merger.name, cfg.pruner.name) if n != "none"]
    return "+".join(names) if names else "none"


def default_run_name(cfg: DictConfig) -> str:
    """mmsegmentation-style name: ``{method}_{backbone}_{decoder}_{gpus}xb{batch}-{epochs}ep_{dataset}-{HxW}``."""
    from tokred.engine.distributed import world_size

    h, w = cfg.dataset.crop_size
    backbone = str(cfg.model.name).replace("_", "-")
    return (f"{method_name(cfg)}_{backbone}_{cfg.decoder.name}_{world_size()}xb{cfg.train.batch_size}-"
            f"{cfg.train.epochs}ep_{cfg.dataset.name}-{h}x{w}")


def named_run_dir(cfg: DictConfig) -> Path:
    """``output_dir/<run_name or default_run_name>``: the folder ``resume=true`` continues (before ``-2`` ...)."""
    return Path(cfg.output_dir) / (cfg.run_name or default_run_name(cfg))


# ---------------------------------------------------------------------------------------------- data
def build_datasets(cfg: DictConfig, train: bool, split: str | None = None):
    """The training set (augmented) or the evaluation set (``eval.split``, ``eval.max_items``) of ``cfg``.

    Args:
        split: another split for evaluation-style loading (e.g. ``policy.val_split``), all items.
    """
    from tokred.data import build_dataset

    d = cfg.dataset
    if train:
        return build_dataset(d.name, d.root, d.train_split, tuple(d.crop_size), train=True,
                             scale_range=tuple(d.scale_range), base_size=tuple(d.base_size))
    if split is not None:  # policy validation: images at the crop size, like its training
        return build_dataset(d.name, d.root, split, tuple(d.crop_size), train=False)
    return build_dataset(d.name, d.root, cfg.eval.split, tuple(d.crop_size), train=False,
                         max_items=cfg.eval.max_items, test_pipeline=test_pipeline(cfg))


def test_pipeline(cfg: DictConfig) -> str:
    """``dataset.test_pipeline``: ``protocol`` (the data set's own test resize and inference, as mmseg) or
    ``crop`` (resize to ``dataset.crop_size``, then ``eval.mode``/``eval.stride``)."""
    return str(cfg.dataset.get("test_pipeline", "crop"))


def inference_settings(cfg: DictConfig):
    """The evaluation's ``(mode, crop, stride)`` (``tokred.data.InferenceSettings``) for ``cfg``."""
    from tokred.data import eval_inference

    return eval_inference(cfg.dataset.name, test_pipeline(cfg), tuple(cfg.dataset.crop_size), str(cfg.eval.mode),
                          None if cfg.eval.stride is None else tuple(cfg.eval.stride))


def make_loader(ds, batch_size: int, shuffle: bool, num_workers: int, sampler=None, generator=None):
    """A ``DataLoader``. Shuffled loaders (training) drop the last incomplete batch; the others (evaluation)
    keep images of different sizes as lists (``tokred.data.eval_collate``). ``generator`` (a
    ``torch.Generator``) seeds the workers instead of the global generator, which training keeps for the model."""
    import torch

    from tokred.data import eval_collate

    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=shuffle and sampler is None,
                                       sampler=sampler, num_workers=num_workers, drop_last=shuffle,
                                       collate_fn=None if shuffle else eval_collate,
                                       persistent_workers=False, pin_memory=torch.cuda.is_available(),
                                       generator=generator)


def spread_indices(total: int, n: int):
    """``n`` indices spread evenly over ``range(total)`` (wrapping when ``n > total``)."""
    import numpy as np

    return np.linspace(0, total - 1, num=n).round().astype(int) if n <= total else np.arange(n) % total


def eval_images(ds, n: int, crop: tuple[int, int]) -> torch.Tensor:
    """``[n, 3, H, W]`` real eval images at the crop size, spread evenly over the eval set: the cost of dynamic
    reducers (dCTS, early exit) depends on the content, so the first few images of a sequence would not do."""
    import torch
    import torch.nn.functional as F

    idx = spread_indices(len(ds), n)
    return torch.stack([F.interpolate(ds[int(i)][0][None], size=crop, mode="bilinear", align_corners=False)[0]
                        for i in idx])


def eval_labels(ds, n: int, crop: tuple[int, int]) -> torch.Tensor:
    """``[n, H, W]`` labels of the images ``eval_images`` picks, nearest-resized to the crop."""
    import torch
    import torch.nn.functional as F

    idx = spread_indices(len(ds), n)
    return torch.stack([F.interpolate(ds[int(i)][1][None, None].float(), size=crop, mode="nearest")[0, 0].long()
                        for i in idx])
