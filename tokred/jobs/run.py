"""``python -m tokred run``: train (or load ``checkpoint=``), evaluate, measure, write the run directory.

A run directory (``output_dir/<run name>``, never overwritten: ``-2``, ``-3``, ...) holds ``config.yaml``,
``train_log.csv``, ``last.pth``, ``run.log`` and ``metrics.json`` (``tokred.results``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from tokred.config import (baseline_like, build_datasets, build_model_from_config, default_run_name, eval_images,
                           eval_labels, inference_settings, make_loader, method_name, named_run_dir,
                           input_normalization, resolve_device,
                           seed_everything, spread_indices, test_pipeline)
from tokred.engine.checkpoint import load_checkpoint
from tokred.models.checkpoints import load_segmentation_checkpoint, load_state_dict_checked
from tokred.engine.distributed import env_rank, init_distributed, is_main_process, local_device, world_size
from tokred.engine.train import TrainingInterrupted
from tokred.io import eval_mode, new_run_dir
from tokred.jobs.policy import ensure_policy
from tokred.jobs.summary import print_summary
from tokred.jobs.train_stage import train_stage
from tokred.models.segmenter import Segmenter

__all__ = ["reads_labels", "run_job"]

log = logging.getLogger("tokred")


def reads_labels(model: Segmenter) -> bool:
    """Whether a reducer of ``model`` reads the ground truth (oracle policies): an upper bound, not timed."""
    return any(r.reads_labels for r in model.reducers)


def _run_dir(cfg: DictConfig) -> Path:
    """A fresh run directory, or the existing one when ``resume=true``.

    Raises:
        ValueError: a bad ``existing_run`` value or run name.
        FileNotFoundError: ``resume=true`` but no such run exists.
    """
    if cfg.existing_run not in ("new", "skip_or_resume"):
        raise ValueError(f"existing_run must be 'new' or 'skip_or_resume', got {cfg.existing_run!r}")
    if cfg.resume:
        base = named_run_dir(cfg)
        if not (base / "last.pth").is_file():
            raise FileNotFoundError(f"resume=true but {base / 'last.pth'} does not exist; drop resume or set "
                                    "run_name to an existing run under output_dir")
        return base
    return new_run_dir(cfg.output_dir, cfg.run_name or default_run_name(cfg))


class _RunLog(logging.FileHandler):
    """``run_dir/run.log`` on the root logger, with tokred's loggers at INFO while it is attached (also in
    library use, where nothing configured them); :meth:`close` detaches it and restores the level."""

    def __init__(self, run_dir: Path) -> None:
        super().__init__(run_dir / "run.log")
        self.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        self._tokred = logging.getLogger("tokred")
        self._level = self._tokred.level
        if self._tokred.getEffectiveLevel() > logging.INFO:
            self._tokred.setLevel(logging.INFO)
        logging.getLogger().addHandler(self)

    def close(self) -> None:
        logging.getLogger().removeHandler(self)
        self._tokred.setLevel(self._level)
        super().close()


def _file_logging(run_dir: Path) -> logging.Handler:
    """Adds ``run_dir/run.log`` to the root logger; the caller closes it (a multirun shares one process)."""
    return _RunLog(run_dir)


def _evaluate_and_measure(cfg: DictConfig, model: Segmenter, device: torch.device) -> dict[str, Any]:
    """Quality on the eval split, token accounting over every forward, then cost (GFLOPs, im/s vs none)."""
    from tokred.data import dataset_info
    from tokred.engine.evaluate import evaluate
    from tokred.measure import TokenAccounting

    ds = build_datasets(cfg, train=False)
    loader = make_loader(ds, int(cfg.eval.batch_size), False, int(cfg.train.num_workers))
    acct = TokenAccounting()
    inf = inference_settings(cfg)
    quality = evaluate(model, loader, int(cfg.dataset.num_classes), device, int(cfg.dataset.ignore_index),
                       mode=inf.mode, crop=inf.crop, stride=inf.stride,
                       class_names=dataset_info(cfg.dataset.name).class_names, on_state=acct.update,
                       amp=bool(cfg.train.amp), batch_size=int(cfg.eval.batch_size))
    quality["eval_split"] = cfg.eval.split
    quality["eval_protocol"] = {"test_pipeline": test_pipeline(cfg), "mode": inf.mode,
                                "window": None if inf.crop is None else list(inf.crop),
                                "stride": None if inf.stride is None else list(inf.stride)}
    return {"quality": quality, "tokens": acct.summary(), **_measure_cost(cfg, model, ds, device)}


def _measure_cost(cfg: DictConfig, model: Segmenter, ds, device: torch.device) -> dict[str, Any]:
    """GFLOPs (fvcore, each image with its own token counts) and im/s of this model next to the unreduced
    one, measured side by side in this process on real eval images."""
    from tokred.measure import compare, count_gflops

    crop = tuple(cfg.dataset.crop_size)
    n_flops = min(int(cfg.eval.flops_images), len(ds))
    if n_flops <= 0:
        return {}
    oracle = reads_labels(model)
    baseline = baseline_like(cfg, model)
    if test_pipeline(cfg) == "protocol":
        # The data set's own test resolution and windows: GFLOPs per image are summed over its windows.
        from tokred.measure.flops import count_gflops_windows

        inf = inference_settings(cfg)
        items = [ds[int(i)] for i in spread_indices(len(ds), n_flops)]
        images = [im for im, _ in items]
        with eval_mode(model):
            gflops = count_gflops_windows(model.cpu(), images, inf.mode, inf.crop, inf.stride,
                                          targets=[lb for _, lb in items] if oracle else None)
        # the same images: their sizes (and so their windows) differ, one image would not stand for them
        base_gflops = count_gflops_windows(baseline, images, inf.mode, inf.crop, inf.stride)
    else:
        images = eval_images(ds, n_flops, crop)
        targets = eval_labels(ds, n_flops, crop) if oracle else None
        with eval_mode(model):
            gflops = count_gflops(model.cpu(), images, targets)
        base_gflops = count_gflops(baseline, images[:1])
    gflops["baseline_gflops"] = base_gflops["gflops"]
    gflops["gflops_ratio"] = base_gflops["gflops"] / gflops["gflops"]
    model.to(device)
    throughput = None
    if oracle:
        log.info("not timing %s: it reads the ground truth (an upper bound, not a deployable model)",
                 method_name(cfg))
    elif cfg.eval.bench:
        bs = int(cfg.eval.bench_batch_size)
        timing = dict(device=str(device), precision="bf16" if (cfg.train.amp and device.type == "cuda") else "fp32",
                      warmup=2, repeats=int(cfg.eval.bench_repeats), inputs=eval_images(ds, bs, crop))
        throughput = compare(model, baseline, bs, crop, gflops_reduced=gflops["gflops"],
                             gflops_baseline=base_gflops["gflops"], **timing)
        if cfg.eval.get("self_check", True):  # the unreduced model against itself: 1 on a quiet machine
            check = compare(baseline, baseline, bs, crop, **timing)
            throughput["self_check_speedup"] = check["speedup"]
            throughput["self_check_speedup_iqr"] = check["speedup_iqr"]
    return {"gflops": gflops, "throughput": throughput}


def _assemble_metrics(cfg: DictConfig, model: Segmenter, measured: dict[str, Any],
                      extra: dict[str, Any]) -> dict[str, Any]:
    from tokred.measure import provenance
    from tokred.results import assemble_metrics

    c = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(c, dict)
    gflops = measured.get("gflops")
    return assemble_metrics(
        model=c["model"], dataset=c["dataset"], crop_size=c["dataset"]["crop_size"], decoder=c["decoder"],
        merger=c["merger"], pruner=c["pruner"], schedule=c["schedule"], seed=int(c["seed"]),
        quality=measured["quality"], provenance=provenance({"merger": cfg.merger.name, "pruner": cfg.pruner.name}),
        gflops=gflops, throughput=measured.get("throughput"), tokens=measured["tokens"],
        extra={"method": method_name(cfg), "gflops_ratio": None if gflops is None else gflops["gflops_ratio"],
               "reducer_config": {slot: {"name": cfg[slot].name, "class": type(r).__name__, **r.extra_config()}
                                  for slot, r in zip(("merger", "pruner"), model.reducers)},
               "train": c["train"], "eval": c["eval"], "world_size": world_size(), **extra})


def _skip_or_resume(cfg: DictConfig) -> dict[str, Any] | None:
    """``existing_run=skip_or_resume``: the finished run's metrics, or None (``resume`` set when interrupted)."""
    existing = named_run_dir(cfg)
    if (existing / "metrics.json").is_file():
        log.info("skipping finished run %s", existing)
        return json.loads((existing / "metrics.json").read_text())
    if (existing / "last.pth").is_file():
        OmegaConf.set_struct(cfg, False)
        cfg.resume = True
        OmegaConf.set_struct(cfg, True)
        log.info("resuming interrupted run %s", existing)
    return None


def _agree_on_run_dir(run_dir: Path | None) -> Path:
    """Rank 0's run folder, on every rank (``resume=true`` under torchrun loads the same ``last.pth``)."""
    if world_size() <= 1:
        assert run_dir is not None
        return run_dir
    import torch.distributed as dist

    box = [None if run_dir is None else str(run_dir)]
    dist.broadcast_object_list(box, src=0)
    return Path(str(box[0]))


def run_job(cfg: DictConfig) -> dict[str, Any]:
    """``python -m tokred run``: train (or load ``checkpoint=``), evaluate, measure, write the run directory.

    Order: the model is built (names and parameters validated), ``resume=true`` is checked against the run's
    own configuration, every split and checkpoint the run will read is validated (``tokred.preflight``), and
    only then is the run folder created; a failure up to there writes nothing. The policy stage (dCTS/CTS)
    runs next, on every rank before the process group exists, logged to ``run.log``; the model is then built
    again from the seed, so a cached policy and a freshly trained one give the same init and data order.

    Returns:
        The metrics written to ``metrics.json`` (empty on ranks other than 0).

    Raises:
        ValueError / KeyError: an impossible configuration, before anything is written.
        PreflightError: (a ``ValueError``) a data or checkpoint problem, before anything is written.
        FileNotFoundError: ``resume=true`` without a run to resume.
        TrainingInterrupted: SIGINT/SIGTERM during training; the checkpoint is written and the command that
            resumes the run is logged (``tokred.engine.train``).
    """
    from tokred.jobs.policy import fitting_slot
    from tokred.jobs.resume import check_resume, resume_command
    from tokred.preflight import preflight_run

    seed_everything(int(cfg.seed))
    device = local_device(resolve_device(cfg.device))  # this rank's GPU, also for the policy stage
    model = build_model_from_config(cfg)  # validates names and parameters before anything is written
    if cfg.existing_run == "skip_or_resume":
        done = _skip_or_resume(cfg)
        if done is not None:
            return done
    main = env_rank() == 0
    if cfg.resume:
        found = fitting_slot(cfg)
        check_resume(cfg, named_run_dir(cfg), None if found is None else (found[0], found[2]))
    if main:
        preflight_run(cfg, model)
    run_dir = _run_dir(cfg) if main else None
    handler = _file_logging(run_dir) if run_dir is not None else None
    try:
        if ensure_policy(cfg, writer=main):
            seed_everything(int(cfg.seed))  # the same init whether the policy was cached or just trained
            model = build_model_from_config(cfg)
        device = init_distributed(device)
        run_dir = _agree_on_run_dir(run_dir)
        try:
            return _run_in_dir(cfg, model.to(device), device, run_dir)
        except TrainingInterrupted as err:
            if is_main_process():
                log.error("%s; resume with:\n  %s", err, resume_command(run_dir))
            raise
    finally:
        if handler is not None:
            handler.close()


def _init_from(cfg: DictConfig, model: Segmenter) -> None:
    """Loads ``init_from`` weights; reducer parameters the checkpoint lacks keep their init.

    Raises:
        ValueError: the checkpoint holds weights this model lacks, or lacks backbone/decoder weights.
    """
    missing, _ = load_state_dict_checked(model, load_checkpoint(cfg.init_from)["model"], f"init_from={cfg.init_from}")
    log.info("initialised from %s (%d reducer tensors keep their init)", cfg.init_from, len(missing))


def _run_in_dir(cfg: DictConfig, model: Segmenter, device: torch.device, run_dir: Path) -> dict[str, Any]:
    from tokred.results import write_metrics

    if is_main_process():
        if not cfg.resume:  # a resumed run keeps the configuration it was started with (checked equal)
            OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
        log.info("run directory %s", run_dir)
    extra: dict[str, Any] = {"run_dir": str(run_dir), "layout": model.encoder.layout}
    extra["normalization"] = input_normalization(cfg).record()  # the input mean/std of every split, and why
    if cfg.init_from and not cfg.resume:
        _init_from(cfg, model)
        extra["init_from"] = str(cfg.init_from)
    if cfg.checkpoint:
        load_segmentation_checkpoint(model, cfg.checkpoint, str(cfg.get("checkpoint_format", "auto")))
        extra["checkpoint"] = str(cfg.checkpoint)
    elif int(cfg.train.epochs) > 0:
        extra.update(train_stage(cfg, model, device, run_dir))
    model.set_progress(1.0)  # everything after training sees the trained budget, not a warm-up fraction
    if not is_main_process():
        return {}
    from tokred.jobs.calibrate import calibrate_exit_threshold

    calibration = calibrate_exit_threshold(cfg, model, device)  # pruner.target_accuracy -> p0
    if calibration is not None:
        extra["exit_calibration"] = calibration
    measured = _evaluate_and_measure(cfg, model, device)
    metrics = _assemble_metrics(cfg, model, measured, extra)
    write_metrics(run_dir / "metrics.json", metrics)
    print_summary(run_dir, metrics, _analyze_hint(cfg, run_dir, model))
    return metrics


def _analyze_hint(cfg: DictConfig, run_dir: Path, model: Segmenter) -> str | None:
    """The ``tokred analyze`` command for this run's checkpoint (when the command exists and a reducer acts)."""
    from tokred.__main__ import JOBS

    if "analyze" not in JOBS or not (run_dir / "last.pth").is_file():
        return None
    if all(r.kind == "none" for r in model.reducers):
        return None
    import shlex

    from tokred.jobs.resume import job_overrides

    keep = job_overrides(("resume=", "run_name=", "output_dir=", "existing_run=", "train.", "+train.",
                          "checkpoint=", "init_from=", "eval.bench", "policy."))
    # what the run resolved on its own: the fitted policy file and the calibrated exit threshold
    for slot, r in zip(("merger", "pruner"), model.reducers):
        if getattr(r, "policy_checkpoint", None):
            keep.append(f"{slot}.policy_checkpoint={r.policy_checkpoint}")
        if getattr(r, "target_accuracy", None) is not None:
            keep += [f"{slot}.threshold={r.threshold}", f"{slot}.target_accuracy=null"]
    return " ".join(shlex.quote(w) for w in ["python", "-m", "tokred", "analyze", *keep,
                                             f"checkpoint={run_dir / 'last.pth'}"])
