"""The errors a command can end with, the exit code and the one-line prefix of each: the refusal table.

Every command (maskdit_ds/cli/) answers a refusal the same way, through `refusal(err)`: one line
`<prefix>: <message>` on stderr and the table's exit code. Anything the table does not name is a bug and keeps
its traceback. Imports only the standard library, so the CLI can always report them.
"""
from __future__ import annotations

import errno

EXIT_CONFIG = 2  # the run could not start: a config, an input file or the run directory is wrong
EXIT_DIVERGED = 3  # training stopped: non-finite loss, fp16 overflow storm
EXIT_STORAGE = 4  # a checkpoint, export, cache or output could not be written (disk full, quota, I/O error)
EXIT_PEER_LOST = 5  # another rank or host of the job was lost, or the ranks could not all join at start
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: saved on a stop request; the SLURM templates requeue on this code


class ConfigError(ValueError):
    """A config problem, named by its dotted key (or file and position)."""


class InputError(ValueError):
    """An input file (export folder, weights, .npz, release) is missing a part, unreadable, or not what it must
    be; the message names the file."""


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


# errno values that mean "the storage failed", not "the program asked for something wrong"
STORAGE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.EROFS)
# How libraries that do not raise OSError report the same failures: torch.save's C++ zip writer ("[enforce fail
# at inline_container.cc] . unexpected pos 704 vs 598" after a short write, "PytorchStreamWriter failed writing
# file ...: file write failed"), its legacy writer ("write(): fd 3 failed with No space left on device"),
# safetensors' Rust writer ("Error while serializing: I/O error: No space left on device (os error 28)").
STORAGE_TEXTS = ("No space left on device", "Disk quota exceeded", "File too large", "Input/output error",
                 "Read-only file system", "unexpected pos", "PytorchStreamWriter", "file write failed",
                 "iostream error", "(os error 28)", "(os error 122)", "(os error 27)", "(os error 5)",
                 "(os error 30)")


def is_storage_failure(err: BaseException) -> bool:
    """Whether `err`, whatever library raised it, says that a write failed for lack of space or an I/O error."""
    if isinstance(err, StorageError):
        return True
    if isinstance(err, OSError) and err.errno is not None:
        return err.errno in STORAGE_ERRNOS
    return isinstance(err, Exception) and any(text in str(err) for text in STORAGE_TEXTS)


# (error class or test, prefix, exit code), the first match wins. FileNotFoundError and ValueError are the
# standard library's "this input is wrong" (a path, a value the user gave); the package's refusals subclass them
# or are named here. A storage failure is the storage error whichever library raised it.
REFUSALS = (
    (ConfigError, "config error", EXIT_CONFIG),
    (TrainingError, "training stopped", EXIT_DIVERGED),
    (RunDirBusy, "error", EXIT_CONFIG),
    (ReshardError, "error", EXIT_CONFIG),
    (InputError, "error", EXIT_CONFIG),
    (is_storage_failure, "storage error", EXIT_STORAGE),
    (PeerLost, "distributed error", EXIT_PEER_LOST),
    (FileNotFoundError, "error", EXIT_CONFIG),
    (ValueError, "error", EXIT_CONFIG),
)


def refusal(err: BaseException) -> tuple[str, int] | None:
    """(prefix, exit code) of a refusal, or None for an error the table does not know (a bug: keep its
    traceback)."""
    for kind, prefix, code in REFUSALS:
        if isinstance(err, kind) if isinstance(kind, type) else kind(err):
            return prefix, code
    return None


def one_line(err: BaseException) -> str:
    """The message on one line (some libraries' messages span several: keep their first line)."""
    text = str(err).strip()
    if isinstance(err, KeyError) and text.startswith(("'", '"')):
        text = text[1:-1]  # KeyError quotes its message
    return text.splitlines()[0] if text else type(err).__name__
