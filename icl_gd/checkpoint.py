"""Orbax checkpoints of a run: train state (params, optimizer state, step), config, metrics.

Layout: ``WORKDIR/config.json`` (the run's config, for people and for the resume check) and
``WORKDIR/checkpoints/<step>/{state,config,metrics}`` written by ``orbax``'s
``CheckpointManager`` (atomic: a step directory appears only once fully written).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import sys
from collections.abc import Iterator
from typing import IO, TYPE_CHECKING, Any

from absl import logging

from icl_gd import watchdog
from icl_gd.config import Config, ConfigError, ConfigFileError, ConfigMismatchError
from icl_gd.errors import DiskFullError, UnreadableRunError

if TYPE_CHECKING:
    import orbax.checkpoint as ocp

__all__ = ["Checkpointer", "ConfigFileError", "ConfigMismatchError", "atomic_open", "check_same_run", "disk_full",
           "read_config", "saved_steps", "write_config"]

_FULL = {errno.ENOSPC: os.strerror(errno.ENOSPC), errno.EDQUOT: os.strerror(errno.EDQUOT)}


def _full_reason(error: BaseException) -> tuple[str, str | None] | None:
    """(reason, file) when ``error`` or an error it was raised from is a full disk or quota: an
    OSError with errno ENOSPC/EDQUOT, or orbax's tensorstore ValueError whose text holds the same
    strerror ("No space left on device"); None otherwise."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in _FULL:
            return _FULL[error.errno], error.filename
        for reason in _FULL.values():
            if reason in str(error):
                return reason, None
        error = error.__cause__ or error.__context__
    return None


@contextlib.contextmanager
def disk_full(workdir: str, path: str | None = None) -> Iterator[None]:
    """Turn a full disk (or quota) while writing a run's files into ``DiskFullError``: one line naming
    the file (the failing one when the error names it, else ``path``) and the last checkpoint kept."""
    try:
        yield
    except DiskFullError:
        raise
    except Exception as e:
        found = _full_reason(e)
        if found is None:
            raise
        reason, name = found
        steps = saved_steps(workdir)
        kept = f"the last checkpoint kept is step {steps[-1]}" if steps else "no checkpoint was saved yet"
        raise DiskFullError(f"disk full ({reason}) writing {name or path or workdir}: {kept} (nothing saved "
                            "before is lost); free space and re-run the same command to resume") from e


@contextlib.contextmanager
def atomic_open(path: str, newline: str | None = None) -> Iterator[IO[str]]:
    """Open ``path`` for writing so that it appears whole or not at all: the text goes to a
    temporary file of this process (several processes may write the same file) that replaces
    ``path`` only when the block ends without error."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w", newline=newline) as f:
            yield f
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def saved_steps(workdir: str) -> list[int]:
    """The finalised checkpoint steps of a run, sorted, without opening orbax (it names a step
    folder by its bare number only once the step is fully written): the cheap test a sweep
    re-run uses to skip a finished member and to key its cached analysis."""
    path = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(path):
        return []
    return sorted(int(e) for e in os.listdir(path) if e.isdigit())


def _ocp():  # noqa: ANN202
    """orbax.checkpoint, imported on first use (0.5 s): a re-run of a finished sweep never needs it."""
    import orbax.checkpoint

    return orbax.checkpoint


def _manager(workdir: str, keep: int | None = None, read_only: bool = False) -> ocp.CheckpointManager:
    ocp = _ocp()
    import jax

    # Saves write in the background on one process; under jax.distributed every process joins each
    # save's barriers, which orbax's background thread would hold against the training loop.
    background = not read_only and jax.process_count() == 1
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=not read_only, read_only=read_only, enable_async_checkpointing=background
    )
    return ocp.CheckpointManager(
        os.path.join(os.path.abspath(workdir), "checkpoints"),
        options=options,
        item_names=("state", "config", "metrics"),
    )


# The JSON files of a step that orbax parses (the manager reads every step's metrics when it opens).
_JSON_FILES = ("_CHECKPOINT_METADATA", "metrics/metrics", "config/metadata")


def quarantine(workdir: str, step: int, why: str) -> str:
    """Move ``checkpoints/<step>`` to ``corrupt/<step>`` (kept, never deleted) with one warning line."""
    src = os.path.join(os.path.abspath(workdir), "checkpoints", str(step))
    dst = os.path.join(os.path.abspath(workdir), "corrupt", str(step))
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    shutil.rmtree(dst, ignore_errors=True)
    shutil.move(src, dst)
    logging.warning("checkpoint step %d in %s is unreadable (%s); moved it to %s", step, workdir, why, dst)
    return dst


def quarantine_unreadable_json(workdir: str) -> list[int]:
    """Move aside every step whose JSON items do not parse, before orbax opens the folder (it would
    fail on them, even on an old step); returns the steps moved."""
    moved = []
    for step in saved_steps(workdir):
        for rel in _JSON_FILES:
            path = os.path.join(workdir, "checkpoints", str(step), rel)
            try:
                with open(path, "rb") as f:
                    json.loads(f.read().decode())
            except FileNotFoundError:
                continue  # orbax tolerates a missing metrics item; a missing state is caught on restore
            except (OSError, ValueError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
                quarantine(workdir, step, f"{rel}: {type(e).__name__}")
                moved.append(step)
                break
    return moved


def _closed_loop_callback(unraisable: Any) -> bool:
    """Is this the harmless leftover of an orbax read or write that failed? orbax runs the
    tensorstore operations of a save or restore on a fresh asyncio loop and closes it as soon as
    one fails; each operation still in flight then finishes in tensorstore's thread and its done
    callback hits ``loop.call_soon_threadsafe`` on the closed loop (RuntimeError('Event loop is
    closed'), reported unraisable: about 14 tracebacks on a run that recovered fine)."""
    error = unraisable.exc_value
    if not (isinstance(error, RuntimeError) and str(error) == "Event loop is closed"):
        return False
    tb, names = unraisable.exc_traceback, []
    while tb is not None:
        names.append(tb.tb_frame.f_code.co_name)
        tb = tb.tb_next
    return "call_soon_threadsafe" in names


def _quiet_closed_loop_callbacks() -> None:
    """Drop ``_closed_loop_callback`` reports from ``sys.unraisablehook`` (once per process; every
    other report goes to the hook that was there)."""
    previous = sys.unraisablehook
    if getattr(previous, "_icl_gd_quiet", False):
        return

    def hook(unraisable: Any) -> None:
        if not _closed_loop_callback(unraisable):
            previous(unraisable)

    hook._icl_gd_quiet = True  # type: ignore[attr-defined]
    sys.unraisablehook = hook


class Checkpointer:
    """Saves and restores one run's checkpoints (a thin, typed face over orbax).

    Opening it first moves aside steps whose JSON items are damaged (``quarantine_unreadable_json``),
    so an old unreadable step never blocks a run; ``restore`` does the same for unreadable states.
    """

    def __init__(self, workdir: str, keep: int | None = None, read_only: bool = False):
        _quiet_closed_loop_callbacks()
        self.workdir = workdir
        self._read_only = read_only
        self.moved = quarantine_unreadable_json(workdir)
        self._mgr = _manager(workdir, keep, read_only)
        self._pending: str | None = None  # the step folder of the save in flight

    def latest_step(self) -> int | None:
        self.wait()  # a save in flight counts once it is whole
        return self._mgr.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._mgr.all_steps())

    def save(self, step: int, state: Any, config: Config, metrics: list[dict]) -> None:
        """Start saving ``state`` (host arrays) at ``step``: orbax writes it in a background thread
        (~10 ms here instead of ~55 ms at d=5; one process) and the step folder appears only once it is whole. The
        previous save is finished first, and ``close`` finishes the last, so an error of either
        surfaces there (a full disk as ``DiskFullError`` naming its step)."""
        import jax
        import numpy as np

        ocp = _ocp()
        self.wait()
        # Copies: the write happens later, while the loop goes on (a host view of a CPU buffer could be
        # donated to the next compiled call, and the history gets the next records appended).
        state = jax.tree.map(lambda x: np.array(x, copy=True), state)
        where = os.path.join(self.workdir, "checkpoints", str(step))
        with watchdog.stage(f"saving the step-{step} checkpoint of {self.workdir}"), disk_full(self.workdir, where):
            self._mgr.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state),
                    config=ocp.args.JsonSave(config.to_dict()),
                    metrics=ocp.args.JsonSave({"history": [dict(record) for record in metrics]}),
                ),
            )
        self._pending = where

    def wait(self) -> None:
        """Finish the save in flight, if any."""
        if self._pending is None:
            return
        where, self._pending = self._pending, None
        with watchdog.stage(f"finishing the checkpoint {where}"), disk_full(self.workdir, where):
            self._mgr.wait_until_finished()

    def restore_config(self, step: int | None = None) -> Config:
        step = self.latest_step() if step is None else step
        ocp = _ocp()
        out = self._mgr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
        return Config.from_dict(dict(out["config"]))

    def restore(self, template: Any, step: int | None = None) -> tuple[Any, Config, list[dict]]:
        """(state, config, metrics history) at ``step``; ``template`` gives the tree.

        With ``step=None``, the newest checkpoint that reads back whole: a truncated or partly
        written one is moved aside to ``WORKDIR/corrupt/<step>`` (kept, not deleted) with a
        warning, and the previous one is tried.
        """
        with watchdog.stage(f"restoring a checkpoint of {self.workdir}"):
            if step is not None:
                return self._restore(template, step)
            for candidate in sorted(self.all_steps(), reverse=True):
                try:
                    return self._restore(template, candidate)
                except Exception as e:  # noqa: BLE001 - any read failure means this step is unusable
                    self._quarantine(candidate, e)
        moved = f"; moved the unreadable steps {sorted(self.moved)} to {self.workdir}/corrupt" if self.moved else ""
        raise UnreadableRunError(f"no readable checkpoint under {self.workdir}/checkpoints{moved}")

    def _quarantine(self, step: int, error: Exception) -> None:
        quarantine(self.workdir, step, _short(error))
        self.moved.append(step)
        self._mgr.reload()

    def _restore(self, template: Any, step: int) -> tuple[Any, Config, list[dict]]:
        ocp = _ocp()
        out = self._mgr.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(template),
                config=ocp.args.JsonRestore(),
                metrics=ocp.args.JsonRestore(),
            ),
        )
        return out["state"], Config.from_dict(dict(out["config"])), list(out["metrics"]["history"])

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._mgr.close()


def write_config(workdir: str, cfg: Config) -> None:
    path = os.path.join(workdir, "config.json")
    with disk_full(workdir, path):
        os.makedirs(workdir, exist_ok=True)
        with atomic_open(path) as f:
            f.write(cfg.to_json())


def read_config(workdir: str) -> Config | None:
    """The run's config.json (None when absent); ``ConfigFileError`` naming the file when it cannot be
    read as a Config (truncated, not JSON, an unknown field)."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            data = json.load(f)
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        return Config.from_dict(data)
    except ConfigError as e:
        raise ConfigFileError(f"{path}: {e.field!r} is an {e.allowed.split(';')[0]}; fix or delete the file "
                              "(the checkpoints keep their own copy)") from e
    except (OSError, ValueError, TypeError) as e:
        raise ConfigFileError(f"{path} is damaged ({type(e).__name__}: {_short(e)}); restore or delete it "
                              "(the checkpoints keep their own copy of the config)") from e


def holds_checkpoints(workdir: str) -> bool:
    """A step was trained here: a saved checkpoint, or one moved to ``corrupt/``."""
    corrupt = os.path.join(workdir, "corrupt")
    return bool(saved_steps(workdir)) or (os.path.isdir(corrupt) and bool(os.listdir(corrupt)))


def check_same_run(workdir: str, cfg: Config) -> bool:
    """Refuse to resume a run whose stored config differs in any field that changes training.

    The config.json of a folder without any checkpoint (a first attempt that failed before its
    first save: out of memory, a bad flag caught late, a kill) holds nothing to resume, so a
    different config replaces it (an info line says so). Returns True when config.json is absent
    or replaced, i.e. must be written.
    """
    stored = read_config(workdir)
    if stored is None:
        return True
    diff = stored.differences(cfg)
    if not diff:
        return False
    lines = ", ".join(f"--{k}: stored {a!r} vs given {b!r}" for k, (a, b) in sorted(diff.items()))
    if not holds_checkpoints(workdir):
        logging.info("%s/config.json belongs to an attempt that saved no checkpoint; replacing it (%s)", workdir, lines)
        return True
    raise ConfigMismatchError(
        f"{workdir} already holds a run with a different config ({lines}); "
        "use a new --workdir or the stored values"
    )


def _short(error: Exception) -> str:
    text = f"{type(error).__name__}: {error}"
    return text if len(text) < 200 else text[:197] + "..."
