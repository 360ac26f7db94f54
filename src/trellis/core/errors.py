"""Errors a user can fix, reported as one clear message instead of a traceback."""

import sys
from collections.abc import Iterator
from contextlib import contextmanager


class TrellisError(Exception):
    """A problem with the user's recipe, data or model that the message tells how to fix."""


@contextmanager
def exit_on_error() -> Iterator[None]:
    """Turn a TrellisError into `error: <message>` on stderr and exit code 2 (no traceback)."""
    try:
        yield
    except TrellisError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
