"""Reducer capabilities (asked, not looked up by name), the one reducer registry, and scored pruning."""

from __future__ import annotations

import subprocess
import sys
from typing import ClassVar

import pytest
import torch
from torch.testing import assert_close

from tokred.plugins import REDUCERS
from tokred.reducers import Reducer, ScoredPruner, select_topk
from tokred.reducers.base import BackboneInfo
from tokred.reducers.cropr import Cropr
from tokred.reducers.dcts import CTS, DCTS
from tokred.reducers.early_exit import EarlyExit
from tokred.reducers.none import NoReducer
from tokred.reducers.registry import available_reducers, get_reducer_class, register_reducer, unregister_reducer
from tokred.reducers.tome import ToMe
from tokred.state import TokenState

GRID = (4, 6)
N0 = 24


# ---------------------------------------------------------------------------------------------- capabilities
@pytest.mark.parametrize("cls, config, needs", [
    (DCTS, {}, True),
    (DCTS, {"policy": "cnn", "policy_checkpoint": None}, True),
    (DCTS, {"policy": "cnn", "policy_checkpoint": "policy.safetensors"}, False),
    (DCTS, {"policy": "oracle"}, False),
    (CTS, {"num_windows": 8}, True),
    (CTS, {"policy": "oracle"}, False),
    (ToMe, {"r": 8}, False),
    (Cropr, {}, False),
    (EarlyExit, {}, False),
])
def test_needs_fitting_is_asked_of_the_class(cls, config, needs):
    assert cls.needs_fitting(config) is needs
    assert cls.fitting_key() == ("policy_checkpoint" if issubclass(cls, DCTS) else None)


def test_reads_labels_and_its_read_only_old_name():
    oracle, cnn = DCTS(levels=(2,), policy="oracle"), CTS(num_windows=2, policy="oracle")
    assert oracle.reads_labels and oracle.reads_target and cnn.reads_labels
    tome = ToMe()
    assert not tome.reads_labels and not tome.reads_target
    with pytest.raises(AttributeError, match="reads_labels"):
        tome.reads_target = True


def test_accepts_schedule_and_supports_packed():
    assert ToMe.accepts_schedule() and Cropr.accepts_schedule()
    assert not EarlyExit.accepts_schedule() and not DCTS.accepts_schedule() and not NoReducer.accepts_schedule()
    assert not any(c.supports_packed for c in (ToMe, Cropr, EarlyExit, DCTS, CTS, NoReducer))


# ---------------------------------------------------------------------------------------------- one registry
class _Probe(Reducer):
    kind: ClassVar[str] = "merger"


def test_registry_functions_are_views_of_plugins_reducers():
    assert list(available_reducers()) == REDUCERS.names()
    assert get_reducer_class("tome") is REDUCERS.get("tome") is ToMe
    register_reducer("_probe_capabilities", _Probe, distribution="tests")
    try:
        assert REDUCERS.get("_probe_capabilities") is _Probe
        assert REDUCERS.available()["_probe_capabilities"].distribution == "tests"
        with pytest.raises(ValueError, match="already registered"):
            REDUCERS.register("_probe_capabilities", _Probe)
    finally:
        unregister_reducer("_probe_capabilities")
    assert "_probe_capabilities" not in REDUCERS.names()
    with pytest.raises(TypeError, match="Reducer"):
        register_reducer("_not_a_reducer", dict)


def test_reducers_package_imports_without_torch():
    code = "import sys, tokred.reducers as r; r.available_reducers(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ---------------------------------------------------------------------------------------------- selection
def test_select_topk_drops_the_lowest_unprotected_per_image():
    scores = torch.tensor([[5., 1., 3., 2., 0.], [0., 4., 4., 1., 9.]])
    protect = torch.tensor([[True, False, False, False, True], [True, False, False, False, False]])
    keep = select_topk(scores, torch.tensor([2, 3]), protect)
    assert keep.tolist() == [[True, False, True, False, True], [True, False, False, False, True]]
    # ties drop the earlier token first; a request above the unprotected count keeps the protected ones
    keep = select_topk(torch.zeros(1, 4), torch.tensor([1]), torch.zeros(1, 4, dtype=torch.bool))
    assert keep.tolist() == [[False, True, True, True]]
    keep = select_topk(scores, torch.tensor([10, 0]), protect)
    assert keep.tolist() == [protect[0].tolist(), [True] * 5]


class _FirstFeaturePruner(ScoredPruner):
    """Test pruner: the score of a token is its first feature."""

    label: ClassVar[str] = "first_feature"

    def score(self, block, x, state):
        return x[..., 0]


def _info(depth: int = 4) -> BackboneInfo:
    return BackboneInfo(embed_dim=8, num_heads=2, depth=depth, patch_size=(16, 16), grid_size=GRID,
                        num_prefix_tokens=1, num_classes=3)


def _uneven_state(live: tuple[int, int] = (20, 3)):
    """``x [2, 1 + 24, 8]`` and a state whose images hold ``live`` patch tokens (the rest banked)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 1 + N0, 8, generator=g)
    state = TokenState.initial(2, GRID, 1, x.device)
    keep = torch.zeros(2, 1 + N0, dtype=torch.bool)
    for b, n in enumerate(live):
        keep[b, 1 + torch.randperm(N0, generator=g)[:n]] = True
    return state.split(x, keep, block=0)


def test_scored_pruner_clips_the_budget_per_image():
    pruner = _FirstFeaturePruner(r=5, blocks=[1])
    pruner.setup(_info())
    x, state = _uneven_state()
    x2, st2 = pruner.on_block(1, x, state)
    assert st2.live_patch_tokens().tolist() == [15, 1]  # 20 - 5, and 3 - min(5, 3 - 1)
    # the lowest first features went to the bank; image 0's kept tokens all score above its dropped ones
    kept = x2[0, 1:15 + 1, 0]
    dropped = st2.bank.x[0][st2.bank.block[0] == 1][:, 0]
    assert dropped.numel() == 5 and kept.min() > dropped.max()
    assert_close(x2[:, 0], x[:, 0])  # prefix kept in place
    # each image alone gives the same live count as in the batch
    for b in range(2):
        single = TokenState(grid_size=GRID, num_prefix_tokens=1, token_map=state.token_map[b:b + 1],
                            size=state.size[b:b + 1], valid=state.valid_mask()[b:b + 1])
        _, st = pruner.on_block(1, x[b:b + 1], single)
        assert st.live_patch_tokens().tolist() == [st2.live_patch_tokens()[b].item()]


def test_scored_pruner_checks_and_fusion():
    with pytest.raises(ValueError, match="first_feature r must be"):
        _FirstFeaturePruner(r=-1)
    with pytest.raises(ValueError, match="strictly increasing"):
        _FirstFeaturePruner(blocks=[2, 1])
    with pytest.raises(ValueError, match="removes too many"):
        _FirstFeaturePruner(r=12).setup(_info())  # blocks 0 and 1 by default: 24 - 2 * 12 = 0
    with pytest.raises(ValueError, match="blocks"):
        _FirstFeaturePruner(blocks=[3]).setup(_info())  # after the last block
    with pytest.raises(NotImplementedError, match="score"):
        plain = ScoredPruner(r=2)
        plain.setup(_info())
        plain.on_block(0, torch.randn(1, 1 + N0, 8), TokenState.initial(1, GRID, 1, torch.device("cpu")))
    pruner = _FirstFeaturePruner(r=2)
    pruner.setup(_info())
    assert pruner.blocks == (0, 1)
    x = torch.randn(2, 1 + N0, 8)
    state = TokenState.initial(2, GRID, 1, x.device)
    for i in range(4):
        x, state = pruner.on_block_start(i, x, state)
        x, state = pruner.on_block(i, x, state)
        if i == 1:
            assert x.shape[1] == 1 + N0 - 4
    assert state.bank is None and x.shape[1] == 1 + N0  # rejoined before the last block
