"""Shared test setup: float32 CPU JAX, quiet logs, and one XLA compilation cache per test session.

Many tests start the launchers in subprocesses that compile the very same programs (a run, then its
resume; the same tiny config in several launchers). JAX's persistent cache lets a later process load
the executable instead of compiling it again (about 6% of the launcher-heavy tests' time). The cache
lives in a fresh temporary folder per pytest session, removed at exit: never shared across sessions,
so no entry can outlive the code that wrote it.
"""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="icl_gd_xla_cache_")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
