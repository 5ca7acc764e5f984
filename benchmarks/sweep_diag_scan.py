"""GPU time of the short-term memory's scan alone (mm_rec/ops/short_term/kernel.py) for each launch
configuration: tile (BT tokens x BD channels), warps per program and programs wanted per SM (how
finely the sequence is cut into segments). Forward (diag_scan_fwd) and backward (diag_scan_bwd)
timed separately as GPU time (the kernels' own time from torch.profiler, averaged over the calls:
what a CUDA-graphed step pays) and as wall time per call (medians of CUDA-event timings of
back-to-back calls, host launches included). Every configuration's results are checked against
the shipped configuration's. A table and a JSON file.

    python benchmarks/sweep_diag_scan.py --shapes 4x8192,8x512 --out sweep_scan.json

Shapes are B x T of one layer's scan over D channels, as the model calls it: with both experts
active the batched layer runs B = 2 x the batch (4x8192 is 2x8192 with both experts).
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# the same timing (medians of back-to-back calls) and list parsing as the GLA sweep
from benchmarks.sweep_gla_chunk import int_tuples, timed  # noqa: E402



def gpu_us(fn, calls):
    """The CUDA kernels' own time per call of fn, in microseconds (torch.profiler)."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    return sum(e.self_device_time_total for e in events) / calls


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="4x8192,8x512")
    p.add_argument("--dim", type=int, default=256, help="channels D")
    p.add_argument("--tiles", default="32x64,64x64,64x32,128x32,32x128,128x64",
                   help="BTxBD tiles, powers of two")
    p.add_argument("--warps", default="2,4,8")
    p.add_argument("--programs-per-sm", default="2,4,8")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--inner", type=int, default=10, help="back-to-back calls per timing")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    ints = lambda text, flag, parts, example: int_tuples(p, text, flag, parts, example)
    args.shape_list = ints(args.shapes, "--shapes", 2, "4x8192")
    args.tile_list = ints(args.tiles, "--tiles", 2, "64x64")
    args.warp_list = [w for (w,) in ints(args.warps, "--warps", 1, "2,4")]
    args.pps_list = [n for (n,) in ints(args.programs_per_sm, "--programs-per-sm", 1, "2,4")]
    if any(n & (n - 1) for tile in args.tile_list for n in tile) or any(w & (w - 1) for w in args.warp_list):
        p.error("--tiles and --warps take powers of two (Triton's block sizes and warp counts)")
    return args


def main(argv=None):
    args = parse_args(argv)
    import torch
    if not torch.cuda.is_available():
        sys.exit("sweep_diag_scan.py: needs a CUDA GPU")
    from mm_rec.ops.short_term.kernel import SCAN_CONFIG, ScanConfig, diag_scan_bwd, diag_scan_fwd

    shipped = SCAN_CONFIG
    rows = []
    print(f"{'shape':>8s} {'BTxBD':>7s} {'warps':>5s} {'pr/SM':>5s} {'fwd GPU':>8s} {'bwd GPU':>8s} "
          f"{'fwd wall':>8s} {'bwd wall':>8s} {'max err':>8s}   (us a call)")
    for B, T in args.shape_list:
        gen = torch.Generator(device="cuda").manual_seed(0)
        x = torch.randn(B, T, args.dim, device="cuda", generator=gen)
        # log-decays of the model's initial range (decays 0.5 .. 0.999)
        log_a = -torch.rand(B, T, args.dim, device="cuda", generator=gen) * 0.7
        dh = torch.randn_like(x)
        ref_h = diag_scan_fwd(x, log_a)
        ref_dx, ref_dg = diag_scan_bwd(dh, log_a, ref_h)
        configs = [shipped] + [ScanConfig(bt, bd, w, n) for (bt, bd), w, n
                               in itertools.product(args.tile_list, args.warp_list, args.pps_list)]
        for config in configs:
            h = diag_scan_fwd(x, log_a, config=config)
            dx, dg = diag_scan_bwd(dh, log_a, h, config=config)
            err = max(((a - b).abs().max() / b.abs().max()).item()
                      for a, b in ((h, ref_h), (dx, ref_dx), (dg, ref_dg)))
            fwd_call = lambda: diag_scan_fwd(x, log_a, config=config)
            bwd_call = lambda: diag_scan_bwd(dh, log_a, h, config=config)
            fwd, bwd = gpu_us(fwd_call, args.repeats), gpu_us(bwd_call, args.repeats)
            fwd_wall = timed(fwd_call, args.repeats, args.inner)
            bwd_wall = timed(bwd_call, args.repeats, args.inner)
            row = {"shape": f"{B}x{T}", "dim": args.dim, **dataclasses.asdict(config), "fwd_us": fwd, "bwd_us": bwd,
                   "fwd_wall_us": fwd_wall, "bwd_wall_us": bwd_wall,
                   "max_rel_err": err, "shipped": config is shipped}
            rows.append(row)
            mark = " (shipped)" if config is shipped else ""
            print(f"{row['shape']:>8s} {config.block_t:>3d}x{config.block_d:<3d} {config.num_warps:5d} "
                  f"{config.programs_per_sm:5d} {fwd:8.1f} {bwd:8.1f} {fwd_wall:8.1f} {bwd_wall:8.1f} {err:8.1e}{mark}",
                  flush=True)
        best = min((r for r in rows if r["shape"] == f"{B}x{T}" and r["max_rel_err"] < 1e-4),
                   key=lambda r: r["fwd_us"] + r["bwd_us"])
        print(f"{B}x{T}: best GPU time fwd+bwd {best['fwd_us'] + best['bwd_us']:.1f} us at "
              f"{best['block_t']}x{best['block_d']}, {best['num_warps']} warps, {best['programs_per_sm']} programs/SM")
    if args.out:
        Path(args.out).write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}, indent=1))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
