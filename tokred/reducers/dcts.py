"""dCTS superpatch merger (the token half of STEP) and its special case CTS, as embedding-time reducers.

dCTS (STEP, Szczepanski, Poreba, Haroun, arXiv 2509.14165, 2025; VISAPP 2025 version by Proust et al.):
a lightweight CNN policy decides, per image, which windows of 2x2, 4x4, 8x8 and 16x16 patches are uniform
enough to share one *supertoken*. The full STEP paper is not available; tokred's reconstruction
(``shared/papers/methods.md`` Sec. 1) generalises CTS (Lu, de Geus, Dubbelman, CVPR 2023; methods.md Sec. 2):

1. Policy: ``tokred.policy.PolicyNet`` scores every window of every level (``policy="cnn"``), or ground-truth
   homogeneity does (``policy="oracle"``, an upper bound that reads ``ctx.target``).
2. Partition: coarse-to-fine quadtree selection with per-level thresholds and optional token caps
   (``tokred.policy.partition.quadtree_partition``; CTS: top-K level-2 windows, ``topk_partition``).
3. Supertoken embedding: the window's pixels area-averaged down to ``P x P`` px (``F.avg_pool2d`` by ``L``)
   and embedded with the backbone's own patch embedding; its position embedding is the mean of the covered
   patches' position embeddings. Single patches go through exactly the standard embedding path, so
   thresholds of 1 (nothing accepted) reproduce the unreduced ViT.
4. Restore: the token map sends every covered cell to its supertoken (``TokenState.restore``), so decoders,
   later mergers (ToMe), early exits and Cropr treat supertokens like any token.

Documented choices where STEP is not known:
    * Tokens are ordered by the raster index of their top-left patch (so the unreduced order is kept).
    * Images with different token counts are padded (``state.valid``); padded slots are masked out of
      attention and never reach restore.
    * Token sizes (patches per token) are recorded, but proportional attention is off by default as in CTS
      (``proportional_attention=True`` adds ``log(size)`` to the attention logits, ToMe-style).
    * The policy is trained on its own (``tokred.policy.train.train_policy``), then frozen inside the
      segmenter (eval mode, no gradients). Joint training would need an auxiliary-loss channel for window
      labels that ``TokenState.aux`` (class-label cross-entropies only) does not offer, so
      ``train_policy_jointly=True`` is refused.

Differences from the reference code:
    dCTS (STEP): no code is public; everything above is a reconstruction (methods.md Sec. 1).
    CTS (tue-mps/cts-segmenter), for ``CTS`` below:
        * Policy labels: CTS's rule is the default (``tokred.policy.labels``: a window mixing one class with
          ignore pixels is negative, an all-ignore window positive); ``partial_ignore="positive"`` keeps
          tokred's earlier rule. The oracle policy uses the same default. CTS's ADE20K loader also drops
          such windows on the image border from the loss; tokred does not.
        * Policy head: CTS puts a 1x1 conv with 2 logits per window on EfficientNet-Lite0's stride-32 map;
          ``PolicyNet`` gives one binary logit per window and level (sigmoid = softmax of 2 logits).
        * Token order: tokred orders all tokens by the raster index of their top-left patch and does not
          reproduce the reference's order (attention is permutation-equivariant, restore goes through the
          token map).
        * Decoders: CTS runs the decoder on the shared tokens and copies outputs back; tokred restores the
          grid first (``TokenState.restore``), so every decoder works unchanged.
        * Default ``num_windows``: 40% of the crop's 2x2 windows (CTS fixes ``K`` per dataset).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tokred.policy.labels import oracle_scores, resize_labels
from tokred.policy.network import PolicyNet, load_policy_checkpoint, read_policy_config, resolve_policy_backbone
from tokred.policy.partition import (
    Partition,
    check_levels,
    normalize_thresholds,
    quadtree_partition,
    topk_partition,
)
from tokred.reducers.base import BackboneInfo, Merger
from tokred.state import TokenState

if TYPE_CHECKING:
    from tokred.encoder import EmbedContext, Encoder

__all__ = ["DCTS", "CTS", "supertoken_embedding"]

log = logging.getLogger(__name__)

_POLICIES = ("cnn", "oracle")
_CTS_DEFAULT_FRACTION = 0.4  # CTS ADE20K ViT-S 512: 103 of 256 level-2 windows shared (Lu et al. Sec. 4)


def supertoken_embedding(encoder: Encoder, image: Tensor, partition: Partition,
                         proportional_attention: bool = False) -> tuple[Tensor, TokenState]:
    """Embeds single patches and superpatches of a partition and builds the initial token state.

    dCTS / CTS supertoken embedding (methods.md Sec. 1 and 2): for every level ``L`` the image (cropped to the
    windows that fit) is average-pooled by ``L`` so that each level-``L`` window becomes ``P x P`` px, and the
    backbone's own patch embedding runs on it; position embeddings are average-pooled the same way (the mean
    of the covered patches'). All windows of a level are embedded at once and the partition's tokens are
    gathered from the table, so the cost is ``sum_L 1 / L**2`` (< 1/3) of one extra patch embedding.

    Args:
        encoder: the ``tokred.encoder.Encoder`` (its public ``patch_embed``, ``pos_embed``, ``prefix_tokens``,
            ``finish_embedding``).
        image: ``[B, 3, H, W]`` normalised images (H, W multiples of the patch size).
        partition: the token partition of the ``(H0, W0)`` grid (``[B, N0]`` label map, ``[B, N]`` tokens).
        proportional_attention: sets ``TokenState.proportional_attention``.

    Returns:
        ``(x [B, P + N, C], state)``: prefix tokens first, then the partition's tokens in its order; padding
        slots (``partition.valid`` False) are zero and marked invalid; ``state.size`` holds ``L**2`` patches.
    """
    B = image.shape[0]
    ph, pw = encoder.patch_size
    H0, W0 = partition.grid_size
    patches = encoder.patch_embed(image)  # [B, H0, W0, C]
    C = patches.shape[-1]
    patch_pe, _ = encoder.pos_embed((H0, W0))  # [1, N0, C]
    tables = [patches.reshape(B, H0 * W0, C) + patch_pe]  # level 1: exactly the standard embedding
    pe_grid = patch_pe.reshape(1, H0, W0, C).permute(0, 3, 1, 2)  # [1, C, H0, W0]
    level = partition.level  # [B, N]
    row, col = partition.row, partition.col
    index = partition.anchor.clone()  # [B, N] row of the table holding each token
    offset = H0 * W0
    for L in sorted(partition.accepted):
        h, w = H0 // L, W0 // L
        if h == 0 or w == 0:
            continue
        pooled = F.avg_pool2d(image[:, :, : h * L * ph, : w * L * pw], L)  # [B, 3, h*ph, w*pw]
        emb = encoder.patch_embed(pooled).reshape(B, h * w, C)  # [B, h*w, C]
        pe = F.avg_pool2d(pe_grid[:, :, : h * L, : w * L], L).flatten(2).transpose(1, 2)  # [1, h*w, C]
        tables.append(emb + pe)
        index = torch.where(level == L, offset + (row // L) * w + col // L, index)
        offset += h * w
    table = torch.cat(tables, 1)  # [B, T, C]
    x = table.gather(1, index.unsqueeze(-1).expand(B, index.shape[1], C))  # [B, N, C]
    valid = partition.valid
    all_valid = bool(valid.all())
    if not all_valid:
        x = torch.where(valid.unsqueeze(-1), x, torch.zeros_like(x))
    prefix = encoder.prefix_tokens(B)
    P = encoder.num_prefix_tokens
    if prefix is not None:
        x = torch.cat([prefix, x], 1)
    x = encoder.finish_embedding(x)
    size = torch.where(valid, partition.size, torch.ones_like(partition.size)).to(torch.float32)  # [B, N]
    ones = torch.ones(B, P, dtype=torch.float32, device=x.device)
    state = TokenState(
        grid_size=(H0, W0), num_prefix_tokens=P, token_map=partition.label_map + P,
        size=torch.cat([ones, size], 1),
        valid=None if all_valid else torch.cat([ones.bool(), valid], 1),
        proportional_attention=proportional_attention)
    for L, acc in sorted(partition.accepted.items()):
        state = state.add_stat(f"dcts_windows_level_{L}", acc.flatten(1).sum(1))
    return x, state


class DCTS(Merger):
    """dCTS: per-image quadtree of superpatches chosen by a policy, embedded as supertokens (STEP, Sec. dCTS).

    See the module docstring for the method and tokred's documented choices.

    Args:
        levels: window sizes in patches per side (powers of two >= 2), e.g. ``(2, 4, 8, 16)``.
        thresholds: per-level ``tau_L`` in ``[0, 1]``: ``{level: tau}``, a list aligned with ``levels``
            (ascending), one float, or None (0.5 each). A window is accepted when its score is ``> tau_L``;
            ``tau = 1`` accepts nothing at that level.
        policy: ``"cnn"`` (``PolicyNet``) or ``"oracle"`` (ground-truth homogeneity from ``ctx.target``).
        policy_backbone: timm CNN of the policy, or ``"auto"``: sized to the ViT (``build_segmenter`` resolves it
            with ``tokred.policy.network.resolve_policy_backbone``: mobilenetv3_small_050 up to embed_dim 384,
            else efficientnet_lite0, about 7.9 GFLOPs at 1024x1024 px; without a ViT, efficientnet_lite0).
        policy_checkpoint: local policy file from ``train_policy`` (random init when None: then the partition
            is arbitrary, a warning is logged).
        min_tokens: optional lower bound on patch tokens per image (see ``quadtree_partition``).
        max_tokens: optional upper bound on patch tokens per image.
        train_policy_jointly: must be False (see module docstring); train the policy with
            ``tokred.policy.train.train_policy`` and pass ``policy_checkpoint``.
        proportional_attention: add ``log(size)`` to every key's attention logit.
        target_precision: with a ``policy_checkpoint`` whose sidecar holds validation precision/recall curves
            (``train_policy`` writes them), ``thresholds`` is replaced per level by the lowest ``tau`` whose
            validation precision reaches this value (``tokred.policy.train.calibrated_thresholds``; 1.0 where
            no ``tau`` does). A tokred addition: STEP sets its thresholds by hand. Ignored by the oracle policy.

    Raises:
        ValueError: bad levels or thresholds, unknown policy, ``target_precision`` outside (0, 1], a checkpoint
            with the oracle policy, caps below
            1 or min above max, ``train_policy_jointly=True``, or a checkpoint that does not match ``levels``
            / ``policy_backbone`` (its patch size is checked against the ViT in ``setup``).
    """

    replaces_embedding: ClassVar[bool] = True

    def __init__(self, levels: Sequence[int] = (2, 4, 8, 16),
                 thresholds: Mapping | Sequence[float] | float | None = None, policy: str = "cnn",
                 policy_backbone: str = "auto", policy_checkpoint: str | None = None,
                 min_tokens: int | None = None, max_tokens: int | None = None, train_policy_jointly: bool = False,
                 proportional_attention: bool = False, target_precision: float | None = None) -> None:
        super().__init__()
        self.levels = check_levels(levels)
        self.thresholds = normalize_thresholds(thresholds, self.levels)
        if policy not in _POLICIES:
            raise ValueError(f"policy={policy!r} is not one of {_POLICIES}")
        if policy == "oracle" and policy_checkpoint:
            raise ValueError("policy_checkpoint is only used with policy='cnn'; set policy_checkpoint=null "
                             "for the oracle policy")
        for name, cap in (("min_tokens", min_tokens), ("max_tokens", max_tokens)):
            if cap is not None and int(cap) < 1:
                raise ValueError(f"{name} must be >= 1 patch token or null, got {cap}")
        if min_tokens is not None and max_tokens is not None and int(min_tokens) > int(max_tokens):
            raise ValueError(f"min_tokens={min_tokens} exceeds max_tokens={max_tokens}; lower min_tokens")
        if train_policy_jointly:
            raise ValueError("train_policy_jointly=True is not supported: tokred trains the policy on its own "
                             "(tokred.policy.train.train_policy / `python -m tokred train-policy`); set "
                             "train_policy_jointly=false and pass policy_checkpoint")
        self.policy_kind = policy
        if target_precision is not None and not 0.0 < float(target_precision) <= 1.0:
            raise ValueError(f"target_precision must be in (0, 1] (validation precision of accepted windows) or "
                             f"null, got {target_precision}")
        self.target_precision: float | None = None  # set when the thresholds were calibrated
        policy_backbone = resolve_policy_backbone(policy_backbone, None)  # build_segmenter resolves "auto" first
        self.policy_backbone = policy_backbone
        self.policy_checkpoint = policy_checkpoint
        self.min_tokens = None if min_tokens is None else int(min_tokens)
        self.max_tokens = None if max_tokens is None else int(max_tokens)
        self.train_policy_jointly = False
        self.proportional_attention = bool(proportional_attention)
        self._patch_size_from_checkpoint = False
        if policy == "cnn":
            self.policy: nn.Module = PolicyNet(self.levels, patch_size=16, backbone=policy_backbone)
            if policy_checkpoint:
                load_policy_checkpoint(self.policy, policy_checkpoint, check_patch_size=False)
                meta = read_policy_config(policy_checkpoint)
                self._patch_size_from_checkpoint = meta is not None
                if target_precision is not None:
                    self._calibrate(meta, policy_checkpoint, float(target_precision))
            else:
                log.warning("dCTS policy %s has no policy_checkpoint: it is randomly initialised and its "
                            "superpatches are arbitrary; train one with tokred.policy.train.train_policy",
                            policy_backbone)
            self.policy.requires_grad_(False)
            self.policy.eval()
        else:
            self.policy = nn.Identity()

    def _calibrate(self, meta: Mapping[str, Any] | None, path: str, target: float) -> None:
        """Thresholds from the policy's validation precision/recall curves (``calibrated_thresholds``)."""
        from tokred.policy.train import calibrated_thresholds

        curves = ((meta or {}).get("metrics") or {}).get("pr_curves")
        if not curves:
            log.warning("dCTS target_precision=%s: policy %s has no validation curves in its sidecar (trained by an "
                        "older tokred or without a validation split); using thresholds %s", target, path,
                        self.thresholds)
            return
        self.thresholds = calibrated_thresholds(curves, self.levels, target)
        self.target_precision = target
        log.info("dCTS thresholds calibrated to validation precision >= %s: %s", target, self.thresholds)

    # ------------------------------------------------------------------ capabilities
    @property
    def reads_labels(self) -> bool:
        """True for the oracle policy, which reads the ground truth in the forward."""
        return self.policy_kind == "oracle"

    @classmethod
    def needs_fitting(cls, config: Mapping[str, Any]) -> bool:
        """True when ``config`` (constructor kwargs) asks for a ``"cnn"`` policy without ``policy_checkpoint``:
        the policy must be trained first (``train-policy``) and its file passed as ``policy_checkpoint``."""
        import inspect

        params = inspect.signature(cls.__init__).parameters
        if "policy" not in params:  # a subclass that fixes its policy (e.g. an oracle) says so itself
            return False
        policy = config.get("policy", params["policy"].default)
        return policy == "cnn" and not config.get("policy_checkpoint")

    @classmethod
    def fitting_key(cls) -> str:
        """``"policy_checkpoint"``: the kwarg that receives the trained policy file."""
        return "policy_checkpoint"

    # ------------------------------------------------------------------ lifecycle
    def setup(self, info: BackboneInfo) -> None:
        """Checks the levels against the training grid and the policy against the patch size.

        Raises:
            ValueError: a level larger than the grid, non-square patches, or a policy checkpoint trained for
                another patch size.
        """
        super().setup(info)
        ph, pw = info.patch_size
        if ph != pw:
            raise ValueError(f"dCTS needs square patches, the backbone has patch_size {info.patch_size}")
        H0, W0 = info.grid_size
        too_big = [L for L in self.levels if L > H0 or L > W0]
        if too_big:
            fits = [L for L in self.levels if L not in too_big]
            raise ValueError(f"levels {too_big} are larger than the grid_size {tuple(info.grid_size)} patches of the "
                             f"crop; drop them from levels (e.g. levels={fits}) or use a larger crop")
        if isinstance(self.policy, PolicyNet):
            if self._patch_size_from_checkpoint and self.policy.patch_size != ph:
                raise ValueError(f"policy_checkpoint {self.policy_checkpoint} was trained for patch_size "
                                 f"{self.policy.patch_size} px but the backbone has {ph} px; train a policy for "
                                 "this backbone")
            self.policy.patch_size = ph

    def train(self, mode: bool = True) -> DCTS:
        """Sets training mode; the policy stays in eval mode (frozen, BatchNorm statistics kept)."""
        super().train(mode)
        self.policy.eval()
        return self

    def extra_config(self) -> dict[str, Any]:
        return {"levels": list(self.levels), "thresholds": {str(k): v for k, v in self.thresholds.items()},
                "policy": self.policy_kind, "policy_backbone": self.policy_backbone,
                "policy_checkpoint": self.policy_checkpoint, "min_tokens": self.min_tokens,
                "max_tokens": self.max_tokens, "proportional_attention": self.proportional_attention,
                "target_precision": self.target_precision}

    @classmethod
    def identity_config(cls) -> dict[str, Any]:
        return {"levels": (2, 4, 8), "thresholds": 1.0}  # score > 1 never holds: the standard embedding

    @classmethod
    def example_config(cls) -> dict[str, Any]:
        return {"levels": (2, 4, 8), "policy": "oracle"}  # ground-truth superpatches on an 8 x 10 grid

    # ------------------------------------------------------------------ forward
    def window_scores(self, image: Tensor, target: Tensor | None, patch_size: int) -> dict[int, Tensor]:
        """Homogeneity scores in ``[0, 1]`` of every window (no gradient: they only drive discrete choices).

        Args:
            image: ``[B, 3, H, W]`` normalised images.
            target: ``[B, H', W']`` labels (oracle policy only; nearest-resized to ``(H, W)`` when different).
            patch_size: px per patch side.

        Returns:
            level ``L`` -> ``[B, H0 // L, W0 // L]`` scores.

        Raises:
            ValueError: oracle policy without ``target``.
        """
        with torch.no_grad():
            if self.policy_kind == "oracle":
                if target is None:
                    raise ValueError("policy='oracle' reads the ground truth, but no target was passed; call the "
                                     "segmenter as seg(image, target) or use policy='cnn'")
                label = resize_labels(target, tuple(image.shape[-2:]))
                return oracle_scores(label, self.levels, patch_size)
            return {L: s.sigmoid().float() for L, s in self.policy(image).items()}

    def partition(self, scores: Mapping[int, Tensor], grid_size: tuple[int, int]) -> Partition:
        """The token partition from window scores (dCTS: ``quadtree_partition``)."""
        return quadtree_partition(scores, grid_size, self.thresholds, self.min_tokens, self.max_tokens)

    def embed(self, ctx: EmbedContext) -> tuple[Tensor, TokenState]:
        """Policy -> partition -> supertoken embedding.

        Args:
            ctx: ``ctx.image [B, 3, H, W]``; ``ctx.target [B, H', W']`` for the oracle policy.

        Returns:
            ``(x [B, P + N, C], state)`` with ``state.token_map [B, N0]`` from the partition, ``state.size``
            patches per token, and ``state.valid`` padding when images keep different counts.

        Raises:
            ValueError: oracle policy without a target.
        """
        encoder = ctx.encoder
        grid = encoder.grid_size_for(tuple(ctx.image.shape[-2:]))
        scores = self.window_scores(ctx.image, ctx.target, encoder.patch_size[0])
        part = self.partition(scores, grid)
        return supertoken_embedding(encoder, ctx.image, part, self.proportional_attention)


class CTS(DCTS):
    """CTS: the ``num_windows`` highest-scoring 2x2-patch windows of every image share a token (Lu et al. CVPR 2023).

    dCTS restricted to level 2 with a fixed count per image (methods.md Sec. 2), so every image keeps
    ``N0 - 3 * num_windows`` patch tokens and batches need no padding.
    Its differences from the reference code (tue-mps/cts-segmenter) are listed in the module docstring.

    Args:
        num_windows: ``K`` windows shared per image; None = 40% of the level-2 windows of the input's grid
            (CTS's ADE20K setting, 103 of 256 at 512x512 px).
        policy / policy_backbone / policy_checkpoint / proportional_attention: as in ``DCTS`` (a checkpoint
            must have been trained with ``levels=[2]``).

    Raises:
        ValueError: negative ``num_windows``, or (in ``setup`` / forward) more windows than the grid has.
    """

    def __init__(self, num_windows: int | None = None, policy: str = "cnn",
                 policy_backbone: str = "efficientnet_lite0", policy_checkpoint: str | None = None,
                 proportional_attention: bool = False) -> None:
        super().__init__(levels=(2,), thresholds=None, policy=policy, policy_backbone=policy_backbone,
                         policy_checkpoint=policy_checkpoint, proportional_attention=proportional_attention)
        if num_windows is not None and int(num_windows) < 0:
            raise ValueError(f"num_windows must be >= 0 or null, got {num_windows}")
        self.num_windows = None if num_windows is None else int(num_windows)

    def setup(self, info: BackboneInfo) -> None:
        """As ``DCTS.setup``, and checks ``num_windows`` against the crop's level-2 windows.

        Raises:
            ValueError: ``num_windows`` exceeds the windows of the training grid.
        """
        super().setup(info)
        self._k_for(tuple(info.grid_size))

    def _k_for(self, grid_size: tuple[int, int]) -> int:
        m = (grid_size[0] // 2) * (grid_size[1] // 2)
        if self.num_windows is None:
            return int(_CTS_DEFAULT_FRACTION * m)
        if self.num_windows > m:
            raise ValueError(f"num_windows={self.num_windows} but the grid of {tuple(grid_size)} patches has only "
                             f"{m} 2x2 windows; lower num_windows (or null for 40%)")
        return self.num_windows

    @classmethod
    def identity_config(cls) -> dict[str, Any]:
        return {"num_windows": 0}

    @classmethod
    def example_config(cls) -> dict[str, Any]:
        return {"num_windows": 8, "policy": "oracle"}  # 8 of the 20 windows of an 8 x 10 grid

    def extra_config(self) -> dict[str, Any]:
        cfg = super().extra_config()
        for key in ("thresholds", "min_tokens", "max_tokens"):
            cfg.pop(key)
        cfg["num_windows"] = self.num_windows
        return cfg

    def partition(self, scores: Mapping[int, Tensor], grid_size: tuple[int, int]) -> Partition:
        """Top-``K`` level-2 windows per image (``topk_partition``)."""
        return topk_partition(scores[2], grid_size, self._k_for(grid_size), level=2)
