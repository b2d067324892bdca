"""dCTS / CTS: quadtree partition, window labels, supertoken embedding, policy network and its training."""

from __future__ import annotations

import inspect
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch.testing import assert_close
from torch.utils.data import Dataset

from tokred import EmbedContext, build_segmenter, create_reducer
from tokred.policy import (
    PolicyNet,
    load_policy_checkpoint,
    oracle_scores,
    quadtree_partition,
    save_policy,
    topk_partition,
    train_policy,
    window_labels,
)
from tokred.policy.network import read_policy_config, resolve_policy_backbone
from tokred.policy.partition import normalize_thresholds
from tokred.policy.train import CURVE_THRESHOLDS, calibrated_thresholds
from tokred.reducers.dcts import CTS, DCTS

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "merger"


# ---------------------------------------------------------------------------------------------- helpers
def _reference_map(windows: list[tuple[int, int, int]], grid: tuple[int, int]) -> tuple[torch.Tensor, int]:
    """Token map of hand-listed windows ``(row, col, L)`` in patches, by plain loops (test reference)."""
    H0, W0 = grid
    anchor = [[r * W0 + c for c in range(W0)] for r in range(H0)]
    for r0, c0, L in windows:
        for r in range(r0, r0 + L):
            for c in range(c0, c0 + L):
                anchor[r][c] = r0 * W0 + c0
    flat = [a for row in anchor for a in row]
    ids = {a: i for i, a in enumerate(sorted(set(flat)))}
    return torch.tensor([ids[a] for a in flat]), len(ids)


def _blocks(h: int, w: int, size: int, classes: tuple[int, int]) -> torch.Tensor:
    """``[h, w]`` patch labels: ``size x size`` blocks alternating between two classes (a checkerboard)."""
    r = torch.arange(h)[:, None] // size
    c = torch.arange(w)[None, :] // size
    return torch.where((r + c) % 2 == 0, classes[0], classes[1])


def _quadtree_labels() -> torch.Tensor:
    """``[16, 32]`` patch labels with a known quadtree for levels (2, 4, 8, 16)."""
    lab = torch.zeros(16, 32, dtype=torch.long)  # left half: one class -> one level-16 window
    lab[0:8, 16:24] = 1  # one level-8 window
    lab[0:4, 24:28] = 2  # one level-4 window
    lab[0:4, 28:32] = _blocks(4, 4, 2, (3, 4))  # four level-2 windows, the 4x4 window is mixed
    lab[4:8, 24:32] = _blocks(4, 8, 2, (5, 6))  # eight level-2 windows
    lab[8:16, 16:32] = _blocks(8, 16, 1, (7, 8))  # per-patch checkerboard: single patches
    lab[3, 3] = 255  # one ignored patch inside the level-16 window
    return lab


def _to_pixels(patch_labels: torch.Tensor, patch_size: int) -> torch.Tensor:
    return patch_labels.repeat_interleave(patch_size, 0).repeat_interleave(patch_size, 1)


def _seg(merger: str = "dcts", crop=(128, 128), **kwargs):
    torch.manual_seed(0)
    seg = build_segmenter("test_vit", num_classes=5, crop_size=crop, merger=merger, merger_kwargs=kwargs)
    return seg.eval()


class _Synthetic(Dataset):
    """Tiny segmentation data set: random images, labels made of random uniform blocks."""

    def __init__(self, n: int, hw: tuple[int, int] = (64, 64)) -> None:
        g = torch.Generator().manual_seed(n)
        self.images = torch.randn(n, 3, *hw, generator=g)
        coarse = torch.randint(0, 3, (n, hw[0] // 32, hw[1] // 32), generator=g)
        self.labels = coarse.repeat_interleave(32, 1).repeat_interleave(32, 2)
        self.labels[:, :8, :8] = 255

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.images[i], self.labels[i]


# ---------------------------------------------------------------------------------------------- labels
def test_window_labels_ignore_handling():
    I = 255
    # 4 x 8 px, patch 2 px: level-1 windows are 2x2 px
    label = torch.tensor([
        [1, 1, I, I, 2, I, 1, 2],
        [1, 1, I, I, 2, 2, 1, 2],
        [1, 1, I, I, 2, 2, 3, I],
        [1, 1, I, I, 2, 2, I, I],
    ])[None]
    # windows: pure 1 | all ignore | 2 + ignore | 1 and 2 // pure 1 | all ignore | pure 2 | 3 + ignore
    t, m = window_labels(label, 1, 2)  # CTS's rule by default: one class + ignore is negative
    assert_close(t[0], torch.tensor([[1., 1., 0., 0.], [1., 1., 1., 0.]]))
    assert bool(m.all())
    t, m = window_labels(label, 1, 2, partial_ignore="positive")  # tokred's earlier rule
    assert_close(t[0], torch.tensor([[1., 1., 1., 0.], [1., 1., 1., 1.]]))
    assert bool(m.all())
    t, m = window_labels(label, 1, 2, all_ignore="exclude", partial_ignore="negative")
    assert_close(t[0], torch.tensor([[1., 0., 0., 0.], [1., 0., 1., 0.]]))
    assert_close(m[0], torch.tensor([[True, False, True, True], [True, False, True, True]]))
    t, m = window_labels(label, 1, 2, all_ignore="negative", partial_ignore="exclude")
    assert_close(t[0], torch.tensor([[1., 0., 0., 0.], [1., 0., 1., 0.]]))
    assert_close(m[0], torch.tensor([[True, True, False, True], [True, True, True, False]]))
    # level 2 (4x4 px): left = class 1 + ignore (partial), right = classes 2 and 1 (mixed)
    t, m = window_labels(label, 2, 2, partial_ignore="positive")
    assert_close(t[0], torch.tensor([[1., 0.]]))
    t, _ = window_labels(label, 2, 2)
    assert_close(t[0], torch.tensor([[0., 0.]]))
    with pytest.raises(ValueError, match="all_ignore"):
        window_labels(label, 1, 2, all_ignore="maybe")


def test_window_labels_drop_border_windows():
    label = torch.zeros(1, 40, 72, dtype=torch.long)  # 5 x 9 patches of 8 px
    t, m = window_labels(label, 2, 8)
    assert t.shape == m.shape == (1, 2, 4)


# ---------------------------------------------------------------------------------------------- partition
@pytest.mark.parametrize("partial_ignore", ["positive", "exclude", None])  # None: the default (CTS, negative)
def test_oracle_quadtree_matches_hand_made_map(partial_ignore):
    p = 4
    label = _to_pixels(_quadtree_labels(), p)[None]  # [1, 64, 128] px
    levels = (2, 4, 8, 16)
    scores = oracle_scores(label, levels, p, **({} if partial_ignore is None else {"partial_ignore": partial_ignore}))
    part = quadtree_partition(scores, (16, 32), normalize_thresholds(None, levels))
    right = [(0, 16, 8), (0, 24, 4)] + [(r, c, 2) for r in (0, 2) for c in (28, 30)] + \
            [(r, c, 2) for r in (4, 6) for c in (24, 26, 28, 30)]
    if partial_ignore == "positive":  # class 0 + one ignored patch still counts as uniform
        left = [(0, 0, 16)]
    else:  # the windows holding patch (3, 3) are refused at every level; it and its 2x2 neighbours stay single
        left = [(0, 8, 8), (8, 0, 8), (8, 8, 8), (0, 4, 4), (4, 0, 4), (4, 4, 4), (0, 0, 2), (0, 2, 2), (2, 0, 2)]
    expected, n = _reference_map(left + right, (16, 32))
    assert n == (143 if partial_ignore == "positive" else 155)
    assert_close(part.label_map[0], expected)
    assert int(part.num_tokens[0]) == n
    assert int(part.size.sum()) == 16 * 32
    # per-token fields agree with the map: every token's top-left patch carries its id
    assert_close(part.label_map[0].gather(0, part.anchor[0]), torch.arange(n))


def test_partition_is_nested_and_respects_caps():
    torch.manual_seed(0)
    B, grid, levels = 3, (12, 20), (2, 4, 8)
    scores = {L: torch.rand(B, grid[0] // L, grid[1] // L) for L in levels}
    taus = normalize_thresholds(0.6, levels)
    free = quadtree_partition(scores, grid, taus)
    for part in (free, quadtree_partition(scores, grid, taus, max_tokens=100),
                 quadtree_partition(scores, grid, taus, min_tokens=200)):
        # every cell is covered once: sizes of valid tokens add up to N0, cells per token equal its size
        assert_close(part.size.sum(1), torch.full((B,), grid[0] * grid[1]))
        counts = torch.zeros_like(part.size).scatter_add(1, part.label_map, torch.ones_like(part.label_map))
        assert_close(counts, part.size)
    capped = quadtree_partition(scores, grid, taus, max_tokens=100)
    assert bool((capped.num_tokens <= 100).all()) and bool((free.num_tokens > 100).any())
    floored = quadtree_partition(scores, grid, taus, min_tokens=200)
    assert bool((floored.num_tokens >= 200).all()) and bool((free.num_tokens < 200).any())
    # thresholds of 1 accept nothing: the identity partition
    none = quadtree_partition(scores, grid, normalize_thresholds(1.0, levels))
    assert_close(none.label_map, torch.arange(240).expand(B, 240))


def test_topk_partition_same_count_per_image():
    scores = torch.rand(4, 3, 5)
    part = topk_partition(scores, (6, 10), 7)
    assert_close(part.num_tokens, torch.full((4,), 60 - 3 * 7))
    assert bool(part.valid.all())
    top = scores.flatten(1).topk(7, dim=1).indices
    assert bool(part.accepted[2].flatten(1).gather(1, top).all())
    with pytest.raises(ValueError, match="num_windows"):
        topk_partition(scores, (6, 10), 16)


# ---------------------------------------------------------------------------------------------- reducer
@pytest.mark.parametrize("policy", ["cnn", "oracle"])
def test_thresholds_of_one_reproduce_none(policy):
    seg = _seg(levels=(2, 4, 8), thresholds=1.0, policy=policy)
    ref = _seg("none")
    ref.load_state_dict(seg.state_dict(), strict=False)
    image = torch.randn(2, 3, 128, 128)
    target = torch.zeros(2, 128, 128, dtype=torch.long)  # fully uniform: the oracle would merge everything
    with torch.no_grad():
        out, expected = seg(image, target), ref(image)
    assert_close(out.logits, expected.logits, atol=1e-5, rtol=0)
    assert out.state.valid is None and int(out.state.tokens_per_block[0][0]) == 64


def test_token_count_restore_and_supertoken_embedding():
    seg = _seg(levels=(2, 4, 8), policy="oracle")
    dcts = seg.reducers[0]
    patch_labels = torch.zeros(2, 8, 8, dtype=torch.long)
    patch_labels[0, :, 4:] = _blocks(8, 4, 1, (1, 2))  # left half 8x4: two 4x4 windows; right: singles
    patch_labels[1, :4, :4] = 3  # four 4x4 windows (the 8x8 one is mixed)
    target = torch.stack([_to_pixels(patch_labels[b], 16) for b in range(2)])
    image = torch.randn(2, 3, 128, 128)
    scores = dcts.window_scores(image, target, 16)
    part = dcts.partition(scores, (8, 8))
    with torch.no_grad():
        out = seg(image, target)
    state = out.state
    assert_close(state.tokens_per_block[0], part.num_tokens)
    assert part.num_tokens.tolist() == [2 + 32, 4]
    # restoring the token ids reproduces the partition map: every cell is held by exactly its token
    n = state.size.shape[1]
    ids = torch.arange(n, dtype=torch.float32).expand(2, n)[..., None]
    restored = state.restore(ids)[:, 0].flatten(1).long()
    assert_close(restored, part.label_map + state.num_prefix_tokens)
    # a supertoken is the patch embedding of its window area-averaged to 16x16 px, plus the mean position embedding
    encoder = seg.encoder
    with torch.no_grad():
        x, st = dcts.embed(EmbedContext(image=image, target=target, encoder=encoder))
        window = image[1:2, :, :64, :64]  # image 1's top-left 4x4 window (64 px)
        emb = encoder.patch_embed(F.avg_pool2d(window, 4))[0, 0, 0]
        pe, _ = encoder.pos_embed((8, 8))
        mean_pe = pe[0].reshape(8, 8, -1)[:4, :4].mean((0, 1))
        expected = encoder.finish_embedding((emb + mean_pe)[None, None])[0, 0]
    tok = st.token_map[1, 0]
    assert_close(x[1, tok], expected, atol=1e-5, rtol=1e-5)
    assert float(st.size[1, tok]) == 16.0


def test_padded_batch_equals_single_images():
    seg = _seg(levels=(2, 4), policy="oracle")
    patch_labels = torch.stack([torch.zeros(8, 8, dtype=torch.long), _blocks(8, 8, 1, (1, 2))])
    patch_labels[0, 4:, 4:] = _blocks(4, 4, 1, (3, 4))
    target = torch.stack([_to_pixels(t, 16) for t in patch_labels])
    image = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        batch = seg(image, target)
        singles = [seg(image[i:i + 1], target[i:i + 1]) for i in range(2)]
    counts = batch.state.tokens_per_block[0]
    assert counts.tolist() == [3 + 16, 64] and batch.state.valid is not None
    for i in range(2):
        assert_close(batch.logits[i:i + 1], singles[i].logits, atol=1e-5, rtol=1e-5)
        assert int(singles[i].state.tokens_per_block[0][0]) == int(counts[i])


def test_training_forward_backward_keeps_policy_frozen():
    seg = _seg(levels=(2, 4), thresholds=0.5).train()
    dcts = seg.reducers[0]
    assert not dcts.policy.training
    before = {k: v.clone() for k, v in dcts.policy.state_dict().items()}
    image = torch.randn(2, 3, 128, 128)
    out = seg(image)
    seg.losses(out, torch.randint(0, 5, (2, 128, 128)))["loss"].backward()
    assert seg.encoder.vit.patch_embed.proj.weight.grad is not None
    assert all(p.grad is None for p in dcts.policy.parameters())
    for k, v in dcts.policy.state_dict().items():
        assert_close(v, before[k])


def test_cts_same_count_per_image():
    seg = _seg("cts", num_windows=5)
    with torch.no_grad():
        out = seg(torch.randn(3, 3, 128, 128))
    assert out.state.valid is None
    assert out.state.tokens_per_block[0].tolist() == [64 - 3 * 5] * 3
    default = _seg("cts")
    with torch.no_grad():
        n = default(torch.randn(1, 3, 128, 128)).state.tokens_per_block[0]
    assert int(n[0]) == 64 - 3 * int(0.4 * 16)


@pytest.mark.parametrize("kwargs, match", [
    ({"thresholds": [1.5, 0.5, 0.5, 0.5]}, "thresholds"),
    ({"thresholds": -0.1}, "thresholds"),
    ({"levels": (2, 4), "thresholds": [0.5]}, "thresholds"),
    ({"levels": (3, 6)}, "levels"),
    ({"levels": ()}, "levels"),
    ({"policy": "random"}, "policy"),
    ({"policy": "oracle", "policy_checkpoint": "x.safetensors"}, "policy_checkpoint"),
    ({"min_tokens": 50, "max_tokens": 10}, "min_tokens"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"train_policy_jointly": True}, "train_policy_jointly"),
])
def test_bad_constructor_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DCTS(**kwargs)


def test_bad_setup_and_forward_inputs_raise():
    with pytest.raises(ValueError, match="levels .*grid_size"):
        _seg(crop=(64, 96), levels=(2, 4, 8))
    with pytest.raises(ValueError, match="num_windows"):
        _seg("cts", crop=(64, 96), num_windows=7)  # 2 x 3 windows
    with pytest.raises(ValueError, match="num_windows"):
        CTS(num_windows=-1)
    seg = _seg(crop=(64, 96), levels=(2, 4), policy="oracle")
    with pytest.raises(ValueError, match="oracle.*target"):
        seg(torch.randn(1, 3, 64, 96))


def test_configs_match_constructors():
    for name, cls in (("dcts", DCTS), ("cts", CTS)):
        cfg = OmegaConf.to_container(OmegaConf.load(CONFIGS / f"{name}.yaml"))
        assert cfg.pop("name") == name
        params = set(inspect.signature(cls.__init__).parameters) - {"self"}
        assert set(cfg) <= params  # the file names a subset; the rest come from the signature
        from_config = create_reducer(name, **cfg)
        assert isinstance(from_config, cls)
        assert from_config.extra_config() == cls().extra_config()  # the file states the defaults


# ---------------------------------------------------------------------------------------------- policy
def test_policy_training_keeps_the_epoch_with_the_lowest_validation_loss():
    torch.manual_seed(0)
    runs = {}
    for keep in ("best", "last"):
        torch.manual_seed(0)
        net = PolicyNet(levels=(2, 4), patch_size=16)
        runs[keep] = train_policy(_Synthetic(4), _Synthetic(2), net, epochs=5, batch_size=2, lr=3e-2, keep=keep,
                                  progress=False)
    best, last = runs["best"], runs["last"]
    assert [r["epoch"] for r in best["curve"]] == [1, 2, 3, 4, 5] and best["curve"] == last["curve"]
    losses = [r["val_loss"] for r in best["curve"]]
    assert best["kept_epoch"] == 1 + losses.index(min(losses)) and last["kept_epoch"] == 5
    # the reported validation metrics are those of the kept weights
    assert best["val_loss"] == pytest.approx(min(losses), rel=1e-5)
    assert last["val_loss"] == pytest.approx(losses[-1], rel=1e-5)
    with pytest.raises(ValueError, match="keep='first'"):
        train_policy(_Synthetic(4), None, PolicyNet(levels=(2, 4), patch_size=16), epochs=1, keep="first")


def test_policy_training_saves_and_loads(tmp_path):
    torch.manual_seed(0)
    net = PolicyNet(levels=(2, 4), patch_size=16)
    init = {k: v.clone() for k, v in net.state_dict().items()}
    path = tmp_path / "policy.safetensors"
    metrics = train_policy(_Synthetic(4), _Synthetic(2), net, epochs=1, batch_size=2, out_path=path, progress=False)
    assert metrics["steps"] == 2 and math.isfinite(metrics["train_loss"]) and math.isfinite(metrics["val_loss"])
    for key in ("precision_L2", "recall_L2", "precision_L4", "recall_L4", "uniform_fraction", "token_ratio"):
        assert key in metrics
    assert 0.0 < metrics["token_ratio"] <= 1.0
    assert path.is_file() and path.with_suffix(".json").is_file()
    assert any(not torch.equal(v, init[k]) for k, v in net.state_dict().items() if v.is_floating_point())
    fresh = PolicyNet(levels=(2, 4), patch_size=16).eval()
    load_policy_checkpoint(fresh, path)
    image = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        a, b = net.eval()(image), fresh(image)
    for L in (2, 4):
        assert_close(a[L], b[L])
    # the trained policy drives a segmenter
    seg = _seg(crop=(64, 64), levels=(2, 4), policy_checkpoint=str(path), policy_backbone="efficientnet_lite0")
    with torch.no_grad():
        assert seg(image).logits.shape == (1, 5, 64, 64)
    # the sidecar holds validation precision/recall curves; target_precision calibrates the thresholds on them
    curves = read_policy_config(path)["metrics"]["pr_curves"]
    assert set(curves) == {"2", "4"} and [r["tau"] for r in curves["2"]] == list(CURVE_THRESHOLDS)
    for target in (0.01, 1.0):
        seg = _seg(crop=(64, 64), levels=(2, 4), policy_checkpoint=str(path), policy_backbone="efficientnet_lite0",
                   target_precision=target)
        dcts = seg.encoder.reducers[0]
        assert dcts.thresholds == calibrated_thresholds(curves, (2, 4), target)
        assert dcts.extra_config()["target_precision"] == target

    # .pth with tensors only, and plain timm weights of the CNN (no sidecar)
    pth = save_policy(net, tmp_path / "policy.pth")
    load_policy_checkpoint(PolicyNet(levels=(2, 4)), pth)
    torch.save(net.backbone.state_dict(), tmp_path / "cnn.pth")
    only_cnn = PolicyNet(levels=(2, 4))
    load_policy_checkpoint(only_cnn, tmp_path / "cnn.pth")
    assert_close(only_cnn.backbone.conv_stem.weight, net.backbone.conv_stem.weight)


def test_mismatched_policy_checkpoint_raises(tmp_path):
    path = save_policy(PolicyNet(levels=(2, 4), patch_size=16), tmp_path / "p.safetensors")
    with pytest.raises(ValueError, match="levels"):
        load_policy_checkpoint(PolicyNet(levels=(2,)), path)
    with pytest.raises(ValueError, match="backbone"):
        load_policy_checkpoint(PolicyNet(levels=(2, 4), backbone="mobilenetv3_small_100"), path)
    with pytest.raises(ValueError, match="levels"):
        DCTS(levels=(2, 4, 8), policy_checkpoint=str(path))
    with pytest.raises(ValueError, match="patch_size"):
        build_segmenter("test_vit", num_classes=3, crop_size=(64, 64), merger="dcts",
                        merger_kwargs={"levels": (2, 4), "policy_checkpoint": str(path),
                                       "policy_backbone": "efficientnet_lite0"},
                        backbone_kwargs={"patch_size": 8})
    with pytest.raises(FileNotFoundError):
        DCTS(levels=(2, 4), policy_checkpoint=str(tmp_path / "missing.safetensors"))


def test_policy_flops_small_against_vit_large():
    from fvcore.nn import FlopCountAnalysis

    class _Tuple(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            return tuple(self.net(x).values())

    net = _Tuple(PolicyNet().eval())
    flops = {}
    for res in (128, 256):
        fca = FlopCountAnalysis(net, torch.randn(1, 3, res, res))
        fca.unsupported_ops_warnings(False)
        fca.uncalled_modules_warnings(False)
        flops[res] = fca.total()
    assert flops[256] / flops[128] == pytest.approx(4.0, rel=0.03)  # convolutions: linear in pixels
    policy_1024 = flops[256] * 16
    n, d, depth = (1024 // 16) ** 2, 1024, 24  # ViT-L/16 at 1024x1024 px, analytic multiply-adds
    vit_l = depth * (12 * n * d * d + 2 * n * n * d)
    assert policy_1024 < 0.03 * vit_l
    assert policy_1024 < 9e9


def test_calibrated_thresholds_pick_the_lowest_tau_reaching_the_precision():
    rows = [{"tau": 0.1, "precision": 0.5, "recall": 1.0, "accepted": 0.9},
            {"tau": 0.5, "precision": 0.92, "recall": 0.6, "accepted": 0.4},
            {"tau": 0.9, "precision": float("nan"), "recall": 0.0, "accepted": 0.0}]
    curves = {"2": rows, "4": [dict(r, precision=0.3) for r in rows]}
    assert calibrated_thresholds(curves, (2, 4, 8), 0.9) == {2: 0.5, 4: 1.0, 8: 1.0}  # 4: never; 8: no curve
    assert calibrated_thresholds(curves, (2,), 0.4) == {2: 0.1}
    with pytest.raises(ValueError, match="target_precision"):
        calibrated_thresholds(curves, (2,), 0.0)


def test_policy_backbone_auto_is_sized_to_the_vit():
    assert resolve_policy_backbone("auto", 192) == resolve_policy_backbone("auto", 384) == "mobilenetv3_small_050"
    assert resolve_policy_backbone("auto", 768) == "efficientnet_lite0"
    assert resolve_policy_backbone("resnet18", 192) == "resnet18"
    seg = _seg(crop=(64, 64), levels=(2, 4))  # test_vit, embed_dim 64: the light CNN
    assert seg.encoder.reducers[0].policy_backbone == "mobilenetv3_small_050"
