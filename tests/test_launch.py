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
