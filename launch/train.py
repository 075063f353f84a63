"""Train one LSA run: ``python -m launch.train --workdir=runs/default [--flag=value ...]``.

Re-running with the same --workdir resumes from the latest checkpoint; a different config
for an existing workdir is refused. At the end it prints the learned effective step size
next to the theory's eta* = n/(n+d+1+sigma^2).
"""

from __future__ import annotations

from absl import app, flags, logging

from launch.flags import check_workdir, config_from_flags, define_run_flags, exit_codes, start_launcher

define_run_flags()
flags.DEFINE_string("workdir", "runs/default", "Run directory (checkpoints, config.json).")
FLAGS = flags.FLAGS


def report(summary: dict, cfg) -> str:
    """Human-readable end-of-run lines: the learned numbers next to the theory's."""
    lines = [f"finished {summary['steps']} steps in {summary['wall_seconds']:.1f}s"]
    if "eval_loss" in summary:
        line = f"eval loss      {summary['eval_loss']:.4f}"
        if "loss_star" in summary:
            rel = summary["eval_loss"] / summary["loss_star"] - 1
            line += f"    L* (best 1-layer) {summary['loss_star']:.4f}    ({rel:+.2%})"
        lines.append(line)
    if "eta_learned" in summary:
        line = f"learned eta    {summary['eta_learned']:.4f}"
        if "eta_star" in summary:
            rel = summary["eta_learned"] / summary["eta_star"] - 1
            iso = cfg.covariance == "isotropic" and cfg.weight_prior == "identity"
            name = "eta* = n/(n+d+1+sigma^2)" if iso else "eta* = tr(Gamma*)/d"
            line += f"    {name} {summary['eta_star']:.4f}    ({rel:+.2%})"
        lines.append(line)
    if "gamma_rel_error" in summary:
        lines.append(f"||Gamma_eff - Gamma*||_F / ||Gamma*||_F = {summary['gamma_rel_error']:.2%}")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    with exit_codes():
        cfg = config_from_flags()  # every flag is validated before JAX is even imported
        check_workdir(FLAGS.workdir)
        start_launcher()
        from icl_gd.train import train

        result = train(cfg, FLAGS.workdir)
    logging.info("summary: %s", result.summary)
    print(report(result.summary, cfg))
    print(f"checkpoint: {FLAGS.workdir}  (open it with: run = icl_gd.load({FLAGS.workdir!r}))")


if __name__ == "__main__":
    app.run(main)
