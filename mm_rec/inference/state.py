"""RecurrentState: a batch of sequences' whole context, as typed batched tensors.

A recurrent model's context is its memory state: per expert and layer a short-term vector
h [B, d] and a long-term matrix per head M [B, H, d_h, d_h], row b belonging to sequence b. The
model's own calls (`MMRec100M.step` / `consume` / `forward`) take and return it as nested dicts,
{"text": [{"h", "M"} per layer], "code": [...]}; everything that handles states between those calls
(generation, sessions, the server's continuous batching) uses this object instead, which knows how
to pick rows, join batches, move and compare them:

    state = RecurrentState.from_memory_states(model_states)      # no copy
    state.select([0, 2]); RecurrentState.concat([a, b]); state.to("cuda")
    model.step(ids, state.to_memory_states())                    # no copy

The layer tensors are the model's own (views, never stacked), so converting either way is free.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch


def flat_by_dtype(tensors: Sequence[torch.Tensor]) -> list[tuple[list[int], torch.Tensor]]:
    """(indices into tensors, their values concatenated into one flat buffer) per dtype: one copy
    and a single call into torch for dozens of tensors (each call lets other threads take the GIL,
    and on a device each copy is a kernel, each transfer a wait)."""
    groups: dict[torch.dtype, list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault(t.dtype, []).append(i)
    return [(group, torch.cat([tensors[i].detach().reshape(-1) for i in group])) for group in groups.values()]


def split_flat(flat: torch.Tensor, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Views of `flat` (flat_by_dtype's buffer) shaped as `like`, in order."""
    return [part.view(t.shape) for part, t in zip(flat.split([t.numel() for t in like]), like)]


@dataclass(frozen=True)
class LayerState:
    h: torch.Tensor  # [B, d]           short-term memory
    M: torch.Tensor  # [B, H, d_h, d_h] long-term memory, one matrix per head


class RecurrentState:
    """Per expert (in a fixed order), per layer, the batched h and M of B sequences."""

    __slots__ = ("experts",)

    def __init__(self, experts: dict[str, Sequence[LayerState]]):
        if not experts:
            raise ValueError("a RecurrentState needs at least one expert")
        self.experts: dict[str, tuple[LayerState, ...]] = {name: tuple(layers) for name, layers in experts.items()}

    # -- conversion to and from the model's nested dicts -----------------------------------------
    @classmethod
    def from_memory_states(cls, memory_states: dict) -> "RecurrentState":
        return cls({name: [LayerState(layer["h"], layer["M"]) for layer in layers]
                    for name, layers in memory_states.items()})

    def to_memory_states(self) -> dict:
        return {name: [{"h": s.h, "M": s.M} for s in layers] for name, layers in self.experts.items()}

    @classmethod
    def zeros(cls, model, batch_size: int, experts: Iterable[str], device=None,
              dtype: torch.dtype = torch.float32) -> "RecurrentState":
        """The state of an empty context (what the model starts from when given None)."""
        return cls.from_memory_states({name: [b.init_state(batch_size, device, dtype)
                                              for b in model.experts[name].blocks] for name in experts})

    # -- shape ------------------------------------------------------------------------------------
    def _first(self) -> torch.Tensor:
        return next(iter(self.experts.values()))[0].h

    @property
    def batch_size(self) -> int:
        return self._first().shape[0]

    @property
    def device(self) -> torch.device:
        return self._first().device

    @property
    def dtype(self) -> torch.dtype:
        return self._first().dtype

    @property
    def expert_names(self) -> tuple[str, ...]:
        return tuple(self.experts)

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor, in a fixed order (expert, layer, h then M)."""
        return [t for layers in self.experts.values() for s in layers for t in (s.h, s.M)]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def __len__(self) -> int:
        return self.batch_size

    def __repr__(self) -> str:
        layers = {name: len(v) for name, v in self.experts.items()}
        return f"RecurrentState(batch={self.batch_size}, layers={layers}, {self.dtype}, {self.device})"

    # -- row operations ---------------------------------------------------------------------------
    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "RecurrentState":
        return RecurrentState({name: [LayerState(fn(s.h), fn(s.M)) for s in layers]
                               for name, layers in self.experts.items()})

    def select(self, rows) -> "RecurrentState":
        """The given rows (a list or LongTensor of indices), in that order: a copy."""
        rows = torch.as_tensor(rows, dtype=torch.long).to(self.device)
        return self.map(lambda t: t.index_select(0, rows))

    def unbind(self) -> list["RecurrentState"]:
        """Each row as a state of batch 1: views of self's tensors, no copy (a row's view keeps the
        whole batch's tensors alive)."""
        rows = zip(*(t.split(1) for t in self.tensors()))
        return [self._with_tensors(row) for row in rows]

    def compact(self, device=None) -> "RecurrentState":
        """A copy whose tensors are views of one buffer per dtype, on `device` (default: where it
        is): its own memory, made by one copy (and one transfer) instead of one per tensor (a state
        holds a few dozen)."""
        tensors = self.tensors()
        copies: list[torch.Tensor | None] = [None] * len(tensors)
        for group, flat in flat_by_dtype(tensors):
            if device is not None:
                flat = flat.to(device)
            for i, view in zip(group, split_flat(flat, [tensors[i] for i in group])):
                copies[i] = view
        return self._with_tensors(copies)

    def _with_tensors(self, tensors: Sequence[torch.Tensor]) -> "RecurrentState":
        """A state of self's experts and layers holding `tensors`, in the order of tensors()."""
        it = iter(tensors)
        return RecurrentState({name: [LayerState(next(it), next(it)) for _ in layers]
                               for name, layers in self.experts.items()})

    @staticmethod
    def concat(parts: Sequence["RecurrentState"]) -> "RecurrentState":
        """The rows of every part, one batch after the other (the parts must hold the same experts)."""
        if not parts:
            raise ValueError("nothing to concatenate")
        names = parts[0].expert_names
        if any(p.expert_names != names for p in parts):
            raise ValueError(f"cannot concatenate states of different experts: {[p.expert_names for p in parts]}")
        if len(parts) == 1:
            return parts[0]
        return RecurrentState({name: [LayerState(torch.cat([p.experts[name][i].h for p in parts]),
                                                 torch.cat([p.experts[name][i].M for p in parts]))
                                      for i in range(len(parts[0].experts[name]))] for name in names})

    def where(self, mask: torch.Tensor, other: "RecurrentState") -> "RecurrentState":
        """Row b from self where mask[b], else from other."""
        def pick(a, b):
            return torch.where(mask.to(a.device).view(-1, *([1] * (a.dim() - 1))), a, b)
        return RecurrentState({name: [LayerState(pick(s.h, o.h), pick(s.M, o.M))
                                      for s, o in zip(layers, other.experts[name])]
                               for name, layers in self.experts.items()})

    def replace_rows(self, rows, other: "RecurrentState") -> "RecurrentState":
        """A copy of self whose given rows are other's rows (other has len(rows) rows)."""
        rows = torch.as_tensor(rows, dtype=torch.long).to(self.device)
        return RecurrentState({name: [LayerState(s.h.index_copy(0, rows, o.h), s.M.index_copy(0, rows, o.M))
                                      for s, o in zip(layers, other.experts[name])]
                               for name, layers in self.experts.items()})

    # -- whole-state operations --------------------------------------------------------------------
    def to(self, device=None, dtype: torch.dtype | None = None) -> "RecurrentState":
        return self.map(lambda t: t.to(device=device, dtype=dtype))

    def clone(self) -> "RecurrentState":
        return self.map(torch.clone)

    def copy_(self, other: "RecurrentState") -> "RecurrentState":
        """Copy other's values into self's tensors in place (rows 0..len(other)-1), e.g. into the
        static buffers of a captured CUDA graph."""
        n = other.batch_size
        dst = self.tensors() if n == self.batch_size else [t[:n] for t in self.tensors()]
        torch._foreach_copy_(dst, other.tensors())
        return self

    def with_experts(self, names: Iterable[str], model) -> "RecurrentState":
        """Exactly the experts `names`, in that order: a missing one starts from zeros (as the model
        does when an expert's state is absent), extra ones are dropped."""
        names = tuple(names)
        if names == self.expert_names:
            return self
        missing = [n for n in names if n not in self.experts]
        zeros = (RecurrentState.zeros(model, self.batch_size, missing, self.device, self.dtype).experts
                 if missing else {})
        return RecurrentState({n: self.experts[n] if n in self.experts else zeros[n] for n in names})

    def merged_into(self, base: "RecurrentState | None") -> "RecurrentState":
        """base's experts replaced by self's: an expert that did not run in a turn (expert "text" on
        a session that also holds "code") keeps its state."""
        if base is None:
            return self
        return RecurrentState({**base.experts, **self.experts})

    def equal(self, other: "RecurrentState") -> bool:
        return (self.expert_names == other.expert_names
                and all(torch.equal(a, b) for a, b in zip(self.tensors(), other.tensors())))
