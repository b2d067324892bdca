"""nox sessions: ``nox -s tests``, ``nox -s bench``, ``nox -s ablations`` (uv-backed, from uv.lock)."""

from __future__ import annotations

import os

import nox

nox.options.default_venv_backend = "uv"
nox.options.sessions = ["tests"]


def _sync(session: nox.Session) -> None:
    """Installs the locked environment into the session's virtualenv."""
    session.run_install("uv", "sync", "--frozen", env={"UV_PROJECT_ENVIRONMENT": session.virtualenv.location})


@nox.session
def tests(session: nox.Session) -> None:
    """The test suite (CPU, a few minutes on 2 cores)."""
    _sync(session)
    session.run("pytest", "-q", *session.posargs)


@nox.session
def bench(session: nox.Session) -> None:
    """Throughput/GFLOPs benchmarks against the unreduced model, side by side in one process.

    Pass overrides after --, e.g. ``nox -s bench -- model=vit_base dataset.crop_size=[512,512] merger=tome``.
    """
    _sync(session)
    session.run("python", "-m", "tokred", "bench", *session.posargs, env={"PYTHONUNBUFFERED": "1", **os.environ})
