"""The console scripts of pyproject.toml: each runs a CLI's main through run_cli, so a user error is
one line (`error: ...`) and exit status 2, as with `python -m mm_rec.scripts.NAME`.

    mmrec-train, mmrec-prepare-data, mmrec-evaluate, mmrec-generate, mmrec-export, mmrec-serve

The scripts' modules are imported when called, so each entry point loads only its own CLI.
"""
from __future__ import annotations

import importlib
import sys

from ..utils.errors import run_cli


def _run(module: str) -> None:
    sys.exit(run_cli(importlib.import_module(f"mm_rec.scripts.{module}").main))


def train() -> None:
    _run("train_modular")


def prepare_data() -> None:
    _run("prepare_data")


def evaluate() -> None:
    _run("evaluate")


def generate() -> None:
    _run("generate")


def export() -> None:
    _run("export")


def serve() -> None:
    _run("serve")
