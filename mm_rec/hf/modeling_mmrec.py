"""MMRecForCausalLM: MMRec100M as a Hugging Face `PreTrainedModel` with `generate()`.

The model is MMRec100M itself (`self.model`); this class only translates the Hugging Face calling
conventions to it:
- `attention_mask`: rows padded on the right or on the left. A recurrent state would take the pad
  tokens in, so rows whose padding differs run as separate groups on their own tokens (as
  mm_rec.inference.generation does with prompts of different lengths): every row gets exactly the
  logits and state it gets alone. Logits at pad positions are zeros.
- `past_key_values` / `cache` (transformers 5 renamed it): an MMRecCache holding h and M of every
  layer; `use_cache` returns it updated.
- `logits_to_keep=1` (what generate() asks for): the prompt is consumed without the LM head and
  its last token stepped, through mm_rec's own `prefill` and `step`, so generate() makes the
  tokens mm_rec's generation makes.
- `labels`: the mean next-token cross-entropy (labels shifted inside, -100 ignored).
- `expert_type`: "text", "code", or None / "fused" for both; defaults to config.expert_type.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..inference.generation import prefill
from ..inference.state import RecurrentState
from ..model.mmrec import MMRec100M
from .cache_mmrec import MMRecCache
from .configuration_mmrec import MMRecHFConfig

# transformers 5 calls the cache `cache`, 4.x `past_key_values`.
CACHE_KEY = "cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} else "past_key_values"


def row_spans(attention_mask: torch.Tensor) -> list[tuple[int, int]]:
    """[B, T] mask of 0/1 -> each row's (start, end): its 1s must be one run (left or right padding)."""
    mask = attention_mask.bool()
    lengths = mask.sum(1)
    starts = torch.where(lengths > 0, mask.int().argmax(1), torch.zeros_like(lengths))
    pos = torch.arange(mask.shape[1], device=mask.device)
    expected = (pos >= starts[:, None]) & (pos < (starts + lengths)[:, None])
    if not torch.equal(expected, mask):
        raise ValueError("attention_mask: the 1s of each row must be one run (padding on the left or the right only)")
    return list(zip(starts.tolist(), (starts + lengths).tolist()))


class MMRecPreTrainedModel(PreTrainedModel):
    config_class = MMRecHFConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["MMRecBlock"]
    _is_stateful = True           # no assisted decoding: a recurrent state cannot be rolled back
    _supports_cache_class = True  # transformers 4.x

    def _init_weights(self, module):
        pass  # MMRec100M initialises its own parameters (reset_parameters) when it is built


class MMRecForCausalLM(MMRecPreTrainedModel, GenerationMixin):
    def __init__(self, config: MMRecHFConfig):
        super().__init__(config)
        self.model = MMRec100M(config=config.to_mmrec_config())
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # it makes its own MMRecCache, as Mamba does

    def get_input_embeddings(self):
        return self.model.embedding

    def set_input_embeddings(self, value):
        self.model.embedding = value

    def get_output_embeddings(self):
        return self.model.lm_head

    def set_output_embeddings(self, value):
        self.model.lm_head = value

    # -- forward ---------------------------------------------------------------------------------
    def _state_dtype(self) -> torch.dtype:
        return torch.promote_types(self.model.embedding.weight.dtype, torch.float32)

    def _run_groups(self, input_ids, spans, expert_type, states):
        """Full logits [B, T, V] and states, each group of rows with the same span on its own tokens."""
        B, T = input_ids.shape
        groups: dict[tuple[int, int], list[int]] = {}
        for row, span in enumerate(spans):
            groups.setdefault(span, []).append(row)
        logits = None
        parts, order = [], []
        for (start, end), rows in groups.items():
            rows_t = torch.tensor(rows, device=input_ids.device)
            sub = None if states is None else RecurrentState.from_memory_states(states).select(rows_t).to_memory_states()
            if end > start:
                part, new = self.model(input_ids[rows_t, start:end], expert_type=expert_type, memory_states=sub,
                                       return_memory=True)
                if logits is None:
                    logits = part.new_zeros(B, T, part.shape[-1])
                logits[rows_t, start:end] = part
            else:  # a row of padding only: its state stays as it was
                zeros = self.model.init_memory_states(len(rows), expert_type, input_ids.device, self._state_dtype())
                new = {name: (sub or {}).get(name) or layers for name, layers in zeros.items()}
            parts.append(new)
            order.extend(rows)
        inverse = torch.empty(B, dtype=torch.long)
        inverse[torch.tensor(order)] = torch.arange(B)
        if logits is None:
            logits = torch.zeros(B, T, self.config.vocab_size, device=input_ids.device, dtype=self.dtype)
        merged = RecurrentState.concat([RecurrentState.from_memory_states(p) for p in parts])
        return logits, merged.select(inverse.to(input_ids.device)).to_memory_states()

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                past_key_values: MMRecCache | None = None, use_cache: bool | None = None,
                labels: torch.LongTensor | None = None, expert_type: str | None = None,
                logits_to_keep: int = 0, return_dict: bool | None = None, cache: MMRecCache | None = None,
                **kwargs):
        if input_ids is None:
            raise ValueError("MMRecForCausalLM needs input_ids (inputs_embeds are not supported)")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq_len], got shape {tuple(input_ids.shape)}")
        cache = cache if cache is not None else past_key_values
        if cache is not None and not isinstance(cache, MMRecCache):
            if cache.get_seq_length() > 0:
                raise ValueError(f"MMRecForCausalLM keeps its state in an MMRecCache, not a {type(cache).__name__}")
            cache = None  # an empty cache made for attention models: start a state of our own
        use_cache = self.config.use_cache if use_cache is None else use_cache
        expert_type = self.config.expert_type if expert_type is None else expert_type
        states = cache.states if cache is not None else None
        T = input_ids.shape[1]
        # The mask covers the whole sequence so far (generate) or just these tokens.
        spans = None if attention_mask is None else row_spans(attention_mask[:, -T:])
        plain = spans is None or all(span == (0, T) for span in spans)

        if logits_to_keep == 1 and labels is None and not torch.is_grad_enabled():
            # generate(): mm_rec's own prefill (grouped by length) and step
            prompts = list(input_ids) if plain else [input_ids[b, s:e] for b, (s, e) in enumerate(spans)]
            start = None if states is None else RecurrentState.from_memory_states(states)
            last, new_states = prefill(self.model, prompts, expert_type, start)
            new_states = new_states.to_memory_states()
            logits = last[:, None]
        elif plain:
            logits, new_states = self.model(input_ids, expert_type=expert_type, memory_states=states,
                                            return_memory=True)
        elif not use_cache and states is None and all(start == 0 for start, _ in spans):
            # right padding, no state wanted: each row's tokens never see the padding after them
            logits, new_states = self.model(input_ids, expert_type=expert_type), None
            logits = logits.masked_fill(~attention_mask[:, -T:].bool()[..., None], 0.0)
        else:
            logits, new_states = self._run_groups(input_ids, spans, expert_type, states)

        loss = None
        if labels is not None:
            labels = labels.to(logits.device)
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            logits = logits[:, -logits_to_keep:]
        if use_cache:
            cache = cache if cache is not None else MMRecCache()
            cache.update(new_states, T)
        output = CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_KEY: cache if use_cache else None})
        return output if return_dict is not False else output.to_tuple()

    def save_pretrained(self, save_directory, *args, **kwargs):
        """transformers' save_pretrained (weights under its names, "model." first), plus the modelling
        files config.json's auto_map points at, so the directory loads where mm_rec is not installed.
        (Loaded as remote code, transformers copies its own files; mm_rec's export writes them here.)"""
        super().save_pretrained(save_directory, *args, **kwargs)
        try:
            from .export import write_shipped_sources
        except ImportError:
            return
        if kwargs.get("is_main_process", True):
            write_shipped_sources(save_directory)

    # -- generate ---------------------------------------------------------------------------------
    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, attention_mask=None, use_cache=True,
                                      cache=None, **kwargs):
        cache = cache if cache is not None else past_key_values
        if use_cache and isinstance(cache, MMRecCache) and cache.seen_tokens:
            input_ids = input_ids[:, cache.seen_tokens:]  # only what the state has not consumed yet
        inputs = {"input_ids": input_ids.contiguous(), "attention_mask": attention_mask, "use_cache": use_cache,
                  CACHE_KEY: cache}
        for key in ("expert_type", "logits_to_keep"):
            if key in kwargs:
                inputs[key] = kwargs[key]
        return inputs
