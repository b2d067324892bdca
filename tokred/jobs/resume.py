"""``resume=true`` keeps a run honest: the requested configuration must be the one the run was started with.

A resumed run continues the optimisation its checkpoint holds; a different reducer, learning rate or data
set would leave a ``metrics.json`` that describes a model that never existed. :func:`check_resume` compares
the composed configuration with the run's ``config.yaml`` key by key and refuses any difference outside
:data:`RESUME_ALLOWED` (settings that do not change what is trained), naming every key with both values,
before anything is written. A finished run (``metrics.json`` exists) is never resumed: the message gives the
``tokred eval`` command that re-evaluates it into a new run folder.
"""

from __future__ import annotations

import logging
import os
import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

__all__ = ["RESUME_ALLOWED", "ResumeRefused", "check_resume", "config_differences", "job_overrides", "resume_command"]

log = logging.getLogger("tokred")

#: Keys (``a.b``) or key prefixes (``a.``) that may differ on resume: where the run executes (device,
#: workers, the data set's path; the ablation grid fingerprints the data's contents), how often it
#: checkpoints (checkpoints draw no random numbers), what it does after training (evaluation, timing), and
#: the bookkeeping of resuming itself.
RESUME_ALLOWED: tuple[str, ...] = ("device", "train.num_workers", "train.checkpoint_every", "dataset.root", "eval.",
                                   "bench.", "viz.", "analyze.", "sweep.", "preflight.", "resume", "existing_run",
                                   "run_name", "output_dir")


class ResumeRefused(ValueError):
    """``resume=true`` cannot continue this run (finished, or asked for another configuration); nothing was
    written. ``python -m tokred`` prints the message alone and exits 2."""


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, Mapping) and d:
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def _allowed(key: str) -> bool:
    return any(key == a or (a.endswith(".") and key.startswith(a)) for a in RESUME_ALLOWED)


def config_differences(stored: Mapping[str, Any], requested: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{key: (stored value, requested value)}`` for every leaf key that differs and is not allowed to.

    A key present on one side only counts as a difference (value ``"<absent>"`` on the other side).
    """
    a, b = _flatten(stored), _flatten(requested)
    missing = "<absent>"
    return {k: (a.get(k, missing), b.get(k, missing)) for k in sorted(set(a) | set(b))
            if a.get(k, missing) != b.get(k, missing) and not _allowed(k)}


def check_resume(cfg: DictConfig, run_dir: Path, fitted: tuple[str, str] | None = None) -> None:
    """Refuses ``resume=true`` on a finished run or with a configuration other than the run's own.

    Args:
        cfg: the requested, composed configuration (``resume=true``).
        run_dir: the run folder to continue (holds ``last.pth`` and ``config.yaml``).
        fitted: ``(slot, key)`` of a fitted component (e.g. ``("merger", "policy_checkpoint")``) that the
            policy stage filled in when the run started: left unset in the request, it takes the run's value.

    Raises:
        FileNotFoundError: the run has no ``last.pth``.
        ResumeRefused: (a ``ValueError``) ``metrics.json`` exists (the run is finished; the message gives the
            ``tokred eval`` command), or the configurations differ (every key named with both values).
    """
    if (run_dir / "metrics.json").is_file():
        raise ResumeRefused(f"run {run_dir} is finished (metrics.json exists): there is nothing to resume. To "
                         f"evaluate it again (into a new run folder; this one stays as it is): python -m tokred "
                         f"eval checkpoint={run_dir / 'last.pth'} <the run's model/reducer overrides> "
                         "[eval.*=...]; to train again, drop resume=true")
    if not (run_dir / "last.pth").is_file():
        raise FileNotFoundError(f"resume=true but {run_dir / 'last.pth'} does not exist; drop resume or set "
                                "run_name (and output_dir) to an existing run")
    stored_path = run_dir / "config.yaml"
    if not stored_path.is_file():
        log.warning("resuming %s without its config.yaml: the configuration cannot be compared", run_dir)
        return
    stored = OmegaConf.to_container(OmegaConf.load(stored_path), resolve=False)
    if fitted is not None:
        slot, key = fitted
        value = (stored.get(slot) or {}).get(key) if isinstance(stored, dict) else None
        if cfg[slot].get(key) is None and value is not None and Path(str(value)).exists():
            OmegaConf.set_struct(cfg, False)
            cfg[slot][key] = value
            OmegaConf.set_struct(cfg, True)
    requested = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(stored, dict) and isinstance(requested, dict)
    diff = config_differences(stored, requested)
    given = {o.lstrip("+~").split("=", 1)[0] for o in job_overrides()}
    newer = sorted(k for k, (old, _) in diff.items() if old == "<absent>" and k not in given)
    if newer:  # keys a newer tokred added since the run started, left at their defaults
        log.info("resume: %s did not exist when %s started; they keep their defaults", ", ".join(newer), run_dir)
        diff = {k: v for k, v in diff.items() if k not in newer}
    if diff:
        lines = "\n".join(f"  {k}: run has {v[0]!r}, requested {v[1]!r}" for k, v in diff.items())
        raise ResumeRefused(f"resume=true: the requested configuration differs from the one run {run_dir} was "
                         f"started with ({stored_path}); nothing was written:\n{lines}\nResume with the run's "
                         "own settings (drop these overrides), or start a new run (without resume=true) to train "
                         f"with them. Keys that may change on resume: "
                           f"{', '.join(a + '*' if a.endswith('.') else a for a in RESUME_ALLOWED)}")


def job_overrides(drop: tuple[str, ...] = ()) -> list[str]:
    """This Hydra job's command-line overrides, without those starting with ``drop`` ([] outside Hydra)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return [o for o in HydraConfig.get().overrides.task if not o.startswith(drop)]
    except (ImportError, ValueError):  # not under Hydra (library use)
        return []


def resume_command(run_dir: Path) -> str:
    """The exact command that continues ``run_dir``: this job's overrides, pointed at that folder."""
    overrides = job_overrides(("resume=", "run_name=", "output_dir=", "existing_run=", "+resume="))
    procs = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    launcher = ["torchrun", f"--nproc_per_node={procs}"] if procs > 1 else ["python"]
    words = [*launcher, "-m", "tokred", "run", *overrides, f"output_dir={run_dir.parent}",
             f"run_name={run_dir.name}", "resume=true"]
    return " ".join(shlex.quote(w) for w in words)
