"""Beyond the papers: an anisotropic weight prior alone (Sigma = I, w ~ N(0, Omega)), judged.

Mahankali et al. 2023 (arXiv 2307.03576) tie the learned preconditioner to the covariates: Gamma* = eta I
for x ~ N(0, I), w ~ N(0, I) (Thm. 1) and eta Sigma^-1 for w ~ N(0, Sigma^-1) (Thm. 2), and read their
Sec. 5 as "the response distribution has a smaller impact". Their loss (4.1) holds for any Omega
(``theory.loss_of_gamma``): with Sigma = I,

    S = E[g g^T] = (n+1)/n Omega + (tr Omega + sigma^2)/n I,   Gamma* = Omega S^-1,

whose eigenvalues n w_i / ((n+1) w_i + tr Omega + sigma^2) along Omega's eigenvectors differ: one step of
GD preconditioned by a matrix that depends on the task prior alone. The experiment trains a 1-layer LSA
on Omega of eigenvalues (4, 2, 1, 0.5, 0.25)[:d] (rotated) and checks it learns that Gamma*.

The model is the ``sparse`` form (Ahn et al. 2023: Gamma is the learned key-query block itself), not
``full``: over seeds 0, 1, 2 at d=3, n=10, the full model settled at seeds 1 and 2 (both noises) on a
point with twice L* (held-out 3.88 vs L* 1.93, learned eta 0.26 vs 0.68; also with init scale 0.5),
while the sparse form reached Gamma* within 0.5% at every seed. benchmarks/seed_spread.py measures it.
"""

from __future__ import annotations

import numpy as np

from icl_gd import theory
from icl_gd.config import Config
from icl_gd.data import covariance_matrix, prior_covariance
from icl_gd.experiments.base import Experiment, Size, gamma_panels, loss_check, summary_row
from icl_gd.experiments.checks import GAMMA_TOL, NUM_SE, Check

PRIOR_SPECTRUM = (4.0, 2.0, 1.0, 0.5, 0.25)
NOISES = (0.0, 0.5)
# Gamma_eff must be this far from its best multiple of I (probes.scalar_fit residual). Gamma*'s own residual
# is 0.137-0.141 at d=3, n=10 and 0.258-0.262 at d=5, n=20 (sigma = 0, 0.5); a Gamma_eff within GAMMA_TOL = 2%
# of Gamma* moves it by at most about 0.02, while an eta I answer has residual 0.
SHAPE_MIN = 0.1
# The trained loss must beat the tuned plain GD step eta I (the same tasks) by at least this fraction of the
# exact gap L(eta_best I) - L* (3.4-3.7% of L* at d=3, 11-13% at d=5), less NUM_SE paired standard errors.
GAIN_FRACTION = 0.5


def _members(size: Size) -> list[Config]:
    d = size.base().d
    return [size.base(weight_prior="eigenvalues", prior_eigenvalues=PRIOR_SPECTRUM[:d], noise=s,
                      parameterization="sparse") for s in NOISES]


def _plain_gd_gap(cfg: Config) -> tuple[float, float]:
    """(L(eta_best I) - L*, eta_best): how much the best plain one-step GD loses to Gamma* (exact)."""
    sigma, omega = covariance_matrix(cfg), prior_covariance(cfg)
    eye = np.eye(cfg.d)
    eta = theory.best_scale(eye, sigma, omega, cfg.n, cfg.noise, cfg.noise_dist, cfg.x_dist, cfg.dof)
    _, l_star = theory.config_optimum(cfg)
    return theory.loss_of_gamma(eta * eye, sigma, omega, cfg.n, cfg.noise, cfg.noise_dist, cfg.x_dist,
                                 cfg.dof) - l_star, eta


def _judge(summaries: list[dict], size: Size) -> tuple[list[Check], list[dict]]:
    checks, rows = [], []
    for s in summaries:
        c = s["config"]
        cfg = Config.from_dict(c)
        gap, eta_plain = _plain_gd_gap(cfg)
        gd = s["baselines"]["gd_1"]
        tag = f"Omega eigenvalues {tuple(c['prior_eigenvalues'])}, sigma={c['noise']}"
        checks += [
            Check(f"||Gamma_eff - Gamma*||/||Gamma*||, Gamma* = Omega S^-1 ({tag})", s["rel_error"], GAMMA_TOL, 0.0,
                  "max"),
            Check(f"Gamma_eff is no multiple of I ({tag}): scalar-fit residual", s["scalar_fit_residual"], SHAPE_MIN,
                  0.0, "min"),
            loss_check(s, tag),
            Check(f"held-out loss gain over the tuned plain GD step eta I, same tasks ({tag}), >= "
                  f"{GAIN_FRACTION:g} x the exact gap - {NUM_SE:g} paired s.e.", gd["loss"] - s["loss"],
                  GAIN_FRACTION * gap, NUM_SE * gd["paired_stderr"], "min"),
        ]
        rows.append(summary_row(s, noise=c["noise"], prior_eigenvalues=list(c["prior_eigenvalues"]),
                                gamma_star_eigenvalues=np.linalg.eigvalsh(np.asarray(s["gamma_star"])).tolist(),
                                gamma_learned_eigenvalues=np.linalg.eigvalsh(
                                    (np.asarray(s["gamma_learned"]) + np.asarray(s["gamma_learned"]).T) / 2).tolist(),
                                scalar_fit_residual_star=s.get("scalar_fit_residual_star"),
                                plain_gd_loss=gd["loss"], plain_gd_exact_gap=gap, eta_plain_gd=eta_plain))
    return checks, rows


def _plot(summaries: list[dict], path: str) -> None:
    gamma_panels(summaries, path, [f"Sigma = I, Omega eig {tuple(s['config']['prior_eigenvalues'])}, "
                                   f"sigma={s['config']['noise']}" for s in summaries],
                 "theory Gamma* = Omega S^-1")


EXPERIMENTS = (
    Experiment("beyond_prior",
               "open question: x ~ N(0, I) and an anisotropic prior w ~ N(0, Omega), Omega of eigenvalues "
               "(4, 2, 1, 0.5, 0.25)[:d] (rotated): the trained 1-layer LSA is one GD step preconditioned by "
               "Gamma* = Omega ((n+1)/n Omega + (tr Omega + sigma^2)/n I)^-1, no multiple of I, and beats the best "
               "plain GD step: the task (response) distribution alone changes the learned algorithm "
               "(Mahankali et al. 2023, eq. (4.1) with Omega != I)", _members, _judge, _plot),
)
