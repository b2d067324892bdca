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

Block indices are 0-based everywhere, as Python and timm index ``blocks``: "block 7" is ``blocks[7]``, the
8th block; a hook's ``block`` argument, ``exit_blocks``, Cropr's ``blocks``, schedule budgets (``r_i`` for
block ``i``), stat and loss names (``exit_7``, ``banked_after_block_7``) all use that index.

Capabilities: the encoder, the jobs and the measurement code ask a reducer what it needs instead of keeping
lists of reducer names elsewhere. Every one has a default here; a plugin overrides the ones that apply.

``replaces_embedding`` (class attribute, default False)
    True when ``embed`` builds the initial tokens itself (dCTS / CTS supertokens). The encoder asks it once
    per forward to choose the embedding path; at most one reducer of a model may set it.
``supports_packed`` (class attribute, default False)
    True when the reducer's hooks accept a packed (variable-length, concatenated) batch. Asked by the
    encoder before it packs a batch instead of padding it; no built-in reducer supports packing yet.
``reads_labels`` (property, default False)
    True when the forward reads the ground truth (oracle policies, ``ctx.target``). Asked by the run/eval
    jobs and the cost measurement: they pass the labels to the forward and the GFLOPs count, and skip the
    im/s timing (meaningless for a model that needs labels). ``reads_target`` is its read-only old name.
``needs_fitting(config)`` (classmethod, default False) and ``fitting_key()`` (classmethod, default None)
    Whether a reducer built from the constructor kwargs ``config`` needs a component fitted before the
    segmenter trains (dCTS / CTS: a ``"cnn"`` policy without ``policy_checkpoint``), and the kwarg that
    receives the fitted file (``"policy_checkpoint"``). Asked by the run job before building the model:
    it fits the component (``train-policy``) and passes the file under ``fitting_key()``.
``accepts_schedule()`` (classmethod)
    True when the constructor takes a ``schedule`` argument (ToMe, Cropr, random_prune). Asked by
    ``tokred.structured.reducer_kwargs`` to decide which reducer of a config receives the ``schedule`` group.
``uses_attention_hook`` (property)
    True when ``on_attention`` is overridden; the encoder then splits the block at the hook.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from torch import Tensor, nn

from tokred.state import TokenState

if TYPE_CHECKING:
    from tokred.encoder import EmbedContext

__all__ = ["BackboneInfo", "Reducer", "Merger", "Pruner", "record_budget"]

log = logging.getLogger(__name__)


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
        supports_packed: True when the hooks accept a packed batch (see the module docstring).
    """

    kind: ClassVar[str] = "merger"
    replaces_embedding: ClassVar[bool] = False
    supports_packed: ClassVar[bool] = False

    def __init__(self) -> None:
        super().__init__()
        self.info: BackboneInfo | None = None
        self.progress: float = 1.0  # fraction of training done, for warm-up schedules; 1.0 at inference

    # -- capabilities (module docstring) ---------------------------------------------------------------
    @property
    def reads_labels(self) -> bool:
        """True when the forward reads the ground truth (``ctx.target``); override in oracle reducers."""
        return False

    @property
    def reads_target(self) -> bool:
        """Read-only old name of ``reads_labels``."""
        return self.reads_labels

    @reads_target.setter
    def reads_target(self, value: bool) -> None:
        raise AttributeError(f"{type(self).__name__}.reads_target is read-only; override the reads_labels "
                             "property instead (return True when the forward reads the ground truth)")

    @classmethod
    def needs_fitting(cls, config: Mapping[str, Any]) -> bool:
        """True when a reducer built from the constructor kwargs ``config`` needs a component fitted before
        training (the file then goes to the kwarg ``fitting_key()``). Default: False."""
        return False

    @classmethod
    def fitting_key(cls) -> str | None:
        """The constructor kwarg that receives the fitted component's file; None when nothing is fitted."""
        return None

    @classmethod
    def accepts_schedule(cls) -> bool:
        """True when the constructor takes a ``schedule`` argument (a budget ``Schedule`` or its spec)."""
        return "schedule" in inspect.signature(cls.__init__).parameters

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



def record_budget(state: TokenState, reducer: Reducer, slot: str, block: int, requested: Tensor,
                  removed: Tensor) -> TokenState:
    """Records a budgeted reducer's per-image budget at ``block`` and warns once when it was not honoured.

    Adds the per-image stats ``<slot>_r_requested_<block>`` and ``<slot>_r_<block>`` (``TokenAccounting``
    reports them as ``budgets``: the mean requested and effective ``r`` per block in metrics.json). The
    first time an image gets fewer tokens removed than requested (ToMe's half-the-tokens cap, a pruner's
    last live token), one warning names the reducer, the block and both counts.

    Args:
        slot: ``"merger"`` or ``"pruner"`` (the config group, so both reducers of a model can be told apart).
        requested / removed: ``[B]`` (long) tokens the schedule asked for and tokens actually removed.
    """
    state = state.add_stat(f"{slot}_r_requested_{block}", requested).add_stat(f"{slot}_r_{block}", removed)
    if not getattr(reducer, "_budget_warned", False):
        short = requested - removed
        if bool((short > 0).any()):
            b = int(short.argmax())
            log.warning("%s: the requested budget cannot be honoured: at block %d an image asked for %d tokens "
                        "removed but %d could be (the reducer's cap); metrics.json records the requested and the "
                        "effective r per block (tokens_detail.budgets). Logged once.", type(reducer).__name__, block,
                        int(requested[b]), int(removed[b]))
            object.__setattr__(reducer, "_budget_warned", True)
    return state
