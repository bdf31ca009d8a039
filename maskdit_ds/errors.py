"""The errors a run can end with, and the exit code of each. Imports nothing, so the CLI can always report them."""

EXIT_CONFIG = 2  # the run could not start: a config, an input path or the run directory is wrong
EXIT_DIVERGED = 3  # training stopped: non-finite loss, fp16 overflow storm
EXIT_STORAGE = 4  # a checkpoint, export or cache could not be written (disk full, quota, I/O error)
EXIT_PEER_LOST = 5  # another rank or host of the job was lost, or the ranks could not all join at start
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: saved on a stop request; the SLURM templates requeue on this code


class ConfigError(ValueError):
    """A config problem, named by its dotted key (or file and position)."""


class RunDirBusy(RuntimeError):
    """Another live process trains in this run directory."""


class TrainingError(RuntimeError):
    """The run cannot continue meaningfully (NaN loss, fp16 overflow storm)."""


class StorageError(RuntimeError):
    """A write failed; the message names the path and the free space there."""


class ReshardError(RuntimeError):
    """A checkpoint tag cannot be resharded; the message says why."""


class PeerLost(RuntimeError):
    """A rank or host of the job is gone (crashed, unreachable) or never joined; the message names it."""
