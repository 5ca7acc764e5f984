"""Fixtures shared by the whole suite. Tests are laid out like the package (tests/ops, tests/model,
tests/data, tests/training, tests/inference, tests/serving, tests/hf, tests/utils) plus
tests/project for packaging and the benchmark scripts.

Markers: `gpu` (needs CUDA, skipped without it), `slow` (more than a few seconds on 2 cores),
`compile` (runs torch.compile / Inductor: deselect with `-m "not compile"` for a quick run).
"""
from __future__ import annotations

from pathlib import Path

import pytest

from mm_rec.data.corpus import ensure_default_corpus


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """A small real corpus (prose prefixes and some stdlib code) with a 512-token tokenizer, built
    once per session and shared by every training test (tests read it, none writes to it)."""
    return ensure_default_corpus(512, cache_dir=tmp_path_factory.mktemp("corpus_cache"), verbose=False,
                                 prose_max_bytes=60_000, code_max_bytes=300_000)
