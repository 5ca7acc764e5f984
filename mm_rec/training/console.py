"""What the trainer shows on the console: lines above the progress bar, paths as the guide writes them."""
from __future__ import annotations

import logging
from pathlib import Path

from tqdm import tqdm


def display(path: Path) -> str:
    """./checkpoints/x.pt for a relative --checkpoint_dir, as in the guide."""
    s = str(path)
    return s if path.is_absolute() or s.startswith(".") else f"./{s}"


def route_monitor_logs(name: str, is_main: bool):
    """Monitoring warnings appear as lines above the progress bar (rank 0 only), not on stderr.
    Returns a function that puts the logger back as it was (for callers that train in-process)."""
    logger = logging.getLogger(name)
    before = (logger.propagate, logger.level)
    logger.propagate = False
    for h in list(logger.handlers):
        if getattr(h, "_mmrec_trainer", False):
            logger.removeHandler(h)
    handler = _TqdmHandler() if is_main else logging.NullHandler()
    handler._mmrec_trainer = True
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)

    def restore() -> None:
        logger.removeHandler(handler)
        logger.propagate = before[0]
        logger.setLevel(before[1])
    return restore


class _TqdmHandler(logging.Handler):
    def emit(self, record):
        tqdm.write(f"⚠️ {record.getMessage()}")


__all__ = ["display", "route_monitor_logs"]
