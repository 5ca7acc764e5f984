"""lm-evaluation-harness throughput on an exported MM-Rec (`export --format hf`, `lm_eval --model hf`).

Builds the model (a checkpoint with --checkpoint, else the preset with random weights and a
tokenizer trained on the bundled prose: throughput does not depend on the weights), exports the
Hugging Face directory, writes a local multiple-choice task of --docs documents (contexts of
~--context_tokens tokens cut from the bundled prose, 4 choices each: 4 loglikelihood requests a
document), and times `lm_eval.simple_evaluate` on it. Prints a table, writes JSON.

    python benchmarks/bench_lm_eval.py --preset 100m --device cuda --docs 500 --json lm_eval_h200.json
    python benchmarks/bench_lm_eval.py --smoke                      # CPU, tiny model, a few documents
"""
from __future__ import annotations

import argparse
import json
import lzma
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def write_task(directory: Path, docs: list[dict]) -> str:
    (directory / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (directory / "mmrec_bench_mc.yaml").write_text(f"""task: mmrec_bench_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {directory / 'docs.jsonl'}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
""")
    return "mmrec_bench_mc"


def make_docs(text: str, n: int, context_chars: int) -> list[dict]:
    words = text.split()
    docs, i = [], 0
    step = max(context_chars // 6, 8)
    while len(docs) < n:
        start = (i * step) % max(len(words) - step - 8, 1)
        chunk = words[start:start + step]
        options = [" " + " ".join(words[start + step + k:start + step + k + 3]) for k in range(4)]
        docs.append({"context": " ".join(chunk), "choices": options, "answer": 0})
        i += 1
    return docs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", help="an MM-Rec checkpoint or export (default: random weights of --preset)")
    ap.add_argument("--preset", default="100m", choices=["100m", "tiny"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--docs", type=int, default=200)
    ap.add_argument("--context_tokens", type=int, default=256)
    ap.add_argument("--batch_size", type=int, default=32)
    ap.add_argument("--smoke", action="store_true", help="tiny model, 8 documents, CPU")
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.smoke:
        args.preset, args.docs, args.device, args.context_tokens, args.batch_size = "tiny", 8, "cpu", 32, 4

    import torch
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from mm_rec.data.corpus import bundled_prose_paths
    from mm_rec.data.tokenizer import train_tokenizer
    from mm_rec.hf.export import save_hf
    from mm_rec.inference.loading import load_model
    from mm_rec.model import MMRec100M
    from mm_rec.model.config import PRESETS

    prose = lzma.decompress(bundled_prose_paths()[0].read_bytes()).decode("utf-8")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.checkpoint:
            loaded = load_model(args.checkpoint, device="cpu")
            model, tok = loaded.model, loaded.require_tokenizer()
        else:
            config = dict(PRESETS[args.preset])
            tok = train_tokenizer([prose[:2_000_000]], config["vocab_size"])
            config["vocab_size"] = tok.vocab_size
            torch.manual_seed(0)
            model = MMRec100M(**config)
        save_hf(model, tmp / "hf", tok)
        task = write_task(tmp, make_docs(prose, args.docs, 4 * args.context_tokens))
        t0 = time.perf_counter()
        out = simple_evaluate(model="hf", model_args=f"pretrained={tmp / 'hf'},trust_remote_code=True,dtype={args.dtype}",
                              tasks=[task], task_manager=TaskManager(include_path=str(tmp), include_defaults=False),
                              device=args.device, batch_size=args.batch_size)
        seconds = time.perf_counter() - t0
    requests = 4 * args.docs
    tokens = requests * (args.context_tokens + 4)  # approximately: the context is re-read per choice
    row = {"preset": args.preset if not args.checkpoint else args.checkpoint, "device": args.device,
           "dtype": args.dtype, "docs": args.docs, "requests": requests, "seconds": round(seconds, 2),
           "requests_per_s": round(requests / seconds, 1), "approx_tokens_per_s": round(tokens / seconds),
           "acc": out["results"][task].get("acc,none")}
    print("| model | device | dtype | loglikelihood requests | s | requests/s | ~tokens/s |")
    print(f"| {row['preset']} | {row['device']} | {row['dtype']} | {requests} | {row['seconds']} | "
          f"{row['requests_per_s']} | {row['approx_tokens_per_s']:,} |")
    if args.json:
        Path(args.json).write_text(json.dumps(row, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
