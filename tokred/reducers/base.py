"""Reducer plugin API: the hooks the encoder loop calls and the base classes for mergers and pruners.

A reducer is a small ``nn.Module`` holding only parameters and configuration. The encoder (tokred's own
loop over unmodified timm blocks, see ``tokred.encoder``) calls its hooks in this order for every forward::

    embed(ctx)                        # only for reducers with ``replaces_embedding = True`` (dCTS)
    on_embed(x, state, ctx)           # after patch embedding + position embedding
    for i in range(depth):
        on_block_start(i, x, state)   # before block i (Cropr's last-layer fusion rejoins tokens here)
        x = x + attention(norm1(x))   # keys exposed to the next hook
        on_attention(i, x, state, k)  # between attention and MLP (ToMe)
        x = x + mlp(norm2(x))
        on_block(i, x, state)         # after block i (early exit, Cropr)

Every hook takes and returns ``(x, state)``; per-forward tensors live in ``state`` (``TokenState``), never
on ``self``. Auxiliary predictions that need a training loss go into ``state.aux``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from torch import Tensor, nn

from tokred.state import TokenState

if TYPE_CHECKING:
    from tokred.encoder import EmbedContext

__all__ = ["BackboneInfo", "Reducer", "Merger", "Pruner"]


@dataclass(frozen=True)
class BackboneInfo:
    """What a reducer may know about the model it is attached to (timm names).

    Attributes:
        embed_dim: token width ``C``.
        num_heads: attention heads.
        depth: number of blocks.
        patch_size: ``(ph, pw)`` px.
        grid_size: ``(H0, W0)`` patches at the training crop.
        num_prefix_tokens: ``P`` (class token, registers).
        num_classes: ``K`` segmentation classes.
    """

    embed_dim: int
    num_heads: int
    depth: int
    patch_size: tuple[int, int]
    grid_size: tuple[int, int]
    num_prefix_tokens: int
    num_classes: int


class Reducer(nn.Module):
    """Base class of every token reducer. Subclasses override the hooks they need; the rest pass through.

    Class attributes:
        kind: ``"merger"`` or ``"pruner"`` (``"none"`` for the identity), the config group it belongs to.
        replaces_embedding: True when ``embed`` builds the initial tokens itself (dCTS supertokens).
    """

    kind: ClassVar[str] = "merger"
    replaces_embedding: ClassVar[bool] = False

    def __init__(self) -> None:
        super().__init__()
        self.info: BackboneInfo | None = None
        # True when the forward reads the ground truth (oracle baselines): cost measurement then passes the
        # labels to the GFLOPs count and skips the im/s timing, which would be meaningless.
        self.reads_target: bool = False
        self.progress: float = 1.0  # fraction of training done, for warm-up schedules; 1.0 at inference

    # -- lifecycle -------------------------------------------------------------------------------------
    def setup(self, info: BackboneInfo) -> None:
        """Called once by the segmenter before training: create parameters that depend on the backbone.

        Raises:
            ValueError: when the reducer's configuration does not fit the backbone (e.g. blocks > depth).
        """
        self.info = info

    def set_progress(self, progress: float) -> None:
        """Fraction of training done in ``[0, 1]``; the engine calls this every step (warm-up schedules)."""
        self.progress = float(min(max(progress, 0.0), 1.0))

    def extra_config(self) -> dict[str, Any]:
        """Parameters recorded in results (metrics.json); override to add more."""
        return {}

    @classmethod
    def identity_config(cls) -> dict[str, Any]:
        """Constructor kwargs under which the reducer changes nothing (zero budget).

        The contract suite (tests/test_contract.py) checks that the model built with them reproduces the
        plain timm forward; every plugin gets that test for free by overriding this.
        """
        return {}

    @classmethod
    def example_config(cls) -> dict[str, Any]:
        """Constructor kwargs that really reduce tokens on a tiny backbone (timm ``test_vit``, depth 6,
        a grid of about 8 x 10 patches); used by the contract suite."""
        return {}

    # -- hooks ---------------------------------------------------------------------------------------------
    def embed(self, ctx: EmbedContext) -> tuple[Tensor, TokenState]:
        """Builds the initial tokens ``[B, N, C]`` and state (only when ``replaces_embedding``)."""
        raise NotImplementedError(f"{type(self).__name__} sets replaces_embedding but does not implement embed()")

    def on_embed(self, x: Tensor, state: TokenState, ctx: EmbedContext) -> tuple[Tensor, TokenState]:
        return x, state

    def on_block_start(self, block: int, x: Tensor, state: TokenState) -> tuple[Tensor, TokenState]:
        return x, state

    def on_attention(self, block: int, x: Tensor, state: TokenState, keys: Tensor) -> tuple[Tensor, TokenState]:
        """Between attention and MLP. ``keys`` is ``[B, num_heads, N, head_dim]`` from this block's qkv."""
        return x, state

    def on_block(self, block: int, x: Tensor, state: TokenState) -> tuple[Tensor, TokenState]:
        return x, state

    def on_final(self, x: Tensor, state: TokenState) -> tuple[Tensor, TokenState]:
        """After the last block and the final norm, before restore."""
        return x, state

    @property
    def uses_attention_hook(self) -> bool:
        """True when ``on_attention`` is overridden (the encoder then splits the block at the hook)."""
        return type(self).on_attention is not Reducer.on_attention


class Merger(Reducer):
    """A reducer that combines tokens into fewer, larger ones (ToMe, dCTS): every patch stays live."""

    kind: ClassVar[str] = "merger"


class Pruner(Reducer):
    """A reducer that removes tokens from the live set into the bank (early exit, Cropr)."""

    kind: ClassVar[str] = "pruner"

