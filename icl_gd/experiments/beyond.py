"""Beyond the papers: their open questions. Attention variants are reported; label-noise laws are judged
against the one-layer closed forms extended to them (``theory.noise_moment``)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from icl_gd import theory  # noqa: E402
from icl_gd.config import Config  # noqa: E402
from icl_gd.experiments.base import Experiment, Size, loss_check, summary_row
from icl_gd.experiments.checks import ETA_TOL, GAMMA_TOL, Check  # noqa: E402


# ---------------------------------------------------------------------------------------
# Beyond the papers: reported, not judged.
# ---------------------------------------------------------------------------------------
def _beyond_members(size: Size) -> list[Config]:
    return [size.base(noise=0.5, heads=2), size.base(noise=0.5, attention="softmax"),
            size.base(noise=0.5, depth=2, heads=2)]


def _beyond_judge(summaries: list[dict], size: Size) -> tuple[list[Check], list[dict]]:
    rows = []
    for s in summaries:
        c = s["config"]
        label = f"{c['attention']} attention, {c['heads']} head(s), depth {c['depth']}"
        rows.append(summary_row(s, model=label, loss_over_loss_star=s["loss"] / s["loss_star"] - 1,
                         zero_loss=s["baselines"]["zero"]["loss"]))
    return [], rows


def _beyond_plot(summaries: list[dict], path: str) -> None:
    labels = [f"{s['config']['attention']}\n{s['config']['heads']} head(s), L={s['config']['depth']}"
              for s in summaries]
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    x = np.arange(len(summaries))
    ax.bar(x, [s["loss"] for s in summaries], yerr=[2 * s["loss_stderr"] for s in summaries], capsize=3,
           color="tab:blue", label="trained: held-out loss")
    ax.axhline(summaries[0]["loss_star"], color="k", ls="--", label="L* (best 1-layer linear LSA)")
    ax.axhline(summaries[0]["config"]["noise"] ** 2, color="tab:green", ls=":", label="noise floor sigma^2")
    ax.set_xticks(x, labels, fontsize=9)
    ax.set(ylabel="mean squared query error", title="Beyond the papers: multi-head and softmax attention")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _noise_members(size: Size) -> list[Config]:
    return [size.base(noise=0.7, noise_dist=law) for law in ("gaussian", "laplace", "heteroscedastic")]


def _noise_judge(summaries: list[dict], size: Size) -> tuple[list[Check], list[dict]]:
    """Every law against its own closed-form optimum (Gaussian x, linear targets): Gaussian and Laplace
    noise of variance sigma^2 share Gamma* = n/(n+d+1+sigma^2) I (the one-layer predictor is linear in eps,
    so only E eps^2 enters L(Gamma)); heteroscedastic noise Var(eps | x) = sigma^2 |x|^2 / tr(Sigma) adds
    sigma^2/n (Sigma + 2 Sigma^2/tr Sigma) to S, so Gamma* = n/(n+d+1+sigma^2 (d+2)/d) I at Sigma = I: a
    smaller step (2.2% at d=3, n=10; 0.7% at d=5, n=20, sigma=0.7), which the 0.5% eta tolerance resolves."""
    checks, rows = [], []
    for s in summaries:
        c = s["config"]
        cfg = Config.from_dict(c)
        optimum = theory.config_optimum(cfg)
        if optimum is None:
            raise ValueError(f"no closed form for noise_dist={c['noise_dist']}")
        eta = float(np.trace(optimum[0]) / c["d"])
        tag = f"{c['noise_dist']} noise, sigma={c['noise']}"
        checks += [
            Check(f"learned eta ({tag}) vs tr(Gamma*)/d of this law's closed form", s["eta_learned"], eta, ETA_TOL),
            Check(f"||Gamma_eff - Gamma*||/||Gamma*|| ({tag})", s["rel_error"], GAMMA_TOL, 0.0, "max"),
            loss_check(s, tag),
        ]
        rows.append(summary_row(s, noise_dist=c["noise_dist"], optimum=s.get("loss_star_source"), eta_theory=eta,
                                eta_gaussian_formula=theory.eta_star(c["n"], c["d"], c["noise"])))
    return checks, rows


def _noise_plot(summaries: list[dict], path: str) -> None:
    laws = [s["config"]["noise_dist"] for s in summaries]
    x = np.arange(len(summaries))
    c0 = summaries[0]["config"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    axes[0].bar(x - 0.2, [s["eta_learned"] for s in summaries], 0.4, label="trained: tr(Gamma_eff)/d")
    axes[0].bar(x + 0.2, [s["eta_star"] for s in summaries], 0.4, label="closed-form optimum tr(Gamma*)/d")
    axes[0].axhline(theory.eta_star(c0["n"], c0["d"], c0["noise"]), color="k", ls="--",
                    label="n/(n+d+1+sigma^2) (Gaussian noise)")
    axes[0].set(ylabel="effective step size eta", title=f"Label-noise law, sigma={c0['noise']}")
    axes[1].bar(x - 0.2, [s["loss"] for s in summaries], 0.4, yerr=[2 * s["loss_stderr"] for s in summaries],
                capsize=3, label="trained: held-out loss")
    axes[1].bar(x + 0.2, [s["loss_star_heldout"] for s in summaries], 0.4, label="optimal 1-layer, same tasks")
    axes[1].set(ylabel="mean squared query error", title="Loss")
    for ax in axes:
        ax.set_xticks(x, laws)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


EXPERIMENTS = (
    Experiment("beyond_attention",
               "open question: multi-head and softmax attention on noisy isotropic tasks (reported, not judged)",
               _beyond_members, _beyond_judge, _beyond_plot, reported_only=True),
    Experiment("beyond_label_noise",
               "open question: Laplace (heavy-tailed) and heteroscedastic (Var(eps|x) ~ |x|^2) label noise of the "
               "same variance: the trained 1-layer LSA is still one GD step, of the closed-form size of each law: "
               "Laplace = Gaussian n/(n+d+1+sigma^2) (only E eps^2 enters), heteroscedastic the smaller "
               "n/(n+d+1+sigma^2 (d+2)/d) (S gains sigma^2/n (Sigma + 2 Sigma^2/tr Sigma))",
               _noise_members, _noise_judge, _noise_plot),
)
