"""The shared Segmenter-style pipeline: encoder (tokred's loop + reducers) -> restore -> decoder -> upsample."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tokred.encoder import Encoder
from tokred.models.backbone import build_backbone
from tokred.models.decoders import Decoder, build_decoder
from tokred.reducers.base import BackboneInfo, Reducer
from tokred.reducers.registry import create_reducer
from tokred.state import TokenState

__all__ = ["SegOutput", "Segmenter", "build_segmenter"]


@dataclass
class SegOutput:
    """Result of a segmenter forward.

    Attributes:
        logits: ``[B, K, H, W]`` class logits at the input's pixel resolution.
        grid_logits: ``[B, K, H0, W0]`` patch-level logits (halted cells hold their kept exit logits).
        state: the final token state (token counts, bank, auxiliary predictions).
    """

    logits: Tensor
    grid_logits: Tensor
    state: TokenState


class Segmenter(nn.Module):
    """ViT encoder with token reducers, a decoder on the restored grid, bilinear upsampling to pixels.

    Args:
        encoder: ``Encoder`` with its reducers.
        decoder: a ``Decoder`` mapping ``[B, C, H0, W0]`` (plus the taps of its ``out_indices``) to
            ``[B, K, H0, W0]``; a plain ``nn.Module`` taking only the grid also works.
        num_classes: ``K``.
        ignore_index: label value ignored by the losses.
    """

    def __init__(self, encoder: Encoder, decoder: nn.Module, num_classes: int, ignore_index: int = 255) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.num_classes = num_classes
        self.ignore_index = ignore_index

    @property
    def reducers(self) -> list[Reducer]:
        return list(self.encoder.reducers)

    def set_progress(self, progress: float) -> None:
        """Fraction of training done, forwarded to every reducer (warm-up schedules)."""
        for r in self.reducers:
            r.set_progress(progress)

    def forward(self, image: Tensor, target: Tensor | None = None) -> SegOutput:
        """Segments ``image``.

        Args:
            image: ``[B, 3, H, W]`` normalised images, H and W multiples of the patch size.
            target: optional ``[B, H, W]`` labels (only oracle policies read them in the forward).

        Returns:
            ``SegOutput`` with pixel logits ``[B, K, H, W]``.
        """
        out_indices = tuple(getattr(self.decoder, "out_indices", ()))
        if out_indices:
            x, state = self.encoder(image, target, taps=out_indices)
        else:
            x, state = self.encoder(image, target)
        bank_x = None if state.bank is None else self.encoder.final_norm(state.bank.x)
        grid = state.restore(x, bank_x)  # [B, C, H0, W0]
        if isinstance(self.decoder, Decoder):
            grid_logits = self.decoder(grid, taps=dict(state.taps) if out_indices else None)  # [B, K, H0, W0]
        else:
            grid_logits = self.decoder(grid)
        kept = state.restore_bank_logits()
        if kept is not None:  # halted cells keep their exit prediction (STEP / DToP)
            logits_kept, mask = kept
            grid_logits = torch.where(mask.unsqueeze(1), logits_kept.to(grid_logits.dtype), grid_logits)
        logits = F.interpolate(grid_logits, size=image.shape[-2:], mode="bilinear", align_corners=False)
        return SegOutput(logits=logits, grid_logits=grid_logits, state=state)

    def losses(self, out: SegOutput, target: Tensor) -> dict[str, Tensor]:
        """Cross-entropy of the main prediction plus every auxiliary prediction in ``out.state.aux``.

        Args:
            out: the forward's output.
            target: ``[B, H, W]`` labels (``ignore_index`` ignored); may differ in size from the logits.

        Returns:
            ``{"loss_main": ..., "loss_<aux name>": ..., "loss": total}`` scalars.
        """
        losses = {"loss_main": self._ce(out.logits, target)}
        for aux in out.state.aux:
            if aux.target == "downsample":
                t = F.interpolate(target[:, None].float(), size=aux.logits.shape[-2:], mode="nearest")[:, 0].long()
                if aux.mask is not None:
                    t = t.masked_fill(~aux.mask, self.ignore_index)
                losses[f"loss_{aux.name}"] = aux.weight * self._ce(aux.logits, t)
            else:
                t = target
                if aux.mask is not None:  # cells outside the mask are ignored at pixel level
                    m = F.interpolate(aux.mask[:, None].float(), size=target.shape[-2:], mode="nearest")[:, 0] > 0
                    t = target.masked_fill(~m, self.ignore_index)
                losses[f"loss_{aux.name}"] = aux.weight * self._ce(aux.logits, t)
        losses["loss"] = sum(losses.values())
        return losses

    def _ce(self, logits: Tensor, target: Tensor) -> Tensor:
        """Mean cross-entropy over non-ignored pixels; 0 (not NaN) when every pixel is ignored.

        In DDP training (``torch.distributed`` initialised, ``self.training``) the mean is over the non-ignored
        pixels of the global batch: the count is summed over the ranks and the rank's sum scaled by the world
        size, so DDP's gradient average equals one process's gradient on the whole global batch.
        """
        if logits.shape[-2:] != target.shape[-2:]:
            logits = F.interpolate(logits, size=target.shape[-2:], mode="bilinear", align_corners=False)
        total = F.cross_entropy(logits.float(), target, ignore_index=self.ignore_index, reduction="sum")
        count = (target != self.ignore_index).sum()
        if self.training and torch.distributed.is_available() and torch.distributed.is_initialized():
            world = torch.distributed.get_world_size()
            if world > 1:
                torch.distributed.all_reduce(count)
                return total * world / count.clamp_min(1)
        return total / count.clamp_min(1)


def _sized(spec: str | Reducer | None, kwargs: Mapping[str, Any] | None,
           embed_dim: int | None) -> Mapping[str, Any] | None:
    """``policy_backbone="auto"`` (given, or the reducer's default) resolved for this ViT
    (``tokred.policy.network.resolve_policy_backbone``)."""
    import inspect

    if not isinstance(spec, str):
        return kwargs
    from tokred.reducers.registry import get_reducer_class

    param = inspect.signature(get_reducer_class(spec).__init__).parameters.get("policy_backbone")
    value = dict(kwargs or {}).get("policy_backbone", None if param is None else param.default)
    if value != "auto":
        return kwargs
    from tokred.policy.network import resolve_policy_backbone

    return {**dict(kwargs or {}), "policy_backbone": resolve_policy_backbone("auto", embed_dim)}


def _make_reducer(spec: str | Reducer | None, kwargs: Mapping[str, Any] | None, slot: str) -> Reducer:
    if isinstance(spec, Reducer):
        reducer = spec
    else:
        reducer = create_reducer(spec or "none", **dict(kwargs or {}))
    if reducer.kind not in (slot, "none"):
        raise ValueError(f"{type(reducer).__name__} is a {reducer.kind}, not a {slot}; "
                         f"pass it as {reducer.kind}=...")
    return reducer


def build_segmenter(model: str = "vit_tiny", num_classes: int = 11, crop_size: tuple[int, int] = (384, 512),
                    decoder: str = "linear", merger: str | Reducer | None = "none",
                    pruner: str | Reducer | None = "none", merger_kwargs: Mapping[str, Any] | None = None,
                    pruner_kwargs: Mapping[str, Any] | None = None, decoder_kwargs: Mapping[str, Any] | None = None,
                    backbone_kwargs: Mapping[str, Any] | None = None, checkpoint: str | None = None,
                    drop_path_rate: float = 0.0, grad_checkpointing: bool = False,
                    ignore_index: int = 255, pretrained: str | bool | None = None,
                    layout: str = "auto") -> Segmenter:
    """Builds the full pipeline without Hydra.

    Example::

        seg = build_segmenter("vit_small", num_classes=150, crop_size=(512, 512),
                              merger="tome", merger_kwargs={"r": 8})

    Args:
        model: backbone name (``tokred.models.backbone.BACKBONES``).
        num_classes: ``K``.
        crop_size: ``(H, W)`` px of the training crop, multiples of the patch size.
        decoder: a name registered in ``tokred.plugins.DECODERS`` (``"linear"``, ``"mask_transformer"``, plug-ins).
        merger / pruner: registered reducer names or ready ``Reducer`` instances.
        merger_kwargs / pruner_kwargs: constructor arguments when given by name.
        decoder_kwargs: the decoder's constructor arguments (checked against its signature).
        checkpoint: local backbone checkpoint (timm or tokred format); whole released segmentation
            checkpoints load with ``tokred.models.checkpoints.load_segmentation_checkpoint`` afterwards.
        pretrained: timm pretrained tag (or ``True``) for the backbone, see ``build_backbone``.
        layout: ``"padded"``, ``"packed"`` or ``"auto"``: how blocks run when images hold different token
            counts (``tokred.encoder.Encoder``).

    Raises:
        ValueError: unknown names, a merger in the pruner slot (or vice versa), a crop that is not a multiple
            of the patch size, a decoder kwarg the decoder does not take, or a reducer configuration that does
            not fit the backbone.
    """
    extra: dict[str, Any] = {} if pretrained in (None, False) else {"pretrained": pretrained}
    vit = build_backbone(model, crop_size, drop_path_rate=drop_path_rate, checkpoint=checkpoint,
                         **extra, **dict(backbone_kwargs or {}))
    ph, pw = vit.patch_embed.patch_size
    if crop_size[0] % ph or crop_size[1] % pw:
        raise ValueError(f"crop_size {tuple(crop_size)} px is not a multiple of the patch size {(ph, pw)}; "
                         f"use e.g. {(crop_size[0] // ph * ph, crop_size[1] // pw * pw)}")
    embed_dim = getattr(vit, "embed_dim", None)
    reducers = [_make_reducer(merger, _sized(merger, merger_kwargs, embed_dim), "merger"),
                _make_reducer(pruner, _sized(pruner, pruner_kwargs, embed_dim), "pruner")]
    encoder = Encoder(vit, reducers, grad_checkpointing=grad_checkpointing, layout=layout)
    info = BackboneInfo(embed_dim=encoder.embed_dim, num_heads=encoder.num_heads, depth=encoder.depth,
                        patch_size=encoder.patch_size, grid_size=encoder.grid_size_for(crop_size),
                        num_prefix_tokens=encoder.num_prefix_tokens, num_classes=num_classes)
    for r in reducers:
        r.setup(info)
    dec = build_decoder(decoder, encoder.embed_dim, num_classes, **dict(decoder_kwargs or {}))
    return Segmenter(encoder, dec, num_classes, ignore_index)
