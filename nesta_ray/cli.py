"""What the command lines share: an argument parser whose mistakes are one ``error:`` line (exit 2, no usage
block), checked integer arguments, and the one line an error becomes on stderr, redacted (``redaction``).

A ``NestaError`` (bad input the user can fix) exits with code 2; anything else is a bug in nesta_ray: one line
that says so and exit code 1, with the traceback only when ``NESTA_RAY_TRACEBACK=1`` asks for it.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Callable, Iterable
from typing import NoReturn

from nesta_ray.errors import NestaError
from nesta_ray.redaction import error_line, redact


class Parser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors print ``error: <what> (see <prog> --help)`` and exit with code 2."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{error_line(Exception(message))} (see {self.prog} --help)\n")
        raise SystemExit(2)


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse ``type`` for integers >= ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text[:40]!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum} (got {value})")
        return value

    return parse


def fail(err: BaseException, secrets: Iterable[str] = ()) -> int:
    """Print the one line for ``err`` on stderr; returns the exit code: 2 for a NestaError, 1 for anything else
    (a bug: it says so, and prints the traceback only with ``NESTA_RAY_TRACEBACK=1``)."""
    if isinstance(err, NestaError):
        print(error_line(err, secrets), file=sys.stderr)
        return 2
    print(error_line(Exception(f"internal error ({type(err).__name__}: {err}); this is a bug in nesta_ray, please "
                               "report it (NESTA_RAY_TRACEBACK=1 prints where it happened)"), secrets), file=sys.stderr)
    if os.environ.get("NESTA_RAY_TRACEBACK") == "1":
        traceback.print_exception(err)
    return 1


def emit(text: str, secrets: Iterable[str] = (), *, err: bool = False) -> None:
    """Print ``text`` (stdout, or stderr with ``err``) with secrets and URI userinfo redacted."""
    print(redact(text, secrets), file=sys.stderr if err else sys.stdout)
