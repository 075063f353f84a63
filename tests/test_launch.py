"""The absl launcher as a user runs it: a real subprocess, its output and exit codes."""

import json
import os
import subprocess

import launchers
import pytest


def _run(*args: str) -> subprocess.CompletedProcess:
    return launchers.run("launch.train", *args, timeout=300)


def test_train_prints_learned_eta_next_to_theory(tmp_path):
    out = _run(f"--workdir={tmp_path}", "--d=2", "--n=6", "--steps=300", "--batch_size=256",
               "--log_every=150", "--eval_tasks=1024")
    assert out.returncode == 0, out.stderr
    assert "eta* = n/(n+d+1+sigma^2) 0.6667" in out.stdout  # 6 / (6 + 2 + 1)
    assert "learned eta" in out.stdout and "L* (best 1-layer)" in out.stdout
    assert os.path.exists(tmp_path / "config.json")
    again = _run(f"--workdir={tmp_path}", "--d=2", "--n=6", "--steps=300", "--batch_size=256",
                 "--log_every=150", "--eval_tasks=1024")
    assert again.returncode == 0 and "finished 300 steps" in again.stdout
    clash = _run(f"--workdir={tmp_path}", "--d=3", "--n=6", "--steps=300")
    assert clash.returncode == 2 and "--d" in clash.stderr and "Traceback" not in clash.stderr


@pytest.mark.parametrize("flag,name", [
    ("--d=0", "--d"),
    ("--noise=-1", "--noise"),
    ("--covariance=banana", "--covariance"),
    ("--covariance=eigenvalues", "--eigenvalues"),
    ("--lr=0", "--lr"),
    ("--b2=1", "--b2"),
    ("--b1=-0.1", "--b1"),
    ("--parameterization=blocks", "--parameterization"),
])
def test_bad_flags_name_the_flag_without_traceback(tmp_path, flag, name):
    out = _run(f"--workdir={tmp_path}", *flag.split())
    assert out.returncode != 0
    assert name in out.stderr and "Traceback" not in out.stderr


def test_deep_block_run_reports_against_pgd_and_the_general_form_optimum(tmp_path):
    """Depth > 1: the end-of-run lines compare with L-step PGD and the (a, b) optimum, not the one-layer L*;
    the block recipe (lr 0.1, beta2 0.9, clip 1e-3) fills the flags left unset, an explicit flag wins."""
    out = _run(f"--workdir={tmp_path}", "--parameterization=block", "--depth=2", "--d=2", "--n=6", "--steps=200",
               "--batch_size=256", "--log_every=100", "--eval_tasks=1024", "--b1=0.8")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "2-step PGD (tuned)" in out.stdout and "(a, b) optimum" in out.stdout
    assert "L* (best 1-layer)" not in out.stdout
    assert "learned a_l" in out.stdout and "optimum b_l" in out.stdout
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert (cfg["lr"], cfg["b2"], cfg["clip_norm"], cfg["b1"]) == (0.1, 0.9, 1e-3, 0.8)


# ---------------------------------------------------------------------------------------
# --config=PATH: a JSON config as the base, explicit flags over it.
# ---------------------------------------------------------------------------------------
def _config_file(path, **fields) -> str:
    path.write_text(json.dumps(fields))
    return str(path)


def test_config_file_is_the_base_and_explicit_flags_override_it(tmp_path):
    """The file's values beat the flags' defaults and the block recipe; the recipe fills the fields the file
    lacks; a flag given explicitly beats the file."""
    base = _config_file(tmp_path / "base.json", parameterization="block", d=2, n=4, lr=0.05, steps=20, batch_size=16,
                        log_every=10, eval_tasks=64, noise=0.25)
    work = tmp_path / "run"
    out = _run(f"--workdir={work}", f"--config={base}", "--noise=0.5", "--b1=0.8")
    assert out.returncode == 0, out.stderr[-3000:]
    cfg = json.loads((work / "config.json").read_text())
    assert (cfg["parameterization"], cfg["d"], cfg["n"], cfg["lr"], cfg["steps"]) == ("block", 2, 4, 0.05, 20)
    assert (cfg["noise"], cfg["b1"]) == (0.5, 0.8)  # explicit flags
    assert (cfg["b2"], cfg["clip_norm"]) == (0.9, 1e-3)  # the block recipe, for fields the file lacks
    assert [json.loads(line)["step"] for line in (work / "metrics.jsonl").read_text().splitlines()] == [10, 20]
    # The run's own config.json reproduces its config exactly: the finished run is recognised, not refused.
    again = _run(f"--workdir={work}", f"--config={work / 'config.json'}")
    assert again.returncode == 0 and "finished 20 steps" in again.stdout, again.stderr[-3000:]


@pytest.mark.parametrize("launcher,fields,names", [
    ("launch.train", {"d": 2, "colour": "red"}, ["--config", "unknown field 'colour'"]),
    ("launch.sweep", {"d": 2, "colour": "red"}, ["--config", "unknown field 'colour'"]),
    ("launch.train", {"d": 0}, ["--config", "field d=0"]),
    ("launch.train", {"eigenvalues": "abc"}, ["--config"]),
    ("launch.train", None, ["--config", "cannot read it"]),
])
def test_bad_config_files_exit_2_naming_the_field(tmp_path, launcher, fields, names):
    path = str(tmp_path / "missing.json") if fields is None else _config_file(tmp_path / "c.json", **fields)
    out = launchers.run(launcher, f"--workdir={tmp_path / 'w'}", f"--config={path}", timeout=300)
    assert out.returncode == 2, out.stderr[-3000:]
    assert all(name in out.stderr for name in names) and "Traceback" not in out.stderr, out.stderr[-3000:]


def test_sweep_config_file_seeds_the_base_the_grid_varies(tmp_path):
    from icl_gd import sweep
    from icl_gd.config import Config

    fields = {"d": 2, "n": 6, "covariance": "cond", "cond": 10.0, "lr": 0.02, "steps": 30, "batch_size": 16,
              "eval_tasks": 64}
    path = _config_file(tmp_path / "base.json", **fields)
    grid = (f"--config={path}", "--lr=0.05", "--seeds=0,1", "--noises=0,0.5")
    out = launchers.run("launch.sweep", f"--workdir={tmp_path / 'root'}", *grid, "--list_members", timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    expected = sweep.expand(Config(**{**fields, "lr": 0.05}), sweep.Axes(seeds=(0, 1), noises=(0.0, 0.5)))
    assert [os.path.basename(line) for line in out.stdout.split()] == [sweep.member_name(m) for m in expected]
    script = tmp_path / "sweep.sbatch"
    out = launchers.run("launch.sweep", f"--workdir={tmp_path / 'root'}", *grid, f"--emit_slurm={script}",
                        timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"--config={os.path.abspath(path)}" in script.read_text() and "--lr=0.05" in script.read_text()


@pytest.mark.parametrize("error,code", [("ResourceError", 2), ("DiskFullError", 3)])
def test_resource_and_disk_errors_exit_with_one_line(capsys, error, code):
    """A run too large for the memory is a usage error (2); a full disk fails the run (3), like a NaN loss."""
    from icl_gd import errors
    from launch.flags import exit_codes

    with pytest.raises(SystemExit) as stop, exit_codes():
        raise getattr(errors, error)("what happened, naming the flag or the file")
    assert stop.value.code == code
    assert capsys.readouterr().err == "error: what happened, naming the flag or the file\n"
