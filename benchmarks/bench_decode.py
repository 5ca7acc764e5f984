"""Per-token decode latency after C tokens of context: a recurrent model's cost per generated token
should not depend on C (a Transformer's grows with its KV cache).

    python benchmarks/bench_decode.py --device cpu --preset 100m --contexts 1024 65536 --batch_sizes 1 32
    python benchmarks/bench_decode.py --device cuda --preset 100m --json decode_h100.json

For every context length C the memory state is made by the real prefill: the model's parallel
forward over C random tokens, chunked (--prefill_chunk) so activations stay bounded; its time is
reported too. On the CPU the prefill runs for one sequence and its state is copied to every row of
the larger batches (--prefill_rows 1; 32 x 64K tokens through a 100M model would take hours on two
cores), which is the same work per step: a step's cost depends on the state's shape, never on its
values. On CUDA every row gets its own prefill by default (--prefill_rows all).

Then `model.step` (one token per sequence, the state updated each time) is timed: --warmup steps
first, then the median (and p10/p90) of --steps steps, with torch.cuda.synchronize around each
step on CUDA. The context lengths take turns step by step, so a change in machine load during
the run affects them alike. Prints a table and writes JSON (--json).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from mm_rec import MMRec100M, MMRecConfig
from mm_rec.inference.decode import CudaGraphStep
from mm_rec.inference.state import RecurrentState
from mm_rec.model.config import PRESETS


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def prefill_state(model, context: int, rows: int, chunk: int, expert_type, device, seed: int = 0):
    """The real state after `context` random tokens, for `rows` sequences; returns (state, seconds)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (rows, context), generator=gen).to(device)
    sync(device)
    start = time.perf_counter()
    states = model.consume(ids, expert_type=expert_type, chunk_size=min(chunk, context))
    sync(device)
    return states, time.perf_counter() - start


@torch.inference_mode()
def time_steps_interleaved(model, states_by_context: dict, batch: int, steps: int, warmup: int, expert_type,
                           device) -> dict:
    """Step every context's state in turn (round robin), so drift in machine load hits all context
    lengths alike; returns {context: [seconds per step]}."""
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, model.config.vocab_size, (warmup + steps, batch), generator=gen).to(device)
    states = dict(states_by_context)
    times = {context: [] for context in states}
    for i in range(warmup + steps):
        for context in states:
            sync(device)
            start = time.perf_counter()
            _, states[context] = model.step(tokens[i], states[context], expert_type=expert_type)
            sync(device)
            if i >= warmup:
                times[context].append(time.perf_counter() - start)
    return times


@torch.inference_mode()
def time_graph_steps(model, states_by_context: dict, batch: int, steps: int, warmup: int, expert_type,
                     device) -> dict:
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, model.config.vocab_size, (warmup + steps, batch), generator=gen).to(device)
    graphs = {}
    for context, st in states_by_context.items():
        state = RecurrentState.from_memory_states(st)
        graphs[context] = CudaGraphStep(model, batch, expert_type, state.dtype)  # the package's decode graph
        graphs[context].load(state)
    times = {context: [] for context in graphs}
    for i in range(warmup + steps):
        for context, step in graphs.items():
            sync(device)
            start = time.perf_counter()
            step(tokens[i])
            sync(device)
            if i >= warmup:
                times[context].append(time.perf_counter() - start)
    return times


def percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        info = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
        return f"{info.get('Model name', '?').strip()}, {info.get('CPU(s)', '?').strip()} CPUs"
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or platform.machine()


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True, cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--preset", default="100m", choices=sorted(PRESETS))
    p.add_argument("--contexts", type=int, nargs="+", default=[1024, 65536], help="context lengths C")
    p.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 32])
    p.add_argument("--expert", default="fused", choices=["text", "code", "fused"])
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 30 on cpu, 200 on cuda)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3 on cpu, 20 on cuda)")
    p.add_argument("--prefill_chunk", type=int, default=4096, help="chunk_size of the prefill forward")
    p.add_argument("--prefill_rows", choices=["1", "all"], default=None,
                   help="prefill one sequence and copy its state to every row (1, cpu default) or each row (all)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="model weights")
    p.add_argument("--cuda_graph", action="store_true",
                   help="on CUDA, also time the step replayed as a captured CUDA graph")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    on_gpu = device.type == "cuda"
    steps = args.steps or (200 if on_gpu else 30)
    warmup = args.warmup if args.warmup is not None else (20 if on_gpu else 3)
    prefill_rows = args.prefill_rows or ("all" if on_gpu else "1")
    if args.cuda_graph and not on_gpu:
        print("note: --cuda_graph needs --device cuda; timing the eager step only", file=sys.stderr)

    torch.manual_seed(0)
    model = MMRec100M(config=MMRecConfig(**PRESETS[args.preset])).to(device=device, dtype=getattr(torch, args.dtype))
    model.eval()
    print(f"{args.preset}: {model.get_num_params() / 1e6:.1f}M params, {args.dtype}, expert {args.expert}, "
          f"{describe_device(device)}, {torch.get_num_threads()} threads, torch {torch.__version__}", flush=True)

    # The states after each context length: one prefilled row (copied to the batch later) or every row.
    prefilled = {}
    if prefill_rows == "1":
        for context in args.contexts:
            prefilled[context] = prefill_state(model, context, 1, args.prefill_chunk, args.expert, device)
            seconds = prefilled[context][1]
            print(f"  prefill {context:>6} tokens x 1 row: {seconds:.1f}s ({context / seconds:,.0f} tok/s)", flush=True)

    rows = []
    for batch in args.batch_sizes:
        states, prefill = {}, {}
        for context in args.contexts:
            if prefill_rows == "1":
                base, prefill[context] = prefilled[context]
                states[context] = RecurrentState.from_memory_states(base).map(
                    lambda t: t.expand(batch, *t.shape[1:]).contiguous()).to_memory_states()
            else:
                states[context], prefill[context] = prefill_state(model, context, batch, args.prefill_chunk,
                                                                  args.expert, device)
                print(f"  prefill {context:>6} tokens x {batch} rows: {prefill[context]:.1f}s", flush=True)
        runs = {"eager": time_steps_interleaved(model, states, batch, steps, warmup, args.expert, device)}
        if args.cuda_graph and on_gpu:
            try:
                runs["cuda_graph"] = time_graph_steps(model, states, batch, steps, warmup, args.expert, device)
            except Exception as e:  # keep the eager numbers if capture fails on this setup
                print(f"  cuda graph capture failed ({type(e).__name__}: {e}); eager numbers only", flush=True)
        del states
        for mode, times in runs.items():
            for context, ts in times.items():
                median = statistics.median(ts)
                rows.append({"mode": mode, "context": context, "batch_size": batch, "median_ms": 1e3 * median,
                             "p10_ms": 1e3 * percentile(ts, 0.1), "p90_ms": 1e3 * percentile(ts, 0.9),
                             "tokens_per_s": batch / median, "prefill_s": prefill[context],
                             "prefill_rows": 1 if prefill_rows == "1" else batch, "steps": steps})
                print(f"  {mode:<10} context {context:>6}  batch {batch:>3}: {1e3 * median:8.2f} ms/step "
                      f"(p10 {rows[-1]['p10_ms']:.2f}, p90 {rows[-1]['p90_ms']:.2f}), {batch / median:,.0f} tok/s",
                      flush=True)

    print()
    print(f"{'mode':<10} {'context':>8} {'batch':>6} {'ms/step':>9} {'p10':>8} {'p90':>8} {'tokens/s':>10}")
    for r in rows:
        print(f"{r['mode']:<10} {r['context']:>8} {r['batch_size']:>6} {r['median_ms']:>9.2f} {r['p10_ms']:>8.2f} "
              f"{r['p90_ms']:>8.2f} {r['tokens_per_s']:>10,.0f}")
    lo, hi = min(args.contexts), max(args.contexts)
    for mode in dict.fromkeys(r["mode"] for r in rows):
        for batch in args.batch_sizes:
            per = {r["context"]: r["median_ms"] for r in rows if r["batch_size"] == batch and r["mode"] == mode}
            if lo != hi and lo in per and hi in per:
                print(f"{mode}, batch {batch}: step after {hi} tokens / step after {lo} tokens = {per[hi] / per[lo]:.3f}")

    if args.json:
        result = {"benchmark": "decode", "preset": args.preset, "params": model.get_num_params(),
                  "dtype": args.dtype, "expert": args.expert, "device": describe_device(device),
                  "threads": torch.get_num_threads(), "torch": torch.__version__, "commit": git_commit(),
                  "date": time.strftime("%Y-%m-%d"), "argv": sys.argv[1:] if argv is None else list(argv),
                  "warmup": warmup, "prefill_chunk": args.prefill_chunk, "results": rows}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
