"""Tests of the Token Cropr pruner (Bergner et al., CVPR 2025): scorer, selection, aux losses, fusion, errors."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from omegaconf import OmegaConf
from torch import Tensor

from tokred import build_segmenter, create_reducer
from tokred.reducers.base import BackboneInfo, Merger
from tokred.reducers.cropr import Cropr, CroprModule
from tokred.state import TokenState

CROP = (64, 96)  # px -> grid 4 x 6 patches of 16 px
GRID = (4, 6)
N0 = GRID[0] * GRID[1]
K = 5
DEPTH = 6  # timm test_vit


def _seg(pruner="cropr", merger="none", seed: int = 0, **pruner_kwargs):
    torch.manual_seed(seed)
    return build_segmenter("test_vit", num_classes=K, crop_size=CROP, merger=merger, pruner=pruner,
                           pruner_kwargs=pruner_kwargs if isinstance(pruner, str) and pruner != "none" else None)


def _images(batch: int = 2, seed: int = 1, size: tuple[int, int] = CROP) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, *size, generator=g)


def _counts(state: TokenState) -> list[list[int]]:
    return [t.tolist() for t in state.tokens_per_block]


def _expected_counts(r: int, blocks: list[int], fusion: bool, batch: int = 2) -> list[list[int]]:
    out, n = [], N0
    for i in range(DEPTH):
        out.append([N0 if (fusion and i == DEPTH - 1) else n] * batch)
        if i in blocks:
            n -= r
    return out


# ---------------------------------------------------------------------- equivalences


@pytest.mark.parametrize("train", [False, True])
def test_r0_reproduces_unpruned_model(train):
    seg = _seg(r=0)
    plain = _seg(pruner="none", seed=123)
    missing, unexpected = plain.load_state_dict(seg.state_dict(), strict=False)
    assert missing == []
    assert unexpected and all(k.startswith("encoder.reducers.1.") for k in unexpected)
    seg.train(train)
    plain.train(train)
    img = _images()
    out, ref = seg(img), plain(img)
    torch.testing.assert_close(out.logits, ref.logits)
    assert out.state.bank is None
    assert len(out.state.aux) == (4 if train else 0)


def _query_logits(mod: CroprModule, x: Tensor) -> Tensor:
    """Full (unscaled) per-head logits ``[B, h, M, N]`` of every query on every token: the paper's score
    before its sums over heads and queries."""
    B, N, C = x.shape
    h, hd = mod.num_heads, mod.head_dim
    q = mod.queries.reshape(-1, h, hd).transpose(0, 1)  # [h, M, hd]
    k = mod.keys(x).reshape(B, N, h, hd).transpose(1, 2)  # [B, h, N, hd]
    return q.unsqueeze(0) @ k.transpose(-2, -1)


@pytest.mark.parametrize("num_heads,key_proj,pre_norm", [(1, False, False), (2, True, True), (4, True, False)])
def test_summed_query_score_equals_full_query_key_score(num_heads, key_proj, pre_norm):
    torch.manual_seed(0)
    mod = CroprModule(embed_dim=32, num_queries=12, num_classes=3, num_heads=num_heads, key_proj=key_proj,
                      pre_norm=pre_norm)
    x = torch.randn(2, 9, 32)
    full = _query_logits(mod, x)  # [B, h, M, N]
    assert full.shape == (2, num_heads, 12, 9)
    torch.testing.assert_close(mod.score(x), full.sum((1, 2)), rtol=1e-5, atol=1e-4)


def test_batch_of_two_equals_two_singles():
    seg = _seg(r=3).eval()
    img = _images()
    both = seg(img)
    for b in range(2):
        single = seg(img[b:b + 1])
        torch.testing.assert_close(both.logits[b:b + 1], single.logits, rtol=1e-5, atol=1e-5)
        assert torch.equal(both.state.token_map[b:b + 1], single.state.token_map)


# ---------------------------------------------------------------------- training path


def test_aux_loss_trains_cropr_only_and_main_loss_trains_backbone():
    seg = _seg(r=3).train()
    img = _images()
    target = torch.randint(0, K, (2, *CROP), generator=torch.Generator().manual_seed(2))
    out = seg(img)
    names = [a.name for a in out.state.aux]
    assert names == [f"cropr_{i}" for i in range(DEPTH - 2)]
    for aux in out.state.aux:
        assert aux.logits.shape == (2, K, *GRID) and aux.target == "downsample" and aux.weight == 1.0
    losses = seg.losses(out, target)
    aux_loss = sum(v for k, v in losses.items() if k.startswith("loss_cropr_"))
    torch.testing.assert_close(losses["loss"], losses["loss_main"] + aux_loss)
    aux_loss.backward(retain_graph=True)
    cropr = seg.reducers[1]
    for name, p in [*seg.encoder.vit.named_parameters(), *seg.decoder.named_parameters()]:
        assert p.grad is None or not p.grad.any(), f"aux loss reached {name}"
    for mod in cropr.cropr_modules:
        assert mod.queries.grad is not None and mod.queries.grad.abs().sum() > 0
        assert mod.head.weight.grad is not None and mod.head.weight.grad.abs().sum() > 0
    seg.zero_grad(set_to_none=True)
    losses["loss_main"].backward()
    assert seg.encoder.vit.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    for mod in cropr.cropr_modules:  # selection is not differentiable: the main loss leaves the queries alone
        assert mod.queries.grad is None or not mod.queries.grad.any()


def test_aux_parts_not_run_in_eval():
    seg = _seg(r=3).eval()
    cropr = seg.reducers[1]
    calls = []
    for mod in cropr.cropr_modules:
        mod.mlp.register_forward_hook(lambda *a: calls.append("mlp"))
        mod.head.register_forward_hook(lambda *a: calls.append("head"))
    out = seg(_images())
    assert calls == [] and out.state.aux == ()
    seg.train()
    seg(_images())
    assert calls.count("head") == len(cropr.cropr_modules)


# ---------------------------------------------------------------------- fusion and restore


def _info(depth: int = DEPTH, grid: tuple[int, int] = GRID, prefix: int = 1) -> BackboneInfo:
    return BackboneInfo(embed_dim=16, num_heads=2, depth=depth, patch_size=(16, 16), grid_size=grid,
                        num_prefix_tokens=prefix, num_classes=3)


def _drive(cropr: Cropr, x: Tensor, state: TokenState) -> tuple[Tensor, TokenState]:
    """Runs the pruner's hooks around identity 'blocks'."""
    for i in range(cropr.info.depth):
        x, state = cropr.on_block_start(i, x, state)
        x, state = cropr.on_block(i, x, state)
    return x, state


@pytest.mark.parametrize("fusion", [True, False])
def test_restore_returns_every_patch_once_in_raster_order(fusion):
    torch.manual_seed(0)
    cropr = Cropr(r=4, last_layer_fusion=fusion)
    cropr.setup(_info())
    cropr.eval()
    B, P = 2, 1
    x = torch.randn(B, P + N0, 16)
    x[..., 0] = torch.arange(-1, N0).float()  # channel 0 = patch index (prefix -1)
    state = TokenState.initial(B, GRID, P, x.device)
    x, state = _drive(cropr, x, state)
    idx_grid = torch.arange(N0).float().reshape(GRID).expand(B, *GRID)
    if fusion:
        assert state.bank is None and x.shape[1] == P + N0
        assert (state.token_map >= 0).all()
        assert torch.equal(state.token_map.sort(1).values, torch.arange(P, P + N0).expand(B, N0))
        assert not torch.equal(state.token_map, torch.arange(P, P + N0).expand(B, N0))  # order was changed
        torch.testing.assert_close(state.restore(x)[:, 0], idx_grid)
    else:
        assert x.shape[1] == P + N0 - 4 * (DEPTH - 2)
        assert int((state.token_map < 0).sum()) == B * 4 * (DEPTH - 2)
        torch.testing.assert_close(state.restore(x)[:, 0], idx_grid)  # banked features restored in place


def test_pipeline_fusion_runs_last_block_on_all_tokens():
    seg = _seg(r=3).eval()
    out = seg(_images())
    st = out.state
    assert st.bank is None and st.tokens_per_block[-1].tolist() == [N0, N0]
    assert torch.equal(st.token_map.sort(1).values, torch.arange(1, 1 + N0).expand(2, N0))
    seg_nf = _seg(r=3, last_layer_fusion=False).eval()
    st = seg_nf(_images()).state
    assert st.bank is not None and st.bank.valid.sum(1).tolist() == [3 * (DEPTH - 2)] * 2
    assert out.logits.shape == (2, K, *CROP)


# ---------------------------------------------------------------------- schedules


@pytest.mark.parametrize("r,blocks,fusion", [(3, None, True), (3, None, False), (5, [1, 3], True), (2, [0, 4], False)])
def test_tokens_per_block_follow_r_per_module(r, blocks, fusion):
    seg = _seg(r=r, blocks=blocks, last_layer_fusion=fusion).eval()
    out = seg(_images())
    mods = list(range(DEPTH - 2)) if blocks is None else blocks
    assert _counts(out.state) == _expected_counts(r, mods, fusion)
    assert out.state.stats["banked"].tolist() == [r * len(mods)] * 2


@pytest.mark.parametrize("progress,r_eff", [(0.0, 0), (0.25, 2), (0.5, 4), (1.0, 4)])
def test_warmup_ramps_r_from_zero(progress, r_eff):
    seg = _seg(r=4, schedule={"kind": "warmup", "fraction": 0.5}).train()
    seg.set_progress(progress)
    out = seg(_images())
    assert _counts(out.state) == _expected_counts(r_eff, list(range(DEPTH - 2)), True)
    assert len(out.state.aux) == DEPTH - 2  # aux heads train from the start, also while nothing is pruned


# ---------------------------------------------------------------------- bad input


@pytest.mark.parametrize("kwargs,match", [
    ({"r": 6}, "r=6"),  # 4 modules x 6 = all 24 patches
    ({"r": 2, "blocks": [5]}, "blocks"),  # after the last block
    ({"r": 2, "blocks": [-1, 2]}, "blocks"),
    ({"r": 2, "blocks": [2, 1]}, "strictly increasing"),
    ({"r": 2, "blocks": [1, 1]}, "strictly increasing"),
    ({"r": -1}, "r must be"),
    ({"r": 2, "aux_weight": -1.0}, "aux_weight"),
    ({"r": 2, "num_queries": 7}, "num_queries"),
    ({"r": 2, "num_heads": 3}, "num_heads"),
    ({"schedule": {"kind": "explicit", "values": [20, 4]}}, "removes too many"),
])
def test_bad_configuration_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _seg(**kwargs)


def test_coarser_query_grid():
    seg = _seg(r=2, num_queries=6).train()  # (4 // 2) * (6 // 2)
    out = seg(_images())
    assert all(a.logits.shape == (2, K, 2, 3) for a in out.state.aux)
    losses = seg.losses(out, torch.zeros(2, *CROP, dtype=torch.long))
    assert torch.isfinite(losses["loss"])


def test_budget_is_clipped_at_forward_time_on_small_images():
    seg = _seg(r=5).eval()  # fits 24 patches (24 - 4 * 5 = 4), not 2 x 2 = 4 patches
    out = seg(_images(size=(32, 32)))
    counts = torch.stack(out.state.tokens_per_block)  # [depth, B]
    assert counts.min() >= 1 and counts[-1].tolist() == [4, 4]
    assert counts[DEPTH - 2].tolist() == [1, 1]


# ---------------------------------------------------------------------- composition with mergers


class _UnevenPairMerger(Merger):
    """Test merger: image 0 merges patches (0, 1) and (2, 3) into two supertokens, image 1 merges nothing;
    the two slots image 0 no longer needs become padding."""

    kind: ClassVar[str] = "merger"

    def on_embed(self, x, state, ctx):
        B, N, _ = x.shape
        P = state.num_prefix_tokens
        assign = torch.arange(N).expand(B, N).clone()
        a0 = torch.cat([torch.arange(P), torch.tensor([P, P, P + 1, P + 1]), torch.arange(P + 2, N - 2)])
        assign[0] = a0
        x, state = state.merge(x, assign, N)
        return x, replace(state, valid=state.size > 0)


@pytest.mark.parametrize("fusion", [True, False])
def test_composes_with_padded_supertokens(fusion):
    seg = _seg(merger=_UnevenPairMerger(), r=3, last_layer_fusion=fusion).eval()
    out = seg(_images())
    st = out.state
    counts = _counts(st)
    assert counts[0] == [N0 - 2, N0]
    for i in range(1, DEPTH - 1):
        assert counts[i] == [N0 - 2 - 3 * i, N0 - 3 * i]
    valid = st.valid_mask()
    if fusion:
        assert st.bank is None and counts[-1] == [N0 - 2, N0]
        assert (st.token_map >= 0).all()
        torch.testing.assert_close((st.size * valid)[:, 1:].sum(1), torch.full((2,), float(N0)))
    else:
        bank = st.bank
        assert bank.valid.sum(1).tolist() == [3 * (DEPTH - 2)] * 2
        assert (bank.size[bank.valid] >= 1).all()  # padding never banked
        live = (st.size * valid)[:, 1:].sum(1)
        torch.testing.assert_close(live + (bank.size * bank.valid).sum(1), torch.full((2,), float(N0)))
    assert st.token_map[0, 0] == st.token_map[0, 1] and st.token_map[0, 2] == st.token_map[0, 3]
    bank_x = None if st.bank is None else torch.randn(2, st.bank.num_slots, 4)
    grid = st.restore(torch.randn(2, st.size.shape[1], 4), bank_x)
    torch.testing.assert_close(grid[0, :, 0, 0], grid[0, :, 0, 1])
    seg.train()
    out = seg(_images())
    losses = seg.losses(out, torch.randint(0, K, (2, *CROP)))
    losses["loss"].backward()
    assert torch.isfinite(losses["loss"])


# ---------------------------------------------------------------------- config and registry


def test_config_file_builds_the_reducer():
    cfg = OmegaConf.to_container(OmegaConf.load(Path(__file__).parents[1] / "configs" / "pruner" / "cropr.yaml"))
    assert cfg.pop("name") == "cropr"
    reducer = create_reducer("cropr", **cfg)
    assert isinstance(reducer, Cropr) and reducer.kind == "pruner"
    reducer.setup(_info(depth=12, grid=(16, 16)))
    extra = reducer.extra_config()
    assert extra["r"] == cfg["r"] and extra["blocks"] == list(range(10)) and extra["num_queries"] == 256
    assert extra["schedule"] == {"kind": "constant", "r": cfg["r"]}


# ---------------------------------------------------------------------- reference options


def test_first_extra_removes_more_in_the_first_module_only():
    base = _seg(r=3).eval()
    ref = _seg(r=3, first_extra=1).eval()
    with torch.no_grad():
        c0, c1 = _counts(base(_images()).state), _counts(ref(_images()).state)
    assert c1[1] == [c0[1][0] - 1] * 2  # entering block 1, after the first module (block 0)
    assert [a[0] - b[0] for a, b in zip(c0[1:DEPTH - 1], c1[1:DEPTH - 1])] == [1] * (DEPTH - 2)  # one more, once
    assert ref.reducers[1].extra_config()["first_extra"] == 1
    with pytest.raises(ValueError, match="first_extra"):
        Cropr(first_extra=-1)
    with pytest.raises(ValueError, match="removes too many"):
        _seg(r=5, first_extra=5)


def test_reference_query_init_is_truncated_at_two_std():
    C, M = 64, 400
    std = C ** -0.5
    torch.manual_seed(0)
    ref = CroprModule(C, M, 3, query_init="reference").queries.detach()
    torch.manual_seed(0)
    normal = CroprModule(C, M, 3).queries.detach()
    assert ref.abs().max() <= 2 * std + 1e-6
    assert (normal.abs() > 2 * std).float().mean() > 0.02  # about 4.6% of a normal lie beyond 2 std
    assert 0.7 * std < float(ref.std()) < std  # truncation lowers the spread a little
    with pytest.raises(ValueError, match="query_init"):
        Cropr(query_init="xavier")
    seg = _seg(r=2, query_init="reference")
    assert all(m.queries.abs().max() <= 2 * seg.encoder.embed_dim ** -0.5 + 1e-6
               for m in seg.reducers[1].cropr_modules)
