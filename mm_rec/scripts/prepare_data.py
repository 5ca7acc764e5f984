"""Tokenize text and code into the memmaps training reads.

  python -m mm_rec.scripts.prepare_data --text books/ notes.txt --code src/ --out data/mine
  python -m mm_rec.scripts.prepare_data --text hf:NAME[:CONFIG][:SPLIT] --code hf:NAME --max_tokens 500000000 ...

A source is a file, a directory (searched recursively by extension) or a dataset:
  .txt .md .rst   prose, cut at blank lines into documents of >= --txt_doc_chars characters
  code files      (.py .c .js .rs ...) one document per file
  .jsonl          one document per line, from its "text" or "content" field (code: also "code")
  .parquet        one document per row of that column (needs pyarrow)
  .csv .json .arrow, and hf:NAME[:CONFIG][:SPLIT]: one document per row, read (streamed) through
                  the Hugging Face datasets library (pip install "mm-rec[hf]"); NAME is a hub
                  dataset or a local file or directory of parquet/arrow/json(l)/csv files or a
                  save_to_disk directory; --text_field / --code_field choose the field
Files may be .xz or .gz compressed. Exact duplicate documents are dropped and counted. DIR gets
tokenizer.json, meta.json (written last) and {text,code}_{train,val}.bin. Without --tokenizer a
byte-level BPE is trained on the data.
"""
from __future__ import annotations

import argparse
import sys
import time

from mm_rec.data.prepare import prepare_data
from mm_rec.data.sources import DEFAULT_TXT_DOC_CHARS
from mm_rec.utils.cli import ArgumentParser
from mm_rec.utils.errors import UserError, run_cli

DEFAULT_VOCAB_SIZE = 32000


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m mm_rec.scripts.prepare_data", description=__doc__)
    p.add_argument("--text", nargs="+", default=[], metavar="SRC", help="prose files or directories")
    p.add_argument("--code", nargs="+", default=[], metavar="SRC", help="source-code files or directories")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (new, empty, or a previous output)")
    p.add_argument("--tokenizer", metavar="PATH",
                   help="use this tokenizer instead of training one: tokenizer.json, or a directory with it or "
                        "with GPT-2's vocab.json + merges.txt (or encoder.json + vocab.bpe)")
    p.add_argument("--vocab_size", type=int, default=None,
                   help=f"tokens of the trained tokenizer (default {DEFAULT_VOCAB_SIZE}); must match the model")
    p.add_argument("--val_fraction", type=float, default=0.01,
                   help="share of each domain's bytes held out for validation, by whole document (default 0.01)")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/validation split (default 0)")
    p.add_argument("--txt_doc_chars", type=int, default=DEFAULT_TXT_DOC_CHARS,
                   help="prose files are cut at blank lines into documents of at least this many characters; "
                        f"0 = one document per paragraph (default {DEFAULT_TXT_DOC_CHARS})")
    p.add_argument("--text_field", metavar="NAME", help="record field holding a prose document "
                   "(jsonl/parquet/csv/datasets; default: text, else content)")
    p.add_argument("--code_field", metavar="NAME", help="record field holding a code document "
                   "(default: text, else content, else code)")
    p.add_argument("--max_tokens", type=int, default=None, metavar="N",
                   help="at most N tokens per domain (train + val); sources are read only as far as needed")
    p.add_argument("--quiet", action="store_true", help="no progress bars or summary")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if not args.text and not args.code:
        raise UserError("give at least one --text or --code source")
    if args.tokenizer is not None and args.vocab_size is not None:
        raise UserError("--vocab_size applies only when training a tokenizer; drop it when using --tokenizer")
    t0 = time.time()
    prepare_data(args.text, args.code, args.out, tokenizer_path=args.tokenizer,
                 vocab_size=args.vocab_size or DEFAULT_VOCAB_SIZE, val_fraction=args.val_fraction,
                 seed=args.seed, txt_doc_chars=args.txt_doc_chars, text_field=args.text_field,
                 code_field=args.code_field, max_tokens=args.max_tokens, verbose=not args.quiet)
    if not args.quiet:
        print(f"done in {time.time() - t0:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
