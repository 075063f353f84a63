"""Beyond the papers: low-rank heads. H heads of key size k < d learn the best rank-r one-layer predictor, judged.

With H heads whose W_K, W_Q have k rows, a one-layer LSA's GD term x_q^T Gamma_eff g has rank Gamma_eff <= r =
min(d, H k) (each head's Gamma_h = W_Q[:, :d]^T (u_y W_K[:, :d] + W_K[:, d] u_x^T) goes through k rows), and the
``full`` form's non-GD terms are even under (w, eps) -> (-w, -eps), so they only add loss on these symmetric
Gaussian tasks (``theory.lowrank``'s docstring). Eckart-Young on Mahankali et al. 2023's loss (4.1)
(arXiv 2307.03576) gives the rank-r optimum: with T = Sigma^1/2 Omega Sigma S^-1/2,

    L*(r) = L* + sum_{i>r} s_i(T)^2,   Gamma_r = Sigma^-1/2 [T]_r S^-1/2    (``theory.rank_r_optimum``);

isotropic: L*(r) = sigma^2 + d - r n/(n+d+1+sigma^2), Gamma_r = eta* P for ANY rank-r orthogonal projector P.
With Sigma of condition 10 (rotated) and w ~ N(0, I), T is diagonal in Sigma's eigenbasis with s_i increasing in
Sigma's eigenvalue: Gamma_r keeps the top-r eigendirections of Sigma, where Gamma* = ((n+1)/n Sigma + (tr Sigma
+ sigma^2)/n I)^-1 is SMALLEST. Truncating Gamma* itself ([Gamma*]_r, the naive guess) keeps the other end of
the spectrum (the largest principal angle between the two subspaces is 90 degrees here), so the learned
subspace tells the two apart.

Judged per member (1 layer, ``full`` form, sigma = 0.5): the held-out loss within LOSS_SLACK + NUM_SE paired
s.e. of Gamma_r's loss on the same tasks and not below it by more than NUM_SE paired s.e. (the rank bound binds),
and at least the exact rank cost L*(r) - L* above Gamma*'s loss on the same tasks (less NUM_SE paired s.e.);
Gamma_eff within GAMMA_TOL of the nearest rank-r optimum (``theory.nearest_rank_r_optimum``: eta* P with P the
top-r eigenprojector of Gamma_eff's symmetric part when isotropic; Gamma_r itself when anisotropic); for the
anisotropic member the top-r column and row spaces of Gamma_eff within ``subspace_tol`` of Gamma_r's (Wedin's bound
at GAMMA_TOL: 0.056 at d=3, 0.040 at d=5).

Seed spread (benchmarks/seed_spread.py, seeds 0-2, quick scale, with the lengths below): all 17 checks pass at every
seed; held-out loss at most 0.06% above Gamma_r's on the same tasks, ||Gamma_eff - Gamma_r|| / ||Gamma_r|| 0.2-1.2%,
the anisotropic member's subspace sine 0.006-0.010, and the rank cost L*(r) - L* is 25-107 paired s.e. (both scales),
so a model of rank > r would fail the lower checks by far.
"""

from __future__ import annotations

import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from icl_gd import theory  # noqa: E402
from icl_gd.config import Config  # noqa: E402
from icl_gd.data import covariance_matrix, prior_covariance  # noqa: E402
from icl_gd.experiments.base import Experiment, Size, summary_row  # noqa: E402
from icl_gd.experiments.checks import GAMMA_TOL, LOSS_SLACK, NUM_SE, Check, at_most  # noqa: E402
from icl_gd.theory import baselines, lowrank, probes  # noqa: E402

NOISE = 0.5
COND = 10.0
# (heads, key_size) of the isotropic members: every r < d at least once, one head and several heads.
QUICK_HEADS = ((1, 1), (2, 1), (1, 2))  # d = 3: r = 1, 2, 2
PAPER_HEADS = ((1, 1), (1, 2), (2, 1), (3, 1), (2, 2))  # d = 5: r = 1, 2, 2, 3, 4
ANISO_HEADS = (2, 1)  # r = 2: two rank-one heads must share out Sigma's top-2 eigenspace
# Training length factor of the anisotropic member. Along Sigma's small eigendirections the loss is flat (curvature
# ~ Sigma's eigenvalues) and Adam moves Gamma_eff and the non-GD terms there slowly: at 1x (2000 steps, d=3, seed 0)
# Gamma_eff sat 5.3% from Gamma_r (its loss L(Gamma_eff) only 0.02% above L*(r)) and the non-GD terms had not decayed
# (||B_xx^T u_x|| = 0.33), so the held-out loss was 0.4% above Gamma_r's. ahn_preconditioned trains its cond-10
# members 3x for the same reason.
ANISO_LENGTH = 3.0
# Training length factor of the isotropic members. From the small init a low-rank factorisation learns one direction
# at a time (saddle to saddle): at 1x (2000 steps, d=3) seed 2's H=1, k=2 model was still on the rank-1 plateau at
# step 500 (eval 2.43 vs L*(1) = 2.55, L*(2) = 1.85) and ended 0.85% above Gamma_r, its Gamma_eff right (exact
# L(Gamma_eff) 6e-5 above L*(2)) but its non-GD terms (||h_x|| = 0.24) not yet decayed under the cosine schedule.
ISO_LENGTH = 2.0


def rank(cfg: Config) -> int:
    """r = min(d, H k): the largest rank of Gamma_eff of H heads of key size k (module docstring)."""
    return min(cfg.d, cfg.heads * cfg.k)


def _members(size: Size) -> list[Config]:
    """Isotropic members and one anisotropic one, the anisotropic second (smoke tests train the first two)."""
    heads = QUICK_HEADS if size.quick else PAPER_HEADS
    iso = [size.base(ISO_LENGTH, noise=NOISE, heads=h, key_size=k) for h, k in heads]
    aniso = size.base(ANISO_LENGTH, noise=NOISE, heads=ANISO_HEADS[0], key_size=ANISO_HEADS[1], covariance="cond",
                      cond=COND)
    return [iso[0], aniso, *iso[1:]]


def subspace_tol(gamma_r: np.ndarray, r: int) -> float:
    """The largest subspace error sin(theta_max) that a Gamma_eff within GAMMA_TOL of Gamma_r can have.

    Wedin's sin-theta theorem (Wedin 1972, BIT 12; Stewart & Sun, Matrix Perturbation Theory, Thm. V.4.4): for
    Gamma_eff = Gamma_r + E the top-r left and right singular subspaces are within sin(theta_max) <=
    ||E||_2 / delta, delta = s_r(Gamma_eff) - s_{r+1}(Gamma_r) = s_r(Gamma_eff) >= s_r(Gamma_r) - ||E||_2 (Weyl).
    With ||E||_2 <= ||E||_F <= eps ||Gamma_r||_F and kappa = ||Gamma_r||_F / s_r(Gamma_r):
    sin(theta_max) <= eps kappa / (1 - eps kappa), eps = GAMMA_TOL.
    """
    sv = np.linalg.svd(gamma_r, compute_uv=False)
    ek = GAMMA_TOL * float(np.linalg.norm(gamma_r) / sv[r - 1])
    return ek / (1 - ek) if ek < 1 else 1.0


def _truncate(m: np.ndarray, r: int) -> np.ndarray:
    u, s, vt = np.linalg.svd(m)
    return (u[:, :r] * s[:r]) @ vt[:r]


def _sine(a: np.ndarray, b: np.ndarray, r: int) -> float:
    """The larger of the top-r column-space and row-space subspace sines (``lowrank.subspace_sine``)."""
    return max(lowrank.subspace_sine(a, b, r), lowrank.subspace_sine(a.T, b.T, r))


def _probe(run, size: Size) -> dict:
    """Gamma_eff against the rank-r theory, and the paired held-out losses of the model, the nearest rank-r
    optimum Gamma_r and the naive [Gamma*]_r on the run's held-out tasks (``baselines.heldout_squared_errors``)."""
    cfg, params = run.config, run.params
    sigma, omega = covariance_matrix(cfg), prior_covariance(cfg)
    r = rank(cfg)
    gamma = probes.effective_gamma(params, cfg)
    gamma_r = lowrank.nearest_rank_r_optimum(gamma, sigma, omega, cfg.n, cfg.noise, r, cfg.noise_dist)
    g_star = theory.gamma_star(sigma, omega, cfg.n, cfg.noise, cfg.noise_dist)
    naive = _truncate(g_star, r)
    exact = lowrank.rank_r_losses(sigma, omega, cfg.n, cfg.noise, cfg.noise_dist)
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    preds = [baselines.Predictor("model", baselines.model_predictor(cfg), (params,)),
             baselines.Predictor("gamma_r", theory.one_step_predict, (f32(gamma_r),)),
             baselines.Predictor("gamma_star", theory.one_step_predict, (f32(g_star),)),
             baselines.Predictor("naive", theory.one_step_predict, (f32(naive),))]
    errors = baselines.heldout_squared_errors(cfg, preds)
    heldout = {name: {**baselines.mean_and_stderr(e),
                      **({"paired_stderr": baselines.paired_stderr(errors["model"], e)} if name != "model" else {})}
               for name, e in errors.items()}
    u = np.linalg.eigh(sigma)[1][:, ::-1] if cfg.covariance != "isotropic" else None  # largest eigenvalue first
    sv = np.linalg.svd(gamma, compute_uv=False)

    def energy(m):  # squared cosines of Sigma's eigenvectors (largest eigenvalue first) with m's top-r column space
        q = np.linalg.svd(m)[0][:, :r]
        return np.sum((u.T @ q) ** 2, axis=1).tolist()

    return {
        "r": r, "heads": cfg.heads, "key_size": cfg.k,
        "gamma_r": probes.to_list(gamma_r), "naive_truncation": probes.to_list(naive),
        "rank_r_losses": exact.tolist(), "loss_star_r": float(exact[r]), "loss_star": float(exact[-1]),
        "exact_loss_of_gamma_learned": theory.loss_of_gamma(gamma, sigma, omega, cfg.n, cfg.noise, cfg.noise_dist),
        "exact_loss_of_naive": theory.loss_of_gamma(naive, sigma, omega, cfg.n, cfg.noise, cfg.noise_dist),
        "rel_error_rank_r": probes.relative_error(gamma, gamma_r),
        "singular_values_learned": sv.tolist(),
        "singular_values_rank_r": np.linalg.svd(gamma_r, compute_uv=False).tolist(),
        "rank_ratio": float(sv[r] / sv[0]) if r < cfg.d else 0.0,  # s_{r+1}/s_1: 0 up to rounding (model bound)
        "subspace_sine": _sine(gamma, gamma_r, r),
        "subspace_sine_naive": None if u is None else _sine(gamma, naive, r),
        "subspace_sine_theory_naive": None if u is None else _sine(gamma_r, naive, r),
        "subspace_tol": subspace_tol(gamma_r, r),
        "eigen_energy": None if u is None else {"learned": energy(gamma), "gamma_r": energy(gamma_r),
                                                "naive": energy(naive)},
        "heldout": heldout,
    }


def _tag(c: dict, r: int) -> str:
    where = "isotropic" if c["covariance"] == "isotropic" else f"Sigma cond {c['cond']:g} rotated"
    return f"H={c['heads']}, k={c['key_size'] or c['d'] + 1}, r={r}, {where}, sigma={c['noise']:g}"


def _judge(summaries: list[dict], size: Size) -> tuple[list[Check], list[dict]]:
    checks, rows = [], []
    for s in summaries:
        c, p = s["config"], s["probe"]
        r, held = p["r"], p["heldout"]
        tag = _tag(c, r)
        model, opt_r, opt = held["model"], held["gamma_r"], held["gamma_star"]
        rank_cost = p["loss_star_r"] - p["loss_star"]
        checks += [
            at_most(f"held-out loss ({tag}) vs the best rank-{r} predictor Gamma_r on the same tasks",
                    model["loss"], opt_r["loss"], LOSS_SLACK, opt_r["paired_stderr"]),
            Check(f"held-out loss ({tag}) not below Gamma_r's on the same tasks (the rank bound binds), "
                  f">= - {NUM_SE:g} paired s.e.", model["loss"] - opt_r["loss"], 0.0,
                  NUM_SE * opt_r["paired_stderr"], "min"),
            Check(f"held-out loss ({tag}) minus the full-rank Gamma*'s on the same tasks >= the exact rank cost "
                  f"L*(r) - L* = {rank_cost:.4g} - {NUM_SE:g} paired s.e.", model["loss"] - opt["loss"], rank_cost,
                  NUM_SE * opt["paired_stderr"], "min"),
            Check(f"||Gamma_eff - Gamma_r|| / ||Gamma_r||, Gamma_r the nearest rank-{r} optimum ({tag})",
                  p["rel_error_rank_r"], GAMMA_TOL, 0.0, "max"),
        ]
        if c["covariance"] != "isotropic" and r < c["d"]:
            checks.append(Check(f"sin of the largest principal angle between the top-{r} column/row spaces of "
                                f"Gamma_eff and Gamma_r ({tag}); bound: Wedin's theorem at GAMMA_TOL",
                                p["subspace_sine"], p["subspace_tol"], 0.0, "max"))
        rows.append(summary_row(
            s, heads=c["heads"], key_size=p["key_size"], r=r, covariance=c["covariance"],
            loss_star_r=p["loss_star_r"], rank_cost=rank_cost, rank_cost_in_se=rank_cost / opt["paired_stderr"],
            gamma_r_heldout=opt_r["loss"], gamma_r_paired_stderr=opt_r["paired_stderr"],
            gamma_star_heldout=opt["loss"], exact_loss_of_gamma_learned=p["exact_loss_of_gamma_learned"],
            rel_error_rank_r=p["rel_error_rank_r"], singular_values_learned=p["singular_values_learned"],
            singular_values_rank_r=p["singular_values_rank_r"], rank_ratio=p["rank_ratio"],
            subspace_sine=p["subspace_sine"], subspace_tol=p["subspace_tol"],
            subspace_sine_naive=p["subspace_sine_naive"], naive_heldout=held["naive"]["loss"],
            exact_loss_of_naive=p["exact_loss_of_naive"],
            non_gd_terms={k: s["non_gd_terms"][k] for k in ("h_x", "Bxx_T_ux", "uy_Byx")}))
    return checks, rows


def _label(s: dict) -> str:
    c, p = s["config"], s["probe"]
    return f"H={c['heads']},k={p['key_size']}" + ("" if c["covariance"] == "isotropic" else f", cond {c['cond']:g}")


def _plot(summaries: list[dict], path: str) -> None:
    """(a) held-out loss vs r on the L*(r) curves; (b) the judged paired difference to Gamma_r with its band;
    (c) Gamma_eff's singular values beside Gamma_r's; (d) the anisotropic member's subspace."""
    fig, axes = plt.subplots(2, 2, figsize=(13.5, 9.5))
    colours = {"isotropic": "tab:blue", "cond": "tab:red"}
    member_colours = plt.cm.tab10(np.arange(len(summaries)) % 10)

    ax = axes[0, 0]
    curves = {}
    for s in summaries:  # one L*(r) curve per task distribution
        curves.setdefault(s["config"]["covariance"], s["probe"]["rank_r_losses"])
    for cov, losses in curves.items():
        col = colours.get(cov, "tab:gray")
        label = "isotropic" if cov == "isotropic" else f"Sigma cond {COND:g}"
        ax.plot(np.arange(len(losses)), losses, "-", color=col, lw=1.2, label=f"theory L*(r), {label}")
        ax.axhline(losses[-1], color=col, ls=":", lw=1, label=f"full-rank L*, {label}")
    seen: dict[tuple, int] = {}
    for s in summaries:
        p, c = s["probe"], s["config"]
        col = colours.get(c["covariance"], "tab:gray")
        slot = seen[(c["covariance"], p["r"])] = seen.get((c["covariance"], p["r"]), -1) + 1
        m = p["heldout"]["model"]
        ax.plot(p["r"], m["loss"], "o", color=col, ms=7, mfc="white", mew=1.5)
        ax.annotate(_label(s), (p["r"], m["loss"]), textcoords="offset points", xytext=(8, 6 + 11 * slot),
                    fontsize=7, color=col)
    ax.plot([], [], "o", color="k", mfc="white", label="trained 1-layer LSA, held-out")
    ax.set_xlabel("rank bound r = min(d, H k)")
    ax.set_ylabel("loss")
    ax.set_xticks(range(len(next(iter(curves.values())))))
    ax.set_title("(a) held-out loss vs r (1 layer, full form)", fontsize=10)
    ax.legend(fontsize=7)

    ax = axes[0, 1]
    for i, s in enumerate(summaries):
        p = s["probe"]
        held, opt_r = p["heldout"]["model"], p["heldout"]["gamma_r"]
        diff, se = held["loss"] - opt_r["loss"], opt_r["paired_stderr"]
        top = LOSS_SLACK * opt_r["loss"] + NUM_SE * se
        ax.fill_between([i - 0.3, i + 0.3], -NUM_SE * se, top, color="0.85", lw=0)
        ax.errorbar(i, diff, yerr=se, fmt="o", color=member_colours[i], capsize=3)
    ax.fill_between([], [], [], color="0.85", label=f"allowed: -{NUM_SE:g} s.e. .. +{LOSS_SLACK:.1%} + {NUM_SE:g} s.e.")
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks(range(len(summaries)), [f"{_label(s)}\nr={s['probe']['r']}" for s in summaries], fontsize=7)
    ax.set_ylabel("held-out loss - Gamma_r's (same tasks, +-1 paired s.e.)")
    ax.set_title("(b) the judged comparison with the rank-r optimum", fontsize=10)
    ax.legend(fontsize=7)

    ax = axes[1, 0]
    width = 0.8 / max(len(summaries), 1)
    d = len(summaries[0]["probe"]["singular_values_learned"])
    for i, s in enumerate(summaries):
        p = s["probe"]
        xs = np.arange(d) + (i - (len(summaries) - 1) / 2) * width
        ax.bar(xs, p["singular_values_learned"], width * 0.9, color=member_colours[i],
               label=f"{_label(s)} (r={p['r']})")
        ax.plot(xs, p["singular_values_rank_r"], "k_", ms=9, mew=1.5)
    ax.plot([], [], "k_", ms=9, mew=1.5, label="theory Gamma_r")
    ax.set_xlabel("singular value index")
    ax.set_ylabel("singular value of Gamma_eff")
    ax.set_xticks(range(d), [str(j + 1) for j in range(d)])
    ax.set_title("(c) Gamma_eff's spectrum: rank r, values of Gamma_r", fontsize=10)
    ax.legend(fontsize=7)

    ax = axes[1, 1]
    aniso = [s for s in summaries if s["probe"]["eigen_energy"] is not None]
    if aniso:
        s = aniso[0]
        p, c = s["probe"], s["config"]
        e = p["eigen_energy"]
        xs = np.arange(len(e["learned"]))
        ax.bar(xs - 0.27, e["learned"], 0.26, color="tab:red", label="learned Gamma_eff")
        ax.bar(xs, e["gamma_r"], 0.26, color="k", alpha=0.6, label="theory Gamma_r = Sigma^-1/2 [T]_r S^-1/2")
        ax.bar(xs + 0.27, e["naive"], 0.26, color="tab:olive", alpha=0.7, label="naive [Gamma*]_r")
        lam = np.sort(np.linalg.eigvalsh(covariance_matrix(Config.from_dict(c))))[::-1]
        ax.set_xticks(xs, [f"{v:.2g}" for v in lam])
        ax.set_xlabel("eigenvector of Sigma (eigenvalue)")
        ax.set_ylabel(f"cos^2 with the top-{p['r']} column space")
        ax.set_ylim(0, 1.4)
        ax.set_title(f"(d) subspace, {_tag(c, p['r'])}\nsin(largest angle) to Gamma_r {p['subspace_sine']:.3f} "
                     f"(tol {p['subspace_tol']:.3f}), to [Gamma*]_r {p['subspace_sine_naive']:.2f}", fontsize=9)
        ax.legend(fontsize=7, loc="upper right")
    else:
        ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


EXPERIMENTS = (
    Experiment("beyond_low_rank_heads",
               "open question: a 1-layer LSA with H heads of key size k < d has rank Gamma_eff <= r = min(d, H k) "
               "and learns the best rank-r one-step predictor: held-out loss L*(r) = L* + sum_{i>r} s_i(T)^2, T = "
               "Sigma^1/2 Omega Sigma S^-1/2 (Eckart-Young on Mahankali et al. 2023, eq. (4.1); isotropic: sigma^2 + "
               "d - r n/(n+d+1+sigma^2)), never below it, with Gamma_eff = Sigma^-1/2 [T]_r S^-1/2: for an "
               "anisotropic Sigma the top-r eigendirections of Sigma, not the truncation of Gamma*",
               _members, _judge, _plot, probe=_probe),
)

__all__ = ["EXPERIMENTS", "rank", "subspace_tol"]
