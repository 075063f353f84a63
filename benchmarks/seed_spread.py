"""Seed-to-seed spread of every judged number: the evidence behind the tolerances in
``icl_gd.experiments.checks``.

    python -m benchmarks.seed_spread [--quick] [--experiments=mahankali_isotropic,...] [--seeds=0,1,2]

Runs each experiment once per seed (initialisation, training tasks and held-out set all change;
seed 0 reuses the runs of ``launch.reproduce`` under the same --workdir) and records, per check,
the measured value at every seed, its spread (standard deviation over seeds), its largest
deviation from the reference, and the tolerance it is judged with. Writes
benchmarks/seed_spread[_quick].json.
"""

from __future__ import annotations

import json
import os

import numpy as np
from absl import app, flags

flags.DEFINE_bool("quick", False, "Quick scale (d=3, n=10) instead of the papers' (d=5, n=20).")
flags.DEFINE_list("experiments", ["mahankali_isotropic", "mahankali_preconditioned", "mahankali_nonlinear",
                                  "ahn_single_layer", "beyond_label_noise", "beyond_prior"],
                  "Experiments to repeat over seeds.")
flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds (0 is the reproduction's own).")
flags.DEFINE_string("workdir", "runs/reproduce", "Root of the reproduction's runs (seed s > 0 under seed<s>/).")
flags.DEFINE_string("out", None, "JSON path (default benchmarks/seed_spread[_quick].json).")
FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    del argv
    from icl_gd.experiments import Size, run_experiment

    seeds = [int(s) for s in FLAGS.seeds]
    out: dict = {"quick": FLAGS.quick, "seeds": seeds, "experiments": {}}
    for name in FLAGS.experiments:
        per_seed = []
        for seed in seeds:
            root = FLAGS.workdir if seed == 0 else os.path.join(FLAGS.workdir, f"seed{seed}")
            per_seed.append(run_experiment(name, root, Size(quick=FLAGS.quick, seed=seed)).checks)
        rows = {}
        for checks in zip(*per_seed, strict=True):
            measured = [c.measured for c in checks]
            rows[checks[0].name] = {
                "measured": measured, "spread": float(np.std(measured, ddof=1)),
                "max_deviation": max(c.deviation for c in checks), "tolerance": checks[0].tol,
                "kind": checks[0].kind, "passed": [c.passed for c in checks]}
            print(f"{name}: {checks[0].name}: spread {rows[checks[0].name]['spread']:.3g}, max deviation "
                  f"{rows[checks[0].name]['max_deviation']:.3g} (tolerance {checks[0].tol:.3g}, {checks[0].kind})")
        out["experiments"][name] = rows
    path = FLAGS.out or f"benchmarks/seed_spread{'_quick' if FLAGS.quick else ''}.json"
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    app.run(main)
