"""GPU time of one layer's FFN, forward + backward, bf16: the GELU inside the Triton GEMMs
(mm_rec/ops/gpu/gelu_mlp.py) against the same maths compiled by Inductor around cuBLAS.

    python benchmarks/bench_ffn.py --out bench_ffn.json
    python benchmarks/bench_ffn.py --shapes 2x16384x256x3072 --configs 128x128x64x8x3,128x256x64x8x3

Variants, each under torch.compile (what the model's compiled layer does), interleaved, medians of
CUDA-event timings:
  kernel   mm_rec.model.stacked.gelu_mlp on CUDA: the epilogue kernels, cuBLAS for the other GEMMs
  inductor the same function on its PyTorch path (the bias inside the first GEMM, GELU recomputed
           in backward): what the model ran before the kernels
  nn       F.linear, F.gelu, F.linear per expert: what the Transformer baseline's FFN is
Shapes are E x N x d x F: E experts (stacked weights when E > 1), N tokens each, width d, FFN
width F. The defaults: both experts at 2x8192, one expert at 2x8192 (Stage 2), both at Stage 1's
4x512, and the Transformer baseline's matched FFN width. --configs also times the two epilogue
kernels alone for each tile BMxBNxBKxWARPSxSTAGES.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.sweep_gla_chunk import int_tuples  # noqa: E402

VARIANTS = ("kernel", "inductor", "nn")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="2x16384x256x3072,1x16384x256x3072,2x2048x256x3072,1x16384x256x3712")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated from %(default)s")
    p.add_argument("--configs", default="", help="epilogue kernel tiles to time alone, e.g. 128x128x64x8x3")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--inner", type=int, default=5, help="back-to-back calls per timing")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    args.shape_list = int_tuples(p, args.shapes, "--shapes", 4, "2x16384x256x3072")
    args.variant_list = args.variants.split(",")
    unknown = [v for v in args.variant_list if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variant {unknown[0]!r}; choose from {', '.join(VARIANTS)}")
    args.config_list = int_tuples(p, args.configs, "--configs", 5, "128x128x64x8x3") if args.configs else []
    return args


def make_weights(E, d, F, dev, torch):
    """The FFN's parameters (leaves, for their gradients) and a function that hands them to
    stacked.gelu_mlp as it takes them: stacked [E, in, out] views (E > 1) or nn.Linear's own
    [out, in], in bf16 as the compiled layer has them under autocast."""
    g = torch.Generator(device="cpu").manual_seed(0)
    mk = lambda *s: (torch.randn(*s, generator=g) * 0.02).to(dev, torch.bfloat16).requires_grad_()
    if E == 1:
        leaves = [mk(F, d), mk(F), mk(d, F), mk(d)]
        return leaves, lambda w1, b1, w2, b2: ((w1, b1), (w2, b2))
    leaves = [mk(E, F, d), mk(E, 1, F), mk(E, d, F), mk(E, 1, d)]
    return leaves, lambda w1, b1, w2, b2: ((w1.transpose(1, 2), b1), (w2.transpose(1, 2), b2))


def variant_fn(name, torch):
    import torch.nn.functional as F
    from mm_rec.model import stacked

    def kernel(x, ffn_in, ffn_out):
        return stacked.gelu_mlp(x, ffn_in, ffn_out)

    def inductor(x, ffn_in, ffn_out):
        return stacked.gelu_mlp_pytorch(x, ffn_in, ffn_out)

    def nn(x, ffn_in, ffn_out):
        (w1, b1), (w2, b2) = ffn_in, ffn_out
        if w1.dim() == 2:
            return F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)
        return torch.stack([F.linear(F.gelu(F.linear(x[e], w1[e].t(), b1[e, 0])), w2[e].t(), b2[e, 0])
                            for e in range(x.shape[0])])
    return torch.compile({"kernel": kernel, "inductor": inductor, "nn": nn}[name], dynamic=False)


def time_ms(fn, inner, torch):
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(inner):
        fn()
    e.record()
    torch.cuda.synchronize()
    return s.elapsed_time(e) / inner


def main(argv=None):
    args = parse_args(argv)
    import torch
    if not torch.cuda.is_available():
        raise SystemExit("error: bench_ffn.py needs a CUDA GPU (run it on the GPU machine)")
    from mm_rec.ops import load_gpu_backend
    from mm_rec.ops.gpu import gelu_mlp as G
    load_gpu_backend()
    dev = "cuda"
    results = []
    for shape in args.shape_list:
        E, N, d, F = shape
        params, layers = make_weights(E, d, F, dev, torch)
        x = (torch.randn(E, N, d, device=dev) ).to(torch.bfloat16).requires_grad_()
        dy = torch.randn(E, N, d, device=dev, dtype=torch.bfloat16)
        fns = {v: variant_fn(v, torch) for v in args.variant_list}

        def step(fn):
            y = fn(x, *layers(*params))
            y.backward(dy)
            for t in [x] + params:
                t.grad = None
        grads = {}
        for v, fn in fns.items():  # compile, warm up, and keep the gradients to compare
            for _ in range(2):
                step(fn)
            y = fn(x, *layers(*params))
            y.backward(dy)
            grads[v] = [y.detach().float()] + [t.grad.float() for t in [x] + params]
            for t in [x] + params:
                t.grad = None
        ref = grads.get("inductor") or next(iter(grads.values()))
        times = {v: [] for v in fns}
        for _ in range(args.repeats):
            for v, fn in fns.items():
                times[v].append(time_ms(lambda: step(fn), args.inner, torch))
        for v in fns:
            err = max(((a - b).norm() / b.norm().clamp_min(1e-30)).item() for a, b in zip(grads[v], ref))
            row = {"shape": "x".join(map(str, shape)), "variant": v, "ms": statistics.median(times[v]),
                   "max_rel_err_vs_inductor": err}
            results.append(row)
        # the epilogue kernels alone, per tile, and cuBLAS's GEMMs they replace, alone
        (w_in, b_in), (w_out, _) = layers(*(t.detach() for t in params))
        if E == 1:
            w_in, w_out = w_in.t().unsqueeze(0), w_out.t().unsqueeze(0)
        b_in = b_in.reshape(E, -1)
        xd = x.detach()
        h, _ = G.hidden_fwd(xd, w_in, b_in)
        gemms = {"fwd": lambda: torch.bmm(xd, w_in), "bwd": lambda: torch.bmm(dy, w_out.transpose(1, 2))}
        rows = {"cuBLAS GEMM alone": gemms}
        for cfg in args.config_list:
            rows["tile " + "x".join(map(str, cfg))] = {
                "fwd": lambda cfg=cfg: G.hidden_fwd(xd, w_in, b_in, config=cfg),
                "bwd": lambda cfg=cfg: G.hidden_bwd(dy, w_out, h, True, config=cfg)}
        if args.config_list:
            for name, fns in rows.items():
                t = {k: statistics.median(time_ms(f, args.inner, torch) for _ in range(args.repeats))
                     for k, f in fns.items()}
                results.append({"shape": "x".join(map(str, shape)), "variant": name,
                                "fwd_ms": t["fwd"], "bwd_ms": t["bwd"]})

    print(f"{'shape':>18} {'variant':>24} {'ms':>8} {'fwd ms':>8} {'bwd ms':>8} {'rel err':>9}")
    for r in results:
        f = lambda k, fmt: format(r[k], fmt) if k in r else "-"
        print(f"{r['shape']:>18} {r['variant']:>24} {f('ms', '8.3f'):>8} {f('fwd_ms', '8.3f'):>8} "
              f"{f('bwd_ms', '8.3f'):>8} {f('max_rel_err_vs_inductor', '9.1e'):>9}")
    if args.out:
        Path(args.out).write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                              "results": results}, indent=1))
        print("wrote", args.out)


if __name__ == "__main__":
    main()
