"""The plugin path: tokred-baselines installs as its own distribution and its reducers behave as documented.

(a) The distribution in ``baselines/`` is installed into a scratch directory; a fresh interpreter with that
    directory on ``PYTHONPATH`` finds its three reducers through the ``tokred.reducers`` entry points.
(b) The reducers' behaviour, tested directly on ``TokenState`` and through ``build_segmenter``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from tokred import BackboneInfo, TokenState, build_segmenter
from tokred.reducers import available_reducers, register_reducer, unregister_reducer

ROOT = Path(__file__).resolve().parents[1]
BASELINES = ROOT / "baselines"
NAMES = ("oracle_superpatches", "random_prune", "uniform_pool")
K = 5


# ---------------------------------------------------------------------------------------------- (a) install
def _install(target: Path) -> subprocess.CompletedProcess:
    """Installs baselines/ into ``target`` with uv, or pip without build isolation; skips when neither can."""
    uv = shutil.which("uv")
    if uv is not None:
        cmd = [uv, "pip", "install", "--no-deps", "--python", sys.executable, "--target", str(target), str(BASELINES)]
    elif importlib.util.find_spec("pip") is not None and importlib.util.find_spec("hatchling") is not None:
        cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--target", str(target),
               str(BASELINES)]
    else:
        pytest.skip("neither uv nor pip with hatchling is available to install baselines/")
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def plugin_env(tmp_path_factory):
    """Environment of a fresh interpreter that sees tokred-baselines only through a ``--target`` install."""
    target = tmp_path_factory.mktemp("plugin_target")
    res = _install(target)
    assert res.returncode == 0, f"installing baselines/ failed:\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}"
    env = {**os.environ, "PYTHONPATH": str(target), "OMP_NUM_THREADS": "1"}
    return target, env


def test_installed_plugin_registers_through_entry_points(plugin_env):
    target, env = plugin_env
    script = ("import json, tokred, tokred_baselines; s = tokred.available_reducers(); "
              f"print(json.dumps({{'file': tokred_baselines.__file__, 'specs': {{n: [s[n].distribution, s[n].version, "
              f"s[n].origin, tokred.create_reducer(n).kind] for n in {list(NAMES)!r} if n in s}}}}))")
    res = subprocess.run([sys.executable, "-c", script], env=env, cwd=target, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert Path(out["file"]).resolve().is_relative_to(target.resolve())  # the --target copy, not a checkout
    assert out["specs"] == {
        "oracle_superpatches": ["tokred-baselines", "0.1.0", "entry_point", "merger"],
        "random_prune": ["tokred-baselines", "0.1.0", "entry_point", "pruner"],
        "uniform_pool": ["tokred-baselines", "0.1.0", "entry_point", "merger"],
    }


def test_cli_list_shows_the_plugin(plugin_env):
    target, env = plugin_env
    res = subprocess.run([sys.executable, "-m", "tokred", "list"], env=env, cwd=target, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    # one row per entry; the name is the first or (after a kind column) the second word
    rows = {word: line.split() for line in res.stdout.splitlines() for word in line.split()[:2]}
    for name in NAMES:
        assert name in rows, res.stdout
        assert "tokred-baselines" in rows[name] and "0.1.0" in rows[name], rows[name]


# ---------------------------------------------------------------------------------------------- (b) behaviour
@pytest.fixture(scope="module")
def tb():
    """The ``tokred_baselines`` package, registered at run time when it is not installed."""
    if importlib.util.find_spec("tokred_baselines") is None:
        sys.path.insert(0, str(BASELINES))
    import tokred_baselines

    classes = {"random_prune": tokred_baselines.RandomPrune, "uniform_pool": tokred_baselines.UniformPool,
               "oracle_superpatches": tokred_baselines.OracleSuperpatches}
    added = [n for n in NAMES if n not in available_reducers()]
    for name in added:
        register_reducer(name, classes[name], distribution="tokred-baselines", version=tokred_baselines.__version__)
    yield tokred_baselines
    for name in added:
        unregister_reducer(name)


def _info(grid: tuple[int, int], depth: int = 6, prefix: int = 1) -> BackboneInfo:
    return BackboneInfo(embed_dim=8, num_heads=2, depth=depth, patch_size=(16, 16), grid_size=grid,
                        num_prefix_tokens=prefix, num_classes=K)


def _seg(slot: str, name: str, crop=(64, 96), **kwargs):
    torch.manual_seed(0)
    return build_segmenter("test_vit", num_classes=K, crop_size=crop,
                           **{slot: name, f"{slot}_kwargs": kwargs}).eval()


def _counts(state: TokenState) -> list[list[int]]:
    return torch.stack(state.tokens_per_block).T.tolist()  # [B][depth]


# -- random_prune
def test_random_prune_banks_the_r_lowest_position_scores(tb):
    pruner = tb.RandomPrune(r=5, seed=3)
    pruner.setup(_info((4, 6)))
    N0 = 24
    x = torch.randn(2, 1 + N0, 8)
    x2, st = pruner.on_block(0, x, TokenState.initial(2, (4, 6), 1, x.device))
    expected = torch.zeros(N0, dtype=torch.bool)
    expected[pruner.patch_scores(0, N0).argsort()[:5]] = True
    assert torch.equal(st.token_map < 0, expected.expand(2, N0))
    assert x2.shape == (2, 1 + N0 - 5, 8)
    assert_close(x2[:, 0], x[:, 0])  # the class token stays
    assert st.stats["banked_after_block_0"].tolist() == [5, 5]
    assert_close(st.restore(x2), x[:, 1:].transpose(1, 2).reshape(2, 8, 4, 6))  # banked keep their features


def test_random_prune_removes_exactly_r_after_each_chosen_block(tb):
    with torch.no_grad():
        out = _seg("pruner", "random_prune", r=3, blocks=[1, 3])(torch.randn(2, 3, 64, 96))
    assert _counts(out.state) == [[24, 24, 21, 21, 18, 24]] * 2  # fusion before the final block
    assert out.state.stats["banked"].tolist() == [6, 6]
    with torch.no_grad():
        out = _seg("pruner", "random_prune", r=3, last_layer_fusion=False)(torch.randn(2, 3, 64, 96))
    assert _counts(out.state) == [[24, 21, 18, 15, 12, 12]] * 2  # default blocks: all but the last two
    assert int((out.state.token_map < 0).sum()) == 2 * 12


def test_random_prune_is_reproducible_and_seeded(tb):
    img = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        maps = [_seg("pruner", "random_prune", r=4, seed=s, last_layer_fusion=False)(img).state.token_map
                for s in (0, 0, 1)]
    assert torch.equal(maps[0], maps[1])
    assert not torch.equal(maps[0] < 0, maps[2] < 0)


def test_random_prune_batch_equals_singles(tb):
    seg = _seg("pruner", "random_prune", r=4, last_layer_fusion=False)
    img = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        both = seg(img)
        singles = [seg(img[i:i + 1]) for i in range(2)]
    assert_close(both.logits, torch.cat([s.logits for s in singles]), atol=1e-5, rtol=1e-5)
    assert torch.equal(both.state.token_map, torch.cat([s.state.token_map for s in singles]))


def test_random_prune_rejects_impossible_budgets(tb):
    with pytest.raises(ValueError, match="r must be >= 0"):
        tb.RandomPrune(r=-1)
    with pytest.raises(ValueError, match="strictly increasing"):
        tb.RandomPrune(blocks=[2, 1])
    with pytest.raises(ValueError, match="outside"):
        tb.RandomPrune(blocks=[5]).setup(_info((4, 6)))
    with pytest.raises(ValueError, match="lower r"):
        tb.RandomPrune(r=8).setup(_info((4, 6)))  # 4 blocks x 8 > 24 patches


# -- uniform_pool
def _window_constant(B: int, grid: tuple[int, int], C: int, w: int) -> torch.Tensor:
    """``[B, C, H0, W0]`` integer features constant on every aligned ``w x w`` window, random on the border."""
    H0, W0 = grid
    g = torch.randint(-50, 50, (B, C, H0, W0)).float()
    hw, ww = H0 // w * w, W0 // w * w
    coarse = torch.randint(-50, 50, (B, C, H0 // w, W0 // w)).float()
    g[:, :, :hw, :ww] = coarse.repeat_interleave(w, 2).repeat_interleave(w, 3)
    return g


def test_uniform_pool_count_and_exact_restore(tb):
    grid, P, C = (5, 7), 1, 6
    grid_x = _window_constant(2, grid, C, 2)
    x = torch.cat([torch.randn(2, P, C), grid_x.flatten(2).transpose(1, 2)], 1)  # [B, P + N0, C]
    pool = tb.UniformPool(window=2)
    pool.setup(_info(grid))
    x2, st = pool.pool(x, TokenState.initial(2, grid, P, x.device))
    assert x2.shape == (2, P + 6 + 11, C)  # 2 x 3 windows + 11 border patches of 5 x 7
    assert st.valid is None
    assert sorted(st.size[0, P:].tolist()) == [1.0] * 11 + [4.0] * 6
    assert_close(x2[:, :P], x[:, :P])
    assert_close(st.restore(x2), grid_x)
    assert st.stats["uniform_pool_merged"].tolist() == [18, 18]


def test_uniform_pool_pads_when_images_keep_different_groups(tb):
    grid, P, C = (4, 5), 1, 3
    grid_x = _window_constant(2, grid, C, 2)
    x = torch.cat([torch.zeros(2, P, C), grid_x.flatten(2).transpose(1, 2)], 1)
    st = TokenState.initial(2, grid, P, x.device)
    keep = torch.ones(2, P + 20, dtype=torch.bool)
    keep[0, P + 4] = False  # image 0 banks a border patch (one group less), image 1 a window patch
    keep[1, P + 0] = False
    x, st = st.split(x, keep, block=0)
    assert st.valid is None
    pool = tb.UniformPool(window=2)
    x2, st2 = pool.pool(x, st)
    assert st2.valid is not None and st2.live_patch_tokens().tolist() == [7, 8]
    live_size = (st2.size * st2.valid)[:, P:].sum(1) + st2.bank.size.sum(1)
    assert live_size.tolist() == [20.0, 20.0]
    assert_close(st2.restore(x2), grid_x)


def test_uniform_pool_later_block_and_identity(tb):
    with torch.no_grad():
        out = _seg("merger", "uniform_pool", window=2, block=2)(torch.randn(1, 3, 64, 96))
        ident = _seg("merger", "uniform_pool", window=1)(torch.randn(1, 3, 64, 96))
    assert _counts(out.state) == [[24, 24, 6, 6, 6, 6]]
    assert _counts(ident.state) == [[24] * 6]
    with pytest.raises(ValueError, match="window"):
        tb.UniformPool(window=0)
    with pytest.raises(ValueError, match="depth"):
        tb.UniformPool(block=6).setup(_info((4, 6)))


# -- oracle_superpatches
def test_oracle_superpatches_merges_a_uniform_region(tb):
    seg = _seg("merger", "oracle_superpatches", levels=(2, 4))
    label = torch.zeros(1, 4, 6, dtype=torch.long)  # patch labels: 4 x 4 uniform block on the left
    label[0, :, 4:] = (torch.arange(4)[:, None] + torch.arange(2)[None, :]) % 2 + 1  # per-patch checkerboard
    target = label.repeat_interleave(16, 1).repeat_interleave(16, 2)  # [1, 64, 96] px
    with torch.no_grad():
        out = seg(torch.randn(1, 3, 64, 96), target)
    tmap = out.state.token_map.reshape(4, 6)
    assert bool((tmap[:, :4] == tmap[0, 0]).all())  # the uniform 4 x 4 window is one supertoken
    right = tmap[:, 4:].flatten()
    assert len(set(right.tolist())) == 8 and tmap[0, 0].item() not in right.tolist()
    assert _counts(out.state) == [[9] * 6]
    cfg = seg.encoder.reducers[0].extra_config()
    assert cfg["policy"] == "oracle" and cfg["levels"] == [2, 4] and "policy_checkpoint" not in cfg
    with pytest.raises(ValueError, match="target"):
        with torch.no_grad():
            seg(torch.randn(1, 3, 64, 96))


# -- configs
def test_plugin_configs_compose_by_name_without_searchpath(tb):
    from hydra import compose, initialize_config_dir

    from tokred.__main__ import config_dir
    from tokred.config import build_model_from_config

    overrides = ["model=test_vit", "dataset.crop_size=[64,96]", "merger=uniform_pool", "pruner=random_prune",
                 "pruner.r=2", "pruner.blocks=[0,1]"]  # the yaml folder comes from the tokred.configs entry point
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    assert cfg.merger.name == "uniform_pool" and cfg.pruner.name == "random_prune"
    seg = build_model_from_config(cfg).eval()
    with torch.no_grad():
        out = seg(torch.randn(1, 3, 64, 96))
    assert _counts(out.state) == [[6, 4, 2, 2, 2, 6]]  # 2x2 pooling, then r=2 after blocks 0 and 1
