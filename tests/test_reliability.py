"""Fault injection with real processes: SIGKILL, SIGTERM, corrupt checkpoints, NaNs, bad flags."""

import errno
import json
import os
import random
import signal
import subprocess
import time

import jax
import launchers
import numpy as np
import pytest

import icl_gd
from icl_gd.checkpoint import Checkpointer
from icl_gd.config import Config
from icl_gd.train import NonFiniteLossError, train

RUN_FLAGS = ["--d=3", "--n=5", "--batch_size=128", "--steps=1500", "--log_every=50", "--checkpoint_every=50",
             "--eval_tasks=128", "--noise=0.3"]


def _launch(workdir, *extra: str) -> subprocess.Popen:
    """A launch.train that compiles its programs itself (no compilation cache): the kill and signal tests
    time their signals against a run whose start-up and length they were sized for."""
    cmd = launchers.command("launch.train", f"--workdir={workdir}", *RUN_FLAGS, *extra)
    env = {k: v for k, v in launchers.cpu_env().items() if k != "JAX_COMPILATION_CACHE_DIR"}
    return subprocess.Popen(cmd, cwd=launchers.ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _assert_same_state(a_dir, b_dir) -> None:
    a, b = icl_gd.load(str(a_dir)), icl_gd.load(str(b_dir))
    assert a.step == b.step == 1500
    for x, y in zip(jax.tree.leaves((a.params, a.opt_state)), jax.tree.leaves((b.params, b.opt_state))):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert [m["step"] for m in a.metrics] == [m["step"] for m in b.metrics]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("straight")
    proc = _launch(workdir)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    return workdir


def _latest(workdir) -> int | None:
    path = os.path.join(workdir, "checkpoints")
    steps = [int(s) for s in os.listdir(path) if s.isdigit()] if os.path.isdir(path) else []
    return max(steps) if steps else None


def test_sigkill_at_random_points_then_resume_is_bitwise_exact(straight, tmp_path):
    rng = random.Random(1234)
    kills = []
    for attempt in range(3):
        before = _latest(tmp_path)
        proc = _launch(tmp_path)
        time.sleep(rng.uniform(2.0, 6.0))
        if attempt == 2:  # start-up alone can outlast the sleep: the last kill waits for a new checkpoint
            deadline = time.time() + 300
            while _latest(tmp_path) in (None, before) and proc.poll() is None and time.time() < deadline:
                time.sleep(0.02)
            time.sleep(rng.uniform(0.0, 0.3))
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
        kills.append((proc.returncode, _latest(tmp_path)))
    proc = _launch(tmp_path)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    # At least one kill landed mid-run after a checkpoint was written, so a resume restored one.
    assert any(code == -signal.SIGKILL and latest is not None and latest < 1500 for code, latest in kills), kills
    _assert_same_state(straight, tmp_path)


def test_sigterm_saves_and_exits_cleanly_then_resumes_exactly(straight, tmp_path):
    proc = _launch(tmp_path)
    deadline = time.time() + 300
    while _latest(tmp_path) is None and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    if proc.returncode == 0:
        pytest.skip("the run finished before SIGTERM arrived")
    assert proc.returncode == 143, err
    assert "SIGTERM at step" in err and "Traceback" not in err
    stopped_at = _latest(tmp_path)
    assert stopped_at is not None and stopped_at < 1500
    proc = _launch(tmp_path)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    _assert_same_state(straight, tmp_path)


def _cfg(**kw) -> Config:
    base = dict(d=3, n=5, batch_size=32, steps=200, log_every=50, checkpoint_every=50, eval_tasks=64)
    return Config(**{**base, **kw})


def test_second_trainer_on_a_workdir_is_refused(tmp_path):
    """One writer per run folder: while one launch.train holds the folder, another exits at once
    (code 2) naming the holder, and the first finishes untouched."""
    first = _launch(tmp_path)
    lock = tmp_path / ".lock"
    deadline = time.time() + 120
    while not (lock.exists() and lock.read_text()) and time.time() < deadline:
        time.sleep(0.1)
    # Hold the first trainer still (alive, lock held) while the second starts: a fast first run (e.g. with
    # its programs in the compilation cache) must not finish and release the folder before the second looks.
    os.kill(first.pid, signal.SIGSTOP)
    try:
        second = launchers.run("launch.train", f"--workdir={tmp_path}", *RUN_FLAGS, timeout=120)
    finally:
        os.kill(first.pid, signal.SIGCONT)
    _, err = first.communicate(timeout=600)
    assert first.returncode == 0, err
    assert second.returncode == 2 and "Traceback" not in second.stderr, second.stderr
    assert f"pid {first.pid}" in second.stderr and "another process" in second.stderr
    assert icl_gd.load(str(tmp_path)).step == 1500


DAMAGED_CONFIGS = [("truncated", '{"d": 5, "n": 2'), ("random bytes", "\x00\xff\x13garbage"), ("empty", ""),
                   ("not an object", "[1, 2]"), ("unknown field", '{"d": 5, "banana": 1}')]


@pytest.mark.parametrize("kind,text", DAMAGED_CONFIGS)
def test_damaged_config_json_gives_one_line_and_load_falls_back(straight, tmp_path, kind, text):
    """A damaged config.json: launch.train stops with one line naming the file (exit 2, nothing
    written); icl_gd.load warns and uses the checkpoint's own copy of the config."""
    import shutil

    workdir = tmp_path / "run"
    shutil.copytree(straight, workdir)
    (workdir / "config.json").write_text(text, errors="surrogateescape")
    out = launchers.run("launch.train", f"--workdir={workdir}", *RUN_FLAGS, timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert "Traceback" not in out.stderr and "config.json" in lines[-1], out.stderr[-2000:]
    if kind == "unknown field":
        assert "banana" in lines[-1]
    run = icl_gd.load(str(workdir))
    assert run.step == 1500 and run.config == icl_gd.load(str(straight)).config


@pytest.mark.parametrize("item", ["metrics/metrics", "config/metadata", "_CHECKPOINT_METADATA"])
def test_damaged_json_item_of_an_old_step_never_blocks_the_run(straight, tmp_path, item):
    """Garbage in a JSON item of an OLD step (orbax reads every step's metrics when it opens a
    folder): load, analyze and resume still work from the newest step; the damaged step is moved
    to corrupt/<step>, not deleted. Every step damaged: one error line naming the folder."""
    import shutil

    workdir = tmp_path / "run"
    shutil.copytree(straight, workdir)
    steps = sorted(int(s) for s in os.listdir(workdir / "checkpoints") if s.isdigit())
    (workdir / "checkpoints" / str(steps[0]) / item).write_bytes(b"\x00garbage{")
    run = icl_gd.load(str(workdir))
    assert run.step == steps[-1]
    assert (workdir / "corrupt" / str(steps[0]) / item).exists()
    assert not (workdir / "checkpoints" / str(steps[0])).exists()
    for step in steps[1:]:
        (workdir / "checkpoints" / str(step) / item).write_bytes(b"")
    out = launchers.run("launch.train", f"--workdir={workdir}", *RUN_FLAGS, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert str(workdir) in out.stderr.strip().splitlines()[-1] and "corrupt" in out.stderr
    assert sorted(int(s) for s in os.listdir(workdir / "corrupt")) == steps


def test_truncated_latest_checkpoint_falls_back_to_the_previous_one(tmp_path):
    cfg = _cfg()
    reference = train(cfg)
    train(cfg, str(tmp_path), until=150)
    state_dir = tmp_path / "checkpoints" / "150" / "state"
    truncated = 0
    for root, _, files in os.walk(state_dir):
        for name in files:
            path = os.path.join(root, name)
            size = os.path.getsize(path)
            with open(path, "r+b") as f:
                f.truncate(size // 2)
            truncated += 1
    assert truncated > 0
    assert icl_gd.load(str(tmp_path)).step == 100  # read-only fallback, with a warning
    resumed = train(cfg, str(tmp_path))
    assert (tmp_path / "corrupt" / "150").is_dir()  # kept aside, not deleted
    for a, b in zip(jax.tree.leaves(reference.state), jax.tree.leaves(resumed.state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_non_finite_loss_stops_with_a_message_and_keeps_the_last_good_checkpoint(tmp_path):
    # Plain SGD whose learning rate warms up from 0 to a too-large 0.1: early steps are fine and
    # checkpointed every 50 steps, the quartic model then diverges (NaN near step 250).
    cfg = _cfg(steps=400, optimizer="sgd", schedule="warmup_cosine", warmup_steps=300, lr=0.1)
    with pytest.raises(NonFiniteLossError) as err:
        train(cfg, str(tmp_path))
    msg = str(err.value)
    assert "non-finite training loss at step" in msg and "lower --lr" in msg
    kept = Checkpointer(str(tmp_path), read_only=True).all_steps()
    assert kept and max(kept) < 400, "at least one good checkpoint must exist"
    assert f"last good checkpoint kept: step {max(kept)}" in msg
    run = icl_gd.load(str(tmp_path))
    assert all(np.all(np.isfinite(np.asarray(p))) for p in jax.tree.leaves((run.params, run.opt_state)))


BAD_TRAIN_FLAGS = [
    ("--d=0", "--d"), ("--n=0", "--n"), ("--depth=0", "--depth"), ("--heads=0", "--heads"),
    ("--noise=-0.5", "--noise"), ("--noise=nan", "--noise"), ("--lr=0", "--lr"), ("--lr=-1e-3", "--lr"),
    ("--batch_size=0", "--batch_size"), ("--steps=0", "--steps"), ("--cond=0.5", "--cond"),
    ("--eval_tasks=0", "--eval_tasks"), ("--covariance=banana", "--covariance"),
    ("--target=quadratic", "--target"), ("--optimizer=lbfgs", "--optimizer"), ("--x_dist=cauchy", "--x_dist"),
    ("--weight_prior=laplace", "--weight_prior"), ("--parameterization=dense", "--parameterization"),
    ("--attention=relu", "--attention"), ("--schedule=step", "--schedule"), ("--dof=2", "--dof"),
    ("--init_scale=0", "--init_scale"), ("--key_size=-1", "--key_size"), ("--clip_norm=-1", "--clip_norm"),
    ("--weight_decay=0.1", "--weight_decay"), ("--log_every=0", "--log_every"),
    ("--checkpoint_every=0", "--checkpoint_every"),
    ("--covariance=eigenvalues --eigenvalues=1,2", "--eigenvalues"),
    ("--covariance=eigenvalues --eigenvalues=1,2,3,4,-1", "--eigenvalues"),
    ("--covariance=eigenvalues --eigenvalues=1,x,3,4,5", "--eigenvalues"),
    ("--schedule=warmup_cosine --warmup_steps=5000 --steps=100", "--warmup_steps"),
    ("--eigenvalues=nan,1,1,1,1", "--eigenvalues"), ("--warmup_steps=10", "--warmup_steps"),
    ("--covariance=cond --cond=1e300", "--cond"), ("--x_scale=0", "--x_scale"),
    ("--d=abc", "--d"), ("--workdir=/proc/icl-gd-cannot-exist", "--workdir"),
    ("--depth=1000", "--depth"), ("--depth=65", "--depth"),
]


def test_train_refuses_a_sweep_root(tmp_path):
    (tmp_path / "d2_n6_member" / "checkpoints").mkdir(parents=True)
    out = launchers.run("launch.train", f"--workdir={tmp_path}", *RUN_FLAGS, timeout=60)
    assert out.returncode == 2 and "--workdir" in out.stderr and "sweep root" in out.stderr, out.stderr[-1000:]
    assert "Traceback" not in out.stderr and not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize("flags,name", BAD_TRAIN_FLAGS)
def test_bad_train_flags_get_one_clear_line(tmp_path, flags, name):
    args = flags.split()
    if not any(a.startswith("--workdir") for a in args):
        args.append(f"--workdir={tmp_path}")
    out = launchers.run("launch.train", *args, timeout=60)
    assert out.returncode != 0
    assert name in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert not os.path.exists(tmp_path / "checkpoints")  # nothing compiled, nothing written


# ---------------------------------------------------------------------------------------
# Resources: memory before compiling, deep stacks, a full disk (issue 19).
# ---------------------------------------------------------------------------------------
SMALL_FLAGS = ["--d=3", "--n=5", "--batch_size=32", "--steps=200", "--log_every=50", "--checkpoint_every=50",
               "--eval_tasks=64"]  # exactly _cfg()


def test_closed_event_loop_callbacks_are_dropped_and_other_reports_kept(tmp_path, monkeypatch):
    """orbax closes its asyncio loop when one tensorstore read of a restore fails; the reads still in
    flight then report RuntimeError('Event loop is closed') as unraisable: dropped, nothing else."""
    import asyncio
    import sys
    import types

    reported = []
    monkeypatch.setattr(sys, "unraisablehook", reported.append)
    Checkpointer(str(tmp_path)).close()  # installs the filter over the hook in place
    loop = asyncio.new_event_loop()
    loop.close()
    try:
        loop.call_soon_threadsafe(print)
    except RuntimeError as e:
        closed = e
    other = RuntimeError("something else")
    for error in (closed, other):
        sys.unraisablehook(types.SimpleNamespace(exc_type=type(error), exc_value=error,
                                                 exc_traceback=error.__traceback__, err_msg=None, object=None))
    assert [r.exc_value for r in reported] == [other]


def test_fallback_from_truncated_state_data_prints_no_traceback(tmp_path):
    """The newest step's array data truncated (a bad disk): resume falls back one checkpoint, finishes,
    and stderr holds the one warning line, no "Event loop is closed" tracebacks (they appeared on
    about half of such runs)."""
    train(_cfg(), str(tmp_path))
    for data in (tmp_path / "checkpoints" / "200" / "state").rglob("d/*"):
        data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    out = launchers.run("launch.train", f"--workdir={tmp_path}", *SMALL_FLAGS, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Traceback" not in out.stderr and "Event loop is closed" not in out.stderr, out.stderr[-3000:]
    assert "resumed from step 150" in out.stderr and (tmp_path / "corrupt" / "200").is_dir()


# (config fields, the program refused or None when it fits in 16 GB, flags the line must name)
RESOURCE_CASES = [
    (dict(), None, []),
    (dict(n=10_000_000), "the training step", ["--batch_size", "--n", "--d"]),
    (dict(batch_size=100_000_000), "the training step", ["--batch_size", "--n", "--d"]),
    (dict(attention="softmax", heads=8, n=2000, depth=4), "the training step", ["--heads", "--depth", "--n"]),
    (dict(batch_size=16, n=300_000), "the held-out evaluation", ["--eval_tasks", "--n", "--d"]),
]


@pytest.mark.parametrize("fields,program,names", RESOURCE_CASES)
def test_memory_estimate_refuses_what_cannot_fit_naming_the_flags(monkeypatch, fields, program, names):
    from icl_gd import resources
    from icl_gd.errors import ResourceError

    monkeypatch.setattr(resources, "available", lambda device=None: (16 * 10**9, "host memory"))
    cfg = Config(**fields)
    if program is None:
        resources.check_fits(cfg)
        return
    with pytest.raises(ResourceError) as err:
        resources.check_fits(cfg)
    msg = str(err.value)
    assert program in msg and "16 GB of host memory" in msg and "\n" not in msg, msg
    assert all(name in msg for name in names), msg


def test_memory_estimate_counts_the_members_of_a_sweep_group(monkeypatch):
    from icl_gd import resources
    from icl_gd.errors import ResourceError

    monkeypatch.setattr(resources, "available", lambda device=None: (16 * 10**9, "host memory"))
    cfg = Config(batch_size=2**20)
    resources.check_fits(cfg)  # one member fits
    with pytest.raises(ResourceError, match="64 members trained together"):
        resources.check_fits(cfg, members=64)


def test_available_memory_is_the_accelerators_headroom_else_the_hosts():
    import types

    from icl_gd import resources

    gpu = types.SimpleNamespace(platform="gpu", memory_stats=lambda: {"bytes_limit": 80 * 10**9,
                                                                       "bytes_in_use": 5 * 10**9})
    assert resources.available(gpu) == (75 * 10**9, f"GPU memory of {gpu}")
    cpu = types.SimpleNamespace(platform="cpu", memory_stats=lambda: None)
    free, where = resources.available(cpu)
    assert where == "host memory" and 0 < free <= os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.parametrize("fields", [dict(), dict(attention="softmax", heads=2, n=30, depth=2), dict(d=20, n=10)])
def test_memory_estimate_is_below_xla_memory_analysis(fields):
    """The arithmetic estimate never exceeds what XLA allocates, so a refused run could never have run."""
    from icl_gd import resources
    from icl_gd.data import distribution
    from icl_gd.keys import run_keys
    from icl_gd.optim import make_optimizer
    from icl_gd.train import init_state, make_eval, make_heldout, make_train_chunk

    cfg = Config(**fields, batch_size=256, eval_tasks=512)
    opt, keys = make_optimizer(cfg), run_keys(0)
    state = init_state(cfg, opt)
    step = jax.jit(make_train_chunk(cfg, opt), static_argnames="length").lower(
        state, distribution(cfg), keys["train"], length=1).compile()
    heldout = jax.jit(make_heldout(cfg))(distribution(cfg), keys["eval"])  # kept whole at this size
    held_out = jax.jit(make_eval(cfg)).lower(state.params, heldout).compile()
    est = resources.estimate(cfg)
    for program, compiled in (("train", step), ("eval", held_out)):
        m = compiled.memory_analysis()
        need = m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
        assert est[program] <= need, (program, est[program], need)


def test_xla_analysis_refuses_and_the_failed_first_attempt_locks_nothing(tmp_path, monkeypatch):
    """Memory just above the estimate but below XLA's analysis: the compiled step is refused with one
    line naming the flags, config.json stays without a checkpoint and the RunLock is released; the
    next attempt with a fixed flag replaces that config.json and trains (not "different config")."""
    import dataclasses

    from icl_gd import resources
    from icl_gd.checkpoint import read_config, saved_steps
    from icl_gd.errors import ResourceError
    from icl_gd.sweep.locks import RunLock

    cfg = _cfg(batch_size=48, seed=1919)  # a config of its own: compiled afresh, not from the process cache
    floor = max(resources.estimate(cfg).values())
    monkeypatch.setattr(resources, "available", lambda device=None: (int(floor * 1.01), "host memory"))
    with pytest.raises(ResourceError, match="XLA's memory analysis") as err:
        train(cfg, str(tmp_path))
    assert "--batch_size=48" in str(err.value) and "lower --batch_size, --n or --d" in str(err.value)
    assert read_config(str(tmp_path)) == cfg and saved_steps(str(tmp_path)) == []
    lock = RunLock(str(tmp_path))
    assert lock.acquire()
    lock.release()
    monkeypatch.undo()
    fixed = dataclasses.replace(cfg, batch_size=32)
    assert train(fixed, str(tmp_path)).state.step == 200
    assert read_config(str(tmp_path)) == fixed and saved_steps(str(tmp_path))[-1] == 200


@pytest.mark.parametrize("trained,refused", [(None, False), ("checkpoints/50", True), ("corrupt/50", True)])
def test_a_config_json_without_checkpoints_is_replaced_not_a_lock(tmp_path, trained, refused):
    from icl_gd.checkpoint import check_same_run, write_config
    from icl_gd.config import ConfigMismatchError

    write_config(str(tmp_path), _cfg(batch_size=10**8))
    assert check_same_run(str(tmp_path), _cfg(batch_size=10**8)) is False  # same config: nothing to write
    if trained:
        (tmp_path / trained).mkdir(parents=True)
        (tmp_path / trained / "state").mkdir()
    if refused:
        with pytest.raises(ConfigMismatchError, match="--batch_size"):
            check_same_run(str(tmp_path), _cfg())
    else:
        assert check_same_run(str(tmp_path), _cfg()) is True


@pytest.mark.parametrize("launcher,flags", [
    ("launch.train", ["--n=10000000"]),
    ("launch.train", ["--batch_size=100000000", "--n=200"]),
    ("launch.sweep", ["--ns=4,10000000", "--d=2", "--steps=20", "--eval_tasks=64"]),
])
def test_launchers_refuse_a_run_too_large_in_one_line(tmp_path, launcher, flags):
    out = launchers.run(launcher, f"--workdir={tmp_path}", *flags, timeout=300)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
    line = out.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ") and all(f in line for f in ("--batch_size", "--n", "--d", "GB")), line
    assert not list(tmp_path.rglob("checkpoints")) and not list(tmp_path.rglob("config.json"))


class _Full:
    """Injected failures: the write at step 150 (or the config write) finds the disk full."""

    @staticmethod
    def checkpoint(monkeypatch, error):
        import orbax.checkpoint as ocp

        save = ocp.CheckpointManager.save

        def failing(self, step, *args, **kwargs):
            if step == 150:
                raise error
            return save(self, step, *args, **kwargs)

        monkeypatch.setattr(ocp.CheckpointManager, "save", failing)

    @staticmethod
    def metrics(monkeypatch, error):
        from icl_gd.metrics import MetricsWriter

        write = MetricsWriter.write

        def failing(self, record):
            if record["step"] == 150:
                raise OSError(error.errno, error.strerror, self.jsonl_path)
            return write(self, record)

        monkeypatch.setattr(MetricsWriter, "write", failing)

    @staticmethod
    def config(monkeypatch, error):
        import icl_gd.checkpoint

        def failing(path, newline=None):
            raise error

        monkeypatch.setattr(icl_gd.checkpoint, "atomic_open", failing)


DISK_FULL_CASES = [
    ("checkpoint", OSError(errno.ENOSPC, "No space left on device"), "checkpoints/150"),
    ("checkpoint", ValueError('RESOURCE_EXHAUSTED: Error writing local file "x/manifest.ocdbt": Failed to write 166 '
                              'bytes to file 14: No space left on device'), "checkpoints/150"),  # orbax's tensorstore
    ("metrics", OSError(errno.EDQUOT, "Disk quota exceeded"), "metrics.jsonl"),
    ("config", OSError(errno.ENOSPC, "No space left on device"), "config.json"),
]


@pytest.fixture(scope="module")
def reference_state():
    return train(_cfg()).state


@pytest.mark.parametrize("where,error,path", DISK_FULL_CASES)
def test_full_disk_names_the_path_and_the_kept_checkpoint_then_resumes_exactly(tmp_path, monkeypatch, reference_state,
                                                                              where, error, path):
    from icl_gd.checkpoint import saved_steps
    from icl_gd.errors import DiskFullError

    cfg = _cfg()
    train(cfg, str(tmp_path), until=100)
    getattr(_Full, where)(monkeypatch, error)
    with pytest.raises(DiskFullError) as err:
        train(cfg, str(tmp_path))
    msg = str(err.value)
    assert "\n" not in msg and str(tmp_path) in msg and path in msg, msg
    assert "the last checkpoint kept is step 100" in msg, msg
    assert saved_steps(str(tmp_path)) == [50, 100]
    monkeypatch.undo()
    resumed = train(cfg, str(tmp_path))
    for a, b in zip(jax.tree.leaves(reference_state), jax.tree.leaves(resumed.state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert [m["step"] for m in icl_gd.load(str(tmp_path)).metrics] == [50, 100, 150, 200]
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [50, 100, 150, 200]


def test_a_save_keeps_the_history_as_it_was_when_saved(tmp_path):
    """Saves finish in the background: the records appended (or changed) after ``save`` returns are
    not in the checkpoint, which holds exactly the history handed to it."""
    from icl_gd.checkpoint import Checkpointer
    from icl_gd.train import init_state

    cfg = _cfg()
    state = jax.tree.map(np.asarray, init_state(cfg))
    history = [{"step": 50, "train_loss": 1.0}]
    ckpt = Checkpointer(str(tmp_path), keep=3)
    ckpt.save(50, state, cfg, history)
    history.append({"step": 100, "train_loss": 0.5})  # the loop goes on at once
    history[0]["train_loss"] = 9.0
    ckpt.close()
    restored = Checkpointer(str(tmp_path), read_only=True)
    assert restored.restore(init_state(cfg), 50)[2] == [{"step": 50, "train_loss": 1.0}]
    restored.close()
