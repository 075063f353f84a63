"""A run's metrics files: ``WORKDIR/metrics.jsonl`` and TensorBoard event files in ``WORKDIR``.

``MetricsWriter`` takes the training loop's record of each logged step and appends it to both:
one JSON line (``FIELDS``) and one TensorBoard event of scalars (``TAGS``), written with
tensorboardX's record writer and protos (no TensorFlow). Both files are opened once per run
and flushed at every logged step; an ``OSError`` propagates, naming the file.

Resume. A killed run may have logged steps past its last checkpoint. Opening a writer at
``start_step`` first drops every line of metrics.jsonl and every event of the existing event
files with a step > ``start_step`` (files are rewritten atomically, and only when something is
dropped), so the steps stay strictly increasing and unduplicated. Each writer opens a new event
file (TensorBoard reads every event file of a folder as one run) that starts with TensorBoard's
restart marker at ``start_step + 1`` (what tensorboardX's ``purge_step`` writes), so a
TensorBoard already showing the folder hides the dropped points too.
"""

from __future__ import annotations

import functools
import json
import os
import socket
import struct
import time
import uuid
from collections.abc import Iterator
from typing import Any

from icl_gd.config import Config

JSONL = "metrics.jsonl"
# metrics.jsonl fields, in order; loss_star only where the one-layer optimum has a closed form,
# group_size only for sweep members (trained together in a vmapped group of that size).
FIELDS = ("step", "time", "train_loss", "eval_loss", "loss_star", "lr", "tasks_per_sec", "steps_per_sec", "group_size")
# TensorBoard scalar tag of each field.
TAGS = {"train_loss": "loss/train", "eval_loss": "loss/eval", "loss_star": "loss/L_star", "lr": "optim/lr",
        "tasks_per_sec": "speed/tasks_per_sec", "steps_per_sec": "speed/steps_per_sec"}
EVENTS_MARK = "tfevents"  # TensorBoard reads the files whose name holds it


class MetricsWriter:
    """Appends one record per logged step to ``workdir``'s metrics.jsonl and a new event file."""

    def __init__(self, workdir: str, cfg: Config, start_step: int) -> None:
        from tensorboardX.proto.event_pb2 import Event, SessionLog

        self.cfg = cfg
        self.jsonl_path = os.path.join(workdir, JSONL)
        trim_jsonl(self.jsonl_path, start_step)
        trim_events(workdir, start_step)
        self._jsonl = open(self.jsonl_path, "a")  # noqa: SIM115 - open for the whole run, closed by close()
        try:
            self._events = EventFile(workdir, start_step)
            self._events.write(Event(wall_time=time.time(), step=start_step + 1,
                                     session_log=SessionLog(status=SessionLog.START)))
            self._events.flush()
        except BaseException:
            self._jsonl.close()
            raise

    def write(self, record: dict[str, Any]) -> None:
        """One logged step: ``record`` holds step, train_loss, eval_loss, tasks_per_sec, steps_per_sec
        (loss_star, group_size where known); the time and the learning rate are added here."""
        from tensorboardX.proto.summary_pb2 import Summary

        step = int(record["step"])
        row = {"step": step, "time": time.time(), **record, "lr": learning_rate(self.cfg, step)}
        row = {k: row[k] for k in FIELDS if k in row} | {k: v for k, v in row.items() if k not in FIELDS}
        try:
            self._jsonl.write(json.dumps(row) + "\n")
            self._jsonl.flush()
        except OSError as e:
            raise OSError(e.errno, f"cannot write metrics: {e.strerror}", self.jsonl_path) from e
        values = [Summary.Value(tag=tag, simple_value=float(row[k])) for k, tag in TAGS.items() if k in row]
        self._events.write_summary(step, Summary(value=values), row["time"])
        self._events.flush()

    def close(self) -> None:
        try:
            self._jsonl.close()
        finally:
            self._events.close()


def open_writer(workdir: str | None, cfg: Config, start_step: int, stop: int) -> MetricsWriter | None:
    """The writer of a run that will train (``start_step < stop``) in a folder, on the process that
    writes files (process 0 under jax.distributed); None otherwise."""
    import jax

    if workdir is None or start_step >= stop or jax.process_index() != 0:
        return None
    return MetricsWriter(workdir, cfg, start_step)


@functools.lru_cache(maxsize=256)
def _lr(schedule: str, lr: float, steps: int, warmup_steps: int, step: int) -> float:
    import jax
    import numpy as np

    from icl_gd.optim import make_schedule

    cfg = Config(schedule=schedule, lr=lr, steps=steps, warmup_steps=warmup_steps)
    with jax.default_device(jax.devices("cpu")[0]):
        return float(np.asarray(make_schedule(cfg)(step)))


def learning_rate(cfg: Config, step: int) -> float:
    """The learning rate of the last update before ``step`` (the schedule at ``step - 1``); computed
    on the CPU once per step for all the members of a sweep group (they share the schedule)."""
    return _lr(cfg.schedule, cfg.lr, cfg.steps, cfg.warmup_steps, max(step - 1, 0))


# ---------------------------------------------------------------------------------------
# Event files: TFRecord framing from tensorboardX.record_writer, Event protos from tensorboardX.
# ---------------------------------------------------------------------------------------
class EventFile:
    """A new TensorBoard event file in ``logdir`` (never an existing one: the name holds the time,
    host, pid, first step and a random tag), written synchronously."""

    def __init__(self, logdir: str, first_step: int = 0) -> None:
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.record_writer import RecordWriter

        name = (f"events.out.{EVENTS_MARK}.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}."
                f"{first_step:09d}.{uuid.uuid4().hex[:6]}")
        self.path = os.path.join(logdir, name)
        self._records = RecordWriter(self.path)  # raises OSError naming the path
        self.write(Event(wall_time=time.time(), file_version="brain.Event:2"))

    def write(self, event: Any) -> None:
        try:
            self._records.write(event.SerializeToString())
        except OSError as e:
            raise OSError(e.errno, f"cannot write TensorBoard events: {e.strerror}", self.path) from e

    def write_summary(self, step: int, summary: Any, wall_time: float | None = None) -> None:
        from tensorboardX.proto.event_pb2 import Event

        self.write(Event(wall_time=time.time() if wall_time is None else wall_time, step=step, summary=summary))

    def flush(self) -> None:
        try:
            self._records.flush()
        except OSError as e:
            raise OSError(e.errno, f"cannot write TensorBoard events: {e.strerror}", self.path) from e

    def close(self) -> None:
        self._records.close()


def event_files(logdir: str) -> list[str]:
    """The event files directly in ``logdir``, sorted by name (= by creation time)."""
    if not os.path.isdir(logdir):
        return []
    return [os.path.join(logdir, e) for e in sorted(os.listdir(logdir))
            if EVENTS_MARK in e and not e.endswith(".tmp")]


def _records(data: bytes) -> Iterator[bytes]:
    """The records of TFRecord bytes (length, length CRC, data, data CRC); a truncated tail ends it."""
    pos = 0
    while pos + 12 <= len(data):
        (length,) = struct.unpack("<Q", data[pos:pos + 8])
        end = pos + 12 + length + 4
        if end > len(data):
            return
        yield data[pos + 12:pos + 12 + length]
        pos = end


def read_events(path: str) -> list[Any]:
    """Every whole ``Event`` proto of an event file, in order."""
    from tensorboardX.proto.event_pb2 import Event

    with open(path, "rb") as f:
        data = f.read()
    return [Event.FromString(r) for r in _records(data)]


def read_scalars(logdir: str) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} over every event file of ``logdir``, in file order."""
    out: dict[str, list[tuple[int, float]]] = {}
    for path in event_files(logdir):
        for event in read_events(path):
            for v in event.summary.value:
                if v.WhichOneof("value") == "simple_value":
                    out.setdefault(v.tag, []).append((event.step, v.simple_value))
    return out


def trim_events(logdir: str, last_step: int) -> None:
    """Rewrite (atomically) each event file of ``logdir`` that holds summaries past ``last_step`` or a
    truncated last record, keeping the rest."""
    from tensorboardX.record_writer import RecordWriter

    for path in event_files(logdir):
        with open(path, "rb") as f:
            data = f.read()
        records = list(_records(data))
        events = [_event(r) for r in records]
        keep = [r for r, e in zip(records, events) if not (e.HasField("summary") and e.step > last_step)]
        if len(keep) == len(records) and sum(len(r) + 16 for r in records) == len(data):
            continue
        tmp = f"{path}.{os.getpid()}.tmp"
        try:
            out = RecordWriter(tmp)
            for r in keep:
                out.write(r)
            out.close()
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)


def _event(record: bytes) -> Any:
    from tensorboardX.proto.event_pb2 import Event

    return Event.FromString(record)


def trim_jsonl(path: str, last_step: int) -> None:
    """Drop the lines of metrics.jsonl with a step > ``last_step`` (and a partly written last line),
    rewriting the file atomically only when something is dropped."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = f.readlines()
    keep = []
    for line in lines:
        try:
            if line.endswith("\n") and int(json.loads(line)["step"]) <= last_step:
                keep.append(line)
        except (ValueError, KeyError, TypeError):
            continue
    if len(keep) == len(lines):
        return
    from icl_gd.checkpoint import atomic_open

    with atomic_open(path) as f:
        f.writelines(keep)


def read_jsonl(path: str) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def add_image(logdir: str, tag: str, png_path: str, step: int) -> str:
    """Write the PNG at ``png_path`` as a TensorBoard image at ``step`` into a new event file of
    ``logdir``; returns the file's path."""
    from tensorboardX.proto.summary_pb2 import Summary

    with open(png_path, "rb") as f:
        png = f.read()
    if png[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError(f"{png_path} is not a PNG file")
    width, height = struct.unpack(">II", png[16:24])  # the IHDR chunk
    image = Summary.Image(height=height, width=width, colorspace=4, encoded_image_string=png)
    events = EventFile(logdir, step)
    try:
        events.write_summary(step, Summary(value=[Summary.Value(tag=tag, image=image)]))
        events.flush()
    finally:
        events.close()
    return events.path
