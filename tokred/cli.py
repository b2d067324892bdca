"""Command-line jobs behind ``python -m tokred <command> [hydra overrides]``.

Each job receives the composed Hydra config. Builders here are also the Python API's bridge from a config
(``build_model_from_config``), so a notebook can do ``compose(...)`` and get exactly what the CLI gets.
"""

from __future__ import annotations

import inspect
import json
import logging
import random
import re
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from tokred.data import build_dataset, dataset_info
from tokred.engine.checkpoint import load_checkpoint
from tokred.engine.distributed import init_distributed, is_main_process, world_size
from tokred.models.segmenter import Segmenter, build_segmenter
from tokred.reducers.registry import available_reducers, get_reducer_class

__all__ = ["bench_job", "build_model_from_config", "eval_job", "list_job", "method_name", "resolve_device", "run_job",
           "train_policy_job"]

log = logging.getLogger("tokred")


# ---------------------------------------------------------------------------------------------- builders
def resolve_device(spec: str) -> torch.device:
    """``auto`` -> cuda when available else cpu; otherwise the named device.

    Raises:
        ValueError: a CUDA device is named but none (or not that index) is available; lists what is.
    """
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(spec)
    except RuntimeError as err:
        raise ValueError(f"device={spec!r} is not a device name; use auto, cpu, cuda or cuda:N") from err
    if dev.type == "cuda":
        n = torch.cuda.device_count()
        if n == 0 or (dev.index is not None and dev.index >= n):
            avail = ["cpu"] + [f"cuda:{i}" for i in range(n)]
            raise ValueError(f"device={spec!r} is not available here; available: {', '.join(avail)}")
    elif dev.type != "cpu":
        raise ValueError(f"device={spec!r} is not supported; use auto, cpu, cuda or cuda:N")
    return dev


def _reducer_kwargs(section: DictConfig, slot: str, schedule: DictConfig) -> tuple[str, dict[str, Any]]:
    cfg = OmegaConf.to_container(section, resolve=True)
    assert isinstance(cfg, dict)
    name = cfg.pop("name", None)
    if name is None:
        raise ValueError(f"{slot} config has no 'name'; choose one of {', '.join(available_reducers())}")
    cls = get_reducer_class(name)  # raises with the valid names
    sched = OmegaConf.to_container(schedule, resolve=True)
    assert isinstance(sched, dict)
    applies = sched.pop("applies_to", ["merger", "pruner"])
    params = inspect.signature(cls.__init__).parameters
    if "schedule" in params and slot in applies and sched.get("kind", "constant") != "constant" \
            and cfg.get("schedule") is None:  # a schedule written in the reducer's own config wins
        cfg["schedule"] = sched
    return name, cfg


def build_model_from_config(cfg: DictConfig) -> Segmenter:
    """Builds the ``Segmenter`` that ``cfg`` (the composed tokred config) describes.

    Raises:
        ValueError / KeyError: unknown names or impossible configurations, with the valid choices.
    """
    m = cfg.model
    backbone_kwargs = dict(OmegaConf.to_container(m.backbone_kwargs, resolve=True) or {})
    for key in ("embed_dim", "depth", "num_heads"):
        backbone_kwargs.setdefault(key, int(m[key]))
    merger, merger_kwargs = _reducer_kwargs(cfg.merger, "merger", cfg.schedule)
    pruner, pruner_kwargs = _reducer_kwargs(cfg.pruner, "pruner", cfg.schedule)
    return build_segmenter(
        model=m.name, num_classes=int(cfg.dataset.num_classes), crop_size=tuple(cfg.dataset.crop_size),
        decoder=cfg.decoder.name, decoder_kwargs=OmegaConf.to_container(cfg.decoder.kwargs, resolve=True),
        merger=merger, merger_kwargs=merger_kwargs, pruner=pruner, pruner_kwargs=pruner_kwargs,
        backbone_kwargs=backbone_kwargs, checkpoint=m.checkpoint, drop_path_rate=float(m.drop_path_rate),
        grad_checkpointing=bool(cfg.train.grad_checkpointing), ignore_index=int(cfg.dataset.ignore_index))


def method_name(cfg: DictConfig) -> str:
    """``none``, ``tome``, ``dcts+early_exit``, ... from the merger and pruner names."""
    names = [n for n in (cfg.merger.name, cfg.pruner.name) if n != "none"]
    return "+".join(names) if names else "none"


def default_run_name(cfg: DictConfig) -> str:
    """mmsegmentation-style name: ``{method}_{backbone}_{decoder}_{gpus}xb{batch}-{epochs}ep_{dataset}-{HxW}``."""
    h, w = cfg.dataset.crop_size
    backbone = str(cfg.model.name).replace("_", "-")
    return (f"{method_name(cfg)}_{backbone}_{cfg.decoder.name}_{world_size()}xb{cfg.train.batch_size}-"
            f"{cfg.train.epochs}ep_{cfg.dataset.name}-{h}x{w}")


def _new_run_dir(cfg: DictConfig) -> Path:
    """A fresh run directory (``name``, ``name-2``, ...), or the existing one when ``resume=true``.

    Raises:
        FileNotFoundError: ``resume=true`` but no such run exists.
    """
    name = cfg.run_name or default_run_name(cfg)
    if not re.fullmatch(r"[\w.+=,-]+", name):
        raise ValueError(f"run_name {name!r} may only hold letters, digits and . + = , - _")
    base = Path(cfg.output_dir) / name
    if cfg.existing_run not in ("new", "skip_or_resume"):
        raise ValueError(f"existing_run must be 'new' or 'skip_or_resume', got {cfg.existing_run!r}")
    if cfg.resume:
        if not (base / "last.pth").is_file():
            raise FileNotFoundError(f"resume=true but {base / 'last.pth'} does not exist; drop resume or set "
                                    "run_name to an existing run under output_dir")
        return base
    path, k = base, 1
    while path.exists():
        k += 1
        path = base.with_name(f"{name}-{k}")
    path.mkdir(parents=True)
    return path


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _setup_file_logging(run_dir: Path) -> logging.Handler:
    """Adds ``run_dir/run.log`` to the root logger; the caller removes it when the run ends (several runs of
    a Hydra multirun share one process)."""
    handler = logging.FileHandler(run_dir / "run.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    logging.getLogger().addHandler(handler)
    return handler


def _datasets(cfg: DictConfig, train: bool):
    d = cfg.dataset
    root = d.root
    if train:
        return build_dataset(d.name, root, d.train_split, tuple(d.crop_size), train=True,
                             scale_range=tuple(d.scale_range), base_size=tuple(d.base_size))
    return build_dataset(d.name, root, cfg.eval.split, tuple(d.crop_size), train=False, max_items=cfg.eval.max_items)


def _loader(ds, batch_size: int, shuffle: bool, num_workers: int, sampler=None):
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=shuffle and sampler is None,
                                       sampler=sampler, num_workers=num_workers, drop_last=shuffle,
                                       persistent_workers=False, pin_memory=torch.cuda.is_available())


# ---------------------------------------------------------------------------------------------- jobs
def _train_stage(cfg: DictConfig, model: Segmenter, device: torch.device, run_dir: Path) -> dict[str, Any]:
    from tokred.engine.train import build_optimizer, build_scheduler, train

    ds = _datasets(cfg, train=True)
    sampler = None
    if world_size() > 1:
        sampler = torch.utils.data.distributed.DistributedSampler(ds, shuffle=True)
    loader = _loader(ds, int(cfg.train.batch_size), True, int(cfg.train.num_workers), sampler)
    if len(loader) == 0:
        raise ValueError(f"train.batch_size={cfg.train.batch_size} is larger than the training set "
                         f"({len(ds)} images); lower it")
    t = cfg.train
    opt = build_optimizer(model, t.optimizer, float(t.lr), float(t.weight_decay), float(t.momentum))
    total = int(t.epochs) * len(loader)
    if t.max_iters is not None:
        total = min(total, int(t.max_iters))
    sched = build_scheduler(opt, total, int(t.warmup_iters), float(t.poly_power))
    start_epoch = 0
    if cfg.resume:
        ckpt = load_checkpoint(run_dir / "last.pth")
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        start_epoch = int(ckpt["epoch"])
        log.info("resumed %s at epoch %d", run_dir, start_epoch)
    net: torch.nn.Module = model
    if world_size() > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                                        find_unused_parameters=True)
    t0 = time.perf_counter()
    losses = train(net, loader, opt, sched, device, int(t.epochs), run_dir=run_dir if is_main_process() else None,
                   start_epoch=start_epoch, amp=bool(t.amp), grad_clip=t.grad_clip, max_iters=t.max_iters,
                   checkpoint_every=int(t.checkpoint_every),
                   checkpoint_extra={"config": OmegaConf.to_container(cfg, resolve=True)}, sampler=sampler)
    return {"train_seconds": time.perf_counter() - t0, "train_images": len(ds), "final_losses": losses}


def _evaluate_and_measure(cfg: DictConfig, model: Segmenter, device: torch.device) -> dict[str, Any]:
    """Quality on the eval split, token accounting over every forward, then cost (GFLOPs, im/s vs none)."""
    from tokred.engine.evaluate import evaluate
    from tokred.measure import TokenAccounting

    ds = _datasets(cfg, train=False)
    info = dataset_info(cfg.dataset.name)
    loader = _loader(ds, int(cfg.eval.batch_size), False, int(cfg.train.num_workers))
    acct = TokenAccounting()
    quality = evaluate(model, loader, int(cfg.dataset.num_classes), device, int(cfg.dataset.ignore_index),
                       mode=cfg.eval.mode, crop=tuple(cfg.dataset.crop_size),
                       stride=None if cfg.eval.stride is None else tuple(cfg.eval.stride),
                       class_names=info.class_names, on_state=acct.update, amp=bool(cfg.train.amp))
    quality["eval_split"] = cfg.eval.split
    return {"quality": quality, "tokens": acct.summary(), **_measure_cost(cfg, model, ds, device)}


def _spread_indices(total: int, n: int) -> np.ndarray:
    """``n`` indices spread evenly over ``range(total)`` (wrapping when ``n > total``)."""
    return np.linspace(0, total - 1, num=n).round().astype(int) if n <= total else np.arange(n) % total


def _eval_images(ds, n: int, crop: tuple[int, int]) -> torch.Tensor:
    """``[n, 3, H, W]`` real eval images at the crop size, spread evenly over the eval set: the cost of dynamic
    reducers (dCTS, early exit) depends on the content, so the first few images of a sequence would not do."""
    import torch.nn.functional as F

    idx = _spread_indices(len(ds), n)
    return torch.stack([F.interpolate(ds[int(i)][0][None], size=crop, mode="bilinear", align_corners=False)[0]
                        for i in idx])


def _eval_labels(ds, n: int, crop: tuple[int, int]) -> torch.Tensor:
    """``[n, H, W]`` labels of the images ``_eval_images`` picks, nearest-resized to the crop."""
    import torch.nn.functional as F

    idx = _spread_indices(len(ds), n)
    return torch.stack([F.interpolate(ds[int(i)][1][None, None].float(), size=crop, mode="nearest")[0, 0].long()
                        for i in idx])


def _measure_cost(cfg: DictConfig, model: Segmenter, ds, device: torch.device) -> dict[str, Any]:
    """GFLOPs (fvcore, each image with its own token counts) and im/s of this model next to the unreduced
    one, measured side by side in this process on real eval images."""
    from tokred.measure import compare, count_gflops

    crop = tuple(cfg.dataset.crop_size)
    n_flops = min(int(cfg.eval.flops_images), len(ds))
    if n_flops <= 0:
        return {}
    images = _eval_images(ds, n_flops, crop)
    reads_target = any(r.reads_target for r in model.reducers)  # oracle baselines
    targets = _eval_labels(ds, n_flops, crop) if reads_target else None
    model.eval()
    gflops = count_gflops(model.cpu(), images, targets)
    baseline = _baseline_like(cfg, model)
    base_gflops = count_gflops(baseline, images[:1])
    gflops["baseline_gflops"] = base_gflops["gflops"]
    gflops["gflops_ratio"] = base_gflops["gflops"] / gflops["gflops"]
    model.to(device)
    throughput = None
    if reads_target:
        log.info("not timing %s: it reads the ground truth (an upper bound, not a deployable model)",
                 method_name(cfg))
    elif cfg.eval.bench:
        bs = int(cfg.eval.bench_batch_size)
        throughput = compare(model, baseline, bs, crop, device=str(device),
                             precision="bf16" if (cfg.train.amp and device.type == "cuda") else "fp32",
                             warmup=2, repeats=int(cfg.eval.bench_repeats), gflops_reduced=gflops["gflops"],
                             gflops_baseline=base_gflops["gflops"], inputs=_eval_images(ds, bs, crop))
    return {"gflops": gflops, "throughput": throughput}


def _baseline_like(cfg: DictConfig, model: Segmenter) -> Segmenter:
    """The unreduced model with the same backbone and decoder weights (for GFLOPs and im/s ratios)."""
    base_cfg = cfg.copy()
    OmegaConf.set_struct(base_cfg, False)
    base_cfg.merger = {"name": "none"}
    base_cfg.pruner = {"name": "none"}
    base_cfg.model.checkpoint = None
    baseline = build_model_from_config(base_cfg)
    baseline.load_state_dict(model.state_dict(), strict=False)
    return baseline.eval()


def _print_summary(run_dir: Path, metrics: dict[str, Any]) -> None:
    from tabulate import tabulate

    def fmt(v: Any, pct: bool = False) -> str:
        if v is None:
            return "-"
        return f"{100 * v:.2f}" if pct else (f"{v:.3g}" if isinstance(v, float) else str(v))

    rows = [["method", metrics.get("method")], ["model", metrics.get("model", {}).get("name")],
            ["dataset / split", f"{metrics.get('dataset', {}).get('name')} / {metrics.get('eval_split')}"],
            ["images evaluated", metrics.get("num_images")],
            ["mIoU (%)", fmt(metrics.get("miou"), True)], ["pixel acc (%)", fmt(metrics.get("pixel_accuracy"), True)],
            ["GFLOPs / image", fmt(metrics.get("gflops"))], ["GFLOPs ratio vs none", fmt(metrics.get("gflops_ratio"))],
            ["im/s", fmt(metrics.get("images_per_second"))], ["speedup vs none", fmt(metrics.get("speedup"))],
            ["token reduction", fmt(metrics.get("token_reduction"))],
            ["halted fraction", fmt(metrics.get("halted_fraction"))], ["device", metrics.get("device")]]
    sys.stdout.write(tabulate(rows, tablefmt="simple") + "\n")
    per_class = metrics.get("per_class_iou") or {}
    if per_class:
        sys.stdout.write(tabulate([[k, fmt(v, True)] for k, v in per_class.items()], headers=["class", "IoU (%)"],
                                  tablefmt="simple") + "\n")
    sys.stdout.write(f"results: {run_dir}\n")


def _assemble_metrics(cfg: DictConfig, model: Segmenter, measured: dict[str, Any],
                      extra: dict[str, Any]) -> dict[str, Any]:
    from tokred.measure import provenance
    from tokred.results import assemble_metrics

    c = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(c, dict)
    prov = provenance({"merger": cfg.merger.name, "pruner": cfg.pruner.name})
    gflops = measured.get("gflops")
    return assemble_metrics(
        model=c["model"], dataset=c["dataset"], crop_size=c["dataset"]["crop_size"], decoder=c["decoder"],
        merger=c["merger"], pruner=c["pruner"], schedule=c["schedule"], seed=int(c["seed"]),
        quality=measured["quality"], provenance=prov, gflops=gflops, throughput=measured.get("throughput"),
        tokens=measured["tokens"],
        extra={"method": method_name(cfg), "gflops_ratio": None if gflops is None else gflops["gflops_ratio"],
               "reducer_config": {r.kind: {"class": type(r).__name__, **r.extra_config()} for r in model.reducers},
               "train": c["train"], "eval": c["eval"], "world_size": world_size(), **extra})


_POLICY_MERGERS = ("dcts", "cts")


def _policy_path(cfg: DictConfig) -> Path:
    """Where the trained policy for this dataset, crop, policy backbone and levels lives."""
    if cfg.policy.out:
        return Path(cfg.policy.out)
    h, w = cfg.dataset.crop_size
    levels = cfg.merger.get("levels") or [2]
    name = (f"{cfg.dataset.name}_{h}x{w}_{cfg.merger.policy_backbone}_L{'-'.join(str(v) for v in levels)}"
            f".safetensors")
    return Path("results/cache/policy") / name


def train_policy_job(cfg: DictConfig) -> dict[str, Any]:
    """``python -m tokred train-policy merger=dcts [dataset=...]``: trains the superpatch policy network on
    ground-truth window uniformity (methods.md Sec. 1-2), reports per-level precision/recall on the eval split,
    and saves it (never over an existing file)."""
    from tokred.policy import build_policy, train_policy

    if cfg.merger.name not in _POLICY_MERGERS:
        raise ValueError(f"train-policy needs merger=dcts or merger=cts, got merger={cfg.merger.name}")
    out = _policy_path(cfg)
    if out.exists():
        raise FileExistsError(f"{out} exists; delete it or pass policy.out=OTHER_PATH")
    _seed_everything(int(cfg.seed))
    device = resolve_device(cfg.device)
    levels = list(cfg.merger.get("levels") or [2])
    policy = build_policy(levels, int(cfg.model.patch_size), cfg.merger.policy_backbone)
    d = cfg.dataset
    val = build_dataset(d.name, d.root, cfg.policy.val_split, tuple(d.crop_size), train=False)
    res = train_policy(_datasets(cfg, train=True), val, policy, int(cfg.policy.epochs),
                       lr=float(cfg.policy.lr), batch_size=int(cfg.policy.batch_size), device=device, out_path=out,
                       thresholds=OmegaConf.to_container(cfg.merger.thresholds, resolve=True)
                       if cfg.merger.get("thresholds") is not None else None,
                       num_workers=int(cfg.train.num_workers), max_steps=cfg.policy.max_steps, seed=int(cfg.seed))
    sys.stdout.write(dump_json({k: v for k, v in res.items() if k != "history"}) + "\n")
    return res


def _ensure_policy(cfg: DictConfig) -> bool:
    """For ``merger=dcts|cts policy=cnn`` without a checkpoint: reuse the cached trained policy, or train it
    first (``policy.reuse=false`` always trains a fresh one at ``policy.out``).

    Returns:
        True when ``cfg.merger.policy_checkpoint`` was set (the model must be built again).
    """
    m = cfg.merger
    if m.name not in _POLICY_MERGERS or m.get("policy") != "cnn" or m.get("policy_checkpoint"):
        return False
    path = _policy_path(cfg)
    if not (path.exists() and cfg.policy.reuse):
        log.info("training the %s policy network first -> %s", m.name, path)
        if path.exists():
            raise FileExistsError(f"policy.reuse=false but {path} exists; pass policy.out=NEW_PATH")
        train_policy_job(cfg)
    else:
        log.info("reusing trained policy %s", path)
    OmegaConf.set_struct(cfg, False)
    cfg.merger.policy_checkpoint = str(path)
    OmegaConf.set_struct(cfg, True)
    return True


def run_job(cfg: DictConfig) -> dict[str, Any]:
    """``python -m tokred run``: train (or load ``checkpoint=``), evaluate, measure, write the run directory."""
    _seed_everything(int(cfg.seed))
    device = init_distributed(resolve_device(cfg.device))
    model = build_model_from_config(cfg)  # validates names and parameters before anything is written
    if cfg.existing_run == "skip_or_resume":
        existing = Path(cfg.output_dir) / (cfg.run_name or default_run_name(cfg))
        if (existing / "metrics.json").is_file():
            log.info("skipping finished run %s", existing)
            return json.loads((existing / "metrics.json").read_text())
        if (existing / "last.pth").is_file():
            OmegaConf.set_struct(cfg, False)
            cfg.resume = True
            OmegaConf.set_struct(cfg, True)
            log.info("resuming interrupted run %s", existing)
    if is_main_process() and _ensure_policy(cfg):
        model = build_model_from_config(cfg)  # now with the trained policy loaded
    model = model.to(device)
    run_dir = _new_run_dir(cfg) if is_main_process() else Path(cfg.output_dir)
    handler = _setup_file_logging(run_dir) if is_main_process() else None
    try:
        return _run_in_dir(cfg, model, device, run_dir)
    finally:
        if handler is not None:
            logging.getLogger().removeHandler(handler)
            handler.close()


def _run_in_dir(cfg: DictConfig, model: Segmenter, device: torch.device, run_dir: Path) -> dict[str, Any]:
    from tokred.results import write_metrics

    if is_main_process():
        OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
        log.info("run directory %s", run_dir)
    extra: dict[str, Any] = {"run_dir": str(run_dir)}
    if cfg.init_from and not cfg.resume:
        missing, unexpected = model.load_state_dict(load_checkpoint(cfg.init_from)["model"], strict=False)
        if unexpected:
            raise ValueError(f"init_from={cfg.init_from} holds weights this model lacks ({unexpected[:5]}); "
                             "is it a checkpoint of another model or decoder?")
        if any(k.startswith(("encoder.vit.", "decoder.")) for k in missing):
            raise ValueError(f"init_from={cfg.init_from} lacks backbone/decoder weights "
                             f"({[k for k in missing if k.startswith(('encoder.vit.', 'decoder.'))][:5]})")
        log.info("initialised from %s (%d reducer tensors keep their init)", cfg.init_from, len(missing))
        extra["init_from"] = str(cfg.init_from)
    if cfg.checkpoint:
        model.load_state_dict(load_checkpoint(cfg.checkpoint)["model"])
        extra["checkpoint"] = str(cfg.checkpoint)
    elif int(cfg.train.epochs) > 0:
        extra.update(_train_stage(cfg, model, device, run_dir))
    if not is_main_process():
        return {}
    measured = _evaluate_and_measure(cfg, model, device)
    metrics = _assemble_metrics(cfg, model, measured, extra)
    write_metrics(run_dir / "metrics.json", metrics)
    _print_summary(run_dir, metrics)
    return metrics


class _TimmEncoder(torch.nn.Module):
    """The plain timm encoder (``forward_features``), the reference of ``bench.reference=timm``."""

    def __init__(self, vit: torch.nn.Module) -> None:
        super().__init__()
        self.vit = vit

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.vit.forward_features(image)


class _TokredEncoder(torch.nn.Module):
    """tokred's encoder loop alone (no decoder), to compare with ``_TimmEncoder``."""

    def __init__(self, encoder: torch.nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.encoder(image)[0]


def bench_job(cfg: DictConfig) -> dict[str, Any]:
    """``python -m tokred bench [overrides]``: GFLOPs and im/s of a configuration next to a reference model,
    measured side by side (interleaved repeats) in one process, written to ``results/bench/<name>/``.

    ``bench.reference=none`` compares with the unreduced pipeline (speedup, GFLOPs ratio, efficiency);
    ``bench.reference=timm`` compares tokred's encoder loop with timm's own ``forward_features`` (the
    overhead of the loop; run it with ``merger=none pruner=none``).
    """
    from tabulate import tabulate

    from tokred.measure import compare, count_gflops, provenance
    from tokred.results import assemble_metrics, write_metrics

    _seed_everything(int(cfg.seed))
    b = cfg.bench
    device = resolve_device(cfg.device)
    model = build_model_from_config(cfg).eval()
    if cfg.checkpoint:
        model.load_state_dict(load_checkpoint(cfg.checkpoint)["model"])
    crop = tuple(cfg.dataset.crop_size)
    n_img = max(int(b.batch_size), int(b.flops_images))
    if b.inputs == "real":
        images = _eval_images(_datasets(cfg, train=False), n_img, crop)
    elif b.inputs == "random":
        images = torch.randn(n_img, 3, *crop, generator=torch.Generator().manual_seed(int(cfg.seed)))
    else:
        raise ValueError(f"bench.inputs must be 'real' or 'random', got {b.inputs!r}")
    if b.reference == "timm":
        if method_name(cfg) != "none":
            raise ValueError("bench.reference=timm measures tokred's loop overhead; use merger=none pruner=none")
        subject, reference = _TokredEncoder(model.encoder), _TimmEncoder(model.encoder.vit)
        gflops = count_gflops(model, images[: int(b.flops_images)]) if int(b.flops_images) > 0 else None
        base_gflops = None
        if gflops is not None:
            from tokred.measure import analytic_vit_gflops

            enc = model.encoder
            mlp_ratio = enc.vit.blocks[0].mlp.fc1.out_features / enc.embed_dim
            n0 = enc.grid_size_for(crop)[0] * enc.grid_size_for(crop)[1]
            gflops["analytic_encoder_gflops"] = analytic_vit_gflops(enc.embed_dim, enc.depth,
                                                                    n0 + enc.num_prefix_tokens, mlp_ratio=mlp_ratio,
                                                                    patch_size=enc.patch_size[0], num_patches=n0)
    elif b.reference == "none":
        subject, reference = model, _baseline_like(cfg, model)
        gflops = count_gflops(model, images[: int(b.flops_images)]) if int(b.flops_images) > 0 else None
        base_gflops = count_gflops(reference, images[:1]) if gflops is not None else None
        if gflops is not None:
            gflops["baseline_gflops"] = base_gflops["gflops"]
            gflops["gflops_ratio"] = base_gflops["gflops"] / gflops["gflops"]
    else:
        raise ValueError(f"bench.reference must be 'none' or 'timm', got {b.reference!r}")
    tokens = None
    if int(b.flops_images) > 0:  # token accounting on the same real images (counts depend on content)
        from tokred.measure import TokenAccounting

        acct = TokenAccounting()
        with torch.inference_mode():
            for img in images[: int(b.flops_images)].split(1):
                acct.update(model(img).state)
        tokens = acct.summary()
    throughput = compare(subject, reference, int(b.batch_size), crop, device=str(device), precision=b.precision,
                         warmup=int(b.warmup), repeats=int(b.repeats), threads=b.threads,
                         gflops_reduced=None if gflops is None else gflops["gflops"],
                         gflops_baseline=None if base_gflops is None else base_gflops["gflops"],
                         inputs=images[: int(b.batch_size)])
    c = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(c, dict)
    metrics = assemble_metrics(
        model=c["model"], dataset=c["dataset"], crop_size=crop, decoder=c["decoder"], merger=c["merger"],
        pruner=c["pruner"], schedule=c["schedule"], seed=int(c["seed"]),
        quality={"miou": None, "per_class_iou": None, "pixel_accuracy": None},
        provenance=provenance({"merger": cfg.merger.name, "pruner": cfg.pruner.name}), gflops=gflops,
        throughput=throughput, tokens=tokens,
        extra={"method": method_name(cfg), "bench": c["bench"], "reference": b.reference,
               "gflops_ratio": None if gflops is None else gflops.get("gflops_ratio"),
               "reference_images_per_second": throughput["baseline"]["images_per_second"]})
    h, w = crop
    name = b.run_name or (f"bench_{method_name(cfg)}_{str(cfg.model.name).replace('_', '-')}_{cfg.decoder.name}_"
                          f"{cfg.dataset.name}-{h}x{w}_b{b.batch_size}_{b.precision}_vs-{b.reference}")
    base = Path(b.output_dir) / name
    out_dir, k = base, 1
    while out_dir.exists():
        k += 1
        out_dir = base.with_name(f"{name}-{k}")
    out_dir.mkdir(parents=True)
    write_metrics(out_dir / "metrics.json", metrics)
    red, ref = throughput["reduced"], throughput["baseline"]
    fmt = lambda v: "-" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))  # noqa: E731
    rows = [["configuration", method_name(cfg), f"reference: {b.reference}"],
            ["GFLOPs / image", fmt(None if gflops is None else gflops["gflops"]),
             fmt(None if base_gflops is None else base_gflops["gflops"])],
            ["  of which encoder", fmt(None if gflops is None else gflops["by_module"]["encoder"]),
             fmt(None if gflops is None else gflops.get("analytic_encoder_gflops"))],
            ["im/s (median)", fmt(red["images_per_second"]), fmt(ref["images_per_second"])],
            ["latency / batch (ms)", fmt(1000 * b.batch_size / red["images_per_second"]),
             fmt(1000 * b.batch_size / ref["images_per_second"])],
            ["peak memory (MiB)", fmt(red["peak_memory_mib"]), fmt(ref["peak_memory_mib"])],
            ["token reduction", fmt(None if tokens is None else tokens["token_reduction"]), ""],
            ["halted fraction", fmt(None if tokens is None else tokens["halted_fraction"]), ""],
            ["speedup", fmt(throughput["speedup"]), ""], ["GFLOPs ratio", fmt(throughput["gflops_ratio"]), ""],
            ["efficiency", fmt(throughput["efficiency"]), ""]]
    sys.stdout.write(tabulate(rows, tablefmt="simple") + "\n")
    sys.stdout.write(f"{red['device_name']} ({red['device']}), {b.precision}, batch {b.batch_size}, "
                     f"{red['threads']} threads, {crop[0]}x{crop[1]} px; results: {out_dir}\n")
    return metrics


def eval_job(cfg: DictConfig) -> dict[str, Any]:
    """``python -m tokred eval checkpoint=PATH [overrides]``: evaluate a trained checkpoint into a new run dir.

    Raises:
        ValueError: no ``checkpoint=`` given.
    """
    if not cfg.checkpoint:
        raise ValueError("tokred eval needs checkpoint=PATH (a tokred last.pth); to train use tokred run")
    OmegaConf.set_struct(cfg, False)
    cfg.train.epochs = 0
    if cfg.run_name is None:
        cfg.run_name = "eval_" + default_run_name(cfg)
    return run_job(cfg)


def list_job() -> None:
    """``python -m tokred list``: every reducer with its kind and the distribution/version supplying it."""
    from tabulate import tabulate

    rows = []
    for name, spec in available_reducers().items():
        try:
            kind = get_reducer_class(name).kind
        except (ImportError, TypeError) as err:
            kind = f"<broken: {err}>"
        rows.append([name, kind, spec.distribution, spec.version, spec.origin, spec.target])
    sys.stdout.write(tabulate(rows, headers=["name", "kind", "distribution", "version", "origin", "target"],
                              tablefmt="simple") + "\n")


def dump_json(obj: Any) -> str:
    return json.dumps(obj, indent=2, default=str)
