"""A trained model on tasks from another distribution than its training one, beside the references.

``evaluate(cfg, params, n=40, x_scale=2.0, ...)`` draws held-out tasks from the run's task
distribution with the given fields overridden (``TASK_FIELDS``: test-time context length n,
covariance / cond / eigenvalues / rotation, x law, weight prior, noise, target, and the stretches
x_scale, w_scale) and scores on the *same* tasks:

* ``model``: the trained weights. Convention: each layer's 1/n averages over the actual context,
  so at context length n' the layers use 1/n' (Ahn et al.'s code does the same);
* the baselines of ``theory.baselines`` for the shifted distribution (zero, OLS, Bayes ridge, GD-k
  and Sigma^-1-PGD-k with step sizes tuned *for the shifted distribution*, k = 1..depth);
* ``gamma_eff_theory`` (one linear layer, closed-form distributions): the exact loss
  L(Gamma_eff) of the predictor x_q^T Gamma_eff (1/n') X^T y (Mahankali et al. 2023, eq. (3.1);
  ``theory.loss_of_gamma``). It *is* the model for ``sparse``; for ``full`` the model's other
  terms (zero at the optimum) are left out, so the gap to ``model`` measures them;
* ``pgd_learned`` (sparse linear models of any depth): the PGD predictor with the model's own
  per-layer preconditioners Gamma_l (Ahn et al. 2023, Lemma 1: the sparse model is exactly that).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np

from icl_gd import theory
from icl_gd.config import Config, ConfigError
from icl_gd.data import covariance_matrix, prior_covariance
from icl_gd.model import Params
from icl_gd.theory import baselines, probes

TASK_FIELDS = ("n", "covariance", "cond", "eigenvalues", "rotate", "rotation_seed", "x_dist", "dof", "weight_prior",
               "noise", "noise_dist", "target", "relu_width", "x_scale", "w_scale")


def shifted_config(cfg: Config, num_tasks: int | None = None, **overrides: Any) -> Config:
    """``cfg`` with task-distribution fields overridden (and the held-out size ``num_tasks``), validated."""
    for name in overrides:
        if name not in TASK_FIELDS:
            allowed = ", ".join(TASK_FIELDS)
            raise ConfigError(name, overrides[name], f"not a task-distribution field; allowed: {allowed}")
    extra = {} if num_tasks is None else {"eval_tasks": num_tasks}
    return dataclasses.replace(cfg, **overrides, **extra).validate()


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
    if linear and test.depth == 1 and theory.has_closed_form(test):
        gamma = probes.effective_gamma(params, test)
        loss = theory.loss_of_gamma(gamma, covariance_matrix(test), prior_covariance(test), test.n, test.noise)
        out["gamma_eff_theory"] = {"description": "exact loss of x_q^T Gamma_eff (1/n) X^T y (closed form)",
                                   "loss": float(loss)}
    for v in out.values():
        v["n"] = test.n
    return out
