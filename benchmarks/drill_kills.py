"""Kill drill: SIGKILL a tiny training run at random moments, resume it from the newest valid
checkpoint each time, and compare every logged loss with an uninterrupted run (bitwise on the CPU).

    python benchmarks/drill_kills.py --kills 5 --json kills.json
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mm_rec.data.corpus import ensure_default_corpus  # noqa: E402
from mm_rec.training.checkpoint import newest_valid_checkpoint  # noqa: E402
from mm_rec.training.metrics import read_metrics  # noqa: E402

MODEL = ["--vocab_size", "512", "--expert_dim", "32", "--num_layers", "1", "--num_heads", "2", "--ffn_dim", "64"]


def argv(data: Path, run: Path, steps: int) -> list[str]:
    return [sys.executable, "-m", "mm_rec.scripts.train_modular", "--preset", "tiny", *MODEL, "--stage", "stage1",
            "--data_dir", str(data), "--checkpoint_dir", str(run), "--max_steps", str(steps),
            "--checkpoint_interval", "1", "--eval_interval", "0", "--seq_len", "64", "--batch_size", "2",
            "--device", "cpu", "--seed", "3"]


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run / "metrics.jsonl")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=5)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = ensure_default_corpus(512, cache_dir=tmp / "cache", verbose=False, prose_max_bytes=60_000,
                                     code_max_bytes=300_000)
        subprocess.run(argv(data, tmp / "ref", args.steps), check=True, env=env, capture_output=True)
        reference = losses(tmp / "ref")
        run, survived, kills = tmp / "killed", 0, []
        cmd = argv(data, run, args.steps)
        finished = False
        for k in range(args.kills):
            p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(rng.uniform(3.0, 6.0))  # start-up takes a few seconds: kills land during steps and saves
            finished = p.poll() == 0  # the run ended before this kill: no more kills make sense
            p.send_signal(signal.SIGKILL)
            p.wait()
            if finished:
                break
            newest, _ = newest_valid_checkpoint(run)
            kills.append(None if newest is None else Path(newest).name)
            cmd = argv(data, run, args.steps) + (["--resume_from", str(newest)] if newest else ["--overwrite"])
        rc = 0 if finished else subprocess.run(cmd, env=env, capture_output=True, text=True).returncode
        got = losses(run)
        same = rc == 0 and got == reference
        survived = len(kills) if same else 0
        print(f"{len(kills)} kills (resumed from {kills}); final rc {rc}; "
              f"{len(got)} of {len(reference)} steps logged; losses bitwise equal to the uninterrupted run: {same}")
        if args.json:
            Path(args.json).write_text(json.dumps({"kills": len(kills), "survived": survived, "resumed_from": kills,
                                                   "bitwise_equal": same}, indent=1))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
