"""Apples-to-apples ablation grids: ``python -m tokred ablate grid=<name> [overrides]``.

A *grid* (``configs/grid/<name>.yaml``) is a protocol plus cells:

* the protocol: a name (``camvid_vit-tiny_384x512``), the Hydra overrides that define it (dataset, backbone,
  crop, measurement settings), ``baseline_epochs``, ``finetune_epochs``, ``finetune_overrides`` (the fine-tune
  schedule every finetune cell shares, e.g. a lower ``train.lr`` without warm-up; recorded in the identity
  only when non-empty) and ``seeds``;
* ``execution`` overrides that say where it runs (data root, device, workers), not part of the protocol;
* cells: a name, the overrides that switch its reducers on, a budget description, a ``mode``
  (``finetune``: trained ``finetune_epochs`` from the baseline checkpoint; ``off_the_shelf``: the baseline
  checkpoint evaluated with the reducer on) and ``optional`` (plugin reducers: skipped with a warning when
  not installed).

The job (methods.md Sec. 8 for the measurement conventions):

1. validates every cell before anything is trained: each cell's configuration is composed and its model
   built; unknown reducers, a missing data root, an off-the-shelf cell whose reducer needs trained parameters,
   or a results folder holding another protocol (``protocol.json``) raise ``ValueError``; so do a results
   folder whose runs read other data (the data fingerprint recorded in ``protocol.json`` differs: another
   split file list, other images or label statistics; the same data under another ``dataset.root`` is
   accepted) and one made by another code version (tokred version, git commit, dirty flag), unless
   ``grid.allow_code_change=true`` (recorded in ``code_history``); nothing is written then;
2. trains (or reuses) the unreduced ``baseline`` from scratch, one run per seed;
3. trains the dCTS/CTS policy networks the cells need (once per protocol, shared by the cells);
4. runs every remaining cell through ONE Hydra multirun of ``python -m tokred run`` (``existing_run=
   skip_or_resume``: finished runs are skipped, interrupted ones resume), so a launcher such as
   ``hydra/launcher=submitit_slurm`` runs the same grid on a cluster;
5. aggregates ``summary.csv``, ``summary.md`` and the plots (``summarize``, ``write_summary``): medians over
   seeds, their spread, and per-seed paired differences to the reference cell (``exceeds_spread``).

``python -m tokred sweep grid=<name>`` (``tokred.ablations.sweeps``) then evaluates the trained runs at other
budgets without retraining (ToMe r, dCTS tau, early-exit p0, Cropr r) into ``<protocol dir>/sweeps/``.

Each cell becomes a generated experiment file ``<protocol dir>/configs/experiment/ablation/<cell>.yaml``
(``# @package _global_``) holding everything cell-specific (reducers, ``run_name``, epochs, ``init_from``),
so the multirun is a plain ``experiment=ablation/a,ablation/b,...`` sweep and any single cell can be rerun by
hand with ``python -m tokred run hydra.searchpath=[file://<protocol dir>/configs] experiment=ablation/<cell>
<protocol overrides>``.

Layout of ``<root>/<protocol>/``: ``protocol.json`` (protocol, cells, every invocation with its command, code
version and wall time, ``data``: the data fingerprint, ``code``: the current code version, ``code_history``:
each code version with the runs that finished under it; see ``tokred.ablations.protocol``), ``configs/``,
``runs/<cell>_seed<k>/`` (tokred run directories), ``policy/`` (trained policy networks), ``multirun/<stage>/``
(Hydra sweep folders, launcher logs), ``summary.csv``, ``summary.md``, ``miou_vs_gflops.png``,
``miou_vs_images_per_second.png``, ``tokens_per_block.png``.

Modules: ``grid`` (specs, generated cell configs), ``protocol`` (data fingerprint, code version and their
checks), ``runner`` (validation, protocol, stages), ``summary`` (aggregation), ``plots``, ``sweeps`` and
``sweep_plots`` (training-free sweeps).
"""

from tokred.ablations.grid import BASELINE_CELL, Cell, Grid, load_grid
from tokred.ablations.plots import plot_summary
from tokred.ablations.runner import ablate_job, run_grid
from tokred.ablations.summary import SUMMARY_COLUMNS, pareto_front, summarize, write_summary

__all__ = ["BASELINE_CELL", "Cell", "Grid", "SUMMARY_COLUMNS", "ablate_job", "load_grid", "pareto_front",
           "plot_summary", "run_grid", "summarize", "write_summary"]
