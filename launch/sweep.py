"""Run a grid of LSA trainings: ``python -m launch.sweep --workdir=ROOT --covariances=... ...``.

Swept axes (comma-separated lists; an omitted axis keeps the single value of its base flag):
  --covariances   isotropic | cond<K> (cond10 = --covariance=cond --cond=10) | eig<v1>_<v2>_...
  --noises --depths --seeds --ns --ds --weight_priors
Every other flag is the base config, exactly as in ``launch.train`` (--config=PATH: a JSON config,
e.g. a run's config.json, as the base; explicit flags override its fields; the axes vary the result).

Each member trains in ROOT/<member name> (an ordinary run folder: ``icl_gd.load`` opens it).
Same-shape members train together in one vmapped program, sharded over all devices. Re-running
the same command skips finished members and resumes unfinished ones. At the end (whole grid
only) ROOT/sweep_results.csv and figures are written.

Cluster: --num_shards=N --shard_index=i runs slice i (default $SLURM_ARRAY_TASK_ID);
--emit_slurm=FILE writes an sbatch array script (+ dependent aggregation job) and exits;
--distributed joins the processes of a job into one JAX runtime (jax.distributed).
"""

from __future__ import annotations

import os
import sys

from absl import app, flags

from icl_gd.config import ConfigError
from launch.flags import EXIT_RUN_FAILED, config_from_flags, define_run_flags, exit_codes, start_launcher

define_run_flags()
flags.DEFINE_string("workdir", "runs/sweep", "Sweep root: one run folder per member, plus the CSV and figures.")
flags.DEFINE_list("covariances", [], "Covariance axis: isotropic, cond<K> (e.g. cond10), eig<v1>_<v2>_... "
                  "(e.g. eig1_0.5_0.1). Empty: --covariance/--cond/--eigenvalues.")
flags.DEFINE_list("noises", [], "Label-noise axis (floats). Empty: --noise.")
flags.DEFINE_list("depths", [], "Depth axis (ints). Empty: --depth.")
flags.DEFINE_list("seeds", [], "Seed axis (ints). Empty: --seed.")
flags.DEFINE_list("ns", [], "Context-length axis (ints). Empty: --n.")
flags.DEFINE_list("ds", [], "Dimension axis (ints). Empty: --d.")
flags.DEFINE_list("weight_priors", [], "Weight-prior axis (identity, inverse). Empty: --weight_prior.")
flags.DEFINE_multi_string("also", [], "An extra sub-grid, unioned with the main one: space-separated "
                          "axis=v1,v2 overrides of the axis flags, e.g. --also='depths=2,3 covariances=isotropic'. "
                          "Repeatable.")
flags.DEFINE_integer("num_shards", 1, "Split the grid into this many deterministic slices.")
flags.DEFINE_integer("shard_index", None, "Slice to run; default $SLURM_ARRAY_TASK_ID, else 0.")
flags.DEFINE_boolean("only_aggregate", False, "Skip training; write the CSV and figures from what exists.")
flags.DEFINE_boolean("aggregate", True, "Aggregate after training when this run covered the whole grid.")
flags.DEFINE_boolean("baselines", True, "Add the GD-k / PGD-k reference losses to the CSV and figures.")
flags.DEFINE_boolean("list_members", False, "Print this slice's member folders and exit (no training).")
flags.DEFINE_boolean("distributed", False, "Call jax.distributed.initialize() (auto-detects SLURM) first.")
flags.DEFINE_string("coordinator_address", "", "host:port of process 0 for --distributed (else auto-detect).")
flags.DEFINE_integer("num_processes", 0, "Processes for --distributed with --coordinator_address.")
flags.DEFINE_integer("process_id", -1, "This process's id for --distributed with --coordinator_address.")
flags.DEFINE_string("emit_slurm", "", "Write an sbatch array script to this file and exit.")
flags.DEFINE_string("slurm_partition", "", "SLURM partition of the emitted script.")
flags.DEFINE_integer("slurm_gpus", 1, "GPUs per array task (--gres=gpu:N); 0 for CPU-only.")
flags.DEFINE_integer("slurm_cpus", 8, "CPUs per array task.")
flags.DEFINE_string("slurm_time", "04:00:00", "Time limit per array task.")
flags.DEFINE_string("slurm_mem", "", "Memory per node (e.g. 32G); empty: the partition default.")
flags.DEFINE_integer("slurm_nodes", 1, "Nodes per array task; > 1 runs each shard multi-host (srun + --distributed).")
FLAGS = flags.FLAGS

AXIS_FLAGS = {"covariances": None, "noises": float, "depths": int, "seeds": int, "ns": int, "ds": int,
              "weight_priors": str}
# A member's ConfigError names a Config field; report the list flag the user typed instead.
FIELD_TO_AXIS = {"covariance": "covariances", "cond": "covariances", "eigenvalues": "covariances",
                 "noise": "noises", "depth": "depths", "seed": "seeds", "n": "ns", "d": "ds",
                 "weight_prior": "weight_priors"}


def parse_axes(overrides: dict[str, list[str]] | None = None):
    """The ``Axes`` from the list flags (with ``overrides``); ConfigError naming the flag on a bad entry."""
    from icl_gd.sweep import Axes

    values = {}
    for name, kind in AXIS_FLAGS.items():
        given = (overrides or {}).get(name, FLAGS[name].value)
        raw = [v.strip() for v in given if v.strip()]
        if kind is None or kind is str:
            values[name] = tuple(raw)
            continue
        try:
            values[name] = tuple(kind(v) for v in raw)
        except ValueError as e:
            raise ConfigError(name, ",".join(raw), f"must be comma-separated {kind.__name__}s") from e
    return Axes(**values)


def parse_also(spec: str) -> dict[str, list[str]]:
    """'depths=2,3 covariances=isotropic' -> {'depths': ['2', '3'], 'covariances': ['isotropic']}."""
    out = {}
    for part in spec.split():
        name, sep, value = part.partition("=")
        if not sep or name not in AXIS_FLAGS:
            raise ConfigError("also", spec, f"entries are axis=v1,v2 with axis one of {', '.join(AXIS_FLAGS)}")
        out[name] = value.split(",")
    return out


def grid():
    """(all members, this invocation's slice) from the flags; everything validated here."""
    from icl_gd import sweep
    from icl_gd.sweep import cluster

    base = config_from_flags()
    grids = [parse_axes()] + [parse_axes(parse_also(spec)) for spec in FLAGS.also]
    try:
        members = sweep.expand_union(base, grids)
    except ConfigError as e:
        axis = FIELD_TO_AXIS.get(e.field)
        if axis and FLAGS[axis].value:
            raise ConfigError(axis, ",".join(FLAGS[axis].value), f"member value {e.value!r}: {e.allowed}") from e
        raise
    index = FLAGS.shard_index
    if index is None:
        index = cluster.shard_index_from_env()
    index = 0 if index is None else index
    return members, sweep.shard(members, FLAGS.num_shards, index)


def grid_args() -> list[str]:
    """The exact flags that define the grid (those set on the command line), for sbatch."""
    import dataclasses

    from icl_gd.config import Config

    grid_flags = {f.name for f in dataclasses.fields(Config)} | set(AXIS_FLAGS) | {"also", "aggregate", "baselines",
                                                                                  "config"}
    out = []
    for name in sorted(grid_flags):
        if not FLAGS[name].present:
            continue
        if name == "also":  # a multi flag: one argument per occurrence
            out += [f"--also={spec}" for spec in FLAGS.also]
        elif name == "config":  # the array tasks start elsewhere: an absolute path
            out.append(f"--config={os.path.abspath(FLAGS.config)}")
        else:
            out.append(FLAGS[name].serialize())
    return [f"--workdir={os.path.abspath(FLAGS.workdir)}", *out]


def emit_slurm(members_count: int) -> None:
    from icl_gd.sweep import cluster

    spec = cluster.SlurmSpec(partition=FLAGS.slurm_partition, gpus=FLAGS.slurm_gpus, cpus_per_task=FLAGS.slurm_cpus,
                             time=FLAGS.slurm_time, mem=FLAGS.slurm_mem, nodes=FLAGS.slurm_nodes)
    root = os.path.abspath(FLAGS.workdir)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    text = cluster.sbatch_script(grid_args(), root, FLAGS.num_shards, spec, sys.executable, repo)
    os.makedirs(os.path.join(root, "slurm"), exist_ok=True)
    with open(FLAGS.emit_slurm, "w") as f:
        f.write(text)
    os.chmod(FLAGS.emit_slurm, 0o755)
    print(f"wrote {FLAGS.emit_slurm}: {FLAGS.num_shards} array tasks over {members_count} members; "
          f"submit with: bash {FLAGS.emit_slurm}")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    with exit_codes():
        for name, lo in (("num_shards", 1), ("slurm_nodes", 1), ("slurm_gpus", 0), ("slurm_cpus", 1)):
            if FLAGS[name].value < lo:
                raise ConfigError(name, FLAGS[name].value, f"must be an integer >= {lo}")
        start_launcher()
        members, mine = grid()
        if FLAGS.emit_slurm:
            emit_slurm(len(members))
            return
        from icl_gd import sweep

        if FLAGS.list_members:
            for cfg in mine:
                print(os.path.join(FLAGS.workdir, sweep.member_name(cfg)))
            return
        if not FLAGS.distributed and len(mine) == len(members) and (FLAGS.aggregate or FLAGS.only_aggregate):
            from icl_gd.sweep import cache

            paths = cache.up_to_date(members, FLAGS.workdir, FLAGS.baselines)
            if paths is not None:  # every member finished and aggregated: nothing to load, train or draw
                print(f"sweep: all {len(members)} members finished and aggregated; nothing to do")
                print("aggregated: " + "  ".join(paths.values()))
                return
        if FLAGS.distributed:
            from icl_gd.sweep import cluster

            cluster.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
        counts = sweep.run_slice(members, mine, FLAGS.workdir, train=not FLAGS.only_aggregate,
                                 aggregate=FLAGS.only_aggregate or FLAGS.aggregate, baselines=FLAGS.baselines)
        if counts.get("failed"):
            sys.exit(EXIT_RUN_FAILED)


if __name__ == "__main__":
    app.run(main)
