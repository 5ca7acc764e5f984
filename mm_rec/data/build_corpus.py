"""A large real corpus from what a machine holds (issue 20.2), prepared for training.

  code   every Python source file (.py) of this interpreter: its standard library and every
         site-packages directory (hundreds of MB on a GPU image: torch, triton, transformers, ...).
         Test directories are left out by default (--include_tests keeps them): they are mostly
         fixtures and near-copies, code that would teach repetition more than programming.
  prose  the bundled public-domain texts, plus every .txt/.md/.rst file under the --text_dir
         directories given (e.g. /work/shared/data/text on a developer machine).
         Docstrings and comments are not copied out as prose: they stay in the code domain, and
         counting them twice would tilt the prose toward API reference English.

Exact duplicates (the same file vendored by two packages, the same paragraph twice) are dropped by
prepare_data, which writes the dataset. Only the core dependencies are needed (no `datasets`).
"""
from __future__ import annotations

import os
import resource
import site
import sys
import sysconfig
import time
from pathlib import Path

from mm_rec.data.corpus import bundled_prose_paths
from mm_rec.data.prepare import DOMAINS, prepare_data
from mm_rec.data.sources import ALWAYS_SKIPPED_DIRS, TEXT_EXTENSIONS, Source
from mm_rec.utils.errors import UserError

CODE_EXTENSIONS = (".py",)
TEST_DIRS = ("test", "tests", "testing", "idle_test", "unittests")
# Never code worth learning from: Python 2 sources kept for 2to3, demo scripts.
EXCLUDED_DIRS = ("lib2to3", "turtledemo")
PACKAGE_DIRS = ("site-packages", "dist-packages")


def python_code_dirs() -> list[Path]:
    """The standard library and every site-packages directory of this interpreter, each once."""
    paths = sysconfig.get_paths()
    candidates = [paths["stdlib"], paths["platstdlib"], paths["purelib"], paths["platlib"], *site.getsitepackages()]
    if site.ENABLE_USER_SITE:
        candidates.append(site.getusersitepackages())
    seen, dirs = set(), []
    for c in candidates:
        p = Path(c)
        # a venv's lib/pythonX.Y holds only its site-packages (read as its own source): not a code dir
        is_code_dir = p.name in PACKAGE_DIRS or any(p.glob("*.py"))
        if p.is_dir() and is_code_dir and p.resolve() not in seen:
            seen.add(p.resolve())
            dirs.append(p)
    return dirs


def corpus_sources(text_dirs=(), code_dirs=(), include_tests: bool = False,
                   max_code_bytes: int | None = None) -> tuple[list[Source], list[Source]]:
    """(prose sources, code sources) of the corpus. max_code_bytes caps each code directory
    (a sample of whole files spread over the tree)."""
    skip = EXCLUDED_DIRS + (() if include_tests else TEST_DIRS)
    code = []
    for d in [*python_code_dirs(), *map(Path, code_dirs)]:
        if not d.is_dir():
            raise UserError(f"--code_dir {d} is not a directory")
        # the standard library holds site-packages, which is read as its own source
        nested = PACKAGE_DIRS if d.name not in PACKAGE_DIRS else ()
        code.append(Source(d, exclude_dirs=skip + nested + tuple(ALWAYS_SKIPPED_DIRS), extensions=CODE_EXTENSIONS,
                           max_bytes=max_code_bytes))
    text = [Source(p) for p in bundled_prose_paths()]
    for d in map(Path, text_dirs):
        if not d.exists():
            raise UserError(f"--text_dir {d} does not exist")
        text.append(Source(d, extensions=TEXT_EXTENSIONS))
    return text, code


def build_corpus(out, text_dirs=(), code_dirs=(), vocab_size: int = 32000, include_tests: bool = False,
                 max_code_bytes: int | None = None, max_tokens: int | None = None, val_fraction: float = 0.01,
                 verbose: bool = True) -> dict:
    """Prepare the corpus into `out`; returns prepare_data's meta plus "build" figures (wall
    seconds, tokens/s, peak RSS)."""
    text, code = corpus_sources(text_dirs, code_dirs, include_tests, max_code_bytes)
    if verbose:
        print("code from " + ", ".join(str(s.path) for s in code), file=sys.stderr)
        print("prose from " + ", ".join(str(s.path) for s in text), file=sys.stderr)
    recipe = {"name": "mm_rec build_corpus", "python": sys.version.split()[0], "include_tests": include_tests,
              "code_dirs": [str(s.path) for s in code], "text": [str(s.path) for s in text],
              "max_code_bytes": max_code_bytes, "max_tokens": max_tokens}
    t0, cpu0 = time.time(), time.process_time()
    meta = prepare_data(text, code, out, vocab_size=vocab_size, val_fraction=val_fraction, max_tokens=max_tokens,
                        recipe=recipe, verbose=verbose)
    seconds, cpu = time.time() - t0, time.process_time() - cpu0
    tokens = {d: meta["tokens"][d]["train"] + meta["tokens"][d]["val"] for d in DOMAINS}
    meta["build"] = {"seconds": round(seconds, 1), "tokens": tokens,
                     "tokens_per_second": round(sum(tokens.values()) / max(seconds, 1e-9)),
                     "cpu_seconds": round(cpu, 1),  # all threads; differs from seconds x cpus on a shared machine
                     "peak_rss_mb": round(peak_rss_mb()), "cpus": _cpus()}
    return meta


def peak_rss_mb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 if sys.platform != "darwin" else kb / 2**20


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1
