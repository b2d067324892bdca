"""ToMe (Bolya et al., ICLR 2023) in tokred: the matching maths, the merger in the encoder loop, dense restore."""

import copy
import inspect
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch.testing import assert_close

from tokred.encoder import Encoder
from tokred.models.backbone import build_backbone
from tokred.models.segmenter import build_segmenter
from tokred.reducers.base import BackboneInfo, Pruner
from tokred.reducers.registry import create_reducer
from tokred.reducers.tome import ToMe, bipartite_soft_matching
from tokred.schedules import Explicit, KeepRatio
from tokred.state import TokenState, merge_tokens

CROP = (64, 96)  # px -> 4 x 6 patches of 16 px on test_vit (embed_dim 64, depth 6, 2 heads, 1 class token)
K = 5
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "merger" / "tome.yaml"


def _image(batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, *CROP, generator=torch.Generator().manual_seed(seed))


def _segmenter(seed: int = 0, **kwargs) -> torch.nn.Module:
    torch.manual_seed(seed)
    kwargs.setdefault("merger", "tome")
    return build_segmenter("test_vit", num_classes=K, crop_size=CROP, **kwargs)


def _encoder(reducer: ToMe, **backbone_kwargs) -> tuple[Encoder, torch.nn.Module]:
    torch.manual_seed(0)
    vit = build_backbone("test_vit", CROP, **backbone_kwargs).eval()
    enc = Encoder(vit, [reducer]).eval()
    reducer.setup(BackboneInfo(embed_dim=enc.embed_dim, num_heads=enc.num_heads, depth=enc.depth,
                               patch_size=enc.patch_size, grid_size=enc.grid_size_for(CROP),
                               num_prefix_tokens=enc.num_prefix_tokens, num_classes=K))
    return enc, vit


# ---------------------------------------------------------------------------------------------- matching
def _hand_metric() -> torch.Tensor:
    """Two images, prefix + 6 tokens [a0, b0, a1, b1, a2, b2] in 3-d (e1, e2, e3 = unit vectors)."""
    e1, e2, e3 = torch.eye(3)
    img0 = [e3, e2 + 0.1 * e1, e1, e1 + 0.5 * e3, e2, e3, e3]  # a0~b1 (0.995), a1~b0 (0.894), a2=b2 (1.0)
    img1 = [e3, e1, e1, e2 + 0.1 * e3, e2, e3 + 0.5 * e2, e3]  # a0=b0 (1.0), a1~b1 (0.995), a2~b2 (0.894)
    return torch.stack([torch.stack(img0), torch.stack(img1)])  # [2, 7, 3]


@pytest.mark.parametrize("r, expected", [
    (1, [[0, 1, 2, 3, 4, 5, 5], [0, 1, 1, 2, 3, 4, 5]]),
    (2, [[0, 3, 1, 2, 3, 4, 4], [0, 1, 1, 2, 2, 3, 4]]),
    (3, [[0, 2, 1, 1, 2, 3, 3], [0, 1, 1, 2, 2, 3, 3]]),
])
def test_matching_hand_checked(r, expected):
    # the prefix token equals a2 and b2 (e3) but is protected; survivors keep their relative order
    m = bipartite_soft_matching(_hand_metric(), r, num_protected=1)
    assert m.assign.tolist() == expected
    assert m.n_out == 7 - r and m.num_merged.tolist() == [r, r] and m.max_merged == r


def test_matching_hand_checked_with_padding():
    # b2 (last slot) is padding: a2 (= e3) may not pick it; its ties (0 with b0 and b1) go to the first, b0
    valid = torch.ones(2, 7, dtype=torch.bool)
    valid[:, 6] = False
    m = bipartite_soft_matching(_hand_metric(), 2, num_protected=1, valid=valid)
    assert m.assign[0].tolist() == [0, 2, 1, 1, 2, 3, 4]  # a0 -> b1, a1 -> b0; padding last
    assert m.n_out == 5
    # at most the valid B tokens can be merged into (2 here), whatever r asks
    assert bipartite_soft_matching(_hand_metric(), 3, 1, valid).num_merged.tolist() == [2, 2]
    # padding in the middle (b0, e.g. after a bank rejoined): surviving padded slots move behind the valid ones
    valid = torch.ones(2, 7, dtype=torch.bool)
    valid[:, 2] = False
    m = bipartite_soft_matching(_hand_metric(), 1, num_protected=1, valid=valid)
    assert m.assign[0].tolist() == [0, 1, 5, 2, 3, 4, 4]  # a2 -> b2; b0 (padding) last


@pytest.mark.parametrize("num_patches", [7, 8])
def test_r_is_clipped_to_half_the_mergeable_tokens(num_patches):
    metric = torch.randn(2, 1 + num_patches, 4, generator=torch.Generator().manual_seed(0))
    m = bipartite_soft_matching(metric, 100, num_protected=1)
    half = num_patches // 2
    assert m.num_merged.tolist() == [half, half] and m.n_out == 1 + num_patches - half
    assert m.assign[:, 0].tolist() == [0, 0]  # prefix maps to itself
    assert (m.assign.max(1).values == m.n_out - 1).all()  # every output slot is used


def test_matching_rejects_bad_input():
    with pytest.raises(ValueError, match="r must be"):
        bipartite_soft_matching(torch.randn(1, 5, 3), -1)
    with pytest.raises(ValueError, match="num_protected"):
        bipartite_soft_matching(torch.randn(1, 5, 3), 1, num_protected=6)


def _plain_reference_merge(x, metric, size, r, class_token):
    """A plain, loop-based reading of the reference ToMe step for ONE image: A/B alternate over the whole
    sequence, the class token (index 0, in A) never merges, the r best-matched A tokens go into their B
    partners by size-weighted sum, output = unmerged A (original order with a class token, else by
    descending similarity), then every B token in order. Returns (x' [N', C], size' [N'])."""
    n = x.shape[0]
    m = metric / metric.norm(dim=-1, keepdim=True)
    a_idx, b_idx = list(range(0, n, 2)), list(range(1, n, 2))
    sim = m[a_idx] @ m[b_idx].T
    if class_token:
        sim[0, :] = float("-inf")
    r = min(r, (n - int(class_token)) // 2)
    best, dst = sim.max(dim=1)
    by_sim = sorted(range(len(a_idx)), key=lambda i: -float(best[i]))
    merged, unmerged = by_sim[:r], by_sim[r:]
    if class_token:
        unmerged = sorted(unmerged)
    weighted = x * size[:, None]
    out_b, size_b = weighted[b_idx].clone(), size[b_idx].clone()
    for i in merged:
        out_b[dst[i]] += weighted[a_idx[i]]
        size_b[dst[i]] += size[a_idx[i]]
    keep_a = [a_idx[i] for i in unmerged]
    sizes = torch.cat([size[keep_a], size_b])
    return torch.cat([weighted[keep_a], out_b]) / sizes[:, None], sizes


@pytest.mark.parametrize("n, r, class_token", [(25, 5, True), (26, 12, True), (24, 7, False), (9, 100, True)])
def test_reference_partition_equals_a_plain_reference_implementation(n, r, class_token):
    g = torch.Generator().manual_seed(n + r)
    B, C = 2, 6
    x, metric = torch.randn(B, n, C, generator=g), torch.randn(B, n, 4, generator=g)
    size = torch.randint(1, 4, (B, n), generator=g).float()
    if class_token:
        size[:, 0] = 1.0
    m = bipartite_soft_matching(metric, r, num_protected=int(class_token), partition="reference")
    x2, size2 = merge_tokens(x, size, m.assign, m.n_out)
    for b in range(B):
        want_x, want_size = _plain_reference_merge(x[b], metric[b], size[b], r, class_token)
        assert_close(x2[b], want_x)
        assert_close(size2[b], want_size)
    # the default partition differs (A/B over the patches only, raster order kept)
    d = bipartite_soft_matching(metric, r, num_protected=int(class_token))
    assert d.num_merged.tolist() == m.num_merged.tolist()
    assert not torch.equal(d.assign, m.assign)


def test_reference_partition_in_the_model():
    img = _image()
    seg = _segmenter(merger_kwargs={"r": 3, "partition": "reference"}).eval()
    ref = _segmenter(merger_kwargs={"r": 3}).eval()
    with torch.no_grad():
        out, base = seg(img), ref(img)
        singles = torch.cat([seg(img[i:i + 1]).logits for i in range(2)])
    assert [int(t[0]) for t in out.state.tokens_per_block] == [int(t[0]) for t in base.state.tokens_per_block]
    assert out.state.token_map.max() < out.state.size.shape[1]
    assert_close(out.logits, singles)
    assert not torch.allclose(out.logits, base.logits, atol=1e-5)
    with pytest.raises(ValueError, match="partition"):
        ToMe(partition="raster")


# ---------------------------------------------------------------------------------------------- merge properties
def test_merge_of_piecewise_constant_map_restores_exactly():
    g = torch.Generator().manual_seed(0)
    B, (H0, W0), C, P = 2, (6, 8), 16, 1
    labels = torch.randint(0, 4, (B, H0 * W0), generator=g)
    region = torch.randn(4, C, generator=g)
    grid = region[labels].transpose(1, 2).reshape(B, C, H0, W0)  # features equal within each region
    x = torch.cat([torch.randn(B, P, C, generator=g), region[labels]], 1)
    state = TokenState.initial(B, (H0, W0), P, torch.device("cpu"))
    while True:  # merge only equal tokens (similarity 1), as many as every image allows, until none is left
        a, b = F.normalize(x[:, P::2], dim=-1), F.normalize(x[:, P + 1::2], dim=-1)
        r = int(((a @ b.transpose(1, 2)).max(-1).values > 0.999).sum(1).min())
        if r == 0:
            break
        m = bipartite_soft_matching(x, r, P)
        x, state = state.merge(x, m.assign, m.n_out)
    assert x.shape[1] - P < H0 * W0 // 2  # merging really happened
    assert_close(state.restore(x), grid)
    assert_close(state.size[:, P:].sum(1), torch.full((B,), float(H0 * W0)))


def test_merge_keeps_the_size_weighted_sum():
    g = torch.Generator().manual_seed(1)
    B, P, N0, C = 2, 1, 24, 8
    x = torch.randn(B, P + N0, C, generator=g)
    state = TokenState.initial(B, (4, 6), P, torch.device("cpu"))
    size = torch.cat([torch.ones(B, P), torch.randint(1, 5, (B, N0), generator=g).float()], 1)
    state = TokenState(grid_size=state.grid_size, num_prefix_tokens=P, token_map=state.token_map, size=size)
    m = bipartite_soft_matching(torch.randn(B, P + N0, 4, generator=g), 5, P)
    x2, st2 = state.merge(x, m.assign, m.n_out)
    assert x2.shape[1] == P + N0 - 5
    assert_close((st2.size[:, P:, None] * x2[:, P:]).sum(1), (size[:, P:, None] * x[:, P:]).sum(1))
    assert_close(st2.size.sum(1), size.sum(1))
    assert_close(x2[:, :P], x[:, :P])


def _padded_state(seed: int = 2):
    """A state with padding: image 0 keeps 20 of 24 patch tokens, image 1 keeps 14 (the rest banked)."""
    g = torch.Generator().manual_seed(seed)
    B, P, C = 2, 1, 8
    x = torch.randn(B, P + 24, C, generator=g)
    state = TokenState.initial(B, (4, 6), P, torch.device("cpu"))
    keep = torch.zeros(B, P + 24, dtype=torch.bool)
    keep[0, P + torch.randperm(24, generator=g)[:20]] = True
    keep[1, P + torch.randperm(24, generator=g)[:14]] = True
    x, state = state.split(x, keep, block=0)
    assert state.valid is not None and state.live_patch_tokens().tolist() == [20, 14]
    return x, state


@pytest.mark.parametrize("r", [4, 100])
def test_merge_with_padding(r):
    x, state = _padded_state()
    P, N = 1, x.shape[1]
    before = state.restore(x)
    metric = torch.randn(2, N, 4, generator=torch.Generator().manual_seed(3))
    m = bipartite_soft_matching(metric, r, P, state.valid)
    valid_a, valid_b = state.valid[:, P::2], state.valid[:, P + 1::2]
    assert m.num_merged.tolist() == torch.minimum(valid_a.sum(1), valid_b.sum(1)).clamp(max=r).tolist()
    x2, st2 = state.merge(x, m.assign, m.n_out)
    # padded slots never merge into valid ones nor receive merges: their destinations hold only padding
    hit_valid = torch.zeros(2, m.n_out, dtype=torch.long).scatter_add(1, m.assign, state.valid.long()) > 0
    pad_dest = torch.zeros(2, m.n_out, dtype=torch.long).scatter_add(1, m.assign, (~state.valid).long()) > 0
    assert not (hit_valid & pad_dest).any()
    assert st2.valid.tolist() == hit_valid.tolist()
    assert st2.live_patch_tokens().tolist() == (state.live_patch_tokens() - m.num_merged).tolist()
    live = (st2.size * st2.valid)[:, P:].sum(1)
    assert_close(live + st2.stats["banked_patches"], torch.full((2,), 24.0))
    # cells of tokens neither merged nor merged into, and banked cells, restore unchanged
    counts = torch.zeros(2, m.n_out, dtype=torch.long).scatter_add(1, m.assign, state.valid.long())
    untouched_tok = counts.gather(1, m.assign) == 1  # [B, N] the token is alone in its slot
    cell_untouched = (state.token_map < 0) | untouched_tok.gather(1, state.token_map.clamp_min(0))
    after = st2.restore(x2)
    mask = cell_untouched.reshape(2, 1, 4, 6).expand_as(after)
    assert mask.any() and (~mask).any()
    assert_close(after[mask], before[mask])


# ---------------------------------------------------------------------------------------------- in the model
@pytest.mark.parametrize("init_values", [None, 0.1], ids=["plain", "layerscale"])
@pytest.mark.parametrize("proportional", [True, False])
def test_zero_budget_reproduces_plain_vit(init_values, proportional):
    kwargs = {} if init_values is None else {"init_values": init_values}
    enc, vit = _encoder(ToMe(r=0, proportional_attention=proportional), **kwargs)
    img = _image()
    with torch.no_grad():
        out, state = enc(img)
        assert_close(out, vit.forward_features(img))
    assert state.size.shape[1] == out.shape[1] == 1 + 24


def test_warmup_at_progress_zero_reproduces_plain_vit():
    tome = ToMe(r=4, schedule={"kind": "warmup", "fraction": 0.5})
    enc, vit = _encoder(tome, init_values=0.1)
    tome.set_progress(0.0)
    img = _image()
    with torch.no_grad():
        assert_close(enc(img)[0], vit.forward_features(img))
        tome.set_progress(1.0)
        assert enc(img)[0].shape[1] < 1 + 24


def test_schedules_drive_the_token_counts():
    seg = _segmenter(merger_kwargs={"r": 2, "schedule": {"kind": "linear", "inflection": -1}}).eval()
    with torch.no_grad():
        out = seg(_image())
    tome = seg.reducers[0]
    budgets = tome.budgets(24)
    counts = [int(t[0]) for t in out.state.tokens_per_block]
    assert counts[0] == 24
    assert [a - b for a, b in zip(counts, counts[1:])] == budgets[:-1]
    assert budgets[0] == 4 and budgets[-1] == 0  # ToMe's (r, -1): from 2r down to 0
    assert out.state.stats["merged"].tolist() == [sum(budgets)] * 2
    # keep_ratio: ceil(N0 * keep_ratio) tokens remain after the last block
    seg = _segmenter(merger_kwargs={"r": 0, "schedule": {"kind": "keep_ratio", "keep_ratio": 0.4}}).eval()
    with torch.no_grad():
        out = seg(_image())
    assert out.state.live_patch_tokens().tolist() == [math.ceil(24 * 0.4)] * 2


def test_restore_gives_every_patch_its_merged_token():
    seg = _segmenter(merger_kwargs={"r": 4}).eval()
    with torch.no_grad():
        x, state = seg.encoder(_image())
    grid = state.restore(x)  # [B, C, H0, W0]
    assert grid.shape == (2, 64, 4, 6)
    cells = grid.flatten(2).transpose(1, 2)  # [B, N0, C]
    assert_close(cells, x.gather(1, state.token_map[..., None].expand(-1, -1, 64)))
    # each live token's size equals the number of cells it holds
    held = torch.zeros_like(state.size).scatter_add(1, state.token_map, torch.ones(2, 24))
    assert_close(held[:, 1:], state.size[:, 1:])


def test_gradient_checkpointing_gives_same_loss_and_gradients():
    seg = _segmenter(merger_kwargs={"r": 3}).train()
    seg_ckpt = copy.deepcopy(seg)
    seg_ckpt.encoder.grad_checkpointing = True
    img = _image()
    target = torch.randint(0, K, (2, *CROP), generator=torch.Generator().manual_seed(1))
    losses = []
    for model in (seg, seg_ckpt):
        loss = model.losses(model(img), target)["loss"]
        loss.backward()
        losses.append(loss.detach())
    assert_close(losses[0], losses[1])
    grads = dict(seg.named_parameters())
    for name, p in seg_ckpt.named_parameters():
        assert p.grad is not None, name
        assert_close(p.grad, grads[name].grad, msg=name)


def test_batch_of_two_equals_two_singles():
    seg = _segmenter(merger_kwargs={"r": 3}).eval()
    img = _image()
    with torch.no_grad():
        both = seg(img).logits
        singles = torch.cat([seg(img[i:i + 1]).logits for i in range(2)])
    assert_close(both, singles)


def test_proportional_attention_changes_outputs_and_can_be_switched_off():
    img = _image()
    outs = {}
    for proportional in (True, False):
        seg = _segmenter(merger_kwargs={"r": 4, "proportional_attention": proportional}).eval()
        with torch.no_grad():
            outs[proportional] = seg(img)
    on, off = outs[True], outs[False]
    assert on.state.proportional_attention and not off.state.proportional_attention
    assert off.state.attn_bias(torch.float32) is None
    assert (on.state.size > 1).any()
    assert not torch.allclose(on.logits, off.logits, atol=1e-4)


class _SignPruner(Pruner):
    """Test pruner: after block 1 banks the patch tokens whose first feature is negative (counts differ)."""

    def on_block(self, block, x, state):
        if block != 1:
            return x, state
        return state.split(x, x[..., 0] > 0, block)


def test_composes_after_a_pruner_split_and_batch_equals_singles():
    seg = _segmenter(merger=ToMe(r=2), pruner=_SignPruner()).eval()
    img = _image(seed=4)
    with torch.no_grad():
        out = seg(img)
        singles = [seg(img[i:i + 1]) for i in range(2)]
    st = out.state
    assert st.valid is not None  # the images kept different counts: ToMe merged with padding
    assert st.stats["banked"][0] != st.stats["banked"][1]
    assert (st.stats["merged"] > 0).all()
    live = (st.size * st.valid)[:, 1:].sum(1)
    assert_close(live + st.stats["banked_patches"], torch.full((2,), 24.0))
    assert torch.isfinite(out.logits).all()
    assert_close(out.logits, torch.cat([s.logits for s in singles]))
    assert [s.state.stats["merged"].item() for s in singles] == st.stats["merged"].tolist()


# ---------------------------------------------------------------------------------------------- configuration
def test_bad_configuration_raises():
    with pytest.raises(ValueError, match="r must be"):
        ToMe(r=-1)
    with pytest.raises(ValueError, match="schedule"):
        ToMe(schedule=3)
    with pytest.raises(ValueError, match="keep_ratio"):
        ToMe(schedule={"kind": "keep_ratio", "keep_ratio": 1.5})
    with pytest.raises(ValueError, match="depth"):
        _segmenter(merger=ToMe(schedule=Explicit([1] * 7)))
    tome = ToMe(r=2)
    with pytest.raises(RuntimeError, match="setup"):
        tome.budgets(24)


def test_registry_config_file_and_extra_config():
    tome = create_reducer("tome", r=3, schedule={"kind": "keep_ratio", "keep_ratio": 0.5})
    assert isinstance(tome, ToMe) and isinstance(tome.schedule, KeepRatio)
    assert tome.extra_config() == {"r": 3, "schedule": tome.schedule.config(), "proportional_attention": True,
                                   "partition": "patches"}
    cfg = yaml.safe_load(CONFIG.read_text())
    assert cfg.pop("name") == "tome"
    params = inspect.signature(ToMe.__init__).parameters
    for key, value in cfg.items():
        assert params[key].default == value, key
    assert create_reducer("tome", **cfg).r == cfg["r"]
