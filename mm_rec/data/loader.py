"""Batches of token windows from a prepared data directory.

Training batches are random windows of seq_len + 1 tokens (x = first seq_len, y = last seq_len),
packed across document boundaries and never padded. A batch is a pure function of
(seed, split, kind, step, rank, world_size, batch_size, seq_len): resuming at step N gives
exactly the batches an uninterrupted run would, with no sampler state to save.

Data parallel: the windows of a step are drawn for the whole global batch of world_size *
batch_size rows, exactly as one process with that batch size would draw them, and rank r takes
rows r*batch_size .. (r+1)*batch_size - 1. So N processes with batch B train on the same global
batch as one process with batch N*B (and a checkpoint resumes under another world size with the
same batches). Within a step no window is drawn twice (a repeated start is redrawn), so two
ranks never share a window.

kind "mixed": row i of the global batch is text when its global row number
g = (step * world_size + rank) * batch_size + i is even, code when odd. With an even batch
size every batch is half text (even rows) and half code (odd rows); with batch_size 1 the
domain alternates from step to step (and from rank to rank), so both domains get equal shares.

Evaluation batches (`iter_eval_batches`) are the validation memmap cut into consecutive
non-overlapping windows, always in the same order, so an evaluation loss is reproducible.
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from mm_rec.data.prepare import DOMAINS, META_FILE, META_FORMAT, META_VERSION, SPLITS, TOKENIZER_FILE, bin_name
from mm_rec.data.tokenizer import Tokenizer, check_vocab
from mm_rec.utils.errors import UserError

KINDS = ("mixed", "text", "code")
_VALIDATE_CHUNK = 1 << 24  # tokens per chunk when scanning a memmap for out-of-range ids


# The token types prepare_data writes; anything else in meta.json is refused before numpy sees it
# (a "dtype": "object" memmap would read pointers out of the file and crash the process).
TOKEN_DTYPES = ("uint16", "uint32")


def check_meta(meta, meta_path) -> dict:
    """The fields TokenData uses, each checked for type and range; a bad one is a UserError naming
    the file and the field. Returns {"vocab_size", "eot_id", "dtype", "outputs"}."""
    redo = f"re-run prepare_data for {Path(meta_path).parent}"

    def bad(field: str, why: str) -> UserError:
        return UserError(f"{meta_path}: field {field} {why}; {redo}")

    def integer(value, field: str, low: int, high: int) -> int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise bad(field, f"must be an integer, got {type(value).__name__} {_short(value)}")
        if not low <= value <= high:
            raise bad(field, f"must be in [{low}, {high}], got {value}")
        return value

    if not isinstance(meta, dict) or meta.get("format") != META_FORMAT:
        raise UserError(f"{meta_path} was not written by prepare_data; {redo}")
    for key in ("vocab_size", "eot_id", "dtype", "outputs"):
        if key not in meta:
            raise bad(key, "is missing")
    version = meta.get("version", META_VERSION)
    if not isinstance(version, int) or isinstance(version, bool) or version > META_VERSION:
        raise bad("version", f"must be an integer <= {META_VERSION}, got {_short(version)}")
    if not isinstance(meta["dtype"], str) or meta["dtype"] not in TOKEN_DTYPES:
        raise bad("dtype", f"must be one of {', '.join(TOKEN_DTYPES)}, got {_short(meta['dtype'])}")
    dtype = np.dtype(meta["dtype"])
    vocab_size = integer(meta["vocab_size"], "vocab_size", 1, 1 << (8 * dtype.itemsize))
    eot_id = integer(meta["eot_id"], "eot_id", 0, vocab_size - 1)
    outputs = meta["outputs"]
    if not isinstance(outputs, dict):
        raise bad("outputs", f"must be an object of token counts, got {type(outputs).__name__}")
    counts = {}
    for domain in DOMAINS:
        for split in SPLITS:
            name = bin_name(domain, split)
            if name not in outputs:
                raise bad(f"outputs.{name}", "is missing")
            counts[name] = integer(outputs[name], f"outputs.{name}", 0, (1 << 62) // dtype.itemsize)
    return {"vocab_size": vocab_size, "eot_id": eot_id, "dtype": dtype, "outputs": counts}


def _short(value) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


class TokenData:
    """The four token memmaps of a prepared directory, with their meta.json.

    vocab_size: the model's vocabulary; data whose tokenizer has more tokens is refused.
    """

    def __init__(self, data_dir, vocab_size: int | None = None):
        self.data_dir = Path(data_dir)
        meta_path = self.data_dir / META_FILE
        if not meta_path.is_file():
            raise UserError(f"{self.data_dir} is not a prepared data directory (no {META_FILE}); create it with "
                            "python -m mm_rec.scripts.prepare_data --text ... --code ... --out DIR")
        try:
            self.meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError):
            raise UserError(f"{meta_path} is not valid JSON; re-run prepare_data for {self.data_dir}") from None
        except OSError as e:
            raise UserError(f"cannot read {meta_path}: {e.strerror or e}") from None
        fields = check_meta(self.meta, meta_path)
        self.vocab_size: int = fields["vocab_size"]
        self.eot_id: int = fields["eot_id"]
        self.dtype = fields["dtype"]
        if vocab_size is not None:
            check_vocab(self.vocab_size, vocab_size, what=f"the tokenizer of {self.data_dir}")
        self._lengths = {}
        for domain in DOMAINS:
            for split in SPLITS:
                path = self.data_dir / bin_name(domain, split)
                expected = fields["outputs"][bin_name(domain, split)]
                if not path.is_file():
                    raise UserError(f"{path} is missing; re-run prepare_data for {self.data_dir}")
                size = path.stat().st_size
                if size != expected * self.dtype.itemsize:
                    raise UserError(f"{path} has {size} bytes but meta.json field outputs.{bin_name(domain, split)} "
                                    f"says {expected} {self.dtype.name} tokens ({expected * self.dtype.itemsize} "
                                    "bytes); the directory is damaged: re-run prepare_data")
                self._lengths[(domain, split)] = expected
        self._maps: dict = {}

    # The memmaps are opened lazily and not pickled, so a DataLoader worker started with "spawn"
    # reopens them instead of receiving a copy of the data.
    def __getstate__(self):
        state = dict(self.__dict__)
        state["_maps"] = {}
        return state

    @property
    def tokenizer_path(self) -> Path:
        return self.data_dir / TOKENIZER_FILE

    def tokenizer(self) -> Tokenizer:
        return Tokenizer.load(self.tokenizer_path)

    def num_tokens(self, domain: str, split: str = "train") -> int:
        return self._lengths[(_check_domain(domain), _check_split(split))]

    def tokens(self, domain: str, split: str = "train") -> np.ndarray:
        """The read-only memmap of one domain and split (an empty array when it has no tokens)."""
        key = (_check_domain(domain), _check_split(split))
        if key not in self._maps:
            n = self._lengths[key]
            if n == 0:  # numpy cannot map an empty file
                self._maps[key] = np.zeros(0, dtype=self.dtype)
            else:
                self._maps[key] = np.memmap(self.data_dir / bin_name(*key), dtype=self.dtype, mode="r", shape=(n,))
        return self._maps[key]

    def validate_ids(self) -> None:
        """Raise UserError if any token id is >= vocab_size (a file from another tokenizer or damaged)."""
        for domain in DOMAINS:
            for split in SPLITS:
                arr = self.tokens(domain, split)
                for start in range(0, len(arr), _VALIDATE_CHUNK):
                    chunk = arr[start:start + _VALIDATE_CHUNK]
                    top = int(chunk.max())
                    if top >= self.vocab_size:
                        where = start + int(np.argmax(chunk >= self.vocab_size))
                        raise UserError(f"{bin_name(domain, split)} holds token id {top} >= vocab_size "
                                        f"{self.vocab_size} (first at position {where}); the file does not "
                                        f"match its tokenizer: re-run prepare_data for {self.data_dir}")

    def _check_ids(self, block: np.ndarray, domain: str, split: str, offset: int) -> None:
        """Every window read is checked (cheap next to the model), so a damaged file is one line
        in any command, not an index error in the embedding."""
        if block.size and int(block.max()) >= self.vocab_size:
            raise UserError(f"{bin_name(domain, split)} in {self.data_dir} holds token id {int(block.max())} >= "
                            f"meta.json field vocab_size {self.vocab_size} (near token {offset}); the file does "
                            "not match its tokenizer: re-run prepare_data")

    # --- training batches ------------------------------------------------------------------
    def sample_windows(self, kind: str, step: int, batch_size: int, seq_len: int, seed: int = 0,
                       rank: int = 0, world_size: int = 1, split: str = "train") -> list[tuple[str, int]]:
        """(domain, start) of each row's window: the sampling behind `get_batch`."""
        _check_batch_args(kind, step, batch_size, seq_len, rank, world_size)
        first = rank * batch_size  # this rank's rows of the global batch
        return self._global_windows(kind, step, batch_size * world_size, seq_len, seed, split)[first:first + batch_size]

    def _global_windows(self, kind: str, step: int, total: int, seq_len: int, seed: int,
                        split: str) -> list[tuple[str, int]]:
        """The windows of all `total` rows of a step's global batch (independent of the world size)."""
        domains = domains_for_rows(kind, step, total)
        rng = _rng(seed, split, kind, step)
        starts = [0] * total
        for domain in DOMAINS:  # fixed order: draws do not depend on dict or set order
            rows = [i for i, d in enumerate(domains) if d == domain]
            if not rows:
                continue
            n_starts = self._num_starts(domain, split, seq_len)
            drawn = rng.integers(0, n_starts, size=len(rows)).tolist()
            if len(set(drawn)) < len(drawn) and n_starts >= len(drawn):
                seen: set[int] = set()  # redraw repeats: no two rows (so no two ranks) share a window
                for j, s in enumerate(drawn):
                    while s in seen:
                        s = int(rng.integers(0, n_starts))
                    seen.add(s)
                    drawn[j] = s
            for i, s in zip(rows, drawn):
                starts[i] = s
        return list(zip(domains, starts))

    def get_batch(self, kind: str, step: int, batch_size: int, seq_len: int, seed: int = 0,
                  rank: int = 0, world_size: int = 1, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y): int64 CPU tensors [batch_size, seq_len], y = x shifted left by one token."""
        windows = self.sample_windows(kind, step, batch_size, seq_len, seed, rank, world_size, split)
        block = np.empty((batch_size, seq_len + 1), dtype=np.int64)
        for row, (domain, start) in enumerate(windows):
            block[row] = self.tokens(domain, split)[start:start + seq_len + 1]
            self._check_ids(block[row], domain, split, start)
        block = torch.from_numpy(block)
        return block[:, :-1].contiguous(), block[:, 1:].contiguous()

    def _num_starts(self, domain: str, split: str, seq_len: int) -> int:
        """How many windows of seq_len + 1 tokens the domain's memmap holds (window starts 0 .. n - seq_len - 1)."""
        n = self.num_tokens(domain, split)
        if n < seq_len + 1:
            raise UserError(f"{domain} {split} data in {self.data_dir} has {n} tokens, fewer than "
                            f"seq_len + 1 = {seq_len + 1}: use a smaller --seq_len or prepare more {domain} data")
        return n - seq_len

    # --- evaluation batches ----------------------------------------------------------------
    def num_eval_windows(self, domain: str, seq_len: int, split: str = "val") -> int:
        return max(0, (self.num_tokens(domain, split) - 1) // seq_len)

    def iter_eval_batches(self, domain: str, batch_size: int, seq_len: int, max_batches: int | None = None,
                          split: str = "val", rank: int = 0, world_size: int = 1
                          ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Consecutive windows: window k is x = tokens[k*L : k*L+L], y = tokens[k*L+1 : k*L+L+1].
        Batches hold batch_size windows (the last may hold fewer); with world_size > 1, rank r
        gets batches r, r + world_size, ... of the same sequence."""
        _check_domain(domain)
        if batch_size < 1 or seq_len < 1:
            raise UserError(f"batch_size and seq_len must be >= 1 (got {batch_size}, {seq_len})")
        n_windows = self.num_eval_windows(domain, seq_len, split)
        if n_windows == 0:
            raise UserError(f"{domain} {split} data in {self.data_dir} has {self.num_tokens(domain, split)} tokens, "
                            f"fewer than seq_len + 1 = {seq_len + 1}: use a smaller --seq_len, or prepare with a "
                            "larger --val_fraction or more data")
        arr = self.tokens(domain, split)
        n_batches = math.ceil(n_windows / batch_size)
        if max_batches is not None:
            n_batches = min(n_batches, max_batches)
        for b in range(rank, n_batches, world_size):
            first, last = b * batch_size, min((b + 1) * batch_size, n_windows)
            block = np.stack([arr[k * seq_len:k * seq_len + seq_len + 1] for k in range(first, last)]).astype(np.int64)
            self._check_ids(block, domain, split, first * seq_len)
            block = torch.from_numpy(block)
            yield block[:, :-1].contiguous(), block[:, 1:].contiguous()


def domains_for_rows(kind: str, step: int, batch_size: int, rank: int = 0, world_size: int = 1) -> list[str]:
    """The domain of each row of a batch (see the module docstring for "mixed")."""
    if kind not in KINDS:
        raise UserError(f"batch kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if kind != "mixed":
        return [kind] * batch_size
    first = (step * world_size + rank) * batch_size
    return ["text" if (first + i) % 2 == 0 else "code" for i in range(batch_size)]


def _rng(seed: int, split: str, kind: str, step: int) -> np.random.Generator:
    # "/0/1" (rank 0 of 1) ends the key as it did when each rank drew its own windows, so
    # single-process batches are unchanged from that scheme.
    key = f"mm_rec.windows/{seed}/{split}/{kind}/{step}/0/1".encode()
    return np.random.Generator(np.random.PCG64(int.from_bytes(hashlib.blake2b(key, digest_size=16).digest(), "little")))


def _check_domain(domain: str) -> str:
    if domain not in DOMAINS:
        raise UserError(f"domain must be one of {', '.join(DOMAINS)}, got {domain!r}")
    return domain


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise UserError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    return split


def _check_batch_args(kind, step, batch_size, seq_len, rank, world_size) -> None:
    if kind not in KINDS:
        raise UserError(f"batch kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if step < 0 or batch_size < 1 or seq_len < 1:
        raise UserError(f"need step >= 0, batch_size >= 1 and seq_len >= 1 (got {step}, {batch_size}, {seq_len})")
    if world_size < 1 or not 0 <= rank < world_size:
        raise UserError(f"rank must be in [0, world_size) (got rank {rank}, world_size {world_size})")
