"""timm ViT backbones (ViT-T/S/B/L with 16x16 patches, a tiny test model) and local checkpoint loading.

No weights can be downloaded by tokred: backbones start from random init, or from a local timm / tokred
checkpoint given with ``model.checkpoint=PATH`` (``.safetensors`` or ``.pth``; ``.pth`` is read with
``torch.load(weights_only=True)``, so no pickled code runs). Position embeddings are resampled to the
crop's grid.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

__all__ = ["BACKBONES", "build_backbone", "load_state_dict_file", "load_backbone_checkpoint"]

log = logging.getLogger(__name__)

# tokred name -> timm architecture (embed_dim / num_heads / depth in the comment, Segmenter Table 1)
BACKBONES: dict[str, str] = {
    "vit_tiny": "vit_tiny_patch16_224",  # 192 / 3 / 12
    "vit_small": "vit_small_patch16_224",  # 384 / 6 / 12
    "vit_base": "vit_base_patch16_224",  # 768 / 12 / 12
    "vit_large": "vit_large_patch16_224",  # 1024 / 16 / 24
    "test_vit": "test_vit",  # 64 / 2 / 6, timm's own test model
}


def build_backbone(name: str, img_size: tuple[int, int], drop_path_rate: float = 0.0,
                   checkpoint: str | Path | None = None, **timm_kwargs: Any) -> nn.Module:
    """Creates a timm ViT (random init) sized for ``img_size`` and optionally loads a local checkpoint.

    Args:
        name: a key of ``BACKBONES`` or any timm ViT architecture name.
        img_size: ``(H, W)`` px of the training crop; the position embedding is built for this grid.
        drop_path_rate: stochastic depth rate.
        checkpoint: optional local file (timm or tokred format).
        **timm_kwargs: passed to ``timm.create_model`` (e.g. ``init_values=1e-5`` for LayerScale,
            ``qk_norm=True``, ``reg_tokens=4``, ``embed_dim``/``depth``/``num_heads`` for custom sizes).

    Raises:
        ValueError: unknown backbone name (valid names listed).
        FileNotFoundError / ValueError: see ``load_backbone_checkpoint``.
    """
    arch = BACKBONES.get(name, name)
    if arch not in timm.list_models() or not arch.startswith(("vit_", "test_vit")):
        raise ValueError(f"unknown backbone {name!r}; valid: {', '.join(BACKBONES)} (or a timm vit_* name)")
    vit = timm.create_model(arch, pretrained=False, num_classes=0, img_size=tuple(img_size),
                            drop_path_rate=drop_path_rate, dynamic_img_size=True, **timm_kwargs)
    if checkpoint:
        load_backbone_checkpoint(vit, checkpoint)
    return vit


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
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd: Any = load_file(str(path))
        elif path.suffix in (".pth", ".pt", ".bin"):
            sd = torch.load(path, map_location="cpu", weights_only=True)
        else:
            raise ValueError(f"checkpoint {path}: unknown suffix {path.suffix!r}; use .safetensors or .pth")
    except (RuntimeError, OSError, EOFError) as err:
        raise ValueError(f"checkpoint {path} could not be read ({err}); is it a complete torch/safetensors file?") from err
    except Exception as err:  # safetensors raises its own SafetensorError; pickle errors vary
        if isinstance(err, ValueError):
            raise
        raise ValueError(f"checkpoint {path} could not be read ({type(err).__name__}: {err})") from err
    for key in ("model", "state_dict", "module"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"checkpoint {path} does not hold a flat state dict of tensors")
    return sd


def load_backbone_checkpoint(vit: nn.Module, path: str | Path) -> None:
    """Loads a timm ViT state dict, or the backbone part of a tokred checkpoint, into ``vit``.

    tokred checkpoints prefix backbone keys with ``encoder.vit.``; timm's ``checkpoint_filter_fn`` then
    adapts layouts and resamples the position embedding to ``vit``'s grid. Classifier heads are ignored.

    Raises:
        ValueError: the checkpoint's tensors do not match the backbone (names the first mismatches).
    """
    from timm.models.vision_transformer import checkpoint_filter_fn

    sd = load_state_dict_file(path)
    prefix = "encoder.vit."
    if any(k.startswith(prefix) for k in sd):
        sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    sd = {k: v for k, v in sd.items() if not k.startswith(("head.", "fc_norm."))}
    sd = checkpoint_filter_fn(sd, vit)
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
