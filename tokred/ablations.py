"""Apples-to-apples ablation grids: ``python -m tokred ablate grid=<name> [overrides]``.

A *grid* (``configs/grid/<name>.yaml``) is a protocol plus cells:

* the protocol: a name (``camvid_vit-tiny_384x512``), the Hydra overrides that define it (dataset, backbone,
  crop, measurement settings), ``baseline_epochs``, ``finetune_epochs`` and ``seeds``;
* ``execution`` overrides that say where it runs (data root, device, workers), not part of the protocol;
* cells: a name, the overrides that switch its reducers on, a budget description, a ``mode``
  (``finetune``: trained ``finetune_epochs`` from the baseline checkpoint; ``off_the_shelf``: the baseline
  checkpoint evaluated with the reducer on) and ``optional`` (plugin reducers: skipped with a warning when
  not installed).

The job (methods.md Sec. 8 for the measurement conventions):

1. validates every cell before anything is trained: each cell's configuration is composed and its model
   built; unknown reducers, a missing data root, an off-the-shelf cell whose reducer needs trained parameters,
   or a results folder holding another protocol (``protocol.json``) raise ``ValueError``;
2. trains (or reuses) the unreduced ``baseline`` from scratch, one run per seed;
3. trains the dCTS/CTS policy networks the cells need (once per protocol, shared by the cells);
4. runs every remaining cell through ONE Hydra multirun of ``python -m tokred run`` (``existing_run=
   skip_or_resume``: finished runs are skipped, interrupted ones resume), so a launcher such as
   ``hydra/launcher=submitit_slurm`` runs the same grid on a cluster;
5. aggregates ``summary.csv``, ``summary.md`` and the plots (``summarize``, ``write_summary``).

Each cell becomes a generated experiment file ``<protocol dir>/configs/experiment/ablation/<cell>.yaml``
(``# @package _global_``) holding everything cell-specific (reducers, ``run_name``, epochs, ``init_from``),
so the multirun is a plain ``experiment=ablation/a,ablation/b,...`` sweep and any single cell can be rerun by
hand with ``python -m tokred run hydra.searchpath=[file://<protocol dir>/configs] experiment=ablation/<cell>
<protocol overrides>``.

Layout of ``<root>/<protocol>/``: ``protocol.json`` (protocol, cells, every invocation with its command and
wall time), ``configs/``, ``runs/<cell>_seed<k>/`` (tokred run directories), ``policy/`` (trained policy
networks), ``multirun/<stage>/`` (Hydra sweep folders, launcher logs), ``summary.csv``, ``summary.md``,
``miou_vs_gflops.png``, ``miou_vs_images_per_second.png``, ``tokens_per_block.png``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
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

import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf

__all__ = ["BASELINE_CELL", "Cell", "Grid", "ablate_job", "load_grid", "pareto_front", "plot_summary", "run_grid",
           "summarize", "write_summary"]

log = logging.getLogger(__name__)

#: Name of the cell trained from scratch that every other cell starts from.
BASELINE_CELL = "baseline"
_MODES = ("finetune", "off_the_shelf")
_CELL_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")
_PROTOCOL_NAME = re.compile(r"[A-Za-z0-9][\w.+-]*")
_RUN_DIR = re.compile(r"^(?P<cell>.+?)_seed(?P<seed>\d+)(?:-(?P<dup>\d+))?$")
_POLICY_MERGERS = ("dcts", "cts")
#: Keys the grid sets per cell; an extra override of them would break the protocol.
_RESERVED_KEYS = ("experiment", "seed", "run_name", "output_dir", "existing_run", "resume", "init_from",
                  "checkpoint", "train.epochs", "policy.out")
#: Extra overrides that change where/how a grid runs but not its results' meaning (not part of the protocol).
_EXECUTION_KEYS = ("dataset.root", "device", "train.num_workers", "train.checkpoint_every")
_SWEEP_KEYS_DROPPED = ("hydra.mode", "hydra.run.")


# ---------------------------------------------------------------------------------------------- grid spec
@dataclass(frozen=True)
class Cell:
    """One configuration of a grid.

    Attributes:
        name: cell name (letters, digits, underscores; the run directories are ``<name>_seed<k>``).
        overrides: Hydra overrides that select and parametrise its reducers, e.g. ``("merger=tome",
            "merger.r=8")``; no sweeps.
        mode: ``"finetune"`` (trained from the baseline checkpoint), ``"off_the_shelf"`` (the baseline checkpoint
            evaluated with the reducer on) or ``"baseline"`` (the unreduced model trained from scratch).
        budget: human description of the reduction budget for the tables.
        optional: skip the cell with a warning (instead of failing) when one of its reducers is not installed.
    """

    name: str
    overrides: tuple[str, ...] = ()
    mode: str = "finetune"
    budget: str = ""
    optional: bool = False


@dataclass(frozen=True)
class Grid:
    """A protocol plus cells (see the module docstring).

    Attributes:
        protocol: protocol name, the results folder's name under ``root``.
        root: folder of all protocols (``results/ablations``).
        overrides: Hydra overrides defining the protocol (dataset, model, crop, measurement).
        execution: Hydra overrides that say where it runs (data root, device, workers).
        baseline_epochs: epochs of the baseline trained from scratch (>= 1).
        finetune_epochs: epochs every fine-tune cell trains from the baseline checkpoint (>= 1).
        seeds: seeds; every cell runs once per seed (fine-tune seed k starts from baseline seed k).
        reference: the fine-tune cell that delta mIoU is measured against (normally ``none``).
        cells: the cells, in table order (the baseline is implicit).
        name: the grid file's name, for the record.
    """

    protocol: str
    root: Path
    overrides: tuple[str, ...]
    execution: tuple[str, ...]
    baseline_epochs: int
    finetune_epochs: int
    seeds: tuple[int, ...]
    reference: str
    cells: tuple[Cell, ...]
    name: str = ""

    @property
    def protocol_dir(self) -> Path:
        return Path(self.root) / self.protocol

    @classmethod
    def from_mapping(cls, spec: Mapping[str, Any], name: str = "") -> Grid:
        """Builds a grid from the mapping of a ``configs/grid/*.yaml`` file.

        Raises:
            ValueError: a missing or malformed field, a bad cell or protocol name, duplicate or reserved cell
                names, an unknown mode, or a ``reference`` that is not a fine-tune cell.
        """
        where = f"grid {name!r}" if name else "grid"
        if isinstance(spec, DictConfig):
            spec = OmegaConf.to_container(spec, resolve=False)  # type: ignore[assignment]
        missing = [k for k in ("protocol", "overrides", "cells") if k not in spec]
        if missing:
            raise ValueError(f"{where} lacks {missing}; see configs/grid/camvid_cpu.yaml for the fields")
        protocol = str(spec["protocol"])
        if not _PROTOCOL_NAME.fullmatch(protocol):
            raise ValueError(f"{where}: protocol {protocol!r} must be a folder name (letters, digits, . + - _)")
        cells_spec = spec["cells"]
        if not isinstance(cells_spec, Mapping) or not cells_spec:
            raise ValueError(f"{where}: cells must be a non-empty mapping name -> {{overrides: [...], ...}}")
        cells = []
        for cname, c in cells_spec.items():
            c = dict(c or {})
            unknown = set(c) - {"overrides", "mode", "budget", "optional"}
            if unknown:
                raise ValueError(f"{where}: cell {cname!r} has unknown fields {sorted(unknown)}; valid: overrides, "
                                 "mode, budget, optional")
            cname = str(cname)
            if not _CELL_NAME.fullmatch(cname) or re.search(r"_seed\d+$", cname):
                raise ValueError(f"{where}: cell name {cname!r} must start with a letter, hold only letters, digits "
                                 "and _, and not end in _seed<k>")
            if cname == BASELINE_CELL:
                raise ValueError(f"{where}: the cell name {BASELINE_CELL!r} is reserved for the unreduced model "
                                 "trained from scratch; rename the cell")
            mode = str(c.get("mode", "finetune"))
            if mode not in _MODES:
                raise ValueError(f"{where}: cell {cname!r} has mode {mode!r}; valid: {', '.join(_MODES)}")
            cells.append(Cell(cname, _str_tuple(c.get("overrides"), f"{where}: cell {cname!r} overrides"), mode,
                              str(c.get("budget") or ""), bool(c.get("optional", False))))
        reference = str(spec.get("reference", "none"))
        ref = next((c for c in cells if c.name == reference), None)
        if ref is None or ref.mode != "finetune":
            raise ValueError(f"{where}: reference {reference!r} must name a finetune cell (normally `none`, the "
                             "unreduced model fine-tuned like every cell)")
        seeds = tuple(int(s) for s in spec.get("seeds", [0]))
        if not seeds or len(set(seeds)) != len(seeds):
            raise ValueError(f"{where}: seeds must be a non-empty list of distinct integers, got {list(seeds)}")
        baseline_epochs, finetune_epochs = int(spec.get("baseline_epochs", 10)), int(spec.get("finetune_epochs", 2))
        if baseline_epochs < 1 or finetune_epochs < 1:
            raise ValueError(f"{where}: baseline_epochs ({baseline_epochs}) and finetune_epochs ({finetune_epochs}) "
                             "must be >= 1")
        return cls(protocol=protocol, root=Path(str(spec.get("root", "results/ablations"))),
                   overrides=_str_tuple(spec["overrides"], f"{where}: overrides"),
                   execution=_str_tuple(spec.get("execution"), f"{where}: execution"),
                   baseline_epochs=baseline_epochs, finetune_epochs=finetune_epochs, seeds=seeds,
                   reference=reference, cells=tuple(cells), name=name)


def _str_tuple(value: Any, what: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise ValueError(f"{what} must be a list of Hydra override strings, got {value!r}")
    return tuple(str(v) for v in value)


def load_grid(name_or_path: str | Path) -> Grid:
    """Reads a grid by name (``configs/grid/<name>.yaml``) or from a YAML file path.

    Raises:
        FileNotFoundError: no such grid; lists the available names.
        ValueError: a malformed grid (see ``Grid.from_mapping``).
    """
    from tokred.__main__ import config_dir

    path = Path(name_or_path)
    if not path.suffix:
        path = Path(config_dir()) / "grid" / f"{name_or_path}.yaml"
    if not path.is_file():
        names = sorted(p.stem for p in (Path(config_dir()) / "grid").glob("*.yaml"))
        raise FileNotFoundError(f"grid {name_or_path!r} not found ({path}); available: {', '.join(names)}")
    return Grid.from_mapping(OmegaConf.to_container(OmegaConf.load(path), resolve=False), name=path.stem)


# ---------------------------------------------------------------------------------------------- overrides
@dataclass(frozen=True)
class _Parsed:
    """One parsed override: ``key`` (or config group, without ``+``), whether it selects a group, its value."""

    key: str
    is_group: bool
    value: Any


def _parse(overrides: Sequence[str], what: str) -> list[_Parsed]:
    """Parses Hydra override strings; refuses sweeps and deletions.

    Raises:
        ValueError: an override Hydra cannot parse, a sweep or a deletion (``what`` names the owner).
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import OverrideType
    from hydra.errors import OverrideParseException

    from tokred.__main__ import config_dir

    out = []
    parser = OverridesParser.create()
    for text in overrides:
        try:
            (o,) = parser.parse_overrides([text])
        except OverrideParseException as err:
            raise ValueError(f"{what}: cannot parse override {text!r}: {err}") from err
        if o.is_sweep_override():
            raise ValueError(f"{what}: {text!r} is a sweep; a cell is one configuration, make one cell per value")
        if o.type == OverrideType.DEL:
            raise ValueError(f"{what}: {text!r} deletes a key; set the value instead")
        out.append(_Parsed(o.key_or_group, (Path(config_dir()) / o.key_or_group).is_dir(), o.value()))
    return out


def _key_of(override: str) -> str:
    """The key of an override string without its ``+``/``++``/``~`` prefix (``+a.b=1`` -> ``a.b``)."""
    return override.split("=", 1)[0].lstrip("+~")


def _matches(key: str, prefixes: Iterable[str]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def _protocol_identity(grid: Grid, extra: Sequence[str]) -> dict[str, Any]:
    """What two invocations must share to write into the same protocol folder."""
    return {"protocol": grid.protocol, "overrides": list(grid.overrides),
            "extra_overrides": [o for o in extra if not _matches(_key_of(o), _EXECUTION_KEYS)],
            "baseline_epochs": grid.baseline_epochs, "finetune_epochs": grid.finetune_epochs}


# ---------------------------------------------------------------------------------------------- cell configs
def _run_name(cell: str) -> str:
    return cell + "_seed${seed}"


def _cell_config(grid: Grid, cell: Cell, runs_dir: Path, policy_out: str | None = None) -> dict[str, Any]:
    """The generated experiment file of a cell (``# @package _global_``) as a mapping."""
    defaults: list[Any] = []
    body: dict[str, Any] = {}
    conf = OmegaConf.create({})
    for p in _parse(cell.overrides, f"cell {cell.name!r}"):
        if p.is_group:
            defaults.append({f"override /{p.key}": p.value})
        else:
            OmegaConf.update(conf, p.key, p.value, force_add=True)
    body.update(OmegaConf.to_container(conf, resolve=False))  # type: ignore[arg-type]
    runs = str(runs_dir.resolve())
    baseline_ckpt = f"{runs}/{_run_name(BASELINE_CELL)}/last.pth"
    body.update({"run_name": _run_name(cell.name), "output_dir": runs, "existing_run": "skip_or_resume"})
    train = dict(body.get("train") or {})
    if cell.mode == "baseline":
        train["epochs"] = grid.baseline_epochs
    elif cell.mode == "finetune":
        train["epochs"] = grid.finetune_epochs
        body["init_from"] = baseline_ckpt
    else:  # off the shelf: evaluate the baseline checkpoint, no training
        train["epochs"] = 0
        body["checkpoint"] = baseline_ckpt
    body["train"] = train
    if policy_out is not None:
        body.setdefault("policy", {})["out"] = policy_out
    return {"defaults": [*defaults, "_self_"], **body}


def _write_cell_configs(configs_dir: Path, grid: Grid, cells: Sequence[Cell], runs_dir: Path,
                        policy_out: Mapping[str, str] | None = None) -> None:
    folder = configs_dir / "experiment" / "ablation"
    folder.mkdir(parents=True, exist_ok=True)
    for cell in cells:
        cfg = _cell_config(grid, cell, runs_dir, (policy_out or {}).get(cell.name))
        header = (f"# @package _global_\n# Generated by `tokred ablate` (grid {grid.name or '?'}, protocol "
                  f"{grid.protocol}), cell {cell.name} ({cell.mode}): {' '.join(cell.overrides) or 'no reducer'}\n")
        (folder / f"{cell.name}.yaml").write_text(header + OmegaConf.to_yaml(OmegaConf.create(cfg)))


def _hydra_value(text: str) -> str:
    """A string as a Hydra override value: bare when Hydra's grammar allows it, else single-quoted."""
    return text if re.fullmatch(r"[\w./:+-]+", text) else f"'{text}'"


def _searchpath(configs_dir: Path) -> str:
    return f"hydra.searchpath=[{_hydra_value(f'file://{configs_dir.resolve()}')}]"


# ---------------------------------------------------------------------------------------------- validation
@contextlib.contextmanager
def _composer() -> Iterator[Any]:
    """``compose(overrides) -> DictConfig`` on tokred's configs, inside or outside a running Hydra app."""
    import hydra
    from hydra.core.global_hydra import GlobalHydra

    from tokred.__main__ import config_dir

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


def _validate(grid: Grid, cells: Sequence[Cell], configs_dir: Path, extra: Sequence[str]
              ) -> tuple[list[Cell], dict[str, dict[str, Any]]]:
    """Composes and builds every cell; returns the cells to run and the policy networks they need.

    Returns:
        ``(cells, policies)``: the runnable cells (optional cells with a missing reducer dropped, with a
        warning) and ``{cell name: {"levels", "backbone", "crop_size"}}`` for cells whose dCTS/CTS policy
        network must be trained first.

    Raises:
        ValueError: any cell that cannot run, with the cell's name and the fix.
    """
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from tokred.cli import build_model_from_config
    from tokred.reducers.registry import available_reducers

    registered = available_reducers()
    common = [*grid.overrides, *grid.execution, *extra, _searchpath(configs_dir), f"seed={grid.seeds[0]}"]
    runnable: list[Cell] = []
    policies: dict[str, dict[str, Any]] = {}
    baseline_keys: set[str] | None = None
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
            _check_data(cfg, cell.name)
            try:
                keys = set(build_model_from_config(cfg).state_dict())
            except (ValueError, KeyError, TypeError, ImportError) as err:
                raise ValueError(f"cell {cell.name}: the model cannot be built: {err}") from err
            if cell.mode == "baseline":
                baseline_keys = keys
            elif cell.mode == "off_the_shelf" and baseline_keys is not None and keys - baseline_keys:
                raise ValueError(f"cell {cell.name}: off_the_shelf evaluates the baseline checkpoint, but its reducer "
                                 f"has trained parameters the baseline lacks ({sorted(keys - baseline_keys)[:3]}...); "
                                 "make it a finetune cell")
            m = cfg.merger
            if m.name in _POLICY_MERGERS and m.get("policy") == "cnn" and not m.get("policy_checkpoint"):
                policies[cell.name] = {"levels": list(m.get("levels") or [2]), "backbone": str(m.policy_backbone),
                                       "crop_size": list(cfg.dataset.crop_size)}
            runnable.append(cell)
    return runnable, policies


def _policy_path(protocol_dir: Path, spec: Mapping[str, Any]) -> str:
    h, w = spec["crop_size"]
    levels = "-".join(str(v) for v in spec["levels"])
    return str((protocol_dir / "policy" / f"{spec['backbone']}_{h}x{w}_L{levels}.safetensors").resolve())


# ---------------------------------------------------------------------------------------------- protocol.json
def _read_protocol(protocol_dir: Path) -> dict[str, Any] | None:
    path = protocol_dir / "protocol.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); restore it or move the folder away") from err
    return data


def _check_protocol(protocol_dir: Path, identity: Mapping[str, Any], cells: Sequence[Cell]) -> None:
    """Refuses a results folder that holds another protocol or other definitions of the same cell names.

    Raises:
        ValueError: names what differs and how to proceed.
    """
    old = _read_protocol(protocol_dir)
    if old is None:
        if (protocol_dir / "runs").is_dir() and any((protocol_dir / "runs").iterdir()):
            raise ValueError(f"{protocol_dir / 'runs'} holds runs but no protocol.json: they may belong to another "
                             "protocol; move them away or choose another grid.root")
        return
    diffs = {k: (old.get("identity", {}).get(k), v) for k, v in identity.items()
             if old.get("identity", {}).get(k) != v}
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


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    """Atomic write (temporary file in the same folder, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(json.dumps(dict(data), indent=2, default=str) + "\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------- stages
def _finished(runs_dir: Path, cell: str, seed: int) -> bool:
    return (runs_dir / f"{cell}_seed{seed}" / "metrics.json").is_file()


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
                *self.hydra_overrides, _searchpath(self.configs_dir), f"hydra.sweep.dir={_hydra_value(str(sweep))}",
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
        ValueError: an invalid grid, cell, data root or protocol folder, before anything is trained.
        RuntimeError: the baseline or a policy failed to train, or cells failed (after the summary of the
            finished ones is written).
    """
    t0 = time.time()
    for o in extra_overrides:
        if _matches(_key_of(o), _RESERVED_KEYS) or _key_of(o).startswith("grid"):
            raise ValueError(f"override {o!r}: tokred ablate sets {_key_of(o)} itself per cell; change the grid "
                             "instead (grid.baseline_epochs, grid.finetune_epochs, grid.seeds, cells)")
    for o in (*grid.overrides, *grid.execution):
        if _matches(_key_of(o), _RESERVED_KEYS):
            raise ValueError(f"grid {grid.name}: override {o!r} sets {_key_of(o)}, which the grid sets per cell; "
                             "use baseline_epochs / finetune_epochs / seeds / cells")
    protocol_keys = {_key_of(o) for o in (*grid.overrides, *grid.execution, *extra_overrides)}
    for cell in grid.cells:
        clash = sorted({_key_of(o) for o in cell.overrides} & protocol_keys)
        if clash:
            raise ValueError(f"cell {cell.name} overrides {clash}, which the protocol sets for every cell; move "
                             "the setting into the protocol or out of the cell")
    for p in (grid.root.resolve(),):
        if any(ch in str(p) for ch in "'\"$,"):
            raise ValueError(f"grid.root {p} holds a quote, $ or comma, which Hydra overrides cannot carry; "
                             "choose another folder")
    protocol_dir = grid.protocol_dir
    runs_dir = protocol_dir / "runs"
    identity = _protocol_identity(grid, extra_overrides)
    _check_protocol(protocol_dir, identity, grid.cells)
    baseline = Cell(BASELINE_CELL, (), "baseline", f"unreduced, {grid.baseline_epochs} epochs from scratch")
    all_cells = [baseline, *grid.cells]
    with tempfile.TemporaryDirectory(prefix="tokred-ablate-") as tmp:
        _write_cell_configs(Path(tmp), grid, all_cells, runs_dir)
        active, policy_specs = _validate(grid, all_cells, Path(tmp), extra_overrides)
    policy_out = {name: _policy_path(protocol_dir, spec) for name, spec in policy_specs.items()}
    log.info("ablate %s: %d cells valid (%s)", grid.protocol, len(active) - 1, ", ".join(c.name for c in active[1:]))

    # record the protocol, then write the cells' experiment files where every worker can read them
    old = _read_protocol(protocol_dir) or {}
    cells_rec = dict(old.get("cells", {}))
    for c in active:
        cells_rec[c.name] = {"overrides": list(c.overrides), "mode": c.mode, "budget": c.budget}
    invocation = {"command": command or "tokred.ablations.run_grid", "grid": grid.name,
                  "started_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                  "extra_overrides": list(extra_overrides), "hydra_overrides": list(hydra_overrides),
                  "seeds": list(grid.seeds), "cells": [c.name for c in active], "wall_seconds": None}
    record = {"identity": identity, "grid": grid.name, "execution": list(grid.execution), "reference": grid.reference,
              "cell_order": list(dict.fromkeys([*old.get("cell_order", []), *(c.name for c in active)])),
              "cells": cells_rec, "invocations": [*old.get("invocations", []), invocation],
              "total_wall_seconds": old.get("total_wall_seconds", 0.0)}
    _write_json(protocol_dir / "protocol.json", record)
    configs_dir = protocol_dir / "configs"
    shutil.rmtree(configs_dir / "experiment" / "ablation", ignore_errors=True)
    _write_cell_configs(configs_dir, grid, active, runs_dir, policy_out)

    launch = _Launcher(grid, list(extra_overrides), list(hydra_overrides), configs_dir, python)
    seeds = ",".join(str(s) for s in grid.seeds)
    failures: list[str] = []
    try:
        # (b) the baseline, one run per seed
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

        # (b') the policy networks the dCTS/CTS cells share, trained once per protocol
        todo = [c for c in active[1:] if any(not _finished(runs_dir, c.name, s) for s in grid.seeds)]
        for path in dict.fromkeys(policy_out[c.name] for c in todo if c.name in policy_out):
            if Path(path).exists():
                continue
            first = next(c for c in todo if policy_out.get(c.name) == path)
            rc = launch("train-policy", f"policy_{Path(path).stem}",
                        [f"experiment=ablation/{first.name}", f"seed={grid.seeds[0]}"])
            if rc != 0 or not Path(path).exists():
                raise RuntimeError(f"training the policy network {path} failed (exit code {rc})")

        # (c) every other cell: one multirun
        if todo:
            _set_aside_dead_runs(protocol_dir, [f"{c.name}_seed{s}" for c in todo for s in grid.seeds])
            rc = launch("run", "cells", ["experiment=" + ",".join(f"ablation/{c.name}" for c in todo), f"seed={seeds}"])
            failures = [f"{c.name}_seed{s}" for c in todo for s in grid.seeds if not _finished(runs_dir, c.name, s)]
            if rc != 0 and not failures:
                failures = [f"(multirun exit code {rc})"]
        else:
            log.info("every cell finished; nothing to train")
    finally:
        wall = time.time() - t0
        rec = _read_protocol(protocol_dir) or record
        rec["invocations"][-1]["wall_seconds"] = wall
        rec["invocations"][-1]["launched"] = launch.commands
        rec["total_wall_seconds"] = float(rec.get("total_wall_seconds", 0.0)) + wall
        _write_json(protocol_dir / "protocol.json", rec)

    # (d) aggregate
    table = summarize(protocol_dir)
    write_summary(table, protocol_dir)
    if failures:
        raise RuntimeError(f"cells without results: {', '.join(failures)}; their logs are in {runs_dir}; rerun the "
                           "same command to resume them (finished cells are skipped)")
    return table


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
        task = [o for o in hc.overrides.task if not _key_of(o).split("/")[0].split(".")[0] == "grid"]
        hydra_ov = [o for o in hc.overrides.hydra if not any(_key_of(o).startswith(k) for k in _SWEEP_KEYS_DROPPED)]
    grid = Grid.from_mapping(cfg.grid, name=name)
    command = shlex.join(["python", "-m", "tokred", "ablate", *sys.argv[1:]])
    table = run_grid(grid, task, hydra_ov, command=command)
    sys.stdout.write(f"summary: {grid.protocol_dir / 'summary.md'}\n")
    return table


# ---------------------------------------------------------------------------------------------- aggregation
_NUMERIC = ("miou", "gflops", "gflops_ratio", "images_per_second", "speedup", "efficiency", "token_reduction",
            "halted_fraction", "batch_size", "train_seconds")
#: summary.csv columns, in order.
SUMMARY_COLUMNS = ("cell", "method", "mode", "budget", "miou_pct", "miou_spread_pct", "delta_miou_pct", "gflops",
                   "gflops_ratio", "images_per_second", "speedup", "efficiency", "token_reduction", "halted_fraction",
                   "device", "precision", "batch_size", "seeds", "num_seeds", "train_seconds", "pareto_gflops",
                   "pareto_images_per_second", "tokens_per_block")


def pareto_front(cost: Sequence[float], quality: Sequence[float], lower_cost_is_better: bool = True) -> np.ndarray:
    """Which points are Pareto-optimal (no other point is at least as good on both axes and better on one).

    Args:
        cost: ``[M]`` cost per point (GFLOPs: lower is better; im/s: pass ``lower_cost_is_better=False``).
        quality: ``[M]`` quality per point (mIoU, higher is better).
        lower_cost_is_better: direction of the first axis.

    Returns:
        ``[M]`` bool mask; points with a NaN coordinate are never on the front.
    """
    c = np.asarray(cost, dtype=float) * (1.0 if lower_cost_is_better else -1.0)  # [M], lower is better
    q = np.asarray(quality, dtype=float)  # [M], higher is better
    ok = np.isfinite(c) & np.isfinite(q)
    # dominated[i]: some j with c_j <= c_i, q_j >= q_i and one strict
    le = (c[None, :] <= c[:, None]) & (q[None, :] >= q[:, None])  # [M_i, M_j]
    strict = (c[None, :] < c[:, None]) | (q[None, :] > q[:, None])
    dominated = (le & strict & ok[None, :]).any(1)
    return ok & ~dominated


def _cell_and_seed(run_dir: str) -> tuple[str, int | None, int]:
    name = Path(run_dir).name
    m = _RUN_DIR.match(name)
    if m is None:
        return name, None, 0
    return m["cell"], int(m["seed"]), int(m["dup"] or 0)


def _column(df: pd.DataFrame, name: str) -> pd.Series:
    return df[name] if name in df.columns else pd.Series([None] * len(df), index=df.index, dtype=object)


def _join(values: Iterable[Any]) -> str:
    keep = (v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v)))
    return ", ".join(dict.fromkeys(str(v) for v in keep))


def summarize(protocol_dir: str | Path) -> pd.DataFrame:
    """One row per cell from the runs of a protocol folder: medians over seeds and the comparisons.

    Reads ``<protocol_dir>/runs/<cell>_seed<k>/metrics.json`` (``tokred.results.load_results``) and, when
    present, ``protocol.json`` (cell modes, budgets, order, reference cell). Numbers are medians over seeds;
    ``miou_spread_pct`` is max - min over seeds (0 with one seed). ``delta_miou_pct`` is in percentage points
    against the reference cell (``none``). Pareto membership (mIoU vs GFLOPs, lower is better; mIoU vs im/s,
    higher is better) is computed over the fine-tune cells only, so that every point on a front saw the same
    training steps; the baseline and off-the-shelf rows are shown but never on a front.

    Args:
        protocol_dir: ``<root>/<protocol>``.

    Returns:
        A DataFrame with ``SUMMARY_COLUMNS`` (``tokens_per_block`` holds the per-block mean live tokens, median
        over seeds, a list).

    Raises:
        FileNotFoundError: no metrics.json under ``<protocol_dir>/runs``.
    """
    from tokred.results import load_results

    protocol_dir = Path(protocol_dir)
    proto = _read_protocol(protocol_dir) or {}
    cells_rec: dict[str, Any] = proto.get("cells", {})
    reference = proto.get("reference", "none")
    raw = load_results(protocol_dir / "runs")
    parsed = [_cell_and_seed(d) for d in raw["run_dir"]]
    raw["cell"] = [p[0] for p in parsed]
    raw["_dup"] = [p[2] for p in parsed]
    seed_col = _column(raw, "seed")
    raw["seed"] = [p[1] if p[1] is not None else s for p, s in zip(parsed, seed_col)]
    dups = raw.duplicated(["cell", "seed"], keep=False)
    if dups.any():
        log.warning("several finished runs for %s; keeping the latest of each",
                    sorted(set(map(tuple, raw.loc[dups, ["cell", "seed"]].astype(str).values.tolist()))))
        raw = raw.sort_values("_dup").drop_duplicates(["cell", "seed"], keep="last")
    if "method" not in raw.columns:
        raw["method"] = [
            "+".join(n for n in (m, p) if n and n != "none") or "none"
            for m, p in zip(_column(raw, "merger.name"), _column(raw, "pruner.name"))]
    for k in _NUMERIC:
        raw[k] = pd.to_numeric(_column(raw, k), errors="coerce")
    rows = []
    for cell, g in raw.groupby("cell", sort=False):
        rec = cells_rec.get(cell, {})
        mode = rec.get("mode") or ("baseline" if cell == BASELINE_CELL else "finetune")
        miou = 100.0 * g["miou"]
        tpb = [t for t in _column(g, "tokens_per_block") if isinstance(t, list) and t]
        depth = min((len(t) for t in tpb), default=0)
        rows.append({
            "cell": cell, "method": _join(g["method"]), "mode": mode, "budget": rec.get("budget", ""),
            "miou_pct": miou.median(),
            "miou_spread_pct": float(miou.max() - miou.min()) if miou.notna().any() else np.nan,
            **{k: g[k].median() for k in ("gflops", "gflops_ratio", "images_per_second", "speedup", "efficiency",
                                         "token_reduction", "halted_fraction", "batch_size")},
            "device": _join(_column(g, "device")), "precision": _join(_column(g, "precision")),
            "seeds": ",".join(str(s) for s in sorted(s for s in g["seed"] if s is not None)),
            "num_seeds": len(g), "train_seconds": g["train_seconds"].sum(min_count=1),
            "tokens_per_block": np.median(np.array([t[:depth] for t in tpb], dtype=float), 0).tolist() if tpb else None,
        })
    table = pd.DataFrame(rows)
    order = [BASELINE_CELL, *proto.get("cell_order", [])]
    rank = {c: i for i, c in enumerate(dict.fromkeys(order))}
    table["_rank"] = [rank.get(c, len(rank)) for c in table["cell"]]
    table = table.sort_values(["_rank", "cell"], kind="stable").drop(columns="_rank").reset_index(drop=True)
    ref = table.loc[table["cell"] == reference, "miou_pct"]
    if ref.empty:
        log.warning("reference cell %r has no finished run; delta mIoU is left empty", reference)
        table["delta_miou_pct"] = np.nan
    else:
        table["delta_miou_pct"] = table["miou_pct"] - float(ref.iloc[0])
    ft = (table["mode"] == "finetune").to_numpy()
    for name, col, lower in (("pareto_gflops", "gflops", True),
                             ("pareto_images_per_second", "images_per_second", False)):
        mask = np.zeros(len(table), dtype=bool)
        if ft.any():
            mask[ft] = pareto_front(table.loc[ft, col], table.loc[ft, "miou_pct"], lower_cost_is_better=lower)
        table[name] = mask
    return table[list(SUMMARY_COLUMNS)]


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, (bool, np.bool_)):
        return "yes" if v else ""
    if isinstance(v, (float, np.floating)):
        return f"{v:.{digits}g}" if abs(v) >= 1 or v == 0 else f"{v:.3f}"
    return str(v)


def _pp(v: Any, signed: bool = False) -> str:
    """Percent / percentage points with two decimals."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:+.2f}" if signed else f"{v:.2f}"


def _hours(seconds: float | None) -> str:
    if seconds is None or (isinstance(seconds, float) and math.isnan(seconds)):
        return "-"
    return f"{seconds / 3600:.2f} h ({seconds:.0f} s)"


def write_summary(table: pd.DataFrame, protocol_dir: str | Path) -> dict[str, Path]:
    """Writes ``summary.csv``, ``summary.md`` and the plots next to them.

    Args:
        table: ``summarize(protocol_dir)``.
        protocol_dir: ``<root>/<protocol>``.

    Returns:
        ``{"csv", "md", "miou_vs_gflops", "miou_vs_images_per_second", "tokens_per_block"}`` -> path.
    """
    from tabulate import tabulate

    protocol_dir = Path(protocol_dir)
    proto = _read_protocol(protocol_dir) or {}
    out = {"csv": protocol_dir / "summary.csv", "md": protocol_dir / "summary.md"}
    csv = table.copy()
    csv["tokens_per_block"] = [json.dumps([round(v, 2) for v in t]) if isinstance(t, list) else "" for t in
                               csv["tokens_per_block"]]
    csv.to_csv(out["csv"], index=False, float_format="%.6g")
    out.update(plot_summary(table, protocol_dir, title=protocol_dir.name))

    runs = protocol_dir / "runs"
    hw = _hardware(runs)
    ident = proto.get("identity", {})
    invocations = proto.get("invocations", [])
    headers = ["cell", "method", "mode", "budget", "mIoU (%)", "±", "Δ mIoU (pp)", "GFLOPs", "GFLOPs ratio", "im/s",
               "speedup", "efficiency", "token red.", "halted", "device", "prec.", "batch", "seeds", "front"]
    rows = []
    for r in table.itertuples(index=False):
        front = "".join(s for s, on in (("G", r.pareto_gflops), ("S", r.pareto_images_per_second)) if on)
        rows.append([r.cell, r.method, r.mode, r.budget, _pp(r.miou_pct), _pp(r.miou_spread_pct),
                     _pp(r.delta_miou_pct, signed=True), _fmt(r.gflops), _fmt(r.gflops_ratio),
                     _fmt(r.images_per_second),
                     _fmt(r.speedup), _fmt(r.efficiency), _fmt(r.token_reduction), _fmt(r.halted_fraction),
                     r.device, r.precision, _fmt(r.batch_size), r.seeds, front])
    lines = [f"# Ablation grid `{protocol_dir.name}`", ""]
    if ident:
        lines += [f"Protocol overrides: `{' '.join(ident.get('overrides', []) + ident.get('extra_overrides', []))}`. "
                  f"The unreduced `baseline` trains {ident.get('baseline_epochs')} epochs from scratch; every "
                  f"finetune cell (the unreduced `none` included) trains {ident.get('finetune_epochs')} more epochs "
                  "from the baseline checkpoint (`init_from`, reducer parameters from their init), so they all see "
                  "the same steps; off_the_shelf cells evaluate the baseline checkpoint with the reducer on.", ""]
    if invocations:
        lines += ["Commands (from protocol.json):", ""]
        lines += [f"- `{inv.get('command')}` ({inv.get('started_utc')}, {_hours(inv.get('wall_seconds'))})"
                  for inv in invocations]
        lines += [""]
    train_total = table["train_seconds"].sum(min_count=1)
    lines += [f"Hardware: {hw}.", "",
              f"Wall time: training {_hours(train_total)} summed over runs (metrics.json train_seconds); "
              f"all `tokred ablate` invocations {_hours(proto.get('total_wall_seconds'))} (protocol.json).", "",
              tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True), "",
              "mIoU and im/s are medians over seeds (± = max - min over seeds). Δ mIoU is against the "
              f"`{proto.get('reference', 'none')}` cell. GFLOPs per image (fvcore, one multiply-add = one flop, mean "
              "over eval images); GFLOPs ratio = unreduced / this; speedup = im/s over the unreduced model measured "
              "side by side in the same process; efficiency = speedup / GFLOPs ratio; token red. = N0 / tokens "
              "entering block 1; halted = fraction of tokens that left before the last block. front: on the Pareto "
              "front of mIoU vs GFLOPs (G) or vs im/s (S), over finetune cells.", "",
              "![mIoU vs GFLOPs](miou_vs_gflops.png)", "", "![mIoU vs im/s](miou_vs_images_per_second.png)", "",
              "![tokens per block](tokens_per_block.png)", ""]
    out["md"].write_text("\n".join(lines))
    return out


def _hardware(runs: Path) -> str:
    """Devices, precision and versions the runs report (from their metrics.json provenance)."""
    from tokred.results import load_results

    try:
        df = load_results(runs)
    except FileNotFoundError:
        return "-"
    parts = []
    for col, label in (("provenance.gpu_name", "GPU"), ("provenance.cpu_name", "CPU"), ("device", "measured on"),
                       ("versions.torch", "torch"), ("provenance.hostname", "host")):
        v = _join(_column(df, col))
        if v:
            parts.append(f"{label} {v}")
    return "; ".join(parts) or "-"


# ---------------------------------------------------------------------------------------------- plots
_FAMILY_COLORS = {"none": "#555555", "tome": "#1f77b4", "cts": "#2ca02c", "dcts": "#17becf", "early_exit": "#d62728",
                  "cropr": "#ff7f0e"}


def _family_colors(methods: Iterable[str]) -> dict[str, Any]:
    """A distinct colour per method: fixed ones for the built-ins, unused tab10/tab20 colours for the rest."""
    import matplotlib
    from matplotlib.colors import to_hex

    spare = [to_hex(c) for c in (*matplotlib.colormaps["tab10"].colors, *matplotlib.colormaps["tab20"].colors)]
    spare = [c for c in dict.fromkeys(spare) if c not in _FAMILY_COLORS.values()
             and len({c[1:3], c[3:5], c[5:7]}) > 1]  # no greys
    out: dict[str, Any] = {}
    for m in dict.fromkeys(methods):
        out[m] = _FAMILY_COLORS.get(m) or spare[len([k for k in out if k not in _FAMILY_COLORS]) % len(spare)]
    return out


def _label_offsets() -> list[tuple[float, float]]:
    """Candidate label offsets (points): 8 directions at growing distances, nearest first."""
    out = []
    for radius in (9.0, 15.0, 24.0, 36.0, 50.0):
        for k in range(16):
            a = math.radians(22.5 * k + 11.25)
            out.append((round(radius * math.cos(a), 1), round(radius * math.sin(a), 1)))
    return out


def _anchor(dx: float, dy: float) -> tuple[str, str]:
    """Text alignment that puts a label on the side of its point given by the offset direction."""
    r = math.hypot(dx, dy) or 1.0
    ha = "left" if dx / r > 0.35 else ("right" if dx / r < -0.35 else "center")
    va = "bottom" if dy / r > 0.35 else ("top" if dy / r < -0.35 else "center")
    return ha, va


def _place_labels(ax: Any, xs: Sequence[float], ys: Sequence[float], labels: Sequence[str]) -> None:
    """Labels points without overlaps.

    Greedy: each label (crowded points first) takes the candidate offset of least cost, where the cost counts
    overlap with labels already placed, with every point's marker, crossings of leader lines already drawn,
    leaving the axes, and (a little) the distance; a leader line joins labels set away from their point.
    """
    fig = ax.figure
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    pts = ax.transData.transform(np.column_stack([xs, ys]))  # [M, 2] display px
    axbox = ax.get_window_extent(renderer)
    px_per_pt = fig.dpi / 72.0
    marker = 6.0 * px_per_pt  # half-size of a marker's box, px
    boxes: list[Any] = []
    leaders: list[tuple[np.ndarray, np.ndarray]] = []
    dist = np.linalg.norm(pts[:, None] - pts[None], axis=-1)  # [M, M]
    order = np.argsort(-(dist < 60 * px_per_pt).sum(1), kind="stable")  # crowded points first
    for i in order:
        best, best_cost = (9.0, 0.0), math.inf
        for dx, dy in _label_offsets():
            ha, va = _anchor(dx, dy)
            t = ax.annotate(labels[i], (xs[i], ys[i]), xytext=(dx, dy), textcoords="offset points", fontsize=7,
                            ha=ha, va=va)
            bb = t.get_window_extent(renderer).expanded(1.04, 1.2)
            t.remove()
            cost = sum(_overlap(bb, b) for b in boxes)
            cost += sum(_overlap_xy(bb, px - marker, py - marker, px + marker, py + marker) for px, py in pts) * 2.0
            for a, b in leaders:
                seg = a[None] + np.linspace(0, 1, 12)[:, None] * (b - a)[None]  # [12, 2] px
                cost += 200.0 * float(((seg[:, 0] > bb.x0) & (seg[:, 0] < bb.x1) & (seg[:, 1] > bb.y0)
                                       & (seg[:, 1] < bb.y1)).any())
            if not (bb.x0 >= axbox.x0 and bb.x1 <= axbox.x1 and bb.y0 >= axbox.y0 and bb.y1 <= axbox.y1):
                cost += 1e6
            cost += math.hypot(dx, dy) * px_per_pt * 1.5
            if cost < best_cost:
                best, best_cost = (dx, dy), cost
        dx, dy = best
        far = math.hypot(dx, dy) > 10
        ha, va = _anchor(dx, dy)
        t = ax.annotate(labels[i], (xs[i], ys[i]), xytext=(dx, dy), textcoords="offset points", fontsize=7, ha=ha,
                        va=va, arrowprops={"arrowstyle": "-", "lw": 0.5, "color": "0.55", "shrinkA": 1,
                                           "shrinkB": 3} if far else None)
        boxes.append(t.get_window_extent(renderer).expanded(1.04, 1.2))
        if far:
            leaders.append((pts[i], pts[i] + np.array([dx, dy]) * px_per_pt))


def _overlap_xy(a: Any, x0: float, y0: float, x1: float, y1: float) -> float:
    w = min(a.x1, x1) - max(a.x0, x0)
    h = min(a.y1, y1) - max(a.y0, y0)
    return max(w, 0.0) * max(h, 0.0)


def _overlap(a: Any, b: Any) -> float:
    return _overlap_xy(a, b.x0, b.y0, b.x1, b.y1)


def _scatter(table: pd.DataFrame, col: str, front_col: str, xlabel: str, title: str, lower_is_better: bool) -> Any:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.0, 5.6), dpi=130)
    t = table[np.isfinite(table[col].astype(float)) & np.isfinite(table["miou_pct"].astype(float))]
    colors = _family_colors(t["method"])
    for fam in colors:
        for mode, marker, filled in (("finetune", "o", True), ("off_the_shelf", "s", False), ("baseline", "D", False)):
            s = t[(t["method"] == fam) & (t["mode"] == mode)]
            if s.empty:
                continue
            c = colors[fam]
            ax.scatter(s[col], s["miou_pct"], marker=marker, s=36, zorder=3, edgecolors=c,
                       facecolors=c if filled else "none", linewidths=1.2,
                       label=fam if mode == "finetune" else f"{fam} ({mode.replace('_', ' ')})")
            if (s["miou_spread_pct"] > 0).any():
                ax.errorbar(s[col], s["miou_pct"], yerr=s["miou_spread_pct"] / 2, fmt="none", ecolor=c, lw=0.8)
    f = t[t[front_col]].sort_values(col)
    if len(f):
        ax.step(f[col], f["miou_pct"], where="post" if lower_is_better else "pre", color="k", lw=1.0, alpha=0.6,
                zorder=2, label="Pareto front (finetune cells)")
        ax.scatter(f[col], f["miou_pct"], s=140, facecolors="none", edgecolors="k", linewidths=1.0, zorder=4)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("mIoU (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if len(t):
        xs, ys = t[col].astype(float).to_numpy(), t["miou_pct"].astype(float).to_numpy()
        xr = (xs.max() - xs.min()) or max(abs(xs.max()), 1e-9) * 0.1
        yr = (ys.max() - ys.min()) or 1.0
        ax.set_xlim(xs.min() - 0.3 * xr, xs.max() + 0.3 * xr)
        ax.set_ylim(ys.min() - 0.2 * yr, ys.max() + 0.25 * yr)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    if len(t):
        _place_labels(ax, t[col].astype(float).tolist(), t["miou_pct"].astype(float).tolist(), t["cell"].tolist())
    return fig


def plot_summary(table: pd.DataFrame, out_dir: str | Path, title: str = "") -> dict[str, Path]:
    """Draws mIoU vs GFLOPs and mIoU vs im/s (Pareto fronts highlighted, points labelled) and the live tokens
    entering each block per cell, as PNG files in ``out_dir``.

    Args:
        table: ``summarize`` output.
        out_dir: folder of the PNG files.
        title: prefix of the plot titles (the protocol).

    Returns:
        ``{"miou_vs_gflops", "miou_vs_images_per_second", "tokens_per_block"}`` -> path.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for key, col, front, xlabel, lower in (
            ("miou_vs_gflops", "gflops", "pareto_gflops", "GFLOPs per image (fvcore)", True),
            ("miou_vs_images_per_second", "images_per_second", "pareto_images_per_second", "im/s", False)):
        fig = _scatter(table, col, front, xlabel, f"{title}: mIoU vs {xlabel.split(' ')[0]}", lower)
        paths[key] = out_dir / f"{key}.png"
        fig.savefig(paths[key])
        plt.close(fig)

    fig, ax = plt.subplots(figsize=(8.0, 4.8), dpi=130)
    colors = _family_colors(table["method"])
    styles = ("-", "--", "-.", ":")
    variant: dict[str, int] = {}
    top = 0.0
    for r in table.itertuples(index=False):
        tpb = r.tokens_per_block
        if not isinstance(tpb, list) or not tpb:
            continue
        top = max(top, max(tpb))
        blocks = np.arange(1, len(tpb) + 1)
        if r.mode == "baseline":
            ax.plot(blocks, tpb, color="0.35", lw=3.0, alpha=0.5, label=r.cell, zorder=1)
            continue
        k = variant.get(r.method, 0)
        variant[r.method] = k + 1
        off = r.mode != "finetune"
        ax.plot(blocks, tpb, color=colors[r.method], lw=1.0 if off else 1.5, ls=styles[k % len(styles)],
                marker="s" if off else "o", ms=2.5, label=f"{r.cell} (off the shelf)" if off else r.cell, zorder=2)
    ax.set_ylim(0, top * 1.06 if top else 1)
    depth = max((len(t) for t in table["tokens_per_block"] if isinstance(t, list)), default=0)
    if depth:
        ax.set_xticks(np.arange(1, depth + 1))
    ax.set_xlabel("block (1-based)")
    ax.set_ylabel("live patch tokens entering the block\n(mean over eval images)")
    ax.set_title(f"{title}: tokens per block", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    paths["tokens_per_block"] = out_dir / "tokens_per_block.png"
    fig.savefig(paths["tokens_per_block"])
    plt.close(fig)
    return paths
