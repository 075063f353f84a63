"""Will a run fit in memory? The arithmetic estimate before compiling, XLA's analysis after.

``estimate`` counts the float32 arrays a training step cannot avoid holding at once, per task:
the sampled tokens ([n+1, d+1]: the context and the query), the random ReLU target's hidden
layer ([n+1, relu_width]) and the model's working set kept for the backward pass: the per-layer
[d+1, d+1] Gram matrices of the linear path (``model._gram_layer``), the token matrices [n+1, d+1]
of its wide path (d+1 > 17), or the [H, n+1, n] softmax scores per layer (one query row in the
last). The held-out evaluation runs chunks of ``keys.eval_chunks`` tasks forward only (one layer
live at a time), over the whole held-out set kept in memory where it is small (``keys.heldout_stored``).
It is a lower bound of what XLA allocates (XLA's ``memory_analysis()`` was 1.5 to
4.3 times larger over ten configs: Gram, wide and softmax paths, ReLU targets), so a refused run
could never have fitted; ``check_compiled`` then compares XLA's own count of each compiled program,
and ``out_of_memory`` turns an allocation failure that still happens into the same one-line error.

``available`` is the accelerator's allocator limit less what it holds (``memory_stats()``), or on
the CPU the host's MemAvailable (and the cgroup's limit, in a container).
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from typing import Any

from icl_gd.config import Config
from icl_gd.errors import ResourceError

FLOAT_BYTES = 4  # every array of a run is float32


def _sampled(cfg: Config) -> int:
    """Floats per task of drawing it: its tokens and the random ReLU target's hidden layer."""
    return (cfg.n + 1) * ((cfg.d + 1) + (cfg.relu_width if cfg.target == "relu_net" else 0))


def _per_task(cfg: Config, train: bool) -> int:
    """Floats per task of a train step (``train``) or of a forward-only held-out chunk."""
    from icl_gd.model import _GRAM_MAX  # the linear path works on Gram matrices up to this d+1

    tokens = _sampled(cfg)
    layers = cfg.depth if train else 1  # the backward pass keeps every layer's input; eval one at a time
    if cfg.attention == "softmax":
        full_rows = (cfg.depth - 1) if train else min(cfg.depth - 1, 1)
        return tokens + cfg.heads * cfg.n * (full_rows * (cfg.n + 1) + 1)
    if cfg.d + 1 <= _GRAM_MAX:
        return tokens + layers * (cfg.d + 1) ** 2
    return tokens + layers * tokens


def _model_term(cfg: Config) -> str:
    from icl_gd.model import _GRAM_MAX

    if cfg.attention == "softmax":
        return "heads x (n+1) x n softmax scores per layer"
    return "a (d+1)^2 Gram matrix per layer" if cfg.d + 1 <= _GRAM_MAX else "the (n+1) x (d+1) tokens per layer"


def estimate(cfg: Config, members: int = 1) -> dict[str, int]:
    """The bytes a run cannot do without: {'train': one training step, 'eval': one held-out chunk, and the
    whole held-out set where the loop keeps it (``keys.heldout_stored``)}.

    ``members``: runs trained together on one device (a vmapped sweep group's share of it).
    """
    from icl_gd.keys import eval_chunks, heldout_bytes, heldout_stored  # imports JAX only here

    chunk = eval_chunks(cfg)[1] * _per_task(cfg, train=False) * FLOAT_BYTES
    if heldout_stored(cfg):  # the whole set, and a chunk's model working set without drawing it
        chunk = heldout_bytes(cfg) + eval_chunks(cfg)[1] * (_per_task(cfg, train=False) - _sampled(cfg)) * FLOAT_BYTES
    return {"train": members * cfg.batch_size * _per_task(cfg, train=True) * FLOAT_BYTES, "eval": members * chunk}


def _host_available() -> int | None:
    """MemAvailable of /proc/meminfo (or free pages), capped by a cgroup memory limit."""
    found = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    found = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    if found is None:
        try:
            found = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError):
            return None
    for limit_path, usage_path in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            with open(limit_path) as f, open(usage_path) as g:
                limit, usage = f.read().strip(), g.read().strip()
        except OSError:
            continue
        if limit.isdigit() and usage.isdigit() and int(limit) < 2**60:
            found = min(found, max(int(limit) - int(usage), 0))
        break
    return found


def available(device: Any = None) -> tuple[int | None, str]:
    """(bytes free for a run, where): the device's allocator headroom, or the host's memory."""
    import jax

    device = device or jax.devices()[0]
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001 - a backend without memory stats: use the host's
        stats = None
    if stats and stats.get("bytes_limit"):
        return stats["bytes_limit"] - stats.get("bytes_in_use", 0), f"{device.platform.upper()} memory of {device}"
    return _host_available(), "host memory"


def _members_per_device(members: int, devices: int, platform: str) -> int:
    # Host (CPU) devices share one memory; accelerators each hold their share of the member axis.
    return members if platform == "cpu" else math.ceil(members / max(devices, 1))


def _gb(n: float) -> str:
    return f"{n / 1e9:.3g} GB"


def _flags(cfg: Config, program: str = "train") -> str:
    names = ["--batch_size", "--n", "--d"] if program == "train" else ["--eval_tasks", "--n", "--d"]
    if cfg.attention == "softmax":
        names.append("--heads")
    if cfg.depth > 1 and program == "train":
        names.append("--depth")
    return "lower " + ", ".join(names[:-1]) + " or " + names[-1]


def _shape(cfg: Config, members: int) -> str:
    heads = f" --heads={cfg.heads}" if cfg.attention == "softmax" else ""
    group = f" ({members} members trained together)" if members > 1 else ""
    return f"--batch_size={cfg.batch_size} --n={cfg.n} --d={cfg.d}{heads} --depth={cfg.depth}{group}"


def _needs(cfg: Config, est: dict[str, int], program: str) -> str:
    from icl_gd.keys import eval_chunks

    if program == "train":
        what = "the training step"
        tasks = "batch_size"
    else:
        what = "the held-out evaluation"
        tasks = f"{eval_chunks(cfg)[1]}-task chunks"
    return (f"{what} needs at least {_gb(est[program])} ({tasks} x (n+1) tokens x (d+1) features x "
            f"{FLOAT_BYTES} bytes, plus {_model_term(cfg)})")


def check_fits(cfg: Config, members: int = 1, devices: int = 1) -> None:
    """Refuse (``ResourceError``, one line naming the flags) a run whose ``estimate`` exceeds the
    memory ``available``; ``members`` runs trained together over ``devices`` devices (a sweep group)."""
    import jax

    free, where = available()
    if free is None:
        return
    share = _members_per_device(members, devices, jax.devices()[0].platform)
    est = estimate(cfg, share)
    for program in ("train", "eval"):
        if est[program] > free:
            raise ResourceError(f"{_shape(cfg, share)}: {_needs(cfg, est, program)} but {_gb(free)} of {where} "
                                f"is available; {_flags(cfg, program)}")


def check_compiled(compiled: Any, cfg: Config, members: int = 1, devices: int = 1, program: str = "train") -> None:
    """After compiling: refuse a program whose XLA memory analysis (arguments, outputs and temporaries
    of one device's share) exceeds the memory ``available`` (host devices share one memory: times
    ``devices``). ``program``: "train" (a chunk of steps) or "eval". No analysis: nothing to check."""
    import jax

    try:
        stats = compiled.memory_analysis()
        need = (stats.temp_size_in_bytes + stats.argument_size_in_bytes + stats.output_size_in_bytes
                - stats.alias_size_in_bytes)
    except Exception:  # noqa: BLE001 - not every backend reports it
        return
    if jax.devices()[0].platform == "cpu":
        need *= devices
    free, where = available()
    if free is not None and need > free:
        what = "training step" if program == "train" else "held-out evaluation"
        raise ResourceError(f"{_shape(cfg, members)}: the compiled {what} needs {_gb(need)} (XLA's memory analysis) "
                            f"but {_gb(free)} of {where} is available; {_flags(cfg, program)}")


@contextlib.contextmanager
def out_of_memory(cfg: Config, members: int = 1) -> Iterator[None]:
    """Turn XLA's RESOURCE_EXHAUSTED (an allocation that failed despite the checks) into ``ResourceError``."""
    import jax

    try:
        yield
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        first = str(e).strip().splitlines()[0][:160]
        needs = _needs(cfg, estimate(cfg, members), "train")
        raise ResourceError(f"{_shape(cfg, members)}: out of memory ({first}); {needs}; {_flags(cfg)}") from e
