"""Records from the Hugging Face `datasets` library: hub datasets and local dataset files.

  hf:NAME[:CONFIG][:SPLIT]   a hub dataset (split "train" unless given), or a local path: a file or
                             directory of parquet / arrow / json(l) / csv files, or a directory
                             written by `Dataset.save_to_disk`
  FILE.csv / .json / .arrow  (and .tsv) inside --text/--code sources: read through the same library

Everything is read with `load_dataset(..., streaming=True)`, the library's standard call, so a hub
dataset is never downloaded whole and memory stays small. prepare_data streams a source once per
pass: to scan it, to train the tokenizer (its first 200M characters; not with --tokenizer), and to
encode it; with --max_tokens N each pass stops after about 8N bytes. `datasets` is optional: without it these
sources fail with one line saying how to install it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from mm_rec.utils.errors import UserError

HF_PREFIX = "hf:"
# Local files the library reads, by extension -> its packaged builder.
BUILDERS = {".parquet": "parquet", ".arrow": "arrow", ".jsonl": "json", ".json": "json", ".csv": "csv",
            ".tsv": "csv"}
INSTALL_HINT = 'pip install "mm-rec[hf]"'


@dataclass(frozen=True)
class HFSpec:
    name: str           # hub id or local path
    config: str | None
    split: str

    def __str__(self) -> str:  # as the user would write it
        parts = [self.name]
        if self.config or self.split != "train":
            parts.append(self.config or "")
        if self.split != "train":
            parts.append(self.split)
        return HF_PREFIX + ":".join(parts)


def parse_hf_spec(spec: str) -> HFSpec:
    """'hf:NAME[:CONFIG][:SPLIT]' -> HFSpec (empty CONFIG allowed: 'hf:NAME::test')."""
    parts = spec[len(HF_PREFIX):].split(":")
    if not parts[0] or len(parts) > 3:
        raise UserError(f"{spec!r} is not a dataset: write hf:NAME, hf:NAME:CONFIG or hf:NAME:CONFIG:SPLIT "
                        "(NAME is a hub id or a local path without ':')")
    config = parts[1] if len(parts) > 1 and parts[1] else None
    split = parts[2] if len(parts) > 2 and parts[2] else "train"
    return HFSpec(parts[0], config, split)


def _datasets(what: str):
    try:
        import datasets
    except ImportError:
        raise UserError(f"{what} needs the Hugging Face datasets library: {INSTALL_HINT}") from None
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    try:  # the hub client logs every retry; the one-line error says it all
        import huggingface_hub.utils.logging as hub_logging
        hub_logging.set_verbosity_error()
    except ImportError:
        pass
    return datasets


def _stream(spec: HFSpec):
    """The streaming dataset for `spec`: local paths through the packaged builders, else the hub."""
    datasets = _datasets(str(spec))
    path = Path(spec.name)
    if path.is_file():
        builder = BUILDERS.get(_extension(path))
        if builder is None:
            raise UserError(f"{spec}: {path.name} is not a dataset file ({', '.join(sorted(BUILDERS))})")
        return _load(datasets, spec, builder, data_files=[str(path)], split="train")
    if path.is_dir() and (path / "state.json").is_file():  # Dataset.save_to_disk: its arrow shards in order
        try:
            shards = [str(path / f["filename"]) for f in json.loads((path / "state.json").read_text())["_data_files"]]
        except (OSError, ValueError, KeyError, TypeError):
            raise UserError(f"{spec}: {path}/state.json is not a save_to_disk state file") from None
        return _load(datasets, spec, "arrow", data_files=shards, split="train")
    if path.is_dir():
        return _load(datasets, spec, str(path), split=spec.split)
    return _load(datasets, spec, spec.name, name=spec.config, split=spec.split)


def _load(datasets, spec, *args, **kwargs):
    try:
        return datasets.load_dataset(*args, streaming=True, **kwargs)
    except Exception as e:  # hub unreachable, unknown dataset or config, bad files: one line each
        raise UserError(f"cannot open {spec}: {_first_line(e)}") from None


def iter_records(spec: HFSpec | Path) -> Iterator[dict]:
    """The rows of a dataset spec, or of one local dataset file (read as `hf:FILE` would be)."""
    if isinstance(spec, Path):
        spec = HFSpec(str(spec), None, "train")
    stream = _stream(spec)
    it = iter(stream)
    while True:
        try:
            row = next(it)
        except StopIteration:
            return
        except UserError:
            raise
        except Exception as e:  # a corrupt shard, a dropped connection
            raise UserError(f"error while reading {spec}: {_first_line(e)}") from None
        yield row


def _extension(path: Path) -> str:
    return path.suffix.lower()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__
