"""The whole training step replayed from one CUDA graph (`train_modular --cuda_graph`).

At Stage 1's 2,048-token steps the GPU runs a layer's kernels faster than Python can queue them:
the step is bound by the host, not the GPU. Captured once, the step's
forward, backward, gradient clipping and fused AdamW update replay with one launch.

    graphed = GraphedStep(optimizer)
    loss, grad_norm = graphed(key, step_fn, x, y)   # step_fn(x, y) -> tensors; does the whole step

step_fn is the trainer's (and bench_train's) `train_step` (step.py), which needs nothing more.

Per key and input shapes (the trainer keys by expert, one GraphedStep per stage and optimizer):
the first `warmup` calls run step_fn eagerly (they compile, autotune and create the optimizer's
state); the next captures it and replays it; later calls replay. What a captured step needs:
- its inputs in fixed buffers (every call copies its inputs in, warm-up included, so a compiled
  part never sees new strides) and its outputs in fixed tensors (overwritten by the next replay:
  the caller copies what it keeps);
- no host synchronisation and no decision taken on the host from device values (the trainer's step
  has none: a non-finite step is skipped on the device, through fused AdamW's found_inf);
- the learning rate as a device tensor: the scheduler keeps writing floats into the param groups,
  and each replay first copies them into the tensors the captured update reads;
- autocast without its weight cache, torch.compile without CUDA graphs of its own (graphs do not
  nest), activation checkpointing without saving the RNG state (the model saves it for dropout only).
All graphs of one GraphedStep share one memory pool: they replay one at a time on one stream and
keep nothing in the pool between replays but their outputs.

Without capture (`capture=False`: the CPU, and the tests that hold this path to the eager step) the
same buffers and learning-rate tensors are used and step_fn runs directly.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch


@dataclass
class _Entry:
    inputs: tuple                                   # the buffers every call of the key runs on
    calls: int = 0
    captured: bool = False                          # past warm-up (with capture=False: run directly)
    graph: "torch.cuda.CUDAGraph | None" = None
    outputs: tuple = ()


class GraphedStep:
    def __init__(self, optimizer: torch.optim.Optimizer, warmup: int = 2, capture: bool = True):
        if warmup < 1:
            raise ValueError("warmup must be at least 1: capture needs the optimizer's state to exist")
        self.optimizer = optimizer
        self.warmup, self.capture = warmup, capture
        self._entries: dict = {}
        self._pool = None
        first = optimizer.param_groups[0]["params"][0]
        # One per param group, on the device, in the update's own precision (fp32; fp64 for fp64
        # parameters, as the tests use): what the captured AdamW reads as its lr.
        dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
        self._lrs = [torch.zeros((), dtype=dtype, device=first.device) for _ in optimizer.param_groups]

    @property
    def captured(self) -> int:
        """How many graphs have been captured (one per key)."""
        return sum(e.captured for e in self._entries.values())

    def clear(self) -> None:
        """Drop every key's buffers, graph and outputs, and the shared pool: the memory goes back to
        PyTorch's allocator once the caller holds no outputs. The next call of a key starts its
        warm-up again (a benchmark moving to a larger shape uses this)."""
        self._entries.clear()
        self._pool = None

    def __call__(self, key, step_fn, *inputs: torch.Tensor) -> tuple:
        # Inputs of another shape, dtype or layout get a graph of their own (its own warm-up too).
        key = (key, *((x.shape, x.stride(), x.dtype) for x in inputs))
        entry = self._entries.get(key)
        if entry is None:
            # Made outside any graph's pool, with the inputs' strides: warm-up, capture and replays
            # all run on these same tensors, so a compiled part sees no new input to recompile for.
            entry = self._entries[key] = _Entry(tuple(
                torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device) for x in inputs))
        for buffer, x in zip(entry.inputs, inputs):
            buffer.copy_(x, non_blocking=True)
        entry.calls += 1
        if entry.calls <= self.warmup:
            return self._eager(step_fn, entry.inputs)
        if not entry.captured:
            self._capture(entry, step_fn)
        for lr, group in zip(self._lrs, self.optimizer.param_groups):
            lr.fill_(group["lr"])
        if entry.graph is None:  # capture=False: the same step on the same buffers, run directly
            with self._update_reads_tensors():
                return tuple(step_fn(*entry.inputs))
        entry.graph.replay()
        return entry.outputs

    def _eager(self, step_fn, inputs) -> tuple:
        if not self.capture:
            return tuple(step_fn(*inputs))
        # Warm-up on a side stream, as torch.cuda.graph's documentation asks: lazily created
        # handles and caches are then not made inside the capture.
        stream, current = torch.cuda.Stream(), torch.cuda.current_stream()
        stream.wait_stream(current)
        with torch.cuda.stream(stream):
            outputs = tuple(step_fn(*inputs))
        current.wait_stream(stream)
        return outputs

    def _capture(self, entry: _Entry, step_fn) -> None:
        entry.captured = True
        if not self.capture:
            return
        # The graph's own gradients: backward assigns them (no accumulation into stale ones).
        self.optimizer.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        with self._update_reads_tensors(capturable=True), torch.cuda.graph(graph, pool=self._pool):
            outputs = tuple(step_fn(*entry.inputs))
        if self._pool is None:
            self._pool = graph.pool()
        entry.graph, entry.outputs = graph, outputs

    @contextlib.contextmanager
    def _update_reads_tensors(self, capturable: bool = False):
        """The param groups' lr as this object's tensors (and, while capturing, capturable=True,
        which AdamW requires); the floats put back afterwards, for the scheduler and checkpoints."""
        groups = self.optimizer.param_groups
        saved = [(g["lr"], g.get("capturable", False)) for g in groups]
        try:
            for g, lr in zip(groups, self._lrs):
                g["lr"] = lr
                if capturable:
                    g["capturable"] = True
            yield
        finally:
            for g, (lr, cap) in zip(groups, saved):
                g["lr"], g["capturable"] = lr, cap


def inner_compile_mode(mode: str | None) -> str | None:
    """The torch.compile mode for code that runs inside a captured step: its own CUDA graphs off."""
    return {"reduce-overhead": None, "max-autotune": "max-autotune-no-cudagraphs"}.get(mode, mode)


__all__ = ["GraphedStep", "inner_compile_mode"]
