"""Byte-level BPE tokenizer: train one, or load tokenizer.json / GPT-2's vocabulary files.

Byte-level BPE maps every UTF-8 byte to a symbol before merging, so any string encodes and
decodes back to itself exactly: newlines, tabs and indentation in code, and non-ASCII prose.
We keep the configuration minimal for that reason: no normalizer, no prefix space, no
post-processor, and the ByteLevel decoder.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from mm_rec.utils.errors import UserError

EOT_TOKEN = "<|endoftext|>"
# Other spellings of end-of-text, accepted when loading a tokenizer.json made elsewhere.
_EOT_ALIASES = (EOT_TOKEN, "<|end_of_text|>", "</s>", "<eos>", "<|eos|>")
# 256 byte symbols plus the end-of-text token.
MIN_VOCAB_SIZE = 257
# GPT-2's files come under two names: HF's (vocab.json, merges.txt) and OpenAI's (encoder.json, vocab.bpe).
_GPT2_FILE_PAIRS = (("vocab.json", "merges.txt"), ("encoder.json", "vocab.bpe"))
# Long documents are encoded in pieces of at most this many characters: the tokenizer holds about
# 180 bytes per token of the text it is handed, so memory must not follow the document's size.
MAX_PIECE_CHARS = 1 << 18
# The BPE trainer's time grows with the length of its words (a merge rewrites every word holding
# the pair) and its memory with their number: a run of more non-space characters than this (a
# base64 blob, a minified line, a hash) is data, not language, and the trainer sees only its start.
MAX_TRAIN_RUN_CHARS = 256
# A place to cut: a non-space character followed by whitespace. GPT-2's pre-tokenizer never
# puts such a pair in one pre-token, so cutting there gives the same ids as not cutting.
_CUT = re.compile(r"\S(?=\s)")
_LONG_RUN = re.compile(r"(?<!\S)\S{%d,}" % (MAX_TRAIN_RUN_CHARS + 1))


class Tokenizer:
    """A `tokenizers.Tokenizer` with the few operations the project needs.

    Special tokens are never parsed out of input text (`encode_special_tokens`): a document
    that happens to contain the string "<|endoftext|>" is encoded as plain text, so only the
    data pipeline decides where documents end.
    """

    def __init__(self, hf_tokenizer: tokenizers.Tokenizer, source: str = "trained"):
        self._tok = hf_tokenizer
        self._tok.encode_special_tokens = True
        self.source = source
        eot = next((t for t in _EOT_ALIASES if self._tok.token_to_id(t) is not None), None)
        if eot is None:
            raise UserError(f"tokenizer from {source} has no end-of-text token ({EOT_TOKEN}); "
                            "add one or train a tokenizer with prepare_data")
        self.eot_token = eot
        self.eot_id: int = self._tok.token_to_id(eot)
        self.vocab_size: int = self._tok.get_vocab_size(with_added_tokens=True)
        self._sha256: str | None = None

    # --- encoding -------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        # Parallel over documents in Rust; results are per document, so order and content are
        # the same as encoding one by one. encode_batch_fast (tokenizers >= 0.20) skips offsets.
        encode = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)
        encodings = encode(list(texts), add_special_tokens=False)
        ids = []
        for k in range(len(encodings)):  # each encoding (~180 bytes a token) freed once its ids are out
            ids.append(encodings[k].ids)
            encodings[k] = None
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    # --- persistence ----------------------------------------------------------------------
    def to_json(self) -> str:
        return self._tok.to_str(pretty=True)

    def save(self, path: str | Path) -> Path:
        """Write tokenizer.json to `path` (a file path, or a directory to put tokenizer.json in)."""
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        path.write_text(self.to_json(), encoding="utf-8")
        return path

    @property
    def sha256(self) -> str:
        """Hash of the canonical JSON (sorted keys, no whitespace), so formatting does not matter."""
        if self._sha256 is None:
            canonical = json.dumps(json.loads(self._tok.to_str()), sort_keys=True,
                                   separators=(",", ":"), ensure_ascii=False)
            self._sha256 = hashlib.sha256(canonical.encode("utf-8")).hexdigest()
        return self._sha256

    @classmethod
    def load(cls, path: str | Path | tuple | list) -> "Tokenizer":
        """Load from a tokenizer.json file, a directory holding one, GPT-2 vocabulary files
        (vocab.json + merges.txt, or encoder.json + vocab.bpe) in a directory, one of those
        vocabulary files (its partner is looked up next to it), or a (vocab, merges) pair."""
        if isinstance(path, (tuple, list)):
            if len(path) != 2:
                raise UserError(f"a tokenizer given as a pair needs (vocab, merges), got {len(path)} paths")
            return _load_gpt2(Path(path[0]), Path(path[1]))
        path = Path(path)
        if path.is_dir():
            if (path / "tokenizer.json").is_file():
                return _load_tokenizer_json(path / "tokenizer.json")
            for vocab, merges in _GPT2_FILE_PAIRS:
                if (path / vocab).is_file() and (path / merges).is_file():
                    return _load_gpt2(path / vocab, path / merges)
            raise UserError(f"{path} has no tokenizer.json, vocab.json+merges.txt or encoder.json+vocab.bpe; "
                            "point --tokenizer at one of those")
        if not path.is_file():
            raise UserError(f"tokenizer {path} does not exist; give a tokenizer.json or a directory with one")
        for vocab, merges in _GPT2_FILE_PAIRS:
            if path.name == vocab and (path.parent / merges).is_file():
                return _load_gpt2(path, path.parent / merges)
            if path.name == merges and (path.parent / vocab).is_file():
                return _load_gpt2(path.parent / vocab, path)
        return _load_tokenizer_json(path)

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, eot_id={self.eot_id}, source={self.source!r})"


def _load_tokenizer_json(path: Path) -> Tokenizer:
    try:
        hf = tokenizers.Tokenizer.from_file(str(path))
    except Exception as e:  # the Rust error names the JSON problem; keep it to one line
        first_line = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{path} is not a valid tokenizer.json ({first_line}); "
                        "give a file saved by HF tokenizers or prepare_data") from None
    return Tokenizer(hf, source=str(path))


def _load_gpt2(vocab: Path, merges: Path) -> Tokenizer:
    """GPT-2's byte-level BPE from its vocabulary and merge list."""
    for p in (vocab, merges):
        if not p.is_file():
            raise UserError(f"GPT-2 tokenizer file {p} does not exist")
    try:
        model = models.BPE.from_file(str(vocab), str(merges))
    except Exception as e:
        first_line = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"cannot read GPT-2 vocabulary {vocab} / {merges} ({first_line}); "
                        "give vocab.json + merges.txt (or encoder.json + vocab.bpe)") from None
    hf = _byte_level(model)
    if model.token_to_id(EOT_TOKEN) is None:
        raise UserError(f"{vocab} has no {EOT_TOKEN} token; GPT-2's vocabulary has it as id 50256")
    hf.add_special_tokens([EOT_TOKEN])  # already in the vocabulary: marks it special, keeps its id
    return Tokenizer(hf, source=f"{vocab} + {merges}")


def _byte_level(model: models.Model) -> tokenizers.Tokenizer:
    hf = tokenizers.Tokenizer(model)
    hf.normalizer = None
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf.decoder = decoders.ByteLevel()
    return hf


def split_for_encoding(text: str, max_chars: int = MAX_PIECE_CHARS) -> Iterator[str]:
    """`text` in pieces of at most `max_chars` characters, cut where a non-space character meets
    whitespace (so byte-level BPE gives exactly the ids of the whole text); a stretch of
    `max_chars` with no whitespace at all is cut hard (only there can the ids differ)."""
    start, n = 0, len(text)
    while n - start > max_chars:
        end = start + max_chars
        cut = _last_cut(text, start + max_chars // 2, end)
        yield text[start:cut]
        start = cut
    if start < n or n == 0:
        yield text[start:]


def _last_cut(text: str, low: int, high: int) -> int:
    """The last cut point in text[low:high], looking back from `high` a window at a time, or `high`."""
    window = 4096
    hi = high
    while hi > low:
        lo = max(low, hi - window)
        last = None
        for last in _CUT.finditer(text, lo, hi):
            pass
        if last is not None:
            return last.end()
        hi = lo + 1  # a match may straddle lo: overlap by one character
        if lo == low:
            break
        window *= 2
    return high


def training_pieces(text: str) -> Iterator[str]:
    """`text` as the tokenizer trainer should see it: encoding-sized pieces, with any run of more
    than MAX_TRAIN_RUN_CHARS non-space characters cut to its first MAX_TRAIN_RUN_CHARS."""
    for piece in split_for_encoding(text):
        pos = 0
        for m in _LONG_RUN.finditer(piece):
            if m.start() > pos:
                yield piece[pos:m.start()]
            yield piece[m.start():m.start() + MAX_TRAIN_RUN_CHARS]
            pos = m.end()
        if pos < len(piece):
            yield piece[pos:]


def train_tokenizer(texts: Iterable[str], vocab_size: int, show_progress: bool = False) -> Tokenizer:
    """Train a byte-level BPE with `vocab_size` tokens (id 0 is <|endoftext|>) on `texts`.

    The result can be smaller than `vocab_size` when the corpus has too few distinct pairs;
    `Tokenizer.vocab_size` is the real size. Training is deterministic for the same texts.
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise UserError(f"vocab_size {vocab_size} is too small: byte-level BPE needs at least "
                        f"{MIN_VOCAB_SIZE} (256 bytes + end-of-text)")
    hf = _byte_level(models.BPE())
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,  # a pair seen once is noise, not a useful merge
        special_tokens=[EOT_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, even unseen ones
        show_progress=show_progress,
    )
    hf.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(hf, source="trained")


def check_vocab(tokenizer: Tokenizer | int, model_vocab_size: int, what: str = "tokenizer") -> None:
    """Raise UserError unless every id of `tokenizer` is < `model_vocab_size`.

    A tokenizer smaller than the model's vocabulary is allowed (the extra embedding rows are
    never used, as when GPT-2's 50257 tokens are padded to 50304); a larger one is an error.
    `tokenizer` may also be a vocabulary size.
    """
    n = tokenizer if isinstance(tokenizer, int) else tokenizer.vocab_size
    if n > model_vocab_size:
        raise UserError(f"{what} has {n} tokens but the model's vocab_size is {model_vocab_size}: "
                        f"use a model with vocab_size >= {n}, or prepare the data with --vocab_size {model_vocab_size}")
