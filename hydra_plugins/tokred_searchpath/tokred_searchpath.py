"""Hydra SearchPathPlugin shipped by the tokred distribution (top-level ``hydra_plugins`` namespace package).

Whenever Hydra builds its config search path for tokred's configs (``python -m tokred ...``, or
``hydra.initialize_config_dir`` on tokred's config folder), this plugin

1. appends the folder of every package declared in the entry-point group ``tokred.configs`` (a plugin's own
   ``merger/<name>.yaml`` ...), so no ``hydra.searchpath`` is needed, and
2. calls ``tokred.structured.register_configs()``, so the generated schemas (``schema/merger/<name>`` ...)
   are in the ConfigStore before anything is composed.

Other Hydra applications in the same environment are left alone: nothing happens unless tokred's config
folder is on the search path.
"""

from __future__ import annotations

import logging
from pathlib import Path

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin

log = logging.getLogger(__name__)


def _local_path(path: str) -> Path | None:
    if path.startswith("file://"):
        path = path[len("file://"):]
    elif "://" in path:
        return None
    try:
        return Path(path).resolve()
    except OSError:
        return None


class TokredSearchPathPlugin(SearchPathPlugin):
    """Adds the ``tokred.configs`` plugin folders and registers tokred's structured configs."""

    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        try:
            from tokred import structured

            root = structured.config_root().resolve()
        except (ImportError, FileNotFoundError):  # tokred half-installed: leave Hydra as it is
            return
        if not any(_local_path(e.path) == root for e in search_path.get_path()):
            return
        for folder in structured.plugin_config_dirs():
            search_path.append(provider="tokred.configs", path=f"file://{folder.resolve()}")
        structured.register_configs()
