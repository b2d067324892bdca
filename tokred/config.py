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
           "eval_images", "eval_labels", "inference_settings", "input_normalization", "make_loader", "method_name",
           "resolve_device", "seed_everything", "spread_indices", "test_pipeline"]


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
    from tokred.data.normalization import parse_normalization
    from tokred.models.segmenter import build_segmenter

    m = cfg.model
    parse_normalization(m.get("normalization", "auto"))  # bad values fail here, before any run folder exists
    if protocol(cfg) is not None:
        from tokred.data import get_spec

        get_spec(str(cfg.dataset.name)).protocol(protocol(cfg))
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
        layout=str((cfg.get("encoder") or {}).get("layout", "auto")),
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
    """The training set (augmented) or the evaluation set (``eval.split``, ``eval.max_items``) of ``cfg``, its
    images normalised as the weights need (:func:`input_normalization`).

    Args:
        split: another split for evaluation-style loading (e.g. ``policy.val_split``), all items.
    """
    from tokred.data import build_dataset

    d = cfg.dataset
    norm = input_normalization(cfg)
    if train:
        return build_dataset(d.name, d.root, d.train_split, tuple(d.crop_size), train=True,
                             scale_range=tuple(d.scale_range), base_size=tuple(d.base_size), normalization=norm)
    if split is not None:  # policy validation: images at the crop size, like its training
        return build_dataset(d.name, d.root, split, tuple(d.crop_size), train=False, normalization=norm)
    return build_dataset(d.name, d.root, cfg.eval.split, tuple(d.crop_size), train=False,
                         max_items=cfg.eval.max_items, test_pipeline=test_pipeline(cfg), protocol=protocol(cfg),
                         normalization=norm)


def test_pipeline(cfg: DictConfig) -> str:
    """``dataset.test_pipeline``: ``protocol`` (the data set's own test resize and inference, as mmseg) or
    ``crop`` (resize to ``dataset.crop_size``, then ``eval.mode``/``eval.stride``)."""
    return str(cfg.dataset.get("test_pipeline", "crop"))


def protocol(cfg: DictConfig) -> str | None:
    """``dataset.protocol``: the named variant of the data set's test protocol (ADE20K ``512x512`` | ``640x640``,
    ``tokred.data.DatasetSpec.protocol``); None = the data set's default. Read with ``test_pipeline=protocol``."""
    value = cfg.dataset.get("protocol")
    return None if value is None else str(value)


def inference_settings(cfg: DictConfig):
    """The evaluation's ``(mode, crop, stride)`` (``tokred.data.InferenceSettings``) for ``cfg``."""
    from tokred.data import eval_inference

    return eval_inference(cfg.dataset.name, test_pipeline(cfg), tuple(cfg.dataset.crop_size), str(cfg.eval.mode),
                          None if cfg.eval.stride is None else tuple(cfg.eval.stride), protocol=protocol(cfg))


def input_normalization(cfg: DictConfig):
    """The per-channel mean/std the images are normalised with: ``model.normalization``, or for ``auto`` the one
    the weights were trained with (:class:`tokred.data.normalization.Normalization`, its ``source`` in words).

    ``auto`` takes the first of:

    1. ``checkpoint=`` (a whole segmentation model): the Segmenter authors' -> ``variant.yml``'s
       ``normalization`` (``vit`` | ``deit``), else ``vit``; mmseg's Segmenter -> ``vit`` (127.5 / 127.5 on
       0..255); tokred's -> what the run that wrote it used (``metrics.json`` / ``config.yaml`` beside it; a
       run from before ``model.normalization`` existed, or a bare file: ImageNet, all tokred trained with then);
    2. ``init_from=`` (a tokred checkpoint): as a tokred ``checkpoint=``;
    3. ``model.pretrained=<timm tag>``: the tag's ``pretrained_cfg`` mean/std (timm's registry, no download);
    4. ``model.checkpoint=*.npz`` (big_vision / AugReg): ``vit``;
    5. otherwise (random init, a local ``model.checkpoint`` of unknown origin): ImageNet, tokred's default.

    Raises:
        ValueError: a bad ``model.normalization`` (names the key and the valid options), an unknown pretrained
            tag, or an unreadable checkpoint (checkpoint errors in tokred's words).
    """
    return _resolve_normalization(cfg, depth=0)


def _resolve_normalization(cfg: DictConfig, depth: int):
    from tokred.data.normalization import IMAGENET, VIT, Normalization, parse_normalization

    explicit = parse_normalization(OmegaConf.select(cfg, "model.normalization", default="auto"))
    if explicit is not None:
        return explicit
    ckpt, init_from = cfg.get("checkpoint"), cfg.get("init_from")
    for path, fmt in ((ckpt, str(cfg.get("checkpoint_format") or "auto")), (init_from, "tokred")):
        if path and Path(str(path)).is_file():  # a missing file is preflight's to report
            found = _checkpoint_normalization(str(path), fmt, depth)
            if found is not None:
                return found
    pretrained = OmegaConf.select(cfg, "model.pretrained")
    if pretrained not in (None, False, "", "null", "none", "None"):
        from tokred.models.backbone import pretrained_normalization

        return pretrained_normalization(str(cfg.model.name), pretrained)
    backbone_file = OmegaConf.select(cfg, "model.checkpoint")
    if backbone_file and str(backbone_file).endswith(".npz"):
        return Normalization(VIT.mean, VIT.std, "vit", f"big_vision .npz model.checkpoint={backbone_file}")
    return Normalization(IMAGENET.mean, IMAGENET.std, "imagenet", "default (random init or a local file of "
                         "unknown origin: ImageNet, as tokred always trained)")


def _checkpoint_normalization(path: str, fmt: str, depth: int):
    """The normalisation of a whole segmentation checkpoint; for a tokred one, the run that wrote it."""
    import json

    from tokred.data.normalization import IMAGENET, Normalization
    from tokred.models.checkpoints import checkpoint_normalization

    found = checkpoint_normalization(path, fmt)
    if found is not None:
        return found
    folder = Path(path).parent
    metrics, config = folder / "metrics.json", folder / "config.yaml"
    if metrics.is_file():
        rec = json.loads(metrics.read_text(encoding="utf-8")).get("normalization")
        if isinstance(rec, dict) and "mean" in rec and "std" in rec:
            return Normalization(tuple(rec["mean"]), tuple(rec["std"]), str(rec.get("name", "custom")),
                                 f"recorded in {metrics}")
    if config.is_file() and depth < 4:
        run_cfg = OmegaConf.load(config)
        if OmegaConf.select(run_cfg, "model.normalization") is not None:
            inner = _resolve_normalization(run_cfg, depth + 1)
            return Normalization(inner.mean, inner.std, inner.name, f"the run {config} ({inner.source})")
        return Normalization(IMAGENET.mean, IMAGENET.std, "imagenet", f"the run {config} predates "
                             "model.normalization: ImageNet, all tokred trained with then")
    return Normalization(IMAGENET.mean, IMAGENET.std, "imagenet", f"tokred checkpoint {path} without a run "
                         "config beside it: ImageNet, tokred's training default")


def make_loader(ds, batch_size: int, shuffle: bool, num_workers: int, sampler=None, generator=None):
    """A ``DataLoader``. Shuffled loaders (training) drop the last incomplete batch; the others (evaluation)
    keep images of different sizes as lists (``tokred.data.eval_collate``). ``generator`` (a
    ``torch.Generator``) seeds the workers instead of the global generator, which training keeps for the model.
    Training workers persist across epochs (not started anew each epoch; the sampler runs in this process)."""
    import torch

    from tokred.data import eval_collate

    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=shuffle and sampler is None,
                                       sampler=sampler, num_workers=num_workers, drop_last=shuffle,
                                       collate_fn=None if shuffle else eval_collate,
                                       persistent_workers=bool(shuffle and num_workers > 0),
                                       pin_memory=torch.cuda.is_available(),
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
