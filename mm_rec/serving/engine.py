"""The engine: continuous batching of many requests over one model, in one background thread.

    submit(request) ──> inbox ──> prefill (chunks) ──> decode batch per expert ──> events ──> request.events
                                                       one DecodeStep per loop

Every loop iteration
1. admits new requests and drops cancelled ones (a client that went away frees its row before the
   next step);
2. prefills at most `prefill_chunk` prompt tokens: the oldest waiting request's next chunk, together
   with every other waiting request whose next chunk has the same length and expert (one batched
   `model.consume`); a long prompt thus advances between decode steps instead of stalling them;
3. runs one decode step for each expert type in use: every row (request) of that type advances one
   token in one batched `DecodeStep` (a replayed CUDA graph on CUDA). Rows join when their prompt
   is consumed and leave when they finish, between steps; the batch's state stays where the step
   left it while the rows do not change.

A prompt's last token is not prefilled: it is the row's first decode input, whose logits give the
first new token (the same maths as `generate`: parallel forward over all but the last token, then
one step). A row whose turn must be kept (a session) takes one more step after its last token, so
its final state covers everything generated; that state goes back with the "done" event and the
caller saves it before it answers. Rows never mix inside a step, so a request decodes the same
tokens alone or in any batch.

Events, delivered on the request's asyncio loop: ("token", text, token_id) for every new token (its
text empty while a character or a possible stop string is incomplete), ("done", Finished),
("error", message[, HTTP status, default 503]).
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

import torch

from ..inference.decode import DecodeStep
from ..inference.generation import sample_next_token
from ..inference.state import RecurrentState

log = logging.getLogger("mm_rec.serving")


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False    # keep going after end-of-text (benchmarks: a fixed number of tokens)


@dataclass
class Finished:
    reason: str                        # "stop" (end-of-text or a stop string) or "length"
    prompt_tokens: int
    completion_tokens: int
    token_ids: list[int]
    text: str
    state: RecurrentState | None       # after the prompt and every generated token (keep_state only)


class IncrementalDetokenizer:
    """New text as tokens arrive, holding back a multi-byte character until it is complete (the
    window re-decodes only the last few tokens, so the cost per token stays flat)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = self.read = 0

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        before = self.tokenizer.decode(self.ids[self.prefix:self.read])
        after = self.tokenizer.decode(self.ids[self.prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before):]
        return ""

    def flush(self) -> str:
        """The text held back (an incomplete character, shown as U+FFFD), at the end."""
        before = self.tokenizer.decode(self.ids[self.prefix:self.read])
        after = self.tokenizer.decode(self.ids[self.prefix:])
        self.read = len(self.ids)
        return after[len(before):]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: each byte's printable stand-in in a byte-level BPE vocabulary."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


class ByteDetokenizer:
    """IncrementalDetokenizer's output at a fraction of its cost, for byte-level BPE vocabularies
    (ours): each token's bytes from a table, through Python's incremental UTF-8 decoder (which
    holds back an incomplete character). At 256 streams the window decoder's two decode calls per
    token are a large part of the engine's host time."""

    def __init__(self, table: list[bytes]):
        import codecs
        self.table = table
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, token_id: int) -> str:
        return self.decoder.decode(self.table[token_id] if token_id < len(self.table) else b"")

    def flush(self) -> str:
        return self.decoder.decode(b"", final=True)

    @staticmethod
    def table_for(tokenizer) -> list[bytes] | None:
        """Every id's bytes, or None when the vocabulary is not plain byte-level BPE (or the table
        disagrees with the tokenizer's own decode on any token): then the window decoder is used."""
        hf = getattr(tokenizer, "_tok", None)
        if hf is None:
            return None
        byte_of = {c: b for b, c in _bytes_to_unicode().items()}
        special = {t.content for t in hf.get_added_tokens_decoder().values() if t.special}
        vocab = hf.get_vocab(with_added_tokens=True)
        table = [b""] * (max(vocab.values()) + 1)
        for token, i in vocab.items():
            if token in special:  # decode() writes them as they are spelled
                table[i] = token.encode()
                continue
            if any(c not in byte_of for c in token):
                return None
            table[i] = bytes(byte_of[c] for c in token)
        for i, raw in enumerate(table):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                continue  # a piece of a character: decode() shows it as U+FFFD
            if text != tokenizer.decode([i]):
                return None
        return table


@dataclass(eq=False)
class Request:
    prompt_ids: list[int]
    expert: str
    sampling: SamplingParams
    loop: asyncio.AbstractEventLoop
    state: RecurrentState | None = None   # the session's state before this turn (on the device)
    keep_state: bool = False
    id: str = ""
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False
    # -- engine side ---------------------------------------------------------------------------
    consumed: int = 0                     # prompt tokens prefilled so far (all but the last)
    work_state: RecurrentState | None = None
    next_input: int = -1
    generated: list[int] = field(default_factory=list)
    text: str = ""                        # generated text (stop strings cut off)
    sent: int = 0                         # characters of text already sent
    finish_reason: str | None = None      # set when the last token is out; one step later for keep_state
    generator: torch.Generator | None = None
    detok: IncrementalDetokenizer | None = None
    outbox: list | None = None            # the engine's events of this step, delivered together

    def emit(self, *event) -> None:
        if self.outbox is not None:
            self.outbox.append((self, event))
        else:
            _post(self.loop, _deliver, [(self, event)])


def _deliver(batch) -> None:
    for request, event in batch:
        request.events.put_nowait(event)


def _post(loop: asyncio.AbstractEventLoop, fn, arg) -> None:
    try:
        loop.call_soon_threadsafe(fn, arg)
    except RuntimeError:  # the loop is closed: the server stopped, nobody is waiting any more
        pass


class EngineUnavailable(Exception):
    """The engine is not running (starting up or shutting down)."""


class Engine:
    def __init__(self, model, tokenizer, prefill_chunk: int = 512,
                 state_dtype: torch.dtype = torch.float32, use_cuda_graphs: bool | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.prefill_chunk = prefill_chunk
        self.state_dtype = state_dtype
        self.step = DecodeStep(model, use_cuda_graphs)
        self.inbox: queue.Queue = queue.Queue()
        self.prefilling: list[Request] = []
        self.rows: dict[str, list[Request]] = {}          # expert -> decoding rows, in state order
        self.batch_state: dict[str, RecurrentState] = {}  # expert -> the rows' state
        self.ready = False
        self.closing = False
        self.failed = False
        self.thread: threading.Thread | None = None
        self._ids = itertools.count()
        self._outbox: list = []
        self.steps = 0
        self._byte_table = ByteDetokenizer.table_for(tokenizer)
        self._zeros: dict[tuple[str, ...], RecurrentState] = {}  # experts -> the empty state of one row

    # -- control (any thread) ----------------------------------------------------------------------
    def start(self, warmup_batch_sizes=(1,)) -> None:
        """Warm up (one prefill, so the first request does not pay the GPU kernels' compilation; the
        decode graphs for these batch sizes), then run the loop in its thread."""
        with torch.inference_mode():
            zeros = RecurrentState.zeros(self.model, 1, self.model._experts_for("fused"), self.device,
                                         self.state_dtype)
            ids = torch.zeros(1, min(64, self.prefill_chunk), dtype=torch.long, device=self.device)
            self.model.consume(ids, expert_type="fused", memory_states=zeros.to_memory_states(),
                               chunk_size=ids.shape[1])
            self.step.warmup(warmup_batch_sizes, ("fused",), self.state_dtype)
        self.thread = threading.Thread(target=self._run, name="mm_rec-engine", daemon=True)
        self.thread.start()
        self.ready = True

    def stop(self, timeout: float = 10.0) -> None:
        self.closing = True
        self.ready = False
        self.inbox.put(None)
        if self.thread is not None:
            self.thread.join(timeout)

    def submit(self, request: Request) -> None:
        if not self.ready or self.closing:
            raise EngineUnavailable("the engine is not running")
        request.id = request.id or f"req-{next(self._ids)}"
        self.inbox.put(request)

    def cancel(self, request: Request) -> None:
        request.cancelled = True
        self.inbox.put(False)  # wake the loop: the row goes before the next step

    @property
    def active_rows(self) -> int:
        return sum(len(r) for r in self.rows.values())

    # -- the loop (engine thread) --------------------------------------------------------------------
    def _run(self) -> None:
        try:
            with torch.inference_mode():
                while not self.closing:
                    if not self._admit():
                        break
                    self._drop_cancelled()
                    self._prefill_some()
                    for expert in list(self.rows):
                        self._decode(expert)
                    self._flush()
        except Exception as e:  # a bug or a device fault: fail every request rather than hang them
            log.exception("engine loop failed")
            self.ready, self.failed = False, True
            self._fail_all(f"the engine failed ({type(e).__name__}); see the server log")
        finally:
            self._fail_all("the server is shutting down")

    def _admit(self) -> bool:
        """Take new requests; wait for one only when there is nothing else to do."""
        idle = not self.prefilling and not self.rows
        while True:
            try:
                item = self.inbox.get(timeout=0.5) if idle else self.inbox.get_nowait()
            except queue.Empty:
                if idle and not self.closing:
                    continue
                return not self.closing
            if item is None:
                return False
            if item is not False:
                try:
                    self._start(item)
                except Exception as e:  # this request's own fault (e.g. a state that does not fit): it alone fails
                    log.warning("%s could not start: %s: %s", item.id, type(e).__name__, e)
                    item.outbox = None
                    item.emit("error", f"the request could not start ({type(e).__name__})", 500)
            idle = False

    def _start(self, r: Request) -> None:
        active = self.model._experts_for(r.expert)
        if r.sampling.seed is not None:
            r.generator = torch.Generator(device=self.device).manual_seed(r.sampling.seed)
        r.detok = (ByteDetokenizer(self._byte_table) if self._byte_table is not None
                   else IncrementalDetokenizer(self.tokenizer))
        r.outbox = self._outbox
        if r.state is not None:
            r.work_state = r.state.with_experts(active, self.model).to(self.device, self.state_dtype)
        else:  # shared by every new request: states are values, never written in place
            if active not in self._zeros:
                self._zeros[active] = RecurrentState.zeros(self.model, 1, active, self.device, self.state_dtype)
            r.work_state = self._zeros[active]
        r.next_input = r.prompt_ids[-1]
        if len(r.prompt_ids) > 1:
            self.prefilling.append(r)
        else:
            self._join(r)

    def _join(self, r: Request) -> None:
        if r.sampling.max_tokens == 0:  # nothing to generate: one step consumes the last prompt token
            r.finish_reason = "length"
        self.rows.setdefault(r.expert, []).append(r)

    def _drop_cancelled(self) -> None:
        self.prefilling = [r for r in self.prefilling if not r.cancelled]
        for expert, rows in list(self.rows.items()):
            keep = [i for i, r in enumerate(rows) if not r.cancelled]
            if len(keep) < len(rows):
                self._keep_rows(expert, keep)

    def _keep_rows(self, expert: str, keep: list[int]) -> None:
        rows = self.rows[expert]
        state = self.batch_state.get(expert)
        if state is not None:
            covered = state.batch_size  # rows past it joined after the last step: their state is their own
            kept_old = [i for i in keep if i < covered]
            parts = [state.select(kept_old)] if kept_old else []
            parts += [rows[i].work_state for i in keep if i >= covered]
            if parts:
                self.batch_state[expert] = RecurrentState.concat(parts)
            else:
                del self.batch_state[expert]
        self.rows[expert] = [rows[i] for i in keep]
        if not self.rows[expert]:
            del self.rows[expert]
            self.batch_state.pop(expert, None)

    # -- prefill ---------------------------------------------------------------------------------------
    def _prefill_some(self) -> None:
        if not self.prefilling:
            return
        first = self.prefilling[0]
        length = min(self.prefill_chunk, len(first.prompt_ids) - 1 - first.consumed)
        group = [r for r in self.prefilling
                 if r.expert == first.expert and min(self.prefill_chunk, len(r.prompt_ids) - 1 - r.consumed) == length]
        group = group[:max(1, self.prefill_chunk // length)]
        ids = torch.tensor([r.prompt_ids[r.consumed:r.consumed + length] for r in group], device=self.device)
        state = RecurrentState.concat([r.work_state for r in group])
        new = self.model.consume(ids, expert_type=first.expert, memory_states=state.to_memory_states(),
                                 chunk_size=length)
        new = RecurrentState.from_memory_states(new)
        if new.dtype != self.state_dtype:
            new = new.to(dtype=self.state_dtype)
        for r, row in zip(group, new.unbind() if len(group) > 1 else [new]):
            r.work_state = row  # a view of the group's state until the row's next concat copies it
            r.consumed += length
            if r.consumed == len(r.prompt_ids) - 1:
                self.prefilling.remove(r)
                self._join(r)

    # -- decode ----------------------------------------------------------------------------------------
    def _decode(self, expert: str) -> None:
        rows = self.rows[expert]
        state = self.batch_state.get(expert)
        covered = 0 if state is None else state.batch_size
        if covered < len(rows):  # rows that joined since the last step
            parts = ([state] if state is not None else []) + [r.work_state for r in rows[covered:]]
            state = RecurrentState.concat(parts)
        ids = torch.tensor([r.next_input for r in rows], device=self.device)
        logits, state = self.step(ids, state, expert)
        self.batch_state[expert] = state
        self.steps += 1

        sampling = [i for i, r in enumerate(rows) if r.finish_reason is None]
        tokens = self._sample(logits, rows, sampling)
        complete = [i for i, r in enumerate(rows) if r.finish_reason is not None]  # last token consumed
        # one copy of their rows out of the step's state (on CUDA the graph's buffers, overwritten by
        # the next step), each row then a view of it
        final = dict(zip(complete, state.select(complete).unbind())) if complete else {}
        leave = []
        for i, r in enumerate(rows):
            if i in final:  # the turn's state is complete
                r.work_state = None
                self._finish(r, final[i].merged_into(r.state))
                leave.append(i)
                continue
            self._accept(r, tokens[i])
            if r.finish_reason is not None and not r.keep_state:
                self._finish(r, None)
                leave.append(i)
        if leave:
            gone = set(leave)
            self._keep_rows(expert, [i for i in range(len(rows)) if i not in gone])

    def _sample(self, logits: torch.Tensor, rows: list[Request], which: list[int]) -> dict[int, int]:
        """One token for each row in `which`: greedy rows by one argmax over the batch, sampled rows
        in groups of equal settings (one call per group), a seeded row with its own generator."""
        if not which:
            return {}
        tokens = logits.argmax(-1)
        groups: dict[tuple, list[int]] = {}
        for i in which:
            s = rows[i].sampling
            if s.temperature > 0:
                key = (i,) if rows[i].generator is not None else (s.temperature, s.top_k, s.top_p)
                groups.setdefault(key, []).append(i)
        if groups:
            tokens = tokens.clone()
            for members in groups.values():
                s = rows[members[0]].sampling
                idx = torch.tensor(members, device=logits.device)
                tokens[idx] = sample_next_token(logits.index_select(0, idx), s.temperature, s.top_k, s.top_p,
                                                rows[members[0]].generator)
        values = tokens.tolist()  # the one host sync of the step
        return {i: values[i] for i in which}

    def _accept(self, r: Request, token: int) -> None:
        """A new token: text out (holding back what could start a stop string), finish checks."""
        r.generated.append(token)
        r.next_input = token
        if token == self.tokenizer.eot_id and not r.sampling.ignore_eos:
            r.finish_reason = "stop"
        else:
            start = len(r.text)
            r.text += r.detok.add(token)
            if r.sampling.stop and len(r.text) > start:
                stop_at = min((i for i in (r.text.find(s, max(0, start - len(s) + 1)) for s in r.sampling.stop)
                               if i >= 0), default=-1)
                if stop_at >= 0:
                    r.text = r.text[:stop_at]
                    r.finish_reason = "stop"
                    r.detok = None  # the text ends at the stop string
        if r.finish_reason is None and len(r.generated) >= r.sampling.max_tokens:
            r.finish_reason = "length"
        if r.finish_reason is not None and r.detok is not None:
            r.text += r.detok.flush()  # the text is then exactly the tokenizer's decode of the tokens
        hold = 0 if r.finish_reason else max((len(s) - 1 for s in r.sampling.stop), default=0)
        upto = max(r.sent, len(r.text) - hold)
        r.emit("token", r.text[r.sent:upto], token)  # one event per token, its text possibly empty
        r.sent = upto

    def _finish(self, r: Request, state: RecurrentState | None) -> None:
        if r.sent < len(r.text):
            r.emit("token", r.text[r.sent:], r.generated[-1] if r.generated else -1)
            r.sent = len(r.text)
        r.emit("done", Finished(r.finish_reason, len(r.prompt_ids), len(r.generated), list(r.generated),
                                r.text, state))

    def _flush(self) -> None:
        """Hand the step's events to their event loops: one wake-up per loop and step, not one per
        token (at 256 streams that is what the event loop can keep up with)."""
        if not self._outbox:
            return
        by_loop: dict = {}
        for request, event in self._outbox:
            by_loop.setdefault(request.loop, []).append((request, event))
        self._outbox.clear()
        for loop, batch in by_loop.items():
            _post(loop, _deliver, batch)

    def _fail_all(self, message: str) -> None:
        self._flush()
        for r in self.prefilling + [r for rows in self.rows.values() for r in rows]:
            r.outbox = None
            r.emit("error", message)
        self.prefilling, self.rows, self.batch_state = [], {}, {}
        while True:
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, Request):
                item.emit("error", message)


def now() -> int:
    return int(time.time())
