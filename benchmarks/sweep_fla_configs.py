"""Try other launch configs for fla-core's GLA kernels at our head size, without fla's autotuner.

The comparisons run fla with one config per kernel (benchmarks/fla_compare/configs, tuned once on
an H100). Each candidate below overrides some of them in a copy of that folder; bench_ops.py then
runs in a fresh process per candidate (FLA_CONFIG_DIR pointing at the copy) and reports the GPU
time of one layer's long-term memory with fla's kernels (inside the chunks; for the chunk-boundary
states), forward + backward, and its error against the PyTorch reference. A candidate that wins
everywhere is copied into fla_compare/configs by hand.

    python benchmarks/sweep_fla_configs.py --shapes 4x512,2x8192,4x4096,8x8192 --out sweep.json
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "benchmarks" / "fla_compare" / "configs"


def cfg(BK=None, BV=None, warps=4, stages=2):
    kwargs = {k: v for k, v in (("BK", BK), ("BV", BV)) if v is not None}
    return {"kwargs": kwargs, "num_warps": warps, "num_stages": stages, "num_ctas": 1, "maxnreg": None}


# The sequential passes over the chunks (chunk_fwd_kernel_h, chunk_bwd_kernel_dh) run one program
# per (sequence, head, K block, V block): smaller blocks mean more programs at small batch.
CANDIDATES = {
    "shipped": {},
    "states-32x16": {"chunk_fwd_kernel_h": cfg(32, 16, 2, 3), "chunk_bwd_kernel_dh": cfg(32, 16, 4, 3)},
    "states-16x16": {"chunk_fwd_kernel_h": cfg(16, 16, 1, 3), "chunk_bwd_kernel_dh": cfg(16, 16, 2, 3)},
    "states-32x16+dv-32x32": {"chunk_fwd_kernel_h": cfg(32, 16, 2, 3), "chunk_bwd_kernel_dh": cfg(32, 16, 4, 3),
                              "chunk_gla_bwd_kernel_dv": cfg(32, 32, 4, 2)},
    "dv-32x32-w2": {"chunk_gla_bwd_kernel_dv": cfg(32, 32, 2, 3)},
}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="4x512,2x8192,4x4096,8x8192")
    p.add_argument("--candidates", default=",".join(CANDIDATES), help="from %(default)s")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--out", default="sweep_fla_configs.json")
    args = p.parse_args(argv)
    unknown = [c for c in args.candidates.split(",") if c not in CANDIDATES]
    if unknown:
        p.error(f"unknown candidate {unknown[0]!r}; choose from {', '.join(CANDIDATES)}")
    rows = []
    for name in args.candidates.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / "fla_configs"
            shutil.copytree(SHIPPED, folder)
            for kernel, default_config in CANDIDATES[name].items():
                path = folder / f"{kernel}.json"
                spec = json.loads(path.read_text())
                spec["default_config"] = default_config
                path.write_text(json.dumps(spec, indent=1))
            env = dict(os.environ, FLA_CACHE_MODE="default", FLA_CONFIG_DIR=str(folder))
            out = Path(tmp) / "ops.json"
            cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_ops.py"), "--variants", "gla-fla-intra,gla-fla-states",
                   "--shapes", args.shapes, "--repeats", str(args.repeats), "--out", str(out),
                   "--check", args.shapes.split(",")[1 if "," in args.shapes else 0]]
            run = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if run.returncode != 0:
                print(f"{name}: failed\n{run.stderr[-2000:]}")
                continue
            for r in json.loads(out.read_text())["results"]:
                r["candidate"] = name
                rows.append(r)
                err = r.get("rel_error_vs_reference")
                err = "" if err is None else "  max rel. error " + f"{max(err.values()):.1e}"
                print(f"{name:24s} {r['shape']:8s} GPU busy fwd+bwd {r['gpu_busy_fwd_bwd_ms']:7.3f} ms  "
                      f"(fwd {r['fwd_ms']:.3f} ms wall){err}", flush=True)
    Path(args.out).write_text(json.dumps({"candidates": CANDIDATES, "results": rows}, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
