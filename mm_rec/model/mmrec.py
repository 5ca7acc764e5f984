"""MMRec100M: the modular model (ARCHITECTURE.md, "The modular model").

    input_ids [B, T] -> shared Embedding(vocab, d)
               |- Text expert: blocks + RMSNorm -> t [B, T, d]
               '- Code expert: blocks + RMSNorm -> c [B, T, d]
    f = [t ; c]  (FusionLayer([t ; c]) when use_fusion)  ->  logits = LMHead(RMSNorm(f))

With expert_type="text" only the text expert runs and the code half of f is zeros (and vice versa).
Memory states are {"text": [{"h", "M"} per layer], "code": [...]}, holding the experts that ran;
a missing expert or None starts from zeros.

Three lengths, three names: `chunk_size` (forward, loss, consume; the guide's) is how many tokens
run per span, the states carried from span to span; `head_chunk` (loss) how many tokens the LM head
and cross-entropy take at a time; `config.scan_chunk_size` the chunk length inside the short-term
recurrence's parallel form (mm_rec.ops' chunk_size).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .config import MMRecConfig
from .expert import ExpertModule, experts_forward
from .fusion import FusionLayer
from .loss import chunked_cross_entropy
from .norms import RMSNorm

EXPERT_TYPES = (None, "text", "code", "fused")


class MMRec100M(nn.Module):
    def __init__(self, vocab_size: int = 32000, expert_dim: int = 256, num_layers: int = 16,
                 num_heads: int = 8, ffn_dim: int = 3072, config: MMRecConfig | None = None, **kwargs):
        super().__init__()
        if config is None:
            config = MMRecConfig(vocab_size=vocab_size, expert_dim=expert_dim, num_layers=num_layers,
                                 num_heads=num_heads, ffn_dim=ffn_dim, **kwargs)
        self.config = config
        d = config.expert_dim
        self.embedding = nn.Embedding(config.vocab_size, d)
        self.experts = nn.ModuleDict({name: ExpertModule(config) for name in config.expert_names})
        self.fusion = FusionLayer(config.model_dim, config.fusion_method)
        self.norm = RMSNorm(config.model_dim, config.norm_eps)
        self.lm_head = nn.Linear(config.model_dim, config.vocab_size, bias=False)
        self.use_fusion = config.use_fusion
        self.use_gradient_checkpointing = False
        self._use_kernel_fusion = True
        self._block_fn = self._head_loss_fn = None  # set by compile_blocks
        self.reset_parameters()

    # -- switches --------------------------------------------------------------------------------
    @property
    def use_kernel_fusion(self) -> bool:
        """Fused input projection, the active experts as one batched computation (model/batched.py)
        and, on CUDA, the recurrence kernels (default True). False runs the same maths expert by
        expert, as separate projections, on the plain PyTorch recurrences."""
        return self._use_kernel_fusion

    @use_kernel_fusion.setter
    def use_kernel_fusion(self, value: bool) -> None:
        self._use_kernel_fusion = bool(value)
        for expert in self.experts.values():
            for block in expert.blocks:
                block.use_kernel_fusion = self._use_kernel_fusion

    def compile_blocks(self, mode: str | None = None, **compile_kwargs) -> "MMRec100M":
        """torch.compile the layer (model/block.py's block_forward) instead of the whole model:
        every layer of every expert runs the same maths on its own weights, so one compiled graph
        (and, with mode="reduce-overhead", one CUDA graph per call) serves them all and compile
        time does not grow with depth. loss() also compiles its LM head and cross-entropy (per
        chunk); the embedding and the fusion layer stay eager (a few ops). Applies to the fused path
        (use_kernel_fusion, the default). The layer gets Inductor's combo kernels where a call has
        few tokens (mm_rec/utils/compile.py). Returns self."""
        from ..ops import load_gpu_backend
        from ..utils.compile import compile_by_tokens, compile_fn
        from .block import block_forward
        from .loss import _head_loss_sum
        # The kernels are imported before tracing: the traced recurrences call them, not PyTorch's.
        load_gpu_backend()
        # x [E, B, T, d]: combo kernels for calls of few tokens (mm_rec/utils/compile.py)
        self._block_fn = compile_by_tokens(block_forward, lambda linears, norms, x, *_: x.numel() // x.shape[-1],
                                           mode=mode, fullgraph=True, **compile_kwargs)
        # The LM head and loss per chunk: compiled too (no CUDA graphs: a few large kernels), so the
        # fp32 cast, log-softmax and gather are fused rather than the chunk's fp32 logits written out.
        self._head_loss_fn = compile_fn(_head_loss_sum, combo=False, fullgraph=True)
        return self

    @property
    def recompute_gates(self) -> bool:
        """Recompute each block's gates in backward instead of keeping their fp32 intermediates
        (default True: about a fifth less activation memory; the same gradients)."""
        return all(b.recompute_gates for e in self.experts.values() for b in e.blocks)

    @recompute_gates.setter
    def recompute_gates(self, value: bool) -> None:
        for expert in self.experts.values():
            for block in expert.blocks:
                block.recompute_gates = bool(value)

    @property
    def text_expert(self) -> ExpertModule:
        return self.experts["text"]

    @property
    def code_expert(self) -> ExpertModule:
        return self.experts["code"]

    @torch.no_grad()
    def reset_parameters(self) -> None:
        std = self.config.init_std
        nn.init.normal_(self.embedding.weight, std=std)
        nn.init.normal_(self.lm_head.weight, std=std)
        for expert in self.experts.values():
            for block in expert.blocks:
                block.reset_parameters()
        self.fusion.reset_parameters()

    # -- forward ---------------------------------------------------------------------------------
    def _experts_for(self, expert_type):
        if expert_type not in EXPERT_TYPES:
            raise ValueError(f"expert_type must be None, 'text', 'code' or 'fused', got {expert_type!r}")
        return self.config.expert_names if expert_type in (None, "fused") else (expert_type,)

    def _hidden(self, features: dict) -> torch.Tensor:
        """[t ; c] (zeros for an expert that did not run), fused when use_fusion, normed: the LM
        head's input [B, T, 2d]."""
        zeros = None
        parts = []
        for name in self.config.expert_names:
            if name in features:
                parts.append(features[name])
            else:
                if zeros is None:
                    zeros = torch.zeros_like(next(iter(features.values())))
                parts.append(zeros)
        f = torch.cat(parts, dim=-1)
        if self.use_fusion:
            f = self.fusion(f)
        return self.norm(f)

    def _forward_span(self, input_ids, active, memory_states, output: str = "logits"):
        """One span through the active experts -> (logits | LM-head input | None, new states)."""
        x = self.embedding(input_ids)
        ckpt = self.use_gradient_checkpointing and self.training
        if self._use_kernel_fusion:  # the active experts as one batched computation (model/batched.py)
            states = None
            if memory_states is not None and any(memory_states.get(n) is not None for n in active):
                states = [memory_states.get(n) or self._zero_states(n, x) for n in active]
            outs, new = experts_forward([self.experts[n] for n in active], x, states, ckpt, self._block_fn)
            features, new_states = dict(zip(active, outs)), dict(zip(active, new))
        else:
            features, new_states = {}, {}
            for name in active:
                states = None if memory_states is None else memory_states.get(name)
                features[name], new_states[name] = self.experts[name](x, states, gradient_checkpointing=ckpt)
        if output == "none":
            return None, new_states
        hidden = self._hidden(features)
        return (self.lm_head(hidden) if output == "logits" else hidden), new_states

    def _run(self, input_ids, expert_type, memory_states, span, output: str):
        """The whole sequence, `span` tokens at a time carrying the states (forward's chunk_size)."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq_len], got shape {tuple(input_ids.shape)}")
        active = self._experts_for(expert_type)
        T = input_ids.shape[1]
        if span is None and T > self.config.max_unchunked_len:
            span = self.config.max_unchunked_len
        if span is not None and span <= 0:
            raise ValueError(f"chunk_size must be positive, got {span}")
        if span is None or span >= T:
            return self._forward_span(input_ids, active, memory_states, output)
        pieces, states = [], memory_states
        for start in range(0, T, span):
            piece, states = self._forward_span(input_ids[:, start:start + span], active, states, output)
            pieces.append(piece)
        return (None if output == "none" else torch.cat(pieces, dim=1)), states

    def forward(self, input_ids: torch.Tensor, expert_type: str | None = None, memory_states: dict | None = None,
                chunk_size: int | None = None, return_memory: bool = False):
        """input_ids [B, T] -> logits [B, T, vocab] (and the final memory states if return_memory).

        chunk_size=N runs the sequence N tokens at a time carrying the memory states: the same
        logits, with activation memory bounded by the chunk. Inputs longer than
        config.max_unchunked_len are chunked automatically.
        """
        logits, states = self._run(input_ids, expert_type, memory_states, chunk_size, "logits")
        return (logits, states) if return_memory else logits

    def hidden(self, input_ids: torch.Tensor, expert_type: str | None = None, memory_states: dict | None = None,
               chunk_size: int | None = None) -> torch.Tensor:
        """The LM head's input [B, T, 2 * expert_dim] (forward's logits are lm_head of it): for
        features, probes, or a loss over a few positions only."""
        return self._run(input_ids, expert_type, memory_states, chunk_size, "hidden")[0]

    def loss(self, input_ids: torch.Tensor, targets: torch.Tensor, expert_type: str | None = None,
             memory_states: dict | None = None, chunk_size: int | None = None, return_memory: bool = False,
             head_chunk: int = 4096):
        """Mean next-token cross-entropy (fp32) of forward's logits against targets [B, T], without
        ever holding the [B, T, vocab] logits: the LM head and the loss run head_chunk tokens at a
        time and are recomputed in backward (activation checkpointing), so the step keeps one
        chunk's logits instead of every token's (at 4 x 4096 tokens and vocab 32000, gigabytes).
        The same value and gradients as F.cross_entropy(model(input_ids).float(), targets)."""
        hidden, states = self._run(input_ids, expert_type, memory_states, chunk_size, "hidden")
        loss = chunked_cross_entropy(hidden, self.lm_head, targets, head_chunk, self._head_loss_fn)
        return (loss, states) if return_memory else loss

    @torch.no_grad()
    def consume(self, input_ids: torch.Tensor, expert_type: str | None = None, memory_states: dict | None = None,
                chunk_size: int | None = None) -> dict:
        """Run a sequence through the experts for its memory states only: forward(...,
        return_memory=True)'s states without the LM head, so a long prompt (or a batch of them)
        never materialises [B, T, vocab] logits. Used by generation's prefill."""
        if chunk_size is not None and chunk_size <= 0:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        _, states = self._run(input_ids, expert_type, memory_states, chunk_size, "none")
        return states

    @torch.no_grad()
    def step(self, input_ids: torch.Tensor, memory_states: dict | None = None, expert_type: str | None = None):
        """One token per sequence: input_ids [B] (or [B, 1]) -> (logits [B, vocab], new states).

        Costs the same whatever the length of the context held in memory_states.
        """
        if input_ids.dim() == 2:
            input_ids = input_ids[:, 0]
        x = self.embedding(input_ids)
        features, new_states = {}, {}
        for name in self._experts_for(expert_type):
            states = None if memory_states is None else memory_states.get(name)
            features[name], new_states[name] = self.experts[name].step(x, states)
        return self.lm_head(self._hidden(features)), new_states

    def _zero_states(self, name: str, x: torch.Tensor) -> list:
        dtype = torch.promote_types(x.dtype, torch.float32)
        return [b.init_state(x.shape[0], x.device, dtype) for b in self.experts[name].blocks]

    def init_memory_states(self, batch_size: int, expert_type: str | None = None, device=None,
                           dtype=torch.float32) -> dict:
        return {name: [b.init_state(batch_size, device, dtype) for b in self.experts[name].blocks]
                for name in self._experts_for(expert_type)}

    # -- bookkeeping -----------------------------------------------------------------------------
    def get_expert_params(self) -> dict:
        count = lambda m: sum(p.numel() for p in m.parameters())
        parts = {name: count(expert) for name, expert in self.experts.items()}
        parts.update(fusion=count(self.fusion), embedding=count(self.embedding),
                     lm_head=count(self.lm_head), final_norm=count(self.norm))
        parts["total"] = sum(parts.values())
        return parts

    def get_num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.embedding.weight.numel() if non_embedding else n

    # -- inference (implemented in mm_rec.inference) ----------------------------------------------
    def generate(self, input_ids, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, expert_type: str | None = None, memory_states: dict | None = None,
                 **kwargs):
        """Prompt(s) -> prompt + new token ids; temperature 0 is greedy. See mm_rec.inference.generation."""
        from ..inference.generation import generate
        return generate(self, input_ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                        expert_type=expert_type, memory_states=memory_states, **kwargs)

    @classmethod
    def from_pretrained(cls, path, device=None, dtype: torch.dtype | None = None) -> "MMRec100M":
        """Load an exported directory (model.safetensors + config.json) or a checkpoint file."""
        from ..inference.export import from_pretrained
        return from_pretrained(path, device=device, dtype=dtype)

    def save_pretrained(self, path, tokenizer=None):
        """Write model.safetensors, config.json (and tokenizer.json) to the directory `path`."""
        from ..inference.export import save_pretrained
        return save_pretrained(self, path, tokenizer=tokenizer)
