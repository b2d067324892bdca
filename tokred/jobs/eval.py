"""``python -m tokred eval checkpoint=PATH [overrides]``: evaluate a trained checkpoint into a new run dir."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from tokred.config import default_run_name

__all__ = ["eval_job"]


def eval_job(cfg: DictConfig) -> dict[str, Any]:
    """Runs ``run`` with no training on ``checkpoint=`` (reducers may differ from training: off-the-shelf
    budgets), into ``eval_<default run name>`` unless ``run_name`` is given.

    Raises:
        ValueError: no ``checkpoint=`` given.
    """
    from tokred.jobs.run import run_job

    if not cfg.checkpoint:
        raise ValueError("tokred eval needs checkpoint=PATH (a tokred last.pth); to train use tokred run")
    OmegaConf.set_struct(cfg, False)
    cfg.train.epochs = 0
    if cfg.run_name is None:
        cfg.run_name = "eval_" + default_run_name(cfg)
    return run_job(cfg)
