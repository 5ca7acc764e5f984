"""prepare_data: sources -> tokenizer.json, meta.json and four token memmaps.

Output directory layout (all deterministic: the same inputs give byte-identical files):
  tokenizer.json                  the tokenizer the ids belong to
  text_train.bin, text_val.bin    token ids, raw little-endian uint16 (vocab < 65536) or uint32,
  code_train.bin, code_val.bin    documents concatenated, each followed by <|endoftext|>; any size
                                  (offsets are 64-bit everywhere)
  meta.json                       vocab size, dtype, tokenizer hash, counts per domain, split and
                                  input file, sources, skips, dropped duplicates; written last,
                                  atomically: a directory without it is not a finished output

The work is three passes over the sources, so memory stays bounded however large the corpus
(8 bytes per document for the duplicate check, the largest single document, and one encoding
batch of a few MB):
1. scan: read every document, count it, and hash it. Exact duplicates (same text, at least
   DEDUPE_MIN_BYTES long) are dropped and counted. The validation split is chosen from a seeded
   hash of each document: the lowest until they hold about val_fraction of the domain's bytes;
   a domain of one document is split by a contiguous token range at its end instead;
2. train the tokenizer on the training documents (unless one is given);
3. encode the documents in batches (the tokenizer encodes a batch on every core; long documents
   are cut into pieces of at most 256K characters where whitespace begins, which gives the same
   ids) and append them to the train or val file.
Everything is written into a temporary directory `.prepare-tmp-PID` inside the output, removed on
any exit (error, Ctrl-C, SIGTERM; one left by a killed run is removed by the next run).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from tqdm import tqdm

from mm_rec.data.sources import (DEFAULT_TXT_DOC_CHARS, SkipLog, Source, SourceStats, as_source,
                                 iter_documents, list_input_files)
from mm_rec.data.tokenizer import (MAX_PIECE_CHARS, Tokenizer, split_for_encoding, train_tokenizer,
                                   training_pieces)
from mm_rec.utils.errors import UserError
from mm_rec.utils.fileio import atomic_write_text, check_writable_dir, disk_error

DOMAINS = ("text", "code")
SPLITS = ("train", "val")
META_FORMAT = "mm_rec.prepared_data"
META_VERSION = 1
META_FILE = "meta.json"
TOKENIZER_FILE = "tokenizer.json"
# The tokenizer learns its merges from at most this many characters of training text per domain.
DEFAULT_TOKENIZER_TRAIN_CHARS = 200_000_000
# Text handed to encode_batch at a time, split over every core: a piece per core at least, and
# small enough that the tokenizer's ~180 bytes per token stay a few hundred MB at most.
_ENCODE_BATCH_CHARS = min(4 << 20, max(1 << 20, (os.cpu_count() or 1) * MAX_PIECE_CHARS))
_ENCODE_BATCH_PIECES = 1024     # ...and by count
_TMP_PREFIX = ".prepare-tmp-"
# With --max_tokens, the scan stops after this many bytes per wanted token: a 32K byte-level BPE
# gives about 3-5 bytes per token on English and code, so 8 leaves a wide margin while a hub
# dataset is not streamed much further than needed.
_SCAN_BYTES_PER_TOKEN = 8
_COPY_CHUNK_TOKENS = 1 << 24
# Exact duplicates shorter than this are kept: short texts repeat legitimately (a chapter heading,
# "Amen.", a one-line __init__.py) and cost little; the copies worth dropping (a vendored module, a
# licence, a page crawled twice) are long.
DEDUPE_MIN_BYTES = 256


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
    doc_keys: np.ndarray       # hash(seed, content hash) of each document, for the split
    keep: np.ndarray           # False for an exact duplicate of an earlier document
    complete: bool = True      # False when --max_tokens stopped the scan early
    is_val: np.ndarray | None = None

    @property
    def kept(self) -> int:
        return int(self.keep.sum())

    def duplicates(self) -> dict:
        dup = ~self.keep
        return {"documents": int(dup.sum()), "bytes": int(self.doc_bytes[dup].sum())}


def prepare_data(text_sources: Iterable, code_sources: Iterable, out_dir, tokenizer_path=None,
                 vocab_size: int = 32000, val_fraction: float = 0.01, seed: int = 0, *,
                 txt_doc_chars: int = DEFAULT_TXT_DOC_CHARS,
                 tokenizer_train_chars: int = DEFAULT_TOKENIZER_TRAIN_CHARS,
                 text_field: str | None = None, code_field: str | None = None,
                 max_tokens: int | None = None,
                 recipe: dict | None = None, verbose: bool = True) -> dict:
    """Tokenize text and code sources into `out_dir`; return the meta dict also written as meta.json.

    Sources are paths (files or directories), 'hf:NAME[:CONFIG][:SPLIT]' datasets, or `Source`
    objects. text_field / code_field name the record field holding a document (jsonl, parquet,
    csv, datasets). max_tokens caps each domain's tokens (train + val). With `tokenizer_path` the
    given tokenizer is used (and copied to out_dir); otherwise a byte-level BPE of `vocab_size`
    tokens is trained on the training split. `recipe`, if given, is stored in meta.json as is
    (the default corpus uses it to recognise its own cache).
    """
    out_dir = Path(out_dir)
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"--val_fraction must be in [0, 1), got {val_fraction}")
    if txt_doc_chars < 0:
        raise UserError(f"--txt_doc_chars must be >= 0, got {txt_doc_chars}")
    if max_tokens is not None and max_tokens < 2:
        raise UserError(f"--max_tokens must be >= 2, got {max_tokens}")
    sources = {"text": [as_source(s, text_field, "text") for s in text_sources],
               "code": [as_source(s, code_field, "code") for s in code_sources]}
    if not sources["text"] and not sources["code"]:
        raise UserError("no sources given: pass --text and/or --code files or directories")
    _check_out_dir(out_dir)
    check_writable_dir(out_dir, "--out directory")  # a read-only or full disk: one line, before the long work
    _remove_stale_temporaries(out_dir)
    log = _printer(verbose)

    # Load a given tokenizer first: a bad path should fail before minutes of scanning.
    tokenizer = Tokenizer.load(tokenizer_path) if tokenizer_path is not None else None

    with _cleanup_on_signals():
        skips = SkipLog()
        scans = {}
        for domain in DOMAINS:
            t0 = time.time()
            max_scan = None if max_tokens is None else max_tokens * _SCAN_BYTES_PER_TOKEN
            scan = scans[domain] = _scan_domain(sources[domain], domain, seed, txt_doc_chars, skips, max_scan)
            scan.is_val = np.zeros(len(scan.keep), dtype=bool)
            if scan.kept > 1:
                kept = np.flatnonzero(scan.keep)
                scan.is_val[kept] = choose_validation_documents(scan.doc_keys[kept], scan.doc_bytes[kept],
                                                                val_fraction)
            if sources[domain]:
                dup = scan.duplicates()
                log(f"scanned {domain} ({', '.join(s.name for s in sources[domain])}): "
                    f"{len(scan.doc_bytes):,} documents, {scan.doc_bytes.sum() / 1e6:.1f} MB in {time.time() - t0:.1f} s"
                    + (f"; {dup['documents']:,} exact duplicates ({dup['bytes'] / 1e6:.1f} MB) dropped"
                       if dup["documents"] else ""))

        if tokenizer is None:
            log(f"training a byte-level BPE tokenizer with {vocab_size} tokens on the training documents")
            t0, cpu0 = time.time(), time.process_time()
            texts = _training_texts(scans, txt_doc_chars, tokenizer_train_chars)
            tokenizer = train_tokenizer(texts, vocab_size, show_progress=verbose)
            log(f"trained the tokenizer in {time.time() - t0:.1f} s ({time.process_time() - cpu0:.1f} CPU-seconds)")
        dtype = token_dtype(tokenizer.vocab_size)

        tmp = out_dir / f"{_TMP_PREFIX}{os.getpid()}"
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            tokenizer.save(tmp / TOKENIZER_FILE)  # tmp is the atomic unit: moved into place only when complete
            file_counts, val_split = {}, {}
            for domain in DOMAINS:
                t0, cpu0 = time.time(), time.process_time()
                file_counts[domain], val_split[domain] = _encode_domain(
                    scans[domain], domain, tokenizer, dtype, tmp, txt_doc_chars, val_fraction, max_tokens, verbose)
                tokens = sum(c.tokens["train"] + c.tokens["val"] for c in file_counts[domain].values())
                if tokens:
                    seconds = max(time.time() - t0, 1e-9)
                    cpu = time.process_time() - cpu0  # all threads: on a shared machine, what the work cost
                    log(f"tokenized {domain}: {tokens:,} tokens in {seconds:.1f} s ({tokens / seconds:,.0f} tokens/s; "
                        f"{cpu:.1f} CPU-seconds, {tokens / max(cpu, 1e-9):,.0f} tokens per CPU-second)")
            meta = _build_meta(scans, file_counts, val_split, skips, tokenizer, dtype, tokenizer_path, vocab_size,
                               val_fraction, seed, txt_doc_chars, max_tokens, recipe)
            _move_into_place(tmp, out_dir, meta)
        except OSError as e:
            err = disk_error(e, out_dir, "write the prepared data to")
            if err is None:
                raise
            raise err from None
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


@contextlib.contextmanager
def _cleanup_on_signals():
    """SIGTERM (and SIGHUP) raise SystemExit like Ctrl-C raises KeyboardInterrupt, so the
    `finally` that removes the temporary directory runs on those exits too."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    previous = {}
    for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
        if sig is not None and signal.getsignal(sig) in (signal.SIG_DFL, None):
            previous[sig] = signal.signal(sig, stop)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _check_out_dir(out_dir: Path) -> None:
    """Refuse to write into a directory that holds anything but a previous prepare_data output."""
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir} is a file; give a directory path")
    if out_dir.is_dir():
        foreign = sorted(p.name for p in out_dir.iterdir()
                         if p.name not in OUTPUT_FILES and not p.name.startswith(_TMP_PREFIX)
                         and not (p.name.startswith(".") and p.name.endswith(".tmp")))
        if foreign:
            raise UserError(f"--out {out_dir} already holds other files ({', '.join(foreign[:3])}); "
                            "give a new or empty directory, or a previous prepare_data output")


def _remove_stale_temporaries(out_dir: Path) -> None:
    """Remove the temporary directory of a run that was killed (SIGKILL, power loss)."""
    for p in out_dir.glob(f"{_TMP_PREFIX}*"):
        pid = p.name[len(_TMP_PREFIX):]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _move_into_place(tmp: Path, out_dir: Path, meta: dict) -> None:
    # Every file is complete (and on disk) in tmp before anything in out_dir changes, so a full
    # disk never costs a previous output. meta.json marks a complete directory: drop the old one
    # first and move the new one in last, so an interrupted run never leaves a complete-looking
    # mix of old and new files. Renames in one directory need no space and are atomic.
    atomic_write_text(tmp / META_FILE, json.dumps(meta, indent=2) + "\n", action="write")
    (out_dir / META_FILE).unlink(missing_ok=True)
    for name in OUTPUT_FILES:
        if name != META_FILE:
            os.replace(tmp / name, out_dir / name)
    os.replace(tmp / META_FILE, out_dir / META_FILE)


def _content_hash(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()


def _split_key(seed: int, content_hash: bytes) -> int:
    digest = hashlib.blake2b(content_hash, digest_size=8, key=str(seed).encode()).digest()
    return int.from_bytes(digest, "little")


def _scan_domain(sources: list[Source], domain: str, seed: int, txt_doc_chars: int, skips: SkipLog,
                 max_bytes: int | None = None) -> _DomainScan:
    files, stats, doc_bytes, doc_hashes, doc_keys = [], [], [], [], []
    total, complete = 0, True
    for source in sources:
        if not complete:
            break
        st = SourceStats()
        fl = list_input_files(source, domain, st)
        for _, doc in iter_documents(source, domain, txt_doc_chars, skips=skips, stats=st, files=fl):
            data = doc.encode("utf-8")
            h = hashlib.blake2b(data, digest_size=8).digest()
            doc_bytes.append(len(data))
            doc_hashes.append(int.from_bytes(h, "little"))
            doc_keys.append(_split_key(seed, h))
            total += len(data)
            if max_bytes is not None and total >= max_bytes:
                complete = False  # enough for --max_tokens: the rest is never read
                break
        files.append(fl)
        stats.append(st)
    hashes = np.array(doc_hashes, dtype=np.uint64)
    sizes = np.array(doc_bytes, dtype=np.int64)
    keep = sizes < DEDUPE_MIN_BYTES
    keep[np.unique(hashes, return_index=True)[1]] = True  # the first copy of each text
    return _DomainScan(sources[:len(files)], files, stats, sizes, np.array(doc_keys, dtype=np.uint64), keep, complete)


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
    i, n = 0, len(scan.doc_bytes)
    for source, files in zip(scan.sources, scan.files):
        for label, doc in iter_documents(source, domain, txt_doc_chars, files=files):
            if i >= n:
                if not scan.complete:
                    return
                raise _SourcesChanged()
            yield i, label, doc
            i += 1
    if i != n:
        raise _SourcesChanged()


class _SourcesChanged(UserError):
    def __init__(self):
        super().__init__("the sources changed while prepare_data was reading them; run it again")


def _training_texts(scans: dict, txt_doc_chars: int, max_chars: int) -> Iterator[str]:
    for domain in DOMAINS:
        used = 0
        for i, _, doc in _iter_scanned(scans[domain], domain, txt_doc_chars):
            if scans[domain].is_val[i] or not scans[domain].keep[i]:
                continue  # the tokenizer never sees validation text, nor a duplicate twice
            if used >= max_chars:
                break
            used += len(doc)
            yield from training_pieces(doc)


def _encode_domain(scan: _DomainScan, domain: str, tokenizer: Tokenizer, dtype: np.dtype, out: Path,
                   txt_doc_chars: int, val_fraction: float, max_tokens: int | None,
                   verbose: bool) -> tuple[dict[str, _FileCounts], str]:
    """Encode the kept documents into out/{domain}_{train,val}.bin; return the counts per file
    and how validation was split off ("documents", "token_range" or "none")."""
    counts: dict[str, _FileCounts] = {}
    paths = {split: out / bin_name(domain, split) for split in SPLITS}
    outputs = {split: open(paths[split], "wb") for split in SPLITS}
    batch: list[tuple[int, str, str, bool]] = []  # (document index, file label, piece, last piece of it)
    state = {"chars": 0, "tokens": 0, "full": False}
    bar = tqdm(total=int(scan.doc_bytes[scan.keep].sum()), unit="B", unit_scale=True, desc=f"tokenizing {domain}",
               disable=not verbose or not scan.kept, file=sys.stderr)

    def flush():
        encoded = [np.asarray(ids, dtype=dtype) for ids in tokenizer.encode_batch([piece for _, _, piece, _ in batch])]
        batch_pieces = [(i, label, last) for i, label, _, last in batch]
        batch.clear()  # the text is no longer needed while the ids are written
        flat = {"train": [], "val": []}
        eot = np.asarray([tokenizer.eot_id], dtype=dtype)
        done_bytes = 0
        for (i, label, last), ids in zip(batch_pieces, encoded):
            split = "val" if scan.is_val[i] else "train"
            if max_tokens is not None and state["tokens"] + len(ids) + 1 > max_tokens:
                ids = ids[:max_tokens - state["tokens"] - 1]  # the cap: cut here and end the document
                last, state["full"] = True, True
            flat[split].append(ids)
            c = counts.setdefault(label, _FileCounts())
            c.tokens[split] += len(ids) + last
            state["tokens"] += len(ids) + last
            if last:
                flat[split].append(eot)
                c.documents[split] += 1
                c.bytes[split] += int(scan.doc_bytes[i])
                done_bytes += int(scan.doc_bytes[i])
            if max_tokens is not None and state["tokens"] >= max_tokens:
                state["full"] = True
            if state["full"]:
                break
        for split in SPLITS:
            if flat[split]:
                outputs[split].write(np.concatenate(flat[split]).data)
        bar.update(done_bytes)
        state["chars"] = 0

    try:
        for i, label, doc in _iter_scanned(scan, domain, txt_doc_chars):
            if not scan.keep[i]:
                continue
            for piece, last in _with_last(split_for_encoding(doc)):
                batch.append((i, label, piece, last))
                state["chars"] += len(piece)
                if state["chars"] >= _ENCODE_BATCH_CHARS or len(batch) >= _ENCODE_BATCH_PIECES:
                    flush()
                    if state["full"]:
                        break
            del doc
            if state["full"]:
                break
        if batch and not state["full"]:
            flush()
        for f in outputs.values():
            f.flush()
            os.fsync(f.fileno())
    finally:
        bar.close()
        for f in outputs.values():
            f.close()
    if not scan.kept:
        return counts, "none"
    if scan.kept == 1 and val_fraction > 0:
        _split_token_range(paths, dtype, val_fraction, tokenizer.eot_id, counts)
        return counts, "token_range"
    return counts, "documents" if val_fraction > 0 else "none"


def _with_last(items: Iterator) -> Iterator[tuple[object, bool]]:
    """(item, is_last) for each item, reading one ahead."""
    it = iter(items)
    try:
        current = next(it)
    except StopIteration:
        return
    for following in it:
        yield current, False
        current = following
    yield current, True


def _split_token_range(paths: dict, dtype: np.dtype, val_fraction: float, eot_id: int,
                       counts: dict[str, _FileCounts]) -> None:
    """Split a domain's only document: its last val_fraction of tokens (at least one, and never
    all) become the validation file, and the training part gets its own end-of-text."""
    (label, c), = counts.items()
    n = c.tokens["train"]  # the document's tokens and its end-of-text
    if n < 3:
        return
    k = min(n - 2, max(1, round(val_fraction * (n - 1))))  # tokens of the document moved to validation
    first = n - 1 - k  # tokens [first, n) go to validation: k of the document and its end-of-text
    item = dtype.itemsize
    with open(paths["train"], "r+b") as train, open(paths["val"], "wb") as val:
        for start in range(first, n, _COPY_CHUNK_TOKENS):
            train.seek(start * item)
            val.write(train.read(min(_COPY_CHUNK_TOKENS, n - start) * item))
        train.truncate(first * item)
        train.seek(first * item)
        train.write(np.asarray([eot_id], dtype=dtype).data)
        for f in (train, val):
            f.flush()
            os.fsync(f.fileno())
    moved_bytes = round(c.bytes["train"] * k / (n - 1))
    c.tokens = {"train": first + 1, "val": k + 1}
    c.documents = {"train": 1, "val": 1}
    c.bytes = {"train": c.bytes["train"] - moved_bytes, "val": moved_bytes}


def _build_meta(scans, file_counts, val_split, skips, tokenizer, dtype, tokenizer_path, vocab_size, val_fraction,
                seed, txt_doc_chars, max_tokens, recipe) -> dict:
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
            kind = "dataset" if source.hf is not None else "file" if source.path.is_file() else "directory"
            sources.append({"domain": domain, "path": source.name, "kind": kind,
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
        "duplicates": {d: scans[d].duplicates() for d in DOMAINS},
        "val_split": val_split,
        "max_tokens": max_tokens,
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
        dup = meta.get("duplicates", {}).get(d, {})
        if dup.get("documents"):
            rows.append(f"{d}: dropped {dup['documents']:,} exact duplicate documents ({dup['bytes']:,} bytes)")
        if meta.get("val_split", {}).get(d) == "token_range":
            rows.append(f"note: {d} is a single document: its last {meta['tokens'][d]['val']:,} tokens are the "
                        "validation split")
    requested = meta["tokenizer"].get("requested_vocab_size")
    if requested and meta["vocab_size"] < requested:
        rows.append(f"note: the corpus supported only {meta['vocab_size']} of the {requested} tokens asked for; "
                    "models with a larger vocab_size can still use this data")
    rows.append(f"vocab_size {meta['vocab_size']} ({meta['dtype']}), tokenizer sha256 "
                f"{meta['tokenizer']['sha256'][:12]}, written to {out_dir}")
    return "\n".join(rows)
