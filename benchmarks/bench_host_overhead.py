"""Host time of one eager training step: what bounds eager MM-Rec on a GPU, measured on the CPU.

On an H100 the eager step is bound by the host issuing ~1,000 small ops:
the GPU waits for Python and the dispatcher. This script times that host work alone: 16 layers at
a tiny width (d = 32, 8 tokens), so every op's own compute is negligible, and the two recurrences
replaced by one-op stand-ins (on a GPU each is one custom op). Forward (model.loss under bf16
autocast), backward and zero_grad, one thread; the median of many steps, per expert setting and
with the gates' recompute on and off. No GPU needed; compare commits with --repo:

    python benchmarks/bench_host_overhead.py --json host.json
    git worktree add /tmp/old <commit> && python benchmarks/bench_host_overhead.py --repo /tmp/old
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--repo", default=str(Path(__file__).resolve().parents[1]),
                   help="checkout whose mm_rec to time (default: this one)")
    p.add_argument("--steps", type=int, default=40, help="timed steps per setting (median reported)")
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--json", default=None, help="write the results here")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    sys.path.insert(0, args.repo)
    import torch
    torch.set_num_threads(1)
    import importlib

    from mm_rec.model import MMRec100M

    def short_term(x, log_a, h0=None, **_):
        return x * 1.0, x[:, -1].float()

    def long_term(q, k, v, log_alpha, M0=None, **_):
        return q * 1.0, q.new_zeros(q.shape[0], q.shape[2], q.shape[3], q.shape[3], dtype=torch.float32)

    # The modules that call the recurrences: model/block.py, and model/stacked.py in older commits.
    for name in ("mm_rec.model.block", "mm_rec.model.stacked"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        module.short_term_memory, module.long_term_memory = short_term, long_term

    torch.manual_seed(0)
    model = MMRec100M(vocab_size=256, expert_dim=32, num_layers=args.layers, num_heads=2, ffn_dim=64)
    ids = torch.randint(0, 256, (1, 9))

    def step(expert_type):
        with torch.autocast("cpu", torch.bfloat16):
            loss = (model.loss(ids[:, :-1], ids[:, 1:], expert_type=expert_type) if hasattr(model, "loss") else
                    torch.nn.functional.cross_entropy(model(ids[:, :-1], expert_type=expert_type)
                                                      .float().flatten(0, 1), ids[:, 1:].flatten()))
        loss.backward()
        model.zero_grad(set_to_none=True)

    try:
        commit = subprocess.run(["git", "-C", args.repo, "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True).stdout.strip()
    except OSError:
        commit = ""
    rows = []
    for expert_type in (None, "text"):
        for recompute in (True, False):
            for m in model.modules():
                if hasattr(m, "recompute_gates"):
                    m.recompute_gates = recompute
            for _ in range(3):
                step(expert_type)
            times = []
            for _ in range(args.steps):
                t0 = time.perf_counter()
                step(expert_type)
                times.append(time.perf_counter() - t0)
            rows.append({"experts": "both" if expert_type is None else "one", "recompute_gates": recompute,
                         "host_ms": 1e3 * statistics.median(times)})
    print(f"host time of one eager training step, {args.layers} layers, recurrences stubbed ({args.repo} {commit})")
    print(f"{'experts':8s} {'recompute_gates':>16s} {'host ms':>9s}")
    for r in rows:
        print(f"{r['experts']:8s} {str(r['recompute_gates']):>16s} {r['host_ms']:9.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"repo": args.repo, "commit": commit, "torch": torch.__version__,
                                               "layers": args.layers, "results": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
