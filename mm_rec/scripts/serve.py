"""Serve a model over HTTP with OpenAI's API, per-session recurrent memory and continuous batching.

    python -m mm_rec.scripts.serve --checkpoint ./checkpoints/checkpoint_stage3_step_100.pt
    python -m mm_rec.scripts.serve --checkpoint ./mmrec_100m --device cuda --dtype bfloat16 --port 8000

Then any OpenAI client talks to it (base_url http://127.0.0.1:8000/v1, any api_key):
POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health, and
GET/DELETE /v1/sessions/{id}. A request with "session_id" (or the X-Session-Id header) continues
that conversation from its saved recurrent state; only the new turn is read. See README.md, "Serving".
"""
from __future__ import annotations

import argparse
import logging
import socket
import sys

import torch

from ..inference.loading import load_model, require_source
from ..utils.cli import ArgumentParser
from ..utils.device import resolve_device
from ..utils.errors import UserError, run_cli
from ..utils.fileio import check_writable_dir

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m mm_rec.scripts.serve", description=__doc__)
    p.add_argument("--checkpoint", required=True, help="training checkpoint (.pt) or exported model directory")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES),
                   help="model weights (default float32; bfloat16 halves weight memory on a GPU). "
                        "Recurrent states stay float32")
    p.add_argument("--session_dir", default="./sessions", help="where sessions are kept (default ./sessions)")
    p.add_argument("--tokenizer", help="tokenizer.json to use instead of the one stored with the checkpoint")
    p.add_argument("--model_name", default="mm-rec", help="the model id clients send (default mm-rec)")
    p.add_argument("--max_prompt_tokens", type=int, default=131072, help="longer prompts get 413 (default 131072)")
    p.add_argument("--max_tokens", type=int, default=4096, help="the largest max_tokens a request may ask (default 4096)")
    p.add_argument("--max_concurrent", type=int, default=512,
                   help="requests in flight at once; more get 429 (default 512)")
    p.add_argument("--max_hot_sessions", type=int, default=1024,
                   help="session states kept on the device, least recently used dropped (default 1024, ~1 MB each "
                        "at 100M)")
    p.add_argument("--prefill_chunk", type=int, default=None,
                   help="prompt tokens prefilled between two decode steps (default 2048 on cuda, 256 on cpu)")
    p.add_argument("--no_cuda_graphs", action="store_true", help="decode eagerly on CUDA too")
    p.add_argument("--log_prompts", action="store_true", help="log prompt text (off: only token counts are logged)")
    p.add_argument("--log_level", default="info", choices=["debug", "info", "warning", "error"])
    return p


def check_args(args) -> None:
    for name in ("max_prompt_tokens", "max_tokens", "max_concurrent"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.max_hot_sessions < 0:
        raise UserError(f"--max_hot_sessions must be >= 0, got {args.max_hot_sessions}")
    if args.prefill_chunk is not None and args.prefill_chunk < 1:
        raise UserError(f"--prefill_chunk must be >= 1, got {args.prefill_chunk}")
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port must be in 0..65535, got {args.port}")


def check_port_free(host: str, port: int) -> None:
    """Fail in one line before loading the model when the address cannot be listened on."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise UserError(f"--host {host!r} is not an address of this machine ({e.strerror})") from None
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as e:
            raise UserError(f"cannot listen on {host}:{port} ({e.strerror}); choose another --port or stop "
                            "what uses it") from None


def build_app(args):
    """The app for these arguments (the model loaded; the engine starts with the app)."""
    from ..serving import Engine, ServerSettings, SessionStore, create_app
    from ..serving.engine import log as serving_log
    device = resolve_device(args.device)
    require_source(args.checkpoint)  # a mistyped path creates no session folder
    check_writable_dir(args.session_dir, "session directory")
    loaded = load_model(args.checkpoint, device=device, dtype=DTYPES[args.dtype], tokenizer_path=args.tokenizer)
    tokenizer = loaded.require_tokenizer()
    chunk = args.prefill_chunk or (2048 if device.type == "cuda" else 256)
    state_dtype = torch.float64 if args.dtype == "float64" else torch.float32
    engine = Engine(loaded.model, tokenizer, prefill_chunk=chunk,
                    state_dtype=state_dtype, use_cuda_graphs=False if args.no_cuda_graphs else None)
    store = SessionStore(args.session_dir, loaded.model, device, max_hot=args.max_hot_sessions)
    settings = ServerSettings(model_name=args.model_name, max_prompt_tokens=args.max_prompt_tokens,
                              max_tokens=args.max_tokens, max_concurrent=args.max_concurrent,
                              log_prompts=args.log_prompts)
    serving_log.setLevel(args.log_level.upper())
    # On CUDA the decode graphs for every batch size up to --max_concurrent are captured at start.
    warmup = [1 << i for i in range(args.max_concurrent.bit_length())] if device.type == "cuda" else [1]
    return create_app(engine, store, settings, warmup_batch_sizes=warmup)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    check_args(args)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import uvicorn
    check_port_free(args.host, args.port)
    app = build_app(args)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False)
    return 0


def cli() -> None:
    """The mmrec-serve command."""
    sys.exit(run_cli(main))


if __name__ == "__main__":
    cli()
