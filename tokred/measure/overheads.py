"""Reducer overheads: wall time spent in each token-reduction component during a forward, as a share of the
unreduced forward (issue 12 item 4; the peers report these as "the policy costs x% of the encoder").

A component is a module class (every instance's ``forward`` is timed, through forward pre/post hooks) or a
function or method looked up by name at call time (temporarily replaced by a timed wrapper inside
``timed_components``). The built-in components:

========================  ===========================================================================
component                 what is timed
========================  ===========================================================================
``dcts.policy_cnn``       ``PolicyNet.forward`` (the dCTS / CTS policy CNN on the full image)
``dcts.embedding``        ``supertoken_embedding`` (patch embedding pooled into supertokens)
``early_exit.heads``      the exit heads (``LinearExitHead``, ``AttentionToMaskExitHead``)
``early_exit.selection``  ``select_halted`` (confidence, top-k per class)
``cropr.scorer``          ``CroprModule.score`` (and ``aggregate`` when training): the learned scorer
``prune.selection``       ``select_topk`` (per-image top-k of any ``ScoredPruner``)
``tome.matching``         ``bipartite_soft_matching``
``tokens.gather_scatter`` ``TokenState.merge / split / unbank / restore / restore_live`` (token movement)
========================  ===========================================================================

Plugins add theirs with ``register_component``. Nested calls of one component count once (the outermost
call); different components do not nest in tokred's reducers, except that ``tokens.gather_scatter`` inside a
plugin's own timed component would count in both (documented, not corrected).

On CUDA every timed region synchronises the device before and after, which removes overlap between the
component and the kernels around it: the shares are upper bounds there. On CPU the forward is synchronous
and the shares are exact up to the timer's own cost (two ``perf_counter`` calls per region).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["COMPONENTS", "Component", "measure_overheads", "register_component", "timed_components"]


@dataclass(frozen=True)
class Component:
    """One timed component.

    Attributes:
        label: name in the results (``family.part``).
        target: ``"module.path:Name"``: a ``nn.Module`` subclass (its instances' forwards are timed) or a
            function of that module; ``"module.path:Class.method"`` for a method.
    """

    label: str
    target: str


COMPONENTS: list[Component] = [
    Component("dcts.policy_cnn", "tokred.policy.network:PolicyNet"),
    Component("dcts.embedding", "tokred.reducers.dcts:supertoken_embedding"),
    Component("early_exit.heads", "tokred.reducers.early_exit:LinearExitHead"),
    Component("early_exit.heads", "tokred.reducers.early_exit:AttentionToMaskExitHead"),
    Component("early_exit.selection", "tokred.reducers.early_exit:select_halted"),
    Component("cropr.scorer", "tokred.reducers.cropr:CroprModule.score"),
    Component("cropr.scorer", "tokred.reducers.cropr:CroprModule.aggregate"),
    Component("prune.selection", "tokred.reducers.prune:select_topk"),
    Component("tome.matching", "tokred.reducers.tome:bipartite_soft_matching"),
    *(Component("tokens.gather_scatter", f"tokred.state:TokenState.{m}")
      for m in ("merge", "split", "unbank", "restore", "restore_live")),
]


def register_component(label: str, target: str) -> None:
    """Adds a component to ``COMPONENTS`` (plugins: time your scorer or matching).

    Args:
        label: result name, e.g. ``"myreducer.scorer"``.
        target: ``"package.module:ModuleClass"``, ``"package.module:function"`` or ``"package.module:Cls.meth"``.

    Raises:
        ValueError: ``target`` is not of the form ``module:attr``.
    """
    if ":" not in target:
        raise ValueError(f"component target {target!r} must be 'package.module:Name' (a module class or function)")
    COMPONENTS.append(Component(label, target))


def _resolve(target: str) -> tuple[Any, str, Any]:
    """``(owner, attribute name, object)`` of ``"module:Name"`` or ``"module:Cls.meth"``."""
    mod_name, _, attr = target.partition(":")
    owner: Any = importlib.import_module(mod_name)
    *path, name = attr.split(".")
    for p in path:
        owner = getattr(owner, p)
    return owner, name, getattr(owner, name)


class _Clock:
    """Accumulates seconds per label; nested entries of one label count once."""

    def __init__(self, device: torch.device) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._depth: dict[str, int] = defaultdict(int)
        self._start: dict[str, float] = {}
        self.cuda = device.type == "cuda"

    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def enter(self, label: str) -> None:
        self._depth[label] += 1
        if self._depth[label] == 1:
            self._start[label] = self._now()

    def leave(self, label: str) -> None:
        self._depth[label] -= 1
        if self._depth[label] == 0:
            self.seconds[label] += self._now() - self._start.pop(label)
            self.calls[label] += 1


def _timed(fn: Callable[..., Any], label: str, clock: _Clock) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        clock.enter(label)
        try:
            return fn(*args, **kwargs)
        finally:
            clock.leave(label)
    return wrapper


@contextlib.contextmanager
def timed_components(model: nn.Module, device: torch.device | None = None,
                     components: Sequence[Component] | None = None) -> Iterator[_Clock]:
    """Times every component while the context is open; yields the clock (``.seconds``, ``.calls``).

    Functions and methods are replaced by timed wrappers at their owner (module or class) and restored on exit;
    module classes get forward pre/post hooks on every instance inside ``model``.

    Raises:
        ImportError / AttributeError: a component's target does not exist (its label is in the message).
    """
    dev = device if device is not None else next((p.device for p in model.parameters()), torch.device("cpu"))
    clock = _Clock(torch.device(dev))
    patched: list[tuple[Any, str, Any]] = []
    handles = []
    try:
        for comp in components if components is not None else COMPONENTS:
            try:
                owner, name, obj = _resolve(comp.target)
            except (ImportError, AttributeError) as err:
                raise type(err)(f"overhead component {comp.label!r}: cannot find {comp.target!r} ({err})") from err
            if isinstance(obj, type) and issubclass(obj, nn.Module):
                for m in model.modules():
                    if isinstance(m, obj):
                        handles.append(m.register_forward_pre_hook(lambda *_, lab=comp.label: clock.enter(lab)))
                        handles.append(m.register_forward_hook(lambda *_, lab=comp.label: clock.leave(lab)))
            else:
                patched.append((owner, name, obj))
                setattr(owner, name, _timed(obj, comp.label, clock))
        yield clock
    finally:
        for h in handles:
            h.remove()
        for owner, name, obj in reversed(patched):
            setattr(owner, name, obj)


def _seconds_per_call(model: nn.Module, x: Tensor, repeats: int, precision: str) -> list[float]:
    dev = x.device
    out = []
    for _ in range(repeats):
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            model(x)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        out.append(time.perf_counter() - t0)
    return out


def measure_overheads(model: nn.Module, baseline: nn.Module, images: Tensor, repeats: int = 3, warmup: int = 1,
                      precision: str = "fp32") -> dict[str, Any]:
    """Seconds per batch in each component of ``model`` and their share of ``baseline``'s forward.

    The two models alternate (ABBA over ``repeats``), on the same ``images`` and device, in eval mode and
    inference mode; components are timed in ``model``'s timed forwards only.

    Args:
        model: the reduced ``Segmenter``.
        baseline: the unreduced ``Segmenter`` (``tokred.config.baseline_like``) on the same device.
        images: ``[B, 3, H, W]`` normalised images on that device.
        repeats: timed forwards of each model (medians over these).
        warmup: untimed forwards of each model first.
        precision: ``"fp32"`` or ``"bf16"`` (autocast).

    Returns:
        ``{"forward_seconds": median s per batch of model, "baseline_forward_seconds": the same of baseline,
        "components": {label: {"seconds": median s per batch, "calls": calls per forward,
        "percent_of_unreduced": 100 * seconds / baseline_forward_seconds}}, "repeats": repeats}``; components
        that never ran are absent.

    Raises:
        ValueError: ``repeats < 1`` or ``warmup < 0``.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    flags = [(m, m.training) for m in (model, baseline)]
    repeats_seen: list[dict[str, float]] = []  # per timed forward: seconds per label
    calls: dict[str, int] = {}
    fwd: list[float] = []
    base: list[float] = []
    try:
        model.eval()
        baseline.eval()
        with torch.inference_mode():
            for m in (model, baseline):
                _seconds_per_call(m, images, warmup, precision)
            for i in range(repeats):
                order = ("m", "b") if i % 2 == 0 else ("b", "m")
                for who in order:
                    if who == "b":
                        base += _seconds_per_call(baseline, images, 1, precision)
                        continue
                    with timed_components(model, images.device) as clock:
                        fwd += _seconds_per_call(model, images, 1, precision)
                    repeats_seen.append(dict(clock.seconds))
                    calls.update(clock.calls)
    finally:
        for m, was_training in flags:
            m.train(was_training)

    def median(v: list[float]) -> float:
        return float(torch.tensor(v, dtype=torch.float64).quantile(0.5))

    base_s = median(base)
    labels = sorted({k for r in repeats_seen for k in r})
    per_label = {k: [r.get(k, 0.0) for r in repeats_seen] for k in labels}  # a label absent in a forward: 0 s
    comps = {label: {"seconds": median(v), "calls": int(calls.get(label, 0)),
                     "percent_of_unreduced": 100.0 * median(v) / base_s}
             for label, v in per_label.items()}
    return {"forward_seconds": median(fwd), "baseline_forward_seconds": base_s, "components": comps,
            "repeats": repeats}
