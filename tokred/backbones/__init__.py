"""Backbone-family adapters (timm ``VisionTransformer``, timm ``Eva``) and ``adapter_for(model)``.

Plugins add a family through the entry-point group ``tokred.backbones`` (``tokred.plugins.BACKBONES``), naming a
``BackboneAdapter`` subclass whose ``matches(model)`` recognises its models.
"""

from __future__ import annotations

from torch import nn

from tokred.backbones.base import BackboneAdapter

__all__ = ["BackboneAdapter", "adapter_for"]


def adapter_for(model: nn.Module) -> BackboneAdapter:
    """The registered adapter that drives ``model``, built for it.

    Args:
        model: a backbone module (e.g. a timm ``VisionTransformer`` or ``Eva``).

    Returns:
        An instance of the one registered ``BackboneAdapter`` whose ``matches(model)`` is True.

    Raises:
        TypeError: a registered entry is not a ``BackboneAdapter`` subclass (names its distribution), or no
            adapter matches (lists the registered adapters), or several do (pass ``Encoder(adapter=...)``).
    """
    from tokred.plugins import BACKBONES

    found = []
    for name, spec in BACKBONES.available().items():
        cls = BACKBONES.get(name)
        if not (isinstance(cls, type) and issubclass(cls, BackboneAdapter)):
            raise TypeError(f"backbone adapter {name!r} from {spec.distribution} is {cls!r}, not a subclass of "
                            "tokred.backbones.BackboneAdapter; fix its entry point in group 'tokred.backbones'")
        if cls.matches(model):
            found.append((name, cls))
    if not found:
        listing = ", ".join(f"{n} ({BACKBONES.get(n).__name__})" for n in BACKBONES.names())
        raise TypeError(f"no registered backbone adapter drives {type(model).__module__}.{type(model).__name__}; "
                        f"registered: {listing}. Write a BackboneAdapter and register it in the entry-point "
                        "group 'tokred.backbones'")
    if len(found) > 1:
        raise TypeError(f"several backbone adapters match {type(model).__name__}: {[n for n, _ in found]}; "
                        "pass the one to use as Encoder(model, adapter=...)")
    return found[0][1](model)
