"""Load generator for the server (mm_rec.scripts.serve), over HTTP on 127.0.0.1.

On the GPU (the 100M model; random weights unless --checkpoint names a trained one), one command:

    python benchmarks/bench_serve.py --preset 100m --device cuda --dtype bfloat16 --json benchmarks/serve_h200.json

CPU smoke run (a tiny model made on the fly; what the CI test runs):

    python benchmarks/bench_serve.py --smoke --json /tmp/serve_smoke.json

It starts the server itself (a subprocess on a free port of 127.0.0.1; or use --url for one already
running) and measures:
1. streams: for each of --streams (1, 8, 64, 256) concurrent streaming completions of
   --prompt_tokens random token ids and --max_tokens new tokens each (ignore_eos, greedy): aggregate
   tokens/s (all tokens / wall time), time to first token (p50, p99) and inter-token latency
   (gaps between a stream's consecutive chunks: one chunk per token; p50, p99);
2. idle sessions: --idle_sessions sessions made (a short prompt each, max_tokens 0), then the
   server's device memory, hot-session bytes and RSS (/health) and the sessions' bytes on disk;
3. context: for each of --contexts (1K, 64K) a session whose prompt is that many tokens
   (prefill time), then one stream of --max_tokens continuing it: inter-token latency and device
   memory, which should not depend on the context.
Prints a table and writes JSON (--json).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import platform
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


# -- the server ------------------------------------------------------------------------------------

def make_checkpoint(directory: Path, preset: str) -> Path:
    """A random-weight model of the preset (or the smoke test's tiny one) with a small tokenizer:
    the benchmark sends token ids, so only the shapes matter."""
    import torch

    from mm_rec.data.tokenizer import train_tokenizer
    from mm_rec.model import MMRec100M, MMRecConfig
    from mm_rec.model.config import PRESETS
    from mm_rec.training.checkpoint import save_checkpoint
    shape = (dict(vocab_size=300, expert_dim=16, num_layers=2, num_heads=2, ffn_dim=32) if preset == "smoke"
             else PRESETS[preset])
    tokenizer = train_tokenizer(["The whale surfaced near the ship. def main(): return 0\n"] * 20, vocab_size=300)
    torch.manual_seed(0)
    config = MMRecConfig(**shape)
    model = MMRec100M(config=config)
    path = directory / "checkpoint_stage3_step_0.pt"
    save_checkpoint({"model_state_dict": model.state_dict(), "optimizer_state_dict": {}, "scheduler_state_dict": {},
                     "step": 0, "loss": 0.0, "stage": "stage3", "config": config.to_dict(), "train_args": {},
                     "tokenizer": tokenizer.to_json()}, path)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, checkpoint: Path, session_dir: Path):
    port = free_port()
    cmd = [sys.executable, "-m", "mm_rec.scripts.serve", "--checkpoint", str(checkpoint), "--host", "127.0.0.1",
           "--port", str(port), "--session_dir", str(session_dir), "--dtype", args.dtype,
           "--max_concurrent", str(max(max(args.streams), args.session_concurrency) + 8),
           "--max_prompt_tokens", str(max(args.contexts) + 16), "--max_tokens", str(args.max_tokens),
           "--log_level", "warning"]
    if args.device:
        cmd += ["--device", args.device]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    import httpx
    deadline = time.monotonic() + args.start_timeout
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"error: the server exited with status {proc.returncode} while starting")
        if time.monotonic() > deadline:
            proc.kill()
            raise SystemExit(f"error: the server did not start within {args.start_timeout}s")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)


# -- load --------------------------------------------------------------------------------------------

async def one_stream(http, url, body, timeout):
    """One streaming completion; returns (send time, chunk arrival times, completion tokens)."""
    sent = time.monotonic()
    times, usage = [], None
    async with http.stream("POST", url + "/v1/completions", json=body, timeout=timeout) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread()).decode()[:200]}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices"):
                if chunk["choices"][0].get("finish_reason") is None:
                    times.append(time.monotonic())
            elif chunk.get("usage"):
                usage = chunk["usage"]
    return sent, times, (usage or {}).get("completion_tokens", len(times))


def _client_worker(url, bodies, timeout, start_at, out):
    """A client process: its share of the streams, all at once, starting at start_at (monotonic)."""
    import httpx

    async def run():
        limits = httpx.Limits(max_connections=len(bodies) + 4, max_keepalive_connections=len(bodies) + 4)
        async with httpx.AsyncClient(limits=limits, timeout=timeout) as http:
            await asyncio.sleep(max(0.0, start_at - time.monotonic()))
            return await asyncio.gather(*[one_stream(http, url, b, timeout) for b in bodies])

    out.put(asyncio.run(run()))


def run_streams(url, n_streams, args, vocab):
    rng = random.Random(n_streams)
    bodies = [{"model": "mm-rec", "prompt": [rng.randrange(vocab) for _ in range(args.prompt_tokens)],
               "max_tokens": args.max_tokens, "temperature": 0, "ignore_eos": True, "stream": True}
              for _ in range(n_streams)]
    procs = max(1, min(args.client_procs, n_streams // 16 or 1))
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    start_at = time.monotonic() + (2.0 if procs > 1 else 0.1)
    workers = [ctx.Process(target=_client_worker, args=(url, bodies[i::procs], args.request_timeout, start_at, out))
               for i in range(procs)]
    for w in workers:
        w.start()
    results = []
    for _ in workers:
        results += out.get(timeout=args.request_timeout + 60)
    for w in workers:
        w.join(30)
    first_sent = min(s for s, _, _ in results)
    last = max(t[-1] for _, t, _ in results if t)
    tokens = sum(n for _, _, n in results)
    ttft = [t[0] - s for s, t, _ in results if t]
    itl = [b - a for _, t, _ in results for a, b in zip(t, t[1:])]
    return {"streams": n_streams, "client_processes": procs, "prompt_tokens": args.prompt_tokens,
            "max_tokens": args.max_tokens, "completion_tokens": tokens, "wall_s": last - first_sent,
            "tokens_per_s": tokens / (last - first_sent),
            "ttft_p50_ms": 1e3 * percentile(ttft, 0.5), "ttft_p99_ms": 1e3 * percentile(ttft, 0.99),
            "itl_p50_ms": 1e3 * percentile(itl, 0.5) if itl else None,
            "itl_p99_ms": 1e3 * percentile(itl, 0.99) if itl else None}


def percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


async def make_sessions(url, n, concurrency, vocab, timeout):
    import httpx
    rng = random.Random(0)
    sem = asyncio.Semaphore(concurrency)

    async def one(http, i):
        async with sem:
            body = {"model": "mm-rec", "prompt": [rng.randrange(vocab) for _ in range(8)], "max_tokens": 0,
                    "session_id": f"idle-{i}"}
            r = await http.post(url + "/v1/completions", json=body, timeout=timeout)
            r.raise_for_status()

    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(limits=limits) as http:
        await asyncio.gather(*[one(http, i) for i in range(n)])


def health(url) -> dict:
    import httpx
    return httpx.get(url + "/health", timeout=30).json()


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def context_run(url, context, args, vocab):
    import httpx
    rng = random.Random(context)
    sid = f"context-{context}"
    start = time.monotonic()
    r = httpx.post(url + "/v1/completions", json={"model": "mm-rec", "prompt": [rng.randrange(vocab) for _ in
                                                                               range(context)],
                                                  "max_tokens": 0, "session_id": sid}, timeout=args.request_timeout)
    r.raise_for_status()
    prefill_s = time.monotonic() - start
    body = {"model": "mm-rec", "prompt": [rng.randrange(vocab)], "max_tokens": args.max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "session_id": sid}

    async def run():
        async with httpx.AsyncClient() as http:
            return await one_stream(http, url, body, args.request_timeout)

    _, times, tokens = asyncio.run(run())
    itl = [b - a for a, b in zip(times, times[1:])]
    info = health(url)
    return {"context": context, "prefill_s": prefill_s, "prefill_tokens_per_s": context / prefill_s,
            "completion_tokens": tokens, "itl_p50_ms": 1e3 * percentile(itl, 0.5),
            "itl_p99_ms": 1e3 * percentile(itl, 0.99),
            "device_memory_allocated_bytes": info.get("device_memory_allocated_bytes"),
            "process_rss_bytes": info.get("process_rss_bytes")}


# -- main ------------------------------------------------------------------------------------------------

def mb(x):
    return "-" if x is None else f"{x / 2**20:,.1f}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="an already running server (default: start one)")
    p.add_argument("--checkpoint", help="model to serve (default: random weights of --preset)")
    p.add_argument("--preset", default="100m", choices=["100m", "tiny"], help="shape of the random-weight model")
    p.add_argument("--device", default=None, help="the server's --device (default: cuda if available)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="the server's weights")
    p.add_argument("--smoke", action="store_true", help="a tiny model on the CPU and small numbers (CI)")
    p.add_argument("--streams", type=int, nargs="+", default=[1, 8, 64, 256])
    p.add_argument("--prompt_tokens", type=int, default=100)
    p.add_argument("--max_tokens", type=int, default=256)
    p.add_argument("--idle_sessions", type=int, default=10000)
    p.add_argument("--session_concurrency", type=int, default=64, help="requests in flight making sessions")
    p.add_argument("--contexts", type=int, nargs="+", default=[1024, 65536])
    p.add_argument("--client_procs", type=int, default=min(8, max(1, (os.cpu_count() or 2) // 2)),
                   help="client processes sharing the streams (one Python process cannot parse 30K chunks/s)")
    p.add_argument("--request_timeout", type=float, default=600)
    p.add_argument("--start_timeout", type=float, default=900)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    if args.smoke:
        args.device = args.device or "cpu"
        args.streams, args.prompt_tokens, args.max_tokens = [1, 4], 12, 8
        args.idle_sessions, args.session_concurrency, args.contexts = 20, 8, [64, 512]
        args.client_procs = 1

    work = Path(tempfile.mkdtemp(prefix="bench_serve."))
    proc = None
    try:
        if args.url:
            url = args.url.rstrip("/")
        else:
            checkpoint = Path(args.checkpoint) if args.checkpoint else make_checkpoint(
                work, "smoke" if args.smoke else args.preset)
            print(f"starting the server on {checkpoint} ...", flush=True)
            proc, url = start_server(args, checkpoint, work / "sessions")
        import httpx
        info = health(url)
        vocab = info["vocab_size"]  # prompts are random token ids below it
        print(f"server: {info['device']}, cuda graphs {info['cuda_graphs']}", flush=True)

        streams = []
        for n in args.streams:
            # a warm server, as the targets say: an untimed round at this concurrency first (the
            # first request of a shape pays its kernels' compilation and its batch's graph capture)
            run_streams(url, n, argparse.Namespace(**{**vars(args), "max_tokens": 4}), vocab)
            row = run_streams(url, n, args, vocab)
            streams.append(row)
            print(f"  {n:>4} streams: {row['tokens_per_s']:>10,.0f} tok/s  ttft p50 {row['ttft_p50_ms']:.1f} ms  "
                  f"itl p50 {row['itl_p50_ms']:.2f} / p99 {row['itl_p99_ms']:.2f} ms", flush=True)

        before = health(url)
        start = time.monotonic()
        asyncio.run(make_sessions(url, args.idle_sessions, args.session_concurrency, vocab, args.request_timeout))
        made_s = time.monotonic() - start
        after = health(url)
        idle = {"sessions": args.idle_sessions, "seconds_to_make": made_s,
                "hot_sessions": after["hot_sessions"], "hot_session_bytes": after["hot_session_bytes"],
                "device_memory_allocated_bytes_before": before.get("device_memory_allocated_bytes"),
                "device_memory_allocated_bytes": after.get("device_memory_allocated_bytes"),
                "process_rss_bytes": after.get("process_rss_bytes"),
                "disk_bytes": dir_bytes(work / "sessions") if not args.url else None}
        print(f"  {args.idle_sessions} idle sessions made in {made_s:.1f}s: {after['hot_sessions']} hot "
              f"({mb(after['hot_session_bytes'])} MiB), device {mb(idle['device_memory_allocated_bytes'])} MiB",
              flush=True)

        contexts = []
        for c in args.contexts:
            contexts.append(context_run(url, c, args, vocab))
            r = contexts[-1]
            print(f"  context {c:>6}: prefill {r['prefill_s']:.2f}s, itl p50 {r['itl_p50_ms']:.2f} ms, "
                  f"device {mb(r['device_memory_allocated_bytes'])} MiB", flush=True)
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(work, ignore_errors=True)

    print()
    print(f"{'streams':>8} {'tokens/s':>11} {'TTFT p50':>9} {'TTFT p99':>9} {'ITL p50':>8} {'ITL p99':>8}  (ms)")
    for r in streams:
        print(f"{r['streams']:>8} {r['tokens_per_s']:>11,.0f} {r['ttft_p50_ms']:>9.1f} {r['ttft_p99_ms']:>9.1f} "
              f"{r['itl_p50_ms'] or 0:>8.2f} {r['itl_p99_ms'] or 0:>8.2f}")
    print(f"\n{'context':>8} {'prefill s':>10} {'ITL p50':>8} {'ITL p99':>8} {'device MiB':>11}")
    for r in contexts:
        print(f"{r['context']:>8} {r['prefill_s']:>10.2f} {r['itl_p50_ms']:>8.2f} {r['itl_p99_ms']:>8.2f} "
              f"{mb(r['device_memory_allocated_bytes']):>11}")
    print(f"\nidle sessions: {idle['sessions']}, {idle['hot_sessions']} hot on the device "
          f"({mb(idle['hot_session_bytes'])} MiB), device {mb(idle['device_memory_allocated_bytes'])} MiB, "
          f"disk {mb(idle['disk_bytes'])} MiB")
    if args.json:
        result = {"benchmark": "serve", "smoke": args.smoke, "server": info, "dtype": args.dtype,
                  "checkpoint": args.checkpoint, "preset": None if args.checkpoint else args.preset,
                  "client": platform.node(), "date": time.strftime("%Y-%m-%d"),
                  "argv": sys.argv[1:] if argv is None else list(argv),
                  "streams": streams, "idle_sessions": idle, "contexts": contexts}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
