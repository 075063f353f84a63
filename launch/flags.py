"""absl flags generated from ``icl_gd.Config``: one flag per config field, same name and help."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
from collections.abc import Iterator

from absl import flags, logging

from icl_gd import watchdog
from icl_gd.config import Config, ConfigError, ConfigFileError, ConfigMismatchError
from icl_gd.errors import DiskFullError, NonFiniteLossError, Preempted, ResourceError, RunBusyError, UnreadableRunError

_DEFINERS = {
    "int": flags.DEFINE_integer,
    "float": flags.DEFINE_float,
    "bool": flags.DEFINE_boolean,
    "str": flags.DEFINE_string,
}


def quiet_library_logs() -> None:
    """Keep absl INFO for our progress lines; drop the per-save chatter of orbax and XLA's backend probe."""
    noisy = ("/orbax/", "xla_bridge.py")
    logging.get_absl_handler().addFilter(lambda r: not any(s in r.pathname for s in noisy))


def define_config_flags(exclude: tuple[str, ...] = ()) -> None:
    """Define ``--<field>`` for every Config field (lists for tuple fields)."""
    for f in dataclasses.fields(Config):
        if f.name in exclude:
            continue
        help_text = f.metadata.get("help", f.name)
        if f.type.startswith("tuple"):
            flags.DEFINE_list(f.name, [str(v) for v in f.default], help_text + " (comma-separated)")
        else:
            _DEFINERS[f.type](f.name, f.default, help_text)


def define_config_file_flag() -> None:
    flags.DEFINE_string("config", "", "A JSON config file (e.g. another run's config.json) as the base config: "
                        "flags given explicitly override its fields; fields it lacks take the flag defaults "
                        "(and the parameterisation's recipe).")


def config_file_values(path: str) -> dict:
    """The fields of a JSON config file, or ConfigError naming --config (and the field, if unknown)."""
    try:
        with open(path) as f:
            data = json.load(f)
    except OSError as e:
        raise ConfigError("config", path, f"cannot read it ({e.strerror})") from e
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise ConfigError("config", path, f"not a JSON file ({e})") from e
    if not isinstance(data, dict):
        raise ConfigError("config", path, "must hold a JSON object of Config fields")
    unknown = Config.unknown_fields(data)
    if unknown:
        raise ConfigError("config", path, f"unknown field {unknown[0]!r} (known fields: "
                                          f"{', '.join(Config.field_names())})")
    return data


def config_from_flags(**overrides) -> Config:
    """Build and validate the Config from parsed flags; raises ConfigError naming the flag.

    With --config=PATH its fields are the base and only flags given explicitly override them.
    Fields set by neither give way to the parameterisation's recipe (``Config.create``).
    """
    path = flags.FLAGS.config if "config" in flags.FLAGS else ""
    base = config_file_values(path) if path else {}
    values = {}
    for f in dataclasses.fields(Config):
        if f.name not in flags.FLAGS:
            continue
        if not (flags.FLAGS[f.name].present or (f.name == "parameterization" and f.name not in base)):
            continue
        value = flags.FLAGS[f.name].value
        if f.type.startswith("tuple"):
            try:
                value = tuple(float(v) for v in value)
            except ValueError as e:
                raise ConfigError(f.name, ",".join(value), "must be comma-separated numbers") from e
        values[f.name] = value
    values.update(overrides)
    from_file = set(base) - set(values)
    try:
        return Config.create(**{**base, **values}).validate()
    except ConfigError as e:
        if e.field in from_file:
            raise ConfigError("config", path, f"field {e.field}={e.value!r}: {e.allowed}") from e
        raise
    except (TypeError, ValueError) as e:  # a file value Config cannot even hold (e.g. eigenvalues "abc")
        if not from_file:
            raise
        raise ConfigError("config", path, f"a field has a value of the wrong type ({e})") from e


def check_workdir(workdir: str, flag: str = "workdir") -> None:
    """The run directory must be creatable and writable; raise ConfigError naming the flag."""
    if not workdir:
        raise ConfigError(flag, workdir, "must be a directory path")
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as e:
        raise ConfigError(flag, workdir, f"cannot create it ({e.strerror})") from e
    if not os.path.isdir(workdir) or not os.access(workdir, os.W_OK | os.X_OK):
        raise ConfigError(flag, workdir, "must be a writable directory")


def define_watchdog_flag() -> None:
    flags.DEFINE_float("watchdog_s", watchdog.DEFAULT_TIMEOUT_S,
                       "Seconds any one blocking stage (a training chunk, an evaluation, a checkpoint save, one "
                       "member's aggregation) may take before the run is declared hung and exits with code "
                       f"{watchdog.EXIT_HANG}, naming the stage; 0 turns the watchdog off.")


def define_run_flags() -> None:
    """Every Config field as a flag, plus --config and --watchdog_s: the flags of the launchers that train."""
    define_config_flags()
    define_config_file_flag()
    define_watchdog_flag()


def start_launcher() -> None:
    """After the flags are validated: quiet the libraries' logs and arm the watchdog."""
    quiet_library_logs()
    start_watchdog()


def start_watchdog() -> None:
    """Arm ``icl_gd.watchdog`` with --watchdog_s; raise ConfigError naming the flag if it is negative."""
    seconds = flags.FLAGS.watchdog_s
    if not seconds >= 0:
        raise ConfigError("watchdog_s", seconds, "must be >= 0 seconds (0 turns the watchdog off)")
    watchdog.configure(seconds)


EXIT_USAGE, EXIT_RUN_FAILED, EXIT_PREEMPTED = 2, 3, 143  # and watchdog.EXIT_HANG = 124


@contextlib.contextmanager
def exit_codes() -> Iterator[None]:
    """The launchers' one error-to-exit-code map, with a one-line message and no traceback:
    bad flags, a run too large for the memory, a workdir of another run or one another process is training -> 2,
    a non-finite loss or a full disk -> 3 (the last checkpoint is kept), SIGTERM -> 143 (128 + SIGTERM, as
    schedulers expect of a terminated job; a checkpoint was saved)."""
    try:
        yield
    except (ConfigError, ConfigFileError, ConfigMismatchError, ResourceError, RunBusyError, UnreadableRunError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    except (NonFiniteLossError, DiskFullError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_RUN_FAILED)
    except Preempted as e:
        print(f"stopped: {e}", file=sys.stderr)
        sys.exit(EXIT_PREEMPTED)
