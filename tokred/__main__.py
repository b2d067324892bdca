"""``python -m tokred <command> [hydra overrides]``.

Hydra reads every argv word as an override, so the subcommand is taken off first and the rest goes to Hydra
(``-m``/``--multirun`` for sweeps, ``hydra/launcher=submitit_slurm`` for clusters, ``--cfg job`` to print the
composed config).

Commands:
    run           train (or load checkpoint=) and evaluate; writes results/runs/<run name>/
    eval          evaluate checkpoint=PATH
    bench         im/s, latency and memory of a configuration next to the unreduced model
    train-policy  train the dCTS superpatch policy network on ground-truth uniformity
    list          every registered reducer and where it comes from
    ablate        the apples-to-apples grid: grid=camvid_cpu (configs/grid/); results/ablations/<protocol>/
    viz           token-fate picture of one image: viz.image=PATH [viz.out=PNG] [checkpoint=PATH]
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

_USAGE = __doc__.split("\n\n", 2)[2] if __doc__ else ""


def config_dir() -> str:
    """The Hydra config folder: the repository's ``configs/`` (source checkout) or the packaged copy."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "configs", here / "_configs"):
        if (candidate / "config.yaml").is_file():
            return str(candidate)
    raise FileNotFoundError(f"tokred's configs were not found next to {here}; reinstall tokred")


def _jobs():
    from tokred import ablations, cli, viz

    return {"run": cli.run_job, "eval": cli.eval_job, "bench": cli.bench_job, "train-policy": cli.train_policy_job,
            "ablate": ablations.ablate_job, "viz": viz.viz_job}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        sys.stdout.write("usage: python -m tokred <command> [hydra overrides]\n\n" + _USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    if command == "list":
        from tokred.cli import list_job

        list_job()
        return 0
    jobs = _jobs()
    if command not in jobs:
        sys.stderr.write(f"unknown command {command!r}; valid: {', '.join([*jobs, 'list'])}\n")
        return 2
    import hydra
    from omegaconf import DictConfig

    def task(cfg: DictConfig) -> None:
        logging.getLogger("tokred").setLevel(logging.INFO)
        jobs[command](cfg)

    sys.argv = [f"tokred {command}", *rest]
    hydra.main(config_path=config_dir(), config_name="config", version_base="1.3")(task)()
    return 0


if __name__ == "__main__":
    sys.exit(main())
