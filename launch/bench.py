"""Benchmark suite: ``python -m launch.bench [--quick] [--out_json=... --out_md=...]``.

Times the real training step against the time of sampling its own batch (step / floor), the
per-task time against n (associative vs naive attention), memory per program, and folds in
the members benchmark of benchmarks/sweep_vmap.py when its JSON exists. Writes JSON and
regenerates the markdown table (keeping its hand-kept optimisation log). The full run takes a
few minutes on 2 cores; --quick about one.
"""

from __future__ import annotations

import dataclasses

from absl import app, flags, logging

flags.DEFINE_bool("quick", False, "Small batch, fewer steps/repeats, n up to 1280: about a minute.")
flags.DEFINE_string("out_json", "docs/benchmarks.json", "Where to write the JSON results.")
flags.DEFINE_string("out_md", "docs/BENCHMARKS.md", "Where to write the generated markdown table.")
flags.DEFINE_string("sweep_vmap_json", "benchmarks/sweep_vmap.json",
                    "JSON written by `python -m benchmarks.sweep_vmap`; included when it exists.")
flags.DEFINE_integer("repeats", None, "Override the timed repeats per figure (median reported).")
flags.DEFINE_integer("steps", None, "Override the training steps per timed compiled call.")
flags.DEFINE_integer("batch_size", None, "Override the throughput batch size.")
flags.DEFINE_list("scaling_ns", None, "Override the context lengths of the n sweep.")
FLAGS = flags.FLAGS


def settings_from_flags():
    from benchmarks.suite import Settings  # JAX loads only after flags parsed

    s = Settings.quick() if FLAGS.quick else Settings()
    over = {}
    if FLAGS.repeats is not None:
        over.update(repeats=FLAGS.repeats, scaling_repeats=FLAGS.repeats)
    if FLAGS.steps is not None:
        over["steps"] = FLAGS.steps
    if FLAGS.batch_size is not None:
        over["batch_size"] = FLAGS.batch_size
    if FLAGS.scaling_ns is not None:
        over["scaling_ns"] = tuple(int(v) for v in FLAGS.scaling_ns)
    for name in ("repeats", "steps", "batch_size"):
        if name in over and over[name] < 1:
            raise app.UsageError(f"--{name} must be >= 1")
    if any(n < 1 for n in over.get("scaling_ns", ())):
        raise app.UsageError("--scaling_ns must be positive integers")
    return dataclasses.replace(s, **over)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    s = settings_from_flags()
    from benchmarks import suite as bench

    res = bench.run_suite(s, FLAGS.sweep_vmap_json, log=logging.info)
    bench.write(res, FLAGS.out_json, FLAGS.out_md)
    logging.info("wrote %s and %s (%.0f s)", FLAGS.out_json, FLAGS.out_md, res["wall_s"])


if __name__ == "__main__":
    app.run(main)
