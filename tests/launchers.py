"""Run the absl launchers as a user does: ``python -m launch.X`` in a real subprocess from the repo root."""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def command(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def cpu_env() -> dict[str, str]:
    return dict(os.environ, JAX_PLATFORMS="cpu")


def run(module: str, *args: str, timeout: int, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """The finished launcher (stdout/stderr captured as text); ``env`` defaults to ``cpu_env()``."""
    return subprocess.run(command(module, *args), cwd=ROOT, env=cpu_env() if env is None else env,
                          capture_output=True, text=True, timeout=timeout)
