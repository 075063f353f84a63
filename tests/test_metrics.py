"""Metrics files of a run: metrics.jsonl and TensorBoard event files, fresh, resumed and per sweep member."""

import json
import os

import pytest

from icl_gd import metrics, sweep, theory
from icl_gd.config import Config
from icl_gd.optim import make_schedule
from icl_gd.train import train


@pytest.fixture
def tiny() -> Config:
    return Config(d=2, n=4, batch_size=16, steps=60, log_every=10, checkpoint_every=20, eval_tasks=64)


def test_fresh_run_writes_jsonl_and_events(tmp_path, tiny):
    res = train(tiny, str(tmp_path))
    rows = metrics.read_jsonl(str(tmp_path / "metrics.jsonl"))
    assert [r["step"] for r in rows] == [10, 20, 30, 40, 50, 60]
    loss_star = theory.config_optimum(tiny)[1]
    for row, rec in zip(rows, res.history):
        assert set(row) == {"step", "time", "train_loss", "eval_loss", "loss_star", "lr", "tasks_per_sec",
                            "steps_per_sec"}
        assert (row["train_loss"], row["eval_loss"]) == (rec["train_loss"], rec["eval_loss"])
        assert row["loss_star"] == pytest.approx(loss_star)
        assert row["lr"] == pytest.approx(float(make_schedule(tiny)(row["step"] - 1)))
        assert row["tasks_per_sec"] > 0
    files = metrics.event_files(str(tmp_path))
    assert len(files) == 1 and os.path.getsize(files[0]) > 0
    events = metrics.read_events(files[0])
    assert events[0].file_version == "brain.Event:2"
    scalars = metrics.read_scalars(str(tmp_path))
    assert set(scalars) == set(metrics.TAGS.values())
    assert [s for s, _ in scalars["loss/eval"]] == [10, 20, 30, 40, 50, 60]
    assert [v for _, v in scalars["loss/eval"]] == pytest.approx([r["eval_loss"] for r in rows])
    # A finished run re-run trains nothing and writes nothing.
    train(tiny, str(tmp_path))
    assert len(metrics.event_files(str(tmp_path))) == 1
    assert len(metrics.read_jsonl(str(tmp_path / "metrics.jsonl"))) == 6


def test_resume_appends_without_duplicates(tmp_path, tiny):
    work = str(tmp_path)
    train(tiny, work, until=40)
    # A killed run logged steps 50 and 60 (and half a line) past its step-40 checkpoint.
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 50, "train_loss": 9.0}) + "\n" + json.dumps({"step": 60, "train_loss": 9.0})
                + "\n" + '{"step": 7')
    ev = metrics.EventFile(work, 40)
    from tensorboardX.proto.summary_pb2 import Summary

    for step in (50, 60):
        ev.write_summary(step, Summary(value=[Summary.Value(tag="loss/eval", simple_value=9.0)]))
    ev.close()
    with open(ev.path, "ab") as f:
        f.write(b"\x10\x00")  # a truncated record
    train(tiny, work)
    steps = [r["step"] for r in metrics.read_jsonl(str(tmp_path / "metrics.jsonl"))]
    assert steps == [10, 20, 30, 40, 50, 60]
    evals = metrics.read_scalars(work)["loss/eval"]
    assert [s for s, _ in evals] == steps and 9.0 not in [v for _, v in evals]
    assert len(metrics.event_files(work)) == 3  # the first run's, the killed one's (trimmed), the resumed one's
    # Each writer's file starts with TensorBoard's restart marker: hide the steps >= start + 1 seen before.
    restarts = [e.step for path in metrics.event_files(work) for e in metrics.read_events(path)
                if e.HasField("session_log")]
    assert sorted(restarts) == [1, 41]


def test_sweep_member_has_its_own_metrics(tmp_path, tiny):
    members = sweep.expand(tiny, sweep.Axes(seeds=(0, 1)))
    results = sweep.run_sweep(members, str(tmp_path), log=lambda _: None)
    for r in results:
        rows = metrics.read_jsonl(os.path.join(r.workdir, "metrics.jsonl"))
        assert [row["step"] for row in rows] == [10, 20, 30, 40, 50, 60]
        assert all(row["group_size"] == 2 for row in rows)
        assert rows[-1]["eval_loss"] == pytest.approx(r.eval_loss)
        assert [s for s, _ in metrics.read_scalars(r.workdir)["loss/train"]] == [10, 20, 30, 40, 50, 60]


def test_add_image_and_write_errors_name_the_path(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(1, 1))
    fig.savefig(tmp_path / "g.png", dpi=20)
    plt.close(fig)
    path = metrics.add_image(str(tmp_path), "gamma", str(tmp_path / "g.png"), 7)
    (image,) = [e for e in metrics.read_events(path) if e.HasField("summary")]
    assert image.step == 7 and image.summary.value[0].image.width == 20
    assert image.summary.value[0].image.encoded_image_string == (tmp_path / "g.png").read_bytes()
    with pytest.raises(OSError, match="missing"):
        metrics.MetricsWriter(str(tmp_path / "missing"), Config(), 0)
