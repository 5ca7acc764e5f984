"""Held-out files scored at each evaluation (`train_modular --heldout_text/--heldout_code FILE...`).

The validation split comes from the same sources as the training data; text and code the run has
never seen from anywhere tell whether the model generalises or memorises (issue 20: the bundled
corpus's validation loss looked fine while modern prose scored near uniform). The files are read
and tokenized once, as `evaluate --text/--code` reads them (prepare_data's document splitting, an
end-of-text token after each document), and each evaluation scores the first
`eval_batches x global batch x seq_len` tokens of each domain (the validation split's budget) as
one stream with the memory carried across `seq_len` windows: below that size, the number equals
`python -m mm_rec.scripts.evaluate --checkpoint CKPT --text FILE --seq_len L` on the same weights.

Rows go to metrics.jsonl as {"type": "heldout", "stage", "step", "heldout_loss_text", ...} and
MetricsLogger.plot_stage draws them beside the training and validation losses in loss_{stage}.png.
"""
from __future__ import annotations


import torch

from ..utils.errors import UserError
from ..inference.evaluation import stream_loss


class HeldoutSet:
    """Token streams per domain ("text", "code"), each starting with an end-of-text token."""

    def __init__(self, tokens: dict[str, torch.Tensor]):
        self.tokens = tokens

    @classmethod
    def from_files(cls, tokenizer, files: dict[str, list[str] | None], max_tokens: int) -> "HeldoutSet | None":
        """Tokenize the documents of `files` ({"text": [...], "code": [...]}) up to `max_tokens`
        tokens per domain; None when no file is given."""
        from ..inference.evaluation import read_documents, tokenize_documents
        tokens = {}
        for domain, paths in files.items():
            if not paths:
                continue
            kept, chars = [], 0
            # Documents until the budget is surely reached (BPE tokens average ~4 characters), so
            # a large held-out file costs no more tokenizing than the budget.
            for doc in read_documents(paths, domain):
                kept.append(doc)
                chars += len(doc)
                if chars > 16 * max_tokens:
                    break
            ids, _ = tokenize_documents(tokenizer, kept)
            if ids.numel() < 2:
                raise UserError(f"--heldout_{domain} {' '.join(paths)} holds no {domain} to score")
            tokens[domain] = ids[:max_tokens + 1]
        return cls(tokens) if tokens else None

    def score(self, model, plan: list[tuple[str, str | None]], seq_len: int, max_tokens: int, device,
              autocast_dtype=None, chunk_size=None) -> dict[str, float]:
        """{domain: mean loss} of each domain of `plan` ((domain, expert_type) pairs, as the
        stage's validation) that has held-out tokens, over its first max_tokens tokens."""
        out = {}
        for domain, expert_type in plan:
            if domain in self.tokens:
                nats, count = stream_loss(model, self.tokens[domain][:max_tokens + 1], expert_type, seq_len,
                                          device, autocast_dtype, chunk_size=chunk_size)
                out[domain] = nats / count
        return out
