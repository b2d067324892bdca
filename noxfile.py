"""nox sessions: ``nox -s tests``, ``nox -s bench``, ``nox -s ablations``, ``nox -s gpu_dry_run`` (uv-backed,
from uv.lock).

``tests`` builds its own virtualenv from the lock; ``bench`` and ``ablations`` run in the project's locked
environment (``uv sync --frozen`` into ``.venv``, then ``uv run --frozen``), so plugins installed there (e.g.
``tokred-baselines``) are visible to them.
"""

from __future__ import annotations

import os

import nox

nox.options.default_venv_backend = "uv"
nox.options.sessions = ["tests"]


def _sync(session: nox.Session) -> None:
    """Installs the locked environment into the session's virtualenv."""
    session.run_install("uv", "sync", "--frozen", env={"UV_PROJECT_ENVIRONMENT": session.virtualenv.location})


def _project_env(session: nox.Session) -> None:
    """Syncs the project's own ``.venv`` from uv.lock (the environment ``uv run --frozen`` uses), keeping
    packages installed there beside the lock (plugins, hydra-submitit-launcher)."""
    session.run("uv", "sync", "--frozen", "--inexact", external=True)  # --inexact keeps installed plugins


def _tokred(session: nox.Session, *args: str) -> None:
    """``uv run --frozen python -m tokred ARGS`` in the project environment."""
    session.run("uv", "run", "--frozen", "python", "-m", "tokred", *args, external=True,
                env={"PYTHONUNBUFFERED": "1", **os.environ})


@nox.session
def tests(session: nox.Session) -> None:
    """The test suite (CPU, a few minutes on 2 cores)."""
    _sync(session)
    session.run("pytest", "-q", *session.posargs)


@nox.session(venv_backend="none")
def bench(session: nox.Session) -> None:
    """Throughput/GFLOPs benchmarks against the unreduced model, side by side in one process.

    Pass overrides after --, e.g. ``nox -s bench -- model=vit_base dataset.crop_size=[512,512] merger=tome``.
    """
    _project_env(session)
    _tokred(session, "bench", *session.posargs)


@nox.session(venv_backend="none")
def ablations(session: nox.Session) -> None:
    """The apples-to-apples ablation grid: ``nox -s ablations [-- GRID [overrides]]`` (default grid camvid_cpu).

    Runs ``python -m tokred ablate grid=GRID [overrides]``: validates every cell, trains (or reuses) the baseline,
    runs the cells through one Hydra multirun (finished runs are skipped, interrupted ones resume) and writes
    ``results/ablations/<protocol>/summary.{csv,md}`` with the Pareto plots. Examples::

        nox -s ablations                                    # camvid_cpu: ViT-Tiny 384x512 on ../shared/data/CamVid
        nox -s ablations -- camvid_gpu dataset.root=/data/CamVid
        nox -s ablations -- camvid_cpu grid.finetune_epochs=3 'grid.seeds=[0,1,2]'

    On a SLURM cluster the same grid runs one job per cell through Hydra's submitit launcher (install it into
    the project environment first: ``uv pip install hydra-submitit-launcher``)::

        nox -s ablations -- camvid_gpu hydra/launcher=submitit_slurm hydra.launcher.partition=gpu \\
            hydra.launcher.gpus_per_node=1 hydra.launcher.timeout_min=240

    Several GPUs for one run: train that cell with torchrun, and ``ablate`` picks up its finished run::

        torchrun --nproc_per_node=4 -m tokred run hydra.searchpath=[file://$PWD/results/ablations/<protocol>/configs] \\
            experiment=ablation/<cell> <the protocol overrides from protocol.json>
    """
    _project_env(session)
    args = list(session.posargs)
    grid = args.pop(0) if args and "=" not in args[0] else "camvid_cpu"
    _tokred(session, "ablate", f"grid={grid}", *args)


@nox.session(venv_backend="none")
def gpu_dry_run(session: nox.Session) -> None:
    """results/scripts/gpu_grid.sh --dry-run through its test (CPU, tiny settings, about 2 minutes): run it
    before any GPU time is spent; the full dry run is ``bash results/scripts/gpu_grid.sh --dry-run``."""
    _project_env(session)
    session.run("uv", "run", "--frozen", "pytest", "-q", "tests/test_gpu_script.py", *session.posargs,
                external=True, env={"TOKRED_GPU_DRY_RUN": "1", **os.environ})
