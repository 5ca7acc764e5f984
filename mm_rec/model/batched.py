"""The Linears and norms of E experts' blocks applied at once (E = 1: one expert's own weights).

When the Text and the Code expert both run, their layer-l blocks see inputs of the same shape and
do the same maths with different weights. Activations then carry a leading expert axis [E, N, .]
and each nn.Linear becomes one batched matmul over the experts' weights stacked on the fly (a copy
far smaller than the activations): half the kernel launches of a training step, and each
latency-bound recurrence launch does twice the work. With one expert the same code runs with E = 1
on the Linear's own weight, with nothing stacked.

The parameters stay in each expert's own `MMRecBlock` (the checkpoint's names, per-expert optimizer
groups, an idle expert gets no gradient); `block_weights` hands them to the block function as
tensors, so one torch.compile of that function serves every layer of every expert.
"""
from __future__ import annotations

import operator

import torch
import torch.nn.functional as F

# Every nn.Linear and every norm of a block, by submodule name.
LINEARS = ("in_proj", "mdi.base_in", "mdi.base_out", "mdi.context_in", "mdi.context_out", "alpha_down",
           "alpha_up", "out_gate", "out_proj", "ffn_in", "ffn_out")
NORMS = ("norm", "h_norm", "o_norm", "ffn_norm")

# attrgetter, not get_submodule: this runs once per layer and step on the host.
_LINEAR_GETTERS = [(name, operator.attrgetter(name)) for name in LINEARS]


def block_weights(blocks: list) -> tuple[dict, dict]:
    """The parameters of E blocks (one layer of E experts), as the block function's inputs:
    linears: name -> ([E weights], [E biases] or None); norms: name -> [E weights]."""
    linears = {}
    for name, get in _LINEAR_GETTERS:
        mods = [get(b) for b in blocks]
        linears[name] = ([m.weight for m in mods], None if mods[0].bias is None else [m.bias for m in mods])
    norms = {name: [getattr(b, name).weight for b in blocks] for name in NORMS}
    return linears, norms


def expert_linears(linears: dict) -> dict:
    """name -> (weight, bias) for `linear`: one expert's own (weight [out, in], bias [out]), or E
    experts' stacked (weight [E, in, out], bias [E, 1, out]).

    Stacked with one cat of every weight and bias of the layer (and, under autocast, one cast of the
    result): two kernels per layer instead of a stack and a cast per Linear. split() hands out the
    pieces, so backward is one cat of their gradients, not a zero-filled copy per piece. One expert
    skips the cat/split pair in forward and backward (eager steps are bound by the host's per-op cost)."""
    if len(next(iter(linears.values()))[0]) == 1:
        return {name: (weights[0], None if biases is None else biases[0])
                for name, (weights, biases) in linears.items()}
    parts, layout = [], []
    for name in LINEARS:
        weights, biases = linears[name]
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


def linear(x: torch.Tensor, weight_bias: tuple) -> torch.Tensor:
    """x [E, N, in] -> [E, N, out] through each expert's Linear: F.linear with one expert's own
    weight [out, in], or one batched matmul over stacked weights [E, in, out]."""
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


def linear_bias_in_gemm(x: torch.Tensor, weight_bias: tuple) -> torch.Tensor:
    """linear(x, weight_bias), with stacked experts' bias added inside the matmul (BIAS_COLUMNS).
    One expert's F.linear stays as it is: there it measured no faster."""
    weight, bias = weight_bias
    if bias is None or weight.dim() == 2:
        return linear(x, weight_bias)
    pad = BIAS_COLUMNS - 1  # weight [E, in, out], bias [E, 1, out]
    x_aug = torch.cat([x, x.new_ones(*x.shape[:-1], 1), x.new_zeros(*x.shape[:-1], pad)], -1)
    w_aug = torch.cat([weight, bias, weight.new_zeros(weight.shape[0], pad, weight.shape[2])], 1)
    return torch.bmm(x_aug, w_aug)


def per_expert(weights: list) -> torch.Tensor:
    """Per-expert norm weights [d] as one tensor broadcasting over x [E, N, d]: [E, 1, d] (one
    expert: its own weight, no stack)."""
    return weights[0] if len(weights) == 1 else torch.stack(weights).unsqueeze(1)


def rms_norm(x: torch.Tensor, weights: list, eps: float) -> torch.Tensor:
    """Each expert's RMSNorm of x [E, N, d]."""
    return F.rms_norm(x, (x.shape[-1],), eps=eps) * per_expert(weights)


class GeluLinear(torch.autograd.Function):
    """y = linear(gelu(h), weight, bias) keeping h, not gelu(h), for backward, and recomputing gelu
    there (one elementwise pass): the FFN's widest activation (ffn_dim channels) is saved once
    instead of twice. Plain autograd would keep both. Inputs arrive in one dtype (autocast already
    cast them), so forward and backward need no autocast of their own."""

    @staticmethod
    def forward(ctx, h, weight, bias):
        ctx.save_for_backward(h, weight)
        ctx.has_bias = bias is not None
        return linear(F.gelu(h), (weight, bias))

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


def gelu_linear(h: torch.Tensor, weight_bias: tuple) -> torch.Tensor:
    """linear(gelu(h), weight_bias); through GeluLinear when there will be a backward."""
    weight, bias = weight_bias
    weight, bias = weight.to(h.dtype), None if bias is None else bias.to(h.dtype)
    if torch.is_grad_enabled():
        return GeluLinear.apply(h, weight, bias)
    return linear(F.gelu(h), (weight, bias))
