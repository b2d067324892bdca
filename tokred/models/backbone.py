"""timm backbones (ViT-T/S/B/L/16, DINOv2 with registers, EVA-02, tiny test models), pretrained tags, checkpoints.

Weights come from one of:

* random init (default);
* ``pretrained``: a timm pretrained tag (``vit_large_patch16_384.augreg_in21k_ft_in1k``,
  ``vit_small_patch14_reg4_dinov2.lvd142m``, ``eva02_large_patch14_224.mim_m38m``, or a bare tag such as
  ``augreg_in21k_ft_in1k`` for the model's architecture) or ``True`` for the architecture's default tag,
  loaded through timm's own machinery (``timm.create_model(..., pretrained=True)``: downloads into the Hugging
  Face cache, and serves the cached file offline under ``HF_HUB_OFFLINE=1``);
* ``checkpoint``: a local timm / tokred file (``.safetensors``, ``.pth`` read with
  ``torch.load(weights_only=True)`` so no pickled code runs, or a big_vision / AugReg ``.npz``).

Position embeddings are resampled to the crop's grid in every case.
"""

from __future__ import annotations

import difflib
import logging
import os
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

__all__ = ["BACKBONES", "build_backbone", "hf_cache_dir", "load_state_dict_file", "load_backbone_checkpoint",
           "pretrained_normalization", "resolve_pretrained"]

log = logging.getLogger(__name__)

# tokred name -> timm architecture (embed_dim / num_heads / depth, patch size in the comment)
BACKBONES: dict[str, str] = {
    "vit_tiny": "vit_tiny_patch16_224",  # 192 / 3 / 12, patch 16 (Segmenter Table 1)
    "vit_small": "vit_small_patch16_224",  # 384 / 6 / 12
    "vit_base": "vit_base_patch16_224",  # 768 / 12 / 12
    "vit_large": "vit_large_patch16_224",  # 1024 / 16 / 24
    "dinov2_small_reg": "vit_small_patch14_reg4_dinov2",  # 384 / 6 / 12, patch 14, 4 registers, LayerScale
    "eva02_tiny": "eva02_tiny_patch14_224",  # 192 / 3 / 12, patch 14, RoPE, SwiGLU
    "eva02_large": "eva02_large_patch14_224",  # 1024 / 16 / 24, patch 14, RoPE, SwiGLU, scale-norm MLP
    "test_vit": "test_vit",  # 64 / 2 / 6, timm's own test model
    "test_dinov2": "vit_small_patch14_reg4_dinov2",  # 64 / 2 / 6, tiny DINOv2 layout (tests)
    "test_eva": "eva02_tiny_patch14_224",  # 64 / 2 / 6, tiny EVA-02 layout (tests)
}

# architecture kwargs of the tiny test models (explicit timm kwargs override them)
_TINY: dict[str, dict[str, Any]] = {
    "test_dinov2": {"embed_dim": 64, "num_heads": 2, "depth": 6},
    "test_eva": {"embed_dim": 64, "num_heads": 2, "depth": 6},
}

_FAMILIES = ("vit_", "test_vit", "eva02_", "eva_")
_DEFAULT_TAG_WORDS = ("true", "default", "yes", "1")


def _known_archs() -> list[str]:
    return sorted({m for pat in ("vit_*", "test_vit*", "eva02_*", "eva_*") for m in timm.list_models(pat)})


def _resolve_arch(name: str) -> str:
    arch = BACKBONES.get(name, name)
    if arch.startswith(_FAMILIES) and timm.is_model(arch):
        return arch
    close = difflib.get_close_matches(name, [*BACKBONES, *_known_archs()], n=5, cutoff=0.6)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise ValueError(f"unknown backbone {name!r}; valid: {', '.join(BACKBONES)} (or a timm vit_* / eva02_* "
                     f"architecture name).{hint}")


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache folder in effect now (``HF_HUB_CACHE``, else ``HF_HOME/hub``, else the default)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def resolve_pretrained(arch: str, pretrained: str | bool) -> str:
    """The full timm name ``arch.tag`` that ``pretrained`` designates.

    Args:
        arch: the timm architecture of the model name.
        pretrained: ``True`` (or ``"true"``/``"default"``) for the architecture's default tag, a full
            ``arch.tag`` name, or a bare ``tag`` of ``arch``.

    Raises:
        ValueError: timm knows no such pretrained name (close names from ``timm.list_pretrained()``), or the
            architecture has no pretrained weights.
    """
    if pretrained is True or (isinstance(pretrained, str) and pretrained.strip().lower() in _DEFAULT_TAG_WORDS):
        tags = timm.list_pretrained(f"{arch}.*")
        if not tags:
            raise ValueError(f"timm has no pretrained weights for {arch!r}; pick a model with weights, e.g. "
                             f"{', '.join(timm.list_pretrained(arch.split('_')[0] + '_*')[:3])}")
        from timm.models import get_pretrained_cfg

        default = get_pretrained_cfg(arch)
        tag = getattr(default, "tag", None) if default is not None else None
        return f"{arch}.{tag}" if tag else tags[0]
    full = str(pretrained).strip()
    if "." not in full:
        full = f"{arch}.{full}"
    known = timm.list_pretrained()
    if full not in known:
        close = difflib.get_close_matches(full, known, n=5, cutoff=0.5)
        hint = f"; close names: {', '.join(close)}" if close else ""
        raise ValueError(f"timm knows no pretrained weights {full!r}{hint} (all: timm.list_pretrained())")
    if full.split(".")[0] != arch:
        log.warning("pretrained %s has architecture %s, not %s of the model name; building %s",
                    full, full.split(".")[0], arch, full.split(".")[0])
    return full


def pretrained_normalization(name: str, pretrained: str | bool):
    """The input normalisation timm records for a pretrained tag, from timm's registry (nothing is downloaded).

    Args:
        name: the tokred model name (``configs/model``) or a timm architecture.
        pretrained: as for :func:`resolve_pretrained` (full ``arch.tag``, bare ``tag`` or ``True``).

    Returns:
        A :class:`tokred.data.normalization.Normalization` named after the full tag, with the mean/std of its
        ``pretrained_cfg`` (AugReg ViTs 0.5 / 0.5; DINOv2 ImageNet's; EVA-02 CLIP's).

    Raises:
        ValueError: unknown model name or pretrained tag (close names listed), or a tag without mean/std.
    """
    from timm.models import get_pretrained_cfg

    from tokred.data.normalization import Normalization

    full = resolve_pretrained(_resolve_arch(name), pretrained)
    cfg = get_pretrained_cfg(full)
    mean, std = getattr(cfg, "mean", None), getattr(cfg, "std", None)
    if mean is None or std is None:
        raise ValueError(f"timm's pretrained_cfg of {full!r} gives no mean/std; set model.normalization "
                         "(imagenet | vit | {mean: [...], std: [...]})")
    return Normalization(tuple(mean), tuple(std), full, f"timm pretrained_cfg of model.pretrained={full}")


def build_backbone(name: str, img_size: tuple[int, int], drop_path_rate: float = 0.0,
                   checkpoint: str | Path | None = None, pretrained: str | bool | None = None,
                   **timm_kwargs: Any) -> nn.Module:
    """Creates a timm backbone sized for ``img_size``: random init, a timm pretrained tag, or a local checkpoint.

    Args:
        name: a key of ``BACKBONES`` or any timm ``vit_*`` / ``eva02_*`` architecture name.
        img_size: ``(H, W)`` px of the training crop; the position embedding is built for this grid.
        drop_path_rate: stochastic depth rate.
        checkpoint: optional local file (timm or tokred format, ``.safetensors`` / ``.pth`` / ``.npz``).
        pretrained: optional timm pretrained tag (full ``arch.tag`` or bare ``tag``) or ``True`` for the
            default tag; downloaded to / served from the Hugging Face cache (``hf_cache_dir()``).
        **timm_kwargs: passed to ``timm.create_model`` (e.g. ``init_values=1e-5`` for LayerScale,
            ``qk_norm=True``, ``reg_tokens=4``, ``embed_dim``/``depth``/``num_heads`` for custom sizes).

    Raises:
        ValueError: unknown backbone name (valid names and close matches listed), an unknown pretrained tag
            (close names listed), both ``pretrained`` and ``checkpoint`` given, or pretrained weights that do
            not fit the requested sizes.
        FileNotFoundError: the pretrained file is neither cached nor downloadable (offline); names the tag,
            the cache folder and the ``model.checkpoint=FILE`` alternative. Checkpoint errors: see
            ``load_backbone_checkpoint``.
    """
    arch = _resolve_arch(name)
    kwargs = {**_TINY.get(name, {}), **timm_kwargs}
    common = dict(num_classes=0, img_size=tuple(img_size), drop_path_rate=drop_path_rate, dynamic_img_size=True)
    if pretrained in (None, False, "", "null", "none", "None"):
        model = timm.create_model(arch, pretrained=False, **common, **kwargs)
    else:
        if checkpoint:
            raise ValueError(f"give either model.pretrained ({pretrained!r}) or model.checkpoint ({checkpoint}), "
                             "not both")
        full = resolve_pretrained(arch, pretrained)
        model = _create_pretrained(full, common, kwargs)
    if checkpoint:
        load_backbone_checkpoint(model, checkpoint)
    return model


def _create_pretrained(full: str, common: dict[str, Any], kwargs: dict[str, Any]) -> nn.Module:
    cache = hf_cache_dir()
    try:
        model = timm.create_model(full, pretrained=True, cache_dir=str(cache), **common, **kwargs)
    except (OSError, ConnectionError) as err:  # huggingface_hub's LocalEntryNotFoundError is a FileNotFoundError
        raise FileNotFoundError(
            f"pretrained weights {full!r} are not in the Hugging Face cache {cache} and could not be downloaded "
            f"({type(err).__name__}); download them once online (unset HF_HUB_OFFLINE), point HF_HOME / "
            "HF_HUB_CACHE at a cache that holds them, or pass a local file with model.checkpoint=FILE "
            "(and model.pretrained=null)") from err
    except RuntimeError as err:
        if "size mismatch" in str(err) or "Missing key" in str(err) or "Unexpected key" in str(err):
            raise ValueError(f"pretrained weights {full!r} do not fit the requested architecture {kwargs}: "
                             f"{str(err).splitlines()[0]}...; set model.embed_dim/depth/num_heads (and "
                             "backbone_kwargs) to the architecture's own") from err
        raise
    log.info("loaded pretrained backbone %s (timm, cache %s)", full, cache)
    return model


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Reads a state dict from ``.safetensors`` or ``.pth``/``.pt``/``.bin`` without executing pickled code.

    Nested dicts under ``"model"``, ``"state_dict"`` or ``"module"`` are unwrapped.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is corrupt, not a state dict, or has an unknown suffix.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist; pass model.checkpoint=PATH to a local file")
    if path.suffix in (".pth", ".pt", ".bin"):
        from tokred.engine.checkpoint import read_torch_file

        sd: Any = read_torch_file(path, what="model.checkpoint")  # errors in tokred's words, naming the file
    elif path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            sd = load_file(str(path))
        except Exception as err:  # safetensors raises its own SafetensorError
            raise ValueError(f"checkpoint {path} is not a readable safetensors file ({type(err).__name__}: "
                             f"{err}); re-download or re-save it, or pass another file") from None
    else:
        raise ValueError(f"checkpoint {path}: unknown suffix {path.suffix!r}; use .safetensors, .pth or "
                         "(ViT only) .npz")
    for key in ("model", "state_dict", "module"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"checkpoint {path} does not hold a flat state dict of tensors")
    return sd


def _checkpoint_filter(model: nn.Module):
    """timm's layout adapter for the model's family (``checkpoint_filter_fn`` of vision_transformer or eva)."""
    from timm.models.eva import Eva

    if isinstance(model, Eva):
        from timm.models.eva import checkpoint_filter_fn
    else:
        from timm.models.vision_transformer import checkpoint_filter_fn
    return checkpoint_filter_fn


def _load_npz(model: nn.Module, path: Path) -> None:
    """big_vision / AugReg ``.npz`` through timm's own ``VisionTransformer.load_pretrained`` (numpy, no pickle)."""
    from timm.models.vision_transformer import VisionTransformer

    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist; pass model.checkpoint=PATH to a local file")
    if not isinstance(model, VisionTransformer):
        raise ValueError(f"checkpoint {path}: .npz (big_vision / AugReg) weights load into timm VisionTransformer "
                         f"models only, not {type(model).__name__}; convert it to .safetensors")
    try:
        model.load_pretrained(str(path))
    except (KeyError, ValueError, RuntimeError, OSError, AssertionError) as err:
        raise ValueError(f"checkpoint {path} does not match backbone or is not a big_vision .npz "
                         f"({type(err).__name__}: {err}); check model= against the checkpoint") from err


def load_backbone_checkpoint(vit: nn.Module, path: str | Path) -> None:
    """Loads a timm state dict, the backbone part of a tokred checkpoint, or an AugReg ``.npz`` into ``vit``.

    tokred checkpoints prefix backbone keys with ``encoder.vit.``; timm's ``checkpoint_filter_fn`` of the
    model's family then adapts layouts and resamples the position embedding to the grid. Heads are ignored.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: unreadable file, or tensors that do not match the backbone (names the first mismatches).
    """
    path = Path(path)
    if path.suffix == ".npz":
        _load_npz(vit, path)
        log.info("loaded backbone weights from %s", path)
        return
    sd = load_state_dict_file(path)
    prefix = "encoder.vit."
    if any(k.startswith(prefix) for k in sd):
        sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    sd = {k: v for k, v in sd.items() if not k.startswith(("head.", "fc_norm."))}
    sd = _checkpoint_filter(vit)(sd, vit)
    own = vit.state_dict()
    bad = [k for k, v in sd.items() if k in own and own[k].shape != v.shape]
    if bad:
        raise ValueError(f"checkpoint {path} does not match backbone: shape mismatch for {bad[:5]} "
                         f"(e.g. {bad[0]}: {tuple(sd[bad[0]].shape)} vs {tuple(own[bad[0]].shape)}); "
                         "check model= (embed_dim/depth) against the checkpoint")
    missing, unexpected = vit.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.startswith(("head.", "fc_norm."))]
    if missing or unexpected:
        raise ValueError(f"checkpoint {path} does not match backbone: missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]}; check model= against the checkpoint")
    log.info("loaded backbone weights from %s", path)
