"""Every learned-vs-theory number of one checkpoint (``analyze_run``): held-out loss beside L*,
Gamma_eff beside Gamma*, the baselines on the same tasks, per-layer preconditioners."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from icl_gd import theory, watchdog
from icl_gd.config import Config
from icl_gd.data import TaskSpec, covariance_matrix, distribution, prior_covariance
from icl_gd.keys import eval_chunks, run_keys
from icl_gd.run import Run
from icl_gd.theory import baselines, probes

MC_GAMMA_TASKS = 2**18


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
    the same held-out tasks (with ``general_form_opt``, the (a, b) optimum of Ahn et al.'s general
    form, for deeper models); layers: per-layer preconditioners of deeper models; general_form:
    a block model's per-layer A_l, B_l read against a_l Sigma^-1 and b_l I.
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
        "loss_median": model["median"],
        "loss_star": loss_star,
        "loss_star_source": opt["source"],
        "loss_over_loss_star": model["loss"] / loss_star - 1.0,
        "loss_star_heldout": res["one_layer_opt"]["loss"],
        "gamma_star": probes.to_list(g_star),
        "gamma_star_stderr": None if opt["gamma_star_stderr"] is None else probes.to_list(opt["gamma_star_stderr"]),
        "eta_star": float(np.trace(g_star) / cfg.d),
        "ahn_distance_star": probes.ahn_distance(g_star, sigma),
        "gamma_learned": None,
        "rel_error": None,
        "baselines": res,
        "history": run.metrics,
    }
    if linear and cfg.depth == 1:
        gamma = probes.effective_gamma(params, cfg)
        eta, scalar_res = probes.scalar_fit(gamma)
        c_inv, inv_res = probes.shape_fit(gamma, np.linalg.inv(sigma))
        out.update({
            "gamma_learned": probes.to_list(gamma),
            "rel_error": probes.relative_error(gamma, g_star),
            "eta_learned": eta,
            "scalar_fit_residual": scalar_res,
            "scalar_fit_residual_star": probes.scalar_fit(g_star)[1],
            "sigma_inv_fit": {"scale": c_inv, "residual": inv_res},
            "ahn_distance": probes.ahn_distance(gamma, sigma),
            "non_gd_terms": probes.one_layer_terms(params, cfg),
        })
        if theory.has_closed_form(cfg):
            out["exact_loss_of_gamma_learned"] = theory.loss_of_gamma(gamma, sigma, omega, cfg.n, cfg.noise,
                                                                        cfg.noise_dist, cfg.x_dist, cfg.dof)
    if linear and cfg.depth > 1:
        gammas, scale = probes.layer_preconditioners(params, cfg)
        out["layers"] = {
            "exact": cfg.parameterization == "sparse",
            "preconditioners": probes.to_list(gammas),
            "output_scale": scale,
            "scalar_fits": [dict(zip(("eta", "residual"), probes.scalar_fit(g))) for g in gammas],
            "ahn_distances": [probes.ahn_distance(g, sigma) for g in gammas],
            "off_sparse_norms": probes.off_sparse_norms(params, cfg),
        }
    if linear and cfg.parameterization == "block" and "general_form_opt" in res:
        out["general_form"] = probes.general_form_layers(params, cfg, sigma)
    out.update(_sensitivity_numbers(cfg, params, res, g_star))
    return out


def _sensitivity_numbers(cfg: Config, params: Any, res: dict, g_star: np.ndarray) -> dict[str, Any]:
    """Cosines of d yhat / d x_q against reference predictors on the first held-out chunk."""
    _, size = eval_chunks(cfg)
    tasks = baselines.heldout_chunk(run_keys(cfg.seed)["eval"], 0, distribution(cfg), TaskSpec.from_config(cfg), size)
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    refs = {"one_layer_opt": (theory.one_step_predict, (f32(g_star),))}
    k = cfg.depth
    for tag, precond in (("gd", np.eye(cfg.d)), ("pgd", theory.oracle_preconditioner(cfg))):
        name = f"{tag}_{k}"
        if name in res:
            refs[name] = (theory.scaled_pgd_predict, (f32(res[name]["step_sizes"]), f32(precond)))
    predict = baselines.model_predictor(cfg)
    out: dict[str, Any] = {"sensitivity_cosine": probes.sensitivity_cosines(predict, (params,), refs, tasks)}
    if cfg.attention == "linear" and cfg.depth == 1:
        out["non_gd_output_fraction"] = probes.gd_part_fraction(params, cfg, tasks, predict, (params,))
    return out
