"""Train one LSA run: ``python -m launch.train --workdir=runs/default [--flag=value ...]``.

Re-running with the same --workdir resumes from the latest checkpoint; a different config
for an existing workdir is refused. ``--config=PATH`` starts from a JSON config (e.g. another
run's config.json); flags given explicitly override its fields. At the end it prints the
learned effective step size next to the theory's eta* = n/(n+d+1+sigma^2).
"""

from __future__ import annotations

from absl import app, flags, logging

from launch.flags import check_workdir, config_from_flags, define_run_flags, exit_codes, start_launcher

define_run_flags()
flags.DEFINE_string("workdir", "runs/default", "Run directory (checkpoints, config.json).")
FLAGS = flags.FLAGS


def check_not_a_sweep_root(workdir: str) -> None:
    """A run folder holds one run: refuse a folder whose subfolders hold runs (a sweep root)."""
    import os

    from icl_gd.config import ConfigError

    members = [e for e in sorted(os.listdir(workdir)) if os.path.isdir(os.path.join(workdir, e, "checkpoints"))]
    if members:
        raise ConfigError("workdir", workdir, f"holds other runs ({members[0]}, ...: a sweep root?); "
                          "use a folder of its own")


def report(summary: dict, cfg) -> str:
    """Human-readable end-of-run lines: the learned numbers next to the theory's for this depth."""
    lines = [f"finished {summary['steps']} steps in {summary['wall_seconds']:.1f}s"]
    if "eval_loss" in summary:
        loss = summary["eval_loss"]
        line = f"eval loss      {loss:.4g}"
        if cfg.depth == 1 and "loss_star" in summary:
            line += f"    L* (best 1-layer) {summary['loss_star']:.4f}    ({_rel(loss, summary['loss_star'])})"
        if "pgd_loss" in summary:
            line += f"    {cfg.depth}-step PGD (tuned) {summary['pgd_loss']:.4g} ({_rel(loss, summary['pgd_loss'])})"
        if "general_form_opt" in summary:
            opt = summary["general_form_opt"]["loss"]
            line += f"    (a, b) optimum {opt:.4g} ({_rel(loss, opt)})"
        lines.append(line)
    if "eta_learned" in summary:
        line = f"learned eta    {summary['eta_learned']:.4f}"
        if "eta_star" in summary:
            iso = (cfg.covariance == "isotropic" and cfg.weight_prior == "identity"
                   and cfg.noise_dist != "heteroscedastic" and cfg.x_dist == "gaussian" and not cfg.prior_mean)
            name = "eta* = n/(n+d+1+sigma^2)" if iso else "eta* = tr(Gamma*)/d"
            line += f"    {name} {summary['eta_star']:.4f}    ({_rel(summary['eta_learned'], summary['eta_star'])})"
        lines.append(line)
    if "gamma_rel_error" in summary:
        lines.append(f"||Gamma_eff - Gamma*||_F / ||Gamma*||_F = {summary['gamma_rel_error']:.2%}")
    if "learned_a" in summary and "general_form_opt" in summary:
        opt = summary["general_form_opt"]
        lines.append(f"learned a_l    {_vec(summary['learned_a'])}    optimum a_l {_vec(opt['a'])}")
        lines.append(f"learned b_l    {_vec(summary['learned_b'][:-1])}    optimum b_l {_vec(opt['b'][:-1])}"
                     "    (b_L never reaches the prediction)")
    elif "layer_steps" in summary:
        lines.append(f"learned steps  {_vec(summary['layer_steps'])}    PGD steps (tuned) {_vec(summary['pgd_steps'])}"
                     "    (sorted: the steps commute)")
    if "layer_ahn_distances" in summary:
        lines.append(f"per layer dist(Sigma^1/2 Gamma_l Sigma^1/2, I) = {_vec(summary['layer_ahn_distances'])}")
    return "\n".join(lines)


def _rel(value: float, ref: float) -> str:
    return f"{value / ref - 1:+.2%}"


def _vec(values) -> str:
    return "[" + ", ".join(f"{v:.4g}" for v in values) + "]"


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    with exit_codes():
        cfg = config_from_flags()  # every flag is validated before JAX is even imported
        check_workdir(FLAGS.workdir)
        check_not_a_sweep_root(FLAGS.workdir)
        start_launcher()
        from icl_gd.train import train

        result = train(cfg, FLAGS.workdir)
    logging.info("summary: %s", result.summary)
    print(report(result.summary, cfg))
    print(f"checkpoint: {FLAGS.workdir}  (open it with: run = icl_gd.load({FLAGS.workdir!r}))")


if __name__ == "__main__":
    app.run(main)
