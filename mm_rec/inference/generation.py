"""Autoregressive generation with a recurrent state: parallel prefill, then O(1) steps.

    prompt ──(parallel chunked forward)──> memory states ──step──> token ──step──> token ...

The prompt is consumed by the model's parallel forward (`chunk_size` bounds its activation memory),
then every new token costs one `model.step`, which only touches the fixed-size states
(h: [B, d], M: [B, H, d_h, d_h] per layer and expert): the cost per token does not grow with the
context, unlike a Transformer's KV cache.

Prompts of different lengths. Left-padding, the Transformer trick, would feed pad tokens into the
recurrent state and change it. Instead prompts are grouped by length, each group is prefilled
exactly on its own, and the per-sequence states are concatenated along the batch dimension (a
recurrent state has no position in it, so nothing else is needed); decoding then runs the whole
batch in lockstep. The result equals generating every prompt on its own. States move between
these pieces as `RecurrentState`s (state.py); each decode step goes through `decode.DecodeStep`, a
replayed CUDA graph on CUDA (the server's fast path too), `model.step` on the CPU.

Sampling: temperature 0 is greedy (argmax); otherwise softmax(logits / T) restricted to the top_k
most likely tokens and/or the smallest set whose probability reaches top_p (nucleus), drawn with
an optional torch.Generator so a seed reproduces a run.
"""
from __future__ import annotations

from typing import Iterator

import torch

from .decode import decode_step_for
from .state import RecurrentState

# -- sampling ---------------------------------------------------------------------------------------


def sample_next_token(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                      top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits [B, V] -> token ids [B]."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k <= 0:
        raise ValueError(f"top_k must be positive, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the tokens before it already reach top_p (the first one always stays).
        drop_sorted = (probs.cumsum(dim=-1) - probs) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# -- prefill ----------------------------------------------------------------------------------------


def _as_prompt_list(input_ids, device) -> list[torch.Tensor]:
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dim() == 1:
            input_ids = input_ids.unsqueeze(0)
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq_len], got shape {tuple(input_ids.shape)}")
        prompts = list(input_ids.to(device=device, dtype=torch.long))
    else:
        prompts = [torch.as_tensor(p, dtype=torch.long, device=device).reshape(-1) for p in input_ids]
    if not prompts:
        raise ValueError("no prompts given")
    if any(p.numel() == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (start a document with the end-of-text token)")
    return prompts


@torch.inference_mode()
def prefill(model, prompts: list[torch.Tensor], expert_type=None, memory_states: RecurrentState | None = None,
            chunk_size: int | None = 2048):
    """Consume the prompts; returns (next-token logits [B, V], RecurrentState after every prompt token).

    Each length group runs the experts' parallel forward over all but its last token (chunked, so a
    long prompt's activations stay bounded; no LM head, so no [B, T, vocab] logits) and one step on
    the last token, which gives the next-token logits.
    """
    by_length: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_length.setdefault(p.numel(), []).append(i)
    logits_parts, state_parts, order = [], [], []
    for length, rows in by_length.items():
        ids = torch.stack([prompts[i] for i in rows])
        states = memory_states
        if states is not None and len(by_length) > 1:
            states = states.select(rows)
        states = None if states is None else states.to_memory_states()
        if length > 1:
            states = model.consume(ids[:, :-1], expert_type=expert_type, memory_states=states,
                                   chunk_size=chunk_size)
        logits, states = model.step(ids[:, -1], states, expert_type=expert_type)
        logits_parts.append(logits)
        state_parts.append(RecurrentState.from_memory_states(states))
        order.extend(rows)
    if len(by_length) == 1:
        return logits_parts[0], state_parts[0]
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order)] = torch.arange(len(order))
    inverse = inverse.to(logits_parts[0].device)
    return torch.cat(logits_parts).index_select(0, inverse), RecurrentState.concat(state_parts).select(inverse)


# -- decoding ---------------------------------------------------------------------------------------


class TokenStream:
    """Iterate to receive the new tokens, one [B] tensor per step, as they are made.

    After the iteration `memory_states` holds the state after the prompt and every generated token
    (when `keep_memory`, which costs one extra step to consume the last token), ready to be saved
    as a session or passed to the next call, as the model's nested dicts (`state` holds the same
    as a RecurrentState); `finished` marks sequences that produced end-of-text. Finished sequences
    keep emitting `eot_id` as padding and their state no longer changes.

    Decode steps run through `decode_step_for(model)`: replayed CUDA graphs on CUDA, eager on CPU.
    """

    def __init__(self, model, input_ids, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, expert_type: str | None = None,
                 memory_states: dict | RecurrentState | None = None,
                 generator: torch.Generator | None = None, stop_at_eot: bool = False, eot_id: int | None = None,
                 prefill_chunk_size: int | None = 2048, keep_memory: bool = False):
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if stop_at_eot and eot_id is None:
            raise ValueError("stop_at_eot needs eot_id")
        device = next(model.parameters()).device
        self.model = model
        self.prompts = _as_prompt_list(input_ids, device)
        self.max_new_tokens = max_new_tokens
        self.sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
        self.expert_type = expert_type
        if isinstance(memory_states, dict):
            memory_states = RecurrentState.from_memory_states(memory_states) if memory_states else None
        self.input_state: RecurrentState | None = memory_states
        self.stop_at_eot, self.eot_id = stop_at_eot, eot_id
        self.prefill_chunk_size = prefill_chunk_size
        self.keep_memory = keep_memory
        self.state: RecurrentState | None = None
        self.finished = torch.zeros(len(self.prompts), dtype=torch.bool, device=device)

    @property
    def memory_states(self) -> dict | None:
        return None if self.state is None else self.state.to_memory_states()

    def __iter__(self) -> Iterator[torch.Tensor]:
        model, expert = self.model, self.expert_type
        step = decode_step_for(model)
        # inference_mode is entered around each model call, never across a yield, so the caller's
        # code between tokens runs in its own grad mode.
        with torch.inference_mode():
            logits, state = prefill(model, self.prompts, expert, self.input_state, self.prefill_chunk_size)
        # Rows that ended (end-of-text consumed): their state as it was then, kept aside while the
        # batch steps on (their rows then only see padding).
        frozen_rows, frozen = [], []
        for i in range(self.max_new_tokens):
            with torch.inference_mode():
                tokens = sample_next_token(logits, **self.sampling)
            fed_real = ~self.finished  # rows whose token belongs to their sequence (not padding)
            if self.stop_at_eot:
                tokens = torch.where(self.finished, torch.full_like(tokens, self.eot_id), tokens)
                self.finished = self.finished | (tokens == self.eot_id)
            yield tokens
            last = i == self.max_new_tokens - 1 or bool(self.stop_at_eot and self.finished.all())
            if last and not self.keep_memory:
                return
            with torch.inference_mode():
                logits, state = step(tokens, state, expert)
                if self.stop_at_eot and self.keep_memory:
                    ended = (fed_real & self.finished).nonzero().flatten().tolist()
                    if ended:
                        frozen_rows += ended
                        frozen.append(state.select(ended))
            if last:
                break
        if self.keep_memory:
            with torch.inference_mode():
                state = state.clone()  # off the decode step's buffers (reused by its next call)
                if frozen_rows:
                    state = state.replace_rows(frozen_rows, RecurrentState.concat(frozen))
            self.state = state.merged_into(self.input_state)


def generate(model, input_ids, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
             top_p: float | None = None, expert_type: str | None = None, memory_states: dict | None = None,
             generator: torch.Generator | None = None, stop_at_eot: bool = False, eot_id: int | None = None,
             prefill_chunk_size: int | None = 2048, return_memory: bool = False):
    """Generate up to max_new_tokens tokens after each prompt.

    input_ids: LongTensor [B, T] (or [T]) -> LongTensor [B, T + n], the prompts followed by the new
    tokens (n = max_new_tokens, fewer when stop_at_eot ends every sequence early; sequences that
    stopped are padded with eot_id). A list of prompts of different lengths (lists or 1-D tensors)
    -> a list of 1-D tensors, each its prompt plus its own new tokens (up to and including EOT).
    memory_states continue a previous context (a session): the prompt follows it.
    return_memory=True also returns the states after the last returned token.
    """
    stream = TokenStream(model, input_ids, max_new_tokens, temperature, top_k, top_p, expert_type, memory_states,
                         generator, stop_at_eot, eot_id, prefill_chunk_size, keep_memory=return_memory)
    steps = list(stream)
    device = stream.prompts[0].device
    new = torch.stack(steps, dim=1) if steps else torch.empty(len(stream.prompts), 0, dtype=torch.long, device=device)
    if isinstance(input_ids, torch.Tensor):
        prompts = input_ids.to(device).reshape(len(stream.prompts), -1)
        out = torch.cat([prompts, new], dim=1)
    else:
        out = []
        for prompt, row in zip(stream.prompts, new):
            if stop_at_eot and (row == eot_id).any():
                row = row[: int((row == eot_id).nonzero()[0]) + 1]
            out.append(torch.cat([prompt, row]))
    return (out, stream.memory_states) if return_memory else out
