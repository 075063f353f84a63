"""report.md and summary.json of one run or a folder of runs; a re-run reuses stored summaries."""

from __future__ import annotations

import json
import os
from typing import Any

from icl_gd import watchdog
from icl_gd.checkpoint import atomic_open
from icl_gd.data import DISTRIBUTION_FIELDS
from icl_gd.report.figures import plot_depth, plot_gamma, plot_training, plot_weights
from icl_gd.report.numbers import analyze_run
from icl_gd.run import Run


def _fmt(v: Any) -> str:
    return "–" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))


def markdown(summary: dict, figures: dict[str, str], title: str) -> str:
    """A GitHub-readable report of one run; figure paths are relative to the report."""
    c = summary["config"]
    lines = [f"# {title}", "",
             f"`{summary['workdir']}` at step {summary['step']}: d={c['d']}, n={c['n']}, covariance={c['covariance']}"
             f" (cond {c['cond']}), prior={c['weight_prior']}, noise sigma={c['noise']}, x={c['x_dist']}, "
             f"target={c['target']}; depth={c['depth']}, {c['parameterization']} {c['attention']} attention.", "",
             "## Learned vs theory", "", "| quantity | learned | theory |", "|---|---|---|",
             f"| held-out loss | {summary['loss']:.4f} ± {summary['loss_stderr']:.4f} | L* = {summary['loss_star']:.4f}"
             f" ({summary['loss_star_source'].replace('_', ' ')}; {summary['loss_star_heldout']:.4f} on the same"
             " tasks) |",
             f"| loss / L* - 1 | {summary['loss_over_loss_star']:+.2%} | 0 for a 1-layer optimum |"]
    depth = c["depth"]
    for name in (f"gd_{depth}", f"pgd_{depth}"):
        if depth > 1 and name in summary["baselines"]:
            ref = summary["baselines"][name]["loss"]
            lines.append(f"| loss / {name} loss - 1 ({depth} tuned GD steps) | {summary['loss'] / ref - 1:+.2%} | "
                         f"{name} = {ref:.4f} |")
    if summary["gamma_learned"] is not None:
        lines += [
            f"| rel. error ‖Γ_eff − Γ*‖_F/‖Γ*‖_F | {summary['rel_error']:.2%} | 0 |",
            f"| best scalar η = tr(Γ)/d | {summary['eta_learned']:.4f} | {summary['eta_star']:.4f} |",
            f"| residual of scalar fit | {summary['scalar_fit_residual']:.3f} | "
            f"{summary['scalar_fit_residual_star']:.3f} |",
            f"| Ahn et al. dist(Σ^½ΓΣ^½, I) | {summary['ahn_distance']:.3f} | {summary['ahn_distance_star']:.3f} |",
            f"| share of output not from the GD term | {summary['non_gd_output_fraction']:.2%} | 0 |",
        ]
        if "exact_loss_of_gamma_learned" in summary:
            lines.append(f"| exact population loss of Γ_eff | {summary['exact_loss_of_gamma_learned']:.4f} | "
                         f"{summary['loss_star']:.4f} |")
    for name, cos in summary["sensitivity_cosine"].items():
        lines.append(f"| cos(∂ŷ/∂x_q, {name}) mean / 5th pct | {cos['mean']:.4f} / {cos['p05']:.4f} | 1 |")
    if summary["gamma_learned"] is not None:
        t = summary["non_gd_terms"]
        lines += ["", "Terms the GD form says must vanish (Frobenius norms; ‖Γ_eff‖ = "
                  f"{t['gamma']:.3g} for scale): " + ", ".join(f"{k} = {v:.3g}" for k, v in t.items() if k != "gamma")
                  + "."]
    if "layers" in summary:
        lay = summary["layers"]
        lines += ["", f"Per-layer preconditioners ({'exact' if lay['exact'] else 'sparse blocks of a full model'}),"
                  f" output scale c = {lay['output_scale']:.3f}:", "", "| layer | η = tr(Γ_l)/d | scalar residual |"
                  " Ahn dist | off-GD weight norms |", "|---|---|---|---|---|"]
        offs = lay["off_sparse_norms"] * (len(lay["scalar_fits"]) if len(lay["off_sparse_norms"]) == 1 else 1)
        for i, (fit, dist, off) in enumerate(zip(lay["scalar_fits"], lay["ahn_distances"], offs)):
            lines.append(f"| {i} | {fit['eta']:.4f} | {fit['residual']:.3f} | {dist:.3f} | "
                         + ", ".join(f"{k} {v:.2g}" for k, v in off.items()) + " |")
    if "general_form" in summary and "general_form_opt" in summary["baselines"]:
        g, opt = summary["general_form"], summary["baselines"]["general_form_opt"]
        lines += ["", "Ahn et al.'s general form per layer: A_l against a_l Σ⁻¹ and B_l against b_l I (the last "
                  "layer's B_l never reaches the prediction):", "",
                  "| layer | learned a_l | optimum a_l | dist(Σ^½A_lΣ^½, I) | learned b_l | optimum b_l | "
                  "‖B_l − b_l I‖/‖B_l‖ |", "|---|---|---|---|---|---|---|"]
        for i in range(len(g["a"])):
            lines.append(f"| {i + 1} | {g['a'][i]:.4g} | {opt['a'][i]:.4g} | {g['a_distance'][i]:.3f} | "
                         f"{g['b'][i]:.4g} | {opt['b'][i]:.4g} | {g['b_residual'][i]:.3f} |")
    lines += ["", "## Baselines (same held-out tasks)", "", "| predictor | loss | ± s.e. | notes |",
              "|---|---|---|---|",
              f"| **trained model** | {summary['loss']:.4g} | {summary['loss_stderr']:.2g} | |"]
    for name, b in summary["baselines"].items():
        note = b["description"]
        if "step_sizes" in b:
            note += ": η = " + ", ".join(f"{e:.3f}" for e in b["step_sizes"])
        lines.append(f"| {name} | {b['loss']:.4g} | {b['stderr']:.2g} | {note} |")
    lines += ["", "## Figures", ""]
    captions = {"training": "Training curve", "gamma": "Effective preconditioner vs theory",
                "weights": "Learned W_K^T W_Q and W_V^T h"}
    for key, rel in figures.items():
        lines += [f"**{captions.get(key, key)}**", "", f"![{captions.get(key, key)}]({rel})", ""]
    return "\n".join(lines) + "\n"


def _cached_summary(path: str, run: Run, settings: dict) -> dict | None:
    """The summary.json already in ``path`` when it is of this checkpoint and these settings."""
    try:
        with open(path) as f:
            old = json.load(f)
    except (OSError, ValueError):
        return None
    same = (old.get("step") == run.step and old.get("config") == run.config.to_dict()
            and old.get("analysis_settings") == settings)
    return old if same else None


def write_run_report(run: Run, out_dir: str, title: str | None = None, **kwargs) -> dict:
    """analyze_run + figures + summary.json + report.md into ``out_dir``; returns the summary.

    summary.json is written before the figures; a re-run on the same checkpoint with the same
    settings reuses it (after a hang or a crash in the figures, or for a folder of runs where
    earlier runs finished), so only the missing stages are computed again.
    """
    os.makedirs(out_dir, exist_ok=True)
    settings = {k: v for k, v in sorted(kwargs.items())}
    summary_path = os.path.join(out_dir, "summary.json")
    summary = _cached_summary(summary_path, run, settings)
    if summary is None:
        summary = analyze_run(run, **kwargs)
        summary["analysis_settings"] = settings
        _write_json(summary, summary_path)
    figures = {}
    with watchdog.stage(f"figures of {out_dir}"):
        if summary["history"]:
            plot_training(summary, os.path.join(out_dir, "training.png"))
            figures["training"] = "training.png"
        if summary["gamma_learned"] is not None or "layers" in summary:
            plot_gamma(summary, os.path.join(out_dir, "gamma.png"))
            figures["gamma"] = "gamma.png"
        if run.config.attention == "linear":
            plot_weights(run, os.path.join(out_dir, "weights.png"))
            figures["weights"] = "weights.png"
    summary["figures"] = figures
    _write_json(summary, summary_path)
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write(markdown(summary, figures, title or f"Trained vs theory: {os.path.basename(run.workdir.rstrip('/'))}"))
    return summary


def _write_json(obj: dict, path: str) -> None:
    """Write atomically (temp file + rename): a killed process never leaves a half-written summary."""
    with atomic_open(path) as f:
        json.dump(obj, f, indent=2)


def write_folder_report(runs: dict[str, Run], out_dir: str, **kwargs) -> dict:
    """One report per run under ``out_dir/<name>/``, plus a summary of all runs and the depth figure.

    Runs sharing a task distribution get baselines up to their largest depth, so their k-step
    GD curves line up.
    """
    os.makedirs(out_dir, exist_ok=True)
    depth_of: dict[str, int] = {}
    for r in runs.values():
        key = json.dumps({f: r.config.to_dict()[f] for f in DISTRIBUTION_FIELDS}, sort_keys=True)
        depth_of[key] = max(depth_of.get(key, 3), r.config.depth)
    summaries = {}
    for name, r in runs.items():
        key = json.dumps({f: r.config.to_dict()[f] for f in DISTRIBUTION_FIELDS}, sort_keys=True)
        summaries[name] = write_run_report(r, os.path.join(out_dir, name), title=f"Trained vs theory: {name}",
                                           max_steps=depth_of[key], **kwargs)
    has_depth = plot_depth(summaries, os.path.join(out_dir, "depth.png"))
    keys = ("loss", "loss_stderr", "loss_star", "loss_over_loss_star", "rel_error", "eta_learned", "eta_star")
    table = {name: {k: s.get(k) for k in keys} | {"depth": s["config"]["depth"]} for name, s in summaries.items()}
    _write_json({"runs": summaries, "table": table}, os.path.join(out_dir, "summary.json"))
    lines = ["# Trained vs theory: all runs", "", "| run | depth | loss | L* | loss/L*−1 | rel. error Γ | η learned |"
             " η* |", "|---|---|---|---|---|---|---|---|"]
    for name, t in table.items():
        lines.append(f"| [{name}]({name}/report.md) | {t['depth']} | {t['loss']:.4f} | {t['loss_star']:.4f} | "
                     f"{t['loss_over_loss_star']:+.2%} | "
                     + (f"{t['rel_error']:.2%}" if t["rel_error"] is not None else "–")
                     + f" | {_fmt(t['eta_learned'])} | {_fmt(t['eta_star'])} |")
    if has_depth:
        lines += ["", "**Loss against depth, next to k-step GD and preconditioned GD**", "",
                  "![Loss against depth](depth.png)"]
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return {"runs": summaries, "table": table}


def write_off_distribution(run: Run, out: str, name: str, ns: list[int], shifts: dict[str, list[float]],
                           compare_gd: bool, num_tasks: int, tune_tasks: int) -> list[str]:
    """The run beyond its training distribution, as JSON and figures in ``out``: the loss against
    context length ``ns`` (context_length.*), shift curves per field in ``shifts`` (shifts.*; "cond"
    means a rotated Sigma of that condition) and the comparison with its GD construction
    (compare_gd.*). Returns one line per thing written."""
    from icl_gd.report.figures import plot_gd_comparison, plot_shift_curves
    from icl_gd.theory import compare, shifted

    os.makedirs(out, exist_ok=True)
    cfg, lines = run.config, []

    def dump(obj: Any, filename: str) -> None:
        with atomic_open(os.path.join(out, filename)) as f:
            json.dump(obj, f, indent=1)

    if ns:
        curve = shifted.context_curve(cfg, run.params, ns, num_tasks, tune_tasks)
        dump(curve, "context_length.json")
        plot_shift_curves({"n": (curve, cfg.n)}, name, os.path.join(out, "context_length.png"))
        lines.append(f"{name}: context-length curve in {os.path.join(out, 'context_length.png')}")
    if shifts:
        curves = {}
        for field, values in shifts.items():
            fixed = {"covariance": "cond", "rotate": True} if field == "cond" else {}
            trained = getattr(cfg, field) if field != "cond" or cfg.covariance == "cond" else 1.0
            curves[field] = (shifted.shift_curve(cfg, run.params, field, values, num_tasks, tune_tasks, **fixed),
                             trained)
        dump({k: v[0] for k, v in curves.items()}, "shifts.json")
        plot_shift_curves(curves, name, os.path.join(out, "shifts.png"))
        lines.append(f"{name}: shift curves in {os.path.join(out, 'shifts.png')}")
    if compare_gd:
        res = compare.compare(cfg, run.params, num_tune_tasks=tune_tasks)
        if res is None:
            lines.append(f"{name}: no GD construction (softmax attention or key_size < d)")
        else:
            dump(res, "compare_gd.json")
            plot_gd_comparison(res, f"{name} vs {res['construction']}", os.path.join(out, "compare_gd.png"))
            lines.append(f"{name}: vs its GD construction: prediction difference {res['prediction_difference']:.4g}, "
                         f"sensitivity cosine {res['sensitivity_cosine']:.4f} (compare_gd.png)")
    return lines
