"""prepare_data: sources -> tokenizer.json, meta.json and four token memmaps.

Output directory layout (all deterministic: the same inputs give byte-identical files):
  tokenizer.json                  the tokenizer the ids belong to
  text_train.bin, text_val.bin    token ids, raw little-endian uint16 (vocab < 65536) or uint32,
  code_train.bin, code_val.bin    documents concatenated, each followed by <|endoftext|>
  meta.json                       vocab size, dtype, tokenizer hash, counts per domain, split and
                                  input file, sources, skips; written last

The work is three passes over the sources, so memory stays small however large the corpus:
1. scan: read every document, count it, and hash it (the validation split is chosen from the
   hashes: the documents with the lowest hash(seed, text) until they hold about val_fraction
   of the domain's bytes);
2. train the tokenizer on the training documents (unless one is given);
3. encode the documents in batches and append them to the train or val memmap.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from tqdm import tqdm

from mm_rec.data.sources import (DEFAULT_TXT_DOC_CHARS, SkipLog, Source, SourceStats, as_source,
                                 iter_documents, list_input_files)
from mm_rec.data.tokenizer import Tokenizer, train_tokenizer
from mm_rec.utils.errors import UserError

DOMAINS = ("text", "code")
SPLITS = ("train", "val")
META_FORMAT = "mm_rec.prepared_data"
META_VERSION = 1
META_FILE = "meta.json"
TOKENIZER_FILE = "tokenizer.json"
# The tokenizer learns its merges from at most this many characters of training text per domain.
DEFAULT_TOKENIZER_TRAIN_CHARS = 200_000_000
_ENCODE_BATCH_CHARS = 1 << 20   # documents handed to encode_batch at a time, by size...
_ENCODE_BATCH_DOCS = 1024       # ...and by count
_TMP_PREFIX = ".prepare-tmp-"


def bin_name(domain: str, split: str) -> str:
    return f"{domain}_{split}.bin"


OUTPUT_FILES = (TOKENIZER_FILE, META_FILE) + tuple(bin_name(d, s) for d in DOMAINS for s in SPLITS)


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size < 65536 else np.dtype(np.uint32)


@dataclass
class _FileCounts:
    documents: dict = field(default_factory=lambda: {"train": 0, "val": 0})
    tokens: dict = field(default_factory=lambda: {"train": 0, "val": 0})
    bytes: dict = field(default_factory=lambda: {"train": 0, "val": 0})


@dataclass
class _DomainScan:
    """Pass 1 results for one domain."""
    sources: list[Source]
    files: list  # list[list[InputFile]], per source
    source_stats: list[SourceStats]
    doc_bytes: np.ndarray      # UTF-8 size of each document
    doc_keys: np.ndarray       # hash(seed, text) of each document, for the split
    is_val: np.ndarray | None = None


def prepare_data(text_sources: Iterable, code_sources: Iterable, out_dir, tokenizer_path=None,
                 vocab_size: int = 32000, val_fraction: float = 0.01, seed: int = 0, *,
                 txt_doc_chars: int = DEFAULT_TXT_DOC_CHARS,
                 tokenizer_train_chars: int = DEFAULT_TOKENIZER_TRAIN_CHARS,
                 recipe: dict | None = None, verbose: bool = True) -> dict:
    """Tokenize text and code sources into `out_dir`; return the meta dict also written as meta.json.

    Sources are paths (files or directories) or `Source` objects. With `tokenizer_path` the
    given tokenizer is used (and copied to out_dir); otherwise a byte-level BPE of `vocab_size`
    tokens is trained on the training split. `recipe`, if given, is stored in meta.json as is
    (the default corpus uses it to recognise its own cache).
    """
    out_dir = Path(out_dir)
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"--val_fraction must be in [0, 1), got {val_fraction}")
    if txt_doc_chars < 0:
        raise UserError(f"--txt_doc_chars must be >= 0, got {txt_doc_chars}")
    sources = {"text": [as_source(s) for s in text_sources], "code": [as_source(s) for s in code_sources]}
    if not sources["text"] and not sources["code"]:
        raise UserError("no sources given: pass --text and/or --code files or directories")
    _check_out_dir(out_dir)
    log = _printer(verbose)

    # Load a given tokenizer first: a bad path should fail before minutes of scanning.
    tokenizer = Tokenizer.load(tokenizer_path) if tokenizer_path is not None else None

    skips = SkipLog()
    scans = {}
    for domain in DOMAINS:
        t0 = time.time()
        scans[domain] = _scan_domain(sources[domain], domain, seed, txt_doc_chars, skips)
        scans[domain].is_val = choose_validation_documents(scans[domain].doc_keys, scans[domain].doc_bytes,
                                                           val_fraction)
        if sources[domain]:
            log(f"scanned {domain} ({', '.join(s.name for s in sources[domain])}): "
                f"{len(scans[domain].doc_bytes):,} documents, {scans[domain].doc_bytes.sum() / 1e6:.1f} MB "
                f"in {time.time() - t0:.1f} s")

    if tokenizer is None:
        log(f"training a byte-level BPE tokenizer with {vocab_size} tokens on the training documents")
        t0 = time.time()
        texts = _training_texts(scans, txt_doc_chars, tokenizer_train_chars)
        tokenizer = train_tokenizer(texts, vocab_size, show_progress=verbose)
        log(f"trained the tokenizer in {time.time() - t0:.1f} s")
    dtype = token_dtype(tokenizer.vocab_size)

    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f"{_TMP_PREFIX}{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        tokenizer.save(tmp / TOKENIZER_FILE)
        file_counts = {}
        for domain in DOMAINS:
            file_counts[domain] = _encode_domain(scans[domain], domain, tokenizer, dtype, tmp, txt_doc_chars, verbose)
        meta = _build_meta(scans, file_counts, skips, tokenizer, dtype, tokenizer_path, vocab_size,
                           val_fraction, seed, txt_doc_chars, recipe)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        _move_into_place(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if verbose:
        print(format_summary(meta, out_dir), file=sys.stderr)
    return meta


def _printer(verbose: bool):
    def log(msg: str) -> None:
        if verbose:
            print(msg, file=sys.stderr, flush=True)
    return log


def _check_out_dir(out_dir: Path) -> None:
    """Refuse to write into a directory that holds anything but a previous prepare_data output."""
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir} is a file; give a directory path")
    if out_dir.is_dir():
        foreign = sorted(p.name for p in out_dir.iterdir()
                         if p.name not in OUTPUT_FILES and not p.name.startswith(_TMP_PREFIX))
        if foreign:
            raise UserError(f"--out {out_dir} already holds other files ({', '.join(foreign[:3])}); "
                            "give a new or empty directory, or a previous prepare_data output")


def _move_into_place(tmp: Path, out_dir: Path) -> None:
    # meta.json marks a complete directory: drop the old one first and write the new one last,
    # so an interrupted run never leaves a complete-looking mix of old and new files.
    (out_dir / META_FILE).unlink(missing_ok=True)
    for name in OUTPUT_FILES:
        if name != META_FILE:
            os.replace(tmp / name, out_dir / name)
    os.replace(tmp / META_FILE, out_dir / META_FILE)


def _document_key(seed: int, text: str) -> int:
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8, key=str(seed).encode()).digest()
    return int.from_bytes(digest, "little")


def _scan_domain(sources: list[Source], domain: str, seed: int, txt_doc_chars: int, skips: SkipLog) -> _DomainScan:
    files, stats, doc_bytes, doc_keys = [], [], [], []
    for source in sources:
        st = SourceStats()
        fl = list_input_files(source, domain, st)
        for _, doc in iter_documents(source, domain, txt_doc_chars, skips=skips, stats=st, files=fl):
            doc_bytes.append(len(doc.encode("utf-8")))
            doc_keys.append(_document_key(seed, doc))
        files.append(fl)
        stats.append(st)
    return _DomainScan(sources, files, stats, np.array(doc_bytes, dtype=np.int64),
                       np.array(doc_keys, dtype=np.uint64))


def choose_validation_documents(keys: np.ndarray, sizes: np.ndarray, val_fraction: float) -> np.ndarray:
    """Boolean mask of validation documents.

    Documents are taken in order of their key (a hash of seed and text: deterministic, and
    independent of file order) until they hold val_fraction of the bytes; a document that would
    overshoot that by more than half is passed over. With at least two documents and
    val_fraction > 0, at least one (the smallest) goes to validation and one stays in training.
    """
    is_val = np.zeros(len(keys), dtype=bool)
    if val_fraction <= 0 or len(keys) < 2:
        return is_val
    target = val_fraction * float(sizes.sum())
    taken = 0
    for i in np.argsort(keys, kind="stable"):
        if taken >= target:
            break
        if taken + sizes[i] <= 1.5 * target:
            is_val[i] = True
            taken += int(sizes[i])
    if not is_val.any():
        order = np.lexsort((keys, sizes))  # smallest document, ties broken by key
        is_val[order[0]] = True
    return is_val


def _iter_scanned(scan: _DomainScan, domain: str, txt_doc_chars: int) -> Iterator[tuple[int, str, str]]:
    """(document index, file label, text) again, in pass-1 order; skips were counted in pass 1."""
    i = 0
    for source, files in zip(scan.sources, scan.files):
        for label, doc in iter_documents(source, domain, txt_doc_chars, files=files):
            if i >= len(scan.doc_bytes):
                raise _SourcesChanged()
            yield i, label, doc
            i += 1
    if i != len(scan.doc_bytes):
        raise _SourcesChanged()


class _SourcesChanged(UserError):
    def __init__(self):
        super().__init__("the sources changed while prepare_data was reading them; run it again")


def _training_texts(scans: dict, txt_doc_chars: int, max_chars: int) -> Iterator[str]:
    for domain in DOMAINS:
        used = 0
        for i, _, doc in _iter_scanned(scans[domain], domain, txt_doc_chars):
            if scans[domain].is_val[i]:
                continue  # the tokenizer never sees validation text
            if used >= max_chars:
                break
            used += len(doc)
            yield doc


def _encode_domain(scan: _DomainScan, domain: str, tokenizer: Tokenizer, dtype: np.dtype, out: Path,
                   txt_doc_chars: int, verbose: bool) -> dict[str, _FileCounts]:
    counts: dict[str, _FileCounts] = {}
    outputs = {split: open(out / bin_name(domain, split), "wb") for split in SPLITS}
    batch: list[tuple[int, str, str]] = []
    batch_chars = 0
    bar = tqdm(total=int(scan.doc_bytes.sum()), unit="B", unit_scale=True, desc=f"tokenizing {domain}",
               disable=not verbose or not len(scan.doc_bytes), file=sys.stderr)

    def flush():
        encoded = tokenizer.encode_batch([doc for _, _, doc in batch])
        flat = {"train": [], "val": []}
        for (i, label, _), ids in zip(batch, encoded):
            split = "val" if scan.is_val[i] else "train"
            flat[split].extend(ids)
            flat[split].append(tokenizer.eot_id)
            c = counts.setdefault(label, _FileCounts())
            c.documents[split] += 1
            c.tokens[split] += len(ids) + 1
            c.bytes[split] += int(scan.doc_bytes[i])
        for split in SPLITS:
            if flat[split]:
                np.asarray(flat[split], dtype=dtype).tofile(outputs[split])
        bar.update(sum(int(scan.doc_bytes[i]) for i, _, _ in batch))
        batch.clear()

    try:
        for item in _iter_scanned(scan, domain, txt_doc_chars):
            batch.append(item)
            batch_chars += len(item[2])
            if batch_chars >= _ENCODE_BATCH_CHARS or len(batch) >= _ENCODE_BATCH_DOCS:
                flush()
                batch_chars = 0
        if batch:
            flush()
    finally:
        bar.close()
        for f in outputs.values():
            f.close()
    return counts


def _build_meta(scans, file_counts, skips, tokenizer, dtype, tokenizer_path, vocab_size, val_fraction,
                seed, txt_doc_chars, recipe) -> dict:
    totals = {key: {d: {s: 0 for s in SPLITS} for d in DOMAINS} for key in ("documents", "tokens", "bytes")}
    files = []
    for domain in DOMAINS:
        for label, c in file_counts[domain].items():
            files.append({"domain": domain, "path": label, "documents": c.documents, "tokens": c.tokens,
                          "bytes": c.bytes})
            for key in totals:
                for s in SPLITS:
                    totals[key][domain][s] += getattr(c, key)[s]
    sources = []
    for domain in DOMAINS:
        scan = scans[domain]
        for source, st in zip(scan.sources, scan.source_stats):
            sources.append({"domain": domain, "path": source.name,
                            "kind": "file" if source.path.is_file() else "directory",
                            "files": st.files, "skipped_files": st.skipped_files,
                            "ignored_files": st.ignored_files, "documents": st.documents})
    meta = {
        "format": META_FORMAT,
        "version": META_VERSION,
        "vocab_size": tokenizer.vocab_size,
        "dtype": dtype.name,
        "eot_id": tokenizer.eot_id,
        "tokenizer": {"file": TOKENIZER_FILE, "sha256": tokenizer.sha256,
                      "source": "trained" if tokenizer_path is None else str(tokenizer_path),
                      "requested_vocab_size": vocab_size if tokenizer_path is None else None},
        "val_fraction": val_fraction,
        "seed": seed,
        "txt_doc_chars": txt_doc_chars,
        "outputs": {bin_name(d, s): totals["tokens"][d][s] for d in DOMAINS for s in SPLITS},
        "tokens": totals["tokens"],
        "documents": totals["documents"],
        "bytes": totals["bytes"],
        "sources": sources,
        "files": files,
        "skips": skips.to_dict(),
    }
    if recipe is not None:
        meta["recipe"] = recipe
    return meta


def format_summary(meta: dict, out_dir) -> str:
    """The table printed at the end of prepare_data."""
    rows = [f"{'domain':<7}{'split':<7}{'documents':>11}{'tokens':>14}{'bytes/token':>13}"]
    for d in DOMAINS:
        for s in SPLITS:
            tokens, docs, nbytes = meta["tokens"][d][s], meta["documents"][d][s], meta["bytes"][d][s]
            bpt = f"{nbytes / tokens:.2f}" if tokens else "-"
            rows.append(f"{d:<7}{s:<7}{docs:>11,}{tokens:>14,}{bpt:>13}")
    for d in DOMAINS:
        srcs = [s for s in meta["sources"] if s["domain"] == d]
        if srcs:
            rows.append(f"{d} files: {sum(s['files'] for s in srcs)} read, "
                        f"{sum(s['skipped_files'] for s in srcs)} skipped, "
                        f"{sum(s['ignored_files'] for s in srcs)} ignored (other extensions)")
    sk = meta["skips"]
    if sk["count"]:
        reasons = ", ".join(f"{n} {r}" for r, n in sk["by_reason"].items())
        first = sk["examples"][0]
        where = f"{first['file']}" + (f" line {first['line']}" if "line" in first else "")
        rows.append(f"skipped {sk['count']}: {reasons} (first: {where}; all examples in meta.json)")
    for d in DOMAINS:
        if meta["documents"][d]["train"] and not meta["documents"][d]["val"] and meta["val_fraction"] > 0:
            rows.append(f"note: {d} has a single document, so no validation split")
    requested = meta["tokenizer"].get("requested_vocab_size")
    if requested and meta["vocab_size"] < requested:
        rows.append(f"note: the corpus supported only {meta['vocab_size']} of the {requested} tokens asked for; "
                    "models with a larger vocab_size can still use this data")
    rows.append(f"vocab_size {meta['vocab_size']} ({meta['dtype']}), tokenizer sha256 "
                f"{meta['tokenizer']['sha256'][:12]}, written to {out_dir}")
    return "\n".join(rows)
