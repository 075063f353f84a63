"""Trained-vs-theory report of checkpointed runs: numbers (summary.json), figures (PNG), report.md.

``analyze_run`` answers, for one checkpoint: does the model implement (preconditioned) GD, and how
far is it from the theory's optimum? ``write_folder_report`` does it for a folder of runs and adds the
loss-against-depth figure next to k-step GD / preconditioned GD. Plots use matplotlib's Agg backend.

One module per job: ``numbers`` (analyze_run), ``figures`` (plots), ``writer`` (report.md and
summary.json of a run or a folder of runs; a re-run reuses stored summaries).
"""

from icl_gd.data import DISTRIBUTION_FIELDS
from icl_gd.report.figures import (
    depth_axes,
    general_form_heatmaps,
    plot_depth,
    plot_gamma,
    plot_training,
    plot_weights,
)
from icl_gd.report.numbers import MC_GAMMA_TASKS, analyze_run, one_layer_optimum
from icl_gd.report.writer import markdown, write_folder_report, write_off_distribution, write_run_report

__all__ = ["DISTRIBUTION_FIELDS", "MC_GAMMA_TASKS", "analyze_run", "depth_axes", "general_form_heatmaps", "markdown",
           "one_layer_optimum", "plot_depth", "plot_gamma", "plot_training", "plot_weights", "write_folder_report",
           "write_off_distribution", "write_run_report"]
