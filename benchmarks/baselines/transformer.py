"""The equal-parameter Transformer baseline: MM-Rec with its sequence mixer swapped for attention.

Everything else is MM-Rec's: the shared embedding, two experts of `num_layers` pre-norm blocks and
a final RMSNorm each, the concatenation / FusionLayer, the final RMSNorm and the LM head, the same
width, heads (bench_train.py --transformer-heads changes them), vocab, init and `expert_type`
semantics. Each block is
    x = x + W_o SDPA(RoPE(q), RoPE(k), v)       q, k, v = split(RMSNorm(x) @ W_qkv), causal
    x = x + FFN(RMSNorm(x))                      FFN = Linear -> GELU -> Linear (with biases)
Attention has 4 d^2 parameters against MM-Rec's ~9 d^2 mixer, so `matched_ffn_dim` widens the
FFN until the totals agree (the parameter counts are printed by the benchmark).

With `mixer=False` the blocks have no sequence mixer at all (x = x + FFN(RMSNorm(x)) only): at
MM-Rec's own FFN width that is everything of an MM-Rec step but its mixer, so its step time is the
floor under any mixer's, and the Transformer's time over it the highest ratio any mixer could reach.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from benchmarks.baselines.mmrec_shortconv import KERNEL, causal_depthwise_conv
from mm_rec.model.config import MMRecConfig
from mm_rec.model.fusion import FusionLayer
from mm_rec.model.loss import chunked_cross_entropy
from mm_rec.model.norms import RMSNorm


def rope_tables(T: int, head_dim: int, device, base: float = 10000.0):
    inv = base ** (-torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.arange(T, device=device, dtype=torch.float32)[:, None] * inv[None]
    return angles.cos(), angles.sin()                           # [T, head_dim / 2]


def apply_rope(x, cos, sin):
    """x: [B, H, T, Dh]; rotates channel pairs (i, i + Dh/2)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).to(x.dtype)


class AttentionBlock(nn.Module):
    def __init__(self, config: MMRecConfig, ffn_dim: int, mixer: bool = True, short_conv: bool = False):
        super().__init__()
        d = config.expert_dim
        self.num_heads, self.head_dim = config.num_heads, d // config.num_heads
        self.mixer = mixer
        if mixer:
            self.norm = RMSNorm(d, config.norm_eps)
            self.qkv = nn.Linear(d, 3 * d, bias=False)
            self.out_proj = nn.Linear(d, d, bias=False)
        # bench_quality's MQAR only: q, k, v through mmrec_shortconv's width-4 causal convolution
        self.short_conv = nn.Conv1d(3 * d, 3 * d, KERNEL, groups=3 * d, bias=False) if mixer and short_conv else None
        self.ffn_norm = RMSNorm(d, config.norm_eps)
        self.ffn_in = nn.Linear(d, ffn_dim)
        self.ffn_out = nn.Linear(ffn_dim, d)
        mixer_linears = (self.qkv, self.out_proj) if mixer else ()
        for m in mixer_linears + (self.ffn_in, self.ffn_out):
            nn.init.normal_(m.weight, std=config.init_std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        with torch.no_grad():
            for m in mixer_linears[1:] + (self.ffn_out,):  # the residual outputs: out_proj, ffn_out
                m.weight.mul_(1 / math.sqrt(2 * config.num_layers))

    def forward(self, x, cos, sin):
        B, T, d = x.shape
        if self.mixer:
            qkv = self.qkv(self.norm(x))
            if self.short_conv is not None:
                qkv = causal_depthwise_conv(qkv.reshape(B * T, 3 * d), self.short_conv.weight, B, T)
            q, k, v = qkv.view(B, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
            a = F.scaled_dot_product_attention(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, is_causal=True)
            x = x + self.out_proj(a.transpose(1, 2).reshape(B, T, d))
        return x + self.ffn_out(F.gelu(self.ffn_in(self.ffn_norm(x))))


class TransformerExpert(nn.Module):
    def __init__(self, config: MMRecConfig, ffn_dim: int, mixer: bool = True, short_conv: bool = False):
        super().__init__()
        self.blocks = nn.ModuleList(AttentionBlock(config, ffn_dim, mixer, short_conv)
                                    for _ in range(config.num_layers))
        self.norm = RMSNorm(config.expert_dim, config.norm_eps)

    def forward(self, x, cos, sin):
        for block in self.blocks:
            x = block(x, cos, sin)
        return self.norm(x)


class TransformerBaseline(nn.Module):
    def __init__(self, config: MMRecConfig, ffn_dim: int | None = None, mixer: bool = True,
                 short_conv: bool = False):
        super().__init__()
        self.config = config
        ffn_dim = ffn_dim or config.ffn_dim
        d = config.expert_dim
        self.embedding = nn.Embedding(config.vocab_size, d)
        self.experts = nn.ModuleDict({n: TransformerExpert(config, ffn_dim, mixer, short_conv) for n in config.expert_names})
        self.fusion = FusionLayer(config.model_dim, config.fusion_method)
        self.norm = RMSNorm(config.model_dim, config.norm_eps)
        self.lm_head = nn.Linear(config.model_dim, config.vocab_size, bias=False)
        self.use_fusion = config.use_fusion
        self.use_gradient_checkpointing = False  # set by the trainer; not implemented here
        nn.init.normal_(self.embedding.weight, std=config.init_std)
        nn.init.normal_(self.lm_head.weight, std=config.init_std)
        # RoPE's cos/sin computed once, as buffers (as litgpt and most Transformer code keep them):
        # computed inside forward, a compiled step recomputed them in every layer's rotation
        # kernels, which then took about 10% of the step at 2x8192 on an H100.
        cos, sin = rope_tables(config.max_unchunked_len, config.head_dim, None)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, input_ids, expert_type=None):
        return self.lm_head(self.hidden(input_ids, expert_type))

    def loss(self, input_ids, targets, expert_type=None, chunk_size=None, return_memory=False, head_chunk=4096):
        """Mean cross-entropy with the LM head in chunks, as MMRec100M.loss (mm_rec/model/loss.py).
        The trainer's interface (mm_rec/training/trainer.py): attention sees the whole window, so
        chunk_size is ignored, and there is no memory state to return (None)."""
        loss = chunked_cross_entropy(self.hidden(input_ids, expert_type), self.lm_head, targets, head_chunk)
        return (loss, None) if return_memory else loss

    def get_num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def hidden(self, input_ids, expert_type=None):
        active = self.config.expert_names if expert_type in (None, "fused") else (expert_type,)
        x = self.embedding(input_ids)
        T = input_ids.shape[1]
        if T <= self.rope_cos.shape[0]:
            cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        else:  # longer than the tables
            cos, sin = rope_tables(T, self.config.head_dim, x.device)
        feats = {n: self.experts[n](x, cos, sin) for n in active}
        zeros = torch.zeros_like(next(iter(feats.values())))
        f = torch.cat([feats.get(n, zeros) for n in self.config.expert_names], -1)
        if self.use_fusion:
            f = self.fusion(f)
        return self.norm(f)


def matched_ffn_dim(config: MMRecConfig, target_params: int) -> int:
    """FFN width that brings the baseline's parameter count closest to `target_params`."""
    def count(ffn):
        with torch.device("meta"):  # shapes only, no memory
            return sum(p.numel() for p in TransformerBaseline(config, ffn).parameters())
    base = count(config.ffn_dim)
    per_unit = count(config.ffn_dim + 1) - base
    return config.ffn_dim + round((target_params - base) / per_unit)

