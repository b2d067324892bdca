"""Back-compat shim: the jobs moved to ``tokred.jobs`` and the builders to ``tokred.config``."""

from __future__ import annotations

from tokred.config import build_model_from_config, method_name, resolve_device
from tokred.jobs.bench import bench_job
from tokred.jobs.eval import eval_job
from tokred.jobs.listing import list_job
from tokred.jobs.policy import train_policy_job
from tokred.jobs.run import run_job

__all__ = ["bench_job", "build_model_from_config", "eval_job", "list_job", "method_name", "resolve_device", "run_job",
           "train_policy_job"]
