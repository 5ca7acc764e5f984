"""MMRecHFConfig: MMRecConfig as a Hugging Face `PretrainedConfig` (model_type "mmrec").

Every MMRecConfig field is an attribute of the same name, so config.json reads like our own
config plus the Hugging Face keys; `to_mmrec_config()` gives the MMRecConfig back (validated by
MMRecConfig itself). `expert_type` is the expert the model runs by default: None or "fused" for
both experts, "text" or "code" for one (forward and generate take it as an argument too).
"""
from __future__ import annotations

import dataclasses

from transformers import PretrainedConfig

from ..model.config import MMRecConfig, upgrade_config_dict

_FIELDS = tuple(f.name for f in dataclasses.fields(MMRecConfig))
EXPERT_TYPES = (None, "fused", "text", "code")


class MMRecHFConfig(PretrainedConfig):
    model_type = "mmrec"

    def __init__(self, expert_type: str | None = None, use_cache: bool = True, **kwargs):
        kwargs = upgrade_config_dict(kwargs)  # a config.json of an earlier version
        arch = MMRecConfig(**{name: kwargs.pop(name) for name in _FIELDS if name in kwargs})  # checked, defaults filled
        if expert_type not in EXPERT_TYPES:
            raise ValueError(f"expert_type must be one of {EXPERT_TYPES}, got {expert_type!r}")
        # MMRec100M never ties its LM head ([vocab, 2d]) to the embedding ([vocab, d]).
        kwargs["tie_word_embeddings"] = False
        super().__init__(**kwargs)
        for name, value in arch.to_dict().items():
            setattr(self, name, value)
        self.expert_type = expert_type
        self.use_cache = use_cache

    def to_mmrec_config(self) -> MMRecConfig:
        return MMRecConfig(**{name: getattr(self, name) for name in _FIELDS})

    @classmethod
    def from_mmrec_config(cls, config: MMRecConfig, **kwargs) -> "MMRecHFConfig":
        return cls(**config.to_dict(), **kwargs)
