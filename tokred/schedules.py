"""Budget schedules: a short spec turned into the number of tokens a reducer removes in each block.

``r`` always means *tokens removed in a block*; ``keep_ratio`` always means *fraction of tokens kept*.

Forms (ToMe, Bolya et al. ICLR 2023, Sec. 4 "token schedules"; Token Cropr, Bergner et al. CVPR 2025,
Sec. 3.4 warm-up):
    ``Constant(r)``                  r in every block.
    ``Linear(r, inflection)``        linear ramp with mean r: inflection 0 = constant, -1 = from 2r down to 0,
                                     +1 = from 0 up to 2r (ToMe's ``(r, inflection)`` tuple).
    ``Explicit([r_0, ..., r_k])``    one value per block, missing trailing blocks are 0.
    ``KeepRatio(keep_ratio, ...)``   the r that keeps a fraction of the tokens, either at the end of the
                                     reducing blocks (spread evenly) or after every block (geometric).
    ``Warmup(inner, fraction)``      scales ``inner`` linearly from 0 to full over the first ``fraction`` of
                                     training (progress in [0, 1]).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, ClassVar

__all__ = ["as_schedule", "Schedule", "Constant", "Linear", "Explicit", "KeepRatio", "Warmup", "build_schedule",
           "SCHEDULES", "per_image_budgets"]


class Schedule:
    """Maps (depth, tokens entering the first reducing block, training progress) to per-block budgets.

    Class attributes:
        kind: the ``build_schedule`` kind of this form; ``config()`` records it so that
            ``build_schedule(**schedule.config())`` rebuilds an equal schedule.
    """

    kind: ClassVar[str] = "schedule"

    def budgets(self, depth: int, num_tokens: int, progress: float = 1.0) -> list[int]:
        """Per-block budgets ``r_i`` (tokens removed in block i), length ``depth``.

        Args:
            depth: blocks in the backbone.
            num_tokens: patch tokens (prefix excluded) before the first block.
            progress: fraction of training done, 1.0 at inference.

        Raises:
            ValueError: when the schedule does not fit ``depth``.
        """
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        """Plain-dict description recorded in results."""
        return {"kind": self.kind, **self.__dict__}

    def budgets_for(self, depth: int, num_tokens: int, progress: float = 1.0,
                    active: Sequence[int] | None = None) -> list[int]:
        """``budgets`` for a reducer that acts only after the 0-based blocks ``active`` (None: every block).

        Schedules whose budgets are set per block (constant, linear, explicit) are unchanged; a keep ratio is
        spread over the active blocks (``KeepRatio``), so the ratio the reducer is given is the ratio it keeps.
        Plugin schedules inherit this default and need not know about it.
        """
        return self.budgets(depth, num_tokens, progress)


def _check_r(r: float, what: str = "r") -> None:
    if r < 0:
        raise ValueError(f"{what} must be >= 0 (tokens removed per block), got {r}")


@dataclass
class Constant(Schedule):
    kind: ClassVar[str] = "constant"
    r: int = 0

    def __post_init__(self) -> None:
        _check_r(self.r)

    def budgets(self, depth: int, num_tokens: int, progress: float = 1.0) -> list[int]:
        return [int(self.r)] * depth


@dataclass
class Linear(Schedule):
    kind: ClassVar[str] = "linear"
    r: int = 0
    inflection: float = 0.0

    def __post_init__(self) -> None:
        _check_r(self.r)
        if not -1.0 <= self.inflection <= 1.0:
            raise ValueError(f"inflection must be in [-1, 1], got {self.inflection}")

    def budgets(self, depth: int, num_tokens: int, progress: float = 1.0) -> list[int]:
        first = self.r * (1.0 - self.inflection)  # value at block 0
        last = 2 * self.r - first  # value at the last block; mean stays r
        if depth == 1:
            return [int(self.r)]
        step = (last - first) / (depth - 1)
        return [int(first + step * i) for i in range(depth)]


@dataclass
class Explicit(Schedule):
    kind: ClassVar[str] = "explicit"
    values: Sequence[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.values = [int(v) for v in self.values]
        for v in self.values:
            _check_r(v, "every value of the explicit schedule")

    def budgets(self, depth: int, num_tokens: int, progress: float = 1.0) -> list[int]:
        if len(self.values) > depth:
            raise ValueError(f"explicit schedule has {len(self.values)} values but the backbone has depth {depth}; "
                             "give at most one value per block")
        return list(self.values) + [0] * (depth - len(self.values))


@dataclass
class KeepRatio(Schedule):
    """Removes tokens so that a fraction ``keep_ratio`` remains.

    Attributes:
        keep_ratio: fraction in (0, 1] of patch tokens kept.
        per_block: True: keep ``keep_ratio`` of the tokens after every reducing block (geometric decay,
            DynamicViT style); False: ``keep_ratio`` of the tokens remain after the last reducing block,
            the removal spread evenly over the reducing blocks.
        blocks: how many leading blocks reduce (default all); later blocks get 0.
    """

    kind: ClassVar[str] = "keep_ratio"
    keep_ratio: float = 1.0
    per_block: bool = False
    blocks: int | None = None

    def __post_init__(self) -> None:
        if not 0.0 < self.keep_ratio <= 1.0:
            raise ValueError(f"keep_ratio must be in (0, 1], got {self.keep_ratio}")
        if self.blocks is not None and self.blocks < 1:
            raise ValueError(f"keep-ratio schedule: blocks must be >= 1 (or null for all blocks), got {self.blocks}")

    def budgets(self, depth: int, num_tokens: int, progress: float = 1.0) -> list[int]:
        nb = depth if self.blocks is None else self.blocks
        if not 0 < nb <= depth:
            raise ValueError(f"keep-ratio schedule: blocks={nb} does not fit depth {depth}; give 1 <= blocks <= "
                             "depth, or null for all blocks")
        out, n = [], num_tokens
        if self.per_block:
            for _ in range(nb):
                keep = self._kept(n)
                out.append(n - keep)
                n = keep
        else:
            total = num_tokens - self._kept(num_tokens)
            base, extra = divmod(total, nb)
            out = [base + (1 if i < extra else 0) for i in range(nb)]
        return out + [0] * (depth - nb)

    def budgets_for(self, depth: int, num_tokens: int, progress: float = 1.0,
                    active: Sequence[int] | None = None) -> list[int]:
        """Without ``blocks``, the removal goes to the blocks the reducer acts on (``active``), not to
        blocks where it does nothing: ``keep_ratio`` of ``num_tokens`` remain after the last active block."""
        if self.blocks is not None or active is None:
            return self.budgets(depth, num_tokens, progress)
        act = sorted({int(b) for b in active if 0 <= int(b) < depth})
        if not act:
            return [0] * depth
        spread = KeepRatio(self.keep_ratio, self.per_block, len(act)).budgets(len(act), num_tokens, progress)
        out = [0] * depth
        for b, v in zip(act, spread):
            out[b] = v
        return out

    def _kept(self, n: int) -> int:
        """``max(1, ceil(n * keep_ratio))`` with keep_ratio read as the decimal it was written as.

        Plain float maths would give ``ceil(100 * 0.07) = ceil(7.000000000000001) = 8``.
        """
        return max(1, math.ceil(n * Fraction(repr(float(self.keep_ratio)))))


@dataclass
class Warmup(Schedule):
    """Ramps ``inner``'s budgets linearly from 0 over the first ``fraction`` of training (Cropr Sec. 3.4)."""

    kind: ClassVar[str] = "warmup"
    inner: Schedule = field(default_factory=Constant)
    fraction: float = 0.5

    def __post_init__(self) -> None:
        if not 0.0 <= self.fraction <= 1.0:
            raise ValueError(f"warm-up fraction must be in [0, 1], got {self.fraction}")

    def budgets(self, depth: int, num_tokens: int, progress: float = 1.0) -> list[int]:
        full = self.inner.budgets(depth, num_tokens, progress)
        return [int(round(v * self._scale(progress))) for v in full]

    def budgets_for(self, depth: int, num_tokens: int, progress: float = 1.0,
                    active: Sequence[int] | None = None) -> list[int]:
        full = self.inner.budgets_for(depth, num_tokens, progress, active)
        return [int(round(v * self._scale(progress))) for v in full]

    def _scale(self, progress: float) -> float:
        return 1.0 if self.fraction == 0 else min(1.0, max(0.0, progress) / self.fraction)

    def config(self) -> dict[str, Any]:
        return {"kind": "warmup", "fraction": self.fraction, "inner": self.inner.config()}


SCHEDULES = ("constant", "linear", "explicit", "keep_ratio", "warmup")

# parameters each kind takes besides ``kind`` and ``r`` (``applies_to`` is config plumbing, ignored)
_PARAMS: dict[str, tuple[str, ...]] = {
    "constant": (),
    "linear": ("inflection",),
    "explicit": ("values",),
    "keep_ratio": ("keep_ratio", "per_block", "blocks"),
    "warmup": ("fraction", "inner"),
}


def build_schedule(kind: str = "constant", r: int = 0, **params: Any) -> Schedule:
    """Builds a schedule from a short spec (the ``schedule`` config group), with ``r`` the reducer's budget.

    Args:
        kind: one of ``SCHEDULES``.
        r: the reducer's base budget (tokens removed per block), used by constant, linear and warmup.
        **params: the form's own parameters (``inflection``, ``values``, ``keep_ratio``, ``per_block``,
            ``blocks``, ``fraction``, and for warmup ``inner`` = another spec dict).

    Raises:
        ValueError: unknown kind (the valid kinds are listed), a parameter the kind does not take (its
            parameters are listed; null values are ignored), or out-of-range parameters.
    """
    params = {k: v for k, v in params.items() if v is not None and k not in ("applies_to",)}
    if kind in _PARAMS:
        unknown = sorted(set(params) - set(_PARAMS[kind]))
        if unknown:
            raise ValueError(f"schedule kind {kind!r} does not take {unknown}; its parameters: "
                             f"{', '.join(('r',) + _PARAMS[kind])}")
    if kind == "constant":
        return Constant(r=r)
    if kind == "linear":
        return Linear(r=r, inflection=float(params.get("inflection", 0.0)))
    if kind == "explicit":
        return Explicit(values=list(params.get("values", [])))
    if kind == "keep_ratio":
        return KeepRatio(keep_ratio=float(params.get("keep_ratio", 1.0)),
                         per_block=bool(params.get("per_block", False)),
                         blocks=params.get("blocks"))
    if kind == "warmup":
        inner_spec = dict(params.get("inner") or {"kind": "constant"})
        inner_spec.setdefault("r", r)  # an inner spec may carry its own r (e.g. from ``config()``)
        return Warmup(inner=build_schedule(**inner_spec), fraction=float(params.get("fraction", 0.5)))
    raise ValueError(f"unknown schedule {kind!r}; valid: {', '.join(SCHEDULES)}")


def as_schedule(schedule: Schedule | Mapping[str, Any] | None, r: int, owner: str = "reducer") -> Schedule:
    """The schedule a reducer constructor was given: a ``Schedule`` as is, None -> ``Constant(r)``, a mapping
    (a config's ``schedule:`` node) -> ``build_schedule(r=r, **mapping)`` (a mapping's own ``r`` wins).

    Raises:
        ValueError: anything else (names ``owner`` and the type given), or a bad mapping (see build_schedule).
    """
    if schedule is None:
        return Constant(int(r))
    if isinstance(schedule, Schedule):
        return schedule
    if isinstance(schedule, Mapping):
        spec = dict(schedule)
        spec.setdefault("r", int(r))
        return build_schedule(**spec)
    raise ValueError(f"{owner} schedule must be a Schedule, a mapping (e.g. {{'kind': 'linear'}}) or None, "
                     f"got {type(schedule).__name__}")


def per_image_budgets(schedule: Schedule, depth: int, counts: Any, progress: float = 1.0,
                      active: Sequence[int] | None = None) -> Any:
    """Budgets of every image from its own token count: ``[B, depth]`` (long) for ``counts`` ``[B]``.

    Row ``b`` is ``schedule.budgets_for(depth, counts[b], progress, active)``; each distinct count is computed
    once. A batch therefore gets the budgets its images get one by one, whatever the other images hold
    (a keep ratio of an image with 40 tokens is not taken of the batch's largest image).

    Args:
        counts: ``[B]`` tokens (patch tokens, prefix excluded) each image brings to the reducer's first block.
        active: 0-based blocks the reducer acts after (``Schedule.budgets_for``).
    """
    import torch

    values = counts.tolist()
    rows = {n: schedule.budgets_for(depth, int(n), progress, active) for n in set(values)}
    return torch.tensor([rows[n] for n in values], dtype=torch.long, device=counts.device).reshape(len(values), depth)
