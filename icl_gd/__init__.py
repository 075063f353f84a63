"""icl-gd: train linear self-attention on in-context regression and test it against GD theory."""

from icl_gd.config import Config, ConfigError
from icl_gd.run import Run, load

__all__ = ["Config", "ConfigError", "Run", "load"]
__version__ = "0.1.0"
