"""Package layout: a fast torch-free CLI front, lazy ``import tokred``, and the write-once helpers of tokred.io."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tokred
from tokred.io import (atomic_file, atomic_write, atomic_write_json, eval_mode, new_run_dir, policy_cache_path,
                       unique_path)

ROOT = Path(__file__).resolve().parents[1]


def _python(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-X", "importtime", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONWARNINGS": "ignore"})


def _imported(stderr: str) -> set[str]:
    """Top-level module names from ``-X importtime`` lines (``import time: self | cumulative | name``)."""
    return {line.rsplit("|", 1)[-1].strip().split(".")[0] for line in stderr.splitlines() if "|" in line}


def test_list_and_help_do_not_import_torch():
    res = _python("-m", "tokred", "list")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "torch" not in _imported(res.stderr)
    rows = [line.split() for line in res.stdout.splitlines()[2:]]
    shown = {(r[0], r[1]) for r in rows if len(r) >= 5}
    for kind, name in (("reducers", "tome"), ("reducers", "none"), ("reducers", "dcts"), ("backbones", "vit"),
                       ("backbones", "eva"), ("decoders", "linear"), ("decoders", "mask_transformer"),
                       ("datasets", "camvid"), ("datasets", "ade20k"), ("datasets", "cityscapes")):
        assert (kind, name) in shown, (kind, name)
    assert all(r[2] == "tokred" and r[4] == "builtin" for r in rows if (r[0], r[1]) == ("reducers", "tome"))
    res = _python("-m", "tokred", "--help")
    assert res.returncode == 0 and "train-policy" in res.stdout
    assert "torch" not in _imported(res.stderr)


def test_import_tokred_is_lazy():
    res = _python("-c", "import tokred, tokred.config, tokred.io, tokred.plugins; print(tokred.__version__)")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "torch" not in _imported(res.stderr) and res.stdout.strip() == tokred.__version__
    assert tokred.Segmenter.__name__ == "Segmenter" and callable(tokred.create_reducer)
    assert set(tokred.__all__) >= {"Encoder", "Segmenter", "build_segmenter", "create_reducer", "__version__"}
    with pytest.raises(AttributeError, match="no_such_name"):
        tokred.no_such_name  # noqa: B018


def test_every_command_names_an_importable_job():
    from tokred.__main__ import JOBS, _load

    assert set(JOBS) == {"run", "eval", "bench", "train-policy", "ablate", "viz", "analyze", "sweep"}
    for command, target in JOBS.items():
        assert callable(_load(target)), command


def test_no_module_over_500_lines():
    long = {str(p.relative_to(ROOT)): n for p in (ROOT / "tokred").rglob("*.py")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > 500}
    assert not long, f"split these modules: {long}"


def test_atomic_write_replaces_or_refuses(tmp_path):
    p = tmp_path / "sub" / "m.json"
    atomic_write_json(p, {"a": 1}, exclusive=True)
    assert json.loads(p.read_text()) == {"a": 1}
    with pytest.raises(FileExistsError, match="m.json"):
        atomic_write(p, "other", exclusive=True)
    assert json.loads(p.read_text()) == {"a": 1}
    atomic_write(p, b"new")
    assert p.read_bytes() == b"new"
    with pytest.raises(RuntimeError):
        with atomic_file(p) as tmp:
            tmp.write_text("half")
            raise RuntimeError("writer crashed")
    assert p.read_bytes() == b"new"  # a failed writer leaves the old file
    assert sorted(f.name for f in p.parent.iterdir()) == ["m.json"]  # and no temporary file


def test_unique_path_and_new_run_dir(tmp_path):
    f = tmp_path / "a.png"
    assert unique_path(f) == f
    f.write_bytes(b"x")
    assert unique_path(f) == tmp_path / "a-2.png"
    first = new_run_dir(tmp_path / "runs", "tome_r0.5")
    second = new_run_dir(tmp_path / "runs", "tome_r0.5")
    assert first.is_dir() and second == tmp_path / "runs" / "tome_r0.5-2" and second.is_dir()
    with pytest.raises(ValueError, match="run name"):
        new_run_dir(tmp_path, "a/b")


def test_eval_mode_restores_each_flag():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5))
    model.train()
    model[0].eval()  # mixed flags, as a reducer with a frozen policy network has
    with eval_mode(model) as m:
        assert m is model and not any(x.training for x in model.modules())
    assert [x.training for x in model.modules()] == [True, False, True]


def test_policy_cache_path_naming(tmp_path):
    assert policy_cache_path("camvid", (384, 512), "efficientnet_lite0", [2, 4]) == Path(
        "results/cache/policy/camvid_384x512_efficientnet_lite0_L2-4.safetensors")
    assert policy_cache_path("ade20k", [64, 96], "b", (2,), root=tmp_path).parent == tmp_path
    # other input statistics are another policy file; ImageNet's keep the plain name
    named = {n: policy_cache_path("camvid", (64, 96), "b", [2], normalization=n).name for n in ("vit", "imagenet")}
    assert named == {"vit": "camvid_64x96_b_L2_vit.safetensors", "imagenet": "camvid_64x96_b_L2.safetensors"}
