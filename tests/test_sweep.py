"""Sweeps: grid expansion, vmapped == sequential training, resume/skip, shards, devices, SLURM."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import socket
import stat
import subprocess

import jax
import launchers
import numpy as np
import pytest

import icl_gd
from icl_gd import sweep
from icl_gd.config import Config, ConfigError
from icl_gd.sweep import aggregate, cluster
from icl_gd.train import Preempted, train

TINY = dict(d=2, n=6, batch_size=16, steps=30, log_every=15, checkpoint_every=15, eval_tasks=64, lr=0.02)
AXES = sweep.Axes(covariances=("isotropic", "cond10"), noises=(0.0, 0.5), seeds=(0, 1))
# The CLI spelling of TINY, noise 0.5, 3 covariances x 2 seeds (6 members; padded to 8 on 4 devices).
CLI_GRID = ["--d=2", "--n=6", "--batch_size=16", "--steps=30", "--log_every=15", "--checkpoint_every=15",
            "--eval_tasks=64", "--lr=0.02", "--covariances=isotropic,cond10,cond100", "--noises=0.5", "--seeds=0,1"]


def base() -> Config:
    return Config(**TINY)


# Subprocesses compile with LLVM's optimisations off: ~3x faster compiles on a 2-core CPU, same
# numbers to float tolerance (the comparisons below would catch it otherwise).
FAST_COMPILE = "--xla_backend_optimization_level=0"


def sub_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=FAST_COMPILE)
    for k, v in extra.items():
        env[k] = f"{env[k]} {v}" if k == "XLA_FLAGS" else v
    return env


def cli(*args: str, env: dict | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    return launchers.run("launch.sweep", *args, env=sub_env(**(env or {})), timeout=timeout)


def params_of(workdir: str) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(icl_gd.load(workdir).params)]


# ---------------------------------------------------------------------------------------
# Pure grid logic.
# ---------------------------------------------------------------------------------------
def test_covariance_syntax_round_trips():
    # isotropic and cond entries clear the eigenvalues (a field only covariance=eigenvalues may set)
    assert sweep.parse_covariance("isotropic") == {"covariance": "isotropic", "eigenvalues": ()}
    assert sweep.parse_covariance("cond1e3") == {"covariance": "cond", "cond": 1000.0, "eigenvalues": ()}
    assert sweep.parse_covariance("eig1_0.5") == {"covariance": "eigenvalues", "eigenvalues": (1.0, 0.5)}
    eig_base = dataclasses.replace(base(), covariance="eigenvalues", eigenvalues=(1.0, 0.5))
    for entry in ("isotropic", "cond10", "cond2.5", "eig1_0.5"):
        cfg = dataclasses.replace(base(), **sweep.parse_covariance(entry))
        assert sweep.covariance_label(cfg) == entry
        dataclasses.replace(eig_base, **sweep.parse_covariance(entry)).validate()
    for bad in ("cond", "condx", "eig", "eig1,2", "spiked"):
        with pytest.raises(ConfigError) as e:
            sweep.parse_covariance(bad)
        assert e.value.field == "covariances"


def test_expand_order_names_and_groups():
    members = sweep.expand(base(), dataclasses.replace(AXES, depths=(1, 2)))
    assert len(members) == 2 * 2 * 2 * 2
    assert [m.depth for m in members] == [1] * 8 + [2] * 8  # shape axes outermost
    assert {(m.covariance, m.noise, m.seed, m.depth) for m in members} == {
        (c, s, k, L) for c in ("isotropic", "cond") for s in (0.0, 0.5) for k in (0, 1) for L in (1, 2)}
    names = [sweep.member_name(m) for m in members]
    assert len(set(names)) == len(names)
    assert names == [sweep.member_name(m) for m in sweep.expand(base(), dataclasses.replace(AXES, depths=(1, 2)))]
    assert names[1].startswith("d2_n6_isotropic_identity_noise0_L1_seed1_")
    # Bookkeeping flags keep the folder (so a resume can change them); training fields move it.
    m0 = members[0]
    assert sweep.member_name(dataclasses.replace(m0, log_every=5)) == names[0]
    assert sweep.member_name(dataclasses.replace(m0, lr=0.1)) != names[0]
    groups = sweep.group(members)
    assert [len(g) for g in groups] == [8, 8]
    assert all(len({m.depth for m in g}) == 1 for g in groups)
    # Unions collapse duplicates; invalid members fail validation before anything compiles.
    union = sweep.expand_union(base(), [AXES, sweep.Axes(depths=(1, 2))])
    assert len(union) == 8 + 1
    with pytest.raises(ConfigError) as e:
        sweep.expand(base(), sweep.Axes(noises=(0.0, -1.0)))
    assert e.value.field == "noise"


@pytest.mark.parametrize("num_members", [0, 1, 7, 24, 40])
def test_shards_partition_the_grid(num_members):
    members = [dataclasses.replace(base(), seed=i) for i in range(num_members)]
    for n in (1, 2, 3, 5, 8):
        slices = [sweep.shard(members, n, i) for i in range(n)]
        assert [m for s in slices for m in s] == members
        assert max(map(len, slices)) - min(map(len, slices)) <= 1
    with pytest.raises(ConfigError):
        sweep.shard(members, 3, 3)
    assert cluster.shard_index_from_env({"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_MIN": "5"}) == 2
    assert cluster.shard_index_from_env({}) is None


# ---------------------------------------------------------------------------------------
# Training: one vmapped group vs train() member by member; skip and resume.
# ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """Three members of one group (isotropic/cond10, noise 0.5, seeds 0/1) trained vmapped."""
    root = str(tmp_path_factory.mktemp("sweep"))
    members = sweep.expand(base(), sweep.Axes(covariances=("isotropic", "cond10"), noises=(0.5,), seeds=(0, 1)))[:3]
    logs: list[str] = []
    results = sweep.run_sweep(members, root, log=logs.append)
    return root, members, results, logs


def test_vmapped_group_equals_sequential_train(swept):
    root, members, results, logs = swept
    assert [r.status for r in results] == ["trained"] * 3
    assert sum("compiled" in line for line in logs) == 1  # one program for the whole group
    for cfg in members[2:]:  # cond10, noise 0.5, seed 0: every vmapped axis away from the defaults
        ref = train(cfg, None, log=lambda _: None)
        run = icl_gd.load(os.path.join(root, sweep.member_name(cfg)))
        assert run.step == cfg.steps and run.config == cfg
        for a, b in zip(jax.tree.leaves(run.params), jax.tree.leaves(ref.state.params), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
        assert [h["step"] for h in run.metrics] == [h["step"] for h in ref.history]
        np.testing.assert_allclose([h["eval_loss"] for h in run.metrics], [h["eval_loss"] for h in ref.history],
                                   rtol=1e-4)
    # Different seeds/covariances really trained different members.
    assert not np.allclose(params_of(results[0].workdir)[0], params_of(results[1].workdir)[0])


def _mtimes(root: str) -> dict[str, float]:
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in [*files, "."]:
            path = os.path.join(dirpath, name)
            out[path] = os.stat(path).st_mtime_ns
    return out


def test_rerun_skips_finished_members(swept):
    root, members, _, _ = swept
    before = _mtimes(root)
    logs: list[str] = []
    results = sweep.run_sweep(members, root, log=logs.append)
    assert [r.status for r in results] == ["skipped"] * 3
    assert not any("compiled" in line for line in logs)
    assert _mtimes(root) == before  # nothing written, nothing overwritten


def test_preempted_group_saves_and_resumes_exactly(swept, tmp_path):
    """SIGTERM mid-run: every member is checkpointed at the step it reached (15, not a regular
    checkpoint step here) and the run stops; re-running resumes all of them and ends with the
    uninterrupted run's params."""
    root, members, _, _ = swept
    members = [dataclasses.replace(m, checkpoint_every=30) for m in members]  # same folders (bookkeeping)
    copy = str(tmp_path / "copy")

    def log(line: str) -> None:
        if line.startswith("compiled"):
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(Preempted):
        sweep.run_sweep(members, copy, log=log)
    for m in members:
        assert icl_gd.load(os.path.join(copy, sweep.member_name(m))).step == 15
    results = sweep.run_sweep(members, copy, log=lambda _: None)
    assert [(r.status, r.start_step, r.final_step) for r in results] == [("resumed", 15, 30)] * 3
    for m in members:
        name = sweep.member_name(m)
        for a, b in zip(params_of(os.path.join(copy, name)), params_of(os.path.join(root, name)), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_diverging_member_fails_alone(tmp_path):
    """A member whose loss overflows is reported and never checkpointed; its group-mates finish."""
    members = sweep.expand(base(), sweep.Axes(covariances=("isotropic", "eig1e30_1e30")))
    results = sweep.run_sweep(members, str(tmp_path), log=lambda _: None)
    assert [r.status for r in results] == ["trained", "failed"]
    assert "non-finite training loss at step 0" in results[1].message
    assert not os.listdir(os.path.join(results[1].workdir, "checkpoints"))
    assert icl_gd.load(results[0].workdir).step == members[0].steps


def test_aggregate_writes_csv_and_figures(swept):
    root, members, _, _ = swept
    paths = aggregate.aggregate(members, root)
    rows = aggregate.read_csv(paths["csv"])
    assert [r["name"] for r in rows] == [sweep.member_name(m) for m in members]
    for r, m in zip(rows, members, strict=True):
        assert r["status"] == "finished" and int(r["final_step"]) == m.steps
        assert float(r["loss_star"]) > 0.25 - 1e-9  # at least the noise floor sigma^2
        assert 0 <= float(r["gamma_rel_error"]) and np.isfinite(float(r["eta_learned"]))
        assert 0 < float(r["baseline_bayes"]) <= float(r["baseline_zero"])
        depth = int(r["depth"])  # k = depth references are the baselines' gd_k / pgd_k, with their steps
        assert float(r["gd_loss"]) == float(r[f"baseline_gd_{depth}"]) > 0
        assert float(r["pgd_loss"]) == float(r[f"baseline_pgd_{depth}"]) > 0
        assert len(r["pgd_steps"].split(";")) == depth
        run = icl_gd.load(os.path.join(root, r["name"]))
        assert float(r["eval_loss"]) == pytest.approx(run.metrics[-1]["eval_loss"])
    for key in ("loss_vs_depth", "eta_vs_noise"):
        with open(paths[key], "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    # Unchanged members: the re-run rewrites nothing (rows cached, CSV and figures kept).
    before = _mtimes(root)
    assert aggregate.aggregate(members, root) == paths
    assert _mtimes(root) == before
    # A member whose row changed (as after more training) redraws the CSV and the figures.
    row_file = os.path.join(root, sweep.member_name(members[0]), aggregate.ROW_NAME)
    with open(row_file) as f:
        stored = json.load(f)
    stored["row"]["eval_loss"] *= 0.5
    with open(row_file, "w") as f:
        json.dump(stored, f)
    aggregate.aggregate(members, root)
    after = _mtimes(root)
    assert all(after[p] != before[p] for p in paths.values())
    assert float(aggregate.read_csv(paths["csv"])[0]["eval_loss"]) == pytest.approx(stored["row"]["eval_loss"])


# ---------------------------------------------------------------------------------------
# Devices and processes (subprocesses: XLA flags and jax.distributed need a fresh runtime).
# ---------------------------------------------------------------------------------------
def test_sharded_over_four_cpu_devices_matches_unsharded(swept, tmp_path):
    root, members, _, _ = swept
    out = cli(f"--workdir={tmp_path}", *CLI_GRID, "--noaggregate",
              env={"XLA_FLAGS": "--xla_force_host_platform_device_count=4"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "6 trained" in out.stdout and "4 device(s)" in out.stderr
    for cfg in members[1:]:  # CLI_GRID is noise 0.5, seeds 0/1: members[1:] of the fixture are in it
        name = sweep.member_name(cfg)
        for a, b in zip(params_of(str(tmp_path / name)), params_of(os.path.join(root, name)), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_process_distributed_run(swept, tmp_path):
    root, members, _, _ = swept
    port = _free_port()
    args = [f"--workdir={tmp_path}", *CLI_GRID, "--nobaselines", "--distributed",
            f"--coordinator_address=localhost:{port}", "--num_processes=2"]
    env = sub_env()
    procs = [subprocess.Popen(launchers.command("launch.sweep", *args, f"--process_id={i}"), cwd=launchers.ROOT,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=150) for p in procs]
    for p, (_, stderr) in zip(procs, outs, strict=True):
        assert p.returncode == 0, stderr[-3000:]
        assert "2 device(s) in 2 process(es)" in stderr
    assert "6 trained" in outs[0][0] and "aggregated" in outs[0][0]  # process 0 reports and writes
    assert len(aggregate.read_csv(str(tmp_path / aggregate.CSV_NAME))) == 6
    for cfg in members[1:]:
        name = sweep.member_name(cfg)
        for a, b in zip(params_of(str(tmp_path / name)), params_of(os.path.join(root, name)), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------
# CLI: validation, shards from SLURM, the emitted sbatch script.
# ---------------------------------------------------------------------------------------
def test_bad_flags_fail_fast_with_one_line(tmp_path):
    for flag, name in (("--noises=0,-1", "--noises"), ("--covariances=spiked", "--covariances"),
                       ("--depths=1,x", "--depths")):
        out = cli(f"--workdir={tmp_path}", flag)
        assert out.returncode == 2, (flag, out.stderr)
        lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and name in lines[0] and "Traceback" not in out.stderr, (flag, out.stderr)
    assert not os.listdir(tmp_path)


def test_slurm_array_index_selects_the_shard(tmp_path):
    members = sweep.expand(base(), sweep.Axes(covariances=("isotropic", "cond10", "cond100"), noises=(0.0, 0.5),
                                              seeds=(0, 1)))
    out = cli(f"--workdir={tmp_path}", *CLI_GRID[:-3], "--covariances=isotropic,cond10,cond100", "--noises=0,0.5",
              "--seeds=0,1", "--num_shards=5", "--list_members", env={"SLURM_ARRAY_TASK_ID": "3"})
    assert out.returncode == 0, out.stderr
    listed = [os.path.basename(line) for line in out.stdout.split()]
    assert listed == [sweep.member_name(m) for m in sweep.shard(members, 5, 3)] and len(listed) == 2


def test_emitted_sbatch_script(tmp_path):
    script = tmp_path / "sweep.sbatch"
    root = tmp_path / "root"
    out = cli(f"--workdir={root}", *CLI_GRID, "--also=depths=2", "--num_shards=3", f"--emit_slurm={script}",
              "--slurm_partition=gpu", "--slurm_gpus=2", "--slurm_time=01:00:00")
    assert out.returncode == 0, out.stderr
    text = script.read_text()
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    for line in ("#SBATCH --array=0-2", "#SBATCH --partition=gpu", "#SBATCH --gres=gpu:2", "#SBATCH --time=01:00:00"):
        assert line in text.splitlines()
    assert "--num_shards=3" in text and "--also=depths=2" in text and "--covariances=isotropic,cond10" in text
    # Outside SLURM, `bash FILE` submits the array, then the aggregation after it (fake sbatch).
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "sbatch").write_text('#!/bin/bash\necho "$@" >> "$SBATCH_LOG"\necho 4242\n')
    (fake / "sbatch").chmod(stat.S_IRWXU)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PATH=f"{fake}:{env['PATH']}", SBATCH_LOG=str(tmp_path / "calls"))
    run = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    calls = (tmp_path / "calls").read_text().splitlines()
    assert len(calls) == 2 and calls[0].endswith(str(script))
    assert "--dependency=afterok:4242" in calls[1] and "--only_aggregate" in calls[1]


def test_two_concurrent_sweeps_on_one_root_train_each_member_once(tmp_path):
    """Two processes start the same sweep at once: each member is trained by exactly one of them
    (the other sees it claimed or finished), and every checkpoint ends complete."""
    args = [f"--workdir={tmp_path}", *CLI_GRID, "--noaggregate"]
    env = sub_env()
    procs = [subprocess.Popen(launchers.command("launch.sweep", *args), cwd=launchers.ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=240) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    trained = 0
    for out, _ in outs:
        line = next(ln for ln in out.splitlines() if ln.startswith("sweep slice done"))
        trained += sum(int(k) for k in re.findall(r"(\d+) (?:trained|resumed)", line))
    members = [m for m in os.listdir(tmp_path) if os.path.isdir(tmp_path / m)]
    assert len(members) == 6 and trained == 6
    for m in members:
        assert icl_gd.load(str(tmp_path / m)).step == 30
    # Aggregated once, a re-run has nothing to do: it reads the stored rows and the manifest
    # only (no JAX, no orbax), and writes nothing.
    full = [f"--workdir={tmp_path}", *CLI_GRID, "--nobaselines"]
    assert "aggregated:" in cli(*full, timeout=240).stdout
    before = _mtimes(str(tmp_path))
    out = launchers.run("launch.sweep", *full, env={**sub_env(), "PYTHONPROFILEIMPORTTIME": "1"}, timeout=60)
    assert "nothing to do" in out.stdout
    imported = {line.split("|")[-1].strip() for line in out.stderr.splitlines() if line.startswith("import time")}
    assert "icl_gd.sweep.cache" in imported and not {"jax", "orbax.checkpoint"} & imported
    assert _mtimes(str(tmp_path)) == before


def test_groups_compile_ahead_of_their_turn(tmp_path):
    """A Precompiler compiles each group's first chunk and eval before the loop reaches it: the loop then
    compiles nothing, trains the same params as ``train``, and a group with a checkpoint is not speculated."""
    from icl_gd.sweep.engine import Precompiler

    members = [base(), dataclasses.replace(base(), depth=2, covariance="cond", cond=10.0)]
    groups = [(g, str(tmp_path)) for g in sweep.group(members)]
    ahead = Precompiler(groups, ahead=2)
    ahead.wait()
    logs: list[str] = []
    try:
        results = sweep.run_sweep(members, str(tmp_path), log=logs.append, ahead=ahead)
    finally:
        ahead.close()
    assert [r.status for r in results] == ["trained"] * 2
    assert not any(line.startswith("compiled a") for line in logs)
    for cfg in members:
        ref = train(cfg, None, log=lambda _: None)
        for a, b in zip(params_of(os.path.join(str(tmp_path), sweep.member_name(cfg))),
                        jax.tree.leaves(ref.state.params), strict=True):
            np.testing.assert_allclose(a, np.asarray(b), rtol=1e-4, atol=1e-5)
    again = Precompiler(groups)
    again.wait()
    try:
        assert [again.take(g, root) for g, root in groups] == [None, None]  # finished: nothing compiled
    finally:
        again.close()


def test_a_group_taken_before_its_turn_is_compiled_by_the_loop(tmp_path):
    """With no look-ahead only the first group compiles ahead; a later group taken before its turn is
    dropped (the loop compiles it), and taking it again returns nothing instead of waiting for ever."""
    from icl_gd.sweep.engine import Precompiler

    groups = [(g, str(tmp_path)) for g in sweep.group([base(), dataclasses.replace(base(), depth=2)])]
    ahead = Precompiler(groups, ahead=0)
    try:
        ahead.wait()
        assert ahead.take(*groups[1]) is None and ahead.take(*groups[1]) is None
        first = ahead.take(*groups[0])
        assert first is not None and first.stack_size == 1 and {"heldout", "eval"} <= set(first.compiled)
    finally:
        ahead.close()
