"""The run directory on real failing disks (issue 25.5) and file modes (26.12).

A full disk is a real tmpfs of 1 MiB (mounted as root; skipped where mounting is not permitted)
filled up to the free space each test wants, so the errors are the ones torch and the kernel
really raise, not an OSError(28) a test made up."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from mm_rec.scripts.train_modular import main
from mm_rec.training.checkpoint import CheckpointWriter, load_checkpoint, save_checkpoint
from mm_rec.training.metrics import read_metrics
from mm_rec.utils.errors import run_cli

TINY = ["--preset", "tiny", "--synthetic", "--stage", "stage1", "--batch_size", "2", "--seq_len", "16",
        "--vocab_size", "300", "--expert_dim", "16", "--num_layers", "1", "--num_heads", "2", "--ffn_dim", "32",
        "--eval_interval", "0", "--eval_batches", "1", "--warmup_steps", "2", "--memory_log_interval", "0"]
CHECKPOINT_BYTES = 340_000  # one checkpoint of this model (339 kB measured)


def train(ckpt_dir, *args) -> int:
    return run_cli(main, TINY + ["--checkpoint_dir", str(ckpt_dir), *args])


def mount_tmpfs(directory: Path, options: str = "size=1m") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(directory)], capture_output=True)
    if done.returncode != 0:
        pytest.skip("mounting a tmpfs is not permitted here (needs root)")
    return directory


@pytest.fixture
def small_fs(tmp_path):
    mounted = []

    def make(name="disk", options="size=1m", free=None):
        path = mount_tmpfs(tmp_path / name, options)
        mounted.append(path)
        if free is not None:  # fill it up to `free` bytes
            filler = shutil.disk_usage(path).free - free
            (path / "filler").write_bytes(b"\0" * max(0, filler))
        return path
    yield make
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error:") or "Traceback" in line
            or "Exception" in line]


@pytest.mark.parametrize("free, kept", [(200_000, []), (500_000, [1])], ids=["first-save", "second-save"])
def test_a_full_disk_is_one_line_and_leaves_nothing_truncated(small_fs, tmp_path, capsys, free, kept):
    disk = small_fs(free=free)
    capsys.readouterr()
    code = train(disk, "--max_steps", "3", "--checkpoint_interval", "1", "--log_dir", str(tmp_path / "tb"))
    err = capsys.readouterr().err
    failed = disk / f"checkpoint_stage1_step_{len(kept) + 1}.pt"
    assert code == 2
    assert error_lines(err) == [f"error: no space left on device to write checkpoint {failed}; free some space "
                                f"or choose another directory; earlier checkpoints are intact"], err
    assert sorted(p.name for p in disk.glob("checkpoint_*.pt")) == [f"checkpoint_stage1_step_{s}.pt" for s in kept]
    assert [p.name for p in disk.iterdir() if p.name.endswith(".tmp")] == []
    for step in kept:  # the earlier checkpoint is whole
        assert load_checkpoint(disk / f"checkpoint_stage1_step_{step}.pt")["step"] == step
    # no unlinked partial file held open: only the kept checkpoints (and the small log) took space
    assert shutil.disk_usage(disk).free > free - CHECKPOINT_BYTES * len(kept) - 50_000


@pytest.mark.parametrize("how", ["full", "read-only"])
def test_tensorboard_on_a_failing_disk_is_one_warning_and_training_goes_on(small_fs, tmp_path, capsys, how):
    log_dir = small_fs(free=0) if how == "full" else small_fs(options="size=1m,ro")
    capsys.readouterr()
    assert train(tmp_path / "run", "--max_steps", "3", "--checkpoint_interval", "3", "--log_dir", str(log_dir)) == 0
    out, err = capsys.readouterr()
    warnings = [line for line in out.splitlines() if "TensorBoard" in line]
    assert len(warnings) == 1 and warnings[0].startswith("warning: TensorBoard logging is off ("), out
    assert ("no space left" if how == "full" else "read-only") in warnings[0]
    assert "Traceback" not in err and "Exception" not in err, err
    assert [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")] == [1, 2, 3]
    assert load_checkpoint(tmp_path / "run" / "checkpoint_stage1_step_3.pt")["stage_completed"]


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o027, 0o640)])
def test_checkpoints_follow_the_umask(tmp_path, umask, mode):
    before = os.umask(umask)
    try:
        save_checkpoint({"model_state_dict": {"w": torch.ones(2)}}, tmp_path / "direct.pt")
        writer = CheckpointWriter()
        writer.save({"model_state_dict": {"w": torch.ones(2)}}, tmp_path / "background.pt")
        writer.wait()
        assert train(tmp_path / "run", "--max_steps", "1") == 0
    finally:
        os.umask(before)
    for path in (tmp_path / "direct.pt", tmp_path / "background.pt", tmp_path / "run" / "checkpoint_stage1_step_1.pt",
                 tmp_path / "run" / "metrics.jsonl"):
        assert oct(path.stat().st_mode & 0o777) == oct(mode), path


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads the umask from /proc (Linux)")
def test_reading_the_umask_never_sets_it(monkeypatch):
    """A server saves sessions from several threads: setting the umask to read it would give a folder
    another thread creates meanwhile the mode 0o777."""
    from mm_rec.utils.fileio import current_umask, file_mode
    before = os.umask(0o027)
    try:
        def no_setting(mask):
            raise AssertionError(f"os.umask({mask:#o}) called")
        monkeypatch.setattr(os, "umask", no_setting)
        assert current_umask() == 0o027 and file_mode() == 0o640
    finally:
        monkeypatch.undo()
        os.umask(before)
