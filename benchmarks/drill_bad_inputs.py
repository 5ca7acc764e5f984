"""Bad-input drill: every CLI given mistakes a user makes, each run in a fresh process.

A case is clean when the process exits non-zero, prints no traceback, and its last stderr line is
one `error: ...` line. Prints a table, writes JSON with --json.

    python benchmarks/drill_bad_inputs.py --json drill.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

M = [sys.executable, "-m"]
TRAIN, PREP, EVAL, GEN, EXP, SERVE = (M + [f"mm_rec.scripts.{n}"] for n in
                                      ("train_modular", "prepare_data", "evaluate", "generate", "export", "serve"))


def cases(d: Path) -> list[tuple[str, list[str]]]:
    (d / "badmeta").mkdir()
    (d / "badmeta" / "meta.json").write_text(json.dumps({"format": "mmrec-tokens", "version": 1, "dtype": "object",
                                                         "vocab_size": 512}))
    (d / "badexport").mkdir()
    (d / "badexport" / "config.json").write_text(json.dumps({"vocab_size": 2 ** 40, "expert_dim": 32, "num_layers": 1,
                                                            "num_heads": 2, "ffn_dim": 64}))
    (d / "badexport" / "model.safetensors").write_bytes(b"garbage")
    (d / "junk.pt").write_bytes(b"not a checkpoint")
    (d / "empty.txt").write_text("")
    (d / "cfg.yaml").write_text("learning_rate: fast\n")
    ck = str(d / "junk.pt")
    return [
        ("train: abbreviated flag --lr", TRAIN + ["--lr", "1e-3"]),
        ("train: unknown flag", TRAIN + ["--bogus"]),
        ("train: bad stage", TRAIN + ["--stage", "stage4"]),
        ("train: negative batch", TRAIN + ["--batch_size", "-1"]),
        ("train: nan learning rate", TRAIN + ["--learning_rate", "nan"]),
        ("train: missing data dir", TRAIN + ["--data_dir", str(d / "nope")]),
        ("train: meta dtype object", TRAIN + ["--data_dir", str(d / "badmeta"), "--checkpoint_dir", str(d / "r1")]),
        ("train: resume from junk", TRAIN + ["--resume_from", ck, "--checkpoint_dir", str(d / "r2")]),
        ("train: resume from missing", TRAIN + ["--resume_from", str(d / "missing.pt")]),
        ("train: bad config value", TRAIN + ["--config", str(d / "cfg.yaml")]),
        ("train: missing config", TRAIN + ["--config", str(d / "nope.yaml")]),
        ("train: heads do not divide", TRAIN + ["--expert_dim", "30", "--num_heads", "8", "--synthetic"]),
        ("train: heldout missing", TRAIN + ["--heldout_text", str(d / "nope.txt")]),
        ("prepare: no sources", PREP + ["--out", str(d / "p1")]),
        ("prepare: missing source", PREP + ["--text", str(d / "nope"), "--out", str(d / "p2")]),
        ("prepare: empty source", PREP + ["--text", str(d / "empty.txt"), "--out", str(d / "p3")]),
        ("prepare: abbreviated flag", PREP + ["--tex", "a", "--out", str(d / "p4")]),
        ("prepare: bad val fraction", PREP + ["--text", str(d / "empty.txt"), "--val_fraction", "2", "--out", str(d / "p5")]),
        ("prepare: hf without name", PREP + ["--text", "hf:", "--out", str(d / "p6")]),
        ("evaluate: missing checkpoint", EVAL + ["--checkpoint", str(d / "missing.pt")]),
        ("evaluate: junk checkpoint", EVAL + ["--checkpoint", ck]),
        ("evaluate: hostile export config", EVAL + ["--checkpoint", str(d / "badexport")]),
        ("evaluate: meta dtype object", EVAL + ["--checkpoint", ck, "--data_dir", str(d / "badmeta")]),
        ("generate: junk checkpoint", GEN + ["--checkpoint", ck, "--prompt", "x"]),
        ("generate: nan temperature", GEN + ["--checkpoint", ck, "--prompt", "x", "--temperature", "nan"]),
        ("generate: empty session", GEN + ["--checkpoint", ck, "--prompt", "x", "--session", ""]),
        ("generate: escaping session", GEN + ["--checkpoint", ck, "--prompt", "x", "--session", "../x"]),
        ("generate: top_p 0", GEN + ["--checkpoint", ck, "--prompt", "x", "--top_p", "0"]),
        ("generate: abbreviated flag", GEN + ["--checkpoint", ck, "--prompt", "x", "--temp", "0"]),
        ("export: junk checkpoint", EXP + ["--checkpoint", ck, "--out", str(d / "e1")]),
        ("export: bad format", EXP + ["--checkpoint", ck, "--out", str(d / "e2"), "--format", "onnx"]),
        ("export: hostile export config", EXP + ["--checkpoint", str(d / "badexport"), "--out", str(d / "e3")]),
        ("serve: junk checkpoint", SERVE + ["--checkpoint", ck, "--port", "0"]),
        ("serve: bad port", SERVE + ["--checkpoint", ck, "--port", "-5"]),
        ("serve: abbreviated flag", SERVE + ["--checkpoint", ck, "--max_tok", "5"]),
    ]


def run_case(cmd: list[str], cwd: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env, timeout=600, stdin=subprocess.DEVNULL)
    lines = [l for l in p.stderr.strip().splitlines() if l.strip()]
    clean = p.returncode != 0 and "Traceback" not in p.stderr and bool(lines) and lines[-1].startswith("error: ")
    return {"rc": p.returncode, "clean": clean, "last_line": lines[-1] if lines else ""}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        results = [{"case": name, **run_case(cmd, d)} for name, cmd in cases(d)]
    for r in results:
        print(f"{'clean' if r['clean'] else 'NOT CLEAN':9}  rc={r['rc']:<3} {r['case']:32}  {r['last_line'][:110]}")
    clean = sum(r["clean"] for r in results)
    print(f"{clean} of {len(results)} bad inputs clean")
    if args.json:
        Path(args.json).write_text(json.dumps({"clean": clean, "total": len(results), "results": results}, indent=1))
    return 0 if clean == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
