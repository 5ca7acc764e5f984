"""The decode step: one token per sequence through `model.step`, replayed as a CUDA graph on CUDA.

An eager 100M-parameter step launches ~1.5K small kernels; on a GPU the host's launch cost, not the
maths, bounds it (21.9 ms at batch 1 on an H200, 2.75 ms replayed as one graph). So on CUDA the
step is captured once per (expert type, batch-size bucket, state dtype) and replayed:

    step = DecodeStep(model)                   # one per model (decode_step_for caches it)
    logits, state = step(ids, state, "fused")  # ids [n] LongTensor, state a RecurrentState of n rows

A batch of n rows runs in the smallest captured bucket >= n (1, 2, 4, ..., 256, then multiples of
256); rows n.. of the bucket hold stale values and are ignored (rows never mix in a step). On the
CPU, or when CUDA graphs are off (MMREC_CUDA_GRAPHS=0) or fail to capture, the same call runs
`model.step` eagerly.

The returned logits and state are views of the graph's static buffers on the CUDA path: valid until
the next call of the same step object (select(), clone() or concat() them to keep them longer).
"""
from __future__ import annotations

import logging
import os

import torch

from .state import RecurrentState

log = logging.getLogger(__name__)


def bucket_for(n: int) -> int:
    """The captured batch size that serves n rows: the next power of two up to 256, then the next
    multiple of 256 (a graph per size would capture hundreds of graphs; padding costs little)."""
    if n <= 0:
        raise ValueError(f"batch size must be positive, got {n}")
    if n <= 256:
        return 1 << (n - 1).bit_length()
    return -(-n // 256) * 256


class CudaGraphStep:
    """model.step captured as a CUDA graph for a fixed batch size, expert type and state dtype.

    The state lives in static buffers (`state`, a RecurrentState of `batch_size` rows): `load`
    copies a state into its first rows, each call replays the graph on `ids` and copies the new
    state over the old one, so consecutive calls decode on without any other copy."""

    def __init__(self, model, batch_size: int, expert_type: str | None = None,
                 state_dtype: torch.dtype = torch.float32, pool=None, warmup_steps: int = 3,
                 emulate: bool = False):
        """emulate=True (tests without CUDA): no graph; each call runs model.step eagerly on the
        static buffers and writes its outputs into static output buffers, which is what a replay
        does, so the buffer handling around the graph is exercised on any device."""
        device = next(model.parameters()).device
        if device.type != "cuda" and not emulate:
            raise ValueError("CudaGraphStep needs the model on a CUDA device")
        self.batch_size, self.expert_type = batch_size, expert_type
        self.ids = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.state = RecurrentState.zeros(model, batch_size, model._experts_for(expert_type), device, state_dtype)
        step = lambda: model.step(self.ids, self.state.to_memory_states(), expert_type=expert_type)
        if emulate:
            with torch.inference_mode():
                logits, new = step()
            self.logits, new = logits.clone(), RecurrentState.from_memory_states(new).clone()
            self._src = new.tensors()

            def replay():
                out_logits, out = step()
                self.logits.copy_(out_logits)
                torch._foreach_copy_(self._src, RecurrentState.from_memory_states(out).tensors())
            self._replay = replay
        else:
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side), torch.inference_mode():  # warm-up before capture, as torch requires
                for _ in range(warmup_steps):
                    step()
            torch.cuda.current_stream(device).wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            # thread_local: a server captures a new bucket in its engine thread while other threads
            # may be copying session states to and from the device; only this thread's calls are checked.
            with torch.cuda.graph(self.graph, pool=pool, capture_error_mode="thread_local"), torch.inference_mode():
                self.logits, new = step()
            self._src = RecurrentState.from_memory_states(new).tensors()
            self._replay = self.graph.replay
        self._dst = self.state.tensors()

    def load(self, state: RecurrentState) -> None:
        self.state.copy_(state)

    @torch.inference_mode()
    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [n <= batch_size] -> logits [n, vocab] (a view); the state advances in place."""
        n = ids.shape[0]
        self.ids[:n].copy_(ids)
        self._replay()
        torch._foreach_copy_(self._dst, self._src)
        return self.logits[:n]

    def rows(self, n: int) -> RecurrentState:
        """The first n rows of the static state (views)."""
        return self.state if n == self.batch_size else self.state.map(lambda t: t[:n])


def cuda_graphs_enabled() -> bool:
    return os.environ.get("MMREC_CUDA_GRAPHS", "1") not in ("0", "false", "no")


class DecodeStep:
    """(ids [n], state of n rows, expert_type) -> (logits [n, vocab], new state): graphed on CUDA,
    eager elsewhere. See the module docstring for the lifetime of what it returns."""

    def __init__(self, model, use_cuda_graphs: bool | None = None, emulate: bool = False):
        """emulate=True: the graphed path's buffers without CUDA (CudaGraphStep's emulate), for tests."""
        self.model = model
        device = next(model.parameters()).device
        if use_cuda_graphs is None:
            use_cuda_graphs = cuda_graphs_enabled()
        self.emulate = emulate
        self.graphed = emulate or bool(use_cuda_graphs and device.type == "cuda" and torch.cuda.is_available())
        self.graphs: dict[tuple, CudaGraphStep] = {}
        self.pool = torch.cuda.graph_pool_handle() if self.graphed and not emulate else None
        self._key = self._model_key()

    def _model_key(self):
        # A graph reads the parameters by address: moved or cast weights need new graphs.
        p = next(self.model.parameters())
        return (p.device, p.dtype, p.data_ptr())

    def graph(self, n: int, expert_type, state_dtype) -> CudaGraphStep:
        key = (expert_type, bucket_for(n), state_dtype)
        if key not in self.graphs:
            self.graphs[key] = CudaGraphStep(self.model, key[1], expert_type, state_dtype, pool=self.pool,
                                             emulate=self.emulate)
        return self.graphs[key]

    def warmup(self, batch_sizes, expert_types=("fused",), state_dtype=torch.float32) -> None:
        """Capture the graphs for these batch sizes now (largest first: the pool then fits them all)."""
        if self.graphed:
            for n in sorted({bucket_for(b) for b in batch_sizes}, reverse=True):
                for expert in expert_types:
                    self.graph(n, expert, state_dtype)

    @torch.inference_mode()
    def __call__(self, ids: torch.Tensor, state: RecurrentState, expert_type=None):
        if self.graphed and self.model.training is False and self._key == self._model_key():
            try:
                graph = self.graph(ids.shape[0], expert_type, state.dtype)
            except Exception as e:  # capture can fail on an unusual setup: stay correct, run eagerly
                log.warning("CUDA graph capture failed (%s: %s); decoding eagerly", type(e).__name__, e)
                self.graphed = False
            else:
                n = ids.shape[0]
                if state.experts.keys() != graph.state.experts.keys():
                    state = state.with_experts(graph.state.expert_names, self.model)
                if not _is_rows_of(state, graph, n):
                    graph.load(state)
                return graph(ids), graph.rows(n)
        logits, new = self.model.step(ids, state.to_memory_states(), expert_type=expert_type)
        return logits, RecurrentState.from_memory_states(new)


def _is_rows_of(state: RecurrentState, graph: CudaGraphStep, n: int) -> bool:
    """Whether state is already the graph's static state (the previous call's result): then the
    graph decodes on from it without a copy."""
    return (state.batch_size == n and state.expert_names == graph.state.expert_names
            and all(a.data_ptr() == b.data_ptr() for a, b in zip(state.tensors(), graph.state.tensors())))


def decode_step_for(model) -> DecodeStep:
    """The model's DecodeStep, made once and kept on the model (its graphs are reused by every
    generate call), remade when the weights moved."""
    step = model.__dict__.get("_decode_step")
    if step is None or step._key != step._model_key():
        step = DecodeStep(model)
        model.__dict__["_decode_step"] = step
    return step
