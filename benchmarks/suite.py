"""The benchmark suite behind ``python -m launch.bench`` and docs/BENCHMARKS.md.

Why these numbers: a training step samples fresh tasks, so it can never beat the time of
sampling its own batch (the *floor*); step / floor says how much the model + optimiser add on
top. Per-task time against n says whether the associative attention really is linear in n
(the quadratic ``apply_naive`` is timed in the same step as the reference). Every figure is a
median over repeats after a warm-up call; compilation (``jit(...).lower(...).compile()``) is
timed separately and never inside a step figure. The machine's load is recorded because other
processes share the cores.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp

from icl_gd import loss as loss_lib
from icl_gd import model
from icl_gd.config import Config
from icl_gd.data import Tasks, TaskSpec, distribution, sample_tasks
from icl_gd.keys import run_keys
from icl_gd.optim import make_optimizer
from icl_gd.train import init_state, make_train_chunk

STEP_FLOOR_GOAL = 1.3  # step / floor
SCALING_GOAL = 4.5  # t(4n) / t(n) per task, associative attention
LOG_BEGIN, LOG_END = "<!-- optimisation-log:begin -->", "<!-- optimisation-log:end -->"


@dataclasses.dataclass(frozen=True)
class Settings:
    """What to run. ``quick`` is the ~1 minute smoke version of the full suite."""

    d: int = 5
    n: int = 20
    batch_size: int = 4096
    depths: tuple[int, ...] = (1, 2, 3, 4)
    parameterizations: tuple[str, ...] = ("full", "sparse", "block")
    steps: int = 20  # training steps per timed compiled call (throughput, floor)
    repeats: int = 7
    scaling_ns: tuple[int, ...] = (20, 80, 320, 1280, 4096)
    scaling_tokens: int = 4096 * 21  # batch * (n+1) per step in the n sweep (per-task time comparable)
    naive_score_bytes: int = 2**27  # cap on one step's naive score matrix B (n+1) n * 4 bytes
    scaling_steps: int = 5
    scaling_repeats: int = 5
    gemm_size: int = 2048  # the dense GEMM that measures this machine's float32 ceiling

    @classmethod
    def quick(cls) -> Settings:
        return cls(batch_size=1024, parameterizations=("full",), steps=10, repeats=3, scaling_ns=(20, 80, 320, 1280),
                   scaling_tokens=1024 * 21, naive_score_bytes=2**25, scaling_steps=2, scaling_repeats=3,
                   gemm_size=1024)


# ---------------------------------------------------------------------------------------
# Machine and memory.
# ---------------------------------------------------------------------------------------
def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (platform's guess elsewhere)."""
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def load_average() -> list[float] | None:
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def machine_info() -> dict[str, Any]:
    dev = jax.devices()[0]
    return {
        "cpu_model": cpu_model(), "cpu_count": os.cpu_count(), "load_average_start": load_average(),
        "platform": platform.platform(), "python": platform.python_version(), "jax": jax.__version__,
        "backend": jax.default_backend(), "device": str(dev), "device_kind": dev.device_kind,
        "devices": len(jax.devices()),
    }


def peak_rss_mb() -> float:
    """Peak resident set of this process so far (monotone over the run), MiB."""
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kb / 1024.0


def device_memory() -> dict[str, int] | None:
    """The backend's own memory statistics; None where it reports none (CPU does)."""
    with contextlib.suppress(Exception):
        stats = jax.devices()[0].memory_stats()
        if stats:
            return {k: int(v) for k, v in stats.items() if k in ("bytes_in_use", "peak_bytes_in_use", "bytes_limit")}
    return None


def compiled_memory(compiled: Any) -> dict[str, int] | None:
    """XLA's static memory analysis of one compiled program (bytes)."""
    with contextlib.suppress(Exception):
        m = compiled.memory_analysis()
        if m is not None:
            names = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
                     "temp_size_in_bytes", "generated_code_size_in_bytes")
            return {k: int(getattr(m, k)) for k in names if hasattr(m, k)}
    return None


def _memory_record(compiled: Any) -> dict[str, Any]:
    return {"peak_rss_mb": peak_rss_mb(), "device_memory": device_memory(), "xla": compiled_memory(compiled)}


# ---------------------------------------------------------------------------------------
# Timing.
# ---------------------------------------------------------------------------------------
def timed(call: Callable[..., Any], repeats: int, prepare: Callable[[], tuple] = tuple,
          partner: Callable[[], Any] | None = None) -> dict[str, Any]:
    """Median wall time of ``call(*prepare())`` (outputs blocked on) after one warm-up call;
    ``prepare`` runs outside the clock (e.g. fresh copies of donated buffers). A ``partner``
    is timed interleaved with it, repeat by repeat, so a ratio of the two sees the same load
    from other processes (``partner_*`` entries)."""
    jax.block_until_ready(call(*prepare()))
    if partner is not None:
        jax.block_until_ready(partner())
    out: dict[str, list[float]] = {"all_s": [], "cpu": [], "partner_all_s": [], "partner_cpu": []}

    def clock(fn: Callable[[], Any], prefix: str) -> None:
        c0, t0 = time.process_time(), time.perf_counter()
        jax.block_until_ready(fn())
        out[prefix + "all_s"].append(time.perf_counter() - t0)
        out[prefix + "cpu"].append(time.process_time() - c0)

    for _ in range(repeats):
        args = jax.block_until_ready(prepare())
        clock(functools.partial(call, *args), "")
        if partner is not None:
            clock(partner, "partner_")
    # CPU seconds (all threads of this process) are less sensitive than wall time to other
    # processes sharing the cores; both are kept.
    res: dict[str, Any] = {"median_s": statistics.median(out["all_s"]), "all_s": out["all_s"],
                           "cpu_median_s": statistics.median(out["cpu"])}
    if partner is not None:
        res.update(partner_median_s=statistics.median(out["partner_all_s"]), partner_all_s=out["partner_all_s"],
                   partner_cpu_median_s=statistics.median(out["partner_cpu"]))
    return res


def _compile(fn: Any, *args: Any, **kwargs: Any) -> tuple[Any, float]:
    t0 = time.perf_counter()
    compiled = fn.lower(*args, **kwargs).compile()
    return compiled, time.perf_counter() - t0


@contextlib.contextmanager
def _attention(kind: str) -> Iterator[None]:
    """Trace the real training step with ``apply_naive`` as the model when kind == 'naive'.

    ``loss.task_loss`` looks ``apply`` up at trace time, so swapping that one name swaps the
    attention inside the unchanged ``make_train_chunk`` (sampling, loss, optimiser and all).
    """
    if kind == "assoc":
        yield
        return
    original = loss_lib.apply
    loss_lib.apply = model.apply_naive
    try:
        yield
    finally:
        loss_lib.apply = original


def time_train_step(cfg: Config, steps: int, repeats: int, attention: str = "assoc",
                    partner: Callable[[], Any] | None = None) -> dict[str, Any]:
    """The real training step (``make_train_chunk``: sample + forward + backward + optax
    update), ``steps`` of it scanned in one compiled call with donated state, as ``train`` runs
    it. ``partner`` (e.g. the floor) is timed interleaved with it; see ``timed``."""
    optimizer = make_optimizer(cfg)
    chunk = jax.jit(make_train_chunk(cfg, optimizer), static_argnames="length", donate_argnums=0)
    state0 = init_state(cfg, optimizer)
    dist, key = distribution(cfg), run_keys(cfg.seed)["train"]
    with _attention(attention):
        compiled, compile_s = _compile(chunk, state0, dist, key, length=steps)
        flops = step_flops(chunk, state0, dist, key)

    # The step donates its state: each call gets a fresh copy, made outside the clock.
    t = timed(lambda state: compiled(state, dist, key), repeats, lambda: (jax.tree.map(jnp.copy, state0),),
              partner)
    step_s = t["median_s"] / steps
    out = {"compile_s": compile_s, "step_s": step_s, "step_cpu_s": t["cpu_median_s"] / steps,
           "steps_per_s": 1.0 / step_s, "task_cpu_us": 1e6 * t["cpu_median_s"] / steps / cfg.batch_size,
           "tasks_per_s": cfg.batch_size / step_s, "task_us": 1e6 * step_s / cfg.batch_size,
           "all_s": t["all_s"], "memory": _memory_record(compiled), "flops": flops}
    if partner is not None:
        out["partner"] = {k[len("partner_"):]: v for k, v in t.items() if k.startswith("partner_")}
    return out


def make_floor(cfg: Config) -> Callable:
    """floor(dist, key, length): sample the step's batch ``length`` times in a scan, exactly as
    the step does (key fold_in(train_key, step)), and keep it as the carry so none is dead."""
    spec = TaskSpec.from_config(cfg)

    def floor(dist: Any, key: jax.Array, length: int) -> Tasks:
        def body(carry: tuple[jax.Array, Tasks], _: None) -> tuple[tuple[jax.Array, Tasks], None]:
            step, _ = carry
            return (step + 1, sample_tasks(jax.random.fold_in(key, step), dist, spec, cfg.batch_size)), None

        init = jax.eval_shape(lambda: sample_tasks(key, dist, spec, cfg.batch_size))
        init = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), init)
        (_, tasks), _ = jax.lax.scan(body, (jnp.zeros((), jnp.int32), init), None, length=length)
        return tasks

    return floor


def floor_program(cfg: Config, steps: int) -> tuple[Callable[[], Any], dict[str, Any]]:
    """The compiled floor as a no-argument call, and its compile time, memory and FLOPs a step."""
    fn = jax.jit(make_floor(cfg), static_argnames="length")
    dist, key = distribution(cfg), run_keys(cfg.seed)["train"]
    compiled, compile_s = _compile(fn, dist, key, length=steps)
    return (lambda: compiled(dist, key)), {"compile_s": compile_s, "memory": _memory_record(compiled),
                                           "flops": step_flops(fn, dist, key)}


def step_flops(fn: Any, *args: Any) -> float | None:
    """XLA's operation count of ONE scanned step (``length=1``; the HLO cost analysis counts a loop
    body once whatever its trip count): float and integer ops alike, so the threefry hashing of the
    floor counts too. None where the backend gives no cost analysis."""
    try:
        cost = fn.lower(*args, length=1).cost_analysis()
    except Exception:  # noqa: BLE001 - an optional figure
        return None
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost["flops"]) if cost and cost.get("flops") else None


def dense_gflops(size: int = 2048, repeats: int = 5) -> float:
    """This machine's dense float32 rate through XLA: a [size, size] @ [size, size] GEMM, median of
    ``repeats`` after a warm-up. The ceiling for any op mix; the model's tiny per-task products run below it."""
    a = jnp.ones((size, size), jnp.float32)
    fn = jax.jit(lambda x: x @ x)
    return 2 * size**3 / timed(lambda: fn(a), repeats)["median_s"] / 1e9


def _floor_record(cfg: Config, steps: int, median_s: float, cpu_median_s: float, all_s: list[float],
                  info: dict[str, Any]) -> dict[str, Any]:
    step_s = median_s / steps
    return {**info, "step_s": step_s, "step_cpu_s": cpu_median_s / steps, "tasks_per_s": cfg.batch_size / step_s,
            "all_s": all_s}


def time_floor(cfg: Config, steps: int, repeats: int) -> dict[str, Any]:
    """Sampling alone, in the same kind of scanned loop as the step."""
    call, info = floor_program(cfg, steps)
    t = timed(call, repeats)
    return _floor_record(cfg, steps, t["median_s"], t["cpu_median_s"], t["all_s"], info)


# ---------------------------------------------------------------------------------------
# The suite.
# ---------------------------------------------------------------------------------------
def _base(s: Settings, **kw: Any) -> Config:
    return dataclasses.replace(Config(d=s.d, n=s.n, batch_size=s.batch_size, steps=10_000), **kw).validate()


def throughput(s: Settings, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Step vs floor for every (depth, parameterisation) at (d, n, batch); the floor is re-timed
    interleaved with each step (same load on the cores for both halves of the ratio)."""
    floor_call, floor_info = floor_program(_base(s), s.steps)
    rows = []
    for depth in s.depths:
        for par in s.parameterizations:
            cfg = _base(s, depth=depth, parameterization=par)
            r = time_train_step(cfg, s.steps, s.repeats, partner=floor_call)
            p = r.pop("partner")
            floor = _floor_record(cfg, s.steps, p["median_s"], p["cpu_median_s"], p["all_s"], floor_info)
            row = {"depth": depth, "parameterization": par, "d": s.d, "n": s.n, "batch_size": s.batch_size,
                   "steps_per_call": s.steps, "repeats": s.repeats, "step": r, "floor": floor,
                   "step_over_floor": r["step_s"] / floor["step_s"],
                   # The fastest call of each: other processes on the cores can slow a call, never
                   # speed it up, so this ratio is the least disturbed by a noisy machine.
                   "step_over_floor_fastest": min(r["all_s"]) / min(floor["all_s"])}
            row["meets_goal"] = row["step_over_floor"] <= STEP_FLOOR_GOAL
            row.update(roofline(r, floor))
            rows.append(row)
            log(f"L={depth} {par:6s}: {1e3 * r['step_s']:.2f} ms/step  {r['steps_per_s']:.1f} steps/s  "
                f"{r['tasks_per_s']:.3g} tasks/s  floor {1e3 * floor['step_s']:.2f} ms  "
                f"step/floor {row['step_over_floor']:.2f}  "
                f"(compile {r['compile_s']:.2f}s)")
    return rows


def roofline(step: dict[str, Any], floor: dict[str, Any]) -> dict[str, float]:
    """What the model's share of the step (step - floor: forward, backward, Adam) computes and at what
    rate, beside the rate it would need to meet step/floor <= ``STEP_FLOOR_GOAL`` at this floor."""
    if step.get("flops") is None or floor.get("flops") is None:
        return {}
    model = step["flops"] - floor["flops"]
    return {"model_mflop": model / 1e6, "model_gflops": model / max(step["step_s"] - floor["step_s"], 1e-9) / 1e9,
            "goal_gflops": model / ((STEP_FLOOR_GOAL - 1) * floor["step_s"]) / 1e9}


def scaling_batch(s: Settings, n: int, attention: str) -> int:
    """Tasks per step at context length n: a fixed token budget, and for the naive attention
    also a cap on its (n+1) x n score matrix so large n fits in memory."""
    batch = max(1, s.scaling_tokens // (n + 1))
    if attention == "naive":
        batch = min(batch, max(1, s.naive_score_bytes // (4 * (n + 1) * n)))
    return batch


def scaling(s: Settings, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Per-task time of the training step (L=1, full) against n, associative vs naive."""
    rows = []
    for n in s.scaling_ns:
        row: dict[str, Any] = {"n": n}
        for attention in ("assoc", "naive"):
            batch = scaling_batch(s, n, attention)
            cfg = _base(s, n=n, batch_size=batch)
            r = time_train_step(cfg, s.scaling_steps, s.scaling_repeats, attention)
            row[attention] = {"batch_size": batch, **r}
            log(f"n={n:5d} {attention:5s} batch {batch:5d}: {r['task_us']:9.2f} us/task  "
                f"(compile {r['compile_s']:.2f}s)")
        rows.append(row)
    for prev, row in zip(rows, rows[1:]):
        for attention in ("assoc", "naive"):
            row[attention]["ratio_to_previous"] = row[attention]["task_us"] / prev[attention]["task_us"]
            row[attention]["cpu_ratio_to_previous"] = row[attention]["task_cpu_us"] / prev[attention]["task_cpu_us"]
        factor = row["n"] / prev["n"]
        row["n_factor"] = factor
        # The goal is stated for 4x steps; for other steps scale the allowed ratio linearly.
        row["meets_goal"] = row["assoc"]["ratio_to_previous"] <= SCALING_GOAL * factor / 4.0
        row["meets_goal_cpu"] = row["assoc"]["cpu_ratio_to_previous"] <= SCALING_GOAL * factor / 4.0
    return rows


def sweep_vmap(path: str) -> dict[str, Any]:
    """The members benchmark (benchmarks/sweep_vmap.py) result, if someone has run it."""
    if path and os.path.exists(path):
        with open(path) as f:
            return {"source": path, "result": json.load(f)}
    return {"source": path, "result": None,
            "note": "not run: `python -m benchmarks.sweep_vmap --out=PATH` writes it; pass --sweep_vmap_json=PATH"}


# The other benchmark scripts' JSON, folded into BENCHMARKS.md when they exist (module: path).
SIDE_BENCHMARKS = {"sweep_vmap_b1024": "benchmarks/sweep_vmap_b1024.json",
                   "loop_efficiency": "benchmarks/loop_efficiency.json",
                   "sweep_rerun": "benchmarks/sweep_rerun.json"}


def side_results(paths: dict[str, str]) -> dict[str, Any]:
    out = {}
    for name, path in paths.items():
        if path and os.path.exists(path):
            with open(path) as f:
                out[name] = {"source": path, "result": json.load(f)}
    return out


def run_suite(s: Settings, sweep_vmap_json: str = "", log: Callable[[str], None] = print,
              side_json: dict[str, str] | None = None) -> dict[str, Any]:
    t0 = time.perf_counter()
    out: dict[str, Any] = {"settings": dataclasses.asdict(s), "machine": machine_info()}
    log(f"{out['machine']['cpu_model']} x{out['machine']['cpu_count']}, load {out['machine']['load_average_start']}")
    out["throughput"] = throughput(s, log)
    out["dense_gflops"] = dense_gflops(s.gemm_size)
    log(f"dense float32 GEMM through XLA: {out['dense_gflops']:.0f} GFLOP/s")
    out["scaling"] = scaling(s, log)
    out["sweep_vmap"] = sweep_vmap(sweep_vmap_json)
    out["side"] = side_results(SIDE_BENCHMARKS if side_json is None else side_json)
    out["machine"]["load_average_end"] = load_average()
    out["machine"]["peak_rss_mb_end"] = peak_rss_mb()
    out["wall_s"] = time.perf_counter() - t0
    return out


# ---------------------------------------------------------------------------------------
# Markdown.
# ---------------------------------------------------------------------------------------
def _loads(loads: list[float] | None) -> str:
    return "n/a" if not loads else " / ".join(f"{v:.2f}" for v in loads)


def _mb(b: int | None) -> str:
    return "n/a" if b is None else f"{b / 2**20:.1f}"


def _xla(mem: dict[str, Any], key: str) -> str:
    return "n/a" if not mem.get("xla") else _mb(mem["xla"].get(key))


def _devmem(mem: dict[str, Any]) -> str:
    dm = mem.get("device_memory")
    if not dm:
        return "none reported"
    return f"{_mb(dm.get('peak_bytes_in_use', dm.get('bytes_in_use')))} MiB"


def roofline_markdown(res: dict[str, Any]) -> list[str]:
    """The step/floor goal as a compute rate: what the model part does, and what the goal asks of it."""
    rows = [r for r in res["throughput"] if "model_gflops" in r]
    if not rows or not res.get("dense_gflops"):
        return []
    lines = ["", "### What step/floor <= 1.3 asks of the model", "",
             "Model = step - floor (forward, backward and Adam, per step of the whole batch), counted by XLA's",
             "cost analysis of one step and of one floor step. Needed = the model's operations in 0.3 x the floor's",
             f"time. Ceiling: a dense {res['settings']['gemm_size']}^3 float32 GEMM through XLA on this machine, "
             f"{res['dense_gflops']:.0f} "
             "GFLOP/s (the model's per-task 6x6 products cannot beat it).", "",
             "| L | params | model MFLOP / step | achieved GFLOP/s | needed GFLOP/s | needed / GEMM ceiling |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['depth']} | {r['parameterization']} | {r['model_mflop']:.1f} | {r['model_gflops']:.0f} | "
                     f"{r['goal_gflops']:.0f} | {r['goal_gflops'] / res['dense_gflops']:.2f} |")
    return lines


def preserved_log(existing: str | None) -> str:
    """The hand-kept optimisation log of an existing BENCHMARKS.md (between the markers)."""
    if existing and LOG_BEGIN in existing and LOG_END in existing:
        return existing.split(LOG_BEGIN, 1)[1].split(LOG_END, 1)[0].strip("\n")
    return "(no entries yet)"


def to_markdown(res: dict[str, Any], log_text: str = "(no entries yet)") -> str:
    m, s = res["machine"], res["settings"]
    lines = [
        "# Benchmarks",
        "",
        "Generated by `python -m launch.bench" + (" --quick" if s["steps"] < Settings().steps else "")
        + "` (benchmarks/suite.py); do not edit by hand except the optimisation log, which is kept between",
        "regenerations. Each time is the median of the repeats after a warm-up call; compile time is",
        "measured separately (`jit(...).lower(...).compile()`) and is in no step time.",
        "",
        "## Machine",
        "",
        f"- CPU: {m['cpu_model']}, {m['cpu_count']} cores; load average (1/5/15 min) at start "
        f"{_loads(m['load_average_start'])}, at end {_loads(m.get('load_average_end'))} (other jobs share the cores)",
        f"- JAX {m['jax']}, backend `{m['backend']}`, device `{m['device']}` ({m['device_kind']}); "
        f"Python {m['python']}; {m['platform']}",
        f"- Suite wall time {res['wall_s']:.0f} s; process peak RSS {m.get('peak_rss_mb_end', 0):.0f} MiB",
        "",
        "## Throughput: the training step against its floor",
        "",
        f"d={s['d']}, n={s['n']}, batch {s['batch_size']}, {s['steps']} steps per compiled call, "
        f"{s['repeats']} repeats. Step = `train.make_train_chunk` (sample fresh tasks + forward + backward",
        "+ Adam update) scanned and jitted with donated state, as `train.train` runs it. Floor = sampling",
        "the same batch alone in the same kind of scan, timed interleaved with each step (call by call),",
        f"so both halves of the ratio see the same load. Goal: step/floor <= {STEP_FLOOR_GOAL} (wall time; the",
        "CPU-seconds ratio, all threads of the process, is less disturbed by other processes on the cores;",
        "so is the ratio of the fastest calls, since load can slow a call but never speed it up).",
        "",
        "| L | params | steps/s | tasks/s | step ms | floor ms | step/floor | goal | step/floor (CPU s) "
        "| step/floor (fastest calls) | compile s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["throughput"]:
        st, fl = r["step"], r["floor"]
        lines.append(f"| {r['depth']} | {r['parameterization']} | {st['steps_per_s']:.1f} | {st['tasks_per_s']:.3g} | "
                     f"{1e3 * st['step_s']:.2f} | {1e3 * fl['step_s']:.2f} | {r['step_over_floor']:.2f} | "
                     f"{'met' if r['meets_goal'] else 'NOT met'} | {st['step_cpu_s'] / fl['step_cpu_s']:.2f} | "
                     f"{r['step_over_floor_fastest']:.2f} | {st['compile_s']:.2f} |")
    lines += roofline_markdown(res)
    lines += [
        "",
        "## Scaling in n: per-task time of the training step (L=1, full)",
        "",
        f"Batch = {s['scaling_tokens']} tokens / (n+1) per step (the naive one further capped so its score",
        f"matrix stays under {s['naive_score_bytes'] / 2**20:.0f} MiB); {s['scaling_steps']} steps per call, "
        f"{s['scaling_repeats']} repeats. Naive = `model.apply_naive` (the (n+1) x n score matrix) in",
        f"the same step. Goal: associative t(4n)/t(n) <= {SCALING_GOAL}.",
        "",
        "Wall time per task, then the same in CPU seconds of the process (less disturbed by other load).",
        "",
        "| n | assoc batch | assoc us/task | ratio | goal | assoc CPU us/task | CPU ratio | goal (CPU) "
        "| naive batch | naive us/task | ratio | naive CPU us/task | naive/assoc (CPU) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for prev, r in zip([None, *res["scaling"]], res["scaling"]):
        a, nv = r["assoc"], r["naive"]
        cells = [str(r["n"]), str(a["batch_size"]), f"{a['task_us']:.2f}"]
        a_cpu, n_cpu = (1e6 * x["step_cpu_s"] / x["batch_size"] for x in (a, nv))
        if prev is None:
            cells += ["-", "-", f"{a_cpu:.2f}", "-", "-"]
        else:
            p_cpu = 1e6 * prev["assoc"]["step_cpu_s"] / prev["assoc"]["batch_size"]
            limit = SCALING_GOAL * r["n"] / prev["n"] / 4.0
            cells += [f"{a['task_us'] / prev['assoc']['task_us']:.2f}",
                      "met" if a["task_us"] / prev["assoc"]["task_us"] <= limit else "NOT met",
                      f"{a_cpu:.2f}", f"{a_cpu / p_cpu:.2f}", "met" if a_cpu / p_cpu <= limit else "NOT met"]
        rn = "-" if prev is None else f"{nv['task_us'] / prev['naive']['task_us']:.2f}"
        cells += [str(nv["batch_size"]), f"{nv['task_us']:.2f}", rn, f"{n_cpu:.2f}", f"{n_cpu / a_cpu:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    sv = res["sweep_vmap"]
    lines += ["", "## Scaling in members: vmapped sweep group vs sequential", ""]
    if sv["result"]:
        v = sv["result"]
        lines += [
            f"From `benchmarks/sweep_vmap.py` ({sv['source']}): {v.get('members')} members x {v.get('steps')} steps, "
            f"d={v.get('d')}, n={v.get('n')}, batch {v.get('batch_size')} per member.",
            "",
            "| vmapped s | sequential s | speedup | vmapped compile s | sequential compile s |",
            "|---|---|---|---|---|",
            f"| {v['vmapped_seconds_median']:.3f} | {v['sequential_seconds_median']:.3f} | {v['speedup']:.2f}x | "
            f"{v.get('vmapped_compile_seconds', float('nan')):.2f} | "
            f"{v.get('sequential_compile_seconds', float('nan')):.2f} |",
        ]
    else:
        lines.append(f"Not included: {sv['note']}.")
    side = res.get("side", {})
    if "sweep_vmap_b1024" in side:
        v = side["sweep_vmap_b1024"]["result"]
        lines += ["", f"The same with batch {v['batch_size']} per member, {v['steps']} steps "
                  f"({side['sweep_vmap_b1024']['source']}): vmapped {v['vmapped_seconds_median']:.3f} s, sequential "
                  f"{v['sequential_seconds_median']:.3f} s, speedup {v['speedup']:.2f}x."]
    if "sweep_rerun" in side:
        v = side["sweep_rerun"]["result"]
        lines += ["", "## Re-running a finished sweep", "",
                  f"From `benchmarks/sweep_rerun.py` ({side['sweep_rerun']['source']}): the 8-member sweep "
                  f"`{' '.join(v['grid'])}` trained and aggregated in {v['first_run_seconds']:.1f} s; the identical "
                  f"command again takes {v['rerun_seconds_median']:.2f} s (median of {len(v['rerun_seconds_all'])}, "
                  f"whole command; goal < {v['goal_seconds']:.0f} s: {'met' if v['meets_goal'] else 'NOT met'})."]
    if "loop_efficiency" in side:
        v = side["loop_efficiency"]["result"]
        lines += ["", "## The whole training loop against its step", "",
                  f"From `benchmarks/loop_efficiency.py` ({side['loop_efficiency']['source']}): `train.train` with "
                  "the default bookkeeping (held-out set every `log_every` steps, checkpoints), marginal rate of a "
                  "long minus a short run, against the bench step timed in the same process. Goal: ratio >= "
                  f"{v['goal']}.", "",
                  "| L | batch | eval tasks / log_every / checkpoint_every | loop tasks/s | step tasks/s | ratio "
                  "| goal |",
                  "|---|---|---|---|---|---|---|"]
        for r in v["cases"]:
            lines.append(f"| {r['depth']} | {r['batch_size']} | {r['eval_tasks']} / {r['log_every']} / "
                         f"{r['checkpoint_every']} | {r['marginal_tasks_per_s']:.3g} | {r['step_tasks_per_s']:.3g} | "
                         f"{r['ratio']:.2f} | {'met' if r['meets_goal'] else 'NOT met'} |")
    if m.get("backend") == "cpu":
        lines += ["", "## GPU", "", "Unmeasured: no GPU was available to this run of the suite (backend `cpu`); "
                  "`python -m launch.bench` on a GPU machine fills the tables above for it."]
    lines += [
        "",
        "## Memory",
        "",
        "Peak RSS is the process's `ru_maxrss` after the configuration ran (monotone over the run: a row",
        "can only show growth over earlier rows). Device memory is `jax.devices()[0].memory_stats()`;",
        "the CPU backend reports none. XLA columns are `compiled.memory_analysis()` of that program.",
        "",
        "| program | peak RSS MiB | device memory | XLA args MiB | XLA outputs MiB | XLA temp MiB | code MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    programs = []
    if res["throughput"]:
        programs.append((f"floor (batch {s['batch_size']})", res["throughput"][0]["floor"]["memory"]))
    programs += [(f"step L={r['depth']} {r['parameterization']}", r["step"]["memory"]) for r in res["throughput"]]
    for r in res["scaling"]:
        for attention in ("assoc", "naive"):
            name = f"step n={r['n']} {attention} (batch {r[attention]['batch_size']})"
            programs.append((name, r[attention]["memory"]))
    for name, mem in programs:
        lines.append(f"| {name} | {mem['peak_rss_mb']:.0f} | {_devmem(mem)} | {_xla(mem, 'argument_size_in_bytes')} | "
                     f"{_xla(mem, 'output_size_in_bytes')} | {_xla(mem, 'temp_size_in_bytes')} | "
                     f"{_xla(mem, 'generated_code_size_in_bytes')} |")
    lines += ["", "## Optimisation log", "", LOG_BEGIN, log_text, LOG_END, ""]
    return "\n".join(lines)


def write(res: dict[str, Any], json_path: str, md_path: str) -> None:
    """Write the JSON and regenerate the markdown, keeping its optimisation log."""
    for path in (json_path, md_path):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(json_path, "w") as f:
        json.dump(res, f, indent=2)
    existing = None
    if os.path.exists(md_path):
        with open(md_path) as f:
            existing = f.read()
    with open(md_path, "w") as f:
        f.write(to_markdown(res, preserved_log(existing)))
