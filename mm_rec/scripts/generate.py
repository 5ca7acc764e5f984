"""Generate text from a checkpoint, streaming tokens as they are made.

    python -m mm_rec.scripts.generate --checkpoint ckpt.pt --prompt "def fib(n):" --expert code
    python -m mm_rec.scripts.generate --checkpoint ckpt.pt --prompt "Call me" --temperature 0.8 --top_p 0.95 --seed 0

The prompt is consumed by one parallel (chunked) forward, then each token is one recurrent step
whose cost does not depend on the context length. With --session ID the memory state is loaded
before the prompt (if the session exists) and saved after the last token, so the next call
continues the same context without re-reading it. The session is locked from load to save (a
second generate on it waits for the first), and a --session_dir that cannot take the new state is
refused before anything is generated.
"""
from __future__ import annotations

import argparse
import math
import shutil
import sys
import time

import torch

from ..inference.generation import TokenStream
from ..inference.loading import load_model, require_source
from ..utils.device import resolve_device
from ..inference.sessions import SessionMemoryManager, state_nbytes, validate_session_id
from ..utils.cli import ArgumentParser
from ..utils.errors import UserError, run_cli
from ..utils.fileio import check_writable_dir


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m mm_rec.scripts.generate", description=__doc__)
    p.add_argument("--checkpoint", required=True, help="training checkpoint (.pt) or exported model directory")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--expert", default="fused", choices=["text", "code", "fused"],
                   help="text or code expert alone, or both (fused, the default)")
    p.add_argument("--max_new_tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 for greedy decoding (default 0.8)")
    p.add_argument("--top_k", type=int, default=None, help="sample among the K most likely tokens")
    p.add_argument("--top_p", type=float, default=None, help="nucleus sampling: smallest set with probability >= P")
    p.add_argument("--seed", type=int, default=None, help="make sampling reproducible")
    p.add_argument("--no_stop", action="store_true", help="keep going after an end-of-text token")
    p.add_argument("--session", default=None, metavar="ID", help="continue (and then save) this session's memory")
    p.add_argument("--session_dir", default="./sessions", help="where sessions are kept (default ./sessions)")
    p.add_argument("--tokenizer", help="tokenizer.json to use instead of the one stored with the checkpoint")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    return p


def check_args(args) -> None:
    if args.max_new_tokens < 0:
        raise UserError(f"--max_new_tokens must be >= 0, got {args.max_new_tokens}")
    if not math.isfinite(args.temperature) or args.temperature < 0:
        raise UserError(f"--temperature must be a number >= 0 (0 is greedy), got {args.temperature}")
    if args.top_k is not None and args.top_k < 1:
        raise UserError(f"--top_k must be >= 1, got {args.top_k}")
    if args.top_p is not None and not 0 < args.top_p <= 1:  # (false for nan too)
        raise UserError(f"--top_p must be in (0, 1], got {args.top_p}")
    if args.session is not None:
        if args.session == "":
            raise UserError("--session is empty; give the session a name (letters, digits, '_', '-', '.')")
        validate_session_id(args.session)


def check_room_for_session(session_dir: str, config, dtype) -> None:
    """Refuse now, before any text is printed, a full --session_dir (a session is written next to
    the old one, then renamed over it)."""
    needed = state_nbytes(config, 1, dtype) + (1 << 16)  # + the safetensors header and the filesystem's blocks
    free = shutil.disk_usage(session_dir).free
    if free < needed:
        raise UserError(f"no space left on device to save the session in {session_dir} (needs {needed:,} bytes, "
                        f"{free:,} free); free some space or choose another --session_dir")


def run_turn(args, model, tokenizer, device, memory, seen: int):
    """Generate, streaming the text; returns (stream, tokens of context it consumed in total)."""
    prompt_ids = tokenizer.encode(args.prompt)
    if memory is None:
        # A fresh context starts like every training document: right after an end-of-text token.
        prompt_ids = [tokenizer.eot_id] + prompt_ids
    if not prompt_ids:
        raise UserError("--prompt is empty; give some text to continue the session with")

    generator = None
    if args.seed is not None:
        generator = torch.Generator(device=device).manual_seed(args.seed)
        torch.manual_seed(args.seed)
    stream = TokenStream(model, torch.tensor([prompt_ids]), args.max_new_tokens, args.temperature, args.top_k,
                         args.top_p, args.expert, memory, generator, stop_at_eot=not args.no_stop,
                         eot_id=tokenizer.eot_id, keep_memory=args.session is not None)

    out = sys.stdout
    out.write(args.prompt)
    out.flush()
    generated, printed, text = [], "", ""
    stop = not args.no_stop
    start, first = time.perf_counter(), None
    for tokens in stream:  # with stop_at_eot the stream ends right after an end-of-text token
        first = first or time.perf_counter()
        generated.append(int(tokens[0]))
        # Decode everything generated so far and print the new suffix: a multi-byte character split
        # over two tokens appears once both have arrived instead of as two broken halves.
        text = tokenizer.decode(generated[:-1] if stop and generated[-1] == tokenizer.eot_id else generated)
        if not text.endswith("\ufffd"):
            out.write(text[len(printed):])
            out.flush()
            printed = text
    end = time.perf_counter()
    out.write(text[len(printed):] + "\n" if generated else "\n")
    out.flush()
    if generated:
        rate = f", then {(len(generated) - 1) / (end - first):.1f} tokens/s" if len(generated) > 1 else ""
        print(f"[prompt {len(prompt_ids)} tokens + first token in {first - start:.2f}s{rate}; "
              f"{len(generated)} tokens on {device}]", file=sys.stderr)
    # the stream's state covers the prompt and every generated token
    return stream, seen + len(prompt_ids) + len(generated)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    check_args(args)
    require_source(args.checkpoint)
    if args.session is not None:  # a session that cannot be kept is refused before the model is read
        check_writable_dir(args.session_dir, "session directory")
    device = resolve_device(args.device)
    loaded = load_model(args.checkpoint, device=device, tokenizer_path=args.tokenizer)
    model, tokenizer = loaded.model, loaded.require_tokenizer()
    config = model.config
    if args.session is None:
        run_turn(args, model, tokenizer, device, None, 0)
        return 0

    check_room_for_session(args.session_dir, config, next(model.parameters()).dtype)
    sessions = SessionMemoryManager(args.session_dir)
    waiting = lambda: print(f"[session {args.session} is in use by another process; waiting for its turn to end]",
                            file=sys.stderr)
    # Held from load to save: a concurrent turn on the same session waits, then continues from ours.
    with sessions.lock(args.session, on_wait=waiting):
        memory, seen, version = None, 0, None
        if sessions.exists(args.session):
            memory, metadata = sessions.load(args.session, device=device, config=config, batch_size=1)
            seen, version = metadata.get("token_count") or 0, metadata["version"]
        stream, total = run_turn(args, model, tokenizer, device, memory, seen)
        path = sessions.serialize_state(args.session, stream.memory_states, token_count=total, config=config,
                                        expected_version=version)
    print(f"[session {args.session}: {total} tokens of context saved to {path}]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
