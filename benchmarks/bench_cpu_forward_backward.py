"""Forward + backward time per token of MMRec100M on the CPU: the parallel chunked recurrences
against the sequential reference loops (mm_rec.ops.reference_mode), same model, same batch.

    python benchmarks/bench_cpu_forward_backward.py --preset 100m --batch_size 1 --seq_len 512

Prints a table and writes JSON (--json). Repeats are interleaved (parallel, sequential, parallel,
...) and the medians are reported with their ratio.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from mm_rec import MMRec100M, MMRecConfig
from mm_rec.model.config import PRESETS
from mm_rec.ops import reference_mode


def time_step(model, ids, sequential: bool) -> float:
    model.zero_grad(set_to_none=True)
    start = time.perf_counter()
    with reference_mode(sequential):
        logits = model(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
    return time.perf_counter() - start


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="100m", choices=sorted(PRESETS))
    p.add_argument("--batch_size", type=int, default=1)
    p.add_argument("--seq_len", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = MMRec100M(config=MMRecConfig(**PRESETS[args.preset]))
    ids = torch.randint(0, model.config.vocab_size, (args.batch_size, args.seq_len + 1))
    tokens = args.batch_size * args.seq_len
    time_step(model, ids, sequential=False)  # warm-up (allocator, first-call overheads)
    runs = {"parallel": [], "sequential": []}
    for _ in range(args.repeats):
        for name in runs:
            runs[name].append(time_step(model, ids, sequential=(name == "sequential")))
    med = {k: statistics.median(v) for k, v in runs.items()}
    result = {
        "preset": args.preset, "params": model.get_num_params(), "batch_size": args.batch_size,
        "seq_len": args.seq_len, "threads": torch.get_num_threads(), "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(), "repeats": args.repeats,
        "seconds": runs, "median_s": med,
        "ms_per_token": {k: 1e3 * v / tokens for k, v in med.items()},
        "speedup_parallel_over_sequential": med["sequential"] / med["parallel"],
    }
    print(f"MMRec100M preset={args.preset} ({result['params'] / 1e6:.1f}M params), B={args.batch_size}, "
          f"T={args.seq_len}, threads={result['threads']}, forward+backward, median of {args.repeats}")
    print(f"{'path':<12}{'step s':>10}{'ms/token':>10}{'tokens/s':>10}")
    for k in runs:
        print(f"{k:<12}{med[k]:>10.3f}{1e3 * med[k] / tokens:>10.3f}{tokens / med[k]:>10.1f}")
    print(f"parallel is {result['speedup_parallel_over_sequential']:.1f}x faster than the sequential reference")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
