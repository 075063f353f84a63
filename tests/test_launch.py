"""The absl launcher as a user runs it: a real subprocess, its output and exit codes."""

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
])
def test_bad_flags_name_the_flag_without_traceback(tmp_path, flag, name):
    out = _run(f"--workdir={tmp_path}", flag)
    assert out.returncode != 0
    assert name in out.stderr and "Traceback" not in out.stderr
