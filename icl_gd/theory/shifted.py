"""A trained model on tasks from another distribution than its training one, beside the references.

``evaluate(cfg, params, n=40, x_scale=2.0, ...)`` draws held-out tasks from the run's task
distribution with the given fields overridden (``TASK_FIELDS``: test-time context length n,
covariance / cond / eigenvalues / rotation, x law, weight prior, noise, target, and the stretches
x_scale, w_scale) and scores on the *same* tasks:

* ``model``: the trained weights. Convention: each layer's 1/n averages over the actual context,
  so at context length n' the layers use 1/n' (Ahn et al.'s code does the same);
* the baselines of ``theory.baselines`` for the shifted distribution (zero, OLS, Bayes ridge, GD-k
  and Sigma^-1-PGD-k with step sizes tuned *for the shifted distribution*, k = 1..depth);
* ``exact``: the theory's loss of the model from its weights (``exact_loss``): one linear layer
  with a closed-form distribution: L(Gamma_eff) of x_q^T Gamma_eff (1/n') X^T y (Mahankali et al.
  2023, eq. (3.1); ``theory.loss_of_gamma``), which *is* the model for ``sparse`` while for
  ``full`` the model's other terms (zero at the optimum) are left out, so the gap measures them;
  L sparse layers with a whitened prior: GD with the learned steps eta_l (Gamma_l ~ eta_l Sigma^-1)
  through the Wishart-spectrum polynomial (``general_form.prompt_losses``);
* ``pgd_learned`` (sparse linear models of any depth): the PGD predictor with the model's own
  per-layer preconditioners Gamma_l (Ahn et al. 2023, Lemma 1: the sparse model is exactly that).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from icl_gd import theory
from icl_gd.config import Config, ConfigError
from icl_gd.data import covariance_matrix, prior_covariance
from icl_gd.model import Params
from icl_gd.theory import baselines, general_form, probes

TASK_FIELDS = ("n", "covariance", "cond", "eigenvalues", "rotate", "rotation_seed", "x_dist", "dof", "weight_prior",
               "noise", "noise_dist", "target", "relu_width", "x_scale", "w_scale", "prior_mean")


def shifted_config(cfg: Config, num_tasks: int | None = None, **overrides: Any) -> Config:
    """``cfg`` with task-distribution fields overridden (and the held-out size ``num_tasks``), validated."""
    for name in overrides:
        if name not in TASK_FIELDS:
            allowed = ", ".join(TASK_FIELDS)
            raise ConfigError(name, overrides[name], f"not a task-distribution field; allowed: {allowed}")
    extra = {} if num_tasks is None else {"eval_tasks": num_tasks}
    return dataclasses.replace(cfg, **overrides, **extra).validate()


NUM_SPECTRA = 2**16  # Wishart spectra behind the multi-layer exact loss


def exact_loss(cfg: Config, params: Params) -> tuple[float, float, str] | None:
    """(loss, Monte-Carlo s.e. or 0, description) of the model at ``cfg``'s distribution from its weights
    alone (module docstring), or None where no such formula applies."""
    if cfg.attention != "linear":
        return None
    # With a prior mean the full form's features beyond Gamma g carry signal (theory.symmetry): only the
    # sparse form is then exactly x_q^T Gamma g.
    if cfg.depth == 1 and theory.has_closed_form(cfg) and (cfg.prior_mean == 0 or cfg.parameterization == "sparse"):
        gamma = probes.effective_gamma(params, cfg)
        loss = theory.loss_of_gamma(gamma, covariance_matrix(cfg), prior_covariance(cfg), cfg.n, cfg.noise,
                                    cfg.noise_dist, cfg.x_dist, cfg.dof)
        return float(loss), 0.0, "closed-form loss of x_q^T Gamma_eff (1/n) X^T y"
    if cfg.parameterization == "sparse" and general_form.has_general_form_optimum(cfg):
        gammas, _ = probes.layer_preconditioners(params, cfg)
        precond = theory.oracle_preconditioner(cfg)
        etas = [probes.shape_fit(g, precond)[0] for g in gammas]
        lam = general_form.wishart_eigenvalues(cfg.d, cfg.n, NUM_SPECTRA, seed=cfg.seed + 1)
        losses = general_form.prompt_losses(lam, [-e for e in etas], [0.0] * len(etas), cfg.n, cfg.noise)
        return (float(losses.mean()), float(losses.std(ddof=1) / np.sqrt(losses.size)),
                f"{cfg.depth} GD steps with the learned eta_l over {NUM_SPECTRA} Wishart spectra")
    return None


def shift_curve(cfg: Config, params: Params, field: str, values: Sequence[Any], num_tasks: int = 2**15,
                num_tune_tasks: int = 2**13, **fixed: Any) -> list[dict[str, Any]]:
    """One row per value of the task field ``field`` (e.g. "n", "x_scale", "w_scale", "noise", "cond"
    with ``covariance="cond"`` in ``fixed``): the model's loss (mean, s.e., median), its exact loss where
    one exists, and OLS, Bayes ridge, GD and PGD with depth-many steps tuned for that distribution."""
    rows = []
    for value in values:
        res = evaluate(cfg, params, num_tasks, num_tune_tasks=num_tune_tasks, **{**fixed, field: value})
        k = cfg.depth
        row = {field: value, "model": res["model"]["loss"], "model_stderr": res["model"]["stderr"],
               "model_median": res["model"]["median"], "ols": res["ols"]["loss"], "gd": res[f"gd_{k}"]["loss"],
               "pgd": res[f"pgd_{k}"]["loss"], "bayes": res["bayes"]["loss"] if "bayes" in res else None}
        if "exact" in res:
            row.update(exact=res["exact"]["loss"], exact_stderr=res["exact"]["stderr"])
        rows.append(row)
    return rows


def context_curve(cfg: Config, params: Params, ns: Sequence[int], num_tasks: int = 2**15,
                  num_tune_tasks: int = 2**13) -> list[dict[str, Any]]:
    """``shift_curve`` over the test-time context length n'."""
    return shift_curve(cfg, params, "n", ns, num_tasks, num_tune_tasks)


def evaluate(cfg: Config, params: Params, num_tasks: int | None = None, references: bool = True,
             num_tune_tasks: int = 2**14, **overrides: Any) -> dict[str, dict[str, Any]]:
    """{name: {loss, stderr, median, ...}} of the model and the references on the shifted held-out set
    (the run's eval key; ``num_tasks`` tasks, default the run's ``eval_tasks``)."""
    test = shifted_config(cfg, num_tasks, **overrides)
    preds: list[baselines.Predictor] = [baselines.Predictor("model", baselines.model_predictor(test), (params,))]
    info: dict[str, dict] = {"model": {"description": f"the trained transformer at n={test.n} (1/n = 1/{test.n})"}}
    if references:
        more, more_info = baselines.baseline_predictors(test, max_steps=test.depth, num_tune_tasks=num_tune_tasks)
        preds += more
        info.update(more_info)
    linear = test.attention == "linear"
    if linear and test.parameterization == "sparse":
        gammas, _ = probes.layer_preconditioners(params, test)
        stacked = jnp.asarray(np.stack(gammas), jnp.float32)
        preds.append(baselines.Predictor("pgd_learned", theory.pgd_predict, (stacked,)))
        info["pgd_learned"] = {"description": "PGD with the model's per-layer preconditioners Gamma_l"}
    errors = baselines.heldout_squared_errors(test, preds)
    out = {name: {**info[name], **baselines.mean_and_stderr(e)} for name, e in errors.items()}
    exact = exact_loss(test, params)
    if exact is not None:
        out["exact"] = {"description": exact[2], "loss": exact[0], "stderr": exact[1]}
    for v in out.values():
        v["n"] = test.n
    return out
