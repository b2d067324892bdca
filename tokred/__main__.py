"""``python -m tokred <command> [hydra overrides]``.

Hydra reads every argv word as an override, so the subcommand is taken off first and the rest goes to Hydra
(``-m``/``--multirun`` for sweeps, ``hydra/launcher=submitit_slurm`` for clusters, ``--cfg job`` to print the
composed config).

Commands:
    run           train (or load checkpoint=) and evaluate; writes results/runs/<run name>/
    eval          evaluate checkpoint=PATH
    bench         im/s, latency and memory of a configuration next to the unreduced model
    train-policy  train the dCTS superpatch policy network on ground-truth uniformity
    list          every registered reducer, backbone, decoder and dataset, and where it comes from
    ablate        the apples-to-apples grid: grid=camvid_cpu (configs/grid/); results/ablations/<protocol>/
    viz           token-fate picture of one image: viz.image=PATH [viz.out=PNG] [checkpoint=PATH]
    analyze       "where do tokens go" over a split: checkpoint=PATH merger=dcts pruner=early_exit [analyze.out=DIR]
    sweep         training-free sweeps on a grid's trained runs: grid=NAME [sweep.only=[...]] [eval.max_items=N]
"""

from __future__ import annotations

import importlib
import logging
import sys

from tokred.config import config_dir
from tokred.structured import register_configs, validate

__all__ = ["JOBS", "config_dir", "main"]

_USAGE = __doc__.split("\n\n", 2)[2] if __doc__ else ""

#: command -> "module:function" of its job, imported only when that command runs.
JOBS: dict[str, str] = {
    "run": "tokred.jobs.run:run_job",
    "eval": "tokred.jobs.eval:eval_job",
    "bench": "tokred.jobs.bench:bench_job",
    "train-policy": "tokred.jobs.policy:train_policy_job",
    "ablate": "tokred.ablations.runner:ablate_job",
    "viz": "tokred.jobs.viz:viz_job",
    "analyze": "tokred.jobs.analyze:analyze_job",
    "sweep": "tokred.ablations.sweeps:sweep_job",
}


def _load(target: str):
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def main(argv: list[str] | None = None) -> int:
    """Dispatches ``argv`` (default ``sys.argv[1:]``) to a job; returns the exit code (2: unknown command)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        sys.stdout.write("usage: python -m tokred <command> [hydra overrides]\n\n" + _USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    if command == "list":
        _load("tokred.jobs.listing:list_job")()
        return 0
    if command not in JOBS:
        sys.stderr.write(f"unknown command {command!r}; valid: {', '.join([*JOBS, 'list'])}\n")
        return 2
    import hydra

    job = _load(JOBS[command])
    register_configs()

    def task(cfg) -> None:
        logging.getLogger("tokred").setLevel(logging.INFO)
        from hydra.core.hydra_config import HydraConfig

        from tokred.engine.train import TrainingInterrupted
        from tokred.jobs.resume import ResumeRefused, resume_command
        from tokred.preflight import PreflightError
        from tokred.structured import ConfigError

        try:
            validate(cfg, list(HydraConfig.get().overrides.task))
            job(cfg)
        except ConfigError as err:  # a configuration mistake: one clear line, no traceback, nothing written
            sys.stderr.write(f"tokred {command}: configuration error: {err}\n")
            raise SystemExit(2) from None
        except (PreflightError, ResumeRefused) as err:  # data/checkpoint problems, resume refusals; nothing written
            sys.stderr.write(f"tokred {command}: {err}\n")
            raise SystemExit(2) from None
        except TrainingInterrupted as err:  # SIGINT/SIGTERM: checkpoint written; 130 / 143 as the shell does
            if err.checkpoint is not None:
                sys.stderr.write(f"tokred {command}: {err}\nresume with:\n  {resume_command(err.checkpoint.parent)}\n")
            raise SystemExit(err.exit_code) from None

    sys.argv = [f"tokred {command}", *rest]
    hydra.main(config_path=config_dir(), config_name="config", version_base="1.3")(task)()
    return 0


if __name__ == "__main__":
    sys.exit(main())
