"""The default corpus: bundled public-domain prose + this interpreter's standard library.

Training without a data argument calls `ensure_default_corpus`, which prepares the corpus once
into a cache directory and reuses it afterwards:
  $MMREC_CACHE_DIR/default_corpus/vocab{N}   (or ~/.cache/mm_rec/default_corpus/vocab{N})
The prose ships compressed in mm_rec/data/corpus/ (see SOURCES.md there); the code is read from
the running Python's standard library at prepare time (tests, site-packages and caches skipped,
capped in size so preparing stays quick on a small machine).
"""
from __future__ import annotations

import contextlib
import shutil
import json
import os
import sys
import sysconfig
import time
from pathlib import Path

from mm_rec.data.prepare import META_FILE, prepare_data
from mm_rec.data.sources import Source

CORPUS_DIR = Path(__file__).resolve().parent / "corpus"
# Bundled prose, xz-compressed (about 20 MB of text in 4.8 MB).
BUNDLED_PROSE = (
    "moby_dick.txt.xz",
    "kjv.txt.xz",
    "shakespeare_milton.txt.xz",
    "sotu_first120.txt.xz",
)
# Standard-library directories that are tests, demos or third-party code, not representative code.
STDLIB_EXCLUDE_DIRS = ("test", "tests", "idle_test", "site-packages", "dist-packages", "lib2to3", "turtledemo")
DEFAULT_CODE_MAX_BYTES = 12_000_000
DEFAULT_VAL_FRACTION = 0.01
# Bump when the recipe changes, so existing caches are rebuilt instead of silently reused.
RECIPE_VERSION = 2  # 2: exact duplicates dropped, split keys from the content hash


def bundled_prose_paths() -> list[Path]:
    return [CORPUS_DIR / name for name in BUNDLED_PROSE]


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def cache_root(cache_dir=None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("MMREC_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "mm_rec"


def default_corpus_dir(vocab_size: int, cache_dir=None) -> Path:
    return cache_root(cache_dir) / "default_corpus" / f"vocab{vocab_size}"


def default_recipe(vocab_size: int, code_max_bytes: int, prose_max_bytes: int | None) -> dict:
    """What the cached corpus was built from; a cache is reused only when this matches exactly."""
    return {
        "name": "mm_rec default corpus",
        "version": RECIPE_VERSION,
        "vocab_size": vocab_size,
        "prose": list(BUNDLED_PROSE),
        "prose_max_bytes": prose_max_bytes,
        "code": "python stdlib",
        "python": f"{sys.version_info.major}.{sys.version_info.minor}",
        "code_max_bytes": code_max_bytes,
        "val_fraction": DEFAULT_VAL_FRACTION,
    }


def ensure_default_corpus(vocab_size: int = 32000, cache_dir=None, verbose: bool = True, *,
                          code_max_bytes: int = DEFAULT_CODE_MAX_BYTES,
                          prose_max_bytes: int | None = None) -> Path:
    """The prepared default corpus for `vocab_size`, built on first use; returns its directory.

    prose_max_bytes caps each bundled prose file (a prefix; None = all of it); code_max_bytes caps
    the standard-library sample. Both exist to make small corpora for tests.
    """
    out = default_corpus_dir(vocab_size, cache_dir)
    recipe = default_recipe(vocab_size, code_max_bytes, prose_max_bytes)
    if _matches(out, recipe):
        if verbose:
            print(f"using the default corpus in {out}", file=sys.stderr)
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(out.parent / f"{out.name}.lock"):
        if _matches(out, recipe):  # another process built it while we waited
            return out
        if verbose:
            print(f"building the default corpus into {out} (once): bundled prose "
                  f"({', '.join(BUNDLED_PROSE)}) and up to {code_max_bytes / 1e6:.0f} MB of Python standard "
                  f"library code from {stdlib_dir()}, with a {vocab_size}-token tokenizer", file=sys.stderr)
        t0 = time.time()
        _clear_stale(out)
        prose = [Source(p, max_bytes=prose_max_bytes) for p in bundled_prose_paths()]
        code = [Source(stdlib_dir(), exclude_dirs=STDLIB_EXCLUDE_DIRS, max_bytes=code_max_bytes)]
        prepare_data(prose, code, out, vocab_size=vocab_size, val_fraction=DEFAULT_VAL_FRACTION,
                     recipe=recipe, verbose=verbose)
        if verbose:
            print(f"default corpus ready in {time.time() - t0:.0f} s", file=sys.stderr)
    return out


def _matches(out: Path, recipe: dict) -> bool:
    try:
        meta = json.loads((out / META_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("recipe") == recipe


def _clear_stale(out: Path) -> None:
    """Remove a cache from another recipe: prepare_data refuses directories it did not write,
    and the cache directory is ours alone."""
    if out.is_dir():
        shutil.rmtree(out)


@contextlib.contextmanager
def _exclusive_lock(path: Path):
    """Serialize builds of the same cache (e.g. several DDP ranks starting at once)."""
    try:
        import fcntl
    except ImportError:  # Windows: no lock; concurrent builds are unlikely there
        yield
        return
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
