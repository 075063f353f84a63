"""Collect a finished sweep into ``sweep_results.csv`` and two figures.

One CSV row per member: every config field, the covariance label, status, final train/eval
loss, L* (where the closed form holds), the learned one-step numbers (eta, Gamma_eff error vs
Gamma*) for depth-1 linear members, and the references of ``icl_gd.theory.baselines.evaluate``
scored on the member's own held-out set: ``baseline_<name>`` columns (zero, ols, bayes =
posterior mean for linear targets, gd_k / pgd_k for k = 1..depth), and for k = depth

* ``gd_loss`` / ``gd_steps``: k steps of plain GD from w = 0 with per-step tuned step sizes;
* ``pgd_loss`` / ``pgd_steps``: the same preconditioned by the oracle Sigma^-1.

The Bayes-optimal loss is drawn in the depth figure.

A finished member's row is stored in its folder (``ROW_NAME``, keyed by its final step and the
baseline settings), so re-aggregating a sweep, or resuming one whose aggregation was stopped,
computes only the rows that are missing; the CSV and figures are redrawn only when some row
changed (``icl_gd.sweep.cache``).

Figures (matplotlib Agg): ``loss_vs_depth.png`` (learned eval loss vs depth per covariance /
noise, GD-k and PGD-k beside it) and ``eta_vs_noise.png`` (learned eta vs eta* = tr(Gamma*)/d).
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from icl_gd import theory, watchdog
from icl_gd.checkpoint import atomic_open
from icl_gd.config import Config
from icl_gd.data import covariance_matrix, prior_covariance
from icl_gd.sweep import cache
from icl_gd.sweep.grid import covariance_label, member_name
from icl_gd.theory.baselines import evaluate as evaluate_baselines
from icl_gd.theory.probes import one_step_summary

CSV_NAME, ROW_NAME, MANIFEST_NAME, ROW_VERSION = cache.CSV_NAME, cache.ROW_NAME, cache.MANIFEST_NAME, cache.ROW_VERSION
BASELINE_TUNE_TASKS = cache.BASELINE_TUNE_TASKS


def cached_member_row(cfg: Config, root: str, baselines: bool = True) -> dict[str, Any]:
    """``member_row``, reused from the member's folder when its checkpoint and settings are unchanged."""
    row = cache.load_row(cfg, root, baselines)
    if row is not None:
        return row
    with watchdog.stage(f"aggregating sweep member {member_name(cfg)}"):
        row = member_row(cfg, root, baselines)
    if row["status"] == "finished":
        cache.store_row(cfg, root, baselines, row)
    return row


def member_row(cfg: Config, root: str, baselines: bool = True) -> dict[str, Any]:
    """The CSV row of one member (status 'missing' when no checkpoint exists yet)."""
    workdir = os.path.join(root, member_name(cfg))
    row: dict[str, Any] = {"name": member_name(cfg), "covariance_label": covariance_label(cfg)}
    row.update({k: (";".join(f"{v:g}" for v in val) if isinstance(val, list) else val)
                for k, val in cfg.to_dict().items()})
    optimum = theory.config_optimum(cfg)
    if optimum is not None:
        row["loss_star"] = optimum[1]
        row["eta_star"] = float(np.trace(optimum[0]) / cfg.d)
    row["noise_floor"] = cfg.noise**2
    latest = cache.latest_step(workdir)
    if latest is None:
        row["status"], row["final_step"] = "missing", 0
    else:
        from icl_gd.run import load

        run = load(workdir)
        row["status"] = "finished" if run.step >= cfg.steps else "unfinished"
        row["final_step"] = run.step
        if run.metrics:
            row["train_loss"] = run.metrics[-1]["train_loss"]
            row["eval_loss"] = run.metrics[-1]["eval_loss"]
            if optimum is not None:
                row["eval_over_loss_star"] = row["eval_loss"] / optimum[1]
        row.update(one_step_summary(cfg, run.params))  # eta_learned, gamma_rel_error (depth-1 linear)
    if baselines:
        out = evaluate_baselines(cfg, max_steps=cfg.depth, num_tune_tasks=BASELINE_TUNE_TASKS)
        row.update({f"baseline_{name}": float(v["loss"]) for name, v in out.items()})
        for tag in ("gd", "pgd"):
            ref = out[f"{tag}_{cfg.depth}"]
            row[f"{tag}_loss"] = float(ref["loss"])
            row[f"{tag}_steps"] = ";".join(f"{e:g}" for e in ref["step_sizes"])
    return row


def write_csv(rows: Sequence[dict[str, Any]], path: str) -> None:
    """All rows, union of columns (config fields first, in row order of appearance)."""
    columns: list[str] = []
    for r in rows:
        columns.extend(k for k in r if k not in columns)
    with atomic_open(path, newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def read_csv(path: str) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _num(row: dict[str, Any], key: str) -> float:
    try:
        return float(row.get(key, "nan"))
    except (TypeError, ValueError):
        return math.nan


def _panel_key(row: dict[str, Any]) -> tuple:
    return (row["covariance_label"], float(row["noise"]), row["weight_prior"], int(row["d"]), int(row["n"]))


def plot_loss_vs_depth(rows: Sequence[dict[str, Any]], path: str) -> None:
    """One panel per (covariance, noise, prior, d, n): learned loss vs depth (seeds as dots,
    median as line; log scale) with GD-k, PGD-k, L* and the noise floor sigma^2."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        panels.setdefault(_panel_key(r), []).append(r)
    keys = sorted(panels)
    cols = min(3, len(keys))
    nrows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.4 * nrows), squeeze=False)
    for ax, key in zip(axes.flat, keys, strict=False):
        rs = panels[key]
        depths = sorted({int(r["depth"]) for r in rs})
        by_depth = {L: [r for r in rs if int(r["depth"]) == L] for L in depths}
        for L, group_rows in by_depth.items():
            ys = [_num(r, "eval_loss") for r in group_rows]
            ax.scatter([L] * len(ys), ys, color="C0", alpha=0.4, s=14)
        median = [np.nanmedian([_num(r, "eval_loss") for r in by_depth[L]]) for L in depths]
        ax.plot(depths, median, "o-", color="C0", label="trained LSA (median over seeds; dots: seeds)")
        refs = (("gd_loss", "C1", "GD, k=depth tuned steps"), ("pgd_loss", "C2", "Sigma^-1-PGD, k steps"))
        for col, color, label in refs:
            ys = [np.nanmean([_num(r, col) for r in by_depth[L]]) for L in depths]
            if np.any(np.isfinite(ys)):
                ax.plot(depths, ys, "s--", color=color, label=label)
        bayes = np.nanmean([_num(r, "baseline_bayes") for r in rs])
        if np.isfinite(bayes) and bayes > 1e-6:  # noiseless with n >= d it is ~0: off a log axis
            ax.axhline(bayes, color="C3", ls="--", lw=1, label="Bayes-optimal (posterior mean)")
        star = np.nanmean([_num(r, "loss_star") for r in rs])
        if np.isfinite(star):
            ax.axhline(star, color="k", ls=":", lw=1, label="L* (best 1 layer)")
        if key[1] > 0:
            ax.axhline(key[1] ** 2, color="gray", ls="-.", lw=1, label="noise floor")
        ax.set_title(f"{key[0]}, noise {key[1]:g}, {key[2]} prior, d={key[3]}, n={key[4]}", fontsize=8)
        ax.set_xlabel("depth L (= GD steps k)")
        ax.set_ylabel("held-out loss")
        ax.set_xticks(depths)
        ax.set_yscale("log")  # a diverged seed must not flatten the others
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(5, len(labels)), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_eta_vs_noise(rows: Sequence[dict[str, Any]], path: str) -> None:
    """Depth-1 members, one panel per (covariance, prior, d, n): learned eta = tr(Gamma_eff)/d vs
    noise (seeds as dots, median as line) with eta*(sigma) = tr(Gamma*(sigma))/d on a fine grid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rs = [r for r in rows if int(r["depth"]) == 1 and np.isfinite(_num(r, "eta_learned"))]
    series: dict[tuple, list[dict[str, Any]]] = {}
    for r in rs:
        series.setdefault((r["covariance_label"], r["weight_prior"], int(r["d"]), int(r["n"])), []).append(r)
    keys = sorted(series)
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.4), squeeze=False)
    for ax, key in zip(axes.flat, keys, strict=True):
        srs = series[key]
        noises = sorted({float(r["noise"]) for r in srs})
        ax.scatter([float(r["noise"]) for r in srs], [_num(r, "eta_learned") for r in srs], color="C0", alpha=0.5,
                   s=16, label="learned (seeds)")
        medians = [np.nanmedian([_num(r, "eta_learned") for r in srs if float(r["noise"]) == s]) for s in noises]
        ax.plot(noises, medians, "o-", color="C0", label="learned (median)")
        cfg = _row_config(srs[0])
        if theory.has_closed_form(cfg):
            sigma, omega = covariance_matrix(cfg), prior_covariance(cfg)
            grid = np.linspace(0.0, max(noises) * 1.1 + 1e-9, 50)
            law = (cfg.noise_dist, cfg.x_dist, cfg.dof)
            eta = [np.trace(theory.gamma_star(sigma, omega, cfg.n, s, *law)) / cfg.d for s in grid]
            ax.plot(grid, eta, "--", color="k", lw=1, label="eta* = tr(Gamma*)/d")
        ax.set_ylim(bottom=0)
        ax.set_title(f"{key[0]}, {key[1]} prior, d={key[2]}, n={key[3]}", fontsize=8)
        ax.set_xlabel("label noise sigma")
        ax.set_ylabel("eta")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _row_config(row: dict[str, Any]) -> Config:
    """Rebuild a Config from a CSV-or-dict row (the config fields only)."""
    fields = {f.name: f for f in dataclasses.fields(Config)}
    values: dict[str, Any] = {}
    for name, f in fields.items():
        v = row[name]
        if f.type.startswith("tuple"):
            v = tuple(float(x) for x in str(v).split(";") if x) if not isinstance(v, (list, tuple)) else tuple(v)
        elif f.type == "bool":
            v = v if isinstance(v, bool) else str(v) == "True"
        elif f.type == "int":
            v = int(v)
        elif f.type == "float":
            v = float(v)
        values[name] = v
    return Config(**values)


def aggregate(members: Sequence[Config], root: str, baselines: bool = True, write: bool = True) -> dict[str, str]:
    """Write ``ROOT/sweep_results.csv`` and the figures; returns their paths.

    Under jax.distributed every process must call this (orbax reads synchronise across
    processes); pass ``write`` on one process only.
    """
    rows = [cached_member_row(cfg, root, baselines) for cfg in members]
    paths = cache.output_paths(root, rows)
    if not write or cache.outputs_current(root, rows):  # nothing changed since they were drawn
        return paths
    write_csv(rows, paths["csv"])
    plot_loss_vs_depth(rows, paths["loss_vs_depth"])
    if "eta_vs_noise" in paths:
        plot_eta_vs_noise(rows, paths["eta_vs_noise"])
    cache.record_outputs(root, rows)
    return paths
