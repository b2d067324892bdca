"""Training-free sweeps on a grid's trained models: ``python -m tokred sweep grid=<name> [sweep.*] [eval.*]``.

Each sweep takes one trained run of the protocol folder (``<root>/<protocol>/runs/<cell>_seed<k>/``: its
``config.yaml`` and checkpoint, ``last.pth``, or for an off-the-shelf cell the baseline checkpoint it names) and
evaluates it once per value of one reducer parameter, set on the built model for that pass (``set_attribute``
of ``tokred.analysis.sweeps``), without retraining:

* ``tome_r``: ToMe ``r`` (tokens merged away per block, constant schedule) switched on in the unreduced model
  of the fine-tuned ``none`` cell (else the ``baseline``): ToMe has no parameters;
* ``dcts_tau``: the dCTS threshold ``tau`` (one value at every level) of a ``dcts`` cell;
* ``early_exit_p0``: the early-exit confidence threshold ``p0`` of an ``early_exit`` cell;
* ``cropr_r``: Token Cropr's ``r`` (tokens pruned per module, constant schedule) of a ``cropr`` cell (its scorer
  was learned at the cell's own ``r``).

Every point is measured exactly as a grid cell's ``metrics.json`` is (``tokred.jobs.run``'s evaluation with
``eval.bench=false``): mIoU on ``eval.split`` (``eval.max_items``) under the run's test pipeline, token
accounting over those forwards, and fvcore GFLOPs per image (``count_gflops`` on ``eval.flops_images`` images
spread over the split, next to the unreduced model's); so the value a cell was trained at reproduces that
cell's row of ``summary.csv``.

Default cells: the first finished cell of the family in the grid's order (``protocol.json``), seeds: the
lowest finished seed; ``sweep.cells.<sweep>=CELL`` and ``sweep.seeds=[...]`` choose others. A sweep whose cell
has no finished run is skipped with a logged line; when no sweep can run, nothing is written.

Output, ``<protocol dir>/sweeps/``: ``sweeps.csv`` (``SWEEP_COLUMNS``, one row per sweep, cell, seed and value)
and ``pareto_sweeps.png`` (``tokred.ablations.sweep_plots``: every row of the folder evaluated as this call's
were, seeds of earlier calls included, ``plot_rows``; one curve per sweep and cell, the median over its seeds).
Never overwritten: a rerun on the same checkpoints resumes the folder row by row (rows whose key, ``ROW_KEY``, is
in ``sweeps.csv`` are not evaluated again; new values, seeds or eval settings add rows); when a checkpoint of a
cell and seed in the folder has changed (sha256), the results go to a new folder, ``sweeps-2``, ``sweeps-3``, ...
(``tokred.io.new_run_dir``), and a later rerun continues the newest folder that fits its checkpoints.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf

from tokred.ablations.grid import BASELINE_CELL, key_of, matches, read_protocol
from tokred.io import atomic_write

__all__ = ["DEFAULT_VALUES", "EVAL_KEY", "ROW_KEY", "SWEEPS", "SWEEP_COLUMNS", "SweepSpec", "run_sweeps", "sweep_job"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SweepSpec:
    """One training-free sweep.

    Attributes:
        name: the sweep's name (``sweep`` column, ``sweep.values.<name>``).
        parameter: the swept parameter (``r``, ``tau``, ``p0``).
        slot: ``merger`` or ``pruner``: where the reducer sits.
        reducer: the registered reducer whose parameter is swept.
        sources: methods (``metrics.json`` ``method``) of the cells whose checkpoints the sweep runs on.
        integer: the values are integers (token counts).
    """

    name: str
    parameter: str
    slot: str
    reducer: str
    sources: tuple[str, ...]
    integer: bool


#: The sweeps, by name.
SWEEPS: dict[str, SweepSpec] = {
    "tome_r": SweepSpec("tome_r", "r", "merger", "tome", ("none",), True),
    "dcts_tau": SweepSpec("dcts_tau", "tau", "merger", "dcts", ("dcts",), False),
    "early_exit_p0": SweepSpec("early_exit_p0", "p0", "pruner", "early_exit", ("early_exit",), False),
    "cropr_r": SweepSpec("cropr_r", "r", "pruner", "cropr", ("cropr",), True),
}
#: Default values per sweep (``sweep.values`` in configs/config.yaml).
DEFAULT_VALUES: dict[str, tuple[float, ...]] = {
    "tome_r": (0, 4, 8, 12, 16, 24), "dcts_tau": (0.3, 0.5, 0.7, 0.9),
    "early_exit_p0": (0.7, 0.8, 0.9, 0.95, 0.99), "cropr_r": (0, 8, 16, 24, 32)}
#: sweeps.csv columns, in order.
SWEEP_COLUMNS = ("sweep", "cell", "seed", "parameter", "value", "miou_pct", "gflops", "gflops_ratio",
                 "unreduced_gflops", "token_reduction", "token_block_fraction", "halted_fraction", "trained_value",
                 "at_trained_value", "method", "source_method", "mode", "num_images", "eval_split",
                 "eval_max_items", "eval_mode", "flops_images", "device", "checkpoint", "checkpoint_sha256",
                 "checkpoint_mtime", "seconds")
#: The part of a row's key that says how the point was evaluated (not on what).
EVAL_KEY = ("eval_split", "eval_max_items", "eval_mode", "flops_images")
#: The columns that identify a row: a rerun skips the rows whose key is already in sweeps.csv.
ROW_KEY = ("sweep", "cell", "seed", "value", "checkpoint_sha256", *EVAL_KEY)
#: Overrides of the sweep command that reach the runs' configurations (where and on what they are evaluated).
_RUN_OVERRIDES = ("eval", "device", "dataset.root", "train.num_workers")
_RUN_DIR = re.compile(r"^(?P<cell>.+?)_seed(?P<seed>\d+)(?:-(?P<dup>\d+))?$")


# ---------------------------------------------------------------------------------------------- options
def _check_options(values: Mapping[str, Sequence[float]] | None, only: Sequence[str] | None,
                   cells: Mapping[str, str | None] | None) -> dict[str, list[float]]:
    """The value list of every sweep to run, checked.

    Raises:
        ConfigError: an unknown sweep name, or a value outside the parameter's range.
    """
    from tokred.structured import ConfigError

    valid = ", ".join(SWEEPS)
    for what, names in (("sweep.values", values or {}), ("sweep.only", only or ()), ("sweep.cells", cells or {})):
        unknown = sorted(set(names) - set(SWEEPS))
        if unknown:
            raise ConfigError(f"{what}: unknown sweep {', '.join(map(repr, unknown))}; valid sweeps: {valid}")
    chosen = list(SWEEPS) if only is None else list(dict.fromkeys(only))
    out: dict[str, list[float]] = {}
    for name in chosen:
        spec = SWEEPS[name]
        given = (values or {}).get(name)
        vals = list(DEFAULT_VALUES[name] if given is None else given)
        for v in vals:
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ConfigError(f"sweep.values.{name}: {v!r} is not a number; give a list such as "
                                  f"{list(DEFAULT_VALUES[name])}")
            if spec.integer and (float(v) != int(v) or v < 0):
                raise ConfigError(f"sweep.values.{name}: {spec.parameter}={v} must be a whole number >= 0 (tokens)")
            if not spec.integer and not 0.0 <= float(v) <= 1.0:
                raise ConfigError(f"sweep.values.{name}: {spec.parameter}={v} must be in [0, 1]")
        if vals:
            out[name] = sorted({int(v) if spec.integer else float(v) for v in vals})
        else:
            log.info("sweep %s: no values given (sweep.values.%s=[]); skipped", name, name)
    return out


# ---------------------------------------------------------------------------------------------- runs
@dataclass(frozen=True)
class _Run:
    """A finished run of the protocol folder."""

    cell: str
    seed: int
    path: Path
    method: str
    mode: str
    merger: str
    pruner: str
    checkpoint: Path


def _finished_runs(protocol_dir: Path) -> list[_Run]:
    """Every run with metrics.json (the latest duplicate ``-2``... of a cell and seed), in grid order."""
    proto = read_protocol(protocol_dir) or {}
    recorded = proto.get("cells", {})
    found: dict[tuple[str, int], tuple[int, Path]] = {}
    for metrics in sorted((protocol_dir / "runs").glob("*/metrics.json")):
        m = _RUN_DIR.match(metrics.parent.name)
        if m is None:
            continue
        key, dup = (m["cell"], int(m["seed"])), int(m["dup"] or 0)
        if key not in found or dup > found[key][0]:
            found[key] = (dup, metrics.parent)
    rank = {c: i for i, c in enumerate(dict.fromkeys([*proto.get("cell_order", []), BASELINE_CELL]))}
    runs = []
    for (cell, seed), (_, path) in sorted(found.items(), key=lambda kv: (rank.get(kv[0][0], len(rank)), kv[0])):
        cfg = OmegaConf.load(path / "config.yaml")
        merger, pruner = str(cfg.merger.name), str(cfg.pruner.name)
        method = "+".join(n for n in (merger, pruner) if n != "none") or "none"
        mode = "baseline" if cell == BASELINE_CELL else str(recorded.get(cell, {}).get("mode", "finetune"))
        ckpt = path / "last.pth" if (path / "last.pth").is_file() else Path(str(cfg.get("checkpoint") or ""))
        if not ckpt.is_file():
            log.info("run %s has no checkpoint (no last.pth, checkpoint=%s); not swept", path, ckpt)
            continue
        runs.append(_Run(cell, seed, path, method, mode, merger, pruner, ckpt))
    return runs


def _fits(spec: SweepSpec, run: _Run) -> bool:
    """Whether the sweep can run on the run's model (ToMe: a model without a merger)."""
    if spec.name == "tome_r":
        return run.merger in ("none", "tome")
    return (run.merger if spec.slot == "merger" else run.pruner) == spec.reducer


def _plan(names: Iterable[str], runs: Sequence[_Run], cells: Mapping[str, str | None], seeds: Sequence[int] | None,
          protocol_dir: Path) -> list[tuple[SweepSpec, _Run]]:
    """(sweep, run) pairs to evaluate; sweeps without a fitting finished run are skipped with a log line.

    Raises:
        ConfigError: ``sweep.cells`` names a finished cell the sweep cannot run on.
        PreflightError: no sweep has a finished run (names the cells each one expects).
    """
    from tokred.preflight import PreflightError
    from tokred.structured import ConfigError

    plan: list[tuple[SweepSpec, _Run]] = []
    wanted: list[str] = []
    for name in names:
        spec = SWEEPS[name]
        chosen = (cells or {}).get(name)
        if chosen:
            of_cell = [r for r in runs if r.cell == chosen]
            bad = [r for r in of_cell if not _fits(spec, r)]
            if bad:
                raise ConfigError(f"sweep.cells.{name}={chosen}: that cell runs {bad[0].method}; the {name} sweep "
                                  f"needs a cell with {spec.slot}={spec.reducer}"
                                  + (" or without a merger" if name == "tome_r" else ""))
            expected = [chosen]
        else:
            # the family's cells in grid order; for ToMe the fine-tuned unreduced cells before the baseline
            family = [r for r in runs if r.method in spec.sources and r.mode != "baseline"]
            family += [r for r in runs if r.method in spec.sources and r.mode == "baseline"]
            first = family[0].cell if family else None
            of_cell = [r for r in family if r.cell == first]
            expected = ["none", BASELINE_CELL] if name == "tome_r" else [f"a {spec.reducer} cell"]
        wanted.append(f"{name} needs a finished run of {' or '.join(expected)}")
        picked = sorted(of_cell, key=lambda r: r.seed)[:1] if seeds is None else [r for r in of_cell if r.seed in seeds]
        missing = sorted(set(seeds or ()) - {r.seed for r in of_cell})
        if of_cell and missing:
            log.info("sweep %s: cell %s has no finished run of seeds %s; skipped", name, of_cell[0].cell, missing)
        if not picked:
            log.info("sweep %s skipped: no finished run of %s in %s", name, " or ".join(expected),
                     protocol_dir / "runs")
            continue
        plan += [(spec, r) for r in picked]
    if not plan:
        cells_found = sorted({f"{r.cell} ({r.method})" for r in runs}) or ["none"]
        raise PreflightError([f"no sweep can run on {protocol_dir / 'runs'}: " + "; ".join(wanted)
                              + f". Finished cells there: {', '.join(cells_found)}. Train them first (python -m "
                              "tokred ablate grid=NAME) or choose cells with sweep.cells.<sweep>=CELL"])
    return plan


def _sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 4 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------- output folder
def _read_rows(csv: Path) -> pd.DataFrame:
    if not csv.is_file():
        return pd.DataFrame(columns=list(SWEEP_COLUMNS))
    return pd.read_csv(csv, dtype={"eval_max_items": str, "checkpoint_sha256": str})


def _folder(protocol_dir: Path, shas: Mapping[tuple[str, int], str]) -> Path:
    """The newest ``sweeps*`` folder whose rows hold no other checkpoint of the planned cells and seeds; else a
    new one (``new_run_dir``)."""
    from tokred.io import new_run_dir

    def number(p: Path) -> int:
        m = re.fullmatch(r"sweeps(?:-(\d+))?", p.name)
        return -1 if m is None else int(m[1] or 1)

    for folder in sorted((p for p in protocol_dir.glob("sweeps*") if p.is_dir() and number(p) > 0), key=number,
                         reverse=True):
        old = _read_rows(folder / "sweeps.csv")
        clash = [(c, int(s)) for c, s, h in zip(old["cell"], old["seed"], old["checkpoint_sha256"])
                 if (c, int(s)) in shas and shas[(c, int(s))] != h]
        if not clash:
            return folder
        log.info("%s holds sweeps of other checkpoints of %s; writing a new folder", folder, clash[0][0])
    return new_run_dir(protocol_dir, "sweeps")


# ---------------------------------------------------------------------------------------------- evaluation
def _run_config(run: _Run, overrides: Sequence[str]) -> DictConfig:
    """The run's own configuration with the sweep command's evaluation overrides and ``eval.bench=false``."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    cfg = OmegaConf.load(run.path / "config.yaml")
    OmegaConf.set_struct(cfg, False)
    for ov in OverridesParser.create().parse_overrides(list(overrides)):
        OmegaConf.update(cfg, ov.key_or_group, ov.value(), force_add=True)
    cfg.eval.bench = False  # checkpoint= and init_from= stay: they decide the input normalisation (``auto``)
    return cfg


def _trained_value(spec: SweepSpec, run: _Run) -> float | None:
    """The value the cell was trained and evaluated at (metrics.json ``reducer_config``); 0 for ToMe on an
    unreduced model; None when it is not one number (per-level dCTS thresholds that differ)."""
    rc = json.loads((run.path / "metrics.json").read_text()).get("reducer_config", {}).get(spec.slot, {})
    if spec.name == "tome_r" and run.merger == "none":
        return 0.0
    if spec.name == "dcts_tau":
        taus = set((rc.get("thresholds") or {}).values())
        return float(taus.pop()) if len(taus) == 1 else None
    value = rc.get("threshold" if spec.name == "early_exit_p0" else "r")
    return None if value is None else float(value)


@contextlib.contextmanager
def _setting(spec: SweepSpec, reducer: Any, value: float) -> Iterator[None]:
    """The reducer with ``spec.parameter = value`` for the block (``set_attribute``), restored afterwards."""
    from tokred.analysis.sweeps import set_attribute

    with contextlib.ExitStack() as stack:
        if spec.integer:  # r: a constant budget schedule (the eval-time budget: progress 1)
            from tokred.schedules import Constant

            stack.enter_context(set_attribute(reducer, "r", int(value)))
            stack.enter_context(set_attribute(reducer, "schedule", Constant(int(value))))
            if hasattr(reducer, "_schedule_uses_num_tokens"):
                stack.enter_context(set_attribute(reducer, "_schedule_uses_num_tokens", False))
        elif spec.name == "dcts_tau":
            from tokred.policy.partition import normalize_thresholds

            stack.enter_context(set_attribute(reducer, "thresholds", normalize_thresholds(value, reducer.levels)))
        else:
            stack.enter_context(set_attribute(reducer, "threshold", float(value)))
        yield


def _points(spec: SweepSpec, run: _Run, values: Sequence[float], overrides: Sequence[str], sha: str,
            done: set[tuple[str, ...]], bar: Any, write: Any) -> list[tuple[str, ...]]:
    """Evaluates the run once per value whose row is not done; ``write(row)`` after each.

    Returns:
        The keys (``ROW_KEY``) of every value's row, evaluated now or before.
    """
    import torch

    from tokred.config import build_datasets, build_model_from_config, method_name, resolve_device, seed_everything
    from tokred.io import eval_mode
    from tokred.jobs.run import _evaluate_and_measure  # the evaluation every grid cell's metrics.json comes from
    from tokred.models.checkpoints import load_segmentation_checkpoint

    cfg = _run_config(run, overrides)
    if spec.name == "tome_r" and run.merger == "none":
        cfg.merger = {"name": "tome", "r": 0}
    n_items = len(build_datasets(cfg, train=False))
    common = {"sweep": spec.name, "cell": run.cell, "seed": run.seed, "parameter": spec.parameter,
              "trained_value": _trained_value(spec, run), "method": method_name(cfg), "source_method": run.method,
              "mode": run.mode, "num_images": n_items, "eval_split": str(cfg.eval.split),
              "eval_max_items": "all" if cfg.eval.max_items is None else str(int(cfg.eval.max_items)),
              "eval_mode": str(cfg.eval.mode), "flops_images": int(cfg.eval.flops_images),
              "checkpoint": str(run.checkpoint), "checkpoint_sha256": sha,
              "checkpoint_mtime": run.checkpoint.stat().st_mtime}
    keys = [_key({**common, "value": v}) for v in values]
    todo = [v for v, k in zip(values, keys) if k not in done]
    bar.update(len(values) - len(todo))
    if not todo:
        return keys
    seed_everything(int(cfg.seed))
    seg = build_model_from_config(cfg)
    load_segmentation_checkpoint(seg, str(run.checkpoint), str(cfg.get("checkpoint_format", "auto")))
    device = resolve_device(str(cfg.device))
    seg = seg.to(device)
    seg.set_progress(1.0)
    reducer = seg.reducers[0 if spec.slot == "merger" else 1]
    for value in todo:
        bar.set_postfix_str(f"{spec.name} {run.cell} seed {run.seed} {spec.parameter}={value}")
        t0 = time.time()
        with _setting(spec, reducer, value), eval_mode(seg), torch.no_grad():
            measured = _evaluate_and_measure(cfg, seg, device)
        g, tok = measured.get("gflops") or {}, measured["tokens"]
        trained = common["trained_value"]
        write({**common, "value": value, "miou_pct": 100.0 * float(measured["quality"]["miou"]),
               "gflops": g.get("gflops", np.nan), "gflops_ratio": g.get("gflops_ratio", np.nan),
               "unreduced_gflops": g.get("baseline_gflops", np.nan), "token_reduction": tok.get("token_reduction"),
               "token_block_fraction": tok.get("token_block_fraction"), "halted_fraction": tok.get("halted_fraction"),
               "at_trained_value": trained is not None and bool(np.isclose(float(value), trained)),
               "device": str(device), "seconds": time.time() - t0})
        bar.update(1)
    return keys


def _key(row: Mapping[str, Any]) -> tuple[str, ...]:
    """A row's ``ROW_KEY`` as strings (numbers normalised, so CSV round trips compare equal)."""
    def text(v: Any) -> str:
        if isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool):
            return f"{float(v):.10g}"
        return str(v)

    return tuple(text(row[k]) for k in ROW_KEY)


# ---------------------------------------------------------------------------------------------- entry points
def run_sweeps(protocol_dir: str | Path, values: Mapping[str, Sequence[float]] | None = None,
               only: Sequence[str] | None = None, cells: Mapping[str, str | None] | None = None,
               seeds: Sequence[int] | None = None, overrides: Sequence[str] = (),
               progress: bool = True) -> tuple[pd.DataFrame, Path]:
    """Runs the training-free sweeps on a protocol folder's trained runs (see the module docstring).

    Args:
        protocol_dir: ``<root>/<protocol>`` of a grid (``runs/<cell>_seed<k>/`` with metrics.json).
        values: ``{sweep: values}`` (missing sweeps: ``DEFAULT_VALUES``; ``[]`` skips one). ToMe / Cropr ``r``:
            whole numbers >= 0 (tokens per block / per module); dCTS ``tau``, early-exit ``p0``: in [0, 1].
        only: the sweeps to run (None: all of ``SWEEPS``).
        cells: ``{sweep: cell}`` to run a sweep on another cell than the first finished one of its family.
        seeds: the seeds to sweep (None: the lowest finished seed of each chosen cell).
        overrides: Hydra overrides applied to every run's configuration before evaluating: only ``eval.*``,
            ``device``, ``dataset.root`` and ``train.num_workers`` (e.g. ``eval.max_items=8``).
        progress: show a tqdm bar over the sweep points.

    Returns:
        ``(table, folder)``: this call's rows (``SWEEP_COLUMNS``: mIoU in %, GFLOPs per image, ...; reused rows
        included) and the folder written (``sweeps.csv``, ``pareto_sweeps.png``).

    Raises:
        ConfigError: an unknown sweep name, a value out of range, an override of another key, or a chosen cell
            the sweep cannot run on.
        PreflightError: no chosen sweep has a finished run (names the cells each sweep expects); nothing is
            written.
        ValueError: a checkpoint that does not fit its run's model (``load_segmentation_checkpoint``).
    """
    from tqdm.auto import tqdm

    from tokred.ablations.sweep_plots import plot_rows, plot_sweeps, trained_cells
    from tokred.structured import ConfigError

    protocol_dir = Path(protocol_dir)
    bad = [o for o in overrides if not matches(key_of(o), _RUN_OVERRIDES)]
    if bad:
        raise ConfigError(f"tokred sweep evaluates the grid's trained runs as they were configured; it cannot apply "
                          f"{', '.join(bad)}; only eval.*, device, dataset.root, train.num_workers, sweep.* and grid.* "
                          "may be given")
    chosen = _check_options(values, only, cells)
    plan = _plan(chosen, _finished_runs(protocol_dir), cells or {}, seeds, protocol_dir)
    shas = {(r.cell, r.seed): _sha256(r.checkpoint) for _, r in plan}
    folder = _folder(protocol_dir, shas)
    csv = folder / "sweeps.csv"
    rows = _read_rows(csv).to_dict("records")
    done = {_key(r) for r in rows}
    log.info("sweeps of %s -> %s (%d rows there already)", protocol_dir.name, folder, len(rows))
    mine: list[dict[str, Any]] = []

    def write(row: dict[str, Any]) -> None:
        rows.append(row)
        mine.append(row)
        atomic_write(csv, pd.DataFrame(rows, columns=list(SWEEP_COLUMNS)).to_csv(index=False, float_format="%.10g"))

    total = sum(len(chosen[s.name]) for s, _ in plan)
    wanted: set[tuple[str, ...]] = set()
    with tqdm(total=total, desc="sweeps", disable=not progress) as bar:
        for spec, run in plan:
            wanted.update(_points(spec, run, chosen[spec.name], overrides, shas[(run.cell, run.seed)], done, bar,
                                  write))
    every = _read_rows(csv)
    keys = [_key(r) for r in every.to_dict("records")]
    table = every[[k in wanted for k in keys]].drop_duplicates(list(ROW_KEY), keep="last").reset_index(drop=True)
    plot_sweeps(plot_rows(every, wanted), trained_cells(protocol_dir), folder / "pareto_sweeps.png",
                title=protocol_dir.name)
    log.info("sweeps written to %s (%d new rows)", csv, len(mine))
    return table, folder


def sweep_job(cfg: DictConfig) -> pd.DataFrame:
    """``python -m tokred sweep grid=<name> [sweep.values.<sweep>=[...]] [sweep.only=[...]] [eval.max_items=N]``.

    Options (``sweep:`` in configs/config.yaml): ``only``, ``values``, ``cells``, ``seeds``, ``progress`` (see
    ``run_sweeps``); ``grid.root`` / ``grid.protocol`` locate the protocol folder; ``eval.*``, ``device``,
    ``dataset.root`` and ``train.num_workers`` reach every run's configuration.

    Returns:
        The sweep table (``run_sweeps``).

    Raises:
        ConfigError: no ``grid=``, an unknown sweep, a bad value or an override that would change the runs.
        PreflightError: no sweep has a finished run.
    """
    import sys

    from tokred.ablations.grid import Grid
    from tokred.structured import ConfigError

    if "grid" not in cfg or cfg.grid is None:
        raise ConfigError("tokred sweep needs the grid whose runs it sweeps: python -m tokred sweep grid=camvid_cpu "
                          "(one of configs/grid/*.yaml)")
    grid = Grid.from_mapping(cfg.grid, name="")
    from hydra.core.hydra_config import HydraConfig

    task = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []  # [] in a library call
    overrides = [o for o in task if key_of(o).split("/")[0].split(".")[0] not in ("grid", "sweep")]
    opts = OmegaConf.to_container(cfg.get("sweep") or {}, resolve=True)
    assert isinstance(opts, dict)
    table, folder = run_sweeps(grid.protocol_dir, values=opts.get("values"), only=opts.get("only"),
                               cells=opts.get("cells"), seeds=opts.get("seeds"), overrides=overrides,
                               progress=bool(opts.get("progress", True)))
    sys.stdout.write(f"sweeps: {folder / 'sweeps.csv'}\nplot: {folder / 'pareto_sweeps.png'}\n")
    return table
