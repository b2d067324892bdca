"""Per-forward token state: which token holds each original patch, token sizes, validity, halted bank.

The state is created once per forward by the encoder and passed explicitly through every reducer hook;
reducers never keep per-forward tensors on ``self``. Every operation returns a new ``TokenState`` and
updates all per-token fields together, so no field can fall out of step with the token tensor ``x``.

Notation (timm names): ``B`` images, ``N`` tokens in ``x`` including the ``P = num_prefix_tokens``
prefix tokens (class token, registers) which always sit at positions ``[0, P)``, ``C = embed_dim``,
``(H0, W0) = grid_size`` patches of the unreduced image and ``N0 = H0 * W0``.

Token map encoding (O(N0) memory, composes by a gather):
    ``token_map[b, p] >= 0``: patch ``p`` is held by live token ``x[b, token_map[b, p]]``.
    ``token_map[b, p] < 0``: patch ``p`` is held by bank slot ``j = -1 - token_map[b, p]``.

Per-token fields (detectron2 ``Instances`` style): ``TokenState.fields`` maps a name to a floating ``[B, N, ...]``
tensor aligned with ``x``; every operation carries them along (merge: size-weighted mean; split: gathered, the
banked rows kept in ``Bank.fields``; unbank: concatenated back). The built-in field ``"pos"`` (``POS``) is the
``[B, N, 2]`` patch-grid centroid ``(row, col)`` in patch units of the patches a token holds, so a merged token
sits at the size-weighted centroid of its members; prefix tokens have no position and hold ``0`` there.
Backbones with relative positions (EVA-02 RoPE) read it; absolute-position ViTs ignore it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

__all__ = ["POS", "Bank", "AuxOutput", "TokenState", "merge_tokens", "bank_code", "patch_centroids"]

#: Name of the per-token position field: ``[B, N, 2]`` (row, col) centroid in patch units.
POS = "pos"


def bank_code(slot: Tensor) -> Tensor:
    """Encodes bank slot indices ``j`` as negative token-map values ``-1 - j`` (and back: it is an involution)."""
    return -1 - slot


@dataclass(frozen=True)
class Bank:
    """Tokens that left the encoder early (halted or pruned), with what they keep.

    Attributes:
        x: ``[B, M, C]`` features at the moment they left.
        size: ``[B, M]`` patches per banked token.
        block: ``[B, M]`` (long) 0-based index of the block after which the token left.
        valid: ``[B, M]`` (bool) False for padding slots (images bank different counts).
        logits: ``[B, M, K]`` kept class logits (early exit), or None when no pruner kept any.
        has_logits: ``[B, M]`` (bool) which slots carry kept logits.
        fields: the banked tokens' per-token fields, ``name -> [B, M, ...]`` (see ``TokenState.fields``).
    """

    x: Tensor
    size: Tensor
    block: Tensor
    valid: Tensor
    logits: Tensor | None = None
    has_logits: Tensor | None = None
    fields: dict[str, Tensor] = field(default_factory=dict)

    @property
    def num_slots(self) -> int:
        return self.x.shape[1]


@dataclass(frozen=True)
class AuxOutput:
    """An auxiliary prediction that contributes a training loss.

    Attributes:
        name: key of the loss in the loss dict (e.g. ``"exit_6"``).
        logits: ``[B, K, H0, W0]`` patch-grid class logits.
        weight: multiplier of its cross-entropy.
        target: ``"upsample"`` (logits bilinearly upsampled to the label's pixels, Segmenter/DToP style)
            or ``"downsample"`` (label nearest-downsampled to the patch grid, Token Cropr Sec. 3.3).
        mask: optional ``[B, H0, W0]`` (bool) cells the prediction covers; the loss ignores the others
            (e.g. cells whose token had already halted before this head).
    """

    name: str
    logits: Tensor
    weight: float = 1.0
    target: str = "upsample"
    mask: Tensor | None = None


def merge_tokens(t: Tensor, size: Tensor, assign: Tensor, n_out: int) -> tuple[Tensor, Tensor]:
    """Size-weighted merge of tokens into slots given an assignment (ToMe Sec. 3, generalised).

    Pure function: compute ``assign`` once (e.g. under ``no_grad``) and apply it to any tensor.

    Args:
        t: ``[B, N, C]`` token features (or any floating per-token field ``[B, N, D]``).
        size: ``[B, N]`` patches per token (weights of the mean).
        assign: ``[B, N]`` (long) destination slot of every token, in ``[0, n_out)``.
        n_out: number of output slots ``N'``.

    Returns:
        ``([B, N', C] size-weighted mean of the tokens sent to each slot, [B, N'] summed sizes)``.
        Slots that receive no token get zeros and size 0.
    """
    B, N, C = t.shape
    w = size.to(t.dtype).unsqueeze(-1)  # [B, N, 1]
    idx = assign.unsqueeze(-1).expand(B, N, C)
    out = t.new_zeros(B, n_out, C).scatter_add(1, idx, t * w)  # [B, N', C]
    new_size = size.new_zeros(B, n_out).scatter_add(1, assign, size)  # [B, N']
    out = out / new_size.to(t.dtype).clamp_min(1e-12).unsqueeze(-1)
    return out, new_size


def patch_centroids(token_map: Tensor, grid_size: tuple[int, int], num_tokens: int,
                    bank_slots: int = 0) -> tuple[Tensor, Tensor]:
    """Centroid ``(row, col)`` in patch units of the patches each live token and each bank slot holds.

    Args:
        token_map: ``[B, N0]`` (long) token map (see the module docstring).
        grid_size: ``(H0, W0)`` patches.
        num_tokens: ``N``, live slots.
        bank_slots: ``M``, bank slots.

    Returns:
        ``([B, N, 2] live centroids, [B, M, 2] bank centroids)``; slots holding no patch (prefix tokens,
        padding) get ``0``.
    """
    B, N0 = token_map.shape
    H0, W0 = grid_size
    p = torch.arange(N0, device=token_map.device)
    rc = torch.stack([p // W0, p % W0], -1).to(torch.float32).expand(B, N0, 2)  # [B, N0, 2]
    slot = torch.where(token_map >= 0, token_map, num_tokens + bank_code(token_map))  # [B, N0] in [0, N + M)
    total = rc.new_zeros(B, num_tokens + bank_slots, 2).scatter_add(1, slot.unsqueeze(-1).expand(B, N0, 2), rc)
    count = rc.new_zeros(B, num_tokens + bank_slots).scatter_add(1, slot, torch.ones_like(rc[..., 0]))
    cent = total / count.clamp_min(1).unsqueeze(-1)
    return cent[:, :num_tokens], cent[:, num_tokens:]


def _take(t: Tensor, idx: Tensor) -> Tensor:
    """Rows ``idx [B, N']`` of a per-token tensor ``[B, N, ...]`` -> ``[B, N', ...]``."""
    if t.dim() == 2:
        return t.gather(1, idx)
    flat = t.reshape(*t.shape[:2], -1)
    out = flat.gather(1, idx.unsqueeze(-1).expand(*idx.shape, flat.shape[-1]))
    return out.reshape(*idx.shape, *t.shape[2:])


@dataclass(frozen=True)
class TokenState:
    """Everything about the current token set except the features ``x`` themselves.

    Attributes:
        grid_size: ``(H0, W0)`` patches of the unreduced image.
        num_prefix_tokens: ``P``, prefix tokens at the front of ``x``; never merged, pruned or restored.
        token_map: ``[B, N0]`` (long) token holding each original patch (see module docstring).
        size: ``[B, N]`` (float) patches per token; prefix tokens have size 1.
        valid: ``[B, N]`` (bool) False for padding slots, or None when every slot is valid.
        bank: halted/pruned tokens, or None while none left.
        proportional_attention: add ``log(size)`` to every key's attention logit (ToMe Sec. 3).
        tokens_per_block: live patch tokens entering each block so far, one ``[B]`` (long) per block.
        aux: auxiliary predictions collected during the forward (exit heads, Cropr heads).
        stats: named per-forward counters, each ``[B]`` (reducers record e.g. halted counts here).
        fields: generic per-token fields, ``name -> [B, N, ...]`` floating tensors aligned with ``x``, kept
            aligned by every operation (``POS`` = ``"pos"``: ``[B, N, 2]`` patch-grid centroid, see module doc).
        taps: ``block -> [B, C, H0, W0]`` restored outputs of the blocks the encoder was asked to tap.
    """

    grid_size: tuple[int, int]
    num_prefix_tokens: int
    token_map: Tensor
    size: Tensor
    valid: Tensor | None = None
    bank: Bank | None = None
    proportional_attention: bool = False
    tokens_per_block: tuple[Tensor, ...] = ()
    aux: tuple[AuxOutput, ...] = ()
    stats: dict[str, Tensor] = field(default_factory=dict)
    fields: dict[str, Tensor] = field(default_factory=dict)
    taps: dict[int, Tensor] = field(default_factory=dict)

    # ------------------------------------------------------------------ construction
    @classmethod
    def initial(cls, batch: int, grid_size: tuple[int, int], num_prefix_tokens: int, device: torch.device,
                dtype: torch.dtype = torch.float32) -> TokenState:
        """State of an unreduced forward: patch ``p`` is held by token ``P + p``, every size 1, ``pos`` its cell."""
        n0 = grid_size[0] * grid_size[1]
        token_map = torch.arange(num_prefix_tokens, num_prefix_tokens + n0, device=device).expand(batch, n0)
        size = torch.ones(batch, num_prefix_tokens + n0, device=device, dtype=dtype)
        state = cls(grid_size=tuple(grid_size), num_prefix_tokens=num_prefix_tokens,
                    token_map=token_map.contiguous(), size=size)
        return state.with_positions()

    def with_field(self, name: str, value: Tensor) -> TokenState:
        """Adds or replaces the per-token field ``name``.

        Args:
            name: field name (``POS`` is tokred's position field).
            value: ``[B, N, ...]`` floating tensor aligned with the current tokens.

        Raises:
            TypeError: ``value`` is not floating point (fields are merged by size-weighted mean).
            ValueError: its leading ``[B, N]`` differs from ``size``'s.
        """
        if not value.is_floating_point():
            raise TypeError(f"per-token field {name!r} must be floating point (merged by size-weighted mean), "
                            f"got {value.dtype}; cast it with .float()")
        if tuple(value.shape[:2]) != tuple(self.size.shape):
            raise ValueError(f"per-token field {name!r} has leading shape {tuple(value.shape[:2])} but the state "
                             f"holds [B, N] = {tuple(self.size.shape)} tokens; give one row per token of x")
        return replace(self, fields={**self.fields, name: value})

    def with_positions(self) -> TokenState:
        """Sets ``fields["pos"]`` (and the bank's) to the centroid of the patches each token holds.

        The encoder calls it after embedding when a state was built without positions (dCTS supertokens: the
        centroid of the ``L x L`` window); afterwards every operation keeps positions up to date.
        """
        m = 0 if self.bank is None else self.bank.num_slots
        live, banked = patch_centroids(self.token_map, self.grid_size, self.size.shape[1], m)
        state = replace(self, fields={**self.fields, POS: live.to(self.size.dtype)})
        if self.bank is not None:
            state = replace(state, bank=replace(self.bank, fields={**self.bank.fields, POS: banked}))
        return state

    @property
    def pos(self) -> Tensor | None:
        """``[B, N, 2]`` per-token patch-grid centroid ``(row, col)`` in patch units, or None when not tracked."""
        return self.fields.get(POS)

    # ------------------------------------------------------------------ queries
    @property
    def batch_size(self) -> int:
        return self.token_map.shape[0]

    @property
    def num_patches(self) -> int:
        """``N0``, patches of the unreduced grid."""
        return self.grid_size[0] * self.grid_size[1]

    def valid_mask(self) -> Tensor:
        """``[B, N]`` (bool) validity of every slot (all True when no padding)."""
        if self.valid is None:
            return torch.ones_like(self.size, dtype=torch.bool)
        return self.valid

    def live_patch_tokens(self) -> Tensor:
        """``[B]`` (long) valid non-prefix tokens per image."""
        n = self.size.shape[1] - self.num_prefix_tokens
        if self.valid is None:
            return torch.full((self.batch_size,), n, dtype=torch.long, device=self.size.device)
        return self.valid[:, self.num_prefix_tokens:].sum(1)

    def attn_bias(self, dtype: torch.dtype) -> Tensor | None:
        """Additive per-key attention bias ``[B, 1, 1, N]``: ``log(size)`` if proportional, ``-inf`` on padding.

        Returns None when neither applies, so attention keeps its fastest fused kernel.
        """
        if not self.proportional_attention and self.valid is None:
            return None
        bias = torch.zeros_like(self.size, dtype=dtype)
        if self.proportional_attention:
            bias = self.size.clamp_min(1).log().to(dtype)
        if self.valid is not None:
            bias = bias.masked_fill(~self.valid, float("-inf"))
        return bias[:, None, None, :]

    # ------------------------------------------------------------------ bookkeeping
    def record_block_entry(self) -> TokenState:
        """Appends the live patch-token count ``[B]`` for the block about to run."""
        return replace(self, tokens_per_block=self.tokens_per_block + (self.live_patch_tokens(),))

    def add_aux(self, aux: AuxOutput) -> TokenState:
        return replace(self, aux=self.aux + (aux,))

    def add_tap(self, block: int, grid: Tensor) -> TokenState:
        """Records the restored output ``[B, C, H0, W0]`` of 0-based block ``block``."""
        return replace(self, taps={**self.taps, block: grid})

    def add_stat(self, name: str, value: Tensor) -> TokenState:
        """Adds ``value`` ``[B]`` to the per-image counter ``name`` (created at zero)."""
        stats = dict(self.stats)
        stats[name] = stats[name] + value if name in stats else value
        return replace(self, stats=stats)

    # ------------------------------------------------------------------ token operations
    def merge(self, x: Tensor, assign: Tensor, n_out: int) -> tuple[Tensor, TokenState]:
        """Merges tokens into ``n_out`` slots by size-weighted mean and updates every field.

        Args:
            x: ``[B, N, C]`` tokens.
            assign: ``[B, N]`` (long) destination slot in ``[0, n_out)`` of every token. Prefix tokens must
                map to themselves (``assign[:, :P] == arange(P)``); padding slots may go anywhere that
                receives only padding, or to a valid slot, whose size they do not change (padding has size 0
                after the first merge; see ``valid``).

        Returns:
            ``(x' [B, n_out, C], state)``; a slot is valid when any valid token went into it. Every per-token
            field is merged by the same size-weighted mean (positions: the centroid of the members' patches).
        """
        size = self.size if self.valid is None else self.size * self.valid
        x_new, size_new = merge_tokens(x, size, assign, n_out)
        fields = {k: _merge_field(v, size, assign, n_out) for k, v in self.fields.items()}
        valid_new = None
        if self.valid is not None:
            hits = torch.zeros(x.shape[0], n_out, dtype=torch.long, device=x.device)
            valid_new = hits.scatter_add(1, assign, self.valid.long()) > 0  # [B, N']
            size_new = torch.where(valid_new, size_new, torch.ones_like(size_new))
        live = self.token_map >= 0
        new_map = torch.where(live, assign.gather(1, self.token_map.clamp_min(0)), self.token_map)
        return x_new, replace(self, token_map=new_map, size=size_new, valid=valid_new, fields=fields)

    def split(self, x: Tensor, keep: Tensor, block: int, logits: Tensor | None = None) -> tuple[Tensor, TokenState]:
        """Keeps the tokens where ``keep`` is True (compacted, order preserved) and banks the other valid ones.

        Images may keep different counts: the output has ``N' = max_b kept_b`` slots and the shorter images
        are padded (``valid`` False). Prefix tokens are always kept.

        Args:
            x: ``[B, N, C]`` tokens.
            keep: ``[B, N]`` (bool) tokens that stay live.
            block: 0-based index of the block after which the banked tokens leave.
            logits: optional ``[B, N, K]`` predictions the banked tokens keep (early exit).

        Returns:
            ``(x' [B, N', C], state)``; per-token fields are gathered with the tokens, the banked rows go to
            ``bank.fields``.
        """
        B, N, C = x.shape
        P = self.num_prefix_tokens
        valid = self.valid_mask()
        keep = keep.clone()
        keep[:, :P] = True
        keep = keep & valid
        leave = valid & ~keep
        # stable compaction: kept tokens first in their order, then the rest
        order_keep = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)  # [B, N]
        n_keep = int(keep.sum(1).max())
        kept_idx = order_keep[:, :n_keep]  # [B, N']
        kept_valid = keep.gather(1, kept_idx)  # [B, N']
        order_leave = torch.argsort((~leave).to(torch.int8), dim=1, stable=True)
        n_leave = int(leave.sum(1).max())
        left_idx = order_leave[:, :n_leave]  # [B, M_new]
        left_valid = leave.gather(1, left_idx)
        # new position of every old token: kept -> index in x', banked -> bank code, padding -> 0 (unused)
        m_old = 0 if self.bank is None else self.bank.num_slots
        new_pos = torch.zeros(B, N, dtype=torch.long, device=x.device)
        ar_keep = torch.arange(n_keep, device=x.device).expand(B, n_keep)
        new_pos = new_pos.scatter(1, kept_idx, torch.where(kept_valid, ar_keep, 0))
        ar_leave = torch.arange(n_leave, device=x.device).expand(B, n_leave) + m_old
        banked_pos = torch.where(left_valid, bank_code(ar_leave), new_pos.gather(1, left_idx))
        new_pos = new_pos.scatter(1, left_idx, banked_pos)
        live = self.token_map >= 0
        new_map = torch.where(live, new_pos.gather(1, self.token_map.clamp_min(0)), self.token_map)

        n_banked = left_valid.sum(1)  # [B]
        x_new = _take(x, kept_idx)
        size_new = _take(self.size, kept_idx)
        all_valid = bool(kept_valid.all())
        state = replace(self, token_map=new_map, size=size_new, valid=None if all_valid else kept_valid,
                        fields={k: _take(v, kept_idx) for k, v in self.fields.items()})
        state = state.add_stat("banked", n_banked).add_stat(f"banked_after_block_{block}", n_banked)
        state = state.add_stat("banked_patches", (_take(self.size, left_idx) * left_valid).sum(1))
        if n_leave > 0:
            state = state._bank_append(
                x=_take(x, left_idx), size=_take(self.size, left_idx),
                block=torch.full((B, n_leave), block, dtype=torch.long, device=x.device), valid=left_valid,
                logits=None if logits is None else _take(logits, left_idx),
                fields={k: _take(v, left_idx) for k, v in self.fields.items()})
        return x_new, state

    def _bank_append(self, x: Tensor, size: Tensor, block: Tensor, valid: Tensor, logits: Tensor | None,
                     fields: dict[str, Tensor]) -> TokenState:
        B, M = size.shape
        has = torch.full((B, M), logits is not None, dtype=torch.bool, device=x.device) & valid
        if self.bank is None:
            bank = Bank(x=x, size=size, block=block, valid=valid, logits=logits,
                        has_logits=has if logits is not None else None, fields=dict(fields))
            return replace(self, bank=bank)
        old = self.bank
        new_logits, new_has = old.logits, old.has_logits
        if logits is not None or old.logits is not None:
            K = (logits if logits is not None else old.logits).shape[-1]
            ref = logits if logits is not None else old.logits
            lo_old = old.logits if old.logits is not None else ref.new_zeros(B, old.num_slots, K)
            lo_new = logits if logits is not None else ref.new_zeros(B, M, K)
            h_old = old.has_logits if old.has_logits is not None else torch.zeros_like(old.valid)
            new_logits = torch.cat([lo_old, lo_new], 1)
            new_has = torch.cat([h_old, has], 1)
        bank = Bank(x=torch.cat([old.x, x], 1), size=torch.cat([old.size, size], 1),
                    block=torch.cat([old.block, block], 1), valid=torch.cat([old.valid, valid], 1),
                    logits=new_logits, has_logits=new_has,
                    fields=_cat_fields(old.fields, old.num_slots, fields, M))
        return replace(self, bank=bank)

    def unbank(self, x: Tensor) -> tuple[Tensor, TokenState]:
        """Returns every banked token to the live set, appended after the live tokens (Cropr's last-layer fusion).

        Args:
            x: ``[B, N, C]`` live tokens.

        Returns:
            ``(x' [B, N + M, C], state)`` with the bank emptied and the token map pointing at the new slots; the
            banked tokens' fields (positions) come back with them.
        """
        if self.bank is None:
            return x, self
        bank = self.bank
        N = x.shape[1]
        x_new = torch.cat([x, bank.x.to(x.dtype)], 1)
        size_new = torch.cat([self.size, bank.size], 1)
        valid_new = torch.cat([self.valid_mask(), bank.valid], 1)
        new_map = torch.where(self.token_map >= 0, self.token_map, N + bank_code(self.token_map))
        fields = _cat_fields(self.fields, N, bank.fields, bank.num_slots)
        return x_new, replace(self, token_map=new_map, size=size_new,
                              valid=None if bool(valid_new.all()) else valid_new, bank=None, fields=fields)

    # ------------------------------------------------------------------ back to the grid
    def restore(self, x: Tensor, bank_x: Tensor | None = None) -> Tensor:
        """Scatters token features back to the full patch grid: every patch takes its token's features.

        The only un-merge path of tokred; vectorised (one gather), no per-image loop.

        Args:
            x: ``[B, N, C]`` live token features (prefix tokens included, ignored).
            bank_x: ``[B, M, C]`` features for the banked tokens (default: the features they were banked with).

        Returns:
            ``[B, C, H0, W0]`` grid features.
        """
        B, N, C = x.shape
        src = x
        idx = self.token_map
        if self.bank is not None:
            bx = self.bank.x if bank_x is None else bank_x
            src = torch.cat([x, bx.to(x.dtype)], 1)
            idx = torch.where(idx >= 0, idx, N + bank_code(idx))
        out = src.gather(1, idx.unsqueeze(-1).expand(B, idx.shape[1], C))  # [B, N0, C]
        H0, W0 = self.grid_size
        return out.transpose(1, 2).reshape(B, C, H0, W0)

    def restore_live(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """Grid of per-token values for live tokens only (banked cells zero), e.g. an exit head's logits.

        Args:
            t: ``[B, N, D]`` per-token values aligned with ``x``.

        Returns:
            ``([B, D, H0, W0] values, [B, H0, W0] bool mask of cells held by live tokens)``.
        """
        B, N, D = t.shape
        live = self.token_map >= 0  # [B, N0]
        out = t.gather(1, self.token_map.clamp_min(0).unsqueeze(-1).expand(B, live.shape[1], D))
        out = out * live.unsqueeze(-1).to(out.dtype)
        H0, W0 = self.grid_size
        return out.transpose(1, 2).reshape(B, D, H0, W0), live.reshape(B, H0, W0)

    def restore_bank_logits(self) -> tuple[Tensor, Tensor] | None:
        """Kept logits of banked tokens on the grid.

        Returns:
            ``([B, K, H0, W0] logits, [B, H0, W0] bool mask of cells whose token kept logits)``, or None when
            no banked token kept logits.
        """
        bank = self.bank
        if bank is None or bank.logits is None:
            return None
        B, M, K = bank.logits.shape
        banked = self.token_map < 0
        slot = bank_code(self.token_map).clamp(0, M - 1)  # [B, N0]
        logits = bank.logits.gather(1, slot.unsqueeze(-1).expand(B, slot.shape[1], K))
        mask = banked & bank.has_logits.gather(1, slot)
        H0, W0 = self.grid_size
        return logits.transpose(1, 2).reshape(B, K, H0, W0), mask.reshape(B, H0, W0)

    def cell_exit_block(self, depth: int) -> Tensor:
        """``[B, H0, W0]`` (long) block after which each cell's token left; ``depth`` for cells live to the end."""
        B = self.batch_size
        out = torch.full_like(self.token_map, depth)
        if self.bank is not None:
            M = self.bank.num_slots
            slot = bank_code(self.token_map).clamp(0, M - 1)
            out = torch.where(self.token_map < 0, self.bank.block.gather(1, slot), out)
        return out.reshape(B, *self.grid_size)


def _merge_field(t: Tensor, size: Tensor, assign: Tensor, n_out: int) -> Tensor:
    """Size-weighted mean of a per-token field ``[B, N, ...]`` into ``[B, n_out, ...]`` slots."""
    flat = t.reshape(*t.shape[:2], -1)
    out, _ = merge_tokens(flat, size, assign, n_out)
    return out.reshape(t.shape[0], n_out, *t.shape[2:])


def _cat_fields(a: dict[str, Tensor], n_a: int, b: dict[str, Tensor], n_b: int) -> dict[str, Tensor]:
    """Concatenates two field dicts along the token axis; a field one side lacks is zero-filled there."""
    out = {}
    for k in dict.fromkeys([*a, *b]):
        ref = a[k] if k in a else b[k]
        ta = a[k] if k in a else ref.new_zeros(ref.shape[0], n_a, *ref.shape[2:])
        tb = b[k] if k in b else ref.new_zeros(ref.shape[0], n_b, *ref.shape[2:])
        out[k] = torch.cat([ta, tb.to(ta.dtype)], 1)
    return out
