"""icl-gd: train linear self-attention on in-context regression and test it against GD theory.

``icl_gd.load(workdir)`` opens a trained run. JAX-heavy modules load on first use, so the
launchers validate their flags in a fraction of a second.
"""

from typing import Any

from icl_gd.config import Config, ConfigError

__all__ = ["Config", "ConfigError", "Run", "load"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in ("Run", "load"):
        from icl_gd import run

        return getattr(run, name)
    raise AttributeError(f"module 'icl_gd' has no attribute {name!r}")
