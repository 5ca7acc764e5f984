"""Registers and spills of the long-term memory's chunk kernels (mm_rec/ops/long_term/kernel_intra.py),
compiled ahead of time for an H100 (sm_90) on any machine with Triton: no GPU needed. ptxas decides
how many registers a thread gets and what spills to local memory ("stack" bytes a thread); a kernel
that spills, or holds so many registers that few programs share an SM, loses to its memory floor.
This is how the GLA backward kernel was found spilling 416 bytes a thread at 2 warps.
A table and, with --out, a JSON file.

    python benchmarks/kernel_resources.py
    python benchmarks/kernel_resources.py --warps 1,2,4 --head-dim 64 --dtype fp32

The kernels are compiled as they are launched: the runtime's 16-byte alignment of every pointer
and of T (which Triton assumes for such arguments), q/k/v/o in --dtype, decays and states fp32.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.sweep_gla_chunk import int_tuples  # noqa: E402

# Each kernel's pointer arguments in order, "x" for the input dtype, "f" for fp32.
KERNELS = {
    "gla_chunk_fwd": ("_gla_chunk_fwd_kernel", dict(q="x", k="x", v="x", g="f", h="f", o="x")),
    "gla_chunk_bwd": ("_gla_chunk_bwd_kernel", dict(q="x", k="x", v="x", g="f", h="f", dh="f", do="x",
                                                    dq="x", dk="x", dv="x", dg="f")),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--warps", default="1,2,4", help="warps per program to compile for")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16", help="q, k, v and o")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    args.warp_list = [w for (w,) in int_tuples(p, args.warps, "--warps", 1, "1,2,4")]
    if any(w & (w - 1) for w in args.warp_list):
        p.error("--warps takes powers of two (Triton's warp counts)")
    return args


def compile_for_sm90(fn, pointers: dict, dtype: str, constants: dict, num_warps: int):
    """fn compiled for sm_90 as the launcher would (aligned pointers and T), without a GPU."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    elem = {"x": "*" + dtype, "f": "*fp32"}
    signature = {name: elem[kind] for name, kind in pointers.items()}
    signature.update({"scale": "fp32", "T": "i32"}, **{name: "constexpr" for name in constants})
    aligned = {(i,): [["tt.divisibility", 16]] for i, (name, ty) in enumerate(signature.items())
               if ty.startswith("*") or name == "T"}
    source = ASTSource(fn=fn, signature=signature, constexprs=constants, attrs=aligned)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})


def resources(kernel) -> dict:
    """{"registers", "stack_bytes", "shared_bytes"} a thread (shared: a program) from cuobjdump."""
    import triton
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not tool.exists():
        sys.exit(f"kernel_resources.py: this Triton has no CUDA tools ({tool} is missing); "
                 "install the Linux x86_64 Triton wheel")
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "kernel.cubin"
        cubin.write_bytes(kernel.asm["cubin"])
        out = subprocess.run([str(tool), "-res-usage", str(cubin)], capture_output=True, text=True,
                             check=True).stdout
    line = next(l for l in out.splitlines() if "REG:" in l)
    fields = dict(item.split(":", 1) for item in line.split() if ":" in item)
    return {"registers": int(fields["REG"]), "stack_bytes": int(fields["STACK"]),
            "shared_bytes": int(fields["SHARED"])}


def main(argv=None):
    args = parse_args(argv)
    try:
        import triton  # noqa: F401
    except ImportError:
        sys.exit("kernel_resources.py: needs Triton (pip install -e '.[gpu]' or '.[test]')")
    from mm_rec.ops.long_term import kernel_intra
    block = kernel_intra._block(args.head_dim)  # as gla_chunk_fwd / _bwd launch them
    constants = dict(H=args.heads, K=args.head_dim, V=args.head_dim, BT=kernel_intra.BT, BK=block, BV=block)
    shipped = {"gla_chunk_fwd": kernel_intra.NUM_WARPS_FWD, "gla_chunk_bwd": kernel_intra.NUM_WARPS_BWD}
    rows = []
    print(f"{'kernel':14s} {'warps':>5s} {'registers':>9s} {'spill B':>7s} {'shared B':>8s}")
    for name, (fn_name, pointers) in KERNELS.items():
        for w in args.warp_list:
            kernel = compile_for_sm90(getattr(kernel_intra, fn_name), pointers, args.dtype, constants, w)
            r = dict(kernel=name, warps=w, shipped=w == shipped[name], **resources(kernel))
            rows.append(r)
            mark = " (shipped)" if r["shipped"] else ""
            print(f"{name:14s} {w:5d} {r['registers']:9d} {r['stack_bytes']:7d} {r['shared_bytes']:8d}{mark}")
    if args.out:
        Path(args.out).write_text(json.dumps(dict(args=vars(args), triton=triton.__version__, rows=rows),
                                             indent=1))
    return rows


if __name__ == "__main__":
    main()
