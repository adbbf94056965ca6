"""The user-facing error type and the command-line convention around it.

``InputError`` (a ValueError) means: the input is wrong and the user can fix it. Its message is one
line that names what is wrong and what to do. Command lines run through :func:`cli_main`, which prints
``error: <message>`` and exits with status 2 for an InputError, and lets anything else (a bug)
propagate with its traceback.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence


class InputError(ValueError):
    """Bad input (files, adapters, models, data, arguments) that the user can fix."""


class CliParser(argparse.ArgumentParser):
    """argparse for the package's command lines: a bad or unknown flag is an InputError, so
    :func:`cli_main` prints one line and exits with status 2 (argparse's own error prints the whole
    usage block first)."""

    def error(self, message):
        raise InputError(f"{message} (see {self.prog} --help)")


def cli_main(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> int:
    """Run ``main(argv)``; an InputError becomes one line on stderr and exit status 2."""
    try:
        return int(main(argv) or 0)
    except InputError as e:
        msg = " ".join(str(e).split())  # one line, whatever the message held
        print(f"error: {msg}", file=sys.stderr)
        return 2
