""""Where do tokens go?": the STEP analysis of a trained model over a whole split (``python -m tokred analyze``).

Modules:
    cells: labels on the patch grid (per-cell class counts, majority label) and per-token class counts.
    accumulate: ``FateAccumulator``, one pass over a split: halting per exit and class, accuracy of halted vs
        live cells, exit-head calibration, superpatch sizes and uniformity, per-image tokens and GFLOPs.
    calibration: reliability bins and expected calibration error; exit-head logits on every live cell.
    sweeps: training-free threshold sweeps (early-exit ``p0``, dCTS ``tau``) at evaluation time.
    gallery: token-fate pictures of images picked by rule (``tokred.viz.token_fate_figure``).
    figures: the PNG figures (matplotlib, Agg).
    report: tables (pandas CSV/JSON) and the ``report.md`` builder.
    write: the analysis folder: every table, figure, ``summary.json`` and ``report.md``.

The job that builds the model, reads the split and writes the folder is ``tokred.jobs.analyze``.
"""

from tokred.analysis.accumulate import FateAccumulator
from tokred.analysis.calibration import ReliabilityBins, exit_cell_logits, tap_blocks
from tokred.analysis.cells import cell_class_counts, majority_label, token_class_counts

__all__ = ["FateAccumulator", "ReliabilityBins", "cell_class_counts", "exit_cell_logits", "majority_label",
           "tap_blocks", "token_class_counts"]
