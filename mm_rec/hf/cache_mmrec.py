"""MMRecCache: the recurrent state that `generate()` carries between steps.

A Transformer's cache grows with every token (keys and values); MM-Rec's is fixed in size: per
expert and layer the short-term memory h [B, d] and the long-term memory M [B, H, d_h, d_h]
(MMRec100M's `memory_states`). `seen_tokens` counts the tokens the state has consumed, which is
what `generate()` asks a cache for (get_seq_length) to know which input ids are new.

It subclasses transformers' `Cache` so that generate() accepts and returns it, with no attention
layers (empty `layers`): nothing in it can be cropped (a recurrent state cannot be rolled back), so
assisted decoding is refused, as for Mamba.
"""
from __future__ import annotations

import torch
from transformers.cache_utils import Cache

from ..inference.state import RecurrentState


class MMRecCache(Cache):
    is_compileable = False

    def __init__(self, states: dict | None = None, seen_tokens: int = 0):
        try:
            super().__init__(layers=[])
        except TypeError:  # transformers whose Cache takes no layers
            super().__init__()
        self.states = states          # {"text": [{"h", "M"} per layer], "code": [...]} or None
        self.seen_tokens = seen_tokens

    def __repr__(self) -> str:
        experts = sorted(self.states) if self.states else []
        return f"MMRecCache(experts={experts}, seen_tokens={self.seen_tokens})"

    def __len__(self) -> int:
        return len(next(iter(self.states.values()))) if self.states else 0

    def layer_state(self, expert: str, layer: int) -> dict:
        """{"h": [B, d], "M": [B, H, d_h, d_h]} of one layer of one expert."""
        return self.states[expert][layer]

    def update(self, states: dict, num_new_tokens: int) -> None:
        # An expert that did not run in this call (expert_type="text") keeps its state.
        self.states = {**(self.states or {}), **states}
        self.seen_tokens += num_new_tokens

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1  # no limit: the state does not grow

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0):
        return self.seen_tokens + query_length, 0

    @property
    def is_croppable(self) -> bool:
        return False

    @property
    def is_initialized(self) -> bool:
        return self.states is not None

    @property
    def batch_size(self) -> int:
        if not self.states:
            return -1
        return next(iter(self.states.values()))[0]["h"].shape[0]

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a recurrent state cannot be cropped (assisted decoding needs that)")

    def reset(self) -> None:
        self.states, self.seen_tokens = None, 0

    def _map(self, fn) -> None:
        if self.states is not None:
            self.states = RecurrentState.from_memory_states(self.states).map(fn).to_memory_states()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map(lambda t: t[indices])

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def offload(self, *args, **kwargs) -> None:  # nothing to move between devices layer by layer
        pass

    def prefetch(self, *args, **kwargs) -> None:
        pass
