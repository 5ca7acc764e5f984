"""Data-parallel training with 2 gloo processes on the CPU (torchrun), against one process training
on the same global batch: same losses, same weights, only rank 0 writes, and a checkpoint of the
2-process run resumes in a single process as if nothing had changed."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mm_rec.scripts import train_modular
from mm_rec.training.checkpoint import load_checkpoint
from mm_rec.training.metrics import read_metrics
from mm_rec.utils.errors import run_cli

MODEL = ["--vocab_size", "512", "--expert_dim", "32", "--num_layers", "1", "--num_heads", "2", "--ffn_dim", "64"]
STEPS = 4
STAGES = ("stage1", "stage2", "stage3")


def argv(data_dir, ckpt_dir, batch_size, *args) -> list[str]:
    # All three stages (stage 2 trains one expert per step, so ranks all-reduce a partial set of
    # gradients), STEPS steps each, a checkpoint every 2 steps. The learning rate is high enough to
    # learn in 12 steps and low enough that AdamW's sign flips on near-zero gradients (the two
    # reduction orders differ in the last bits) stay within assert_states_close's bound: at 1e-2
    # the deduplicated default corpus drifted the embedding by 1.9% of its norm.
    return ["--preset", "tiny", *MODEL, "--data_dir", str(data_dir), "--checkpoint_dir", str(ckpt_dir),
            "--stage", "all", "--max_steps", str(STEPS), "--checkpoint_interval", "2", "--eval_interval", "0",
            "--seq_len", "32", "--batch_size", str(batch_size), "--eval_batches", "2", "--memory_log_interval", "0",
            "--warmup_steps", "1", "--learning_rate", "5e-3", "--device", "cpu", *args]


def torchrun(nproc: int, args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc_per_node={nproc}", "-m", "mm_rec.scripts.train_modular", *args],
                          capture_output=True, text=True, env=env, timeout=timeout)


def losses(ckpt_dir) -> dict[tuple[str, int], float]:
    return {(r["stage"], r["step"]): r["loss"] for r in read_metrics(Path(ckpt_dir) / "metrics.jsonl")}


def assert_states_close(a: dict, b: dict, total_rtol: float = 1e-4) -> None:
    """Close weights. Not elementwise: summing gradients in another order changes their last bits, and
    AdamW turns a last-bit change of a near-zero gradient into a different +-lr step of that element,
    so over a few stages a handful of elements drift by ~lr/10 while the tensors agree to ~1e-5."""
    assert a.keys() == b.keys()
    total_diff = total = 0.0
    for k in a:
        diff, norm = (a[k] - b[k]).float().norm().item(), b[k].float().norm().item()
        assert diff <= 5e-3 * norm + 1e-6, (k, diff, norm)
        total_diff, total = total_diff + diff ** 2, total + norm ** 2
    assert total_diff ** 0.5 <= total_rtol * total ** 0.5, (total_diff ** 0.5, total ** 0.5)


@pytest.fixture(scope="module")
def runs(data_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ddp")
    ddp, single = root / "ddp", root / "single"
    proc = torchrun(2, argv(data_dir, ddp, 2))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 processes" in proc.stdout
    assert run_cli(train_modular.main, argv(data_dir, single, 4)) == 0
    return {"ddp": ddp, "single": single, "root": root, "stdout": proc.stdout}


def test_only_rank_0_writes(runs):
    ddp = runs["ddp"]
    names = sorted(p.name for p in ddp.iterdir())
    ckpts = [f"checkpoint_{s}_step_{n}.pt" for s in STAGES for n in (2, 4)]
    assert names == sorted(ckpts + ["metrics.jsonl", "tokenizer.json", "tensorboard", ".mmrec-run.lock"] +
                           [f"loss_{s}.png" for s in STAGES] + [f"checkpoint_{s}_best.pt" for s in STAGES])
    assert len(list((ddp / "tensorboard").iterdir())) == 1  # one event file: one writer
    rows = read_metrics(ddp / "metrics.jsonl", type=None)
    train_rows = [(r["stage"], r["step"]) for r in rows if r["type"] == "train"]
    assert train_rows == [(s, n) for s in STAGES for n in range(1, STEPS + 1)]  # each step once
    assert [(r["stage"], r["step"]) for r in rows if r["type"] == "eval"] == [(s, STEPS) for s in STAGES]
    for ck in ckpts:  # each save announced once (rank 1 prints nothing)
        assert runs["stdout"].count(ck) == 1, ck
    # the checkpoint records the per-process batch
    assert load_checkpoint(ddp / "checkpoint_stage1_step_2.pt")["train_args"]["batch_size"] == 2


def test_two_processes_match_one_process_on_the_same_global_batch(runs):
    ddp, single = losses(runs["ddp"]), losses(runs["single"])
    assert ddp.keys() == single.keys() and len(ddp) == 3 * STEPS
    for key in single:
        assert ddp[key] == pytest.approx(single[key], rel=1e-4), key
    # validation: both ranks score half the windows of the global eval set, the same number results
    evals = {r: {row["stage"]: row for row in read_metrics(runs[r] / "metrics.jsonl", type="eval")}
             for r in ("ddp", "single")}
    for stage in STAGES:
        for k in ("val_loss_text", "val_loss_code"):
            if k in evals["single"][stage]:
                assert evals["ddp"][stage][k] == pytest.approx(evals["single"][stage][k], rel=1e-4), (stage, k)
    # the model learns something over these steps, so equal losses are not a coincidence of init
    assert single[("stage3", STEPS)] < single[("stage1", 1)] - 0.3
    a, b = (load_checkpoint(runs[r] / f"checkpoint_stage1_step_{STEPS}.pt")["model_state_dict"] for r in ("ddp", "single"))
    for k in a:  # after one stage the weights still agree elementwise
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
    for stage in STAGES:
        a = load_checkpoint(runs["ddp"] / f"checkpoint_{stage}_step_{STEPS}.pt")
        b = load_checkpoint(runs["single"] / f"checkpoint_{stage}_step_{STEPS}.pt")
        assert_states_close(a["model_state_dict"], b["model_state_dict"])
        # the same parameters stepped the same number of times, with close AdamW moments
        sa, sb = a["optimizer_state_dict"]["state"], b["optimizer_state_dict"]["state"]
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[i]["step"], sb[i]["step"]) for i in sb)
        assert_states_close({i: sa[i]["exp_avg"] for i in sa}, {i: sb[i]["exp_avg"] for i in sb}, total_rtol=1e-3)


def test_resume_a_two_process_checkpoint_in_one_process(runs, data_dir, capsys):
    out = runs["root"] / "resumed"
    mid = runs["ddp"] / "checkpoint_stage2_step_2.pt"
    before = mid.read_bytes()
    assert load_checkpoint(mid)["world_size"] == 2
    assert run_cli(train_modular.main, argv(data_dir, out, 4, "--resume_from", str(mid))) == 0
    assert "changed settings" not in capsys.readouterr().out  # 2 x 2 -> 1 x 4: the same global batch
    got, want = losses(out), losses(runs["single"])
    assert sorted(got) == [("stage2", 3), ("stage2", 4)] + [("stage3", n) for n in range(1, STEPS + 1)]
    for key in got:
        assert got[key] == pytest.approx(want[key], rel=1e-4), key
    final = load_checkpoint(out / f"checkpoint_stage3_step_{STEPS}.pt")["model_state_dict"]
    assert_states_close(final, load_checkpoint(runs["single"] / f"checkpoint_stage3_step_{STEPS}.pt")["model_state_dict"])
    assert mid.read_bytes() == before


def test_unwritable_checkpoint_dir_stops_every_rank_with_one_line(data_dir, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_bytes(b"precious")
    proc = torchrun(2, argv(data_dir, blocker / "ckpts", 2), timeout=120)
    assert proc.returncode != 0
    # rank 0 finds the problem; rank 1 stops with the same line instead of dying in a collective
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 2 and all("cannot write to checkpoint directory" in e for e in errors), proc.stderr
    assert "[rank1]" not in proc.stderr and "[rank0]" not in proc.stderr, proc.stderr
    assert blocker.read_bytes() == b"precious"


def test_a_new_run_into_a_used_dir_stops_every_rank_with_one_line(runs, data_dir):
    ddp = runs["ddp"]
    before = {str(p.relative_to(ddp)): p.read_bytes() for p in ddp.rglob("*") if p.is_file()}
    proc = torchrun(2, argv(data_dir, ddp, 2), timeout=120)
    assert proc.returncode != 0
    # rank 0 finds the earlier run before anything is written; rank 1 stops with the same line
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    want = (f"error: {ddp} already holds a run; start over with --overwrite, choose another --checkpoint_dir, "
            f"or continue it with --resume_from {ddp / f'checkpoint_stage3_step_{STEPS}.pt'}")
    assert errors == [want, want], proc.stderr
    assert "[rank1]" not in proc.stderr and "[rank0]" not in proc.stderr, proc.stderr
    assert {str(p.relative_to(ddp)): p.read_bytes() for p in ddp.rglob("*") if p.is_file()} == before


def test_a_directory_another_trainer_holds_stops_every_rank_with_one_line(data_dir, tmp_path):
    from mm_rec.training.runlock import RunLock
    held = tmp_path / "held"
    lock = RunLock(held).acquire()  # as a trainer running there holds it
    lock.publish_pid()
    try:
        proc = torchrun(2, argv(data_dir, held, 2), timeout=120)
    finally:
        lock.release()
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    want = (f"error: {held} is in use by a training process (pid {os.getpid()}); wait for it to finish or stop "
            f"it, or choose another --checkpoint_dir")
    assert errors == [want, want], proc.stderr
    assert "[rank1]" not in proc.stderr and "[rank0]" not in proc.stderr, proc.stderr
    assert sorted(p.name for p in held.iterdir()) == [".mmrec-run.lock"]
