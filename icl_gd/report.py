"""Trained-vs-theory report of checkpointed runs: numbers (summary.json), figures (PNG), report.md.

``analyze_run`` answers, for one checkpoint: does the model implement (preconditioned) GD, and how
far is it from the theory's optimum? ``analyze_runs`` does it for a folder of runs and adds the
loss-against-depth figure next to k-step GD / preconditioned GD. Plots use matplotlib's Agg backend.
"""

from __future__ import annotations

import json
import os
from typing import Any

import matplotlib

matplotlib.use("Agg")
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib import ticker  # noqa: E402

from icl_gd import analysis, baselines, theory, watchdog  # noqa: E402
from icl_gd.config import Config  # noqa: E402
from icl_gd.data import TaskSpec, covariance_matrix, distribution, prior_covariance, sample_tasks  # noqa: E402
from icl_gd.keys import eval_chunks, run_keys  # noqa: E402
from icl_gd.run import Run  # noqa: E402

DISTRIBUTION_FIELDS = ("d", "n", "covariance", "cond", "eigenvalues", "rotate", "rotation_seed", "x_dist", "dof",
                       "weight_prior", "noise", "target", "relu_width", "seed", "eval_tasks")
MC_GAMMA_TASKS = 2**18


# ---------------------------------------------------------------------------------------
# Numbers.
# ---------------------------------------------------------------------------------------
def one_layer_optimum(cfg: Config, mc_tasks: int = MC_GAMMA_TASKS) -> dict[str, Any]:
    """Gamma* and L* of the best one-layer LSA: closed form where it exists, else Monte Carlo
    (``theory.mc_gamma_star`` on tasks from the baseline-tuning stream, never the held-out set)."""
    optimum = theory.config_optimum(cfg)
    if optimum is not None:
        return {"gamma_star": optimum[0], "loss_star": optimum[1], "source": "closed_form", "gamma_star_stderr": None}
    key = jax.random.fold_in(baselines.tune_key(cfg.seed), 1)
    with watchdog.stage(f"Monte-Carlo one-layer optimum on {mc_tasks} tasks"):
        est = theory.mc_gamma_star(key, distribution(cfg), TaskSpec.from_config(cfg), mc_tasks)
    return {"gamma_star": est.value, "loss_star": None, "source": "monte_carlo", "gamma_star_stderr": est.stderr}


def analyze_run(run: Run, max_steps: int | None = None, num_tune_tasks: int = 2**15,
                mc_tasks: int = MC_GAMMA_TASKS) -> dict[str, Any]:
    """Every learned-vs-theory number of one checkpoint (JSON-ready). See ``report.md`` for a reading guide.

    loss / loss_star: the model's held-out loss and the best one-layer loss L* (exact, or the MC
    Gamma*'s loss on the same held-out tasks); gamma_learned / gamma_star / rel_error: one-layer
    effective preconditioner vs Gamma* (depth 1, linear attention); baselines: every baseline on
    the same held-out tasks; layers: per-layer preconditioners of deeper models.
    """
    cfg, params = run.config, run.params
    linear = cfg.attention == "linear"
    max_steps = max_steps or max(cfg.depth, 3)
    opt = one_layer_optimum(cfg, mc_tasks)
    g_star = opt["gamma_star"]
    res = baselines.evaluate(cfg, max_steps, params, g_star, num_tune_tasks)
    model = res.pop("model")
    loss_star = opt["loss_star"] if opt["loss_star"] is not None else res["one_layer_opt"]["loss"]
    sigma, omega = covariance_matrix(cfg), prior_covariance(cfg)

    out: dict[str, Any] = {
        "workdir": run.workdir,
        "step": run.step,
        "config": cfg.to_dict(),
        "loss": model["loss"],
        "loss_stderr": model["stderr"],
        "loss_star": loss_star,
        "loss_star_source": opt["source"],
        "loss_over_loss_star": model["loss"] / loss_star - 1.0,
        "loss_star_heldout": res["one_layer_opt"]["loss"],
        "gamma_star": analysis.to_list(g_star),
        "gamma_star_stderr": None if opt["gamma_star_stderr"] is None else analysis.to_list(opt["gamma_star_stderr"]),
        "eta_star": float(np.trace(g_star) / cfg.d),
        "ahn_distance_star": analysis.ahn_distance(g_star, sigma),
        "gamma_learned": None,
        "rel_error": None,
        "baselines": res,
        "history": run.metrics,
    }
    if linear and cfg.depth == 1:
        gamma = analysis.effective_gamma(params, cfg)
        eta, scalar_res = analysis.scalar_fit(gamma)
        c_inv, inv_res = analysis.shape_fit(gamma, np.linalg.inv(sigma))
        out.update({
            "gamma_learned": analysis.to_list(gamma),
            "rel_error": analysis.relative_error(gamma, g_star),
            "eta_learned": eta,
            "scalar_fit_residual": scalar_res,
            "scalar_fit_residual_star": analysis.scalar_fit(g_star)[1],
            "sigma_inv_fit": {"scale": c_inv, "residual": inv_res},
            "ahn_distance": analysis.ahn_distance(gamma, sigma),
            "non_gd_terms": analysis.one_layer_terms(params, cfg),
        })
        if theory.has_closed_form(cfg):
            out["exact_loss_of_gamma_learned"] = theory.loss_of_gamma(gamma, sigma, omega, cfg.n, cfg.noise)
    if linear and cfg.depth > 1:
        gammas, scale = analysis.layer_preconditioners(params, cfg)
        out["layers"] = {
            "exact": cfg.parameterization == "sparse",
            "preconditioners": analysis.to_list(gammas),
            "output_scale": scale,
            "scalar_fits": [dict(zip(("eta", "residual"), analysis.scalar_fit(g))) for g in gammas],
            "ahn_distances": [analysis.ahn_distance(g, sigma) for g in gammas],
            "off_sparse_norms": analysis.off_sparse_norms(params, cfg),
        }
    out.update(_sensitivity_numbers(cfg, params, res, g_star))
    return out


def _sensitivity_numbers(cfg: Config, params: Any, res: dict, g_star: np.ndarray) -> dict[str, Any]:
    """Cosines of d yhat / d x_q against reference predictors on the first held-out chunk."""
    _, size = eval_chunks(cfg)
    tasks = sample_tasks(jax.random.fold_in(run_keys(cfg.seed)["eval"], 0), distribution(cfg),
                         TaskSpec.from_config(cfg), size)
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    refs = {"one_layer_opt": (theory.one_step_predict, (f32(g_star),))}
    k = cfg.depth
    for tag, precond in (("gd", np.eye(cfg.d)), ("pgd", theory.oracle_preconditioner(cfg))):
        name = f"{tag}_{k}"
        if name in res:
            refs[name] = (theory.scaled_pgd_predict, (f32(res[name]["step_sizes"]), f32(precond)))
    predict = baselines.model_predictor(cfg)
    out: dict[str, Any] = {"sensitivity_cosine": analysis.sensitivity_cosines(predict, (params,), refs, tasks)}
    if cfg.attention == "linear" and cfg.depth == 1:
        out["non_gd_output_fraction"] = analysis.gd_part_fraction(params, cfg, tasks, predict, (params,))
    return out


# ---------------------------------------------------------------------------------------
# Figures.
# ---------------------------------------------------------------------------------------
def _log_y(ax) -> None:
    """Log y axis with plain-number tick labels (0.3, not 3 x 10^-1)."""
    ax.set_yscale("log")
    fmt = ticker.FuncFormatter(lambda v, _: f"{v:g}")
    ax.yaxis.set_major_formatter(fmt)
    ax.yaxis.set_minor_formatter(fmt)
    ax.tick_params(axis="y", which="minor", labelsize=7)


def _labels(d: int) -> list[str]:
    return [f"x{i + 1}" for i in range(d)] + ["y"]


def _heatmap(ax, m: np.ndarray, title: str, xlabels: list[str], ylabels: list[str], vmax: float | None = None,
             annotate: bool = True):
    vmax = vmax or float(np.max(np.abs(m))) or 1.0
    im = ax.imshow(m, cmap="RdBu_r", vmin=-vmax, vmax=vmax)
    ax.set_title(title, fontsize=10)
    ax.set_xticks(range(m.shape[1]), xlabels, fontsize=8)
    ax.set_yticks(range(m.shape[0]), ylabels, fontsize=8)
    if annotate and m.size <= 64:
        decimals = int(np.clip(2 - np.floor(np.log10(vmax)), 0, 6))  # same width for every cell
        for (i, j), v in np.ndenumerate(m):
            text = f"{v:.{decimals}f}"
            text = text.lstrip("-") if float(text) == 0 else text
            ax.text(j, i, text, ha="center", va="center", fontsize=7,
                    color="white" if abs(v) > 0.6 * vmax else "black")
    plt.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    return im


def plot_weights(run: Run, path: str, max_rows: int = 6) -> None:
    """Heatmaps of B = W_K^T W_Q and u = W_V^T h for every (layer, head) (first ``max_rows``)."""
    cfg = run.config
    rows = []
    for layer in range(len(run.params["layers"])):
        b, wv, h = analysis.layer_blocks(run.params, cfg, layer)
        u = np.einsum("hrc,r->hc", wv, h)
        rows += [(layer, head, b[head], u[head]) for head in range(len(b))]
    rows = rows[:max_rows]
    labels = _labels(cfg.d)
    fig, axes = plt.subplots(len(rows), 2, figsize=(7.5, 3.8 * len(rows)), squeeze=False,
                             gridspec_kw={"width_ratios": [4, 1]})
    for (layer, head, b, u), (ax_b, ax_u) in zip(rows, axes):
        tag = f"layer {layer}" + (f", head {head}" if cfg.heads > 1 else "")
        _heatmap(ax_b, b, f"B = W_K^T W_Q ({tag})\nrows: key token, cols: query token", labels, labels)
        _heatmap(ax_u, u[:, None], f"u = W_V^T h\n({tag})", [""], labels)
    fig.suptitle(f"Learned weights, step {run.step}. GD form: only B_xx and u_y matter; column y of B\n"
                 "never reaches the prediction (the query's y entry is 0)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_gamma(summary: dict, path: str) -> None:
    """Gamma_eff beside Gamma* on one colour scale, and their difference (depth-1 models);
    per-layer preconditioners Gamma_l for deeper ones."""
    d = summary["config"]["d"]
    xl = [f"x{i + 1}" for i in range(d)]
    if summary["gamma_learned"] is not None:
        g, gs = np.asarray(summary["gamma_learned"]), np.asarray(summary["gamma_star"])
        vmax = float(max(np.abs(g).max(), np.abs(gs).max()))
        fig, axes = plt.subplots(1, 3, figsize=(13, 4))
        _heatmap(axes[0], g, "learned Gamma_eff (from W_K^T W_Q, W_V^T h)", xl, xl, vmax)
        src = "closed form" if summary["loss_star_source"] == "closed_form" else "Monte Carlo"
        _heatmap(axes[1], gs, f"theory Gamma* ({src})", xl, xl, vmax)
        _heatmap(axes[2], g - gs, "Gamma_eff - Gamma*", xl, xl)
        fig.suptitle(f"One-layer preconditioner: relative Frobenius error {summary['rel_error']:.2%}", fontsize=11)
    elif "layers" in summary:
        gammas = np.asarray(summary["layers"]["preconditioners"])
        fig, axes = plt.subplots(1, len(gammas), figsize=(4.3 * len(gammas), 4), squeeze=False)
        for i, (ax, g) in enumerate(zip(axes[0], gammas)):
            _heatmap(ax, g, f"layer {i}: Gamma_{i} = -p A^T", xl, xl)
        exact = "exact (sparse model)" if summary["layers"]["exact"] else "sparse blocks only (full model)"
        fig.suptitle(f"Per-layer preconditioners, {exact}; output scale c = {summary['layers']['output_scale']:.3f}",
                     fontsize=11)
    else:
        return
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_training(summary: dict, path: str) -> None:
    """Train and held-out loss against step, with L* and the Bayes floor as horizontal lines."""
    hist = summary["history"]
    if not hist:
        return
    steps = [h["step"] for h in hist]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot(steps, [h["train_loss"] for h in hist], "o-", label="train loss", ms=3)
    ax.plot(steps, [h["eval_loss"] for h in hist], "s-", label="held-out loss", ms=3)
    ax.axhline(summary["loss_star"], color="k", ls="--", label=f"L* (best 1-layer) = {summary['loss_star']:.4f}")
    depth = summary["config"]["depth"]
    for name, style in ((f"gd_{depth}", ":"), (f"pgd_{depth}", "-.")):
        if name in summary["baselines"] and depth > 1:
            ax.axhline(summary["baselines"][name]["loss"], color="gray", ls=style,
                       label=f"{name} (tuned) = {summary['baselines'][name]['loss']:.4f}")
    if "bayes" in summary["baselines"] and summary["baselines"]["bayes"]["loss"] > 1e-6:
        ax.axhline(summary["baselines"]["bayes"]["loss"], color="tab:green", ls=":",
                   label=f"Bayes posterior mean = {summary['baselines']['bayes']['loss']:.4f}")
    values = [h["train_loss"] for h in hist] + [h["eval_loss"] for h in hist] + [summary["loss_star"]]
    if max(values) / max(min(values), 1e-12) > 5:
        _log_y(ax)
    ax.set_xlabel("training step")
    ax.set_ylabel("mean squared query error")
    ax.set_title("Training curve")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_depth(summaries: dict[str, dict], path: str) -> bool:
    """Loss against depth for runs sharing a task distribution, next to k-step GD / PGD (tuned)."""
    groups: dict[str, list[dict]] = {}
    for s in summaries.values():
        key = json.dumps({f: s["config"][f] for f in DISTRIBUTION_FIELDS}, sort_keys=True)
        groups.setdefault(key, []).append(s)
    groups = {k: v for k, v in groups.items() if len({s["config"]["depth"] for s in v}) > 1 or len(v) > 1}
    if not groups:
        return False
    fig, axes = plt.subplots(1, len(groups), figsize=(6.5 * len(groups), 4.5), squeeze=False)
    for ax, runs in zip(axes[0], groups.values()):
        ref = max(runs, key=lambda s: len(s["baselines"]))
        ks = sorted(int(n.split("_")[1]) for n in ref["baselines"] if n.startswith("gd_"))
        for tag, label, style, size in (("gd", "k-step GD (tuned steps)", "o--", 11),
                                        ("pgd", "k-step Sigma^-1-preconditioned GD", "s--", 6)):
            ax.plot(ks, [ref["baselines"][f"{tag}_{k}"]["loss"] for k in ks], style, label=label, alpha=0.8, ms=size,
                    mfc="none" if tag == "gd" else None)
        by_kind: dict[str, list] = {}
        for s in runs:
            kind = f"{s['config']['parameterization']} LSA"
            by_kind.setdefault(kind, []).append((s["config"]["depth"], s["loss"], s["loss_stderr"]))
        for kind, pts in by_kind.items():
            pts.sort()
            ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[2 * p[2] for p in pts], fmt="D-", ms=7,
                        capsize=3, label=f"trained {kind} (depth L)")
        ax.axhline(ref["loss_star"], color="k", ls=":", label="L* (best 1-layer)")
        if "bayes" in ref["baselines"] and ref["baselines"]["bayes"]["loss"] > 1e-6:
            ax.axhline(ref["baselines"]["bayes"]["loss"], color="tab:green", ls=":", label="Bayes posterior mean")
        c = ref["config"]
        ax.set_title(f"d={c['d']}, n={c['n']}, {c['covariance']}, prior={c['weight_prior']}, sigma={c['noise']}",
                     fontsize=10)
        ax.set_xlabel("depth L (layers) / GD steps k")
        ax.set_ylabel("held-out mean squared error")
        _log_y(ax)
        ax.set_xticks(ks)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ---------------------------------------------------------------------------------------
# Markdown.
# ---------------------------------------------------------------------------------------
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
    lines += ["", "## Baselines (same held-out tasks)", "", "| predictor | loss | ± s.e. | notes |",
              "|---|---|---|---|",
              f"| **trained model** | {summary['loss']:.4f} | {summary['loss_stderr']:.4f} | |"]
    for name, b in summary["baselines"].items():
        note = b["description"]
        if "step_sizes" in b:
            note += ": η = " + ", ".join(f"{e:.3f}" for e in b["step_sizes"])
        lines.append(f"| {name} | {b['loss']:.4f} | {b['stderr']:.4f} | {note} |")
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
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


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
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump({"runs": summaries, "table": table}, f, indent=2)
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
