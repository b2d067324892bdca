"""Exact resume (issue 15): a run stopped at any step and resumed equals the uninterrupted run, bit for bit."""

import json
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from tokred.engine import build_optimizer, build_scheduler
from tokred.engine.checkpoint import load_checkpoint
from tokred.engine.sampler import ResumableSampler, SeededDataset
from tokred.engine.train import StopOnSignal, TrainingInterrupted, train
from tokred.jobs.resume import check_resume, config_differences, resume_command
from tokred.models.segmenter import build_segmenter

ROOT = Path(__file__).resolve().parents[1]


class _Augmented(torch.utils.data.Dataset):
    """Random images and a random flip drawn from the global torch generator (as torchvision v2 does)."""

    def __len__(self):
        return 10

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        img = torch.randn(3, 32, 48, generator=g) + torch.rand(1)  # augmentation: a random brightness
        lbl = (torch.arange(48) >= 24).long().expand(32, 48).clone()
        return (img.flip(-1), lbl.flip(-1)) if torch.rand(1) < 0.5 else (img, lbl)


class _StopAt(StopOnSignal):
    """A SIGINT that arrives before the ``at``-th check (the loop checks after every step and at every epoch's
    end) and stays pending, as a real one does."""

    def __init__(self, at: int):
        super().__init__()
        self.at, self.calls = at, 0

    def requested(self, device):
        self.calls += 1
        return signal.SIGINT if self.calls >= self.at else None


def _setup(run_dir: Path, resume: dict | None = None):
    torch.manual_seed(0)
    seg = build_segmenter("test_vit", 3, (32, 48), drop_path_rate=0.3)  # drop path: model randomness
    sampler = ResumableSampler(10, 2, seed=5)  # 5 batches per epoch
    loader = torch.utils.data.DataLoader(SeededDataset(_Augmented()), batch_size=2, sampler=sampler,
                                         drop_last=True, generator=torch.Generator().manual_seed(5))
    opt = build_optimizer(seg, "adamw", lr=1e-3)
    sched = build_scheduler(opt, total_iters=15, warmup_iters=2)
    if resume is not None:
        seg.load_state_dict(resume["model"])
        opt.load_state_dict(resume["optimizer"])
        sched.load_state_dict(resume["scheduler"])
    torch.manual_seed(123)  # a resumed process's global generators start elsewhere: the checkpoint restores them
    return seg, loader, sampler, opt, sched


def _train(run_dir: Path, stop=None, resume=None):
    run_dir.mkdir(exist_ok=True)
    seg, loader, sampler, opt, sched = _setup(run_dir, resume)
    losses = train(seg, loader, opt, sched, torch.device("cpu"), epochs=3, run_dir=run_dir, sampler=sampler,
                   progress=False, resume=resume, stop=stop or StopOnSignal())
    return seg, losses


# checks 1-5: steps 1-5, 6: end of epoch 0, 7-11: steps 6-10, 12: end of epoch 1, 13-14: steps 11-12
@pytest.mark.parametrize("stop_at,iteration", [(3, 3), (5, 5), (12, 10), (14, 12)],
                         ids=["mid-epoch-0", "last-step-of-epoch-0", "end-of-epoch-1", "mid-epoch-2"])
def test_stopped_and_resumed_training_is_bit_identical(tmp_path, stop_at, iteration):
    ref, ref_losses = _train(tmp_path / "ref")
    with pytest.raises(TrainingInterrupted) as info:
        _train(tmp_path / "cut", stop=_StopAt(stop_at))
    err = info.value
    assert err.exit_code == 130 and err.iteration == iteration and err.checkpoint == tmp_path / "cut" / "last.pth"
    ckpt = load_checkpoint(err.checkpoint)
    assert ckpt["iteration"] == iteration and "rng" in ckpt
    resumed, losses = _train(tmp_path / "cut", resume=ckpt)
    assert losses == ref_losses
    for (k, a), b in zip(ref.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k
    assert (tmp_path / "cut" / "train_log.csv").read_text() == (tmp_path / "ref" / "train_log.csv").read_text()


def test_train_log_rows_after_the_checkpoint_are_dropped_on_resume(tmp_path):
    _train(tmp_path / "ref")
    with pytest.raises(TrainingInterrupted) as info:
        _train(tmp_path / "cut", stop=_StopAt(8))  # stops mid-epoch 1 (step 7): epoch 0 is logged
    log = tmp_path / "cut" / "train_log.csv"
    log.write_text(log.read_text() + "2,10,0.0,9.9,9.9\n")  # a row logged before a kill, without checkpoint
    _train(tmp_path / "cut", resume=load_checkpoint(info.value.checkpoint))
    assert log.read_text() == (tmp_path / "ref" / "train_log.csv").read_text()


def _cfg(**over):
    base = {"seed": 0, "device": "cpu", "resume": True, "run_name": "a", "output_dir": "x",
            "train": {"lr": 3e-4, "num_workers": 2, "epochs": 4}, "eval": {"max_items": None},
            "merger": {"name": "none", "policy_checkpoint": None}, "dataset": {"root": "/data/a"}}
    c = OmegaConf.create(base)
    for k, v in over.items():
        OmegaConf.update(c, k, v, force_add=True)
    return c


def _stored_run(tmp_path, **over) -> Path:
    run = tmp_path / "a"
    run.mkdir()
    OmegaConf.save(_cfg(resume=False, **over), run / "config.yaml")
    (run / "last.pth").write_bytes(b"x")
    return run


def test_resume_refuses_a_different_configuration_and_writes_nothing(tmp_path):
    run = _stored_run(tmp_path)
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    with pytest.raises(ValueError) as info:
        check_resume(_cfg(**{"merger.name": "tome", "train.lr": 0.1}), run)
    msg = str(info.value)
    assert "merger.name: run has 'none', requested 'tome'" in msg and "train.lr" in msg and "nothing was written" in msg
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before
    # where it runs and what it evaluates may change
    check_resume(_cfg(**{"device": "cuda", "train.num_workers": 0, "eval.max_items": 3,
                         "dataset.root": "/mnt/a"}), run)
    assert set(config_differences({"a": {"b": 1}}, {"a": {"b": 1, "c": 2}})) == {"a.c"}


def test_resume_takes_the_fitted_policy_the_run_started_with(tmp_path):
    policy = tmp_path / "p.safetensors"
    policy.write_bytes(b"x")
    run = _stored_run(tmp_path, **{"merger.policy_checkpoint": str(policy)})
    cfg = _cfg()
    check_resume(cfg, run, fitted=("merger", "policy_checkpoint"))
    assert cfg.merger.policy_checkpoint == str(policy)


def test_resume_of_a_finished_or_missing_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="last.pth"):
        check_resume(_cfg(), tmp_path / "nothing")
    run = _stored_run(tmp_path)
    (run / "metrics.json").write_text("{}")
    with pytest.raises(ValueError, match=r"is finished .*python -m tokred eval checkpoint="):
        check_resume(_cfg(), run)


def test_resume_command_points_at_the_run(tmp_path):
    cmd = resume_command(tmp_path / "runs" / "my run-2")
    assert cmd.endswith(f"output_dir={tmp_path / 'runs'} 'run_name=my run-2' resume=true")


# ---------------------------------------------------------------------------------- real processes
RUN = ["run", "experiment=smoke", "train.max_iters=null", "train.epochs=3", "eval.bench=false", "seed=3",
       "run_name=r"]


def _run(out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tokred", *RUN, f"output_dir={out}", *extra], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "TQDM_DISABLE": "1"})  # same threads as this process: CPU
    # reductions (the logged loss) are bit-identical only at the same thread count


def test_sigkill_then_sigint_then_resume_equals_the_uninterrupted_run(tmp_path, tokred_cli, wait_for_epoch):
    """A real run: SIGKILL after epoch 1's checkpoint, resume, SIGINT (exit 130 with the resume command),
    resume with that command: metrics and training log equal an uninterrupted run's."""
    cut = _run(tmp_path / "cut")
    run = tmp_path / "cut" / "r"
    wait_for_epoch(run, cut, 1)
    cut.send_signal(signal.SIGKILL)
    cut.wait()
    assert not (run / "metrics.json").exists()
    config = (run / "config.yaml").read_bytes()
    again = _run(tmp_path / "cut", "resume=true")
    wait_for_epoch(run, again, 2)
    again.send_signal(signal.SIGINT)
    _, err = again.communicate(timeout=300)
    assert again.returncode == 130, err[-3000:]
    assert "resume with:" in err and "stopped by SIGINT" in (run / "run.log").read_text()
    command = err.split("resume with:")[1].strip().splitlines()[0]
    assert command.startswith("python -m tokred run ") and "resume=true" in command
    assert f"output_dir={tmp_path / 'cut'}" in command
    done = tokred_cli(*shlex.split(command)[3:])  # the printed command, run in this process (no new interpreter)
    assert done.returncode == 0, done.stderr[-3000:]
    ref = tokred_cli(*RUN, f"output_dir={tmp_path / 'ref'}")  # the same run, never interrupted
    assert ref.returncode == 0, ref.stderr[-3000:]
    a = json.loads((tmp_path / "ref" / "r" / "metrics.json").read_text())
    b = json.loads((run / "metrics.json").read_text())
    assert a["miou"] == b["miou"] and a["final_losses"] == b["final_losses"]
    ref_log, cut_log = ((tmp_path / "ref" / "r" / "train_log.csv").read_text(), (run / "train_log.csv").read_text())
    assert ref_log == cut_log, repr((ref_log, cut_log))
    assert (run / "config.yaml").read_bytes() == config  # never rewritten on resume
    assert {k: v["name"] for k, v in b["reducer_config"].items()} == {"merger": "none", "pruner": "none"}


def test_seed_gives_the_same_model_whether_the_policy_is_cached_or_trained(tmp_path, monkeypatch):
    """The policy stage draws random numbers; the model is built from a fresh seed after it either way."""
    from hydra import compose, initialize_config_dir

    import tokred.jobs.run as run_mod
    from tokred.config import config_dir

    seen = []
    monkeypatch.setattr(run_mod, "_run_in_dir", lambda cfg, model, device, run_dir: seen.append(
        {k: v.clone() for k, v in model.state_dict().items()}) or {})
    overrides = ["experiment=smoke", "merger=dcts", f"policy.out={tmp_path / 'policy.safetensors'}",
                 "policy.max_steps=1", f"output_dir={tmp_path / 'runs'}", "preflight.check=list"]
    for _ in range(2):  # first: the policy is trained; then: the cached file is reused
        with initialize_config_dir(config_dir(), version_base=None):
            run_mod.run_job(compose("config", overrides=overrides))
    assert (tmp_path / "policy.safetensors").is_file()
    logs = [p.read_text() for p in sorted((tmp_path / "runs").glob("*/run.log"), key=lambda p: len(str(p)))]
    assert "policy stage: training" in logs[0] and "policy stage done" in logs[0]  # the stage is in run.log
    assert "reusing trained policy" in logs[1]
    assert seen[0].keys() == seen[1].keys()
    for k in seen[0]:
        assert torch.equal(seen[0][k], seen[1][k]), k


def test_everything_after_training_sees_progress_one(tmp_path, monkeypatch):
    """A warm-up schedule's budget after training is the full one (evaluation, GFLOPs, timing, records)."""
    from hydra import compose, initialize_config_dir

    import tokred.jobs.run as run_mod
    from tokred.config import config_dir

    seen = []

    def measure(cfg, model, device):
        seen.append([r.progress for r in model.reducers])
        raise KeyboardInterrupt  # stop here: nothing else to check

    monkeypatch.setattr(run_mod, "_evaluate_and_measure", measure)
    with initialize_config_dir(config_dir(), version_base=None):
        cfg = compose("config", overrides=["experiment=smoke", "merger=tome", "merger.r=2", "schedule=warmup",
                                           f"output_dir={tmp_path}", "train.max_iters=3", "train.epochs=1"])
    with pytest.raises(KeyboardInterrupt):
        run_mod.run_job(cfg)
    assert seen == [[1.0, 1.0]]
