"""The cluster paths for real: an emitted sbatch array script submitted to a live SLURM cluster
(``.ci/slurm-up`` starts a one-node one on the CI machine), and a two-process ``--distributed``
sweep on localhost, each compared with a plain one-process run of the same grid."""

from __future__ import annotations

import math
import os
import re
import shutil
import socket
import subprocess
import time

import jax
import launchers
import numpy as np
import pytest

import icl_gd
from icl_gd.sweep import aggregate

# 2 covariances x 2 seeds = 4 members in one group; tiny enough for a loaded 2-core machine.
GRID = ["--d=2", "--n=4", "--batch_size=32", "--steps=20", "--log_every=10", "--checkpoint_every=10",
        "--eval_tasks=64", "--lr=0.02", "--covariances=isotropic,cond10", "--seeds=0,1", "--nobaselines"]
NUM_MEMBERS = 4
FAST_COMPILE = "--xla_backend_optimization_level=0"  # as in test_sweep: ~3x faster CPU compiles
JOB_TIMEOUT_S = 150


def sub_env() -> dict[str, str]:
    """CPU JAX, fast compiles, and none of an enclosing job's SLURM_* variables (the test may
    itself run inside a SLURM job)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_"))}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=FAST_COMPILE)
    return env


def sweep_cli(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return launchers.run("launch.sweep", *args, env=sub_env(), timeout=timeout)


def member_dirs(root: str) -> list[str]:
    return sorted(m for m in os.listdir(root) if os.path.isfile(os.path.join(root, m, "config.json")))


def params_of(workdir: str) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(icl_gd.load(workdir).params)]


def csv_rows(root: str) -> dict[str, dict[str, str]]:
    return {r["name"]: r for r in aggregate.read_csv(os.path.join(root, aggregate.CSV_NAME))}


def check_results(root: str) -> dict[str, dict[str, str]]:
    """Every member in the CSV, finished, with finite losses, and its checkpoint on disk."""
    rows = csv_rows(root)
    assert len(rows) == NUM_MEMBERS and sorted(rows) == member_dirs(root)
    for name, row in rows.items():
        assert row["status"] == "finished" and int(row["final_step"]) == 20, row
        assert math.isfinite(float(row["train_loss"])) and math.isfinite(float(row["eval_loss"])), row
        assert icl_gd.load(os.path.join(root, name)).step == 20
    return rows


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The reference: the grid trained by one ordinary process."""
    root = str(tmp_path_factory.mktemp("single"))
    out = sweep_cli(f"--workdir={root}", *GRID)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"{NUM_MEMBERS} trained" in out.stdout
    return root, check_results(root)


def same_as_single(root: str, single, exact: bool) -> None:
    """The same members, losses and params as the one-process run: bit for bit (``exact``; the CSV
    stores repr'd floats) or to float32 rounding."""
    ref_root, ref_rows = single
    rows = csv_rows(root)
    assert sorted(rows) == sorted(ref_rows)
    for name, row in rows.items():
        for col in ("train_loss", "eval_loss"):
            got, want = row[col], ref_rows[name][col]
            assert got == want if exact else float(got) == pytest.approx(float(want), rel=1e-5), (name, col, got, want)
        for a, b in zip(params_of(os.path.join(root, name)), params_of(os.path.join(ref_root, name)), strict=True):
            if exact:
                np.testing.assert_array_equal(a, b, err_msg=name)
            else:
                np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=name)


# ---------------------------------------------------------------------------------------
# SLURM: the emitted array script on a live cluster.
# ---------------------------------------------------------------------------------------
def slurm_unavailable() -> str:
    """Why the SLURM test cannot run here ('' when it can)."""
    missing = [c for c in ("sbatch", "sinfo", "squeue", "scontrol") if shutil.which(c) is None]
    if missing:
        return f"SLURM client missing ({', '.join(missing)}); start a one-node cluster with `bash .ci/slurm-up` (root)"
    conf = os.environ.get("SLURM_CONF", "/etc/slurm/slurm.conf")
    if not os.path.isfile(conf):  # the clients would try a DNS lookup first (slow to fail)
        return f"no {conf}; start a one-node cluster with `bash .ci/slurm-up` (root)"
    try:
        ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=20)
        state = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return "scontrol ping / sinfo timed out"
    if ping.returncode != 0 or "UP" not in ping.stdout:
        said = " ".join((ping.stdout + ping.stderr).split())[:120]
        return f"no slurmctld answers ({said}); run `bash .ci/slurm-up` (root)"
    states = state.stdout.split()
    if not any(s in ("idle", "mix", "alloc") for s in states):  # "idle*": not responding
        return f"no SLURM node is up (sinfo states: {states}); run `bash .ci/slurm-up` (root)"
    nodes = set(subprocess.run(["sinfo", "-h", "-N", "-o", "%N"], capture_output=True, text=True,
                               timeout=20).stdout.split())
    if nodes != {socket.gethostname().split(".")[0]}:
        return f"the cluster's nodes {sorted(nodes)} are not only this machine (the test's files are in local tmp)"
    return ""


def submit(script: str, env: dict[str, str]) -> list[str]:
    """``bash FILE`` as a user does: the array job and the dependent aggregation job."""
    out = subprocess.run(["bash", script], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    m = re.search(r"submitted array job (\d+) and aggregation job (\d+)", out.stdout)
    assert m, out.stdout
    return [m.group(1), m.group(2)]


def wait_for(job_ids: list[str], logs: str) -> None:
    """Until squeue lists none of the jobs; then every job (each array task) COMPLETED."""
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while True:
        q = subprocess.run(["squeue", "-h", "-j", ",".join(job_ids), "-o", "%i %T %r"],
                           capture_output=True, text=True, timeout=20)
        if q.returncode == 0 and not q.stdout.strip():
            break
        if time.monotonic() > deadline:
            pytest.fail(f"SLURM jobs still queued after {JOB_TIMEOUT_S}s:\n{q.stdout}\n{read_logs(logs)}")
        time.sleep(1)
    for job in job_ids:
        shown = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True, timeout=20)
        states = re.findall(r"JobState=(\S+)", shown.stdout)
        assert states and all(s == "COMPLETED" for s in states), f"job {job}: {states}\n{read_logs(logs)}"


def read_logs(logs: str) -> str:
    if not os.path.isdir(logs):
        return "(no log folder)"
    return "\n".join(f"--- {f}\n{open(os.path.join(logs, f)).read()[-2000:]}" for f in sorted(os.listdir(logs)))


def snapshot(root: str) -> dict[str, float]:
    """mtime of every file in every member folder (a re-trained member rewrites checkpoints and metrics)."""
    out = {}
    for name in member_dirs(root):
        for dirpath, _, files in os.walk(os.path.join(root, name)):
            for f in files:
                path = os.path.join(dirpath, f)
                out[path] = os.stat(path).st_mtime_ns
    return out


def test_emitted_array_script_on_a_live_slurm_cluster(tmp_path, request):
    """Emit, ``bash FILE`` (2-task array + dependent aggregation), wait; every member trained once,
    equal to the one-process run. Submitting the same script again trains nothing."""
    reason = slurm_unavailable()
    if reason:
        pytest.skip(reason)
    single = request.getfixturevalue("single")  # only once the cluster is known to be there
    root, script = str(tmp_path / "root"), str(tmp_path / "sweep.sbatch")
    out = sweep_cli(f"--workdir={root}", *GRID, "--num_shards=2", f"--emit_slurm={script}", "--slurm_gpus=0",
                    "--slurm_cpus=1", "--slurm_time=00:10:00")
    assert out.returncode == 0, out.stderr[-3000:]
    text = open(script).read()
    assert "#SBATCH --array=0-1" in text and launchers.command("launch.sweep")[0] in text  # this interpreter
    logs, env = os.path.join(root, "slurm"), sub_env()

    jobs = submit(script, env)
    try:
        wait_for(jobs, logs)
    finally:
        subprocess.run(["scancel", *jobs], capture_output=True)  # no-op once they finished
    task_logs = [os.path.join(logs, f"{jobs[0]}_{i}.out") for i in range(2)]
    for log in task_logs:
        assert "2 members: 2 trained" in open(log).read(), read_logs(logs)
    assert "aggregated:" in open(os.path.join(logs, f"{jobs[1]}-aggregate.out")).read()
    check_results(root)
    same_as_single(root, single, exact=True)  # the same vmapped program, 2 members wide

    before = snapshot(root)
    csv_mtime = os.stat(os.path.join(root, aggregate.CSV_NAME)).st_mtime_ns
    again = submit(script, env)
    try:
        wait_for(again, logs)
    finally:
        subprocess.run(["scancel", *again], capture_output=True)
    for i in range(2):
        assert "2 members: 2 skipped" in open(os.path.join(logs, f"{again[0]}_{i}.out")).read(), read_logs(logs)
    assert "nothing to do" in open(os.path.join(logs, f"{again[1]}-aggregate.out")).read(), read_logs(logs)
    assert snapshot(root) == before  # no checkpoint, metric or config file rewritten
    assert os.stat(os.path.join(root, aggregate.CSV_NAME)).st_mtime_ns == csv_mtime


# ---------------------------------------------------------------------------------------
# --distributed: two processes on localhost joined by jax.distributed (no SLURM needed).
# ---------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_process_distributed_sweep_equals_one_process(tmp_path, single):
    root = str(tmp_path)
    args = [f"--workdir={root}", *GRID, "--distributed", f"--coordinator_address=localhost:{_free_port()}",
            "--num_processes=2"]
    procs = [subprocess.Popen(launchers.command("launch.sweep", *args, f"--process_id={i}"), cwd=launchers.ROOT,
                              env=sub_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    try:
        outs = [p.communicate(timeout=150) for p in procs]
    finally:
        for p in procs:  # never leave a half of the runtime waiting for the other
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
        assert "2 device(s) in 2 process(es)" in err
    assert f"{NUM_MEMBERS} trained" in outs[0][0] and "aggregated:" in outs[0][0]  # process 0 reports and writes
    check_results(root)
    # Not bit for bit: the member axis is split over a 2-device mesh, a differently partitioned
    # XLA program (a one-process run on 2 forced host devices equals this one bit for bit, and both
    # differ from the unsharded run by ~1e-8 absolute in the params after 20 steps).
    same_as_single(root, single, exact=False)
