"""Grids keep one protocol: the data fingerprint and code version in protocol.json, checked on every rerun.

The record functions are tested directly on copies of the embedded CamVid sample; the run_grid tests stub the
training stages and the aggregation (no training), so the whole file runs in seconds.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import tokred.ablations.runner as runner
from tokred.ablations import Grid, load_grid, run_grid
from tokred.ablations.protocol import (attribute_runs, check_provenance, code_version, data_fingerprint,
                                       describe_code, stamp_record)
from tokred.data.info import get_spec

SPLITS = ("train", "val")
CODE_A = {"tokred": "0.1.0", "git_commit": "a" * 40, "git_dirty": False}
CODE_B = {"tokred": "0.1.0", "git_commit": "b" * 40, "git_dirty": True}


@pytest.fixture
def sample(tmp_path) -> Path:
    """A copy of the embedded CamVid sample (same data, another root)."""
    return Path(shutil.copytree(get_spec("camvid_sample").default_root, tmp_path / "camvid_copy"))


def _fp(root, tmp_path, splits=SPLITS):
    return data_fingerprint("camvid_sample", root, splits, cache_dir=tmp_path / "cache")


def _record(data, code=CODE_A):
    return {"identity": {"protocol": "p"}, "data": data, "code": code,
            "code_history": [{"code": code, "since_utc": None, "runs": ["baseline_seed0"]}]}


def _first_label(root: Path, split: str) -> Path:
    return get_spec("camvid_sample").list_files(root, split)[0][1]


# ---------------------------------------------------------------------------------------------- record functions
def test_same_data_at_another_root_is_accepted(sample, tmp_path):
    embedded = _fp(None, tmp_path)
    assert _fp(sample, tmp_path) == embedded
    assert set(embedded["splits"]) == set(SPLITS) and embedded["dataset"] == "camvid_sample"
    train = embedded["splits"]["train"]
    assert train["pairs"] == len(get_spec("camvid_sample").list_files(sample, "train"))
    assert sum(train["label_pixels"].values()) > 0
    assert check_provenance(_record(embedded), _fp(sample, tmp_path), CODE_A, False, tmp_path) == []
    # the cache answers the second time: the same fingerprint without decoding
    assert any((tmp_path / "cache").iterdir())
    assert _fp(sample, tmp_path) == embedded


def test_changed_split_list_is_refused_naming_the_split(sample, tmp_path):
    old = _record(_fp(sample, tmp_path))
    lines = (sample / "val.txt").read_text().splitlines()
    (sample / "val.txt").write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(ValueError, match=r"split 'val' lists other files") as err:
        check_provenance(old, _fp(sample, tmp_path), CODE_A, True, tmp_path)
    assert "'train'" not in str(err.value)
    assert "grid.protocol=" in str(err.value) and "grid.root=" in str(err.value)


def test_other_split_read_is_refused(sample, tmp_path):
    old = _record(_fp(sample, tmp_path, ("train",)))
    with pytest.raises(ValueError, match=r"split 'val': not read before"):
        check_provenance(old, _fp(sample, tmp_path), CODE_A, False, tmp_path)


def test_changed_label_file_is_refused(sample, tmp_path):
    old = _record(_fp(sample, tmp_path))
    label = _first_label(sample, "train")
    arr = np.array(Image.open(label))
    arr[0, 0] = 11 if arr[0, 0] != 11 else 0
    Image.fromarray(arr).save(label)
    with pytest.raises(ValueError, match=r"label statistics of split 'train' differ \(pixels per label value"):
        check_provenance(old, _fp(sample, tmp_path), CODE_A, False, tmp_path)


def test_moved_label_pixels_are_refused_with_the_same_histogram(sample, tmp_path):
    old = _record(_fp(sample, tmp_path))
    label = _first_label(sample, "val")
    arr = np.array(Image.open(label))
    flat = arr.reshape(-1)
    i = int(np.flatnonzero(flat != flat[0])[0])
    flat[0], flat[i] = flat[i], flat[0]  # the same pixels per value, at other places
    Image.fromarray(arr).save(label)
    new = _fp(sample, tmp_path)
    assert new["splits"]["val"]["label_pixels"] == old["data"]["splits"]["val"]["label_pixels"]
    with pytest.raises(ValueError, match=r"split 'val' differ \(label maps changed, same pixel histogram\)"):
        check_provenance(old, new, CODE_A, False, tmp_path)


def test_code_change_refused_then_accepted_and_recorded(tmp_path):
    data = _fp(None, tmp_path)
    old = _record(data, CODE_A)
    with pytest.raises(ValueError, match="allow_code_change") as err:
        check_provenance(old, data, CODE_B, False, tmp_path)
    assert describe_code(CODE_A) in str(err.value) and describe_code(CODE_B) in str(err.value)
    assert "aaaaaaaaaaaa" in str(err.value) and "bbbbbbbbbbbb (dirty)" in str(err.value)
    notes = check_provenance(old, data, CODE_B, True, tmp_path)
    assert len(notes) == 1 and "code changed" in notes[0]
    record = stamp_record({}, old, data, CODE_B, ["baseline_seed0"])
    assert record["code"] == CODE_B
    assert [h["code"] for h in record["code_history"]] == [CODE_A, CODE_B]
    attribute_runs(record, ["baseline_seed0", "none_seed0"])
    assert [h["runs"] for h in record["code_history"]] == [["baseline_seed0"], ["none_seed0"]]
    # the same code again: no new entry
    again = stamp_record({}, record, data, CODE_B, ["baseline_seed0", "none_seed0"])
    assert len(again["code_history"]) == 2


def test_old_record_is_upgraded(tmp_path):
    data = _fp(None, tmp_path)
    old = {"identity": {"protocol": "p"}, "cells": {}, "invocations": []}
    notes = check_provenance(old, data, CODE_A, False, tmp_path)
    assert len(notes) == 2 and all("predates" in n for n in notes)
    record = stamp_record({}, old, data, CODE_A, ["baseline_seed0"])
    assert record["data"] == data and record["code"] == CODE_A
    assert [(h["code"], h["runs"]) for h in record["code_history"]] == [(None, ["baseline_seed0"]), (CODE_A, [])]


def test_code_version_and_grid_option():
    code = code_version()
    assert set(code) == {"tokred", "git_commit", "git_dirty"} and code["tokred"]
    base = {"protocol": "p", "overrides": [], "cells": {"none": {"overrides": []}}}
    assert Grid.from_mapping(base).allow_code_change is False
    assert Grid.from_mapping({**base, "allow_code_change": True}).allow_code_change is True
    with pytest.raises(ValueError, match="allow_code_change"):
        Grid.from_mapping({**base, "allow_code_change": "maybe"})
    assert load_grid("smoke").allow_code_change is False


# ---------------------------------------------------------------------------------------------- through run_grid
@pytest.fixture
def stubbed(tmp_path, monkeypatch):
    """run_grid without training: the stages write a metrics.json per run, aggregation is skipped."""

    def stages(grid, launch, active, policy_out):
        for c in active:
            for s in grid.seeds:
                d = grid.protocol_dir / "runs" / f"{c.name}_seed{s}"
                d.mkdir(parents=True, exist_ok=True)
                (d / "metrics.json").write_text("{}")
        return []

    monkeypatch.setattr(runner, "_run_stages", stages)
    monkeypatch.setattr(runner, "summarize", lambda d: pd.DataFrame())
    monkeypatch.setattr(runner, "write_summary", lambda table, d: {})
    monkeypatch.setattr(runner, "FINGERPRINT_CACHE_DIR", tmp_path / "cache")
    monkeypatch.setattr(runner, "code_version", lambda: dict(CODE_A))
    grid = load_grid("smoke")
    return dataclasses.replace(grid, root=tmp_path / "ablations", cells=tuple(c for c in grid.cells
                                                                              if c.name == "none"))


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_run_grid_records_and_refuses_without_writing(stubbed, sample, monkeypatch, caplog):
    grid = stubbed
    run_grid(grid)
    path = grid.protocol_dir / "protocol.json"
    rec = json.loads(path.read_text())
    assert rec["code"] == CODE_A and rec["data"]["dataset"] == "camvid_sample"
    assert set(rec["data"]["splits"]) == {"train", "val"}
    assert rec["code_history"] == [{"code": CODE_A, "since_utc": rec["code_history"][0]["since_utc"],
                                    "runs": ["baseline_seed0", "none_seed0"]}]
    assert rec["invocations"][-1]["code"] == CODE_A

    run_grid(grid, extra_overrides=[f"dataset.root={sample}"])  # the same data at another root
    assert len(json.loads(path.read_text())["invocations"]) == 2

    before = _snapshot(grid.protocol_dir)
    lines = (sample / "train.txt").read_text().splitlines()
    (sample / "train.txt").write_text("\n".join(lines[1:]) + "\n")
    with pytest.raises(ValueError, match=r"other data: split 'train' lists other files"):
        run_grid(grid, extra_overrides=[f"dataset.root={sample}"])
    monkeypatch.setattr(runner, "code_version", lambda: dict(CODE_B))
    with pytest.raises(ValueError, match="grid.allow_code_change=true"):
        run_grid(grid)
    assert _snapshot(grid.protocol_dir) == before  # protocol.json byte for byte, and nothing else written

    with caplog.at_level(logging.INFO, logger="tokred.ablations"):
        run_grid(dataclasses.replace(grid, allow_code_change=True))
    assert any("code changed" in r.getMessage() for r in caplog.records)
    rec = json.loads(path.read_text())
    assert rec["code"] == CODE_B and [h["code"] for h in rec["code_history"]] == [CODE_A, CODE_B]
    assert rec["code_history"][1]["runs"] == []  # every run had finished under the first version


def test_run_grid_upgrades_an_old_record(stubbed, caplog):
    grid = stubbed
    run_grid(grid)
    path = grid.protocol_dir / "protocol.json"
    rec = json.loads(path.read_text())
    for key in ("data", "code", "code_history"):
        del rec[key]
    for inv in rec["invocations"]:
        del inv["code"]
    path.write_text(json.dumps(rec))
    with caplog.at_level(logging.INFO, logger="tokred.ablations"):
        run_grid(grid)
    assert sum("predates" in r.getMessage() for r in caplog.records) == 2
    rec = json.loads(path.read_text())
    assert rec["code"] == CODE_A and rec["data"]["splits"]["train"]["pairs"] > 0
    assert [(h["code"], h["runs"]) for h in rec["code_history"]] == [(None, ["baseline_seed0", "none_seed0"]),
                                                                     (CODE_A, [])]
