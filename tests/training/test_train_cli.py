"""Bad input to the training CLI (issue 4): one line `error: ...` on stderr, a non-zero exit, no
traceback, and nothing lost: checkpoints already in the directory are still there, byte for byte."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mm_rec.scripts import train_modular
from mm_rec.training.checkpoint import load_checkpoint
from mm_rec.utils.errors import run_cli
from mm_rec.utils.monitoring import corrupt_checkpoint

MODEL = ["--vocab_size", "512", "--expert_dim", "32", "--num_layers", "1", "--num_heads", "2", "--ffn_dim", "64"]


def argv(data_dir, ckpt_dir, *args) -> list[str]:
    return ["--preset", "tiny", *MODEL, "--data_dir", str(data_dir), "--checkpoint_dir", str(ckpt_dir),
            "--seq_len", "32", "--batch_size", "4", "--eval_batches", "2", "--memory_log_interval", "0",
            "--device", "cpu", *args]


def cli(args, capsys) -> tuple[int, str]:
    """Run train_modular in-process as the CLI does; (exit code, stderr)."""
    try:
        code = run_cli(train_modular.main, args)
    except SystemExit as e:  # argparse's own exit, should a flag error ever bypass UserError
        code = e.code if isinstance(e.code, int) else 1
    return code, capsys.readouterr().err


def assert_one_line_error(code: int, err: str, *phrases: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code != 0, err
    assert lines, "no error message on stderr"
    assert lines[-1].startswith("error: "), err
    assert "Traceback" not in err, err
    for phrase in phrases:
        assert phrase in lines[-1], (phrase, lines[-1])
    return lines[-1]


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file under `directory` (relative path -> bytes), but the run lock, which each trainer
    that takes it writes its pid into (runlock.py)."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*"))
            if p.is_file() and p.name != ".mmrec-run.lock"}


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory) -> Path:
    """A finished 2-step stage1 run with a checkpoint at each step."""
    out = tmp_path_factory.mktemp("trained")
    assert run_cli(train_modular.main, argv(data_dir, out, "--stage", "stage1", "--max_steps", "2",
                                            "--checkpoint_interval", "1", "--eval_interval", "0")) == 0
    assert sorted(p.name for p in out.glob("checkpoint_*.pt")) == ["checkpoint_stage1_best.pt",
                                                                     "checkpoint_stage1_step_1.pt",
                                                                     "checkpoint_stage1_step_2.pt"]
    return out


@pytest.fixture
def run_dir(trained, tmp_path) -> Path:
    """A private copy of the trained run, to point bad commands at."""
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    return out


# -- bad flags ------------------------------------------------------------------------------------
def test_unknown_stage_in_a_subprocess(data_dir, run_dir):
    before = snapshot(run_dir)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "mm_rec.scripts.train_modular",
                           *argv(data_dir, run_dir, "--stage", "stage4")],
                          capture_output=True, text=True, env=env, timeout=120)
    line = assert_one_line_error(proc.returncode, proc.stderr, "--stage", "stage4")
    assert proc.returncode == 2 and "stage1" in line  # names the valid choices
    assert snapshot(run_dir) == before


@pytest.mark.parametrize("flag", ["--batch_size", "--seq_len", "--max_steps"])
@pytest.mark.parametrize("value", ["0", "-3"])
def test_non_positive_sizes_are_refused(data_dir, tmp_path, capsys, flag, value):
    out = tmp_path / "ckpt"
    code, err = cli(argv(data_dir, out, "--stage", "stage1", flag, value), capsys)
    assert_one_line_error(code, err, flag, "must be positive", value)
    assert not out.exists()  # refused before anything was created


# -- bad checkpoints ------------------------------------------------------------------------------
def test_missing_resume_file(data_dir, run_dir, capsys):
    before = snapshot(run_dir)
    missing = run_dir / "checkpoint_stage1_step_9.pt"
    code, err = cli(argv(data_dir, run_dir, "--stage", "stage1", "--max_steps", "4",
                         "--resume_from", str(missing)), capsys)
    assert_one_line_error(code, err, "checkpoint not found", str(missing))
    assert snapshot(run_dir) == before


def test_corrupt_resume_checkpoint_in_a_subprocess(data_dir, run_dir):
    newest = run_dir / "checkpoint_stage1_step_2.pt"
    corrupt_checkpoint(newest)
    before = snapshot(run_dir)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "mm_rec.scripts.train_modular",
                           *argv(data_dir, run_dir, "--stage", "stage1", "--max_steps", "4",
                                 "--resume_from", str(newest))],
                          capture_output=True, text=True, env=env, timeout=120)
    assert_one_line_error(proc.returncode, proc.stderr, "corrupt", str(newest))
    assert proc.returncode == 2
    # nothing written, nothing removed: the corrupt file is left for the user, the older one is intact
    assert snapshot(run_dir) == before
    assert load_checkpoint(run_dir / "checkpoint_stage1_step_1.pt")["step"] == 1


def test_checkpoint_of_another_model(data_dir, run_dir, capsys):
    before = snapshot(run_dir)
    args = argv(data_dir, run_dir, "--stage", "stage1", "--max_steps", "4",
                "--resume_from", str(run_dir / "checkpoint_stage1_step_1.pt"))
    args[args.index("--expert_dim") + 1] = "64"
    code, err = cli(args, capsys)
    line = assert_one_line_error(code, err, "another model", "expert_dim=32")
    assert "--expert_dim 32" in line and "mdi_dim" not in line  # tells how to resume it, in flags that exist
    assert snapshot(run_dir) == before


def test_finished_stage_cannot_be_resumed_as_the_same_stage(data_dir, run_dir, capsys):
    before = snapshot(run_dir)
    code, err = cli(argv(data_dir, run_dir, "--stage", "stage1", "--max_steps", "4",
                         "--resume_from", str(run_dir / "checkpoint_stage1_step_2.pt")), capsys)
    assert_one_line_error(code, err, "cannot resume stage1", "--stage stage2")
    assert snapshot(run_dir) == before


def test_not_a_training_checkpoint(data_dir, run_dir, capsys):
    import torch
    weights = run_dir / "weights_only.pt"
    torch.save({"model_state_dict": load_checkpoint(run_dir / "checkpoint_stage1_step_2.pt")["model_state_dict"]},
               weights)
    before = snapshot(run_dir)
    code, err = cli(argv(data_dir, run_dir, "--stage", "stage1", "--resume_from", str(weights)), capsys)
    assert_one_line_error(code, err, str(weights), "no model config")
    assert snapshot(run_dir) == before


# -- unwritable output ----------------------------------------------------------------------------
def test_checkpoint_dir_under_a_regular_file(data_dir, run_dir, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_bytes(b"precious")
    before = snapshot(run_dir)
    code, err = cli(argv(data_dir, blocker / "ckpts", "--stage", "stage1", "--max_steps", "2",
                         "--resume_from", str(run_dir / "checkpoint_stage1_step_1.pt")), capsys)
    assert_one_line_error(code, err, "cannot write to checkpoint directory", "--checkpoint_dir")
    assert blocker.read_bytes() == b"precious"
    assert snapshot(run_dir) == before  # the checkpoint it was to resume is untouched


def test_checkpoint_dir_is_a_regular_file(data_dir, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_bytes(b"precious")
    code, err = cli(argv(data_dir, blocker, "--stage", "stage1", "--max_steps", "2"), capsys)
    assert_one_line_error(code, err, "cannot write to checkpoint directory")
    assert blocker.read_bytes() == b"precious"


# -- a directory that already holds a run ---------------------------------------------------------
def listing(directory: Path) -> list[tuple[str, bool, int]]:
    """Every entry under `directory`, folders included: (relative path, is a folder, mtime in ns)."""
    return [(str(p.relative_to(directory)), p.is_dir(), p.stat().st_mtime_ns) for p in sorted(directory.rglob("*"))]


def test_a_new_run_into_a_used_dir_is_refused_and_changes_nothing(data_dir, run_dir, capsys):
    before, entries = snapshot(run_dir), listing(run_dir)
    code, err = cli(argv(data_dir, run_dir, "--stage", "stage1", "--max_steps", "4", "--keep_last", "1"), capsys)
    line = assert_one_line_error(code, err)
    assert code == 2
    newest = run_dir / "checkpoint_stage1_step_2.pt"
    # the path ends the line: pasted as it is, nothing sticks to it
    assert line == (f"error: {run_dir} already holds a run; start over with --overwrite, choose another "
                    f"--checkpoint_dir, or continue it with --resume_from {newest}")
    assert snapshot(run_dir) == before  # every file byte for byte: no checkpoint, metrics row or probe file
    assert listing(run_dir) == entries  # and nothing added, removed or rewritten in place


def test_a_log_without_checkpoints_is_a_run_too(data_dir, tmp_path, capsys):
    out = tmp_path / "ckpts"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"type": "train", "stage": "stage1", "step": 1, "loss": 6.2}\n')
    before = snapshot(out)
    code, err = cli(argv(data_dir, out, "--stage", "stage1", "--max_steps", "2"), capsys)
    line = assert_one_line_error(code, err, f"{out} already holds a run", "metrics.jsonl", "--overwrite",
                                 "--checkpoint_dir")
    assert "--resume_from" not in line  # nothing to resume from
    assert snapshot(out) == before


def test_overwrite_and_resume_from_exclude_each_other(data_dir, run_dir, capsys):
    before = snapshot(run_dir)
    code, err = cli(argv(data_dir, run_dir, "--stage", "all", "--overwrite",
                         "--resume_from", str(run_dir / "checkpoint_stage1_step_2.pt")), capsys)
    assert_one_line_error(code, err, "--overwrite", "--resume_from")
    assert snapshot(run_dir) == before


def test_the_refusal_says_what_to_type_and_that_continues_the_run(data_dir, run_dir, capsys):
    """The README's quick start run twice, as a user would: from the run's parent folder with a
    relative --checkpoint_dir; the flag the message suggests, pasted as it is, continues the run."""
    args = argv(data_dir, "./run", "--stage", "all", "--max_steps", "2", "--checkpoint_interval", "1",
                "--eval_interval", "0")
    before = snapshot(run_dir)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "mm_rec.scripts.train_modular", *args], cwd=run_dir.parent,
                          capture_output=True, text=True, env=env, timeout=120)
    line = assert_one_line_error(proc.returncode, proc.stderr, "error: ./run already holds a run")
    assert proc.returncode == 2
    assert snapshot(run_dir) == before
    suggested = line.split("continue it with ", 1)[1]
    assert suggested == "--resume_from ./run/checkpoint_stage1_step_2.pt"
    old_cwd = os.getcwd()
    os.chdir(run_dir.parent)
    try:
        code, err = cli(args + suggested.split(), capsys)
    finally:
        os.chdir(old_cwd)
    assert code == 0, err
    from mm_rec.training.metrics import read_metrics
    steps = [(r["stage"], r["step"]) for r in read_metrics(run_dir / "metrics.jsonl")]
    assert steps == [(s, n) for s in ("stage1", "stage2", "stage3") for n in (1, 2)]  # appended, each step once
    assert (run_dir / "checkpoint_stage1_step_1.pt").read_bytes() == before["checkpoint_stage1_step_1.pt"]
