"""The identity reducer: the unreduced baseline that every sweep includes."""

from __future__ import annotations

from typing import ClassVar

from tokred.reducers.base import Reducer


class NoReducer(Reducer):
    """Leaves the tokens untouched; ``merger=none`` and ``pruner=none`` both build it."""

    kind: ClassVar[str] = "none"
