"""The theory's numbers for a config, no training: ``python -m launch.theory [--flag=value ...] [--format=json]``.

Takes every Config flag (d, n, covariance, weight prior, noise, target, depth, parameterisation,
...) and prints:

* the covariance Sigma (and prior Omega) the config draws tasks from;
* the best one-layer LSA: Gamma*, L* and eta* = tr(Gamma*)/d, in closed form (Mahankali et al.
  2023, Thm. 2 with any Omega; ``theory.gamma_star``) where the target is linear and x has finite
  fourth moments (Gaussian, uniform, sphere, Student-t with dof > 4: ``theory.fourth_moment``),
  else Gamma* by Monte Carlo (normal equations on ``--num_tasks`` tasks) and its loss on held-out tasks;
* for any depth L: the tuned L-step GD and Sigma^-1-preconditioned GD step sizes and losses
  (``theory.optimal_step_sizes``: L-BFGS on a fixed Monte-Carlo sample of tasks; k = 1 in closed
  form) and, where the prior is whitened (w ~ N(0, Sigma^-1), or Sigma = I), the PGD optimum from
  the Wishart-spectrum polynomial (``general_form``: the task average done exactly, the spectra
  sampled), ``pgd_steps_wishart`` / ``pgd_loss_wishart``;
* for --parameterization=block (or L > 1 with a whitened prior): Ahn et al.'s general form at
  its (a_l, b_l) optimum (``theory.general_form``).

Every loss is E[(yhat - y_q)^2] on fresh tasks (no 1/2). JSON keys: covariance, prior_covariance,
gamma_star, loss_star, eta_star, one_layer_source, gd_steps, gd_loss, pgd_steps, pgd_loss and,
where it applies, general_form {a, b, loss, stderr}.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
from absl import app, flags

from launch.flags import config_from_flags, define_config_file_flag, define_config_flags, exit_codes, quiet_library_logs

define_config_flags()
define_config_file_flag()  # --config=runs/X/config.json: the theory of that run's distribution
flags.DEFINE_enum("format", "text", ["text", "json"], "Output format.")
flags.DEFINE_integer("num_tasks", 2**15, "Monte-Carlo tasks for tuning the GD/PGD steps and scoring them.")
FLAGS = flags.FLAGS


def theory_numbers(cfg: Any, num_tasks: int) -> dict[str, Any]:
    """Every number the module docstring lists, JSON-ready."""
    import dataclasses

    import jax.numpy as jnp

    from icl_gd import theory
    from icl_gd.data import covariance_matrix, prior_covariance
    from icl_gd.report.numbers import one_layer_optimum
    from icl_gd.theory import baselines, general_form

    one = dataclasses.replace(cfg, depth=1)
    opt = one_layer_optimum(one, mc_tasks=max(num_tasks, 2**16))
    gamma = np.asarray(opt["gamma_star"])
    out: dict[str, Any] = {
        "config": cfg.to_dict(), "covariance": covariance_matrix(cfg).tolist(),
        "prior_covariance": prior_covariance(cfg).tolist(), "gamma_star": gamma.tolist(),
        "eta_star": float(np.trace(gamma) / cfg.d), "one_layer_source": opt["source"],
    }
    scored = dataclasses.replace(cfg, eval_tasks=num_tasks)
    preds = []
    if opt["loss_star"] is not None:
        out["loss_star"] = float(opt["loss_star"])
    else:
        preds.append(baselines.Predictor("one_layer", theory.one_step_predict, (jnp.asarray(gamma, jnp.float32),)))
    for tag, precond in (("gd", np.eye(cfg.d)), ("pgd", theory.oracle_preconditioner(cfg))):
        steps = baselines.tuned_steps(cfg, precond, cfg.depth, num_tasks)[-1]
        out[f"{tag}_steps"] = [float(e) for e in steps]
        preds.append(baselines.Predictor(tag, theory.scaled_pgd_predict, (jnp.asarray(steps, jnp.float32),
                                                                           jnp.asarray(precond, jnp.float32))))
    if general_form.has_general_form_optimum(cfg):
        # Whitened prior: the L-step PGD optimum from the Wishart-spectrum polynomial (the GD part of the
        # general form's fit, b = 0), against which the task-sample tuning above can be read.
        opt = general_form.config_general_form_optimum(cfg, min(num_tasks, 2**15))
        out["pgd_steps_wishart"], out["pgd_loss_wishart"] = list(opt.gd_steps), opt.gd_loss
    if general_form.has_general_form_optimum(cfg) and (cfg.depth > 1 or cfg.parameterization == "block"):
        info: dict[str, dict] = {}
        preds += baselines.baseline_predictors_general(cfg, info, min(num_tasks, 2**15))
        out["general_form"] = {"a": list(info["general_form_opt"]["a"]), "b": list(info["general_form_opt"]["b"])}
    errors = baselines.heldout_squared_errors(scored, preds)
    for name, e in errors.items():
        stats = baselines.mean_and_stderr(e)
        if name == "one_layer":
            out["loss_star"], out["loss_star_stderr"] = stats["loss"], stats["stderr"]
        elif name == "general_form_opt":
            out["general_form"].update(loss=stats["loss"], stderr=stats["stderr"])
        else:
            out[f"{name}_loss"], out[f"{name}_loss_stderr"] = stats["loss"], stats["stderr"]
    return out


def as_text(res: dict[str, Any]) -> str:
    cfg = res["config"]
    fmt = lambda m: np.array2string(np.asarray(m), precision=4, suppress_small=True)  # noqa: E731
    lines = [f"d={cfg['d']}, n={cfg['n']}, noise={cfg['noise']:g}, {cfg['covariance']} covariance, "
             f"{cfg['weight_prior']} prior, x {cfg['x_dist']}, target {cfg['target']}, depth {cfg['depth']}",
             "Sigma =", fmt(res["covariance"]), "Omega =", fmt(res["prior_covariance"]),
             f"one layer ({res['one_layer_source'].replace('_', ' ')}): eta* = tr(Gamma*)/d = {res['eta_star']:.6g}, "
             f"L* = {res['loss_star']:.6g}", "Gamma* =", fmt(res["gamma_star"])]
    for tag, name in (("gd", "GD"), ("pgd", "Sigma^-1-PGD")):
        steps = ", ".join(f"{e:.4g}" for e in res[f"{tag}_steps"])
        lines.append(f"{cfg['depth']}-step {name}: steps [{steps}], loss {res[f'{tag}_loss']:.6g} "
                     f"+- {res[f'{tag}_loss_stderr']:.2g}")
    if "pgd_steps_wishart" in res:
        steps = ", ".join(f"{e:.4g}" for e in res["pgd_steps_wishart"])
        lines.append(f"{cfg['depth']}-step Sigma^-1-PGD from the Wishart polynomial: steps [{steps}], "
                     f"loss {res['pgd_loss_wishart']:.6g}")
    if "general_form" in res:
        g = res["general_form"]
        lines.append(f"general form (a_l, b_l) optimum: a = {[round(v, 4) for v in g['a']]}, "
                     f"b = {[round(v, 4) for v in g['b']]}, loss {g['loss']:.6g} +- {g['stderr']:.2g}")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    with exit_codes():
        cfg = config_from_flags()
        if FLAGS.num_tasks < 1024:
            from icl_gd.config import ConfigError

            raise ConfigError("num_tasks", FLAGS.num_tasks, "must be an integer >= 1024")
    quiet_library_logs()
    res = theory_numbers(cfg, FLAGS.num_tasks)
    print(json.dumps(res, indent=1) if FLAGS.format == "json" else as_text(res))


if __name__ == "__main__":
    app.run(main)
