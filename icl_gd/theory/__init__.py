"""The theory side of icl-gd: what a trained LSA should compute, the classical predictors it is
compared with, and the probes that read the trained weights.

* ``optima``: closed forms and Monte-Carlo optima (Gamma*, L*, eta*, k-step GD/PGD); its API is
  re-exported here, so ``from icl_gd import theory; theory.gamma_star(...)``.
* ``baselines``: zero, OLS, Bayes ridge, tuned k-step GD/PGD, scored on a run's held-out tasks.
* ``probes``: Gamma_eff, per-layer preconditioners and fits read from trained weights.
* ``lowrank``: the best one-layer Gamma of rank <= r (H heads of key size k, r = min(d, H k)) by
  Eckart-Young on Mahankali et al.'s eq. (4.1); re-exported here.
* ``general_form``: Ahn et al.'s general multi-layer form reduced to a polynomial in the
  eigenvalues of X^T X / n, and its (a_l, b_l) optimum by Monte Carlo + L-BFGS.
* ``symmetry``: a prior mean breaks w -> -w; the best predictor over every feature of the ``full`` model
  (exact: GD from the start w_0 = mu) and its Monte-Carlo check; re-exported here.
"""

from icl_gd.theory.lowrank import (
    isotropic_rank_r_loss,
    nearest_rank_r_optimum,
    rank_r_losses,
    rank_r_optimum,
    subspace_sine,
    whitened_target,
)
from icl_gd.theory.optima import (
    UNIFORM_M4,
    MCEstimate,
    ahn_preconditioner,
    best_scale,
    config_optimum,
    context_mean,
    covariate_moments,
    eta_star,
    fourth_moment,
    gamma_star,
    has_closed_form,
    inverse_prior_gamma_star,
    isotropic_loss_star,
    krylov_features,
    loss_of_gamma,
    loss_star,
    mc_gamma_star,
    mc_loss,
    noise_moment,
    one_step_predict,
    optimal_step_sizes,
    oracle_preconditioner,
    pgd_predict,
    pgd_weights,
    scaled_pgd_predict,
    second_moment,
    step_gammas,
    step_polynomial,
    symmetric_sqrt,
)
from icl_gd.theory.symmetry import (
    FullOptimum,
    config_start_optimum,
    full_feature_predict,
    full_features,
    implied_start,
    loss_from_start,
    mc_full_optimum,
    model_coefficients,
    start_coefficients,
    start_optimum,
    start_predict,
)

__all__ = [
    "UNIFORM_M4", "MCEstimate", "ahn_preconditioner", "best_scale", "config_optimum", "context_mean",
    "covariate_moments", "eta_star", "fourth_moment", "gamma_star", "has_closed_form", "inverse_prior_gamma_star",
    "isotropic_loss_star", "krylov_features", "loss_of_gamma", "loss_star", "mc_gamma_star", "mc_loss", "noise_moment",
    "one_step_predict", "optimal_step_sizes", "oracle_preconditioner", "pgd_predict", "pgd_weights",
    "scaled_pgd_predict", "second_moment", "step_gammas", "step_polynomial", "symmetric_sqrt",
    "isotropic_rank_r_loss", "nearest_rank_r_optimum", "rank_r_losses", "rank_r_optimum", "subspace_sine",
    "whitened_target",
    "FullOptimum", "config_start_optimum", "full_feature_predict", "full_features", "implied_start",
    "loss_from_start", "mc_full_optimum", "model_coefficients", "start_coefficients", "start_optimum", "start_predict",
]
