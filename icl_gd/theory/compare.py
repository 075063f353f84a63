"""A trained model against its matching GD construction, von Oswald et al.'s way (2023, Sec. 3).

The construction (``gd_construction``) is ``model.gd_params`` of the best GD-type predictor of the
model's depth: for one layer the optimal preconditioner Gamma* (closed form, Mahankali et al.
2023, Thm. 2), for L layers L steps of Sigma^-1-preconditioned GD with tuned step sizes (for tied
weights the mean of those steps in every layer). On held-out tasks (``compare``):

* prediction difference: RMS over tasks of yhat_model - yhat_GD;
* model difference: mean over tasks of ||d yhat_model / d x_q - d yhat_GD / d x_q|| and the cosine
  of the two sensitivities (the implied weight vectors);
* interpolation: the loss of (1 - alpha) theta_model + alpha theta_GD for alpha in [0, 1] (the
  straight line between the weights; a flat, low curve says the two sit in one basin);
* for tied weights, the loss when the trained layer is iterated for 1..2L layers.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from icl_gd import theory
from icl_gd.config import Config
from icl_gd.data import TaskSpec, distribution
from icl_gd.keys import run_keys
from icl_gd.model import Params, gd_params
from icl_gd.theory import baselines, probes


def gd_construction(cfg: Config, num_tune_tasks: int = 2**14) -> tuple[Params, str]:
    """(weights of the matching GD predictor in ``cfg``'s parameterisation, a description)."""
    if cfg.depth == 1 and theory.has_closed_form(cfg):
        gamma, _ = theory.config_optimum(cfg)
        return gd_params(cfg, gamma), "one step with the optimal preconditioner Gamma*"
    precond = theory.oracle_preconditioner(cfg)
    etas = baselines.tuned_steps(cfg, precond, cfg.depth, num_tune_tasks)[-1]
    if cfg.tie_weights:
        eta = float(np.mean(etas))
        return gd_params(cfg, eta * precond), f"{cfg.depth} Sigma^-1-PGD steps of the mean tuned size {eta:.4g}"
    return (gd_params(cfg, [e * precond for e in etas]),
            f"{cfg.depth} Sigma^-1-PGD steps, tuned sizes {', '.join(f'{e:.4g}' for e in etas)}")


@functools.lru_cache(maxsize=16)
def _jitted(cfg: Config):
    return jax.jit(baselines.model_predictor(cfg))


def _heldout(cfg: Config, num_tasks: int):
    key, spec = run_keys(cfg.seed)["eval"], TaskSpec.from_config(cfg)
    return baselines.heldout_chunk(key, 7, distribution(cfg), spec, num_tasks)


def compare(cfg: Config, params: Params, num_tasks: int = 2**13, alphas: int = 11,
            num_tune_tasks: int = 2**14) -> dict[str, Any] | None:
    """Every number of the module docstring, JSON-ready; None where no GD construction exists
    (softmax attention, or key_size < d)."""
    if cfg.attention != "linear" or cfg.k < cfg.d:
        return None
    gd, description = gd_construction(cfg, num_tune_tasks)
    gd = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), gd)
    tasks = _heldout(cfg, num_tasks)

    def predict(t, p, c=cfg):
        return _jitted(c)(t, p)

    ours, theirs = (np.asarray(predict(tasks, p), np.float64) for p in (params, gd))
    s_ours = np.asarray(probes.sensitivities(predict, (params,), tasks), np.float64)
    s_gd = np.asarray(probes.sensitivities(predict, (gd,), tasks), np.float64)
    y = np.asarray(tasks.y_query, np.float64)
    out: dict[str, Any] = {
        "construction": description,
        "loss_model": float(np.mean((ours - y) ** 2)), "loss_gd": float(np.mean((theirs - y) ** 2)),
        "prediction_difference": float(np.sqrt(np.mean((ours - theirs) ** 2))),
        "prediction_rms": float(np.sqrt(np.mean(ours**2))),
        "model_difference": float(np.mean(np.linalg.norm(s_ours - s_gd, axis=-1))),
        "sensitivity_cosine": float(np.mean(probes.cosine_similarity(s_ours, s_gd))),
    }
    line = []
    for alpha in np.linspace(0.0, 1.0, alphas):
        mixed = jax.tree.map(lambda a, b, t=alpha: (1 - t) * a + t * b, params, gd)
        line.append({"alpha": float(alpha), "loss": float(np.mean((np.asarray(predict(tasks, mixed)) - y) ** 2))})
    out["interpolation"] = line
    if cfg.tie_weights and cfg.attention == "linear":
        out["iterated"] = []
        for depth in range(1, 2 * cfg.depth + 1):
            deeper = dataclasses.replace(cfg, depth=depth)
            loss = float(np.mean((np.asarray(predict(tasks, params, deeper)) - y) ** 2))
            out["iterated"].append({"depth": depth, "loss": loss})
    return out
