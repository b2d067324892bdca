"""Shared test helpers.

``run_tokred`` runs ``python -m tokred <args>`` *in this process* (``tokred.__main__.main``, the function the
``python -m tokred`` entry calls): the same Hydra composition, validation, job and exit codes as the command line,
without paying a fresh interpreter's torch/timm import (seconds per call on a busy 2-core machine). Tests about the
process itself (exit status of the real entry point, a fresh interpreter's entry points) still use subprocesses.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Result:
    """What ``subprocess.run(..., capture_output=True, text=True)`` would return, for the in-process call."""

    args: list[str]
    returncode: int
    stdout: str
    stderr: str


def _exit_code(code: object) -> int:
    if code is None:
        return 0
    return code if isinstance(code, int) else 1  # sys.exit("message") exits with 1, as the interpreter does


def run_tokred(*args: str, cwd: Path = ROOT) -> Result:
    """``python -m tokred *args`` in-process, run from ``cwd``; stdout, stderr and the exit code are captured.

    ``main`` rewrites ``sys.argv`` for Hydra and Hydra reconfigures logging (its stdout job logging) on every
    call; both are put back afterwards so nothing leaks into later tests. ``HYDRA_FULL_ERROR`` is unset for the
    call so errors are reported (and exit 1) as on the command line instead of propagating.
    """
    from tokred.__main__ import main

    out, err = io.StringIO(), io.StringIO()
    names = ("", "tokred", "hydra")
    saved_logging = {n: (lg.handlers[:], lg.level, lg.propagate, lg.disabled)
                     for n in names for lg in [logging.getLogger(n or None)]}
    saved_argv, saved_cwd = list(sys.argv), os.getcwd()
    saved_env = {k: os.environ.get(k) for k in ("HYDRA_FULL_ERROR", "TQDM_DISABLE")}
    os.environ.pop("HYDRA_FULL_ERROR", None)
    os.environ["TQDM_DISABLE"] = "1"
    try:
        os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = _exit_code(main(list(args)))
            except SystemExit as exc:
                rc = _exit_code(exc.code)
    finally:
        os.chdir(saved_cwd)
        sys.argv[:] = saved_argv
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        for n, (handlers, level, propagate, disabled) in saved_logging.items():
            lg = logging.getLogger(n or None)
            for h in lg.handlers:
                if h not in handlers:
                    lg.removeHandler(h)
            for h in handlers:
                if h not in lg.handlers:
                    lg.addHandler(h)
            lg.setLevel(level)
            lg.propagate, lg.disabled = propagate, disabled
    return Result(["python", "-m", "tokred", *args], rc, out.getvalue(), err.getvalue())


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tokred_cli():
    """``run_tokred``: ``python -m tokred ...`` in this process (see the module docstring)."""
    return run_tokred


def wait_for_checkpoint(run: Path, proc, epoch: int, timeout: float = 300) -> None:
    """Polls until ``run/last.pth`` holds ``epoch`` finished epochs while ``proc`` (a ``Popen``) goes on."""
    import time

    from tokred.engine.checkpoint import load_checkpoint

    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        try:
            if load_checkpoint(run / "last.pth")["epoch"] >= epoch:
                return
        except (FileNotFoundError, ValueError):  # not written yet, or being renamed into place
            pass
        time.sleep(0.05)
    raise AssertionError(f"{run / 'last.pth'} did not reach epoch {epoch} within {timeout} s")


@pytest.fixture(scope="session")
def wait_for_epoch():
    """:func:`wait_for_checkpoint`, for tests that interrupt a real run after a checkpoint."""
    return wait_for_checkpoint
