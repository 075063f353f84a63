"""The papers' claims as runnable experiments, each judged PASS/FAIL against the theory.

Every experiment trains what it needs through the sweep machinery (``icl_gd.sweep.run_sweep``:
one vmapped program per shape group, resumable, finished members skipped), analyses each
checkpoint with ``icl_gd.report.analyze_run`` (held-out loss, Gamma_eff, Gamma*, baselines) and
turns the numbers into ``Check``s with stated tolerances. ``beyond_*`` experiments go past the
papers (their open questions), each judged against a derived prediction: covariate laws, a prior
mean, an anisotropic prior alone, label-noise laws, low-rank heads, attention variants, depth on
nonlinear targets, test-time context length.

One module per paper or question (``mahankali``, ``ahn``, ``beyond``, ``context``, ``prior``,
``covariates``, ``symmetry``, ``heads``), each
ending in its ``EXPERIMENTS``; ``base`` holds the shared machinery; this module is the registry and ``run_experiment``.

Sizes: ``quick`` (d=3, n=10, 2000 steps x the experiment's length factor) and the papers' scale
(d=5, n=20, 4000 steps x the factor), both at 1024 tasks a step and both CPU-sized (see
docs/RESULTS.md for the wall time). ``steps`` overrides the training length (CI smoke tests).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

from absl import logging

import icl_gd
from icl_gd import report, sweep
from icl_gd.config import Config
from icl_gd.experiments import ahn, beyond, context, covariates, heads, mahankali, prior, symmetry
from icl_gd.experiments.base import Experiment, Outcome, Size, train_seconds

__all__ = ["EXPERIMENTS", "Experiment", "Outcome", "Size", "compile_ahead", "experiment_members", "run_experiment"]

EXPERIMENTS: dict[str, Experiment] = {e.name: e for e in (*mahankali.EXPERIMENTS, *ahn.EXPERIMENTS,
                                                             *beyond.EXPERIMENTS, *prior.EXPERIMENTS,
                                                             *context.EXPERIMENTS, *heads.EXPERIMENTS,
                                                             *symmetry.EXPERIMENTS, *covariates.EXPERIMENTS)}


def experiment_members(name: str, size: Size) -> list[Config]:
    """The configs the experiment trains at this size."""
    members = EXPERIMENTS[name].members(size)
    return members[:2] if size.steps else members  # smoke-test size: two members exercise every code path


def compile_ahead(names: list[str], root: str, size: Size, log: Callable[[str], None] = logging.info) -> Any:
    """A ``sweep.engine.Precompiler`` over every training group of these experiments, in order: each
    group compiles while the previous one trains or the previous experiment is analysed."""
    from icl_gd.sweep.engine import Precompiler

    return Precompiler([(g, os.path.join(root, name)) for name in names
                        for g in sweep.group(experiment_members(name, size))], log=log)


def run_experiment(name: str, root: str, size: Size, log: Callable[[str], None] = logging.info,
                   ahead: Any = None) -> Outcome:
    """Train (or reuse) the experiment's runs under ``root/name``, analyse, judge and plot; ``ahead``: a
    ``compile_ahead`` Precompiler spanning this and later experiments."""
    exp = EXPERIMENTS[name]
    folder = os.path.join(root, name)
    members = experiment_members(name, size)
    sweep.run_sweep(members, folder, log=log, ahead=ahead)
    summaries = []
    for cfg in members:
        run = icl_gd.load(os.path.join(folder, sweep.member_name(cfg)))
        max_steps = max(cfg.depth for cfg in members)
        summaries.append(report.analyze_run(run, max_steps=max_steps, **size.analysis_kwargs))
        if exp.probe is not None:
            summaries[-1]["probe"] = exp.probe(run, size)
    checks, numbers = exp.judge(summaries, size)
    figure = os.path.join(folder, f"{name}.png")
    exp.plot(summaries, figure)
    trained = sum(train_seconds(s["history"]) for s in summaries)
    outcome = Outcome(name, exp.claim, checks, numbers, figure, exp.reported_only, trained)
    with open(os.path.join(folder, "results.json"), "w") as f:
        json.dump(outcome.to_dict(), f, indent=2, default=float)
    return outcome
