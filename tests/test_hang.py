"""Noisy runs at the launchers' default sizes finish, and a hang becomes an error naming its stage.

The held-out programs once wedged XLA:CPU for ever at the default 65536 tasks with label noise
(docs/XLA_CPU_HANG.md). Each check runs in a subprocess under a time limit, so a regression
fails here instead of hanging CI.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import launchers
import pytest

from icl_gd import report, watchdog
from icl_gd.config import Config
from icl_gd.report import writer as report_writer
from icl_gd.sweep import aggregate

TRAIN = ["--noise=0.5", "--steps=100", "--log_every=50", "--checkpoint_every=100", "--batch_size=256"]


def _python(code: str, timeout: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=launchers.ROOT, env=launchers.cpu_env(),
                          capture_output=True, text=True, timeout=timeout)


def test_noisy_baselines_at_the_default_eval_size_finish_every_time():
    # The original reproducer: hung on the first or second call at eval_tasks=65536.
    out = _python("""
        from icl_gd.theory import baselines
        from icl_gd.config import Config
        for noise, k in ((0.5, 1), (1.0, 2), (0.5, 3)):
            cfg = Config(noise=noise).validate()
            assert cfg.eval_tasks == 65536
            for _ in range(2):
                res = baselines.evaluate(cfg, k)
            print(noise, k, res["ols"]["loss"], res["bayes"]["loss"])
        """, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.split("\n")
    # OLS at sigma = 0.5, d = 5, n = 20: E loss = sigma^2 (1 + d / (n - d - 1)) = 0.3393 (Bayes slightly below).
    noise, k, ols, bayes = lines[0].split()
    assert abs(float(ols) / 0.339286 - 1) < 0.02 and float(bayes) < float(ols)


@pytest.fixture(scope="module")
def noisy_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("noisy"))
    out = launchers.run("launch.train", f"--workdir={workdir}", *TRAIN, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return workdir


def test_analyze_a_noisy_run_at_default_sizes(noisy_run):
    out = launchers.run("launch.analyze", f"--workdir={noisy_run}", timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    with open(os.path.join(noisy_run, "analysis", "summary.json")) as f:
        summary = json.load(f)
    assert summary["config"]["eval_tasks"] == 65536 and summary["config"]["noise"] == 0.5
    assert summary["analysis_settings"] == {"max_steps": None, "mc_tasks": 2**18, "num_tune_tasks": 2**15}
    # A re-run with the same settings reuses the numbers and only redraws.
    again = launchers.run("launch.analyze", f"--workdir={noisy_run}", timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    with open(os.path.join(noisy_run, "analysis", "summary.json")) as f:
        assert json.load(f)["baselines"] == summary["baselines"]


def test_a_hung_stage_exits_124_and_names_the_stage(noisy_run, tmp_path):
    out = launchers.run("launch.analyze", f"--workdir={noisy_run}", f"--out={tmp_path}", "--watchdog_s=0.05",
                        timeout=120)
    assert out.returncode == watchdog.EXIT_HANG
    assert "error: stage '" in out.stderr and "re-run the same command to resume" in out.stderr
    assert "Python stacks of every thread" in out.stderr


def test_watchdog_flag_is_validated_before_any_work(tmp_path):
    out = launchers.run("launch.train", f"--workdir={tmp_path}", "--watchdog_s=-1", timeout=60)
    assert out.returncode == 2 and "watchdog_s" in out.stderr


def test_watchdog_in_process_kills_only_a_stage_past_its_deadline():
    out = _python("""
        import time
        from icl_gd import watchdog
        watchdog.configure(2.0)
        with watchdog.stage("quick stage"):
            time.sleep(0.1)
        print("quick stage passed", flush=True)
        with watchdog.stage("held-out evaluation of a wedged program"):
            time.sleep(30)
        print("unreachable")
        """, timeout=60)
    assert out.returncode == watchdog.EXIT_HANG
    assert "quick stage passed" in out.stdout and "unreachable" not in out.stdout
    assert "stage 'held-out evaluation of a wedged program' did not finish within 2s" in out.stderr
    with pytest.raises(ValueError):
        watchdog.configure(-1)


def test_run_report_reuses_its_summary_only_for_the_same_checkpoint_and_settings(noisy_run, tmp_path, monkeypatch):
    import icl_gd

    run = icl_gd.load(noisy_run)
    calls = []
    real = report.analyze_run
    monkeypatch.setattr(report_writer, "analyze_run", lambda r, **kw: calls.append(kw) or real(r, **kw))
    kwargs = {"num_tune_tasks": 64, "mc_tasks": 256}
    first = report.write_run_report(run, str(tmp_path), **kwargs)
    second = report.write_run_report(run, str(tmp_path), **kwargs)
    assert len(calls) == 1 and second["baselines"] == first["baselines"]
    report.write_run_report(run, str(tmp_path), num_tune_tasks=128, mc_tasks=256)
    assert len(calls) == 2


def test_sweep_over_noises_aggregates_at_default_sizes_and_reaggregation_reuses_rows(tmp_path, monkeypatch):
    root = str(tmp_path)
    out = launchers.run("launch.sweep", f"--workdir={root}", "--noises=0,0.5", *TRAIN[1:], timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = aggregate.read_csv(os.path.join(root, aggregate.CSV_NAME))
    assert sorted(float(r["noise"]) for r in rows) == [0.0, 0.5]
    assert all(int(r["eval_tasks"]) == 65536 and r["status"] == "finished" for r in rows)
    noisy = next(r for r in rows if float(r["noise"]) == 0.5)
    assert float(noisy["baseline_bayes"]) < float(noisy["baseline_ols"]) < float(noisy["baseline_zero"])
    # Re-aggregating computes no row again (a sweep whose aggregation was stopped resumes the same way).
    members = [Config(noise=s, steps=100, log_every=50, checkpoint_every=100, batch_size=256).validate()
               for s in (0.0, 0.5)]
    monkeypatch.setattr(aggregate, "member_row", lambda *a, **k: pytest.fail("row recomputed"))
    aggregate.aggregate(members, root)
    assert aggregate.read_csv(os.path.join(root, aggregate.CSV_NAME)) == rows
