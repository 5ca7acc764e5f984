"""One trainer per --checkpoint_dir (issue 25.1), partial saves cleaned (25.5), the refusal line
(25.8, 26.8).

A first trainer runs in a subprocess; while it holds its directory (stopped with SIGSTOP, so its
files cannot change under the comparison), a second one is started every way a user could: a new
run, --resume_from, --overwrite. Each is refused with one line naming the first's pid, exit 2, and
the directory is byte for byte what it was.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mm_rec.scripts import train_modular
from mm_rec.training.checkpoint import load_checkpoint, save_checkpoint
from mm_rec.training.metrics import read_metrics
from mm_rec.training.runlock import LOCK_FILE, RunLock
from mm_rec.utils.errors import UserError, run_cli
from mm_rec.utils.monitoring import corrupt_checkpoint

REPO = Path(__file__).resolve().parents[2]
TINY = ["--preset", "tiny", "--synthetic", "--stage", "stage1", "--batch_size", "2", "--seq_len", "16",
        "--vocab_size", "300", "--expert_dim", "16", "--num_layers", "1", "--num_heads", "2", "--ffn_dim", "32",
        "--eval_interval", "0", "--eval_batches", "1", "--warmup_steps", "2", "--memory_log_interval", "0"]


def train(ckpt_dir, *args) -> int:
    return run_cli(train_modular.main, TINY + ["--checkpoint_dir", str(ckpt_dir), *args])


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error:") or "Traceback" in line]


def test_a_held_lock_names_its_holder_and_is_released(tmp_path):
    lock = RunLock(tmp_path).acquire()
    lock.publish_pid()
    assert (tmp_path / LOCK_FILE).read_text().strip() == str(os.getpid())
    with pytest.raises(UserError, match=rf"in use by a training process \(pid {os.getpid()}\)"):
        RunLock(tmp_path).acquire()
    lock.release()
    assert (tmp_path / LOCK_FILE).read_text() == ""  # no stale pid
    RunLock(tmp_path).acquire().release()  # free again


def test_a_second_trainer_is_refused_while_the_first_trains_and_changes_nothing(tmp_path, capsys):
    run = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    first = subprocess.Popen([sys.executable, "-m", "mm_rec.scripts.train_modular", *TINY, "--checkpoint_dir",
                              str(run), "--max_steps", "100000", "--checkpoint_interval", "2",
                              "--keep_last", "0"],
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (run / "checkpoint_stage1_step_2.pt").exists():
            assert first.poll() is None and time.time() < deadline, "the first trainer did not start"
            time.sleep(0.2)
        first.send_signal(signal.SIGSTOP)  # holds its lock; its files stay still for the comparison
        time.sleep(0.5)
        before = snapshot(run)
        capsys.readouterr()
        for extra in ([], ["--resume_from", str(run / "checkpoint_stage1_step_2.pt")], ["--overwrite"]):
            assert train(run, "--max_steps", "4", "--seed", "7", *extra) == 2, extra
            err = capsys.readouterr().err
            assert error_lines(err) == [f"error: {run} is in use by a training process (pid {first.pid}); wait for "
                                        f"it to finish or stop it, or choose another --checkpoint_dir"], err
            assert snapshot(run) == before, extra
        assert not list(run.glob("previous_run.bak-*"))  # --overwrite moved nothing
        first.send_signal(signal.SIGCONT)
    finally:
        first.kill()  # kill -9: the kernel drops its lock
        first.wait()
    # the first run's log holds its own rows only, each step once
    rows = read_metrics(run / "metrics.jsonl")
    assert len({r["run_id"] for r in rows}) == 1
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1))
    # the dead holder's lock is gone: its run can be resumed at once
    assert train(run, "--max_steps", "3", "--resume_from", str(run / "checkpoint_stage1_step_2.pt")) == 0
    assert load_checkpoint(run / "checkpoint_stage1_step_3.pt")["lineage"][0]["run_id"] == rows[0]["run_id"]


def test_partial_saves_are_removed_at_the_next_start_only_by_the_lock_holder(tmp_path, capsys):
    run = tmp_path / "run"
    assert train(run, "--max_steps", "3", "--checkpoint_interval", "1") == 0
    partial = run / ".checkpoint_stage1_step_3.pt.k1ll3d.tmp"
    partial.write_bytes(b"PK\x03\x04 half a checkpoint")
    lock = RunLock(run).acquire()  # someone else trains here: their save in progress looks the same
    try:
        assert train(run, "--max_steps", "3", "--resume_from", str(run / "checkpoint_stage1_step_2.pt")) == 2
        assert partial.exists()
    finally:
        lock.release()
    capsys.readouterr()
    assert train(run, "--max_steps", "3", "--resume_from", str(run / "checkpoint_stage1_step_2.pt")) == 0
    assert not partial.exists()
    assert f"removed {partial.name}" in capsys.readouterr().out
    assert list(run.glob("*.tmp")) + list(run.glob(".*.tmp")) == []


def test_the_refusal_points_at_the_newest_valid_checkpoint_and_can_be_pasted(tmp_path, capsys):
    run = tmp_path / "run"
    assert train(run, "--max_steps", "3", "--checkpoint_interval", "1") == 0
    corrupt_checkpoint(run / "checkpoint_stage1_step_3.pt")
    poisoned = load_checkpoint(run / "checkpoint_stage1_step_2.pt")
    next(iter(poisoned["model_state_dict"].values())).fill_(float("nan"))
    save_checkpoint(poisoned, run / "checkpoint_stage1_step_2.pt")
    before = snapshot(run)
    capsys.readouterr()
    assert train(run, "--max_steps", "3") == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert line.startswith(f"error: {run} already holds a run")
    suggested = line.split("continue it with ", 1)[1]
    assert suggested == f"--resume_from {run / 'checkpoint_stage1_step_1.pt'}"  # the whole rest: no comma
    assert snapshot(run) == before
    # pasted verbatim, it continues the run
    assert train(run, "--max_steps", "3", *suggested.split()) == 0
    assert load_checkpoint(run / "checkpoint_stage1_step_3.pt")["step"] == 3


def test_resuming_a_checkpoint_holding_nan_is_refused_with_one_line(tmp_path, capsys):
    run = tmp_path / "run"
    assert train(run, "--max_steps", "2", "--checkpoint_interval", "1") == 0
    state = load_checkpoint(run / "checkpoint_stage1_step_2.pt")
    name = sorted(state["model_state_dict"])[3]
    state["model_state_dict"][name][0] = float("inf")
    save_checkpoint(state, run / "checkpoint_stage1_step_2.pt")
    capsys.readouterr()
    assert train(run, "--max_steps", "3", "--resume_from", str(run / "checkpoint_stage1_step_2.pt")) == 2
    assert error_lines(capsys.readouterr().err) == [
        f"error: checkpoint {run / 'checkpoint_stage1_step_2.pt'} holds non-finite values ({name}); "
        f"resume from an earlier checkpoint"]
    assert not (run / "checkpoint_stage1_step_3.pt").exists()
