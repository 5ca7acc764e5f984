"""User-facing errors: one line, no traceback, non-zero exit.

Raise `UserError` for anything the user can fix (a bad flag, a missing file, a mismatched
checkpoint). The CLIs wrap `main` with `run_cli`, which prints `error: <message>` to stderr and
exits with status 2; programming errors still raise with a full traceback.
"""
from __future__ import annotations

import sys
from typing import Callable, Sequence


class UserError(Exception):
    """A mistake in the user's input, reported as one line."""


def run_cli(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> int:
    try:
        code = main(argv)
    except UserError as e:
        # one write of the whole line: under torchrun every rank reports, into the same stream
        sys.stderr.write(f"error: {e}\n")
        sys.stderr.flush()
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(code or 0)
