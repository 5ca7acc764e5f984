"""The argument parser every MM-Rec command uses.

argparse by default accepts any unambiguous prefix of a flag (`--lr` for `--lr_scale`), so a typo
can silently change what a run does. Ours refuses prefixes and unknown flags, and reports bad
flags as a UserError: one line, exit status 2, no usage dump.
"""
from __future__ import annotations

import argparse

from .errors import UserError


class ArgumentParser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        kwargs["allow_abbrev"] = False
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        if message.startswith("unrecognized arguments:"):
            flags = [a.split("=", 1)[0] for a in message.split(":", 1)[1].split() if a.startswith("--")]
            known = sorted(s for a in self._actions for s in a.option_strings if s.startswith("--"))
            hints = [k for f in flags for k in known if k.startswith(f)]
            if hints:
                message += f" (did you mean {' or '.join(hints)}? flags are never abbreviated)"
        raise UserError(f"{message}; see {self.prog} --help")


__all__ = ["ArgumentParser"]
