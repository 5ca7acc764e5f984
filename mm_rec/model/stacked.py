"""Both experts as one batched computation.

When the Text and the Code expert both run, their layer l blocks see inputs of the same shape and
do the same maths with different weights. Here layer l of every expert runs at once: activations
are stacked on a leading expert axis [E, B, T, d], each nn.Linear becomes one batched matmul over
the experts' weights stacked on the fly (torch.stack of E small matrices: a copy far smaller than
the activations), and each recurrence is one kernel call over E * B sequences. That halves the
kernel launches of a training step and doubles the work of each latency-bound recurrence launch.

The parameters stay in the per-expert `MMRecBlock`s (same state_dict, same optimizer groups), and
the function is exactly `MMRecBlock.forward` per expert: tests hold the two paths equal in float64.
With one expert active (Stage 2, expert_type="text"/"code") the same code runs with E = 1, so every
stage gets the same fused weights and activation savings; `MMRecBlock.forward` stays the plain
per-expert form (use_kernel_fusion=False) that this one is checked against.
"""
from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..ops import long_term_memory, short_term_memory
from .block import MMRecBlock, at_least_fp32


# Every nn.Linear of a block, by submodule name.
LINEARS = ("in_proj", "mdi.base_in", "mdi.base_out", "mdi.context_in", "mdi.context_out", "alpha_down",
           "alpha_up", "out_gate", "out_proj", "ffn_in", "ffn_out")


_LINEAR_GETTERS = [(name, operator.attrgetter(name)) for name in LINEARS]  # faster than get_submodule


def _linear_params(blocks: list[MMRecBlock]) -> dict:
    """Each Linear of the E blocks: name -> ([E weights], [E biases] or None), the parameters
    themselves (the compiled layer's inputs; it runs once per layer and step, so it is kept cheap
    on the host)."""
    out = {}
    for name, get in _LINEAR_GETTERS:
        mods = [get(b) for b in blocks]
        out[name] = ([m.weight for m in mods], None if mods[0].bias is None else [m.bias for m in mods])
    return out


def _stacked_linears(params: dict) -> dict:
    """Each Linear of the E experts as (weight [E, in, out], bias [E, 1, out] or None).

    Built with one cat of every weight and bias of the layer (and, under autocast, one cast of the
    result): two kernels per layer instead of a stack and a cast per Linear. split() hands out the
    pieces, so backward is one cat of their gradients, not a zero-filled copy per piece."""
    parts, layout = [], []
    for name in LINEARS:
        weights, biases = params[name]
        E = len(weights)
        parts += [w.reshape(-1) for w in weights]
        layout.append((name, "weight", weights[0].shape))
        if biases is not None:
            parts += biases
            layout.append((name, "bias", biases[0].shape))
    flat = torch.cat(parts)
    device = flat.device.type
    if flat.dtype == torch.float32 and torch.is_autocast_enabled(device):
        flat = flat.to(torch.get_autocast_dtype(device))
    pieces = flat.split([E * shape.numel() for _, _, shape in layout])
    out = {}
    for (name, kind, shape), piece in zip(layout, pieces):
        if kind == "weight":
            out[name] = (piece.view(E, *shape).transpose(1, 2), None)
        else:
            out[name] = (out[name][0], piece.view(E, 1, shape[0]))
    return out


def _single_linears(params: dict) -> dict:
    """One expert (E = 1): each Linear's own (weight [out, in], bias) -- nothing to stack, and no
    cat/split pair in forward and backward (eager steps are bound by the host's per-op cost)."""
    return {name: (weights[0], None if biases is None else biases[0]) for name, (weights, biases) in params.items()}


def _linear(x: torch.Tensor, weight_bias: tuple) -> torch.Tensor:
    """x [E, N, in] @ each expert's Linear -> [E, N, out]: one batched matmul over stacked weights
    [E, in, out], or F.linear with one expert's own weight [out, in]."""
    weight, bias = weight_bias
    if weight.dim() == 2:
        return F.linear(x, weight, bias)
    # Not baddbmm: with a broadcast bias it first copies the bias into every row of the output and
    # then has the GEMM read that back (two extra passes over [E, N, out]); a separate add is one
    # pass in eager and none compiled, where it fuses into the kernel that consumes the product.
    y = torch.bmm(x, weight)
    return y if bias is None else y + bias


# The FFN's first Linear takes its bias as one more row of the weight, against a column of ones
# appended to the input (then zeros, so the inner dimension stays a multiple of 8: 16-byte rows for
# the tensor cores). The bias's gradient then comes out of the weight's GEMM instead of a separate
# sum of the output's gradient over the tokens: at 2x8192 with both experts that sum read a
# [32768, 3072] bf16 tensor (201 MB) in every layer's backward.
BIAS_COLUMNS = 8


def _linear_bias_in_gemm(x: torch.Tensor, weight_bias: tuple) -> torch.Tensor:
    """_linear(x, weight_bias), with stacked experts' bias added inside the matmul (BIAS_COLUMNS).
    One expert's F.linear stays as it is: there it measured no faster."""
    weight, bias = weight_bias
    if bias is None or weight.dim() == 2:
        return _linear(x, weight_bias)
    pad = BIAS_COLUMNS - 1  # weight [E, in, out], bias [E, 1, out]
    x_aug = torch.cat([x, x.new_ones(*x.shape[:-1], 1), x.new_zeros(*x.shape[:-1], pad)], -1)
    w_aug = torch.cat([weight, bias, weight.new_zeros(weight.shape[0], pad, weight.shape[2])], 1)
    return torch.bmm(x_aug, w_aug)


class _GeluLinear(torch.autograd.Function):
    """y = gelu(h) @ weight (+ bias), batched over the experts, keeping h rather than gelu(h) for
    backward: the FFN's widest activation (ffn_dim channels) is saved once instead of twice, and
    gelu is recomputed (one elementwise pass). Inputs arrive in one dtype (autocast already cast
    them), so forward and backward need no autocast of their own."""

    @staticmethod
    def forward(ctx, h, weight, bias):
        a = F.gelu(h)
        ctx.save_for_backward(h, weight)
        ctx.has_bias = bias is not None
        return _linear(a, (weight, bias))

    @staticmethod
    def backward(ctx, dy):
        h, weight = ctx.saved_tensors
        dy = dy.to(h.dtype)
        a = F.gelu(h)
        if weight.dim() == 2:  # one expert, nn.Linear layout [out, in]; h, dy: [1, N, .]
            d_weight = dy[0].t() @ a[0]
            d_h = torch.ops.aten.gelu_backward(dy @ weight, h)
            d_bias = dy.sum((0, 1)) if ctx.has_bias else None
        else:                  # stacked [E, in, out]
            d_weight = torch.bmm(a.transpose(1, 2), dy)
            d_h = torch.ops.aten.gelu_backward(torch.bmm(dy, weight.transpose(1, 2)), h)
            d_bias = dy.sum(1, keepdim=True) if ctx.has_bias else None
        return d_h, d_weight, d_bias


def _gate_math(a, c, g, z, la, tau):
    """The gates' elementwise part (MMRecBlock._gates), in fp32 at least: log gamma = logsigmoid(a)
    + logsigmoid(c) (MDI), the gated input sigmoid(g) * z, log alpha = logsigmoid(la) / tau."""
    log_gamma = F.logsigmoid(at_least_fp32(a)) + F.logsigmoid(at_least_fp32(c))
    x_in = torch.sigmoid(at_least_fp32(g)) * at_least_fp32(z)
    return log_gamma, x_in, F.logsigmoid(at_least_fp32(la)) / tau


class _GateMath(torch.autograd.Function):
    """_gate_math keeping only its inputs for backward (their own dtype: bf16 under autocast) and
    recomputing the sigmoids there, instead of autograd keeping every fp32 intermediate. Cheaper on
    the host than checkpointing the gates (the eager GPU step is bound by the host's per-op cost):
    nothing runs twice but a few elementwise ops. d logsigmoid(t)/dt = sigmoid(-t)."""

    @staticmethod
    def forward(ctx, a, c, g, z, la, tau):
        ctx.save_for_backward(a, c, g, z, la)
        ctx.tau = tau
        return _gate_math(a, c, g, z, la, tau)

    @staticmethod
    def backward(ctx, d_log_gamma, d_x_in, d_log_alpha):
        a, c, g, z, la = ctx.saved_tensors
        f = at_least_fp32
        da = dc = dg = dz = dla = None
        if d_log_gamma is not None:
            da = (d_log_gamma * torch.sigmoid(-f(a))).to(a.dtype)
            dc = (d_log_gamma * torch.sigmoid(-f(c))).to(c.dtype)
        if d_x_in is not None:
            s = torch.sigmoid(f(g))
            dz = (d_x_in * s).to(z.dtype)
            dg = (d_x_in * f(z) * s * (1 - s)).to(g.dtype)
        if d_log_alpha is not None:
            dla = (d_log_alpha * torch.sigmoid(-f(la)) / ctx.tau).to(la.dtype)
        return da, dc, dg, dz, dla, None


def _per_expert(weights: list) -> torch.Tensor:
    """Per-expert norm weights [d] as one tensor broadcasting over x [E, N, d]: [E, 1, d] (one
    expert: its own weight, no stack)."""
    return weights[0] if len(weights) == 1 else torch.stack(weights).unsqueeze(1)


def _rms_norm(x: torch.Tensor, weights: list, eps: float) -> torch.Tensor:
    """Per-expert RMSNorm of x [E, N, d]."""
    return F.rms_norm(x, (x.shape[-1],), eps=eps) * _per_expert(weights)


def stacked_block_forward(blocks: list[MMRecBlock], x: torch.Tensor, states: list | None, block_fn=None):
    """Layer l of E experts at once. x: [E, B, T, d]; states: per expert {"h", "M"} or None.
    Returns (y [E, B, T, d], per-expert new states) -- MMRecBlock.forward for each expert.
    block_fn: what runs the maths, _stacked_block or a torch.compile of it (MMRec100M.compile_blocks)."""
    E = x.shape[0]
    first = blocks[0]
    cfg = first.config
    norms = {name: [getattr(b, name).weight for b in blocks] for name in ("norm", "h_norm", "o_norm", "ffn_norm")}
    h0 = None if states is None else torch.cat([s["h"] for s in states])
    M0 = None if states is None else torch.cat([s["M"] for s in states])
    settings = (first.num_heads, cfg.norm_eps, cfg.alpha_temperature, cfg.chunk_size, cfg.dropout,
                first.training, torch.is_grad_enabled() and first.recompute_gates)
    y, h_T, M_T = (block_fn or _stacked_block)(_linear_params(blocks), norms, x, h0, M0, settings)
    return y, [{"h": hs, "M": Ms} for hs, Ms in zip(h_T.chunk(E), M_T.chunk(E))]


def _stacked_block(linears: dict, norms: dict, x: torch.Tensor, h0, M0, settings: tuple):
    """stacked_block_forward's maths as a function of tensors, the parameters included: compiled,
    one graph serves every layer (they differ only in their weights). Returns (y, h_T, M_T), the
    experts' states concatenated along the batch."""
    H, eps, tau, chunk_size, p, training, recompute_gates = settings
    E, B, T, d = x.shape
    Dh = d // H
    W = _stacked_linears(linears) if E > 1 else _single_linears(linears)

    x2 = x.reshape(E, B * T, d)
    u = _rms_norm(x2, norms["norm"], eps)
    q, k, v, z, g = _linear(u, W["in_proj"]).chunk(5, dim=-1)

    # The gates. Their elementwise part in fp32 would keep ~8.5 KB per token, layer and expert of
    # fp32 intermediates for backward: with recompute_gates it runs as _GateMath, which keeps only
    # its (bf16) inputs and recomputes the sigmoids in backward.
    a = _linear(F.gelu(_linear(z, W["mdi.base_in"])), W["mdi.base_out"])
    c = _linear(F.gelu(_linear(k, W["mdi.context_in"])), W["mdi.context_out"])
    la = _linear(_linear(u, W["alpha_down"]), W["alpha_up"])
    gate_math = _GateMath.apply if recompute_gates else _gate_math
    log_gamma, x_in, log_alpha = gate_math(a, c, g, z, la, tau)

    # Both recurrences over E * B sequences in one call each.
    seqs = lambda t: t.reshape(E * B, T, d)
    heads = lambda t: t.reshape(E * B, T, H, Dh)
    h, h_T = short_term_memory(seqs(x_in), seqs(log_gamma), h0, chunk_size=chunk_size)
    o, M_T = long_term_memory(heads(q), heads(k), heads(v), heads(log_alpha), M0, scale=Dh ** -0.5)

    h = h.reshape(E, B * T, d).to(u.dtype)
    o = o.reshape(E, B * T, H, Dh).to(u.dtype)
    o_normed = F.rms_norm(o, (Dh,), eps=eps).reshape(E, B * T, d) * _per_expert(norms["o_norm"])
    mixed = torch.cat([_rms_norm(h, norms["h_norm"], eps), o_normed * F.silu(_linear(u, W["out_gate"]))], -1)
    x2 = x2 + F.dropout(_linear(mixed, W["out_proj"]), p, training)
    ffn_hidden = _linear_bias_in_gemm(_rms_norm(x2, norms["ffn_norm"], eps), W["ffn_in"])
    ffn_weight, ffn_bias = W["ffn_out"]
    ffn = _GeluLinear.apply(ffn_hidden, ffn_weight.to(ffn_hidden.dtype),
                            None if ffn_bias is None else ffn_bias.to(ffn_hidden.dtype))
    x2 = x2 + F.dropout(ffn, p, training)
    return x2.reshape(E, B, T, d), h_T, M_T


def stacked_experts_forward(experts: list, x: torch.Tensor, states: list | None,
                            gradient_checkpointing: bool = False, block_fn=None):
    """Every expert on the same input x [B, T, d]. states: per expert a list of per-layer states
    (or None). Returns (per-expert outputs after the expert's final norm, per-expert new states)."""
    E = len(experts)
    # A real copy per expert, not a stride-0 view: every layer then sees the same strides (a
    # compiled block is traced once, not again for the first layer).
    xs = x.unsqueeze(0).expand(E, *x.shape).contiguous() if E > 1 else x.unsqueeze(0)
    new_states = [[] for _ in range(E)]
    for layer in range(len(experts[0].blocks)):
        blocks = [e.blocks[layer] for e in experts]
        layer_states = None if states is None else [s[layer] for s in states]
        if gradient_checkpointing and torch.is_grad_enabled():
            # The RNG state is saved for dropout only (a captured CUDA graph cannot read it).
            xs, layer_states = checkpoint(stacked_block_forward, blocks, xs, layer_states, block_fn,
                                          use_reentrant=False, preserve_rng_state=blocks[0].dropout.p > 0)
        else:
            xs, layer_states = stacked_block_forward(blocks, xs, layer_states, block_fn)
        for i, s in enumerate(layer_states):
            new_states[i].append(s)
    outputs = [expert.norm(xs[i]) for i, expert in enumerate(experts)]
    return outputs, new_states
