"""Trained-vs-theory report: ``python -m launch.analyze --workdir=DIR``.

DIR is one run (it holds checkpoints/) or a folder of runs (each subfolder with checkpoints/ is
a run). Writes DIR/analysis/{summary.json, report.md, *.png}; for a folder, one sub-report per
run under DIR/analysis/<run>/ and the loss-against-depth figure DIR/analysis/depth.png.
"""

from __future__ import annotations

import os

from absl import app, flags

from icl_gd.checkpoint import saved_steps
from icl_gd.config import ConfigError
from launch.flags import define_watchdog_flag, exit_codes, quiet_library_logs, start_watchdog

flags.DEFINE_string("workdir", None, "A run directory (with checkpoints/) or a folder of run directories.")
flags.DEFINE_string("out", None, "Output directory; default WORKDIR/analysis.")
flags.DEFINE_integer("max_steps", 0, "Largest k of the k-step GD baselines; 0 means max(depth, 3).")
flags.DEFINE_integer("tune_tasks", 2**15, "Tasks the baselines' step sizes are tuned on (Monte Carlo).")
flags.DEFINE_integer("mc_tasks", 2**18, "Tasks for the Monte-Carlo Gamma* where no closed form exists.")
flags.DEFINE_list("eval_ns", [], "Test-time context lengths (e.g. 2,5,10,20,40,80): the loss-against-n' curve of each "
                  "run (the layers average over n' tokens) beside its exact loss and OLS, ridge, GD, PGD tuned per n'.")
flags.DEFINE_integer("eval_ns_tasks", 2**15, "Held-out tasks per point of --eval_ns and the shift curves.")
flags.DEFINE_list("eval_x_scales", [], "Stretches of x at test time (e.g. 0.5,1,2): loss against x_scale (shifts.png).")
flags.DEFINE_list("eval_w_scales", [], "Stretches of w at test time (e.g. 0.5,1,2): loss against w_scale.")
flags.DEFINE_list("eval_conds", [], "Condition numbers of a rotated test-time Sigma (e.g. 1,10,100): loss vs cond.")
flags.DEFINE_boolean("compare_gd", False, "Compare each run with its matching GD construction (von Oswald et al.): "
                     "prediction and model differences, the loss along the line between the weights and, for tied "
                     "weights, the layer iterated past its depth (compare_gd.json/png).")
define_watchdog_flag()
FLAGS = flags.FLAGS


def _is_run(path: str) -> bool:
    return os.path.isdir(os.path.join(path, "checkpoints"))


def find_runs(workdir: str) -> dict[str, str]:
    """{name: path} of the runs under ``workdir`` ({basename: workdir} when it is one run)."""
    if _is_run(workdir):
        return {os.path.basename(os.path.abspath(workdir)): workdir}
    subs = sorted(e for e in os.listdir(workdir) if _is_run(os.path.join(workdir, e)))
    return {e: os.path.join(workdir, e) for e in subs}


def check_flags() -> dict[str, str]:
    """Validate the flags before JAX is imported; the runs {name: path}, or ConfigError naming the flag."""
    workdir = FLAGS.workdir
    if not workdir:
        raise ConfigError("workdir", workdir, "is required (a run directory or a folder of runs)")
    if not os.path.isdir(workdir):
        raise ConfigError("workdir", workdir, "does not exist or is not a directory")
    runs = find_runs(workdir)
    if not runs:
        raise ConfigError("workdir", workdir, "holds no run: expected checkpoints/ in it or in its subfolders")
    empty = [name for name, path in runs.items() if not saved_steps(path)]
    if empty:
        raise ConfigError("workdir", workdir, f"no checkpoint saved yet in {', '.join(empty)} (train it first)")
    for name, lo in (("max_steps", 0), ("tune_tasks", 16), ("mc_tasks", 256), ("eval_ns_tasks", 256)):
        if FLAGS[name].value < lo:
            raise ConfigError(name, FLAGS[name].value, f"must be an integer >= {lo}")
    if not all(v.isdigit() and int(v) >= 1 for v in FLAGS.eval_ns):
        raise ConfigError("eval_ns", ",".join(FLAGS.eval_ns), "must be comma-separated integers >= 1")
    for name, rule, allowed in (("eval_x_scales", lambda v: v > 0, "> 0"), ("eval_w_scales", lambda v: v > 0, "> 0"),
                                ("eval_conds", lambda v: 1 <= v <= 1e8, "in [1, 1e8]")):
        try:
            ok = all(rule(float(v)) for v in FLAGS[name].value)
        except ValueError:
            ok = False
        if not ok:
            raise ConfigError(name, ",".join(FLAGS[name].value), f"must be comma-separated numbers {allowed}")
    start_watchdog()
    return runs


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    with exit_codes():
        runs = check_flags()
    workdir = FLAGS.workdir

    import icl_gd  # after flag checks: the usage errors above stay fast
    from icl_gd import report

    quiet_library_logs()
    out = FLAGS.out or os.path.join(workdir, "analysis")
    kwargs = {"num_tune_tasks": FLAGS.tune_tasks, "mc_tasks": FLAGS.mc_tasks}
    if _is_run(workdir):
        run = icl_gd.load(workdir)
        summary = report.write_run_report(run, out, max_steps=FLAGS.max_steps or None, **kwargs)
        rows = {os.path.basename(os.path.abspath(workdir)): summary}
        loaded = {os.path.basename(os.path.abspath(workdir)): run}
    else:
        loaded = {name: icl_gd.load(path) for name, path in runs.items()}
        rows = report.write_folder_report(loaded, out, **kwargs)["runs"]
    shifts = {"x_scale": FLAGS.eval_x_scales, "w_scale": FLAGS.eval_w_scales, "cond": FLAGS.eval_conds}
    shifts = {field: [float(v) for v in values] for field, values in shifts.items() if values}
    if FLAGS.eval_ns or FLAGS.compare_gd or shifts:
        for name, run in loaded.items():
            where = out if _is_run(workdir) else os.path.join(out, name)
            for line in report.write_off_distribution(run, where, name, [int(v) for v in FLAGS.eval_ns], shifts,
                                                      FLAGS.compare_gd, FLAGS.eval_ns_tasks, FLAGS.tune_tasks):
                print(line)
    _gamma_images(rows, loaded, out, single=_is_run(workdir))
    for name, s in rows.items():
        rel = "" if s["rel_error"] is None else f"  rel_error {s['rel_error']:.2%}"
        print(f"{name}: loss {s['loss']:.4f}  L* {s['loss_star']:.4f} ({s['loss_over_loss_star']:+.2%}){rel}")
    print(f"report: {os.path.join(out, 'report.md')}")


def _gamma_images(rows: dict, loaded: dict, out: str, single: bool) -> None:
    """Each run's Gamma_eff vs Gamma* figure as a TensorBoard image (tag analysis/gamma, at the run's
    step) in the run folder beside its training scalars (``icl_gd.metrics``); a read-only run folder
    is left alone."""
    from icl_gd import metrics

    for name, summary in rows.items():
        figure, run = summary.get("figures", {}).get("gamma"), loaded[name]
        if figure is None:
            continue
        png = os.path.join(out if single else os.path.join(out, name), figure)
        if not os.access(run.workdir, os.W_OK):
            print(f"{name}: run folder not writable; gamma figure not added to its TensorBoard events")
            continue
        metrics.add_image(run.workdir, "analysis/gamma", png, run.step)


if __name__ == "__main__":
    app.run(main)
