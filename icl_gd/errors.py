"""The errors a run can end with (no JAX import: the launchers map them to exit codes cheaply).

``ConfigError`` / ``ConfigMismatchError`` (bad flags, a workdir of another run) live in
``icl_gd.config``; these come from the training loop.
"""


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/Inf loss; the last good checkpoint was kept."""


class Preempted(RuntimeError):
    """SIGTERM arrived (pre-emption): a checkpoint was saved and the run stopped cleanly."""


class RunBusyError(RuntimeError):
    """Another live process is training in this run folder (one writer per workdir)."""


class UnreadableRunError(FileNotFoundError):
    """Every checkpoint of a run folder is unreadable (each was moved to ``corrupt/``, none deleted)."""


class ResourceError(RuntimeError):
    """A run cannot fit in the memory available (``icl_gd.resources``); the message names the flags to lower."""


class DiskFullError(RuntimeError):
    """A write failed with no space left (ENOSPC) or the quota exceeded (EDQUOT); the message names the
    path and the last checkpoint kept (the checkpoints already saved are untouched)."""
