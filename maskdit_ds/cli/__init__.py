"""One module per `python -m maskdit_ds <command>` (see maskdit_ds/__main__.py); each has main(argv) -> exit code.

Every command builds its parser with `parser()` and wraps its main with `command`, so that all of them answer a
refusal the same way (errors.py's table: one line, a stable exit code) and leave the process group on the way out.
"""
from __future__ import annotations

import argparse
import functools
import sys

from ..errors import one_line, refusal


def parser(command: str, doc: str | None, **kwargs) -> argparse.ArgumentParser:
    """The parser of `python -m maskdit_ds <command>`: its module docstring as the description, kept as written."""
    return argparse.ArgumentParser(prog=f"python -m maskdit_ds {command}", description=doc,
                                   formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs)


def command(main):
    """main(argv) -> exit code, with the refusal table: an error that errors.refusal knows prints
    `<prefix>: <message>` (one line) on stderr and returns its exit code; any other keeps its traceback. The
    process group, if one was made, is left in every case (see close_process_group)."""

    @functools.wraps(main)
    def run(argv=None) -> int:
        try:
            return main(argv) or 0
        except Exception as err:
            found = refusal(err)
            if found is None:
                raise
            prefix, code = found
            print(f"{prefix}: {one_line(err)}", file=sys.stderr, flush=True)
            return code
        finally:
            close_process_group()

    return run


def close_process_group() -> None:
    """dist.close(), when the command got as far as importing torch."""
    if "torch" in sys.modules:
        from .. import dist

        dist.close()
