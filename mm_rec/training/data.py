"""Where the trainer's tokens come from: a prepared data dir, the bundled corpus, or random tokens.

Every source answers the same two calls, both pure functions of their arguments so that a resumed
run sees exactly the batches the interrupted one would have seen:
    get_batch(kind, step, batch_size, seq_len, seed, rank, world_size, split) -> (x, y) int64 [B, T]
    iter_eval_batches(domain, batch_size, seq_len, max_batches) -> (x, y), ...
"""
from __future__ import annotations

import hashlib

import torch

from ..model.config import MMRecConfig
from ..utils.errors import UserError


class SyntheticData:
    """The guide's quick-test data (§1.3): uniform random tokens.

    Row i of the global batch of `step` is drawn from a generator seeded by (seed, split, kind,
    step, i), and rank r holds global rows r*B .. r*B+B-1, so N processes with batch B see the
    same global batch as one process with batch N*B.
    """

    tokenizer = None

    def __init__(self, vocab_size: int):
        self.vocab_size = int(vocab_size)

    def _row(self, key: str, length: int) -> torch.Tensor:
        seed = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") & ((1 << 63) - 1)
        g = torch.Generator().manual_seed(seed)
        return torch.randint(0, self.vocab_size, (length,), generator=g)

    def get_batch(self, kind: str, step: int, batch_size: int, seq_len: int, seed: int = 0, rank: int = 0,
                  world_size: int = 1, split: str = "train"):
        first = rank * batch_size
        rows = torch.stack([self._row(f"{seed}/{split}/{kind}/{step}/{first + i}", seq_len + 1)
                            for i in range(batch_size)])
        return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()

    def iter_eval_batches(self, domain: str, batch_size: int, seq_len: int, max_batches: int | None = None,
                          rank: int = 0, world_size: int = 1):
        """Batches rank, rank + world_size, ... of a fixed sequence, as TokenData's."""
        for i in range(rank, max_batches if max_batches is not None else 8, world_size):
            yield self.get_batch(domain, i, batch_size, seq_len, split="val")

    def validate_ids(self) -> None:
        pass


def open_training_data(data_dir: str | None, synthetic: bool, model_config: MMRecConfig, verbose: bool = True):
    """(data, tokenizer) for the run: `data_dir` if given, random tokens with --synthetic, else the
    bundled corpus prepared (once, then cached) with a tokenizer of the model's vocabulary size."""
    if synthetic:
        return SyntheticData(model_config.vocab_size), None
    from ..data.loader import TokenData
    from ..data.tokenizer import Tokenizer, check_vocab

    if data_dir is None:
        from ..data.corpus import ensure_default_corpus
        data_dir = ensure_default_corpus(model_config.vocab_size, verbose=verbose)
    data = TokenData(data_dir)
    check_both_domains(data)
    tokenizer = Tokenizer.load(data_dir)
    check_vocab(tokenizer, model_config.vocab_size, what=f"the tokenizer of {data_dir}")
    data.validate_ids()
    return data, tokenizer


def check_both_domains(data) -> None:
    """Refuse, before the model is built, data that lacks a domain or its validation split.

    Every stage needs both: Stages 1 and 3 train on batches that are half text and half code,
    Stage 2 trains each expert on its own domain, and every stage ends by scoring both domains'
    validation splits. Without this check a text-only set fails only after the run started, with
    advice about --seq_len that does not help.
    """
    for domain, other in (("text", "code"), ("code", "text")):
        if data.num_tokens(domain, "train") == 0:
            source = ("source code (any, e.g. this Python's standard library)" if domain == "code"
                      else "prose (.txt/.md files, or the bundled texts in mm_rec/data/corpus)")
            raise UserError(f"{data.data_dir} holds no {domain} data (prepared with --{other} only), but every stage "
                            f"trains on both text and code (Stage 2 trains the {domain} expert on {domain} alone): "
                            f"prepare it again with --{domain} SRC too, e.g. {source}")
        if data.num_tokens(domain, "val") == 0:
            raise UserError(f"{data.data_dir} has no {domain} validation tokens (prepared with --val_fraction 0?), "
                            "but every stage ends by scoring both domains: prepare it again with --val_fraction > 0")
