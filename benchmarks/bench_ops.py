"""GPU time of the two recurrences alone, forward and forward+backward, at the 100M model's shapes.

One layer's long-term memory (H=8 heads of d_h=32, q/k/v bf16, log-decays fp32) and short-term
memory (d=256 channels, fp32), as the training step calls them, for each implementation named in
--variants, interleaved, medians of CUDA-event timings. Prints a table, writes JSON, and with
--profile SHAPE a per-kernel table of one forward+backward of each variant.

    python benchmarks/bench_ops.py --shapes 4x512,2x8192,4x4096,8x8192 --out ops.json --profile 2x8192

Variants (long-term): `gla` is the op the model runs (mm_rec.ops.long_term.kernel.long_term_kernel):
our kernels inside the chunks (kernel_intra.py), the chunk-boundary states computed in parallel
over the chunks (kernel_states.py). The others swap fla-core's kernels in
(benchmarks/fla_compare/gla.py): `gla-fla-intra` fla's kernels inside 32-token chunks;
`gla-fla-states` fla's sequential state passes instead of ours; `gla-bt64` fla's kernels inside
fla's default 64-token chunks; `fla-chunk_gla` is fla-core's own chunk_gla entry point (what a
straightforward version calls).
Short-term: `scan` is ours (mm_rec/ops/short_term/kernel.py); `fla-hgrn` is fla-core's chunk_hgrn.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.fla_compare import use_tuned_fla_configs  # noqa: E402

LONG = ("gla", "gla-fla-intra", "gla-fla-states", "gla-bt64", "fla-chunk_gla")
SHORT = ("scan", "fla-hgrn")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="4x512,2x8192,4x4096,8x8192", help="comma-separated BxT")
    p.add_argument("--variants", default="gla,gla-fla-intra,fla-chunk_gla,scan", help=f"from {LONG + SHORT}")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--profile", default=None, help="BxT to print a per-kernel profile at")
    p.add_argument("--check", default="2x8192",
                   help="BxT at which each variant's output and gradients are compared with the PyTorch "
                        "chunked form in fp32 (from the same bf16 inputs); '' to skip")
    p.add_argument("--out", default="bench_ops.json")
    args = p.parse_args(argv)
    try:  # checked before anything runs: one line and exit 2 for a typo
        args.shape_list = [tuple(int(n) for n in s.lower().split("x")) for s in args.shapes.split(",")]
        assert all(len(bt) == 2 and min(bt) > 0 for bt in args.shape_list)
    except (ValueError, AssertionError):
        p.error(f"--shapes must be comma-separated BxT with positive B and T, e.g. 2x8192 (got {args.shapes!r})")
    args.variant_list = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in args.variant_list if v not in LONG + SHORT]
    if unknown:
        p.error(f"unknown variant {unknown[0]!r}; choose from {', '.join(LONG + SHORT)}")
    return args


def make_inputs(B, T, H, D, dev, torch):
    g = torch.Generator(device=dev).manual_seed(0)
    r = lambda *s, dt=torch.bfloat16: torch.randn(*s, device=dev, generator=g).to(dt).requires_grad_()
    q, k, v = r(B, T, H, D), r(B, T, H, D), r(B, T, H, D)
    # log-decays as the model makes them: logsigmoid(.) / 16 (long-term), logsigmoid(.) (short-term)
    log_alpha = (torch.nn.functional.logsigmoid(torch.randn(B, T, H, D, device=dev, generator=g) + 2) / 16)
    x = torch.randn(B, T, H * D, device=dev, generator=g).requires_grad_()
    log_a = torch.nn.functional.logsigmoid(torch.randn(B, T, H * D, device=dev, generator=g) + 3)
    return dict(q=q, k=k, v=v, log_alpha=log_alpha.requires_grad_(), x=x, log_a=log_a.requires_grad_())


def variant_fn(name):
    from mm_rec.ops.long_term.kernel import long_term_kernel
    from mm_rec.ops.short_term.kernel import short_term_kernel
    if name == "gla":
        return lambda t: long_term_kernel(t["q"], t["k"], t["v"], t["log_alpha"])
    # (kernels inside the chunks, state passes, chunk length when fla's kernels run inside)
    swapped = {"gla-fla-intra": ("fla", "parallel", 32), "gla-fla-states": ("own", "fla", 32),
               "gla-bt64": ("fla", "parallel", 64)}
    if name in swapped:
        from benchmarks.fla_compare.gla import long_term_fla
        intra, states, chunk = swapped[name]
        return lambda t: long_term_fla(t["q"], t["k"], t["v"], t["log_alpha"], intra=intra, states=states,
                                       chunk_size=chunk)
    if name == "fla-chunk_gla":
        from fla.ops.gla import chunk_gla
        return lambda t: chunk_gla(t["q"], t["k"], t["v"], t["log_alpha"], output_final_state=True)
    if name == "scan":
        return lambda t: short_term_kernel(t["x"], t["log_a"])
    if name == "fla-hgrn":
        from fla.ops.hgrn import chunk_hgrn
        return lambda t: chunk_hgrn(t["x"], t["log_a"], output_final_state=True)
    raise ValueError(name)  # parse_args has checked the names


def run_once(fn, t, backward, torch):
    out, _ = fn(t)
    if backward:
        out.float().sum().backward()
    return out


def check_against_reference(shape, fns, t, results, torch):
    """Relative error (norm of the difference / norm of the reference) of o and of the gradients of
    q, k, v, log-decay: each long-term variant against mm_rec's PyTorch chunked form in fp32."""
    from mm_rec.ops import long_term_memory
    names = ("q", "k", "v", "log_alpha")

    def grads_of(fn, inputs):
        for x in inputs.values():
            x.grad = None
        o = run_once(fn, inputs, True, torch)
        return [o.float()] + [inputs[n].grad.float() for n in names]

    ref_in = {n: t[n].detach().float().requires_grad_() for n in names}
    ref = grads_of(lambda u: long_term_memory(u["q"], u["k"], u["v"], u["log_alpha"], backend="chunk"),
                   ref_in)
    for v, fn in fns.items():
        if v not in LONG:
            continue
        got = grads_of(fn, t)
        rel = [((a - b).norm() / b.norm().clamp_min(1e-30)).item() for a, b in zip(got, ref)]
        print(f"{shape:8s} {v:14s} relative error vs fp32 PyTorch reference, o dq dk dv dg: "
              + " ".join(f"{r:.1e}" for r in rel), flush=True)
        for r in results:
            if r["shape"] == shape and r["variant"] == v:
                r["rel_error_vs_reference"] = dict(zip(("o", "dq", "dk", "dv", "dg"), rel))


def main(argv=None):
    args = parse_args(argv)
    import torch
    if not torch.cuda.is_available():
        print("error: bench_ops.py needs a CUDA GPU (the recurrences' kernels are Triton)", file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    variants = args.variant_list
    use_tuned_fla_configs()  # before fla is imported
    try:
        import fla  # noqa: F401  optional (pip install -e ".[fla]"): its kernels are only compared with
    except ImportError:
        needs_fla = [v for v in variants if v != "gla" and v != "scan"]
        if needs_fla:
            print(f"skipped (fla-core is not installed): {', '.join(needs_fla)}")
        variants = [v for v in variants if v not in needs_fla]
    fns = {v: variant_fn(v) for v in variants}
    H, D = args.heads, args.head_dim
    results = []
    for shape, (B, T) in zip(args.shapes.split(","), args.shape_list):
        t = make_inputs(B, T, H, D, dev, torch)
        times = {(v, bw): [] for v in variants for bw in (False, True)}
        for v in variants:  # warm-up: Triton compiles here
            for bw in (False, True):
                run_once(fns[v], t, bw, torch)
        torch.cuda.synchronize()
        for _ in range(args.repeats):
            for v in variants:
                for bw in (False, True):
                    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    s.record()
                    run_once(fns[v], t, bw, torch)
                    e.record()
                    torch.cuda.synchronize()
                    times[(v, bw)].append(s.elapsed_time(e))
        from torch.profiler import ProfilerActivity, profile
        for v in variants:
            fwd, both = statistics.median(times[(v, False)]), statistics.median(times[(v, True)])
            with profile(activities=[ProfilerActivity.CUDA]) as p:  # GPU time without launch gaps
                for _ in range(5):
                    run_once(fns[v], t, True, torch)
                torch.cuda.synchronize()
            ev = [e for e in p.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
            busy = sum(e.self_device_time_total for e in ev) / 5e3
            kernels = sum(e.count for e in ev) / 5
            # the loss's own kernels (sum, cast, grad fill) are in busy too: a few microseconds
            results.append(dict(shape=shape, batch=B, seq_len=T, variant=v, fwd_ms=fwd, fwd_bwd_ms=both,
                                bwd_ms=both - fwd, gpu_busy_fwd_bwd_ms=busy, kernels_fwd_bwd=kernels))
            print(f"{shape:8s} {v:14s} fwd {fwd:7.3f} ms  fwd+bwd {both:7.3f} ms  "
                  f"GPU busy fwd+bwd {busy:7.3f} ms in {kernels:.0f} kernels", flush=True)
        if args.check == shape:
            check_against_reference(shape, fns, t, results, torch)
        if args.profile == shape:
            for v in variants:
                with profile(activities=[ProfilerActivity.CUDA]) as p:
                    run_once(fns[v], t, True, torch)
                    torch.cuda.synchronize()
                print(f"\nprofile {shape} {v} (forward + backward):")
                print(p.key_averages().table(sort_by="self_device_time_total", row_limit=20,
                                             max_name_column_width=60))
        del t
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "heads": H, "head_dim": D,
            "repeats": args.repeats, "date": time.strftime("%Y-%m-%d %H:%M")}
    Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
