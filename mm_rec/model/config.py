"""MMRecConfig: every size and switch of the model in one dataclass."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field


@dataclass
class MMRecConfig:
    vocab_size: int = 32000
    expert_dim: int = 256          # d: channels of each expert
    num_layers: int = 16           # blocks per expert
    num_heads: int = 8             # heads of the long-term memory M
    ffn_dim: int = 3072
    mdi_dim: int | None = None     # r: MDI inner dim, d // 4 by default
    alpha_rank: int = 16           # low rank of the long-term decay projection
    alpha_temperature: float = 16.0  # tau in log(alpha) = logsigmoid(.) / tau
    dropout: float = 0.0
    fusion_method: str = "concatenate"  # "concatenate" or "weighted"
    use_fusion: bool = False
    # Chunk length C of the short-term recurrence's parallel (chunked) PyTorch form, the op's
    # chunk_size; it changes rounding only. (Saved configs call it "chunk_size": from_dict maps it.)
    scan_chunk_size: int = 64
    # Longer inputs run max_unchunked_len tokens at a time, carrying the states (forward's chunk_size).
    max_unchunked_len: int = 32768
    norm_eps: float = 1e-6
    init_std: float = 0.02
    tie_embeddings: bool = False
    expert_names: tuple = field(default=("text", "code"))

    def __post_init__(self):
        if self.mdi_dim is None:
            self.mdi_dim = max(1, self.expert_dim // 4)
        self.expert_names = tuple(self.expert_names)
        problems = []
        for name in ("vocab_size", "expert_dim", "num_layers", "num_heads", "ffn_dim", "mdi_dim",
                     "alpha_rank", "scan_chunk_size"):
            if int(getattr(self, name)) <= 0:
                problems.append(f"{name} must be positive (got {getattr(self, name)})")
        if self.expert_dim % max(1, self.num_heads):
            problems.append(f"expert_dim ({self.expert_dim}) must be divisible by num_heads ({self.num_heads})")
        if self.fusion_method not in ("concatenate", "weighted"):
            problems.append(f"fusion_method must be 'concatenate' or 'weighted' (got {self.fusion_method!r})")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def head_dim(self) -> int:
        return self.expert_dim // self.num_heads

    @property
    def model_dim(self) -> int:
        """Width after fusion: the two experts concatenated."""
        return self.expert_dim * len(self.expert_names)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["expert_names"] = list(self.expert_names)
        return d

    # Field names of earlier versions, as saved in their checkpoints and config.json files.
    RENAMED = {"chunk_size": "scan_chunk_size"}

    @classmethod
    def from_dict(cls, d: dict) -> "MMRecConfig":
        d = upgrade_config_dict(d)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown MMRecConfig fields: {', '.join(unknown)}")
        return cls(**d)

    # Fields that change the parameter shapes or the function computed; a checkpoint or a saved
    # session must agree with the model on all of them.
    ARCH_FIELDS = ("vocab_size", "expert_dim", "num_layers", "num_heads", "ffn_dim", "mdi_dim",
                   "alpha_rank", "alpha_temperature", "fusion_method", "tie_embeddings", "expert_names")

    def arch_dict(self) -> dict:
        d = self.to_dict()
        return {k: d[k] for k in self.ARCH_FIELDS}

    def arch_hash(self) -> str:
        blob = json.dumps(self.arch_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def upgrade_config_dict(d: dict) -> dict:
    """A saved config dict with the fields of earlier versions renamed (MMRecConfig.RENAMED)."""
    d = dict(d)
    for old, new in MMRecConfig.RENAMED.items():
        if old in d:
            value = d.pop(old)
            d.setdefault(new, value)
    return d


PRESETS = {
    # The guide's 100M configuration.
    "100m": dict(vocab_size=32000, expert_dim=256, num_layers=16, num_heads=8, ffn_dim=3072),
    # A model a 2-core CPU trains through all three stages in minutes.
    "tiny": dict(vocab_size=8192, expert_dim=64, num_layers=2, num_heads=4, ffn_dim=256),
}
