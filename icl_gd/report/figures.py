"""The report's figures (matplotlib Agg): weights, Gamma_eff vs Gamma*, training curve, loss vs depth."""

from __future__ import annotations

import json
import textwrap

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib import ticker  # noqa: E402

from icl_gd.data import DISTRIBUTION_FIELDS  # noqa: E402
from icl_gd.run import Run  # noqa: E402
from icl_gd.theory import probes  # noqa: E402


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
        b, wv, h = probes.layer_blocks(run.params, cfg, layer)
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
        depth_axes(ax, runs)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def depth_axes(ax, runs: list[dict]) -> None:
    """One panel of ``plot_depth``: trained models of every parameterisation against depth, k-step GD
    and PGD (tuned), the (a, b) optimum of Ahn et al.'s general form where analysed, L*, Bayes, OLS."""
    ref = max(runs, key=lambda s: len(s["baselines"]))
    ks = sorted(int(n.split("_")[1]) for n in ref["baselines"] if n.startswith("gd_"))
    for tag, label, style, size in (("gd", "k-step GD (tuned steps)", "o--", 11),
                                    ("pgd", "k-step Sigma^-1-preconditioned GD", "s--", 6)):
        ax.plot(ks, [ref["baselines"][f"{tag}_{k}"]["loss"] for k in ks], style, label=label, alpha=0.8, ms=size,
                mfc="none" if tag == "gd" else None)
    general = sorted({(s["config"]["depth"], s["baselines"]["general_form_opt"]["loss"]) for s in runs
                      if "general_form_opt" in s["baselines"]})
    if general:
        ax.plot(*zip(*general), "x-", color="tab:purple", ms=9, label="general form, (a, b) optimum (theory)")
    by_kind: dict[str, list] = {}
    for s in runs:
        kind = f"{s['config']['parameterization']} LSA"
        by_kind.setdefault(kind, []).append((s["config"]["depth"], s["loss"], s["loss_stderr"]))
    for kind, pts in sorted(by_kind.items()):
        pts.sort()
        ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[2 * p[2] for p in pts], fmt="D-", ms=7,
                    capsize=3, label=f"trained {kind} (depth L)")
    ax.axhline(ref["loss_star"], color="k", ls=":", label="L* (best 1-layer)")
    for name, label, color in (("bayes", "Bayes posterior mean", "tab:green"), ("ols", "OLS", "tab:gray")):
        if name not in ref["baselines"]:
            continue
        loss = ref["baselines"][name]["loss"]
        if loss > 1e-6:
            ax.axhline(loss, color=color, ls=":", label=label)
        else:  # exact on noiseless data: a line at 1e-14 would squash the panel
            ax.plot([], [], " ", label=f"{label}: {loss:.1e} (below the axis)")
    c = ref["config"]
    ax.set_title(f"d={c['d']}, n={c['n']}, {c['covariance']}, prior={c['weight_prior']}, sigma={c['noise']}",
                 fontsize=10)
    ax.set_xlabel("depth L (layers) / GD steps k")
    ax.set_ylabel("held-out mean squared error")
    _log_y(ax)
    lo, hi = ax.get_ylim()
    if hi / lo > 100:  # many decades: label the powers of ten only, or the minor labels collide
        ax.yaxis.set_minor_formatter(ticker.NullFormatter())
    ax.set_xticks(ks)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)


def general_form_heatmaps(axes: np.ndarray, summary: dict, sigma: np.ndarray) -> None:
    """Per layer (columns) of a block model: Sigma^1/2 A_l Sigma^1/2 (top; a_l I at the theory's
    critical point) and B_l (bottom; b_l I), from ``summary['general_form']``."""
    g = summary["general_form"]
    root = probes.sym_sqrt(sigma)
    d = len(sigma)
    names = [f"x{i + 1}" for i in range(d)]
    for col in range(len(g["A"])):
        a = root @ np.asarray(g["A"][col]) @ root
        _heatmap(axes[0, col], a, f"layer {col + 1}: Sigma^1/2 A Sigma^1/2\na = {g['a'][col]:.3g}, "
                 f"dist {g['a_distance'][col]:.3f}", names, names)
        _heatmap(axes[1, col], np.asarray(g["B"][col]), f"layer {col + 1}: B\nb = {g['b'][col]:.3g}, "
                 f"resid {g['b_residual'][col]:.3f}", names, names)


SHIFT_LABELS = {"n": "test-time context length n'"}  # x-axis labels of shifted fields (else the field name)


def shift_axes(ax, rows: list[dict], field: str, trained: float, title: str) -> None:
    """Held-out loss against a task field (``theory.shifted.shift_curve`` rows): the trained model
    with 2 s.e., its exact loss where one exists, and the references tuned per value."""
    xs = [r[field] for r in rows]
    ax.errorbar(xs, [r["model"] for r in rows], yerr=[2 * r["model_stderr"] for r in rows], fmt="o", color="C0",
                capsize=3, label="trained model (held-out, 2 s.e.)", zorder=3)
    if all("exact" in r for r in rows):
        ax.plot(xs, [r["exact"] for r in rows], "-", color="k", lw=1.2, label="exact loss from its weights")
    styles = (("ols", "C1", "OLS"), ("bayes", "C3", "Bayes ridge"), ("gd", "C2", "GD, tuned per value"),
              ("pgd", "C4", "Sigma^-1-PGD, tuned per value"))
    for key, color, name in styles:
        if all(r.get(key) is not None for r in rows):
            ax.plot(xs, [r[key] for r in rows], "--", color=color, lw=1, label=name)
    ax.axvline(trained, color="gray", ls=":", lw=1, label="training value")
    positive = all(x > 0 for x in xs)
    ax.set(xscale="log" if positive else "linear", yscale="log", xlabel=SHIFT_LABELS.get(field, field),
           ylabel="held-out loss")
    ax.set_title(textwrap.fill(title, 60), fontsize=9)
    if positive:
        ax.set_xticks(xs, [f"{x:g}" for x in xs])
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())
    ax.grid(alpha=0.3, which="both")


def plot_shift_curves(curves: dict[str, tuple[list[dict], float]], title: str, path: str) -> None:
    """One panel per shifted field: {field: (rows, training value)}."""
    fig, axes = plt.subplots(1, len(curves), figsize=(5.2 * len(curves), 4.4), squeeze=False)
    for ax, (field, (rows, trained)) in zip(axes.flat, curves.items(), strict=True):
        shift_axes(ax, rows, field, trained, f"{title}: {field}")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_gd_comparison(res: dict, title: str, path: str) -> None:
    """``theory.compare`` numbers: loss along the line from the trained weights to the GD construction
    (and, for tied weights, the loss of the layer iterated past its trained depth)."""
    panels = 2 if "iterated" in res else 1
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 4.0), squeeze=False)
    ax = axes[0, 0]
    line = res["interpolation"]
    ax.plot([p["alpha"] for p in line], [p["loss"] for p in line], "o-", color="C0")
    ax.set(xlabel="alpha: (1 - alpha) trained + alpha GD construction", ylabel="held-out loss",
           title=textwrap.fill(title, 70) + f"\npred. diff {res['prediction_difference']:.3g} (RMS yhat "
                 f"{res['prediction_rms']:.3g}), sens. cos {res['sensitivity_cosine']:.4f}")
    ax.title.set_fontsize(8)
    ax.grid(alpha=0.3)
    if panels == 2:
        ax = axes[0, 1]
        it = res["iterated"]
        ax.plot([p["depth"] for p in it], [p["loss"] for p in it], "o-", color="C1")
        ax.set(xlabel="layers (the trained tied layer iterated)", ylabel="held-out loss", yscale="log",
               title="iterating the trained layer past its depth")
        ax.title.set_fontsize(8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
