"""End to end: a training run that meets NaNs recovers by itself, gives up cleanly when it cannot,
and mlops/recovery_protocol.sh resumes a stopped run from its newest valid checkpoint.

Runs use the tiny preset's schedule with an even smaller model on synthetic tokens, so a step
takes a fraction of a second. Training runs in-process through `run_cli(main, argv)` (the CLI's
exit status and one-line errors without a Python start-up per run); the protocol runs in bash.
"""
import math
import re
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mm_rec.scripts.train_modular import main
from mm_rec.training.checkpoint import checkpoint_name, list_checkpoints, load_checkpoint
from mm_rec.training.metrics import read_metrics
from mm_rec.training.trainer import Trainer
from mm_rec.utils.errors import run_cli
from mm_rec.utils.monitoring import corrupt_checkpoint

REPO = Path(__file__).resolve().parents[2]
PROTOCOL = REPO / "mlops" / "recovery_protocol.sh"
TINY = ["--preset", "tiny", "--synthetic", "--stage", "stage1", "--batch_size", "2", "--seq_len", "16",
        "--vocab_size", "300", "--expert_dim", "16", "--num_layers", "1", "--num_heads", "2", "--ffn_dim", "32",
        "--eval_interval", "0", "--eval_batches", "1", "--warmup_steps", "4"]


def train(ckpt_dir, *args, capsys=None):
    rc = run_cli(main, TINY + ["--checkpoint_dir", str(ckpt_dir), *args])
    out = capsys.readouterr() if capsys is not None else None
    return rc, out


def all_finite(state_dict) -> bool:
    return all(torch.isfinite(t).all() for t in state_dict.values() if t.is_floating_point())


def steps_of(ckpt_dir):
    return [int(p.stem.rsplit("_", 1)[1]) for p in list_checkpoints(ckpt_dir)]


def test_nan_at_step_k_recovers_at_half_lr_and_finishes(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MMREC_INJECT_NAN_AT_STEP", "5")
    rc, out = train(tmp_path, "--max_steps", "8", "--checkpoint_interval", "3", "--memory_log_interval", "2",
                    capsys=capsys)
    assert rc == 0, out.err
    assert "recover" in out.out and str(tmp_path / checkpoint_name("stage1", 3)) in out.out

    rows = read_metrics(tmp_path / "metrics.jsonl", type=None)
    recoveries = [r for r in rows if r["type"] == "recovery"]
    assert len(recoveries) == 1
    rec = recoveries[0]
    assert (rec["step"], rec["success"], rec["resume_step"], rec["lr_scale"]) == (5, True, 4, 0.5)
    assert rec["checkpoint"].endswith(checkpoint_name("stage1", 3))

    # Step 4 ran twice: before the NaN at full LR, after the rollback at half of it. The NaN step
    # itself never became a training row (it never reached optimizer.step()).
    train_rows = [r for r in rows if r["type"] == "train"]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4, 4, 5, 6, 7, 8]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in train_rows)
    before, after = train_rows[3], train_rows[4]
    assert after["lr"] == pytest.approx(0.5 * before["lr"]) and (before["lr_scale"], after["lr_scale"]) == (1.0, 0.5)
    assert all(r["lr_scale"] == 0.5 for r in train_rows[4:])

    # Checkpoints: 3 (before), 6 and the final 8 (after) -- the final one finite and at half LR.
    assert steps_of(tmp_path) == [3, 6, 8]
    final = load_checkpoint(tmp_path / checkpoint_name("stage1", 8))
    assert final["stage_completed"] and final["lr_scale"] == 0.5
    assert all_finite(final["model_state_dict"])
    assert final["scheduler_state_dict"]["base_lrs"][0] == pytest.approx(0.5 * load_checkpoint(
        tmp_path / checkpoint_name("stage1", 3))["scheduler_state_dict"]["base_lrs"][0])

    # Memory norms every 2 steps, in metrics.jsonl and in TensorBoard.
    memory = [r for r in rows if r["type"] == "memory"]
    assert [r["step"] for r in memory] == [2, 4, 4, 6, 8]
    for r in memory:
        for key in ("text/layer_0/h", "text/layer_0/M", "code/layer_0/h", "code/layer_0/M", "all/h_mean", "all/M_max"):
            assert 0 < r[key] < 100, (key, r)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(tmp_path / "tensorboard")).Reload()
    tb = {e.step: e.value for e in events.Scalars("MemoryNorms/all/h_mean")}
    assert tb[8] == pytest.approx(memory[-1]["all/h_mean"], rel=1e-6)


def test_nan_at_every_step_fails_cleanly_after_three_attempts(tmp_path, monkeypatch, capsys):
    # A run that diverges for good: every step from 4 on is NaN, whatever the learning rate.
    monkeypatch.setattr(Trainer, "_inject_nan", lambda self, step: step >= 4)
    rc, out = train(tmp_path, "--max_steps", "8", "--checkpoint_interval", "3", capsys=capsys)
    assert rc != 0
    errors = re.findall(r"error: [^\r\n]*", out.err)  # one line (a progress bar may precede it)
    assert len(errors) == 1 and "3 recovery attempts" in errors[0] and "step 4" in errors[0], out.err
    assert "Traceback" not in out.err

    recoveries = read_metrics(tmp_path / "metrics.jsonl", type="recovery")
    assert [r["success"] for r in recoveries] == [True, True, True, False]
    assert [r.get("lr_scale") for r in recoveries[:3]] == [0.5, 0.25, 0.125]
    assert out.out.count("Non-finite loss at step 4: recovered from") == 3

    assert steps_of(tmp_path) == [3]  # nothing written after the failures, nothing removed
    state = load_checkpoint(tmp_path / checkpoint_name("stage1", 3))
    assert state["step"] == 3 and state["lr_scale"] == 1.0 and all_finite(state["model_state_dict"])


def test_nan_with_a_corrupt_newest_checkpoint_recovers_from_the_one_before(stopped_run, tmp_path, monkeypatch,
                                                                          capsys):
    # Resume the stopped run from step 2 with its newest checkpoint (4) damaged and a NaN at step 3.
    ckpt_dir = tmp_path / "ckpts"
    shutil.copytree(stopped_run, ckpt_dir)
    corrupt_checkpoint(ckpt_dir / checkpoint_name("stage1", 4))
    monkeypatch.setenv("MMREC_INJECT_NAN_AT_STEP", "3")
    rc, out = train(ckpt_dir, "--max_steps", "8", "--checkpoint_interval", "2",
                    "--resume_from", str(ckpt_dir / checkpoint_name("stage1", 2)), capsys=capsys)
    assert rc == 0, out.err
    rec = read_metrics(ckpt_dir / "metrics.jsonl", type="recovery")[-1]
    assert (rec["step"], rec["success"], rec["resume_step"], rec["lr_scale"]) == (3, True, 3, 0.5)
    assert rec["checkpoint"].endswith(checkpoint_name("stage1", 2))
    final = load_checkpoint(ckpt_dir / checkpoint_name("stage1", 8))
    assert final["lr_scale"] == 0.5 and all_finite(final["model_state_dict"])


# -- mlops/recovery_protocol.sh ------------------------------------------------------------------
@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    """A run that stopped for good at step 5 (NaN from there on, recovery used up), with checkpoints
    at steps 2 and 4 taken at the full learning rate."""
    directory = tmp_path_factory.mktemp("stopped_run")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Trainer, "_inject_nan", lambda self, step: step >= 5)
        rc, _ = train(directory, "--max_steps", "8", "--checkpoint_interval", "2")
    assert rc != 0 and steps_of(directory) == [2, 4]
    return directory


def protocol(ckpt_dir, *args, cwd, env=None):
    env = {**os.environ, "PYTHON": sys.executable, **(env or {})}
    env.pop("MMREC_INJECT_NAN_AT_STEP", None)
    return subprocess.run(["bash", str(PROTOCOL), str(ckpt_dir), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("corrupt_newest", [False, True], ids=["newest", "corrupt-newest"])
def test_protocol_resumes_from_the_newest_valid_checkpoint_at_half_lr(stopped_run, tmp_path, corrupt_newest):
    ckpt_dir = tmp_path / "ckpts"
    shutil.copytree(stopped_run, ckpt_dir)
    if corrupt_newest:
        corrupt_checkpoint(ckpt_dir / checkpoint_name("stage1", 4))
    expected = ckpt_dir / checkpoint_name("stage1", 2 if corrupt_newest else 4)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    result = protocol(ckpt_dir, *TINY, "--max_steps", "8", "--checkpoint_interval", "2", cwd=elsewhere)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    log = (ckpt_dir / "recovery_protocol.log").read_text()
    assert f"attempt 1/3: resuming from {expected} with --lr_scale 0.5" in log
    assert "attempt 1/3 succeeded" in log and "attempt 2/3" not in log
    assert f"attempt 1/3: resuming from {expected}" in result.stdout

    final = load_checkpoint(ckpt_dir / checkpoint_name("stage1", 8))
    assert final["stage_completed"] and final["lr_scale"] == 0.5 and all_finite(final["model_state_dict"])
    resumed = [r for r in read_metrics(ckpt_dir / "metrics.jsonl") if r["lr_scale"] == 0.5]
    first = int(expected.stem.rsplit("_", 1)[1]) + 1
    assert [r["step"] for r in resumed] == list(range(first, 9))
    # The checkpoint holds the LR of the step after it at the full learning rate: now it is half that.
    full_lr = load_checkpoint(stopped_run / expected.name)["optimizer_state_dict"]["param_groups"][0]["lr"]
    assert resumed[0]["lr"] == pytest.approx(0.5 * full_lr)


@pytest.mark.slow
def test_protocol_gives_up_after_max_attempts_with_halving_scales(stopped_run, tmp_path):
    ckpt_dir = tmp_path / "ckpts"
    shutil.copytree(stopped_run, ckpt_dir)
    # Every attempt diverges (exit 1; here a PYTHON whose training run always fails), so the
    # protocol must stop after 2, halving the scale each time.
    python = tmp_path / "python"
    python.write_text(f'#!/bin/bash\nif [[ "$1" == "-m" ]]; then echo "error: diverged" >&2; exit 1; fi\n'
                      f'exec {sys.executable} "$@"\n')
    python.chmod(0o755)
    result = protocol(ckpt_dir, *TINY, "--max_steps", "8", cwd=tmp_path,
                      env={"MMREC_MAX_ATTEMPTS": "2", "PYTHON": str(python)})
    assert result.returncode == 1
    log = (ckpt_dir / "recovery_protocol.log").read_text()
    assert "attempt 1/2: resuming from" in log and "--lr_scale 0.5" in log
    assert "attempt 2/2: resuming from" in log and "--lr_scale 0.25" in log
    assert log.count("failed with exit status 1") == 2 and "all 2 attempts failed" in log
    assert steps_of(ckpt_dir) == [2, 4]


def test_protocol_usage_errors(tmp_path):
    help_ = subprocess.run(["bash", str(PROTOCOL), "--help"], capture_output=True, text=True, cwd=tmp_path)
    assert help_.returncode == 0 and "usage: recovery_protocol.sh CHECKPOINT_DIR" in help_.stdout
    missing = subprocess.run(["bash", str(PROTOCOL), str(tmp_path / "nope")], capture_output=True, text=True)
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines() == [f"error: checkpoint directory not found: {tmp_path / 'nope'}"]
    clash = subprocess.run(["bash", str(PROTOCOL), str(tmp_path), "--lr_scale", "0.1"], capture_output=True, text=True)
    assert clash.returncode == 2 and "--lr_scale is set by recovery_protocol.sh" in clash.stderr
