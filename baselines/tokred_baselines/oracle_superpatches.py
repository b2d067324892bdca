"""Oracle superpatches: dCTS with ground-truth window homogeneity, the upper bound of dCTS.

STEP's dCTS (Szczepanski, Poreba, Haroun, arXiv 2509.14165, 2025; methods.md Sec. 1) lets a policy CNN
choose, per image, a quadtree of 2x2 .. 16x16-patch superpatches. Replacing the learned policy by the
ground truth (a window is accepted when its pixels hold one class, ``tokred.policy.oracle_scores``) gives
the best partition any policy could learn at the same thresholds: the accuracy it reaches bounds dCTS from
above, and its token count shows how much an image's layout allows to share (methods.md Sec. 1, "Oracle
policy ... a useful upper-bound baseline").

It reads the labels, so it needs ``seg(image, target)`` at inference too; it is a diagnostic, not a
deployable method. Everything else (partition, supertoken embedding, restore) is tokred's ``dcts``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from tokred.reducers.dcts import DCTS

__all__ = ["OracleSuperpatches"]


class OracleSuperpatches(DCTS):
    """dCTS with the ground-truth (oracle) policy fixed; see the module docstring.

    Args:
        levels: window sizes in patches per side (powers of two >= 2, each fitting the crop's grid).
        thresholds: per-level ``tau_L`` in ``[0, 1]`` (``{level: tau}``, a list aligned with ``levels``, one
            float, or None = 0.5 each). Oracle scores are 0 or 1, so any ``tau < 1`` accepts exactly the
            uniform windows and ``tau = 1`` accepts none.
        min_tokens: optional lower bound on patch tokens per image.
        max_tokens: optional upper bound on patch tokens per image.
        proportional_attention: add ``log(size)`` to every key's attention logit.

    Raises:
        ValueError: bad levels, thresholds or token caps (as ``DCTS``); in the forward, a missing target.
    """

    @classmethod
    def needs_fitting(cls, config) -> bool:
        """Never: the ground truth is the policy, nothing is trained before the segmenter."""
        return False

    def __init__(self, levels: Sequence[int] = (2, 4, 8, 16),
                 thresholds: Mapping | Sequence[float] | float | None = None, min_tokens: int | None = None,
                 max_tokens: int | None = None, proportional_attention: bool = False) -> None:
        super().__init__(levels=levels, thresholds=thresholds, policy="oracle", policy_checkpoint=None,
                         min_tokens=min_tokens, max_tokens=max_tokens,
                         proportional_attention=proportional_attention)

    @classmethod
    def identity_config(cls) -> dict[str, Any]:
        """Thresholds of 1: no window is accepted, every patch keeps the standard embedding."""
        return {"levels": (2, 4, 8), "thresholds": 1.0}

    @classmethod
    def example_config(cls) -> dict[str, Any]:
        """Levels that fit a 128 x 160 px crop (8 x 10 patches of 16 px)."""
        return {"levels": (2, 4, 8)}

    def extra_config(self) -> dict[str, Any]:
        cfg = super().extra_config()
        for key in ("policy_backbone", "policy_checkpoint"):  # no policy network: not meaningful here
            cfg.pop(key, None)
        return cfg
