"""``python -m tokred list``: every registered plugin of every kind and where it comes from (torch-free)."""

from __future__ import annotations

import sys

__all__ = ["list_job", "plugin_rows"]


def plugin_rows() -> list[list[str]]:
    """``[kind, name, distribution, version, origin, target]`` per entry of ``tokred.plugins.REGISTRIES``,
    read from the registries' specs without importing the objects."""
    from tokred.plugins import REGISTRIES

    rows = []
    for kind, registry in REGISTRIES.items():
        for name, spec in registry.available().items():
            rows.append([kind, name, spec.distribution, spec.version, spec.origin, spec.target])
    return rows


def list_job() -> None:
    """Prints the table of ``plugin_rows`` (reducers, backbones, decoders, datasets)."""
    from tabulate import tabulate

    sys.stdout.write(tabulate(plugin_rows(), headers=["kind", "name", "distribution", "version", "origin", "target"],
                              tablefmt="simple") + "\n")
