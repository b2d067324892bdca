"""End-to-end CLI runs on the embedded sample with timm's tiny test backbone (experiment=smoke).

One smoke run goes through a real ``python -m tokred run`` process (and ``list``/an unknown command through the
torch-free path of the entry point); the other commands run through the same ``tokred.__main__.main`` in this
process (``tokred_cli``, tests/conftest.py): Hydra composition, validation, the job and its exit code as on the
command line, without a fresh interpreter's torch/timm import per command.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _tokred(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tokred", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env={**__import__("os").environ, "TQDM_DISABLE": "1"})


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """``python -m tokred run experiment=smoke`` in a fresh interpreter: the main job as a user runs it."""
    out = tmp_path_factory.mktemp("runs")
    res = _tokred("run", "experiment=smoke", f"output_dir={out}", "run_name=smoke")
    assert res.returncode == 0, res.stderr[-3000:]
    return out, res


def test_run_writes_metrics_and_summary(smoke_run):
    out, res = smoke_run
    run_dir = out / "smoke"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for key in ("miou", "per_class_iou", "pixel_accuracy", "gflops", "tokens_per_block", "git_commit"):
        assert key in metrics, key
    assert 0.0 <= metrics["miou"] <= 1.0
    assert set(metrics["per_class_iou"]) >= {"Sky", "Road", "Bicyclist"}
    assert (run_dir / "config.yaml").is_file() and (run_dir / "last.pth").is_file()
    assert "mIoU (%)" in res.stdout and str(run_dir) in res.stdout


def test_existing_run_dir_is_never_overwritten(smoke_run, tokred_cli):
    out, _ = smoke_run
    before = (out / "smoke" / "metrics.json").read_text()
    res = tokred_cli("run", "experiment=smoke", f"output_dir={out}", "run_name=smoke", "eval.bench=false",
                     "train.max_iters=1", "eval.max_items=1")  # the smallest run that reaches its run directory
    assert res.returncode == 0, res.stderr[-3000:]
    assert (out / "smoke-2" / "metrics.json").is_file()
    assert (out / "smoke" / "metrics.json").read_text() == before


def test_eval_of_checkpoint(smoke_run, tokred_cli):
    out, _ = smoke_run
    ckpt = out / "smoke" / "last.pth"
    res = tokred_cli("eval", "experiment=smoke", f"output_dir={out}", f"checkpoint={ckpt}", "run_name=ev",
                     "eval.bench=false")
    assert res.returncode == 0, res.stderr[-3000:]
    a = json.loads((out / "smoke" / "metrics.json").read_text())
    b = json.loads((out / "ev" / "metrics.json").read_text())
    assert b["miou"] == pytest.approx(a["miou"])


def test_unknown_reducer_lists_valid_names(tmp_path, tokred_cli):
    res = tokred_cli("run", "experiment=smoke", f"output_dir={tmp_path}", "merger=nope")
    assert res.returncode != 0
    assert "nope" in res.stderr and "tome" in res.stderr
    assert not any(tmp_path.iterdir())  # nothing written for a config that cannot compose


def test_unknown_command_and_list():
    res = _tokred("frobnicate")
    assert res.returncode == 2 and "valid" in res.stderr
    res = _tokred("list")
    assert res.returncode == 0 and "none" in res.stdout and "distribution" in res.stdout


def test_resume_without_run_fails_clearly(tmp_path, tokred_cli):
    res = tokred_cli("run", "experiment=smoke", f"output_dir={tmp_path}", "run_name=ghost", "resume=true")
    assert res.returncode != 0 and "last.pth" in res.stderr


def test_bench_side_by_side_and_loop_overhead(tmp_path, tokred_cli):
    common = ["experiment=smoke", "bench.repeats=2", "bench.warmup=1", "bench.batch_size=1", "bench.flops_images=1",
              f"bench.output_dir={tmp_path}", "bench.inputs=random"]
    res = tokred_cli("bench", *common, "merger=tome", "merger.r=8", "bench.run_name=tome")
    assert res.returncode == 0, res.stderr[-3000:]
    m = json.loads((tmp_path / "tome" / "metrics.json").read_text())
    assert m["gflops"] < m["gflops_detail"]["baseline_gflops"]  # ToMe r=8 removes tokens: fewer GFLOPs
    assert m["gflops_ratio"] == pytest.approx(m["gflops_detail"]["baseline_gflops"] / m["gflops"])
    assert m["speedup"] > 0 and m["efficiency"] == pytest.approx(m["speedup"] / m["gflops_ratio"])
    assert m["batch_size"] == 1 and m["precision"] == "fp32" and m["device"]
    res = tokred_cli("bench", *common, "bench.reference=timm", "bench.run_name=loop")
    assert res.returncode == 0, res.stderr[-3000:]
    m = json.loads((tmp_path / "loop" / "metrics.json").read_text())
    assert m["reference"] == "timm" and m["reference_images_per_second"] > 0


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_bench_on_missing_device_names_it(tmp_path, tokred_cli):
    res = tokred_cli("bench", "experiment=smoke", "device=cuda:3", f"bench.output_dir={tmp_path}")
    assert res.returncode != 0 and "cuda:3" in res.stderr and "available" in res.stderr


def test_train_policy_then_run_reuses_it(tmp_path, tokred_cli):
    pol = tmp_path / "policy.safetensors"
    res = tokred_cli("train-policy", "experiment=smoke", "merger=dcts", f"policy.out={pol}", "policy.max_steps=1")
    assert res.returncode == 0, res.stderr[-3000:]
    assert pol.is_file() and pol.with_suffix(".json").is_file()
    mtime = pol.stat().st_mtime_ns
    again = tokred_cli("train-policy", "experiment=smoke", "merger=dcts", f"policy.out={pol}")
    assert again.returncode != 0 and "exists" in again.stderr  # never overwritten
    res = tokred_cli("run", "experiment=smoke", "merger=dcts", "pruner=early_exit", f"policy.out={pol}",
                     f"output_dir={tmp_path / 'runs'}", "run_name=step", "eval.bench=false",
                     "train.max_iters=1", "eval.max_items=1")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "reusing trained policy" in res.stderr + res.stdout and pol.stat().st_mtime_ns == mtime
    m = json.loads((tmp_path / "runs" / "step" / "metrics.json").read_text())
    assert m["merger"]["policy_checkpoint"] == str(pol) and m["method"] == "dcts+early_exit"
