"""Turn user-given sources (files and directories) into documents.

A source is a file or a directory. Formats, by extension (a trailing .xz or .gz is decompressed):
- plain files (.txt, .md, .rst for text; source-code extensions for code):
  text: cut at blank lines into documents of at least `txt_doc_chars` characters (whole
  paragraphs; 0 makes every paragraph a document), so that one long book still gives a
  validation split; code: one document per file, verbatim.
- .jsonl: one document per line, from its "text", else "content", else "code" field (or the
  field given with --text_field / --code_field); read line by line, so any size is fine.
- .parquet (needs pyarrow): one document per row of that column.
- .csv, .json, .arrow, and `hf:NAME[:CONFIG][:SPLIT]` sources (hub datasets, or local dataset
  files and directories): one document per row, read through the `datasets` library (hf.py).

Bad input is reported, never a traceback: inside a directory an empty, binary, non-UTF-8 or
unreadable file is a counted skip; a file the user named explicitly is an error. A jsonl line or
parquet row without a usable field is a counted skip with its line/row number. A source that
yields no document at all is an error.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import lzma
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from mm_rec.data.hf import BUILDERS, HF_PREFIX, HFSpec, iter_records, parse_hf_spec
from mm_rec.utils.errors import UserError

TEXT_EXTENSIONS = (".txt", ".md", ".rst")
CODE_EXTENSIONS = (
    ".py", ".pyi", ".pyx", ".c", ".h", ".cc", ".cpp", ".cxx", ".hpp", ".hh", ".cu", ".cuh",
    ".java", ".kt", ".scala", ".go", ".rs", ".js", ".mjs", ".ts", ".tsx", ".jsx", ".rb", ".php",
    ".pl", ".pm", ".lua", ".jl", ".r", ".swift", ".m", ".mm", ".cs", ".fs", ".hs", ".ml", ".sh",
    ".bash", ".zsh", ".ps1", ".sql", ".asm", ".s", ".f90", ".vim", ".el", ".clj", ".ex", ".exs",
    ".erl", ".dart", ".zig", ".nim",
)
RECORD_EXTENSIONS = (".jsonl", ".parquet", ".json", ".csv", ".arrow")
# Inside a directory only these record files are read: a .json or .csv there is more often a
# config or a table than a dataset (name such files, or use hf:DIR, to read them as records).
DIRECTORY_RECORD_EXTENSIONS = (".jsonl", ".parquet")
COMPRESSION_SUFFIXES = (".xz", ".gz")
RECORD_FIELDS = ("text", "content")  # tried in this order unless a field is given...
DOMAIN_RECORD_FIELDS = {"text": RECORD_FIELDS, "code": RECORD_FIELDS + ("code",)}  # ...per domain
DEFAULT_TXT_DOC_CHARS = 32_000
# Never descended into when walking a directory source (hidden directories are skipped too).
ALWAYS_SKIPPED_DIRS = frozenset({"__pycache__", "node_modules"})
DOMAIN_EXTENSIONS = {"text": TEXT_EXTENSIONS, "code": CODE_EXTENSIONS}
_MAX_SKIP_EXAMPLES = 100

# A line break followed by one or more blank (whitespace-only) lines.
_PARAGRAPH_BREAK = re.compile(r"\n(?:[ \t\r\f\v]*\n)+")


@dataclass(frozen=True)
class Source:
    """A file or a directory of documents.

    exclude_dirs: directory names skipped at any depth of a directory source.
    max_bytes: cap on what is read: whole files from a directory (a sample spread over the tree,
      chosen by a hash of each relative path, so the cap is deterministic), or a prefix ending at
      a line break of a single file.
    label: how meta.json names it (defaults to the path).
    """
    path: Path
    exclude_dirs: tuple[str, ...] = ()
    max_bytes: int | None = None
    label: str | None = None
    fields: tuple[str, ...] = RECORD_FIELDS  # the record field(s) holding a document
    hf: HFSpec | None = None                 # an hf:... dataset instead of a file or directory
    extensions: tuple[str, ...] | None = None  # only these file types from a directory (default: the domain's)

    @property
    def name(self) -> str:
        return self.label or str(self.path)


def as_source(src: "str | os.PathLike | Source", field: str | None = None, domain: str = "text") -> Source:
    """A Source for a path, an 'hf:NAME[:CONFIG][:SPLIT]' spec, or a Source as is. Records take
    their document from `field`, or else from the domain's usual fields."""
    if isinstance(src, Source):
        return src
    fields = (field,) if field else DOMAIN_RECORD_FIELDS[domain]
    if isinstance(src, str) and src.startswith(HF_PREFIX):
        spec = parse_hf_spec(src)
        return Source(Path(spec.name), label=src, fields=fields, hf=spec)
    return Source(Path(src), fields=fields)


@dataclass
class SkipLog:
    """Counted skips: totals by reason and the first examples, for meta.json and the summary."""
    count: int = 0
    by_reason: Counter = field(default_factory=Counter)
    examples: list = field(default_factory=list)

    def add(self, file: str, reason: str, line: int | None = None) -> None:
        self.count += 1
        self.by_reason[reason] += 1
        if len(self.examples) < _MAX_SKIP_EXAMPLES:
            entry = {"file": file, "reason": reason}
            if line is not None:
                entry["line"] = line
            self.examples.append(entry)

    def to_dict(self) -> dict:
        return {"count": self.count, "by_reason": dict(sorted(self.by_reason.items())),
                "examples": self.examples}


@dataclass
class SourceStats:
    """What a source contributed: files read, skipped, and ignored (other extensions)."""
    files: int = 0
    skipped_files: int = 0
    ignored_files: int = 0
    documents: int = 0


@dataclass(frozen=True)
class InputFile:
    path: Path
    label: str
    explicit: bool  # named by the user: a bad file is an error, not a skip
    max_bytes: int | None = None
    fields: tuple[str, ...] = RECORD_FIELDS
    hf: HFSpec | None = None


def list_input_files(source: Source, domain: str, stats: SourceStats | None = None) -> list[InputFile]:
    """The files of `source` for `domain`, in a deterministic (sorted) order."""
    path = source.path
    if source.hf is not None:
        return [InputFile(path, source.name, explicit=True, fields=source.fields, hf=source.hf)]
    if path.is_file():
        return [InputFile(path, source.name, explicit=True, max_bytes=source.max_bytes, fields=source.fields)]
    if not path.exists():
        raise UserError(f"{domain} source {path} does not exist; give an existing file or directory")
    if not path.is_dir():
        raise UserError(f"{domain} source {path} is neither a file nor a directory")

    wanted = source.extensions or DOMAIN_EXTENSIONS[domain] + DIRECTORY_RECORD_EXTENSIONS
    skip_dirs = ALWAYS_SKIPPED_DIRS | set(source.exclude_dirs)
    found: list[tuple[str, Path, int]] = []
    ignored = 0
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in skip_dirs)
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            full = Path(dirpath) / name
            if _format_extension(full) in wanted and full.is_file():
                found.append((full.relative_to(path).as_posix(), full, full.stat().st_size))
            else:
                ignored += 1
    if stats is not None:
        stats.ignored_files += ignored
    if not found:
        exts = " ".join(wanted)
        raise UserError(f"{domain} source directory {path} has no {domain} files ({exts}, optionally .xz/.gz); "
                        "point at a directory with such files")
    if source.max_bytes is not None:
        found = _sample_to_cap(found, source.max_bytes)
    found.sort()
    return [InputFile(full, f"{source.name}/{rel}", explicit=False, fields=source.fields) for rel, full, _ in found]


def _sample_to_cap(found: list[tuple[str, Path, int]], max_bytes: int) -> list[tuple[str, Path, int]]:
    """Whole files, in an order fixed by a hash of their paths, until `max_bytes` is reached.
    Hash order spreads the sample over the whole tree instead of taking the first directories."""
    by_hash = sorted(found, key=lambda f: hashlib.blake2b(f[0].encode(), digest_size=8).digest())
    kept, total = [], 0
    for item in by_hash:
        if total + item[2] <= max_bytes:
            kept.append(item)
            total += item[2]
    return kept


def _format_extension(path: Path) -> str:
    """The extension that decides the format, under any .xz/.gz: 'a.txt.xz' -> '.txt'."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSION_SUFFIXES:
        suffixes = suffixes[:-1]
    return suffixes[-1] if suffixes else ""


class _BadFile(Exception):
    """A file that cannot be used at all; becomes a skip or a UserError."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason)
        self.reason, self.detail = reason, detail


def _open_binary(path: Path):
    suffix = path.suffix.lower()
    if suffix == ".xz":
        return lzma.open(path, "rb")
    if suffix == ".gz":
        return gzip.open(path, "rb")
    return open(path, "rb")


def _read_bytes(path: Path, max_bytes: int | None) -> bytes:
    try:
        with _open_binary(path) as f:
            data = f.read() if max_bytes is None else f.read(max_bytes)
    except (OSError, EOFError, lzma.LZMAError) as e:
        raise _BadFile("unreadable", f"{type(e).__name__}: {e}") from None
    if max_bytes is not None and len(data) == max_bytes:
        cut = data.rfind(b"\n")  # end at a line break, never inside a UTF-8 character
        data = data[: cut + 1] if cut >= 0 else b""
    return data


def _decode(data: bytes) -> str:
    if b"\x00" in data:
        raise _BadFile("binary", "contains NUL bytes")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise _BadFile("invalid UTF-8", f"at byte {e.start}") from None


def split_paragraph_documents(text: str, min_chars: int) -> Iterator[str]:
    """Cut prose at blank lines into documents of at least `min_chars` characters."""
    start = 0
    for m in _PARAGRAPH_BREAK.finditer(text):
        if m.start() - start >= min_chars:
            yield from _nonblank(text[start:m.start()])
            start = m.end()
    yield from _nonblank(text[start:])


def _nonblank(doc: str) -> Iterator[str]:
    doc = doc.rstrip().lstrip("\r\n")
    if doc.strip():
        yield doc


def iter_documents(source: Source, domain: str, txt_doc_chars: int = DEFAULT_TXT_DOC_CHARS,
                   skips: SkipLog | None = None, stats: SourceStats | None = None,
                   files: list[InputFile] | None = None) -> Iterator[tuple[str, str]]:
    """Yield (file label, document text) for every document of `source`, in a fixed order.

    With `skips`, bad files and records are counted there; explicit bad files raise UserError.
    """
    skips = skips if skips is not None else SkipLog()
    stats = stats if stats is not None else SourceStats()
    files = files if files is not None else list_input_files(source, domain, stats)
    docs_before = stats.documents
    for f in files:
        n_before = stats.documents
        try:
            for doc in _iter_file_documents(f, domain, txt_doc_chars, skips):
                stats.documents += 1
                yield f.label, doc
        except _BadFile as bad:
            if f.explicit:
                detail = f" ({bad.detail})" if bad.detail else ""
                raise UserError(f"{domain} source {f.label} is {_article(bad.reason)}{detail}; "
                                "give a UTF-8 text file with content or remove it") from None
            skips.add(f.label, bad.reason)
            stats.skipped_files += 1
            continue
        stats.files += 1
        if f.explicit and stats.documents == n_before:
            raise UserError(f"{domain} source {f.label} has no usable documents "
                            f"({_skip_summary(skips, f.label)}); fix the file or remove it")
    if stats.documents == docs_before:
        raise UserError(f"{domain} source {source.name} has no usable documents "
                        f"({stats.skipped_files} files skipped: {_skip_summary(skips)}); fix or remove it")


def _article(reason: str) -> str:
    return {"empty": "empty", "binary": "a binary file", "invalid UTF-8": "not valid UTF-8",
            "unreadable": "unreadable"}.get(reason, reason)


def _skip_summary(skips: SkipLog, file: str | None = None) -> str:
    if file is not None:
        reasons = Counter(e["reason"] for e in skips.examples if e["file"] == file)
    else:
        reasons = skips.by_reason
    return ", ".join(f"{n} {r}" for r, n in sorted(reasons.items())) or "nothing usable"


def _iter_file_documents(f: InputFile, domain: str, txt_doc_chars: int, skips: SkipLog) -> Iterator[str]:
    ext = _format_extension(f.path)
    if f.hf is not None or (ext in BUILDERS and ext not in (".parquet", ".jsonl")):
        yield from _iter_dataset_rows(f, skips)
        return
    if ext == ".parquet":
        yield from _iter_parquet(f, skips)
        return
    if ext == ".jsonl":
        yield from _iter_jsonl(f, skips)
        return
    data = _read_bytes(f.path, f.max_bytes)
    if not data.strip():
        raise _BadFile("empty")
    text = _decode(data)
    del data  # a large file is held once, as text
    if not text.strip():
        raise _BadFile("empty")
    if domain == "code":
        yield text  # verbatim: indentation and blank lines are part of the code
    else:
        yield from split_paragraph_documents(text, txt_doc_chars)


def _iter_jsonl(f: InputFile, skips: SkipLog) -> Iterator[str]:
    """One document per line, read line by line (a file of any size), up to f.max_bytes."""
    seen_any, used = False, 0
    try:
        with _open_binary(f.path) as fh:
            for lineno, raw in enumerate(fh, start=1):
                used += len(raw)
                if f.max_bytes is not None and used > f.max_bytes:
                    break
                if not raw.strip():
                    continue
                if b"\x00" in raw:
                    raise _BadFile("binary", f"NUL bytes on line {lineno}")
                seen_any = True
                try:
                    record = json.loads(raw.decode("utf-8-sig" if lineno == 1 else "utf-8"))
                except UnicodeDecodeError:
                    skips.add(f.label, "invalid UTF-8", lineno)
                    continue
                except ValueError:
                    skips.add(f.label, "invalid JSON", lineno)
                    continue
                doc = _record_field(record, f.fields)
                if isinstance(doc, _Missing):
                    skips.add(f.label, doc.reason, lineno)
                else:
                    yield doc
    except (OSError, EOFError, lzma.LZMAError) as e:
        raise _BadFile("unreadable", f"{type(e).__name__}: {e}") from None
    if not seen_any:
        raise _BadFile("empty")


def _iter_dataset_rows(f: InputFile, skips: SkipLog) -> Iterator[str]:
    """Rows of an hf:... source or a local dataset file, through the datasets library."""
    for row_number, record in enumerate(iter_records(f.hf if f.hf is not None else f.path), start=1):
        doc = _record_field(record, f.fields)
        if isinstance(doc, _Missing):
            skips.add(f.label, doc.reason, row_number)
        else:
            yield doc


class _Missing:
    def __init__(self, reason: str):
        self.reason = reason


def _record_field(record, fields: tuple[str, ...] = RECORD_FIELDS) -> "str | _Missing":
    if not isinstance(record, dict):
        return _Missing("not a JSON object")
    for name in fields:
        if name in record:
            value = record[name]
            if not isinstance(value, str):
                return _Missing(f"'{name}' is not a string")
            if not value.strip():
                return _Missing("empty")
            return value
    return _Missing(f"no {' or '.join(repr(n) for n in fields)} field")


def _iter_parquet(f: InputFile, skips: SkipLog) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(f"{f.label} is a parquet file, which needs pyarrow: pip install pyarrow") from None
    try:
        pf = pq.ParquetFile(f.path)
    except Exception as e:  # pyarrow raises its own error types for corrupt files
        raise _BadFile("unreadable", f"not a parquet file: {type(e).__name__}") from None
    column = next((c for c in f.fields if c in pf.schema_arrow.names), None)
    if column is None:
        raise _BadFile(f"no {' or '.join(repr(n) for n in f.fields)} column")
    row = 0
    for batch in pf.iter_batches(columns=[column], batch_size=1024):
        for value in batch.column(0).to_pylist():
            row += 1
            doc = _record_field({column: value}, (column,)) if value is not None else _Missing("empty")
            if isinstance(doc, _Missing):
                skips.add(f.label, doc.reason, row)
            else:
                yield doc
