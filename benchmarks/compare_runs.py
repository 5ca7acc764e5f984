"""Summarise and compare train_modular runs from their metrics.jsonl files.

    python benchmarks/compare_runs.py RUN_DIR [RUN_DIR ...] [--skip 10] [--json OUT]

For each run and stage: steps logged, median tokens/s over the steps after the first --skip
(tokens/s as the trainer logs it: global tokens of a step over its wall time, every process
counted), first and last loss, and the last validation losses. With two or more runs, the losses
of every step the first run and each other run both logged are compared (max |diff| and max
relative diff): this is how a DDP run is held to a single-process run on the same global batch,
and a resumed run to an uninterrupted one.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mm_rec.training.metrics import read_metrics  # noqa: E402


def summarise(run: Path, skip: int) -> dict:
    rows = read_metrics(run / "metrics.jsonl", type=None)
    out = {}
    for stage in dict.fromkeys(r["stage"] for r in rows if r.get("type") == "train"):
        train = {r["step"]: r for r in rows if r.get("type") == "train" and r["stage"] == stage}
        steps = sorted(train)
        rates = [train[s]["tokens_per_s"] for s in steps[skip:]] or [train[s]["tokens_per_s"] for s in steps]
        evals = [r for r in rows if r.get("type") == "eval" and r["stage"] == stage]
        out[stage] = {"steps": len(steps), "first_step": steps[0], "last_step": steps[-1],
                      "median_tokens_per_s": statistics.median(rates),
                      "first_loss": train[steps[0]]["loss"], "last_loss": train[steps[-1]]["loss"],
                      "last_eval": {k: v for k, v in evals[-1].items() if k.startswith("val_")} if evals else None,
                      "losses": {s: train[s]["loss"] for s in steps}}
    return out


def compare(a: dict, b: dict) -> dict:
    res = {}
    for stage in a:
        if stage not in b:
            continue
        common = sorted(set(a[stage]["losses"]) & set(b[stage]["losses"]))
        if not common:
            continue
        diffs = [abs(a[stage]["losses"][s] - b[stage]["losses"][s]) for s in common]
        rel = [d / max(abs(a[stage]["losses"][s]), 1e-12) for d, s in zip(diffs, common)]
        res[stage] = {"steps_compared": len(common), "from": common[0], "to": common[-1],
                      "max_abs_diff": max(diffs), "max_rel_diff": max(rel),
                      "mean_abs_diff": sum(diffs) / len(diffs)}
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="checkpoint directories holding metrics.jsonl")
    p.add_argument("--skip", type=int, default=10, help="steps left out of the tokens/s median (warm-up)")
    p.add_argument("--json", type=Path, default=None, help="write the summary here")
    args = p.parse_args(argv)
    missing = [str(r) for r in args.runs if not (r / "metrics.jsonl").is_file()]
    if missing:
        print(f"error: no metrics.jsonl in {', '.join(missing)}", file=sys.stderr)
        return 2
    runs = {str(r): summarise(r, args.skip) for r in args.runs}
    print(f"{'run':40s} {'stage':7s} {'steps':>9s} {'tok/s':>10s} {'first loss':>10s} {'last loss':>9s}  last eval")
    for name, stages in runs.items():
        for stage, s in stages.items():
            ev = "" if not s["last_eval"] else ", ".join(f"{k}={v:.3f}" for k, v in s["last_eval"].items())
            print(f"{name[-40:]:40s} {stage:7s} {s['first_step']:>4d}-{s['last_step']:<4d} "
                  f"{s['median_tokens_per_s']:10.0f} {s['first_loss']:10.4f} {s['last_loss']:9.4f}  {ev}")
    names = list(runs)
    comparisons = {}
    for other in names[1:]:
        comparisons[other] = compare(runs[names[0]], runs[other])
        for stage, c in comparisons[other].items():
            print(f"losses {other[-30:]} vs {names[0][-30:]} {stage}: steps {c['from']}-{c['to']} "
                  f"max |diff| {c['max_abs_diff']:.2e} (rel {c['max_rel_diff']:.2e}), mean {c['mean_abs_diff']:.2e}")
    if args.json:
        for stages in runs.values():
            for s in stages.values():
                s.pop("losses")
        args.json.write_text(json.dumps({"runs": runs, "vs_first": comparisons}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
