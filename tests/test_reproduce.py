"""launch.reproduce end to end at smoke-test size: every experiment trains, is analysed, judged,
plotted, and lands in RESULTS.md. (At 10 steps the claims are not expected to hold: the PASS
logic itself is tested in test_checks.py; the real numbers come from --quick runs.)"""

import json
import re
import subprocess

import launchers

from icl_gd.experiments import EXPERIMENTS


def _run(*args: str) -> subprocess.CompletedProcess:
    return launchers.run("launch.reproduce", *args, timeout=900)


def test_every_experiment_runs_end_to_end(tmp_path):
    md = tmp_path / "docs" / "RESULTS_QUICK.md"
    out = _run("--experiment=all", "--quick", "--steps=10", f"--workdir={tmp_path / 'runs'}", f"--results_md={md}")
    assert out.returncode in (0, 1), out.stderr[-3000:]  # 1: some claims FAIL at 10 steps, as they should
    assert "Traceback" not in out.stderr
    text = md.read_text()
    for name in EXPERIMENTS:
        assert f"== {name}:" in out.stdout
        assert (tmp_path / "runs" / name / f"{name}.png").stat().st_size > 10_000
        assert (tmp_path / "docs" / "figures" / "quick" / f"{name}.png").exists()
        assert f"![{name}](figures/quick/{name}.png)" in text
        assert (tmp_path / "runs" / name / "results.json").exists()
    judged = [ln for ln in out.stdout.splitlines() if re.match(r"^(PASS|FAIL)  ", ln)]
    assert len(judged) >= 20  # every experiment is judged now (none reported-only)
    assert re.search(r"^\d+ passed, \d+ failed$", out.stdout, re.M)
    record = json.loads((tmp_path / "docs" / "results_quick.json").read_text())
    assert record["scale"]["quick"] is True and record["wall_seconds"] > record["train_seconds"] > 0
    assert [e["name"] for e in record["experiments"]] == list(EXPERIMENTS)
    assert all({"checks", "numbers", "passed"} <= set(e) for e in record["experiments"])


def test_unknown_experiment_is_a_clear_error(tmp_path):
    out = _run("--experiment=nope", f"--workdir={tmp_path}")
    assert out.returncode == 2 and "--experiment" in out.stderr and "Traceback" not in out.stderr


def test_paper_scale_members_are_valid_configs():
    """The papers' scale is not trained in CI, so at least its configs are built and validated."""
    from icl_gd.experiments import Size

    for name, exp in EXPERIMENTS.items():
        members = exp.members(Size(quick=False))
        assert members, name
        assert all(m.d == 5 and m.steps >= 2000 for m in members), name
        ns = sorted({m.n for m in members})
        assert ns == (list(range(2, 21, 2)) if name == "ahn_variable_n" else [20]), name
    depths = sorted({m.depth for m in EXPERIMENTS["ahn_multilayer"].members(Size(quick=False))})
    assert depths == [1, 2, 3, 4]


def test_smoke_runs_never_overwrite_the_committed_results():
    from launch.reproduce import results_paths

    assert results_paths(False, "auto") == ("docs/RESULTS.md", "docs/results.json")
    assert results_paths(True, "auto") == ("docs/RESULTS_QUICK.md", "docs/results_quick.json")
    assert results_paths(False, "auto", steps=20, workdir="/x") == ("/x/RESULTS.md", "/x/results.json")
    assert results_paths(True, "auto", steps=20, workdir="/x") == ("/x/RESULTS_QUICK.md", "/x/results_quick.json")
    assert results_paths(True, "out/R.md", steps=20, workdir="/x") == ("out/R.md", "out/results_quick.json")
