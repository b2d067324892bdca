"""``python -m tokred bench [overrides]``: GFLOPs and im/s of a configuration next to a reference model,
measured side by side (interleaved repeats) in one process, written to ``bench.output_dir/<name>/``.

``bench.reference=none`` compares with the unreduced pipeline (speedup, GFLOPs ratio, efficiency);
``bench.reference=padded`` times the configuration with ``encoder.layout=packed`` against the same model padded
(what the packed layout alone buys; ``padding_waste`` in metrics.json: largest / mean live tokens per block);
``bench.reference=timm`` compares tokred's encoder loop with timm's own ``forward_features`` (the overhead of
the loop; run it with ``merger=none pruner=none``).

``bench.layouts=[padded,packed]`` (with ``bench.reference=none``) times the configuration once per
``encoder.layout`` and the unreduced model in one interleaved loop (ABC CBA ...; for ``none`` the padded copy
is the reference), and writes one folder per layout, ``<name>_<layout>/metrics.json``, with the speedup, GFLOPs
ratio and efficiency against the unreduced model and ``layout_speedup`` against the first layout.
``bench.overheads=true`` adds the wall time of each reducer component (``tokred.measure.overheads``) as % of
the unreduced forward, measured on the bench batch in the same process; ``bench.overheads=only`` measures just
that (no throughput pair) into ``overheads_<method>_...``.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from tokred.config import (baseline_like, build_datasets, build_model_from_config, eval_images, method_name,
                           resolve_device, seed_everything)
from tokred.models.checkpoints import load_segmentation_checkpoint
from tokred.io import new_run_dir

__all__ = ["bench_job"]


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


def _inputs(cfg: DictConfig, n: int, crop: tuple[int, int]) -> torch.Tensor:
    """``[n, 3, H, W]`` real eval images (``bench.inputs=real``) or seeded noise (``random``)."""
    if cfg.bench.inputs == "real":
        return eval_images(build_datasets(cfg, train=False), n, crop)
    if cfg.bench.inputs == "random":
        return torch.randn(n, 3, *crop, generator=torch.Generator().manual_seed(int(cfg.seed)))
    raise ValueError(f"bench.inputs must be 'real' or 'random', got {cfg.bench.inputs!r}")


def _subjects(cfg: DictConfig, model, images: torch.Tensor, crop: tuple[int, int]):
    """``(subject, reference, gflops, reference gflops)`` for ``bench.reference``.

    Raises:
        ValueError: an unknown reference, or ``timm`` with a reducer configured.
    """
    from tokred.measure import analytic_vit_gflops, count_gflops

    b = cfg.bench
    if b.reference not in ("none", "timm", "padded"):
        raise ValueError(f"bench.reference must be 'none', 'timm' or 'padded', got {b.reference!r}")
    if b.reference == "timm" and method_name(cfg) != "none":
        raise ValueError("bench.reference=timm measures tokred's loop overhead; use merger=none pruner=none")
    n_flops = int(b.flops_images)
    gflops = count_gflops(model, images[:n_flops]) if n_flops > 0 else None
    if b.reference == "timm":
        if gflops is not None:
            enc = model.encoder
            mlp_ratio = enc.vit.blocks[0].mlp.fc1.out_features / enc.embed_dim
            h0, w0 = enc.grid_size_for(crop)
            gflops["analytic_encoder_gflops"] = analytic_vit_gflops(
                enc.embed_dim, enc.depth, h0 * w0 + enc.num_prefix_tokens, mlp_ratio=mlp_ratio,
                patch_size=enc.patch_size[0], num_patches=h0 * w0)
        return _TokredEncoder(model.encoder), _TimmEncoder(model.encoder.vit), gflops, None
    if b.reference == "padded":  # the same model, packed against padded: what the layout alone buys
        import copy

        reference = copy.deepcopy(model)
        model.encoder.layout, reference.encoder.layout = "packed", "padded"
        if gflops is not None:  # per image, without padding: the same for both layouts
            gflops["baseline_gflops"], gflops["gflops_ratio"] = gflops["gflops"], 1.0
        return model, reference, gflops, gflops
    reference = baseline_like(cfg, model)
    base_gflops = count_gflops(reference, images[:1]) if gflops is not None else None
    if gflops is not None:
        gflops["baseline_gflops"] = base_gflops["gflops"]
        gflops["gflops_ratio"] = base_gflops["gflops"] / gflops["gflops"]
    return model, reference, gflops, base_gflops


def _token_summary(model, images: torch.Tensor) -> dict[str, Any] | None:
    """Token accounting over the images one by one (counts of dynamic reducers depend on the content)."""
    from tokred.measure import TokenAccounting

    if len(images) == 0:
        return None
    acct = TokenAccounting()
    with torch.inference_mode():
        for img in images.split(1):
            acct.update(model(img).state)
    return acct.summary()


def _padding_waste(model, images: torch.Tensor) -> float | None:
    """Mean over blocks of (largest / mean) live tokens per image in one batch of ``images``: the factor by
    which the padded layout inflates the work of that batch (1.0: equal counts)."""
    if not hasattr(model, "encoder") or len(images) == 0:
        return None
    with torch.inference_mode():
        counts = torch.stack([t.float() for t in model(images).state.tokens_per_block])  # [depth, B]
    return float((counts.max(1).values / counts.mean(1).clamp_min(1e-9)).mean())


def _table(cfg: DictConfig, gflops, base_gflops, tokens, throughput) -> list[list[str]]:
    b = cfg.bench
    red, ref = throughput["reduced"], throughput["baseline"]

    def fmt(v: Any) -> str:
        return "-" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))

    def g(d: Any, *keys: str) -> Any:
        for k in keys:
            d = None if d is None else d.get(k)
        return d

    return [["configuration", method_name(cfg), f"reference: {b.reference}"],
            ["GFLOPs / image", fmt(g(gflops, "gflops")), fmt(g(base_gflops, "gflops"))],
            ["  of which encoder", fmt(g(gflops, "by_module", "encoder")), fmt(g(gflops, "analytic_encoder_gflops"))],
            ["im/s (median)", fmt(red["images_per_second"]), fmt(ref["images_per_second"])],
            ["latency / batch (ms)", fmt(1000 * b.batch_size / red["images_per_second"]),
             fmt(1000 * b.batch_size / ref["images_per_second"])],
            ["peak memory (MiB)", fmt(red["peak_memory_mib"]), fmt(ref["peak_memory_mib"])],
            ["token reduction", fmt(g(tokens, "token_reduction")), ""],
            ["halted fraction", fmt(g(tokens, "halted_fraction")), ""],
            ["speedup", fmt(throughput["speedup"]), ""], ["GFLOPs ratio", fmt(throughput["gflops_ratio"]), ""],
            ["efficiency", fmt(throughput["efficiency"]), ""]]


def _layout_subjects(cfg: DictConfig, model, reference) -> tuple[list[Any], list[str], int]:
    """``(models, layouts, reference index)`` for ``bench.layouts``: one copy of ``model`` per layout, then the
    unreduced reference (or, for ``none``, the padded copy as the reference).

    Raises:
        ValueError: an unknown or repeated layout, or ``bench.reference`` other than ``none``.
    """
    import copy

    from tokred.encoder import LAYOUTS

    layouts = [str(v) for v in cfg.bench.layouts]
    bad = [v for v in layouts if v not in LAYOUTS]
    if bad or not layouts or len(set(layouts)) != len(layouts):
        raise ValueError(f"bench.layouts must list distinct encoder layouts out of {list(LAYOUTS)}, got {layouts}")
    if cfg.bench.reference != "none":
        raise ValueError(f"bench.layouts times every layout against the unreduced model: use bench.reference=none "
                         f"(got {cfg.bench.reference!r})")
    models = []
    for v in layouts:
        m = copy.deepcopy(model)
        m.encoder.layout = v
        models.append(m)
    if method_name(cfg) == "none" and "padded" in layouts:
        return models, layouts, layouts.index("padded")
    return [*models, reference], layouts, len(models)


def _bench_layouts(cfg: DictConfig, model, images: torch.Tensor, crop: tuple[int, int], device) -> list[Any]:
    """``bench.layouts``: ``[(layout, subject model, throughput dict, gflops, base gflops)]`` (module docstring)."""
    from tokred.measure import compare_many, pair_summary

    b = cfg.bench
    _, reference, gflops, base_gflops = _subjects(cfg, model, images, crop)
    models, layouts, ref = _layout_subjects(cfg, model, reference)
    g = None if gflops is None else gflops["gflops"]
    bg = None if base_gflops is None else base_gflops["gflops"]
    flops = [g] * len(layouts) + ([bg] if ref == len(layouts) else [])
    res = compare_many(models, ref, int(b.batch_size), crop, device=str(device), precision=b.precision,
                       warmup=int(b.warmup), repeats=int(b.repeats), threads=b.threads, gflops=flops,
                       inputs=images[: int(b.batch_size)])
    first = res[0]["reduced"]["per_repeat_images_per_second"]
    out = []
    for j, layout in enumerate(layouts):
        t = dict(res[j])
        vs = pair_summary(t["reduced"]["per_repeat_images_per_second"], first)
        t.update(layout_speedup=vs["speedup"], layout_speedup_iqr=vs["speedup_iqr"], layout_reference=layouts[0])
        out.append((layout, models[j], t, gflops, base_gflops))
    return out


def _overheads(cfg: DictConfig, model, images: torch.Tensor, device) -> dict[str, Any] | None:
    """``bench.overheads``: reducer components as % of the unreduced forward (``measure_overheads``)."""
    from tokred.measure import measure_overheads

    if not cfg.bench.get("overheads", False):
        return None
    x = images[: int(cfg.bench.batch_size)].to(device)
    base = baseline_like(cfg, model).to(device)
    return measure_overheads(model.to(device), base, x, repeats=max(1, int(cfg.bench.repeats)),
                             warmup=min(1, int(cfg.bench.warmup)), precision=cfg.bench.precision)


def _overhead_rows(over: dict[str, Any] | None) -> list[list[str]]:
    if not over:
        return []
    return [[f"  {k} (% of unreduced)", f"{v['percent_of_unreduced']:.3g}", ""] for k, v in over["components"].items()]


def _overheads_only(cfg: DictConfig, model, images: torch.Tensor, crop: tuple[int, int], device) -> dict[str, Any]:
    """``bench.overheads=only``: the reducer components against the unreduced forward, no throughput pair."""
    from tabulate import tabulate

    from tokred.measure import cpu_name, device_name, provenance
    from tokred.results import assemble_metrics, write_metrics

    b = cfg.bench
    threads = torch.get_num_threads()
    if b.threads:
        torch.set_num_threads(int(b.threads))
    try:
        over = _overheads(cfg, model, images, device)
    finally:
        torch.set_num_threads(threads)
    assert over is not None
    c = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(c, dict)
    dev = torch.device(device)
    over.update(device=device_name(dev) if dev.type == "cuda" else cpu_name(), threads=int(b.threads or threads),
                batch_size=int(b.batch_size), layout=model.encoder.layout, precision=b.precision)
    metrics = assemble_metrics(
        model=c["model"], dataset=c["dataset"], crop_size=crop, decoder=c["decoder"], merger=c["merger"],
        pruner=c["pruner"], schedule=c["schedule"], seed=int(c["seed"]),
        quality={"miou": None, "per_class_iou": None, "pixel_accuracy": None},
        provenance=provenance({"merger": cfg.merger.name, "pruner": cfg.pruner.name}), gflops=None,
        throughput=None, tokens=_token_summary(model, images[: int(b.batch_size)]),
        extra={"method": method_name(cfg), "bench": c["bench"], "overheads": over})
    h, w = crop
    name = b.run_name or (f"overheads_{method_name(cfg)}_{str(cfg.model.name).replace('_', '-')}_"
                          f"{cfg.dataset.name}-{h}x{w}_b{b.batch_size}_{b.precision}")
    out_dir = new_run_dir(b.output_dir, name)
    write_metrics(out_dir / "metrics.json", metrics)
    rows = [["unreduced forward (s / batch)", f"{over['baseline_forward_seconds']:.4g}"],
            ["this forward (s / batch)", f"{over['forward_seconds']:.4g}"],
            *[[f"{k} (% of unreduced)", f"{v['percent_of_unreduced']:.3g}"] for k, v in over["components"].items()]]
    sys.stdout.write(tabulate(rows, tablefmt="simple") + f"\n{over['device']}, {b.precision}, batch {b.batch_size}, "
                     f"{over['threads']} threads, {h}x{w} px; results: {out_dir}\n")
    return metrics


def bench_job(cfg: DictConfig) -> dict[str, Any]:
    """Measures the configuration against ``bench.reference`` and writes ``metrics.json`` (module docstring).

    Returns:
        The metrics written.

    Raises:
        ValueError: a bad ``bench.inputs``/``bench.reference``, or an unavailable ``device``.
    """
    from tabulate import tabulate

    from tokred.measure import compare, provenance
    from tokred.results import assemble_metrics, write_metrics

    seed_everything(int(cfg.seed))
    b = cfg.bench
    device = resolve_device(cfg.device)
    model = build_model_from_config(cfg).eval()
    if cfg.checkpoint:
        load_segmentation_checkpoint(model, cfg.checkpoint, str(cfg.get("checkpoint_format", "auto")))
    crop = tuple(cfg.dataset.crop_size)
    images = _inputs(cfg, max(int(b.batch_size), int(b.flops_images)), crop)
    if str(b.get("overheads", False)).lower() == "only":
        return _overheads_only(cfg, model, images, crop, device)
    if b.get("layouts"):
        runs = _bench_layouts(cfg, model, images, crop, device)
    else:
        subject, reference, gflops, base_gflops = _subjects(cfg, model, images, crop)
        throughput = compare(subject, reference, int(b.batch_size), crop, device=str(device), precision=b.precision,
                             warmup=int(b.warmup), repeats=int(b.repeats), threads=b.threads,
                             gflops_reduced=None if gflops is None else gflops["gflops"],
                             gflops_baseline=None if base_gflops is None else base_gflops["gflops"],
                             inputs=images[: int(b.batch_size)])
        runs = [(model.encoder.layout, model, throughput, gflops, base_gflops)]
    tokens = _token_summary(model, images[: max(int(b.flops_images), 0)])
    over = _overheads(cfg, model, images, device)
    waste = _padding_waste(model, images[: int(b.batch_size)])
    c = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(c, dict)
    h, w = crop
    name = b.run_name or (f"bench_{method_name(cfg)}_{str(cfg.model.name).replace('_', '-')}_{cfg.decoder.name}_"
                          f"{cfg.dataset.name}-{h}x{w}_b{b.batch_size}_{b.precision}_vs-{b.reference}")
    metrics: dict[str, Any] = {}
    for layout, subject, throughput, gflops, base_gflops in runs:
        extra = {"method": method_name(cfg), "bench": c["bench"], "reference": b.reference, "layout": layout,
                 "padding_waste": waste, "gflops_ratio": None if gflops is None else gflops.get("gflops_ratio"),
                 "reference_images_per_second": throughput["baseline"]["images_per_second"]}
        for k in ("layout_speedup", "layout_speedup_iqr", "layout_reference"):
            if k in throughput:
                extra[k] = throughput[k]
        if over is not None:
            extra["overheads"] = over
        metrics = assemble_metrics(
            model=c["model"], dataset=c["dataset"], crop_size=crop, decoder=c["decoder"], merger=c["merger"],
            pruner=c["pruner"], schedule=c["schedule"], seed=int(c["seed"]),
            quality={"miou": None, "per_class_iou": None, "pixel_accuracy": None},
            provenance=provenance({"merger": cfg.merger.name, "pruner": cfg.pruner.name}), gflops=gflops,
            throughput=throughput, tokens=tokens, extra=extra)
        out_dir = new_run_dir(b.output_dir, f"{name}_{layout}" if len(runs) > 1 or b.get("layouts") else name)
        write_metrics(out_dir / "metrics.json", metrics)
        red = throughput["reduced"]
        rows = _table(cfg, gflops, base_gflops, tokens, throughput) + (_overhead_rows(over) if layout == runs[0][0]
                                                                        else [])
        if "layout_speedup" in throughput:
            rows.append([f"vs layout {throughput['layout_reference']}", f"{throughput['layout_speedup']:.4g}", ""])
        sys.stdout.write(f"layout: {layout}\n" + tabulate(rows, tablefmt="simple") + "\n")
        sys.stdout.write(f"{red['device_name']} ({red['device']}), {b.precision}, batch {b.batch_size}, "
                         f"{red['threads']} threads, {crop[0]}x{crop[1]} px; results: {out_dir}\n")
    return metrics
