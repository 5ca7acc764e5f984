"""GPU time of the long-term memory's kernels alone, for each launch configuration: the two kernels
inside the chunks (mm_rec/ops/long_term/kernel_intra.py) for each number of warps per program, and
with --state-pass the chunk-boundary state passes (kernel_states.py) for each scan tile (G chunks x
BK x BV) and number of warps of the contribution kernel. Medians of CUDA-event timings, a table and
a JSON file.

    python benchmarks/sweep_gla_chunk.py --shapes 4x512,4x8192 --warps 1,2,4,8 --out sweep_gla.json
    python benchmarks/sweep_gla_chunk.py --shapes 4x8192 --warps 2,4 --maxnreg 0,128,168
    python benchmarks/sweep_gla_chunk.py --shapes 4x8192 --state-pass --out sweep_states.json

Shapes are B x T of one layer's long-term memory (H heads of d_h), as the model calls it; with both
experts active the batched layer runs B = 2 x the batch. `--decay-scale` multiplies the log-decays
(1/16 is the model's initial scale; 2 and above send every chunk down the exact path).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def int_tuples(parser, text, flag, parts, example):
    """ "2x8192,4x512" -> [(2, 8192), (4, 512)]: `parts` positive integers an item, or a usage
    error (exit 2) naming `flag`."""
    try:
        out = [tuple(int(n) for n in item.lower().split("x")) for item in text.split(",")]
        assert all(len(t) == parts and min(t) > 0 for t in out)
        return out
    except (ValueError, AssertionError):
        parser.error(f"{flag} must be a comma-separated list like {example} of positive integers (got {text!r})")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="4x512,4x8192")
    p.add_argument("--warps", default="1,2,4,8")
    p.add_argument("--maxnreg", default="0",
                   help="register caps a thread for the backward kernel (0: none), e.g. 0,128,168")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--decay-scale", type=float, default=1 / 16)
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--inner", type=int, default=10, help="back-to-back calls per timing")
    p.add_argument("--state-pass", action="store_true", help="sweep the state passes' configs instead")
    p.add_argument("--scan-tiles", default="32x8x16,16x8x16,32x4x16,32x8x8,16x4x8,64x8x16",
                   help="GxBKxBV tiles of the state scan (with --state-pass)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    ints = lambda text, flag, parts, example: int_tuples(p, text, flag, parts, example)
    args.shape_list = ints(args.shapes, "--shapes", 2, "4x8192")
    args.warp_list = [w for (w,) in ints(args.warps, "--warps", 1, "1,2,4")]
    args.tile_list = ints(args.scan_tiles, "--scan-tiles", 3, "16x4x8")
    try:
        args.maxnreg_list = [int(n) for n in args.maxnreg.split(",")]
        assert all(n == 0 or 24 <= n <= 255 for n in args.maxnreg_list)
    except (ValueError, AssertionError):
        p.error(f"--maxnreg must be a comma-separated list of 0 (no cap) or 24..255 (got {args.maxnreg!r})")
    if any(n & (n - 1) for tile in args.tile_list for n in tile) or any(w & (w - 1) for w in args.warp_list):
        p.error("--scan-tiles and --warps take powers of two (Triton's block sizes and warp counts)")
    return args


def timed(fn, repeats, inner):
    """Median over `repeats` of the time of `inner` back-to-back calls / inner, in microseconds.
    With inner > 1 the host queues ahead of the GPU, so launch latency drops out of GPU-bound
    calls (the first sweeps timed single calls: inner = 1)."""
    import torch
    fn()
    times = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(inner):
            fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / inner)
    return statistics.median(times)


def main(argv=None):
    args = parse_args(argv)
    import torch
    import torch.nn.functional as F
    if not torch.cuda.is_available():
        sys.exit("sweep_gla_chunk.py: needs a CUDA GPU")
    from mm_rec.ops.long_term import kernel_intra
    from mm_rec.ops.long_term.kernel_states import chunk_states_bwd, chunk_states_fwd
    rows = []
    for shape, (B, T) in zip(args.shapes.split(","), args.shape_list):
        H, D = args.heads, args.head_dim
        q, k, v, do = (torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(4))
        g = F.logsigmoid(2 * torch.randn(B, T, H, D, device="cuda")) * args.decay_scale
        gc = kernel_intra.chunk_cumsum(g)
        h, _ = chunk_states_fwd(k, v, gc, None, kernel_intra.BT)
        dh, _ = chunk_states_bwd(q, do, gc, None, D ** -0.5, kernel_intra.BT, need_dM0=False)
        if args.state_pass:
            rows += sweep_state_pass(args, shape, q, k, v, do, gc, D)
            continue
        for w in args.warp_list:
            fwd = timed(lambda: kernel_intra.gla_chunk_fwd(q, k, v, gc, h, D ** -0.5, num_warps=w),
                        args.repeats, args.inner)
            for cap in args.maxnreg_list:
                bwd = timed(lambda: kernel_intra.gla_chunk_bwd(q, k, v, gc, h, dh, do, D ** -0.5, num_warps=w,
                                                               maxnreg=cap or None), args.repeats, args.inner)
                rows.append(dict(shape=shape, warps=w, maxnreg=cap, fwd_us=round(fwd, 1), bwd_us=round(bwd, 1)))
                print(f"{shape:8s} warps {w}  maxnreg {cap or '-':>3}  fwd {fwd:7.1f} us  bwd {bwd:7.1f} us", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(dict(args=vars(args), device=torch.cuda.get_device_name(),
                                                  rows=rows), indent=1))


def sweep_state_pass(args, shape, q, k, v, do, gc, D):
    """Forward (contributions + scan) and backward state pass for each scan tile and warps count."""
    from mm_rec.ops.long_term.kernel_intra import BT
    from mm_rec.ops.long_term.kernel_states import StatePassConfig, chunk_states_bwd, chunk_states_fwd
    rows = []
    for tile, (G, BK, BV) in zip(args.scan_tiles.split(","), args.tile_list):
        for w in args.warp_list:
            config = StatePassConfig(scan_chunks=G, block_k=BK, block_v=BV, contribution_warps=w)
            fwd = timed(lambda: chunk_states_fwd(k, v, gc, None, BT, config=config), args.repeats, args.inner)
            bwd = timed(lambda: chunk_states_bwd(q, do, gc, None, D ** -0.5, BT, need_dM0=False, config=config),
                        args.repeats, args.inner)
            rows.append(dict(shape=shape, scan_tile=tile, contribution_warps=w, fwd_us=round(fwd, 1),
                             bwd_us=round(bwd, 1)))
            print(f"{shape:8s} scan {tile:9s} contribution warps {w}  fwd {fwd:7.1f} us  bwd {bwd:7.1f} us",
                  flush=True)
    return rows


if __name__ == "__main__":
    main()
