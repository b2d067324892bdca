"""Running a grid: validate every cell, check and record the protocol, launch the stages, aggregate.

See ``tokred.ablations`` for the stages and the folder layout. Every file written here goes through
``tokred.io.atomic_write_json``; cells are launched as Hydra multiruns of ``python -m tokred``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import DictConfig

from tokred.ablations.grid import (BASELINE_CELL, RESERVED_KEYS, Cell, Grid, check_finetune_overrides, hydra_value,
                                   identity_differences, key_of, matches, protocol_identity, read_protocol,
                                   searchpath, write_cell_configs)
from tokred.ablations.protocol import (FINGERPRINT_CACHE_DIR, attribute_runs, check_provenance, code_version,
                                       data_fingerprint, stamp_record)
from tokred.ablations.summary import summarize, write_summary
from tokred.config import config_dir
from tokred.structured import register_configs
from tokred.io import atomic_write_json, policy_cache_path

__all__ = ["ablate_job", "run_grid"]

log = logging.getLogger(__name__)

_SWEEP_KEYS_DROPPED = ("hydra.mode", "hydra.run.")


# ---------------------------------------------------------------------------------------------- validation
@contextlib.contextmanager
def _composer() -> Iterator[Any]:
    """``compose(overrides) -> DictConfig`` on tokred's configs, inside or outside a running Hydra app."""
    import hydra
    from hydra.core.global_hydra import GlobalHydra

    register_configs()

    def compose(overrides: list[str]) -> DictConfig:
        return hydra.compose(config_name="config", overrides=overrides)

    if GlobalHydra.instance().is_initialized():  # inside `python -m tokred ablate`: the app's own config source
        yield compose
    else:
        with hydra.initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
            yield compose


@contextlib.contextmanager
def _quiet(logger_name: str, level: int = logging.ERROR) -> Iterator[None]:
    lg = logging.getLogger(logger_name)
    old = lg.level
    lg.setLevel(level)
    try:
        yield
    finally:
        lg.setLevel(old)


def _reducer_names_asked(cell: Cell) -> list[str]:
    """Reducer names a cell selects (``merger=X``, ``pruner=X``, ``merger.name=X``, ``pruner.name=X``)."""
    names = []
    for o in cell.overrides:
        key, _, value = o.partition("=")
        if key.lstrip("+") in ("merger", "pruner", "merger.name", "pruner.name") and value:
            names.append(value.strip().strip("'\""))
    return names


def _check_data(cfg: DictConfig, cell: str) -> None:
    """Raises ValueError when the composed config's dataset has no data on this machine."""
    d = cfg.dataset
    root = d.get("root")
    if root is None:
        if d.name != "camvid_sample":
            raise ValueError(f"cell {cell}: dataset={d.name} has no root; pass dataset.root=PATH (e.g. "
                             "dataset.root=../shared/data/CamVid) or set it in the grid's execution overrides")
        return
    if not Path(str(root)).is_dir():
        raise ValueError(f"cell {cell}: dataset.root={root} does not exist (cwd {Path.cwd()}); pass "
                         "dataset.root=PATH to the data set folder")


def _splits_read(cfg: DictConfig, cell: Cell, trains_policy: bool) -> list[str]:
    """The splits a composed cell reads: training (unless off the shelf), evaluation, policy training."""
    d = cfg.dataset
    splits = [] if cell.mode == "off_the_shelf" else [str(d.train_split)]
    if trains_policy:
        splits += [str(d.train_split), str(cfg.policy.val_split)]
    return list(dict.fromkeys([*splits, str(cfg.eval.split)]))


def _validate(grid: Grid, cells: Sequence[Cell], configs_dir: Path, extra: Sequence[str]
              ) -> tuple[list[Cell], dict[str, dict[str, Any]], dict[str, Any]]:
    """Composes and builds every cell; returns the cells to run, the policy networks and the data they read.

    Returns:
        ``(cells, policies, data)``: the runnable cells (optional cells with a missing reducer dropped, with a
        warning), ``{cell name: {"levels", "backbone", "crop_size"}}`` for cells whose dCTS/CTS policy
        network must be trained first, and ``{"dataset", "root", "splits"}`` the cells read (the data set and
        root of the first cell, the baseline; the splits of all).

    Raises:
        ValueError: any cell that cannot run, with the cell's name and the fix.
    """
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from tokred.plugins import REDUCERS

    registered = REDUCERS.names()
    common = [*grid.overrides, *grid.execution, *extra, searchpath(configs_dir), f"seed={grid.seeds[0]}"]
    runnable: list[Cell] = []
    policies: dict[str, dict[str, Any]] = {}
    baseline_keys: set[str] | None = None
    data: dict[str, Any] = {}
    with _composer() as compose, _quiet("tokred.reducers"):
        for cell in cells:
            unknown = [n for n in _reducer_names_asked(cell) if n not in registered]
            if unknown and cell.optional:
                log.warning("skipping optional cell %s: reducer %s not installed (available: %s)", cell.name,
                            ", ".join(unknown), ", ".join(registered))
                continue
            if unknown:
                raise ValueError(f"cell {cell.name}: unknown reducer {', '.join(unknown)}; available: "
                                 f"{', '.join(registered)} (install the plugin, or mark the cell optional: true)")
            try:
                cfg = compose([*common, f"experiment=ablation/{cell.name}"])
            except (HydraException, OmegaConfBaseException, ValueError) as err:
                raise ValueError(f"cell {cell.name}: its configuration does not compose ({err}); check its "
                                 f"overrides {list(cell.overrides)}") from err
            missing = [f"{slot} {cfg[slot].name!r}" for slot in ("merger", "pruner")
                       if cfg[slot].name not in registered]
            if missing and cell.optional:
                log.warning("skipping optional cell %s: %s not installed", cell.name, ", ".join(missing))
                continue
            if missing:
                raise ValueError(f"cell {cell.name}: unknown {', '.join(missing)}; available: {', '.join(registered)}")
            keys, policy = _check_cell(cfg, cell, baseline_keys)
            if cell.mode == "baseline":
                baseline_keys = keys
            if policy is not None:
                policies[cell.name] = policy
            if not data:
                data = {"dataset": str(cfg.dataset.name), "root": cfg.dataset.get("root"), "splits": []}
            data["splits"] = list(dict.fromkeys([*data["splits"], *_splits_read(cfg, cell, policy is not None)]))
            runnable.append(cell)
    return runnable, policies, data


def _check_cell(cfg: DictConfig, cell: Cell, baseline_keys: set[str] | None
                ) -> tuple[set[str], dict[str, Any] | None]:
    """Builds a composed cell; returns its state-dict keys and the policy network it needs (or None).

    Raises:
        ValueError: no data, a model that cannot be built, or an off-the-shelf cell with trained parameters.
    """
    from tokred.config import build_model_from_config
    from tokred.jobs.policy import fitting_slot

    _check_data(cfg, cell.name)
    try:
        keys = set(build_model_from_config(cfg).state_dict())
    except (ValueError, KeyError, TypeError, ImportError) as err:
        raise ValueError(f"cell {cell.name}: the model cannot be built: {err}") from err
    if cell.mode == "off_the_shelf" and baseline_keys is not None and keys - baseline_keys:
        raise ValueError(f"cell {cell.name}: off_the_shelf evaluates the baseline checkpoint, but its reducer "
                         f"has trained parameters the baseline lacks ({sorted(keys - baseline_keys)[:3]}...); "
                         "make it a finetune cell")
    found = fitting_slot(cfg)
    if found is None:
        return keys, None
    kwargs = found[1]
    return keys, {"dataset": str(cfg.dataset.name), "levels": list(kwargs.get("levels") or [2]),
                  "backbone": str(kwargs["policy_backbone"]), "crop_size": list(cfg.dataset.crop_size)}


def _policy_path(protocol_dir: Path, spec: Mapping[str, Any]) -> str:
    """The protocol's own copy of the shared policy cache naming (``<protocol>/policy/...``)."""
    return str(policy_cache_path(spec["dataset"], spec["crop_size"], spec["backbone"], spec["levels"],
                                 root=protocol_dir / "policy").resolve())



def _check_protocol(protocol_dir: Path, identity: Mapping[str, Any], cells: Sequence[Cell]) -> None:
    """Refuses a results folder that holds another protocol or other definitions of the same cell names.

    Raises:
        ValueError: names what differs and how to proceed.
    """
    old = read_protocol(protocol_dir)
    if old is None:
        if (protocol_dir / "runs").is_dir() and any((protocol_dir / "runs").iterdir()):
            raise ValueError(f"{protocol_dir / 'runs'} holds runs but no protocol.json: they may belong to another "
                             "protocol; move them away or choose another grid.root")
        return
    diffs = identity_differences(old.get("identity", {}), identity)
    if diffs:
        text = "; ".join(f"{k}: recorded {a!r}, now {b!r}" for k, (a, b) in diffs.items())
        raise ValueError(f"{protocol_dir} holds runs of another protocol ({text}); use the recorded settings, "
                         "or give this protocol another name (grid.protocol=...) or another grid.root")
    recorded = old.get("cells", {})
    for cell in cells:
        rec = recorded.get(cell.name)
        if rec is not None and (list(rec.get("overrides", [])) != list(cell.overrides) or rec.get("mode") != cell.mode):
            raise ValueError(f"cell {cell.name} was recorded in {protocol_dir / 'protocol.json'} as "
                             f"{rec.get('mode')} {rec.get('overrides')}, now {cell.mode} {list(cell.overrides)}; "
                             "give the changed cell a new name (finished runs are never recomputed)")


# ---------------------------------------------------------------------------------------------- stages
def _finished(runs_dir: Path, cell: str, seed: int) -> bool:
    return (runs_dir / f"{cell}_seed{seed}" / "metrics.json").is_file()


def _finished_runs(runs_dir: Path) -> list[str]:
    """Run folders holding results (``<cell>_seed<k>`` with metrics.json)."""
    return sorted(p.parent.name for p in runs_dir.glob("*/metrics.json")) if runs_dir.is_dir() else []


def _set_aside_dead_runs(protocol_dir: Path, names: Iterable[str]) -> None:
    """Moves run folders with neither metrics.json nor last.pth (killed before their first checkpoint) to
    ``stale/``, so that ``existing_run=skip_or_resume`` starts them afresh under their own name."""
    runs = protocol_dir / "runs"
    for name in names:
        d = runs / name
        if d.is_dir() and not (d / "metrics.json").exists() and not (d / "last.pth").exists():
            dest = protocol_dir / "stale" / f"{name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
            dest.parent.mkdir(parents=True, exist_ok=True)
            log.warning("run %s left no checkpoint; moving it to %s and starting it again", d, dest)
            shutil.move(str(d), str(dest))


@dataclass
class _Launcher:
    """Runs ``python -m tokred <command> -m ...`` with the grid's common overrides."""

    grid: Grid
    extra: Sequence[str]
    hydra_overrides: Sequence[str]
    configs_dir: Path
    python: str = sys.executable
    commands: list[str] = field(default_factory=list)

    def __call__(self, command: str, stage: str, args: Sequence[str]) -> int:
        sweep = (self.grid.protocol_dir / "multirun" / stage).resolve()
        argv = [self.python, "-m", "tokred", command, "-m", *self.grid.overrides, *self.grid.execution, *self.extra,
                *self.hydra_overrides, searchpath(self.configs_dir), f"hydra.sweep.dir={hydra_value(str(sweep))}",
                *args]
        text = shlex.join(["python", *argv[1:]])
        self.commands.append(text)
        log.info("ablate %s: %s", stage, text)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        return subprocess.run(argv, env=env, check=False).returncode


def run_grid(grid: Grid, extra_overrides: Sequence[str] = (), hydra_overrides: Sequence[str] = (),
             command: str | None = None, python: str = sys.executable) -> pd.DataFrame:
    """Validates, trains and aggregates a grid (the body of ``tokred ablate``).

    Args:
        grid: the grid.
        extra_overrides: more Hydra overrides for every run (e.g. ``dataset.root=PATH``), applied after the
            grid's; all but dataset.root, device, train.num_workers and train.checkpoint_every become part of
            the protocol.
        hydra_overrides: ``hydra/...`` and ``hydra.*`` overrides for the multiruns (e.g.
            ``hydra/launcher=submitit_slurm``); not used for validation.
        command: the command line to record (default: this function's call).
        python: interpreter of the subprocesses.

    Returns:
        The summary table (see ``summarize``).

    Raises:
        ValueError: an invalid grid, cell, data root or protocol folder, before anything is trained and before
            protocol.json is written; among them a protocol folder whose ``protocol.json`` records other data
            (its data fingerprint differs: the message names each split and whether its file list, images or
            label statistics differ) or, unless ``grid.allow_code_change``, another code version (the message
            names both). See ``tokred.ablations.protocol``.
        RuntimeError: the baseline or a policy failed to train, or cells failed (after the summary of the
            finished ones is written).
    """
    t0 = time.time()
    _check_overrides(grid, extra_overrides)
    protocol_dir = grid.protocol_dir
    runs_dir = protocol_dir / "runs"
    identity = protocol_identity(grid, extra_overrides)
    _check_protocol(protocol_dir, identity, grid.cells)
    baseline = Cell(BASELINE_CELL, (), "baseline", f"unreduced, {grid.baseline_epochs} epochs from scratch")
    all_cells = [baseline, *grid.cells]
    with tempfile.TemporaryDirectory(prefix="tokred-ablate-") as tmp:
        write_cell_configs(Path(tmp), grid, all_cells, runs_dir)
        active, policy_specs, reads = _validate(grid, all_cells, Path(tmp), extra_overrides)
    # what the runs are made from: refused before anything is written when the data or the code differ
    try:
        data = data_fingerprint(reads["dataset"], reads["root"], reads["splits"], FINGERPRINT_CACHE_DIR)
    except OSError as err:  # a listed file vanished or a label cannot be decoded since validation
        raise ValueError(f"the data the grid reads cannot be fingerprinted: {err}") from err
    code = code_version()
    old = read_protocol(protocol_dir)
    for note in check_provenance(old, data, code, grid.allow_code_change, protocol_dir):
        log.info("ablate %s: %s", grid.protocol, note)
    policy_out = {name: _policy_path(protocol_dir, spec) for name, spec in policy_specs.items()}
    log.info("ablate %s: %d cells valid (%s)", grid.protocol, len(active) - 1, ", ".join(c.name for c in active[1:]))

    # record the protocol, then write the cells' experiment files where every worker can read them
    record = _record(grid, identity, active, command, extra_overrides, hydra_overrides)
    record["invocations"][-1]["code"] = code
    stamp_record(record, old, data, code, _finished_runs(runs_dir))
    atomic_write_json(protocol_dir / "protocol.json", record)
    configs_dir = protocol_dir / "configs"
    shutil.rmtree(configs_dir / "experiment" / "ablation", ignore_errors=True)
    write_cell_configs(configs_dir, grid, active, runs_dir, policy_out)

    launch = _Launcher(grid, list(extra_overrides), list(hydra_overrides), configs_dir, python)
    try:
        failures = _run_stages(grid, launch, active, policy_out)
    finally:
        wall = time.time() - t0
        rec = read_protocol(protocol_dir) or record
        rec["invocations"][-1]["wall_seconds"] = wall
        rec["invocations"][-1]["launched"] = launch.commands
        rec["total_wall_seconds"] = float(rec.get("total_wall_seconds", 0.0)) + wall
        attribute_runs(rec, _finished_runs(runs_dir))
        atomic_write_json(protocol_dir / "protocol.json", rec)

    # (d) aggregate
    table = summarize(protocol_dir)
    write_summary(table, protocol_dir)
    if failures:
        raise RuntimeError(f"cells without results: {', '.join(failures)}; their logs are in {runs_dir}; rerun the "
                           "same command to resume them (finished cells are skipped)")
    return table


def _check_overrides(grid: Grid, extra_overrides: Sequence[str]) -> None:
    """Refuses overrides of keys the grid sets per cell, cells that override protocol keys, finetune_overrides
    that are malformed or share a key with the protocol or a fine-tune cell, and a root Hydra overrides cannot
    carry.

    Raises:
        ValueError: names the override and the fix.
    """
    for o in extra_overrides:
        if matches(key_of(o), RESERVED_KEYS) or key_of(o).startswith("grid"):
            raise ValueError(f"override {o!r}: tokred ablate sets {key_of(o)} itself per cell; change the grid "
                             "instead (grid.baseline_epochs, grid.finetune_epochs, grid.seeds, cells)")
    for o in (*grid.overrides, *grid.execution):
        if matches(key_of(o), RESERVED_KEYS):
            raise ValueError(f"grid {grid.name}: override {o!r} sets {key_of(o)}, which the grid sets per cell; "
                             "use baseline_epochs / finetune_epochs / seeds / cells")
    protocol_keys = {key_of(o) for o in (*grid.overrides, *grid.execution, *extra_overrides)}
    check_finetune_overrides(grid.finetune_overrides, grid.cells, f"grid {grid.name}")
    clash = sorted({key_of(o) for o in grid.finetune_overrides} & protocol_keys)
    if clash:
        raise ValueError(f"grid {grid.name}: finetune_overrides set {clash}, which the protocol overrides set for "
                         "every run (baseline included); keep each key in one place")
    for cell in grid.cells:
        clash = sorted({key_of(o) for o in cell.overrides} & protocol_keys)
        if clash:
            raise ValueError(f"cell {cell.name} overrides {clash}, which the protocol sets for every cell; move "
                             "the setting into the protocol or out of the cell")
    root = grid.root.resolve()
    if any(ch in str(root) for ch in "'\"$,"):
        raise ValueError(f"grid.root {root} holds a quote, $ or comma, which Hydra overrides cannot carry; "
                         "choose another folder")


def _record(grid: Grid, identity: Mapping[str, Any], active: Sequence[Cell], command: str | None,
            extra_overrides: Sequence[str], hydra_overrides: Sequence[str]) -> dict[str, Any]:
    """The new protocol.json: the old record plus this invocation (its wall time filled in at the end)."""
    old = read_protocol(grid.protocol_dir) or {}
    cells_rec = dict(old.get("cells", {}))
    for c in active:
        cells_rec[c.name] = {"overrides": list(c.overrides), "mode": c.mode, "budget": c.budget}
    invocation = {"command": command or "tokred.ablations.run_grid", "grid": grid.name,
                  "started_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                  "extra_overrides": list(extra_overrides), "hydra_overrides": list(hydra_overrides),
                  "seeds": list(grid.seeds), "cells": [c.name for c in active], "wall_seconds": None}
    return {"identity": dict(identity), "grid": grid.name, "execution": list(grid.execution),
            "reference": grid.reference,
            "cell_order": list(dict.fromkeys([*old.get("cell_order", []), *(c.name for c in active)])),
            "cells": cells_rec, "invocations": [*old.get("invocations", []), invocation],
            "total_wall_seconds": old.get("total_wall_seconds", 0.0)}


def _run_stages(grid: Grid, launch: _Launcher, active: Sequence[Cell], policy_out: Mapping[str, str]) -> list[str]:
    """The baseline per seed, the shared policy networks, then every other cell in one multirun.

    Returns:
        The ``<cell>_seed<k>`` runs left without metrics.json.

    Raises:
        RuntimeError: the baseline or a policy network failed to train.
    """
    protocol_dir = grid.protocol_dir
    runs_dir = protocol_dir / "runs"
    pending = [s for s in grid.seeds if not _finished(runs_dir, BASELINE_CELL, s)]
    if pending:
        _set_aside_dead_runs(protocol_dir, [f"{BASELINE_CELL}_seed{s}" for s in pending])
        rc = launch("run", "baseline", [f"experiment=ablation/{BASELINE_CELL}",
                                        "seed=" + ",".join(str(s) for s in pending)])
        missing = [s for s in grid.seeds if not _finished(runs_dir, BASELINE_CELL, s)]
        if rc != 0 or missing:
            raise RuntimeError(f"the baseline failed (exit code {rc}; seeds without metrics.json: {missing}); "
                               f"see {runs_dir}/{BASELINE_CELL}_seed*/run.log")
    else:
        log.info("baseline finished for every seed; reusing %s", runs_dir)

    # the policy networks the cells share, trained once per protocol
    todo = [c for c in active[1:] if any(not _finished(runs_dir, c.name, s) for s in grid.seeds)]
    for path in dict.fromkeys(policy_out[c.name] for c in todo if c.name in policy_out):
        if Path(path).exists():
            continue
        first = next(c for c in todo if policy_out.get(c.name) == path)
        rc = launch("train-policy", f"policy_{Path(path).stem}",
                    [f"experiment=ablation/{first.name}", f"seed={grid.seeds[0]}"])
        if rc != 0 or not Path(path).exists():
            raise RuntimeError(f"training the policy network {path} failed (exit code {rc})")

    if not todo:
        log.info("every cell finished; nothing to train")
        return []
    _set_aside_dead_runs(protocol_dir, [f"{c.name}_seed{s}" for c in todo for s in grid.seeds])
    seeds = ",".join(str(s) for s in grid.seeds)
    rc = launch("run", "cells", ["experiment=" + ",".join(f"ablation/{c.name}" for c in todo), f"seed={seeds}"])
    failures = [f"{c.name}_seed{s}" for c in todo for s in grid.seeds if not _finished(runs_dir, c.name, s)]
    return failures if (failures or rc == 0) else [f"(multirun exit code {rc})"]


def ablate_job(cfg: DictConfig) -> pd.DataFrame:
    """``python -m tokred ablate grid=<name> [overrides]``: validate, train and aggregate a grid.

    Overrides ``grid.*`` change the grid (``grid.finetune_epochs=3``, ``grid.root=/tmp/abl``,
    ``grid.seeds=[0,1,2]``); ``hydra/launcher=...`` and ``hydra.launcher.*`` go to the multiruns underneath; any
    other override goes to every run (see ``run_grid``).

    Raises:
        ValueError: no grid given, ``-m`` given, or anything ``run_grid`` refuses before training.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if "grid" not in cfg:
        raise ValueError("tokred ablate needs a grid: python -m tokred ablate grid=camvid_cpu (one of "
                         "configs/grid/*.yaml)")
    task: list[str] = []
    hydra_ov: list[str] = []
    name = ""
    if HydraConfig.initialized():
        hc = HydraConfig.get()
        if hc.mode == RunMode.MULTIRUN:
            raise ValueError("do not pass -m to tokred ablate: it runs its own multirun underneath; give a launcher "
                             "as hydra/launcher=NAME")
        name = str(hc.runtime.choices.get("grid") or "")
        task = [o for o in hc.overrides.task if not key_of(o).split("/")[0].split(".")[0] == "grid"]
        hydra_ov = [o for o in hc.overrides.hydra if not any(key_of(o).startswith(k) for k in _SWEEP_KEYS_DROPPED)]
    grid = Grid.from_mapping(cfg.grid, name=name)
    command = shlex.join(["python", "-m", "tokred", "ablate", *sys.argv[1:]])
    table = run_grid(grid, task, hydra_ov, command=command)
    sys.stdout.write(f"summary: {grid.protocol_dir / 'summary.md'}\n")
    return table
