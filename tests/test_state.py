"""Property tests of TokenState: the bookkeeping every reducer relies on."""

import pytest
import torch
from torch.testing import assert_close

from tokred.state import TokenState, merge_tokens

B, H0, W0, C, P = 3, 4, 6, 5, 1


def _grid_tokens(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    grid = torch.randn(B, C, H0, W0, generator=g)
    x = torch.cat([torch.randn(B, P, C, generator=g), grid.flatten(2).transpose(1, 2)], 1)
    return grid, x, TokenState.initial(B, (H0, W0), P, torch.device("cpu"))


def _pair_assign(n: int) -> torch.Tensor:
    """Prefix to itself, patch tokens merged in pairs (i, i+1)."""
    return torch.cat([torch.arange(P), P + torch.arange(n - P) // 2]).expand(B, n)


def test_initial_restore_is_identity():
    grid, x, st = _grid_tokens()
    assert_close(st.restore(x), grid)
    assert st.live_patch_tokens().tolist() == [H0 * W0] * B


def test_split_keeps_order_banks_rest_and_sizes_sum_to_n0():
    grid, x, st = _grid_tokens()
    keep = torch.rand(B, x.shape[1], generator=torch.Generator().manual_seed(1)) > 0.4
    x2, st2 = st.split(x, keep, block=2)
    kept_counts = keep[:, P:].sum(1)
    assert st2.live_patch_tokens().tolist() == kept_counts.tolist()
    assert (st2.live_patch_tokens() + st2.stats["banked"]).tolist() == [H0 * W0] * B
    # live + banked sizes cover every patch exactly once
    live_size = (st2.size[:, P:] * st2.valid_mask()[:, P:]).sum(1)
    assert_close(live_size + st2.stats["banked_patches"], torch.full((B,), float(H0 * W0)))
    assert_close(st2.restore(x2), grid)  # banked cells restore their banked features
    # kept tokens keep their relative order
    for b in range(B):
        n = int(kept_counts[b]) + P
        assert_close(x2[b, :n], x[b][keep[b] | (torch.arange(x.shape[1]) < P)])
    assert (st2.cell_exit_block(6).reshape(B, -1) == torch.where(keep[:, P:], 6, 2)).all()


def test_merge_of_piecewise_constant_map_restores_exactly():
    _, x, st = _grid_tokens()
    # make neighbouring pairs identical, then merge them: restore must give the same grid back
    pairs = x[:, P:].reshape(B, -1, 2, C)[:, :, :1].expand(-1, -1, 2, -1).reshape(B, -1, C)
    x = torch.cat([x[:, :P], pairs], 1)
    grid = st.restore(x)
    n = x.shape[1]
    x2, st2 = st.merge(x, _pair_assign(n), P + (n - P) // 2)
    assert_close(st2.restore(x2), grid)
    assert (st2.size[:, P:] == 2).all()


def test_size_weighted_merge_keeps_the_size_weighted_mean():
    _, x, st = _grid_tokens()
    n = x.shape[1]
    x2, st2 = st.merge(x, _pair_assign(n), P + (n - P) // 2)
    x3, st3 = st2.merge(x2, _pair_assign(x2.shape[1]), P + (x2.shape[1] - P + 1) // 2)
    before = (x[:, P:] * st.size[:, P:, None]).sum(1)
    after = (x3[:, P:] * st3.size[:, P:, None]).sum(1)
    assert_close(after, before, rtol=1e-5, atol=1e-5)
    assert_close(st3.size[:, P:].sum(1), torch.full((B,), float(H0 * W0)))


def test_padded_slots_get_no_attention_and_never_restore():
    grid, x, st = _grid_tokens()
    keep = torch.zeros(B, x.shape[1], dtype=torch.bool)
    keep[0, P:P + 10] = True
    keep[1, P:P + 4] = True  # image 2 keeps none -> heavy padding
    x2, st2 = st.split(x, keep, block=0)
    assert st2.valid is not None and st2.valid.sum(1).tolist() == [P + 10, P + 4, P]
    bias = st2.attn_bias(torch.float32)
    assert torch.isinf(bias[:, 0, 0][~st2.valid]).all() and torch.isfinite(bias[:, 0, 0][st2.valid]).all()
    # poison padding: restore unchanged
    poisoned = torch.where(st2.valid[..., None], x2, torch.full_like(x2, 1e9))
    assert_close(st2.restore(poisoned), grid)
    # attention through padded batch: a padded key changes nothing for valid queries
    q = torch.randn(B, 1, x2.shape[1], C)
    k = torch.randn(B, 1, x2.shape[1], C)
    v = torch.randn(B, 1, x2.shape[1], C)
    out1 = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    v2 = torch.where(st2.valid[:, None, :, None], v, torch.full_like(v, 1e6))
    out2 = torch.nn.functional.scaled_dot_product_attention(q, k, v2, attn_mask=bias)
    assert_close(out1, out2)


def test_merge_with_padding_keeps_padding_invalid():
    grid, x, st = _grid_tokens()
    keep = torch.ones(B, x.shape[1], dtype=torch.bool)
    keep[1, P + 5:] = False
    x2, st2 = st.split(x, keep, block=0)
    n = x2.shape[1]
    x3, st3 = st2.merge(x2, _pair_assign(n), P + (n - P + 1) // 2)
    assert st3.valid is not None
    live = st3.size[:, P:] * st3.valid[:, P:]
    assert_close(live.sum(1) + st3.stats["banked_patches"], torch.full((B,), float(H0 * W0)))
    # image 1: five tokens survived -> 3 merged slots valid
    assert int(st3.valid[1, P:].sum()) == 3


def test_unbank_returns_every_patch_exactly_once():
    grid, x, st = _grid_tokens()
    keep = torch.rand(B, x.shape[1], generator=torch.Generator().manual_seed(3)) > 0.5
    x2, st2 = st.split(x, keep, block=1)
    x3, st3 = st2.unbank(x2)
    assert st3.bank is None
    assert_close(st3.restore(x3), grid)
    idx = st3.token_map
    assert (idx >= 0).all()
    # no two patches point at the same token: every token holds exactly one patch here
    for b in range(B):
        assert idx[b].unique().numel() == H0 * W0


def test_bank_logits_and_restore_live():
    grid, x, st = _grid_tokens()
    keep = torch.ones(B, x.shape[1], dtype=torch.bool)
    keep[:, P] = False  # first patch halts with its logits
    logits = torch.randn(B, x.shape[1], 3)
    grid_live, live = st.restore_live(logits)
    assert live.all()
    x2, st2 = st.split(x, keep, block=4, logits=logits)
    bank_logits, mask = st2.restore_bank_logits()
    assert mask.reshape(B, -1)[:, 0].all() and not mask.reshape(B, -1)[:, 1:].any()
    assert_close(bank_logits.reshape(B, 3, -1)[:, :, 0], logits[:, P])
    _, live2 = st2.restore_live(torch.zeros(B, x2.shape[1], 3))
    assert not live2.reshape(B, -1)[:, 0].any()


def test_merge_tokens_rejects_nothing_and_handles_empty_slots():
    t = torch.arange(6.0).reshape(1, 3, 2)
    out, size = merge_tokens(t, torch.ones(1, 3), torch.tensor([[0, 0, 2]]), 4)
    assert_close(out[0, 0], t[0, :2].mean(0))
    assert size.tolist() == [[2.0, 0.0, 1.0, 0.0]]
    assert_close(out[0, 1], torch.zeros(2))


@pytest.mark.parametrize("prop", [False, True])
def test_attn_bias_none_when_unneeded(prop):
    _, _, st = _grid_tokens()
    from dataclasses import replace

    st = replace(st, proportional_attention=prop)
    assert (st.attn_bias(torch.float32) is None) == (not prop)


def test_initial_positions_are_patch_cells_and_prefix_has_none():
    _, _, st = _grid_tokens()
    assert st.pos.shape == (B, P + H0 * W0, 2)
    assert (st.pos[:, :P] == 0).all()
    assert st.pos[0, P + 7].tolist() == [7 // W0, 7 % W0]  # (row, col) in patch units


def test_fields_follow_merge_split_and_unbank():
    """Through a merge, a split (into the bank) and an unbank, ``pos`` stays the centroid of the held patches and a
    custom field stays the size-weighted mean of its patches' values."""
    from tokred.state import patch_centroids

    grid, x, st = _grid_tokens()
    val = torch.randn(B, x.shape[1], 3, generator=torch.Generator().manual_seed(4))
    st = st.with_field("val", val)
    n = x.shape[1]
    x2, st2 = st.merge(x, _pair_assign(n), P + (n - P) // 2)
    assert_close(st2.fields["val"][:, P:], val[:, P:].reshape(B, -1, 2, 3).mean(2))
    keep = torch.rand(B, x2.shape[1], generator=torch.Generator().manual_seed(5)) > 0.5
    x3, st3 = st2.split(x2, keep, block=1)
    x4, st4 = st3.unbank(x3)
    for s, m in ((st2, 0), (st3, st3.bank.num_slots), (st4, 0)):
        live, banked = patch_centroids(s.token_map, s.grid_size, s.size.shape[1], m)
        v = s.valid_mask()
        v[:, :P] = False
        assert_close(s.pos[v], live[v])
        if s.bank is not None:
            assert_close(s.bank.fields["pos"][s.bank.valid], banked[s.bank.valid])
            assert set(s.bank.fields) == {"pos", "val"}
    # every patch's field value is recovered through the token that now holds it
    per_patch = st4.fields["val"].gather(1, st4.token_map.unsqueeze(-1).expand(-1, -1, 3))  # [B, N0, 3]
    assert_close(per_patch, val[:, P:].reshape(B, -1, 2, 3).mean(2).repeat_interleave(2, 1))


def test_with_field_rejects_misaligned_or_integer_fields():
    _, x, st = _grid_tokens()
    with pytest.raises(ValueError, match="one row per token"):
        st.with_field("bad", torch.zeros(B, x.shape[1] - 1, 2))
    with pytest.raises(TypeError, match="floating point"):
        st.with_field("bad", torch.zeros(B, x.shape[1], dtype=torch.long))

