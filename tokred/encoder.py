"""tokred's encoder loop over the unmodified blocks of a timm backbone, with reducer hooks and taps.

The loop is generic: a backbone adapter (``tokred.backbones``: timm ``VisionTransformer``, timm ``Eva`` with
RoPE) says how to embed, how to run one block's attention branch with an additive per-key bias and expose its
keys, and how to run the MLP branch. Adapters re-use each block's own submodules and never replace a block's
``forward`` or ``__class__``, so LayerScale, qk-norm, drop-path and gradient checkpointing behave as in timm.
The per-key bias is ``log(size)`` for proportional attention (ToMe) and ``-inf`` on padding slots when images
in a batch keep different token counts.

With no reducer (or reducers that do nothing), ``Encoder(model)(image)[0]`` equals
``model.forward_features(image)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from tokred.backbones import BackboneAdapter, adapter_for
from tokred.reducers.base import Reducer
from tokred.state import TokenState

__all__ = ["AUTO_MIN_MEAN_TOKENS", "AUTO_MIN_PADDING_WASTE", "EmbedContext", "Encoder", "LAYOUTS", "attention"]

#: Values of ``Encoder(layout=...)`` / ``encoder.layout``.
LAYOUTS: tuple[str, ...] = ("padded", "packed", "auto")
#: ``layout="auto"`` packs a block only when the padded slots inflate its tokens by at least this factor
#: (slots / live tokens) and the images hold ``AUTO_MIN_MEAN_TOKENS`` live tokens or more on average. Measured
#: (ViT-B/16 1024x1024, batch 8, fp32, 2 CPU threads): trained dCTS policy / early exit / STEP with hundreds of
#: tokens per image at a waste of 1.09-1.11 ran 1.07x / 1.08x / 1.08x packed (results/bench/layouts_vit-base_1024_b8);
#: untrained exit heads at p0 0.05 that left about 55 tokens per image ran 0.97x at a waste of 1.13
#: (results/bench/packed_vs_padded): below a few hundred tokens the per-image kernels' launch cost wins.
AUTO_MIN_PADDING_WASTE = 1.05
AUTO_MIN_MEAN_TOKENS = 128


def attention(attn: nn.Module, x: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor]:
    """timm ``Attention`` through ``F.scaled_dot_product_attention`` (see ``tokred.backbones.vit.vit_attention``)."""
    from tokred.backbones.vit import vit_attention

    return vit_attention(attn, x, bias)


@dataclass(frozen=True)
class EmbedContext:
    """What embedding-time hooks may read.

    Attributes:
        image: ``[B, 3, H, W]`` normalised input.
        target: ``[B, H, W]`` labels (only during training or for oracle policies), else None.
        encoder: the encoder, for its public embedding helpers (``patch_embed``, ``pos_embed``, ...).
    """

    image: Tensor
    target: Tensor | None
    encoder: Encoder


class Encoder(nn.Module):
    """A timm backbone whose forward is tokred's loop, calling each reducer's hooks (``tokred.reducers.base``).

    Args:
        vit: the timm backbone (``VisionTransformer``, ``Eva``, or any model a registered adapter matches);
            stored as ``self.vit`` whatever its family, so checkpoints keep the ``encoder.vit.`` prefix.
        reducers: hooks are called in this order (merger first, then pruner).
        grad_checkpointing: recompute each attention and MLP branch in backward (reducer hooks run outside
            the checkpointed regions, so their state is never recomputed).
        adapter: the ``BackboneAdapter`` subclass to use; default ``tokred.backbones.adapter_for(vit)``.
        layout: how blocks run when images hold different token counts: ``"padded"`` (every image padded to
            the batch's largest count, padding masked in attention), ``"packed"`` (the live tokens of all images
            concatenated, ``tokred.packing``: norms, qkv, projections and MLP on real tokens only, attention
            block-diagonal per image with the per-key bias kept) or ``"auto"`` (packed when the padding would
            inflate the block's tokens by ``AUTO_MIN_PADDING_WASTE`` or more, the images hold
            ``AUTO_MIN_MEAN_TOKENS`` live tokens or more on average and the adapter supports it).
            Reducers always see padded ``[B, N, C]`` tensors: the encoder packs inside each block and unpacks
            before every hook, so every reducer works unchanged. Packed is not
            used in training with active drop path (timm's DropPath would draw per token, not per image).

    Raises:
        TypeError: no registered adapter drives the backbone, or its blocks lack the parts the adapter drives.
        ValueError: the backbone lacks something the adapter needs (e.g. absolute position embeddings for
            ViT), or more than one reducer replaces the embedding.
    """

    def __init__(self, vit: nn.Module, reducers: Sequence[Reducer] = (), grad_checkpointing: bool = False,
                 adapter: type[BackboneAdapter] | None = None, layout: str = "auto") -> None:
        super().__init__()
        if layout not in LAYOUTS:
            raise ValueError(f"encoder layout {layout!r} is not one of {LAYOUTS}")
        self.layout = layout
        if sum(r.replaces_embedding for r in reducers) > 1:
            raise ValueError("at most one reducer may replace the patch embedding; got "
                             f"{[type(r).__name__ for r in reducers if r.replaces_embedding]}")
        self.vit = vit
        self._adapter_cls = adapter
        self._adapter = adapter(vit) if adapter is not None else adapter_for(vit)
        self.reducers = nn.ModuleList(reducers)
        self.grad_checkpointing = grad_checkpointing

    @property
    def adapter(self) -> BackboneAdapter:
        """The backbone adapter, rebuilt if ``self.vit`` was replaced."""
        if self._adapter.model is not self.vit:
            self._adapter = self._adapter_cls(self.vit) if self._adapter_cls is not None else adapter_for(self.vit)
        return self._adapter

    # ------------------------------------------------------------------ backbone facts (timm names)
    @property
    def embed_dim(self) -> int:
        return self.adapter.embed_dim

    @property
    def depth(self) -> int:
        return self.adapter.depth

    @property
    def num_heads(self) -> int:
        return self.adapter.num_heads

    @property
    def patch_size(self) -> tuple[int, int]:
        return self.adapter.patch_size

    @property
    def num_prefix_tokens(self) -> int:
        return self.adapter.num_prefix_tokens

    def grid_size_for(self, image_hw: tuple[int, int]) -> tuple[int, int]:
        """``(H0, W0)`` patches for an image of ``image_hw`` px (floor division by the patch size)."""
        ph, pw = self.patch_size
        return image_hw[0] // ph, image_hw[1] // pw

    # ------------------------------------------------------------------ public embedding helpers
    def patch_embed(self, image: Tensor) -> Tensor:
        """``[B, 3, H, W]`` -> ``[B, H0, W0, C]`` patch embeddings (no position embedding)."""
        return self.adapter.patch_embed(image)

    def pos_embed(self, grid_size: tuple[int, int]) -> tuple[Tensor, Tensor | None]:
        """Absolute position embeddings at ``grid_size``, resampled from the backbone's own when the grid differs.

        Returns:
            ``([1, H0*W0, C] patch position embeddings, [1, P, C] prefix position embeddings or None)``; zeros
            for the patches when the backbone has none.
        """
        return self.adapter.pos_embed(grid_size)

    def prefix_tokens(self, batch: int) -> Tensor | None:
        """``[B, P, C]`` class/register tokens with their position embedding added (None when P = 0)."""
        return self.adapter.prefix_tokens(batch)

    def finish_embedding(self, x: Tensor) -> Tensor:
        """Applies the backbone's post-embedding layers (pos_drop, norm_pre) to ``[B, N, C]`` tokens."""
        return self.adapter.finish_embedding(x)

    def embed(self, image: Tensor) -> tuple[Tensor, TokenState]:
        """Standard ViT embedding: ``[B, 3, H, W]`` -> ``([B, P + N0, C], initial state with positions)``."""
        patches = self.patch_embed(image)
        B, H0, W0, C = patches.shape
        patch_pe, _ = self.pos_embed((H0, W0))
        x = patches.reshape(B, H0 * W0, C) + patch_pe
        prefix = self.prefix_tokens(B)
        if prefix is not None:
            x = torch.cat([prefix, x], 1)
        x = self.finish_embedding(x)
        state = TokenState.initial(B, (H0, W0), self.num_prefix_tokens, x.device)
        return x, state

    def embed_stage(self, image: Tensor, target: Tensor | None = None) -> tuple[Tensor, TokenState]:
        """The tokens entering block 0: the embedding (or a reducer's ``embed``, e.g. dCTS supertokens), then
        every reducer's ``on_embed``.

        Args:
            image: ``[B, 3, H, W]`` normalised images.
            target: ``[B, H, W]`` labels for oracle policies, or None.

        Returns:
            ``(x [B, P + N, C], state)`` with per-token positions set.
        """
        ctx = EmbedContext(image=image, target=target, encoder=self)
        embedder = next((r for r in self.reducers if r.replaces_embedding), None)
        x, state = embedder.embed(ctx) if embedder is not None else self.embed(image)
        if state.pos is None:  # states built by hand (dCTS supertokens): centroids of the held patches
            state = state.with_positions()
        for r in self.reducers:
            x, state = r.on_embed(x, state, ctx)
        return x, state

    # ------------------------------------------------------------------ the loop
    def forward(self, image: Tensor, target: Tensor | None = None,
                taps: Sequence[int] = ()) -> tuple[Tensor, TokenState]:
        """Embeds, runs every block with the reducers' hooks, applies the final norm.

        Args:
            image: ``[B, 3, H, W]`` normalised images; H and W multiples of the patch size.
            target: ``[B, H, W]`` labels, passed to embedding hooks (oracle policies); may be None.
            taps: 0-based block indices whose outputs to keep: ``state.taps[i]`` is ``[B, C, H0, W0]``, the
                output of ``blocks[i]`` (before the final norm and before block ``i``'s ``on_block`` hooks)
                restored to the grid by ``state.restore`` (halted/pruned cells take their banked features).

        Returns:
            ``(x [B, N, C] final-normed live tokens, state)``; the bank holds halted/pruned tokens.

        Raises:
            ValueError: H or W is not a multiple of the patch size, or a tap is outside ``[0, depth)``.
        """
        ph, pw = self.patch_size
        if image.shape[-2] % ph or image.shape[-1] % pw:
            raise ValueError(f"image size {tuple(image.shape[-2:])} px is not a multiple of the patch size "
                             f"{(ph, pw)}; pad or resize the input (the data pipeline's crop_size must be a multiple)")
        tap_set = {int(t) for t in taps}
        bad = sorted(t for t in tap_set if not 0 <= t < self.depth)
        if bad:
            raise ValueError(f"taps {bad} are not 0-based block indices of this backbone (depth {self.depth}: "
                             f"0..{self.depth - 1}); e.g. the last block is {self.depth - 1}")
        adapter = self.adapter
        x, state = self.embed_stage(image, target)
        reducers = list(self.reducers)
        attn_hooks = [r for r in reducers if r.uses_attention_hook]
        use_ckpt = self.grad_checkpointing and torch.is_grad_enabled()
        cached: tuple[tuple[object, ...], object] | None = None
        packed = None  # (valid mask it was built from, PackLayout) while the counts stay the same
        packable = self._packable()
        for i, blk in enumerate(adapter.blocks):
            for r in reducers:
                x, state = r.on_block_start(i, x, state)
            state = state.record_block_entry()
            bias = state.attn_bias(torch.float32)
            key = tuple(state.fields.get(f) for f in adapter.reads_fields)
            if cached is None or len(key) != len(cached[0]) or any(a is not b for a, b in zip(key, cached[0])):
                cached = (key, adapter.attention_inputs(state))
            extra = cached[1]
            packed = self._pack_layout(state, packed) if packable else None
            if packed is not None:
                x, state = self._packed_block(i, blk, x, state, packed, bias, extra, attn_hooks, use_ckpt)
            else:
                if use_ckpt:
                    a, keys = checkpoint(adapter.attention, blk, x, bias, extra, use_reentrant=False)
                else:
                    a, keys = adapter.attention(blk, x, bias, extra)
                x = x + a
                for r in attn_hooks:
                    x, state = r.on_attention(i, x, state, keys)
                x = x + (checkpoint(adapter.mlp, blk, x, use_reentrant=False) if use_ckpt else adapter.mlp(blk, x))
            if i in tap_set:
                state = state.add_tap(i, state.restore(x))
            for r in reducers:
                x, state = r.on_block(i, x, state)
        x = adapter.final_norm(x)
        for r in reducers:
            x, state = r.on_final(x, state)
        return x, state

    # ------------------------------------------------------------------ packed layout
    def _packable(self) -> bool:
        """Whether this forward may run blocks packed (layout, adapter support, no active drop path)."""
        if self.layout == "padded" or not self.adapter.supports_packed:
            return False
        # DropPath on [T, C] would draw per token instead of per image
        return not (self.training and any(getattr(m, "drop_prob", 0.0) > 0 for m in self.vit.modules()))

    def _pack_layout(self, state: TokenState, last: tuple[Tensor, object] | None) -> tuple[Tensor, object] | None:
        """``(valid, PackLayout)`` when this block runs packed, else None; reused while ``state.valid`` is the
        same tensor (the layout changes only when a reducer changes the counts)."""
        if state.valid is None:
            return None
        if last is not None and last[0] is state.valid:
            return last
        if self.layout == "auto":
            n_live = int(state.valid.sum())
            if n_live * AUTO_MIN_PADDING_WASTE > state.valid.numel():  # little padding: packing would not pay
                return None
            if n_live < AUTO_MIN_MEAN_TOKENS * state.valid.shape[0]:  # few tokens: per-image kernels cost more
                return None
        from tokred.packing import layout_from_valid

        return state.valid, layout_from_valid(state.valid)

    def _packed_block(self, i: int, blk: nn.Module, x: Tensor, state: TokenState, packed: tuple[Tensor, object],
                      bias: Tensor | None, extra: object, attn_hooks: list[Reducer],
                      use_ckpt: bool) -> tuple[Tensor, TokenState]:
        """One block on packed tokens: ``x [B, N, C]`` is packed to ``[T, C]``, unpacked (padding slots 0)
        for the attention hooks and at the end, so reducers see the padded layout."""
        from tokred.packing import Packed, pack_key_bias, pack_tensor, unpack

        adapter, layout = self.adapter, packed[1]
        B, N, C = x.shape
        xt = pack_tensor(x, layout)  # [T, C]
        bt = None if bias is None else pack_key_bias(bias, layout)  # [T]
        if use_ckpt:
            a, kt = checkpoint(adapter.packed_attention, blk, xt, layout, bt, extra, use_reentrant=False)
        else:
            a, kt = adapter.packed_attention(blk, xt, layout, bt, extra)
        xt = xt + a
        if attn_hooks:
            x = unpack(Packed(xt, layout), N)[0]
            h, hd = kt.shape[1], kt.shape[2]
            keys = unpack(Packed(kt.reshape(-1, h * hd), layout), N)[0].view(B, N, h, hd).transpose(1, 2)
            for r in attn_hooks:
                x, state = r.on_attention(i, x, state, keys)
            repacked = self._pack_layout(state, packed)
            if repacked is None:  # the hooks evened the counts out: finish the block padded
                return x + (checkpoint(adapter.mlp, blk, x, use_reentrant=False) if use_ckpt
                            else adapter.mlp(blk, x)), state
            layout = repacked[1]
            xt = pack_tensor(x, layout)
        xt = xt + (checkpoint(adapter.mlp, blk, xt, use_reentrant=False) if use_ckpt else adapter.mlp(blk, xt))
        return unpack(Packed(xt, layout), x.shape[1])[0], state

    def final_norm(self, x: Tensor) -> Tensor:
        """The backbone's final norm, for banked features that left before it."""
        return self.adapter.final_norm(x)

    def reference_forward(self, image: Tensor) -> Tensor:
        """The backbone's own ``forward_features`` (the unreduced reference), ``[B, P + N0, C]``."""
        return self.adapter.reference_forward(image)
