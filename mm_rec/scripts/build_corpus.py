"""Build a large real corpus from what this machine holds, prepared for training (issue 20.2).

  python -m mm_rec.scripts.build_corpus --out data/big --text_dir /work/shared/data/text

code: every .py file of this Python (standard library and site-packages; test directories left
out unless --include_tests); prose: the bundled texts plus the .txt/.md/.rst files under each
--text_dir. Exact duplicates are dropped. Writes a prepare_data directory (train with
`train_modular --data_dir DIR`) and prints the tokens per domain, tokens/s and peak RSS.
Needs only the core dependencies.
"""
from __future__ import annotations

import argparse
import json
import sys

from mm_rec.data.build_corpus import build_corpus
from mm_rec.utils.cli import ArgumentParser
from mm_rec.utils.errors import run_cli
from mm_rec.utils.fileio import atomic_write_text


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m mm_rec.scripts.build_corpus", description=__doc__)
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (new, empty, or a previous output)")
    p.add_argument("--text_dir", nargs="+", default=[], metavar="DIR", help="more prose: directories of .txt/.md/.rst")
    p.add_argument("--code_dir", nargs="+", default=[], metavar="DIR", help="more code: directories of .py files")
    p.add_argument("--vocab_size", type=int, default=32000, help="tokens of the trained tokenizer (default 32000)")
    p.add_argument("--include_tests", action="store_true", help="keep test directories of the Python packages")
    p.add_argument("--max_code_bytes", type=int, default=None, metavar="N",
                   help="at most N bytes of code per directory (whole files, spread over the tree)")
    p.add_argument("--max_tokens", type=int, default=None, metavar="N", help="at most N tokens per domain")
    p.add_argument("--val_fraction", type=float, default=0.01, help="validation share per domain (default 0.01)")
    p.add_argument("--json", metavar="PATH", help="also write the figures (tokens, tokens/s, peak RSS) here")
    p.add_argument("--quiet", action="store_true", help="no progress bars or summary")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    meta = build_corpus(args.out, args.text_dir, args.code_dir, vocab_size=args.vocab_size,
                        include_tests=args.include_tests, max_code_bytes=args.max_code_bytes,
                        max_tokens=args.max_tokens, val_fraction=args.val_fraction, verbose=not args.quiet)
    b = meta["build"]
    print(f"corpus in {args.out}: text {b['tokens']['text']:,} tokens, code {b['tokens']['code']:,} tokens; "
          f"{b['seconds']:.0f} s on {b['cpus']} CPUs ({b['tokens_per_second']:,} tokens/s over the whole build; "
          f"{b['cpu_seconds']:.0f} CPU-seconds), "
          f"peak RSS {b['peak_rss_mb']:,} MB", file=sys.stderr)
    if args.json:
        atomic_write_text(args.json, json.dumps({"out": args.out, **b, "duplicates": meta["duplicates"],
                                                 "tokens_by_split": meta["tokens"]}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
