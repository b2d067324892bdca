"""dCTS / CTS policy network: a small timm CNN with one "uniform" logit per window and level.

Architecture (tokred's reconstruction, methods.md Sec. 1; CTS policy, Lu et al. CVPR 2023, Sec. 3.3): the
stride-32 feature map of a timm ``features_only`` CNN (default ``efficientnet_lite0``, as CTS; random init,
or weights from a local checkpoint) is cropped to the level-2 window grid; for level ``L`` it is
average-pooled by ``L / 2`` (so one pooled cell = one level-``L`` window: 32, 64, 128, 256 px for patch 16)
and a per-level 1x1 convolution gives one logit per window.

For a patch size other than 16 px the input is first resized so that one stride-32 cell covers 2x2 patches.

Cost: ``efficientnet_lite0`` features cost about 7.9 GFLOPs (fvcore, multiply-add = 1) at 1024x1024 px,
under 0.4% of ViT-L/16's encoder there (tests/test_dcts.py checks the bound).

Checkpoints: ``save_policy`` writes the state dict (``.safetensors``, or ``.pth`` holding tensors only) and a
``.json`` sidecar with the configuration (levels, patch_size, backbone); ``load_policy_checkpoint`` refuses a
checkpoint whose configuration differs from the network's.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tokred.io import atomic_file, atomic_write_json
from tokred.models.backbone import load_state_dict_file
from tokred.policy.partition import check_levels

__all__ = ["PolicyNet", "save_policy", "load_policy_checkpoint", "read_policy_config", "build_policy",
           "resolve_policy_backbone"]

log = logging.getLogger(__name__)

_FORMAT = "tokred-policy"
_FEATURE_STRIDE = 32  # px per cell of the features the heads read (= one level-2 window at patch 16)


#: ``policy_backbone="auto"``: the policy CNN sized to the ViT it serves, ``(max embed_dim, timm CNN)``. At
#: 384x512 px: mobilenetv3_small_050 0.096 GFLOPs (fvcore), efficientnet_lite0 1.478 GFLOPs, against 6.92
#: (ViT-T) / 22.01 (ViT-S) / 76.67 (ViT-B) GFLOPs of the unreduced encoder (analytic), so dCTS can pay for
#: itself on ViT-T/S too (``uv run --frozen python results/scripts/policy_gflops.py``).
AUTO_POLICY_BACKBONES: tuple[tuple[int, str], ...] = ((384, "mobilenetv3_small_050"), (10**9, "efficientnet_lite0"))


def resolve_policy_backbone(name: str, embed_dim: int | None) -> str:
    """``name``, or for ``"auto"`` the CNN of ``AUTO_POLICY_BACKBONES`` for the ViT's ``embed_dim``
    (``efficientnet_lite0`` when it is not known)."""
    if name != "auto":
        return name
    if embed_dim is None:
        return AUTO_POLICY_BACKBONES[-1][1]
    return next(cnn for limit, cnn in AUTO_POLICY_BACKBONES if int(embed_dim) <= limit)


class PolicyNet(nn.Module):
    """Small CNN scoring every superpatch window as uniform (one class) or not.

    Args:
        levels: window levels (patches per side, powers of two >= 2).
        patch_size: px per patch side of the ViT the policy serves.
        backbone: timm CNN name with ``features_only`` support and a stride-32 output (e.g.
            ``efficientnet_lite0``, ``mobilenetv3_small_100``); always built with ``pretrained=False``.

    Raises:
        ValueError: bad ``levels``, ``patch_size`` < 1, or a backbone whose last feature stride is not 32 px.
    """

    def __init__(self, levels: Sequence[int] = (2, 4, 8, 16), patch_size: int = 16,
                 backbone: str = "efficientnet_lite0") -> None:
        super().__init__()
        self.levels = check_levels(levels)
        if int(patch_size) < 1:
            raise ValueError(f"patch_size must be >= 1 px, got {patch_size}")
        self.patch_size = int(patch_size)
        self.backbone_name = backbone
        try:
            self.backbone = timm.create_model(backbone, pretrained=False, features_only=True, out_indices=(-1,))
        except (RuntimeError, ValueError, TypeError) as err:
            raise ValueError(f"policy_backbone={backbone!r} cannot be built as a timm features_only CNN ({err}); "
                             "use e.g. efficientnet_lite0 or mobilenetv3_small_100") from err
        stride = self.backbone.feature_info.reduction()[-1]
        if stride != _FEATURE_STRIDE:
            raise ValueError(f"policy_backbone={backbone!r} ends at stride {stride} px; the policy needs stride "
                             f"{_FEATURE_STRIDE} (e.g. efficientnet_lite0)")
        channels = self.backbone.feature_info.channels()[-1]
        self.heads = nn.ModuleDict({str(L): nn.Conv2d(channels, 1, kernel_size=1) for L in self.levels})

    @property
    def config(self) -> dict[str, Any]:
        """``{"levels", "patch_size", "backbone"}``: what a checkpoint must match."""
        return {"levels": list(self.levels), "patch_size": self.patch_size, "backbone": self.backbone_name}

    def forward(self, image: Tensor) -> dict[int, Tensor]:
        """Window logits for every level.

        Args:
            image: ``[B, 3, H, W]`` normalised image (ImageNet mean/std, as the ViT's input).

        Returns:
            level ``L`` -> ``[B, H0 // L, W0 // L]`` logits of "window is uniform", where
            ``(H0, W0) = (H // patch_size, W // patch_size)``.
        """
        p = self.patch_size
        H0, W0 = image.shape[-2] // p, image.shape[-1] // p
        size = (H0 * _FEATURE_STRIDE // 2, W0 * _FEATURE_STRIDE // 2)  # px at which one stride-32 cell = 2x2 patches
        if p * 2 != _FEATURE_STRIDE or tuple(image.shape[-2:]) != size:
            image = F.interpolate(image, size=size, mode="bilinear", align_corners=False, antialias=True)
        feats = self.backbone(image)[-1][:, :, : H0 // 2, : W0 // 2]  # [B, Cf, H0//2, W0//2]
        B = feats.shape[0]
        out: dict[int, Tensor] = {}
        for L in self.levels:
            k = L // 2
            h, w = H0 // L, W0 // L
            if h == 0 or w == 0:  # no window of this level fits (smaller input than the configured crop)
                out[L] = feats.new_zeros(B, h, w)
                continue
            pooled = F.avg_pool2d(feats, k) if k > 1 else feats  # [B, Cf, h, w]
            out[L] = self.heads[str(L)](pooled)[:, 0]  # [B, h, w]
        return out


def build_policy(levels: Sequence[int], patch_size: int, backbone: str, checkpoint: str | Path | None = None,
                 check_patch_size: bool = True) -> PolicyNet:
    """A ``PolicyNet``, optionally loaded from ``checkpoint`` (see ``load_policy_checkpoint``)."""
    net = PolicyNet(levels, patch_size, backbone)
    if checkpoint:
        load_policy_checkpoint(net, checkpoint, check_patch_size=check_patch_size)
    return net


def _sidecar(path: Path) -> Path:
    return path.with_suffix(".json")


def save_policy(policy: PolicyNet, path: str | Path, metrics: Mapping[str, Any] | None = None) -> Path:
    """Writes the policy's state dict and a ``.json`` sidecar with its configuration (and optional metrics).

    Args:
        policy: the network.
        path: ``*.safetensors`` or ``*.pth`` (tensors only, no pickled objects).
        metrics: optional numbers to record in the sidecar.

    Returns:
        The state-dict path.

    Raises:
        ValueError: unknown suffix.
    """
    path = Path(path)
    sd = {k: v.detach().cpu().contiguous() for k, v in policy.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix not in (".safetensors", ".pth", ".pt"):
        raise ValueError(f"policy checkpoint path {path} must end in .safetensors or .pth")
    meta = {"format": _FORMAT, **policy.config}
    if metrics:
        meta["metrics"] = dict(metrics)
    # Never over existing weights. The sidecar goes first (an orphan sidecar without weights may be replaced),
    # so a reader that finds the weights always finds their description.
    if path.exists():
        raise FileExistsError(f"{path} exists; tokred never overwrites a trained policy: delete it or choose "
                              "another path (policy.out=...)")
    atomic_write_json(_sidecar(path), meta, default=float)
    with atomic_file(path, exclusive=True) as tmp:
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(sd, str(tmp))
        else:
            torch.save(sd, tmp)
    log.info("saved policy to %s", path)
    return path


def read_policy_config(path: str | Path) -> dict[str, Any] | None:
    """The configuration stored in a policy checkpoint's ``.json`` sidecar, or None when there is none.

    Raises:
        ValueError: the sidecar is not valid JSON or not a tokred policy description.
    """
    side = _sidecar(Path(path))
    if not side.is_file():
        return None
    try:
        meta = json.loads(side.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"policy sidecar {side} is not valid JSON ({err})") from err
    if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
        raise ValueError(f"{side} is not a tokred policy description (format != {_FORMAT!r})")
    return meta


def load_policy_checkpoint(policy: PolicyNet, path: str | Path, check_patch_size: bool = True) -> None:
    """Loads a policy checkpoint into ``policy``, refusing one trained for another configuration.

    Two kinds of file are accepted:
        * a tokred policy (``save_policy``): its sidecar's levels, patch_size and backbone must equal the
          network's (``check_patch_size=False`` adopts the checkpoint's patch size instead of checking it;
          the dCTS reducer checks it against the ViT in ``setup``); all tensors must match.
        * plain timm weights of the CNN (no sidecar, no ``heads.`` keys, e.g. ImageNet weights): loaded into
          the feature extractor only (classifier keys dropped), the heads keep their random init.

    Args:
        policy: the network to fill.
        path: ``.safetensors`` or ``.pth`` file.
        check_patch_size: compare the checkpoint's patch size with ``policy.patch_size``.

    Raises:
        FileNotFoundError: missing file.
        ValueError: configuration mismatch (names the field and the fix), or tensors that do not fit.
    """
    path = Path(path)
    sd = load_state_dict_file(path)
    meta = read_policy_config(path)
    if meta is not None:
        for key, want in (("levels", list(policy.levels)), ("backbone", policy.backbone_name),
                          ("patch_size", policy.patch_size)):
            got = meta.get(key)
            if key == "levels" and got is not None:
                got = sorted(int(v) for v in got)
            if key == "patch_size" and not check_patch_size:
                continue
            if got != want:
                raise ValueError(f"policy checkpoint {path} was trained with {key}={got!r} but the policy is "
                                 f"configured with {key}={want!r}; set {key} to match the checkpoint or train "
                                 "a new policy (tokred.policy.train.train_policy)")
        if not check_patch_size and meta.get("patch_size") is not None:
            policy.patch_size = int(meta["patch_size"])
    is_full = any(k.startswith("heads.") for k in sd)
    if meta is None and is_full:
        levels = sorted(int(k.split(".")[1]) for k in sd if k.startswith("heads.") and k.endswith(".weight"))
        if levels != list(policy.levels):
            raise ValueError(f"policy checkpoint {path} has heads for levels {levels} but the policy is configured "
                             f"with levels={list(policy.levels)}; set levels to match or train a new policy")
    if is_full:
        target, prefix = policy, ""
    else:  # plain timm CNN weights
        own = policy.backbone.state_dict()
        sd = {k: v for k, v in sd.items() if k in own or not k.startswith(("classifier.", "conv_head.", "bn2."))}
        target, prefix = policy.backbone, "backbone."
    own = target.state_dict()
    bad = [k for k, v in sd.items() if k in own and own[k].shape != v.shape]
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    if bad or missing or unexpected:
        detail = f"shape mismatch {bad[:3]}" if bad else f"missing {missing[:3]}, unexpected {unexpected[:3]}"
        raise ValueError(f"policy checkpoint {path} does not fit policy_backbone={policy.backbone_name!r} "
                         f"({prefix}{detail}); check policy_backbone against the checkpoint")
    target.load_state_dict(sd)
    log.info("loaded policy weights from %s", path)
