"""Evaluate a checkpoint: loss, perplexity and bits per byte per domain and per expert (guide §9.1).

    python -m mm_rec.scripts.evaluate --checkpoint ckpt.pt                         # the run's own validation split
    python -m mm_rec.scripts.evaluate --checkpoint ckpt.pt --data_dir data/        # validation split
    python -m mm_rec.scripts.evaluate --checkpoint ckpt.pt --text book.txt --code src/ --json out.json

--data_dir scores the validation memmaps exactly as the trainer does (same windows, same number).
--text/--code files are tokenized on the fly with the checkpoint's tokenizer and scored as one
stream with the memory state carried across --seq_len windows (bounded memory, full context).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from ..data.prepare import DOMAINS
from ..inference.evaluation import (EXPERTS, evaluate_data_dir, evaluate_files, format_table,
                                    token_byte_lengths)
from ..inference.loading import load_model, require_source
from ..utils.device import resolve_device
from ..utils.cli import ArgumentParser
from ..utils.errors import UserError, run_cli
from ..utils.fileio import atomic_write_text, check_writable_dir

DEFAULT_SEQ_LEN = 512


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m mm_rec.scripts.evaluate", description=__doc__)
    p.add_argument("--checkpoint", required=True, help="training checkpoint (.pt) or exported model directory")
    p.add_argument("--data_dir", help="prepared data directory: evaluate its validation split "
                                      "(default, without --text/--code: the training run's data)")
    p.add_argument("--text", nargs="+", default=[], metavar="FILE", help="text files/directories to evaluate")
    p.add_argument("--code", nargs="+", default=[], metavar="FILE", help="code files/directories to evaluate")
    p.add_argument("--expert", default="all", choices=[*EXPERTS, "all"],
                   help="which expert scores the data: text, code, fused (both experts) or all (default)")
    p.add_argument("--seq_len", type=int, default=None,
                   help=f"window length (default: the training run's seq_len, else {DEFAULT_SEQ_LEN})")
    p.add_argument("--batch_size", type=int, default=8, help="windows per batch with --data_dir (default 8)")
    p.add_argument("--max_batches", type=int, default=None,
                   help="with --data_dir, stop after this many batches per domain (default: the whole split)")
    p.add_argument("--domain", choices=[*DOMAINS, "all"], default="all", help="with --data_dir: which domains")
    p.add_argument("--tokenizer", help="tokenizer.json to use instead of the one stored with the checkpoint")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--bf16", action="store_true", help="run under bfloat16 autocast (losses still summed in fp32)")
    p.add_argument("--json", metavar="OUT", help="also write the results as JSON to OUT")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def training_data_dir(loaded) -> Path:
    """No data flags: the validation split the checkpoint's training run used (its --data_dir, or
    the bundled default corpus it was built from)."""
    train_args = loaded.train_args or {}
    if not isinstance(train_args.get("data_dir"), (str, type(None))):
        raise UserError(f"{loaded.source}: train_args['data_dir'] is not a path; give --data_dir DIR or --text/--code FILE...")
    if "data_dir" not in train_args or train_args.get("synthetic"):
        why = "it was trained on synthetic tokens" if train_args.get("synthetic") else "it has no record of its training data"
        raise UserError(f"nothing to evaluate: {loaded.source} names no data ({why}); "
                        "give --data_dir DIR or --text/--code FILE...")
    if train_args.get("data_dir"):
        if not Path(train_args["data_dir"]).exists():
            raise UserError(f"the training data of {loaded.source} ({train_args['data_dir']}) is gone; "
                            "give --data_dir DIR or --text/--code FILE...")
        return Path(train_args["data_dir"])
    from ..data.corpus import ensure_default_corpus
    return ensure_default_corpus(loaded.model.config.vocab_size)


def training_seq_len(loaded) -> int | None:
    """The training run's --seq_len, else its stage's (the schedule of its --preset)."""
    train_args = loaded.train_args or {}
    seq_len = train_args.get("seq_len")
    if seq_len is not None and (not isinstance(seq_len, int) or isinstance(seq_len, bool) or seq_len < 1):
        raise UserError(f"{loaded.source}: train_args['seq_len'] is {seq_len!r}, not a positive integer; "
                        "pass --seq_len N")
    if seq_len:
        return seq_len
    from ..training.stages import SCHEDULES
    preset = train_args.get("preset")
    spec = SCHEDULES.get(preset, {}).get(loaded.stage or "") if isinstance(preset, str) else None
    return spec.seq_len if spec is not None else None


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.data_dir and (args.text or args.code):
        raise UserError("give either --data_dir or --text/--code files, not both")
    for name in ("seq_len", "batch_size", "max_batches"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UserError(f"--{name} must be >= 1, got {value}")
    for path in [*args.text, *args.code, *([args.data_dir] if args.data_dir else [])]:
        if not Path(path).exists():
            raise UserError(f"{path} does not exist")
    require_source(args.checkpoint)
    if args.json:  # a read-only or full destination is found now, not after the evaluation
        check_writable_dir(Path(args.json).parent, "directory of --json")
    device = resolve_device(args.device)
    autocast_dtype = torch.bfloat16 if args.bf16 else None

    loaded = load_model(args.checkpoint, device=device, tokenizer_path=args.tokenizer)
    model = loaded.model
    if not args.data_dir and not (args.text or args.code):
        args.data_dir = str(training_data_dir(loaded))
    seq_len = args.seq_len or training_seq_len(loaded) or DEFAULT_SEQ_LEN
    experts = list(EXPERTS) if args.expert == "all" else [args.expert]
    fusion = "on" if model.use_fusion else "off"
    print(f"checkpoint: {loaded.source} (stage {loaded.stage or '-'}, step {loaded.step if loaded.step is not None else '-'}, "
          f"fusion {fusion}, {model.get_num_params() / 1e6:.1f}M params) on {device}, seq_len {seq_len}",
          file=sys.stderr)

    if args.data_dir:
        from ..data.loader import TokenData
        data = TokenData(args.data_dir, vocab_size=model.config.vocab_size)
        data_tokenizer = data.tokenizer()
        if loaded.tokenizer is not None and loaded.tokenizer.sha256 != data_tokenizer.sha256:
            raise UserError(f"{args.data_dir} was tokenized with a different tokenizer than {args.checkpoint}; "
                            "prepare the data with the checkpoint's tokenizer.json (prepare_data --tokenizer)")
        domains = list(DOMAINS) if args.domain == "all" else [args.domain]
        source = f"validation split of {args.data_dir}"
        results = evaluate_data_dir(model, data, domains, experts, args.batch_size, seq_len, args.max_batches,
                                    device, autocast_dtype, byte_lengths=token_byte_lengths(data_tokenizer))
    else:
        tokenizer = loaded.require_tokenizer()
        source = "files (carried state)"
        progress = None
        if not args.quiet:
            from tqdm import tqdm
            progress = lambda total, desc: tqdm(total=total, desc=desc, unit="tok", file=sys.stderr, leave=False)
        results = evaluate_files(model, tokenizer, {"text": args.text, "code": args.code}, experts, seq_len,
                                 device, autocast_dtype, progress_factory=progress)

    print(format_table(results))
    if args.json:
        report = {"checkpoint": str(loaded.source), "stage": loaded.stage, "step": loaded.step,
                  "use_fusion": bool(model.use_fusion), "source": source, "seq_len": seq_len,
                  "files": {"text": args.text, "code": args.code} if not args.data_dir else None,
                  "data_dir": args.data_dir, "max_batches": args.max_batches,
                  "batch_size": args.batch_size if args.data_dir else 1,
                  "results": [r.to_dict() for r in results]}
        atomic_write_text(args.json, json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
