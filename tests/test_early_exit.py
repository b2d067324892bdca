"""Tests of the STEP / DToP early-exit pruner (tokred.reducers.early_exit) on timm's test_vit (depth 6)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch import Tensor

from tokred import Merger, TokenState, build_segmenter, create_reducer
from tokred.reducers.early_exit import EarlyExit, default_exit_blocks, default_threshold, select_halted

K = 5
CROP = (64, 96)  # px -> grid 4 x 6 patches
N0 = (CROP[0] // 16) * (CROP[1] // 16)
P = 1  # test_vit has a class token
DEPTH = 6


def _seg(pruner="early_exit", merger="none", seed=0, **kwargs):
    torch.manual_seed(seed)
    return build_segmenter("test_vit", num_classes=K, crop_size=CROP, merger=merger, pruner=pruner,
                           pruner_kwargs=kwargs if pruner == "early_exit" else None)


def _images(n=2, seed=1) -> Tensor:
    return torch.randn(n, 3, *CROP, generator=torch.Generator().manual_seed(seed))


def _sharpen(seg, linear_scale=40.0, atm_scale=80.0) -> None:
    """Scales the exit heads' output weights so that some (not all) tokens become confident."""
    ee = seg.reducers[1]
    with torch.no_grad():
        for h in ee.heads:
            if ee.head == "linear":
                h.fc.weight.mul_(linear_scale)
            else:
                h.to_mask.weight.mul_(atm_scale)


def _force_class(seg, head_index=0, cls=2, value=20.0) -> Tensor:
    """Makes one linear exit head predict ``cls`` for every token with the same confidence; returns its logits."""
    head = seg.reducers[1].heads[head_index]
    with torch.no_grad():
        head.fc.weight.zero_()
        head.fc.bias.zero_()
        head.fc.bias[cls] = value
    return head.fc.bias.detach().clone()


def _exit_block_of_cells(out) -> Tensor:
    """[B, N0] 0-based block after which each cell's token halted (DEPTH when live to the end)."""
    return out.state.cell_exit_block(DEPTH).flatten(1)


class _PerturbTokens(Merger):
    """Test merger: after block ``block`` adds noise to the patch tokens at positions ``>= first``."""

    def __init__(self, block: int, first: int) -> None:
        super().__init__()
        self.block, self.first = block, first

    def on_block(self, block, x, state):
        if block != self.block:
            return x, state
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(7))
        noise[:, :self.first] = 0
        return x + 10 * noise, state


class _PairMerger(Merger):
    """Test merger: after block 0, merges a content-dependent number of token pairs per image (padding, size 2)."""

    def on_block(self, block, x, state):
        if block != 0:
            return x, state
        B, N, _ = x.shape
        n0 = N - P
        m = (1 + (x[:, P:, 0] > 0).sum(1) // 4).clamp_max(n0 // 2)  # [B] pairs merged, from the content
        p = torch.arange(n0).expand(B, n0)
        slot = torch.where(p < 2 * m[:, None], p // 2, p - m[:, None])  # [B, N0] first m pairs share a slot
        assign = torch.cat([torch.arange(P).expand(B, P), P + slot], 1)
        state = replace(state, valid=state.valid_mask())  # turn on validity tracking so empty slots are padding
        return state.merge(x, assign, int(P + n0 - m.min()))


# ---------------------------------------------------------------------------------------------- construction
def test_registry_defaults_and_config():
    ee = create_reducer("early_exit")
    assert isinstance(ee, EarlyExit) and ee.kind == "pruner"
    seg = _seg()
    ee = seg.reducers[1]
    assert ee.exit_blocks == default_exit_blocks(DEPTH) == [1, 3]  # 0-based: blocks[1], blocks[3]
    assert ee.threshold == default_threshold(DEPTH) == 0.9
    assert len(ee.heads) == 2
    assert ee.extra_config() == {"exit_blocks": [1, 3], "threshold": 0.9, "top_k": 5, "target_accuracy": None,
                                 "head": "linear", "aux_weight": 1.0, "halting": True}
    assert default_exit_blocks(24) == [7, 15] and default_threshold(24) == 0.95
    assert default_exit_blocks(12) == [5, 7] and default_threshold(12) == 0.9


def test_default_exit_blocks_are_the_same_physical_blocks_as_the_papers_1_based_ones():
    for depth in range(2, 31):
        one_based = [8, 16] if depth >= 24 else [6, 8] if depth >= 9 else sorted(
            {min(max(b, 1), depth - 1) for b in (depth // 3, 2 * depth // 3)})
        assert default_exit_blocks(depth) == [b - 1 for b in one_based], depth


def test_exit_block_index_is_the_block_whose_output_the_head_reads():
    seg = _seg(exit_blocks=[0], threshold=0.05, top_k=1).eval()  # untrained heads: every token a candidate
    with torch.no_grad():
        out = seg(torch.randn(2, 3, *CROP, generator=torch.Generator().manual_seed(0)))
    counts = [t.tolist() for t in out.state.tokens_per_block]
    assert counts[0] == [N0, N0] and counts[1][0] < N0  # halted after blocks[0], before blocks[1]
    assert "halted_exit_0" in out.state.stats and int(out.state.stats["banked_after_block_0"].sum()) > 0


@pytest.mark.parametrize("kwargs, param", [
    ({"exit_blocks": [-1, 2]}, "exit_blocks"),
    ({"exit_blocks": [3, 2]}, "exit_blocks"),
    ({"exit_blocks": [2, 2]}, "exit_blocks"),
    ({"exit_blocks": []}, "exit_blocks"),
    ({"exit_blocks": [1.5]}, "exit_blocks"),
    ({"threshold": 0.0}, "threshold"),
    ({"threshold": 1.5}, "threshold"),
    ({"top_k": -1}, "top_k"),
    ({"head": "mlp"}, "head"),
    ({"aux_weight": -1.0}, "aux_weight"),
])
def test_bad_arguments_name_the_parameter(kwargs, param):
    with pytest.raises(ValueError, match=param):
        EarlyExit(**kwargs)


@pytest.mark.parametrize("blocks", [[5], [1, 6]])
def test_exit_after_last_block_rejected_in_setup(blocks):
    with pytest.raises(ValueError, match="exit_blocks"):
        _seg(exit_blocks=blocks)


# ---------------------------------------------------------------------------------------------- selection rule
def _reference_halt(logits: Tensor, eligible: Tensor, threshold: float, top_k: int) -> Tensor:
    """Per-image, per-class loop version of DToP's rule (the specification select_halted must meet)."""
    prob = logits.softmax(-1)
    conf, pred = prob.max(-1)
    halt = torch.zeros_like(eligible)
    for b in range(logits.shape[0]):
        cand = eligible[b] & (conf[b] > threshold)
        for c in pred[b][cand].unique().tolist():
            idx = (cand & (pred[b] == c)).nonzero().flatten()
            order = torch.argsort(conf[b, idx], descending=True, stable=True)
            halt[b, idx[order[top_k:]]] = True
    return halt


@pytest.mark.parametrize("top_k", [0, 1, 3, 5])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_select_halted_matches_reference(top_k, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, 40, 4, generator=g) * 4
    eligible = torch.rand(3, 40, generator=g) > 0.2
    halt, pred = select_halted(logits, eligible, 0.8, top_k)
    torch.testing.assert_close(halt, _reference_halt(logits, eligible, 0.8, top_k))
    torch.testing.assert_close(pred, logits.argmax(-1))
    assert 0 < int(halt.sum()) < int(eligible.sum())


def test_select_halted_keeps_the_top_k_most_confident_of_each_class():
    N, top_k = 20, 4
    logits = torch.zeros(1, N, 3)
    logits[0, :10, 0] = torch.linspace(5, 9, 10)  # 10 confident class-0 tokens, most confident last
    logits[0, 10:13, 1] = 8.0 + torch.arange(3.0)  # 3 confident class-1 tokens (fewer than top_k)
    logits[0, 13:, 2] = 0.5  # 7 unconfident tokens
    eligible = torch.ones(1, N, dtype=torch.bool)
    eligible[0, 9] = False  # the most confident class-0 token is not eligible (e.g. padding)
    halt, _ = select_halted(logits, eligible, 0.9, top_k)
    expected = torch.zeros(1, N, dtype=torch.bool)
    expected[0, :5] = True  # class 0: eligible 0..8, the 4 most confident (5..8) stay, 0..4 halt
    torch.testing.assert_close(halt, expected)


# ---------------------------------------------------------------------------------------------- equivalences
@pytest.mark.parametrize("head", ["linear", "atm"])
@pytest.mark.parametrize("off", [{"threshold": 1.0}, {"halting": False}])
def test_no_halting_reproduces_the_model_without_pruner(head, off):
    base = _seg(pruner="none")
    seg = _seg(seed=3, head=head, **off)
    result = seg.load_state_dict(base.state_dict(), strict=False)
    assert not result.unexpected_keys
    assert result.missing_keys and all(".heads." in k for k in result.missing_keys)
    _sharpen(seg)  # heads that would halt many tokens if halting were on
    img = _images()
    base.eval(), seg.eval()
    with torch.no_grad():
        ref, out = base(img), seg(img)
    torch.testing.assert_close(out.logits, ref.logits)
    assert out.state.bank is None
    base.train(), seg.train()  # training: still the same prediction, plus the heads' auxiliary outputs
    with torch.no_grad():
        ref, out = base(img), seg(img)
    torch.testing.assert_close(out.logits, ref.logits)
    assert [a.name for a in out.state.aux] == ["exit_1", "exit_3"]


@pytest.mark.parametrize("head", ["linear", "atm"])
def test_batch_of_two_equals_two_singles(head):
    seg = _seg(head=head, top_k=2).eval()
    _sharpen(seg)
    img = _images()
    with torch.no_grad():
        both = seg(img)
        singles = [seg(img[i:i + 1]) for i in range(2)]
    halted = both.state.stats["banked"]
    assert halted[0] != halted[1] and int(halted.min()) > 0  # different counts: the batch was padded
    for i, one in enumerate(singles):
        torch.testing.assert_close(both.logits[i:i + 1], one.logits, atol=1e-4, rtol=1e-4)
        for key, value in one.state.stats.items():
            torch.testing.assert_close(both.state.stats[key][i:i + 1], value)


# ---------------------------------------------------------------------------------------------- halting
def test_halted_cells_take_their_exit_prediction():
    seg = _seg(top_k=1).eval()
    _sharpen(seg)
    captured = []
    seg.reducers[1].heads[0].register_forward_hook(lambda m, i, o: captured.append(o.detach()))
    with torch.no_grad():
        out = seg(_images())
    exit_block = _exit_block_of_cells(out)  # [B, N0]
    halted = exit_block == 1  # first exit: after blocks[1]
    assert 0 < int(halted.sum()) < halted.numel()
    head_logits = captured[0][:, P:]  # [B, N0, K]: no token left before the first exit, token P + p is patch p
    grid = out.grid_logits.flatten(2).transpose(1, 2)  # [B, N0, K]
    torch.testing.assert_close(grid[halted], head_logits[halted])
    live_end = exit_block == DEPTH
    assert not torch.allclose(grid[live_end], head_logits[live_end])
    torch.testing.assert_close(out.state.stats["halted_exit_1"], halted.sum(1))


def test_top_k_per_class_stays_live_end_to_end():
    top_k = 3
    seg = _seg(top_k=top_k).eval()
    bias = _force_class(seg, cls=2)  # every token predicts class 2 with the same confidence
    with torch.no_grad():
        out = seg(_images())
    stats = out.state.stats
    torch.testing.assert_close(stats["halted_exit_1"], torch.full((2,), N0 - top_k))
    expected = torch.zeros(2, K, dtype=torch.long)
    expected[:, 2] = N0 - top_k
    torch.testing.assert_close(stats["halted_per_class"], expected)
    assert out.state.tokens_per_block[2].tolist() == [top_k, top_k]  # live patch tokens entering block 3
    exit_block = _exit_block_of_cells(out)
    assert (exit_block[:, :top_k] != 1).all() and (exit_block[:, top_k:] == 1).all()  # ties: earliest stay
    grid = out.grid_logits.flatten(2).transpose(1, 2)  # [B, N0, K]
    torch.testing.assert_close(grid[:, top_k:], bias.expand(2, N0 - top_k, K))


def test_halted_tokens_influence_nothing_afterwards():
    """Noise added to the tokens that halt, at the exit itself, changes no live cell's prediction."""
    top_k = 3
    outs = {}
    for threshold in (0.9, 1.0):
        for perturb in (False, True):
            merger = _PerturbTokens(block=1, first=P + top_k) if perturb else "none"
            seg = _seg(merger=merger, top_k=top_k, threshold=threshold).eval()
            _force_class(seg)  # at exit 2 every token but the first top_k halts, whatever its features
            with torch.no_grad():
                outs[threshold, perturb] = seg(_images()).grid_logits
    torch.testing.assert_close(outs[0.9, True], outs[0.9, False])
    # control: without halting, the same noise reaches the first top_k cells through attention
    assert not torch.allclose(outs[1.0, True][..., 0, :top_k], outs[1.0, False][..., 0, :top_k])


# ---------------------------------------------------------------------------------------------- training
@pytest.mark.parametrize("head", ["linear", "atm"])
def test_aux_losses_and_gradients_in_training(head):
    seg = _seg(head=head, top_k=1, aux_weight=0.5).train()
    _sharpen(seg)
    img = _images()
    target = torch.randint(0, K, (2, *CROP), generator=torch.Generator().manual_seed(0))
    out = seg(img)
    aux = {a.name: a for a in out.state.aux}
    assert list(aux) == ["exit_1", "exit_3"]
    H0, W0 = out.state.grid_size
    for a in aux.values():
        assert a.logits.shape == (2, K, H0, W0) and a.weight == 0.5 and a.mask.shape == (2, H0, W0)
    exit_block = out.state.cell_exit_block(DEPTH)  # [B, H0, W0]
    assert aux["exit_1"].mask.all()
    halted_first = exit_block == 1
    assert halted_first.any()
    torch.testing.assert_close(aux["exit_3"].mask, ~halted_first)  # cells halted at exit 1 are ignored
    losses = seg.losses(out, target)
    assert {"loss_main", "loss_exit_1", "loss_exit_3", "loss"} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())
    losses["loss"].backward()
    for j, h in enumerate(seg.reducers[1].heads):
        grads = [p.grad for p in h.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads), f"head {j}"
        assert any(g.abs().sum() > 0 for g in grads), f"head {j}"


def test_main_loss_trains_the_head_that_halted_cells():
    seg = _seg(top_k=1).train()
    _sharpen(seg)
    out = seg(_images())
    assert int(out.state.stats["halted_exit_1"].sum()) > 0
    target = torch.randint(0, K, (2, *CROP), generator=torch.Generator().manual_seed(0))
    seg.losses(out, target)["loss_main"].backward()
    assert seg.reducers[1].heads[0].fc.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------- composition
def test_composes_after_a_merger_with_supertokens_and_padding():
    seg = _seg(merger=_PairMerger(), top_k=0).eval()
    bias = _force_class(seg, cls=4)  # every live token halts at the first exit
    with torch.no_grad():
        out = seg(_images())
    state: TokenState = out.state
    bank = state.bank
    tokens_after_merge = state.tokens_per_block[1]  # [B] live tokens entering block 1 (after the merge)
    assert tokens_after_merge[0] != tokens_after_merge[1]  # padding in the batch
    assert (bank.size[bank.valid] == 2).any()  # supertokens halted
    torch.testing.assert_close(state.stats["halted_exit_1"], tokens_after_merge)  # padding never halted
    torch.testing.assert_close(state.stats["banked_patches"], torch.full((2,), float(N0)))
    assert state.tokens_per_block[2].tolist() == [0, 0]
    grid = out.grid_logits.flatten(2).transpose(1, 2)  # [B, N0, K]
    torch.testing.assert_close(grid, bias.expand(2, N0, K))  # every cell of a halted supertoken


@pytest.mark.parametrize("head", ["linear", "atm"])
def test_composes_after_a_merger_batch_equals_singles(head):
    seg = _seg(merger=_PairMerger(), head=head, top_k=1).eval()
    _sharpen(seg)
    img = _images()
    with torch.no_grad():
        both = seg(img)
        singles = [seg(img[i:i + 1]) for i in range(2)]
    state = both.state
    assert int(state.stats["banked"].min()) > 0
    live = (state.size * state.valid_mask())[:, P:].sum(1)
    banked = (state.bank.size * state.bank.valid).sum(1)
    torch.testing.assert_close(live + banked, torch.full((2,), float(N0)))  # every patch held exactly once
    for i, one in enumerate(singles):
        torch.testing.assert_close(both.logits[i:i + 1], one.logits, atol=1e-4, rtol=1e-4)
