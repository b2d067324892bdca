"""Tables (CSV + JSON, pandas) and ``report.md`` of ``tokred analyze``."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tokred.io import atomic_write, atomic_write_json

__all__ = ["markdown", "write_table", "write_summary", "Report"]


def write_table(folder: Path, name: str, df: pd.DataFrame) -> list[Path]:
    """Writes ``name.csv`` and ``name.json`` (records) under ``folder/tables``; returns both paths."""
    out = folder / "tables"
    out.mkdir(parents=True, exist_ok=True)
    csv, js = out / f"{name}.csv", out / f"{name}.json"
    atomic_write(csv, df.to_csv(index=False))
    atomic_write(js, df.to_json(orient="records", indent=1) + "\n")
    return [csv, js]


def _plain(obj: Any) -> Any:
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return None if np.isnan(obj) else float(obj)
    if isinstance(obj, float) and obj != obj:
        return None
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def write_summary(folder: Path, summary: Mapping[str, Any]) -> Path:
    """``summary.json``: every headline number (NaN written as null)."""
    return atomic_write_json(folder / "summary.json", _plain(summary), default=str)


def markdown(df: pd.DataFrame, floatfmt: str = ".4g", max_rows: int = 40) -> str:
    """A markdown table (pandas ``to_markdown``, tabulate); longer tables are cut with a note."""
    if df.empty:
        return "_(empty)_"
    note = ""
    if len(df) > max_rows:
        note = f"\n\n_({len(df) - max_rows} more rows in the CSV)_"
        df = df.head(max_rows)
    return df.to_markdown(index=False, floatfmt=floatfmt) + note


class Report:
    """Builds ``report.md`` section by section."""

    def __init__(self, title: str) -> None:
        self.lines: list[str] = [f"# {title}", ""]

    def section(self, title: str, *paragraphs: str) -> None:
        self.lines += [f"## {title}", ""]
        for p in paragraphs:
            self.lines += [p, ""]

    def text(self, *paragraphs: str) -> None:
        for p in paragraphs:
            self.lines += [p, ""]

    def table(self, df: pd.DataFrame, csv_name: str | None = None, **kwargs: Any) -> None:
        self.lines += [markdown(df, **kwargs), ""]
        if csv_name:
            self.lines += [f"Table: [tables/{csv_name}.csv](tables/{csv_name}.csv) "
                           f"([JSON](tables/{csv_name}.json))", ""]

    def figure(self, rel: str, caption: str) -> None:
        self.lines += [f"![{caption}]({rel})", "", f"_{caption}_ ([{rel}]({rel}))", ""]

    def bullets(self, items: Sequence[str]) -> None:
        self.lines += [f"- {i}" for i in items] + [""]

    def write(self, path: Path) -> Path:
        return atomic_write(path, "\n".join(self.lines).rstrip() + "\n")


def dumps(obj: Any) -> str:
    """Compact JSON of plain values (NaN as null), for inline report lines."""
    return json.dumps(_plain(obj))
