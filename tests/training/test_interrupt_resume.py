"""Ctrl-C saves the step and resumes exactly; logs after a resume (issue 26.8).

The SIGINTs are real signals sent to the training process (in-process runs signal themselves at a
chosen step, so the step is known; one subprocess run is interrupted from outside, as a user's
terminal would)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from mm_rec.scripts.train_modular import main
from mm_rec.training import checkpoint as ckpt_module
from mm_rec.training.checkpoint import list_checkpoints, load_checkpoint
from mm_rec.training.metrics import read_metrics
from mm_rec.training.trainer import Trainer
from mm_rec.utils.errors import run_cli

REPO = Path(__file__).resolve().parents[2]
TINY = ["--preset", "tiny", "--synthetic", "--batch_size", "2", "--seq_len", "16",
        "--vocab_size", "300", "--expert_dim", "16", "--num_layers", "1", "--num_heads", "2", "--ffn_dim", "32",
        "--eval_interval", "0", "--eval_batches", "1", "--warmup_steps", "2", "--memory_log_interval", "0"]
RUN = ["--stage", "stage1", "--max_steps", "6", "--checkpoint_interval", "4"]


def train(ckpt_dir, *args) -> int:
    return run_cli(main, TINY + ["--checkpoint_dir", str(ckpt_dir), *args])


def interrupt_at(monkeypatch, step_to_interrupt: int) -> None:
    """Send this process a SIGINT as step `step_to_interrupt` begins (once)."""
    original = Trainer._train_step
    sent = []

    def train_step(self, spec, step, *args):
        if step == step_to_interrupt and not sent:
            sent.append(step)
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, spec, step, *args)
    monkeypatch.setattr(Trainer, "_train_step", train_step)


def test_ctrl_c_saves_the_step_and_the_resume_is_bitwise_the_uninterrupted_run(tmp_path, monkeypatch, capsys):
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    assert train(straight, *RUN) == 0
    want = {r["step"]: r["loss"] for r in read_metrics(straight / "metrics.jsonl")}

    interrupt_at(monkeypatch, 3)
    capsys.readouterr()
    assert train(broken, *RUN) == 130
    err = capsys.readouterr().err.strip().splitlines()
    saved = broken / "checkpoint_stage1_step_3.pt"  # step 3 completed, then saved (the interval is 4)
    assert err[-1] == (f"interrupted: stage1 step 3 is saved in {saved}; continue with the same flags "
                       f"(less --overwrite) and --resume_from {saved}")
    assert "Traceback" not in "\n".join(err)
    assert list_checkpoints(broken) == [saved]
    monkeypatch.undo()

    assert train(broken, *RUN, *err[-1].rsplit(" and ", 1)[1].split()) == 0  # the flag, pasted
    rows = read_metrics(broken / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert all(r["loss"] == want[r["step"]] for r in rows)  # bitwise
    a = load_checkpoint(straight / "checkpoint_stage1_step_6.pt")["model_state_dict"]
    b = load_checkpoint(broken / "checkpoint_stage1_step_6.pt")["model_state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_second_ctrl_c_during_the_save_leaves_only_whole_checkpoints(tmp_path, monkeypatch, capsys):
    interrupt_at(monkeypatch, 2)
    real_save = torch.save

    def save_hit_by_a_second_ctrl_c(obj, f, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)  # lands in the main thread, waiting for this write
        time.sleep(0.2)
        return real_save(obj, f, *args, **kwargs)
    monkeypatch.setattr(ckpt_module.torch, "save", save_hit_by_a_second_ctrl_c)
    assert train(tmp_path, *RUN) == 130
    for path in list_checkpoints(tmp_path):
        assert load_checkpoint(path)["step"] == 2
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_ctrl_c_from_outside_stops_a_cli_run_with_a_resumable_checkpoint(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    proc = subprocess.Popen([sys.executable, "-m", "mm_rec.scripts.train_modular", *TINY, "--stage", "stage1",
                             "--max_steps", "100000", "--checkpoint_interval", "100000", "--checkpoint_dir",
                             str(tmp_path)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    metrics = tmp_path / "metrics.jsonl"
    while not (metrics.exists() and metrics.stat().st_size > 0):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    line = err.strip().splitlines()[-1]
    (path,) = list_checkpoints(tmp_path)
    step = load_checkpoint(path)["step"]
    assert line == (f"interrupted: stage1 step {step} is saved in {path}; continue with the same flags "
                    f"(less --overwrite) and --resume_from {path}")
    assert [r["step"] for r in read_metrics(metrics)] == list(range(1, step + 1))


def test_tensorboard_steps_run_on_across_stages_and_stage2_rows_name_their_expert(tmp_path):
    assert train(tmp_path, "--stage", "all", "--max_steps", "2", "--checkpoint_interval", "2") == 0
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [(r["stage"], r["step"], r["expert"]) for r in rows] == [
        ("stage1", 1, "both"), ("stage1", 2, "both"), ("stage2", 1, "text"), ("stage2", 2, "code"),
        ("stage3", 1, "both"), ("stage3", 2, "both")]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(tmp_path / "tensorboard")).Reload()
    assert [e.step for e in events.Scalars("Loss/train")] == [1, 2, 3, 4, 5, 6]
    assert [e.step for e in events.Scalars("Loss/train_text_expert")] == [3]
    assert [e.step for e in events.Scalars("Loss/train_code_expert")] == [4]
