"""Evaluation (guide §9.1): loss, perplexity and bits per byte, per domain and per expert.

Two sources of tokens:
- a prepared data directory: the validation memmaps, cut into the same independent windows the
  trainer validates on; the loss is `mm_rec.training.evaluation.evaluate_loss`, so the number is
  the trainer's validation loss exactly;
- raw files never prepared: read as prepare_data reads them (same document splitting), tokenized
  with the checkpoint's tokenizer, an end-of-text token after each document, and evaluated as one
  stream with the memory state carried from window to window. Memory is bounded by the window
  (--seq_len), so a 100K-token file works on a laptop, and every token is scored with its whole
  left context, which is what a recurrent model is for.

Bits per byte = total cross-entropy (nats) / ln 2 / UTF-8 bytes of the scored text. It compares
models with different tokenizers; end-of-text tokens count toward the loss and for zero bytes.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Iterable, Sequence

import torch

from ..utils.errors import UserError

EXPERTS = ("text", "code", "fused")


@dataclass
class EvalResult:
    domain: str
    expert: str
    loss: float            # mean cross-entropy per token, nats
    perplexity: float
    bits_per_byte: float | None
    tokens: int            # tokens scored
    bytes: int | None      # UTF-8 bytes those tokens stand for

    @classmethod
    def from_loss(cls, domain, expert, loss: float, tokens: int, n_bytes: int | None) -> "EvalResult":
        bpb = loss * tokens / math.log(2) / n_bytes if n_bytes else None
        return cls(domain, expert, loss, math.exp(min(loss, 700.0)), bpb, tokens, n_bytes)

    @classmethod
    def from_totals(cls, domain, expert, nats: float, tokens: int, n_bytes: int | None) -> "EvalResult":
        return cls.from_loss(domain, expert, nats / tokens if tokens else float("nan"), tokens, n_bytes)

    def to_dict(self) -> dict:
        return asdict(self)


def model_expert_type(expert: str) -> str:
    """CLI expert name -> the model's expert_type ('fused' runs both experts, through the fusion
    layer when the checkpoint has it on)."""
    if expert not in EXPERTS:
        raise UserError(f"--expert must be one of {', '.join(EXPERTS)} or all, got {expert!r}")
    return expert


def token_byte_lengths(tokenizer) -> torch.Tensor:
    """LongTensor [vocab]: how many UTF-8 bytes each token id decodes to (0 for special tokens).

    Byte-level BPE spells every byte as one character of a fixed 256-character alphabet, so a
    token's byte count is the length of its vocabulary string. For any other tokenizer we fall
    back to decoding the token alone.
    """
    import tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    hf = tokenizers.Tokenizer.from_str(tokenizer.to_json())
    special = {tok.content for tok in hf.get_added_tokens_decoder().values() if tok.special}
    alphabet = set(ByteLevel.alphabet())
    vocab = hf.get_vocab(with_added_tokens=True)
    lengths = torch.zeros(max(vocab.values()) + 1, dtype=torch.long)
    for token, i in vocab.items():
        if token in special:
            continue
        if set(token) <= alphabet:
            lengths[i] = len(token)
        else:
            lengths[i] = len(tokenizer.decode([i]).encode("utf-8"))
    return lengths


# -- raw files, carried state -----------------------------------------------------------------------


def read_documents(paths: Sequence[str], domain: str) -> list[str]:
    """Documents of the given files/directories, split exactly as prepare_data splits them."""
    from ..data.sources import as_source, iter_documents
    docs = []
    for path in paths:
        docs.extend(doc for _, doc in iter_documents(as_source(path), domain))
    return docs


def tokenize_documents(tokenizer, documents: Iterable[str], batch: int = 256) -> tuple[torch.Tensor, int]:
    """One stream: EOT, doc1, EOT, doc2, EOT, ... (the leading EOT lets the first token be scored, as
    every document in the packed training data follows an EOT). Returns (ids, UTF-8 bytes of docs)."""
    ids, n_bytes, pending = [tokenizer.eot_id], 0, []

    def flush():
        for encoded in tokenizer.encode_batch(pending):
            ids.extend(encoded)
            ids.append(tokenizer.eot_id)
        pending.clear()

    for doc in documents:
        n_bytes += len(doc.encode("utf-8"))
        pending.append(doc)
        if len(pending) == batch:
            flush()
    flush()
    return torch.tensor(ids, dtype=torch.long), n_bytes


@torch.no_grad()
def summed_loss(model, windows: Iterable[tuple[torch.Tensor, torch.Tensor]], expert_type: str | None, device=None,
                autocast_dtype: torch.dtype | None = None, chunk_size: int | None = None, head_chunk: int = 4096,
                carry_memory: bool = False, progress=None) -> tuple[torch.Tensor, int]:
    """(summed cross-entropy in nats as an fp64 device tensor, tokens scored) of `model` over
    (x, y) windows ([B, T] each), in eval mode under no_grad (training mode restored after).

    Every evaluation scores here, through model.loss, which runs the LM head and the
    cross-entropy `head_chunk` tokens at a time: never the [B, T, vocab] logits (at Stage 2's
    2 x 8192 tokens and vocab 32000, 2 GB in fp32). Each window's mean loss counts for its
    tokens (loss x y.numel(), accumulated in fp64). carry_memory: each window continues the
    memory state the previous one left (a stream cut into windows)."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count, states = torch.zeros((), dtype=torch.float64, device=device), 0, None
    try:
        for x, y in windows:
            x, y = x.to(device), y.to(device)
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                if carry_memory:
                    loss, states = model.loss(x, y, expert_type=expert_type, memory_states=states,
                                              chunk_size=chunk_size, return_memory=True, head_chunk=head_chunk)
                else:
                    loss = model.loss(x, y, expert_type=expert_type, chunk_size=chunk_size, head_chunk=head_chunk)
            total += loss.double() * y.numel()
            count += y.numel()
            if progress is not None:
                progress.update(y.numel())
    finally:
        model.train(was_training)
    return total, count


def stream_loss(model, tokens: torch.Tensor, expert_type: str | None, seq_len: int, device=None,
                autocast_dtype: torch.dtype | None = None, progress=None, chunk_size: int | None = None,
                head_chunk: int = 4096) -> tuple[float, int]:
    """(summed cross-entropy in nats, tokens scored) of a 1-D token stream, predicting tokens[1:]
    `seq_len` tokens at a time with the memory state carried across windows: every token is scored
    with its whole left context. `evaluate --text/--code` and the trainer's --heldout_* files are
    scored here."""
    if seq_len < 1:
        raise UserError(f"--seq_len must be >= 1, got {seq_len}")
    def windows():
        for start in range(0, tokens.numel() - 1, seq_len):
            y = tokens[start + 1:start + 1 + seq_len]
            yield tokens[start:start + y.numel()][None], y[None]
    total, count = summed_loss(model, windows(), expert_type, device, autocast_dtype, chunk_size, head_chunk,
                               carry_memory=True, progress=progress)
    return float(total.item()), count


def evaluate_files(model, tokenizer, files: dict[str, Sequence[str]], experts: Sequence[str], seq_len: int,
                   device=None, autocast_dtype=None, progress_factory=None) -> list[EvalResult]:
    """files: {"text": [paths], "code": [paths]} -> one result per (domain, expert)."""
    results = []
    for domain, paths in files.items():
        if not paths:
            continue
        tokens, n_bytes = tokenize_documents(tokenizer, read_documents(paths, domain))
        for expert in experts:
            bar = progress_factory(tokens.numel() - 1, f"{domain}/{expert}") if progress_factory else None
            try:
                nats, count = stream_loss(model, tokens, model_expert_type(expert), seq_len, device,
                                          autocast_dtype, progress=bar)
            finally:
                if bar is not None:
                    bar.close()
            results.append(EvalResult.from_totals(domain, expert, nats, count, n_bytes))
    return results


# -- prepared data: the trainer's validation loss ---------------------------------------------------


def evaluate_data_dir(model, data, domains: Sequence[str], experts: Sequence[str], batch_size: int, seq_len: int,
                      max_batches: int | None = None, device=None, autocast_dtype=None,
                      byte_lengths: torch.Tensor | None = None) -> list[EvalResult]:
    """Validation split of a TokenData, windows as the trainer evaluates them (no carried state)."""
    from ..training.evaluation import evaluate_loss
    results = []
    for domain in domains:
        tokens, n_bytes = 0, 0
        for _, y in data.iter_eval_batches(domain, batch_size, seq_len, max_batches):
            tokens += y.numel()
            if byte_lengths is not None:
                n_bytes += int(byte_lengths[y].sum())
        for expert in experts:
            loss = evaluate_loss(model, data, domain, model_expert_type(expert), batch_size, seq_len,
                                 max_batches=max_batches, device=device, autocast_dtype=autocast_dtype)
            results.append(EvalResult.from_loss(domain, expert, loss, tokens,
                                                n_bytes if byte_lengths is not None else None))
    return results


def format_table(results: Sequence[EvalResult]) -> str:
    header = f"{'domain':<7} {'expert':<7} {'tokens':>11} {'bytes':>12} {'loss':>8} {'ppl':>10} {'bpb':>7}"
    lines = [header, "-" * len(header)]
    for r in results:
        n_bytes = f"{r.bytes:,}" if r.bytes is not None else "-"
        bpb = f"{r.bits_per_byte:.4f}" if r.bits_per_byte is not None else "-"
        lines.append(f"{r.domain:<7} {r.expert:<7} {r.tokens:>11,} {n_bytes:>12} {r.loss:>8.4f} "
                     f"{r.perplexity:>10.2f} {bpb:>7}")
    return "\n".join(lines)
