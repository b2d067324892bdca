"""Grid specs: ``Cell`` and ``Grid`` (from ``configs/grid/<name>.yaml``), override parsing, the generated
per-cell experiment files and the ``protocol.json`` record they are checked against."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from tokred.config import config_dir
from tokred.io import atomic_write

__all__ = ["BASELINE_CELL", "Cell", "EXECUTION_KEYS", "Grid", "OPTIONAL_IDENTITY_KEYS", "RESERVED_KEYS",
           "cell_run_name", "check_finetune_overrides", "hydra_value", "identity_differences", "key_of", "load_grid",
           "matches", "protocol_identity", "read_protocol", "searchpath", "write_cell_configs"]

#: Name of the cell trained from scratch that every other cell starts from.
BASELINE_CELL = "baseline"
_MODES = ("finetune", "off_the_shelf")
_CELL_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")
_PROTOCOL_NAME = re.compile(r"[A-Za-z0-9][\w.+-]*")
#: Keys the grid sets per cell; an extra override of them would break the protocol.
RESERVED_KEYS = ("experiment", "seed", "run_name", "output_dir", "existing_run", "resume", "init_from",
                 "checkpoint", "train.epochs", "policy.out")
#: Extra overrides that change where/how a grid runs but not its results' meaning (not part of the protocol).
EXECUTION_KEYS = ("dataset.root", "device", "train.num_workers", "train.checkpoint_every")


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
        finetune_overrides: Hydra overrides applied to every fine-tune cell (the unreduced ``none`` included),
            not to the baseline nor to off-the-shelf cells: the fine-tune schedule, e.g. ``("train.lr=5.0e-5",
            "train.warmup_iters=0")`` so that a converged baseline is not restarted at the full learning rate.
            Part of the protocol identity (``protocol_identity``; empty = absent, as in records written before
            the key existed).
        seeds: seeds; every cell runs once per seed (fine-tune seed k starts from baseline seed k).
        reference: the fine-tune cell that delta mIoU is measured against (normally ``none``).
        cells: the cells, in table order (the baseline is implicit).
        name: the grid file's name, for the record.
        allow_code_change: let a rerun continue the protocol under another code version (tokred version, git
            commit or dirty flag) than the one ``protocol.json`` records; the change is appended to its
            ``code_history``. Not part of the protocol (``grid.allow_code_change=true`` on the command line).
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
    allow_code_change: bool = False
    finetune_overrides: tuple[str, ...] = ()

    @property
    def protocol_dir(self) -> Path:
        return Path(self.root) / self.protocol

    @classmethod
    def from_mapping(cls, spec: Mapping[str, Any], name: str = "") -> Grid:
        """Builds a grid from the mapping of a ``configs/grid/*.yaml`` file.

        Raises:
            ValueError: a missing or malformed field, a bad cell or protocol name, duplicate or reserved cell
                names, an unknown mode, a ``reference`` that is not a fine-tune cell, an ``allow_code_change``
                that is not a boolean, or ``finetune_overrides`` that are not a list of overrides, hold a sweep or a
                deletion, set a key the grid sets per cell (``RESERVED_KEYS``), select a reducer, or set a key a
                fine-tune cell sets too.
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
        finetune_overrides = _str_tuple(spec.get("finetune_overrides"), f"{where}: finetune_overrides")
        check_finetune_overrides(finetune_overrides, cells, where)
        return cls(protocol=protocol, root=Path(str(spec.get("root", "results/ablations"))),
                   overrides=_str_tuple(spec["overrides"], f"{where}: overrides"),
                   execution=_str_tuple(spec.get("execution"), f"{where}: execution"),
                   baseline_epochs=baseline_epochs, finetune_epochs=finetune_epochs, seeds=seeds,
                   reference=reference, cells=tuple(cells), name=name,
                   allow_code_change=_bool(spec.get("allow_code_change", False), f"{where}: allow_code_change"),
                   finetune_overrides=finetune_overrides)


_REDUCER_KEYS = ("merger", "pruner")


def check_finetune_overrides(overrides: Sequence[str], cells: Sequence[Cell], where: str = "grid") -> None:
    """Refuses ``finetune_overrides`` that cannot apply to every fine-tune cell alike.

    Raises:
        ValueError: an override Hydra cannot parse, a sweep or a deletion; a key the grid sets per cell
            (``RESERVED_KEYS``: ``train.epochs`` is ``finetune_epochs``); a reducer selection or parameter
            (``merger...``/``pruner...``: those belong in the cells); a key that a fine-tune cell overrides too.
    """
    what = f"{where}: finetune_overrides"
    _parse(overrides, what)
    keys = {key_of(o) for o in overrides}
    for key in sorted(keys):
        if matches(key, RESERVED_KEYS):
            raise ValueError(f"{what} sets {key}, which the grid sets per cell; use baseline_epochs / "
                             "finetune_epochs / seeds / cells instead")
        if matches(key, _REDUCER_KEYS):
            raise ValueError(f"{what} sets {key}: reducers and their parameters belong in the cells' overrides; "
                             "finetune_overrides hold the fine-tune schedule (train.lr, train.warmup_iters, ...)")
    for cell in cells:
        clash = sorted(keys & {key_of(o) for o in cell.overrides}) if cell.mode == "finetune" else []
        if clash:
            raise ValueError(f"{where}: cell {cell.name!r} overrides {clash}, which finetune_overrides set for every "
                             "fine-tune cell; remove the key from the cell or from finetune_overrides")


def _str_tuple(value: Any, what: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise ValueError(f"{what} must be a list of Hydra override strings, got {value!r}")
    return tuple(str(v) for v in value)


def _bool(value: Any, what: str) -> bool:
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("true", "false"):
        return str(value).lower() == "true"
    raise ValueError(f"{what} must be true or false, got {value!r}")


def load_grid(name_or_path: str | Path) -> Grid:
    """Reads a grid by name (``configs/grid/<name>.yaml``) or from a YAML file path.

    Raises:
        FileNotFoundError: no such grid; lists the available names.
        ValueError: a malformed grid (see ``Grid.from_mapping``).
    """
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


def key_of(override: str) -> str:
    """The key of an override string without its ``+``/``++``/``~`` prefix (``+a.b=1`` -> ``a.b``)."""
    return override.split("=", 1)[0].lstrip("+~")


def matches(key: str, prefixes: Iterable[str]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


#: Identity keys added after protocols were first recorded: an absent or empty value is left out of the identity,
#: so that records written before the key existed keep their identity.
OPTIONAL_IDENTITY_KEYS = ("finetune_overrides",)


def protocol_identity(grid: Grid, extra: Sequence[str]) -> dict[str, Any]:
    """What two invocations must share to write into the same protocol folder (besides the data fingerprint and
    the code version that ``protocol.json`` records beside it: ``tokred.ablations.protocol``).

    ``finetune_overrides`` joins the identity only when non-empty (``OPTIONAL_IDENTITY_KEYS``), so a grid
    without them has exactly the identity recorded before the key existed."""
    ident: dict[str, Any] = {"protocol": grid.protocol, "overrides": list(grid.overrides),
                             "extra_overrides": [o for o in extra if not matches(key_of(o), EXECUTION_KEYS)],
                             "baseline_epochs": grid.baseline_epochs, "finetune_epochs": grid.finetune_epochs}
    if grid.finetune_overrides:
        ident["finetune_overrides"] = list(grid.finetune_overrides)
    return ident


def identity_differences(recorded: Mapping[str, Any], identity: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{key: (recorded value, new value)}`` for every identity key that differs.

    Compares the keys of ``identity`` plus ``OPTIONAL_IDENTITY_KEYS`` (an optional key recorded but now absent
    differs too); for those, absent and empty are the same value.
    """
    diffs = {}
    for k in dict.fromkeys([*identity, *OPTIONAL_IDENTITY_KEYS]):
        old, new = recorded.get(k), identity.get(k)
        if k in OPTIONAL_IDENTITY_KEYS:
            old, new = old or None, new or None
        if old != new:
            diffs[k] = (old, new)
    return diffs


# ---------------------------------------------------------------------------------------------- cell configs
def cell_run_name(cell: str) -> str:
    """The run directory name of a cell, ``<cell>_seed${seed}`` (Hydra interpolates the seed)."""
    return cell + "_seed${seed}"


_REDUCER_NAME_KEYS = ("merger.name", "pruner.name")


def _cell_config(grid: Grid, cell: Cell, runs_dir: Path, policy_out: str | None = None) -> dict[str, Any]:
    """The generated experiment file of a cell (``# @package _global_``) as a mapping."""
    defaults: list[Any] = []
    body: dict[str, Any] = {}
    conf = OmegaConf.create({})
    for p in _parse(cell.overrides, f"cell {cell.name!r}"):
        if p.is_group:
            defaults.append({f"override /{p.key}": p.value})
        elif p.key in _REDUCER_NAME_KEYS:
            # `pruner.name=X` (the form older grids recorded) selects reducer X like `pruner=X`, so that X's
            # schema (not none's) types the keys that follow
            defaults.append({f"override /{p.key.split('.')[0]}": p.value})
        else:
            OmegaConf.update(conf, p.key, p.value, force_add=True)
    if cell.mode == "finetune":  # the protocol's fine-tune schedule (its keys never clash with the cell's own)
        for p in _parse(grid.finetune_overrides, "finetune_overrides"):
            if p.is_group:
                defaults.append({f"override /{p.key}": p.value})
            else:
                OmegaConf.update(conf, p.key, p.value, force_add=True)
    body.update(OmegaConf.to_container(conf, resolve=False))  # type: ignore[arg-type]
    runs = str(runs_dir.resolve())
    baseline_ckpt = f"{runs}/{cell_run_name(BASELINE_CELL)}/last.pth"
    body.update({"run_name": cell_run_name(cell.name), "output_dir": runs, "existing_run": "skip_or_resume"})
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


def write_cell_configs(configs_dir: Path, grid: Grid, cells: Sequence[Cell], runs_dir: Path,
                        policy_out: Mapping[str, str] | None = None) -> None:
    folder = configs_dir / "experiment" / "ablation"
    folder.mkdir(parents=True, exist_ok=True)
    for cell in cells:
        cfg = _cell_config(grid, cell, runs_dir, (policy_out or {}).get(cell.name))
        header = (f"# @package _global_\n# Generated by `tokred ablate` (grid {grid.name or '?'}, protocol "
                  f"{grid.protocol}), cell {cell.name} ({cell.mode}): {' '.join(cell.overrides) or 'no reducer'}\n")
        atomic_write(folder / f"{cell.name}.yaml", header + OmegaConf.to_yaml(OmegaConf.create(cfg)))


def hydra_value(text: str) -> str:
    """A string as a Hydra override value: bare when Hydra's grammar allows it, else single-quoted."""
    return text if re.fullmatch(r"[\w./:+-]+", text) else f"'{text}'"


def searchpath(configs_dir: Path) -> str:
    return f"hydra.searchpath=[{hydra_value(f'file://{configs_dir.resolve()}')}]"



# ---------------------------------------------------------------------------------------------- protocol.json
def read_protocol(protocol_dir: Path) -> dict[str, Any] | None:
    path = protocol_dir / "protocol.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); restore it or move the folder away") from err
    return data
