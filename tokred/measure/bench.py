"""Throughput (im/s) and peak memory of the model alone, and paired reduced-vs-baseline speedups (methods.md Sec. 8).

Protocol: the model only, on a random input tensor already on the device (no data loading, no
pre/post-processing), ``eval()`` and ``torch.inference_mode()``, a warm-up, device synchronisation around every
timed call, and the median with its spread over repeats. Every number carries its device name, precision,
batch size and CPU thread count. ``compare`` times a reduced model and its baseline in the same process,
alternating their repeats (ABBA order) so that slow drifts of the machine (clocks, other jobs) hit both equally,
and reports the median of the paired speedups.

Peak memory: on CUDA the ``torch.cuda.max_memory_allocated`` during the timed calls (reset before), which
includes the model's own weights and the input; in ``compare`` the other model's weights are subtracted. On
CPU there is no per-call counter: the process peak resident set size (``resource.getrusage``) is reported,
which is a whole-process high-water mark (everything the process ever held, not just this model).
"""

from __future__ import annotations

import contextlib
import platform
import resource
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from tokred.io import eval_mode

__all__ = ["PRECISIONS", "BenchmarkOOMError", "available_devices", "benchmark", "compare", "compare_many",
           "cpu_name", "device_name", "pair_summary"]

PRECISIONS = ("fp32", "bf16")
_MIB = 2.0**20


class BenchmarkOOMError(RuntimeError):
    """The benchmark ran out of device memory at the requested batch size."""


def available_devices() -> list[str]:
    """Devices this process can run on: ``"cpu"``, ``"cuda:i"`` for every visible GPU, ``"mps"`` when present."""
    devs = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        devs.append("mps")
    return devs


def device_name(device: torch.device) -> str:
    """Human-readable device name: the GPU model (``torch.cuda.get_device_name``) or the CPU model."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        return cpu_name()
    return device.type


def cpu_name() -> str:
    """CPU model from ``/proc/cpuinfo`` ("model name"), else ``platform.processor()`` / the machine type."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def _resolve_device(device: str | torch.device) -> torch.device:
    """Checks that ``device`` exists here; raises ValueError naming it and the available devices otherwise."""
    avail = available_devices()
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"unknown device {device!r}; available devices: {', '.join(avail)}") from err
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but CUDA is not available here; "
                             f"available devices: {', '.join(avail)}")
        dev = torch.device("cuda", torch.cuda.current_device() if dev.index is None else dev.index)
        if dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r} does not exist ({torch.cuda.device_count()} GPUs visible); "
                             f"available devices: {', '.join(avail)}")
    elif dev.type == "mps":
        if "mps" not in avail:
            raise ValueError(f"device {device!r} is not available here; available devices: {', '.join(avail)}")
    elif dev.type != "cpu":
        raise ValueError(f"device {device!r} is not supported by tokred's benchmark; "
                         f"available devices: {', '.join(avail)}")
    return dev


def _check_precision(precision: str, dev: torch.device) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not supported; use one of {', '.join(PRECISIONS)}")
    if precision == "bf16" and dev.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"precision 'bf16' is not supported on {device_name(dev)} ({dev}); use precision='fp32'")
    if precision == "bf16" and dev.type == "mps":
        raise ValueError("precision 'bf16' is not supported on mps by tokred's benchmark; use precision='fp32'")


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    elif dev.type == "mps":
        torch.mps.synchronize()


def _is_oom(err: BaseException) -> bool:
    oom_type = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    return (oom_type is not None and isinstance(err, oom_type)) or \
        (isinstance(err, RuntimeError) and "out of memory" in str(err).lower())


def _peak_rss_mib() -> float:
    """Process peak resident set size in MiB (ru_maxrss is KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / _MIB if sys.platform == "darwin" else rss / 1024.0


def _module_bytes(model: nn.Module, dev: torch.device) -> int:
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()) if t.device == dev)


@contextlib.contextmanager
def _num_threads(threads: int | None) -> Iterator[None]:
    if threads is None:
        yield
        return
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@contextlib.contextmanager
def _bench_mode(models: list[nn.Module]) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        for model in models:
            stack.enter_context(eval_mode(model))
        yield


class _Runner:
    """Times one model on one fixed input; keeps its per-repeat im/s and peak memory."""

    def __init__(self, model: nn.Module, x: Tensor, dev: torch.device, precision: str,
                 timer: Callable[[], float], iters_per_repeat: int, other_bytes: int = 0) -> None:
        self.model, self.x, self.dev, self.timer = model, x, dev, timer
        self.iters = iters_per_repeat
        self.other_bytes = other_bytes
        self.autocast = precision == "bf16"
        self.ips: list[float] = []
        self.peak_bytes = 0

    def _call(self) -> None:
        with torch.autocast(device_type=self.dev.type, dtype=torch.bfloat16, enabled=self.autocast):
            self.model(self.x)

    def warmup(self, n: int) -> None:
        for _ in range(n):
            self._call()
        _sync(self.dev)

    def repeat(self) -> float:
        if self.dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.dev)
        _sync(self.dev)
        t0 = self.timer()
        for _ in range(self.iters):
            self._call()
        _sync(self.dev)
        dt = self.timer() - t0
        if self.dev.type == "cuda":
            self.peak_bytes = max(self.peak_bytes, torch.cuda.max_memory_allocated(self.dev) - self.other_bytes)
        ips = self.x.shape[0] * self.iters / max(dt, 1e-12)
        self.ips.append(ips)
        return ips

    def result(self, batch_size: int, image_hw: tuple[int, int], precision: str, warmup: int) -> dict[str, Any]:
        t = torch.tensor(self.ips, dtype=torch.float64)
        q25, q50, q75 = torch.quantile(t, torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)).tolist()
        on_cuda = self.dev.type == "cuda"
        return {
            "images_per_second": q50,
            "images_per_second_iqr": [q25, q75],
            "images_per_second_min": t.min().item(),
            "images_per_second_max": t.max().item(),
            "per_repeat_images_per_second": [float(v) for v in self.ips],
            "batch_size": batch_size,
            "image_hw": [int(image_hw[0]), int(image_hw[1])],
            "device": str(self.dev),
            "device_name": device_name(self.dev),
            "precision": precision,
            "warmup": warmup,
            "repeats": len(self.ips),
            "iters_per_repeat": self.iters,
            "threads": torch.get_num_threads(),
            "peak_memory_mib": (self.peak_bytes if on_cuda else _peak_rss_mib() * _MIB) / _MIB,
            "peak_memory_kind": "cuda_max_allocated" if on_cuda else "process_peak_rss",
            "torch_version": torch.__version__,
        }


def _validate(batch_size: int, image_hw: tuple[int, int], warmup: int, repeats: int, iters_per_repeat: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if len(image_hw) != 2 or min(image_hw) < 1:
        raise ValueError(f"image_hw must be (H, W) px, got {image_hw}")
    if warmup < 0 or repeats < 1 or iters_per_repeat < 1:
        raise ValueError(f"need warmup >= 0, repeats >= 1, iters_per_repeat >= 1; got {warmup}, {repeats}, "
                         f"{iters_per_repeat}")


def _oom_error(err: BaseException, batch_size: int, dev: torch.device) -> BenchmarkOOMError:
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    hint = f"try batch_size={batch_size // 2}" if batch_size > 1 else "use a smaller image size or a larger device"
    return BenchmarkOOMError(f"out of memory on {device_name(dev)} ({dev}) at batch_size={batch_size}; {hint} "
                             f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})")


def benchmark(model: nn.Module, batch_size: int, image_hw: tuple[int, int], device: str | torch.device = "cpu",
              precision: str = "fp32", warmup: int = 10, repeats: int = 30, threads: int | None = None,
              iters_per_repeat: int = 1, in_chans: int = 3, seed: int = 0,
              timer: Callable[[], float] = time.perf_counter, inputs: Tensor | None = None) -> dict[str, Any]:
    """Throughput in im/s and peak memory of ``model`` alone (methods.md Sec. 8).

    The model is moved to ``device`` (in place) and put in eval mode for the run (its training flags are
    restored afterwards); the input is a random ``[batch_size, in_chans, H, W]`` tensor created on the device.

    Args:
        model: any module taking ``[B, 3, H, W]`` (a ``Segmenter``).
        batch_size: images per forward (the peers report 32).
        image_hw: ``(H, W)`` px of the input.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...
        precision: ``"fp32"`` or ``"bf16"`` (``torch.autocast`` with bfloat16 on the device, CPU included).
        warmup: untimed forwards before timing.
        repeats: timed repeats; the median and spread are over these.
        threads: CPU threads to use for the run (``torch.set_num_threads``, restored after); None keeps the
            current setting. The count in effect is recorded either way.
        iters_per_repeat: forwards per timed repeat (raise it for tiny models whose single forward is too short
            to time).
        in_chans: input channels.
        seed: seed of the random input.
        timer: clock in seconds (tests pass a fake one).

    Returns:
        ``images_per_second`` (median over repeats, im/s), ``images_per_second_iqr`` ([25th, 75th] percentile),
        ``images_per_second_min``, ``images_per_second_max``, ``per_repeat_images_per_second``, ``batch_size``,
        ``image_hw``, ``device`` (e.g. ``"cuda:0"``), ``device_name`` (GPU or CPU model), ``precision``,
        ``warmup``, ``repeats``, ``iters_per_repeat``, ``threads`` (``torch.get_num_threads``),
        ``peak_memory_mib`` (MiB), ``peak_memory_kind`` (``"cuda_max_allocated"`` or ``"process_peak_rss"``),
        ``torch_version``.

    Raises:
        ValueError: unknown or unavailable device (the message lists the available ones), unsupported
            precision, or invalid sizes/counts.
        BenchmarkOOMError: the device ran out of memory at this batch size (the message suggests a smaller one).
    """
    return _run([model], batch_size, image_hw, device, precision, warmup, repeats, threads, iters_per_repeat,
                in_chans, seed, timer, inputs)[0]


def compare(reduced_model: nn.Module, baseline_model: nn.Module, batch_size: int, image_hw: tuple[int, int],
            device: str | torch.device = "cpu", precision: str = "fp32", warmup: int = 10, repeats: int = 30,
            threads: int | None = None, iters_per_repeat: int = 1, gflops_reduced: float | None = None,
            gflops_baseline: float | None = None, in_chans: int = 3, seed: int = 0,
            timer: Callable[[], float] = time.perf_counter, inputs: Tensor | None = None) -> dict[str, Any]:
    """Measures a reduced model and its baseline in the same invocation, interleaved, and their speedup.

    Both models see the same input. Repeats alternate in ABBA order (reduced, baseline, baseline, reduced, ...)
    so that drifts of the machine affect both equally; ``speedup`` is the median over repeats of the paired
    ratio reduced im/s / baseline im/s. Arguments as in ``benchmark``.

    Args:
        gflops_reduced / gflops_baseline: GFLOPs per image (``count_gflops(...)["gflops"]``), for the
            efficiency numbers.

    Returns:
        ``{"reduced": benchmark dict, "baseline": benchmark dict}`` plus the keys of ``pair_summary``:
        ``speedup``, ``speedup_iqr``, ``per_repeat_speedup``, ``gflops_ratio``, ``efficiency`` (the last two
        None unless both GFLOPs are given).

    Raises:
        ValueError / BenchmarkOOMError: as ``benchmark``.
    """
    red, base = _run([reduced_model, baseline_model], batch_size, image_hw, device, precision, warmup, repeats,
                     threads, iters_per_repeat, in_chans, seed, timer, inputs)
    out: dict[str, Any] = {"reduced": red, "baseline": base}
    out.update(pair_summary(red["per_repeat_images_per_second"], base["per_repeat_images_per_second"],
                            gflops_reduced, gflops_baseline))
    return out


def compare_many(models: Sequence[nn.Module], reference: int, batch_size: int, image_hw: tuple[int, int],
                 device: str | torch.device = "cpu", precision: str = "fp32", warmup: int = 10, repeats: int = 30,
                 threads: int | None = None, iters_per_repeat: int = 1, gflops: Sequence[float | None] | None = None,
                 in_chans: int = 3, seed: int = 0, timer: Callable[[], float] = time.perf_counter,
                 inputs: Tensor | None = None) -> list[dict[str, Any]]:
    """``compare`` for several models timed in one interleaved loop, each paired with ``models[reference]``.

    Repeat ``i`` runs every model in order (even ``i``) or in reverse order (odd ``i``), so that a drift of the
    machine affects all of them alike; every model's speedup is the median of its per-repeat ratio to the
    reference's repeat ``i``. Arguments as in ``compare``; ``gflops[j]`` is model ``j``'s GFLOPs per image.

    Returns:
        One dict per model, as ``compare`` returns: ``{"reduced": its benchmark dict, "baseline": the
        reference's}`` plus ``pair_summary``'s keys (the reference's own entry has speedup 1).

    Raises:
        ValueError: ``reference`` is not an index of ``models`` or ``gflops`` has another length; as ``benchmark``.
        BenchmarkOOMError: as ``benchmark``.
    """
    if not 0 <= reference < len(models):
        raise ValueError(f"reference index {reference} is not one of the {len(models)} models")
    flops = list(gflops) if gflops is not None else [None] * len(models)
    if len(flops) != len(models):
        raise ValueError(f"gflops has {len(flops)} values for {len(models)} models")
    results = _run(list(models), batch_size, image_hw, device, precision, warmup, repeats, threads,
                   iters_per_repeat, in_chans, seed, timer, inputs)
    ref = results[reference]
    out = []
    for res, g in zip(results, flops):
        d: dict[str, Any] = {"reduced": res, "baseline": ref}
        d.update(pair_summary(res["per_repeat_images_per_second"], ref["per_repeat_images_per_second"], g,
                              flops[reference] if g is not None else None))
        out.append(d)
    return out


def pair_summary(reduced_ips: list[float], baseline_ips: list[float], gflops_reduced: float | None = None,
                 gflops_baseline: float | None = None) -> dict[str, Any]:
    """Speedup and efficiency from paired per-repeat throughputs.

    Args:
        reduced_ips / baseline_ips: im/s of the two models, repeat ``i`` of one paired with repeat ``i`` of the
            other (same length).
        gflops_reduced / gflops_baseline: GFLOPs per image of each model, or None.

    Returns:
        ``speedup`` (median of ``reduced_ips[i] / baseline_ips[i]``), ``speedup_iqr`` ([25th, 75th] percentile),
        ``per_repeat_speedup``, ``gflops_ratio`` (baseline GFLOPs / reduced GFLOPs) and ``efficiency``
        (speedup / gflops_ratio: 1.0 when wall-clock gains match the FLOP savings); the last two None when
        GFLOPs are missing.

    Raises:
        ValueError: the lists are empty or of different lengths, or a GFLOPs value is not positive.
    """
    if not reduced_ips or len(reduced_ips) != len(baseline_ips):
        raise ValueError(f"need paired, non-empty throughputs; got {len(reduced_ips)} reduced and "
                         f"{len(baseline_ips)} baseline repeats")
    ratios = torch.tensor(reduced_ips, dtype=torch.float64) / torch.tensor(baseline_ips, dtype=torch.float64)
    q25, q50, q75 = torch.quantile(ratios, torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)).tolist()
    gflops_ratio = efficiency = None
    if gflops_reduced is not None and gflops_baseline is not None:
        if gflops_reduced <= 0 or gflops_baseline <= 0:
            raise ValueError(f"GFLOPs must be positive, got reduced={gflops_reduced}, baseline={gflops_baseline}")
        gflops_ratio = gflops_baseline / gflops_reduced
        efficiency = q50 / gflops_ratio
    return {"speedup": q50, "speedup_iqr": [q25, q75], "per_repeat_speedup": ratios.tolist(),
            "gflops_ratio": gflops_ratio, "efficiency": efficiency}


def _run(models: list[nn.Module], batch_size: int, image_hw: tuple[int, int], device: str | torch.device,
         precision: str, warmup: int, repeats: int, threads: int | None, iters_per_repeat: int, in_chans: int,
         seed: int, timer: Callable[[], float], inputs: Tensor | None = None) -> list[dict[str, Any]]:
    _validate(batch_size, image_hw, warmup, repeats, iters_per_repeat)
    if inputs is not None and tuple(inputs.shape) != (batch_size, in_chans, *image_hw):
        raise ValueError(f"inputs have shape {tuple(inputs.shape)}, expected {(batch_size, in_chans, *image_hw)} "
                         "(batch_size, in_chans, H, W)")
    dev = _resolve_device(device)
    _check_precision(precision, dev)
    try:
        for m in models:  # outside inference_mode: moved parameters must stay usable for training
            m.to(dev)
        gen = torch.Generator(device="cpu").manual_seed(seed)
        x = (torch.randn(batch_size, in_chans, *image_hw, generator=gen) if inputs is None else inputs).to(dev)
        with _num_threads(threads), _bench_mode(models), torch.inference_mode():
            sizes = [_module_bytes(m, dev) for m in models]
            runners = [_Runner(m, x, dev, precision, timer, iters_per_repeat,
                               other_bytes=sum(sizes) - sizes[i]) for i, m in enumerate(models)]
            for r in runners:
                r.warmup(warmup)
            for i in range(repeats):
                order = runners if i % 2 == 0 else runners[::-1]  # ABBA: cancels linear drift
                for r in order:
                    r.repeat()
            return [r.result(batch_size, image_hw, precision, warmup) for r in runners]
    except (RuntimeError, MemoryError) as err:
        if _is_oom(err) or isinstance(err, MemoryError):
            raise _oom_error(err, batch_size, dev) from err
        raise
