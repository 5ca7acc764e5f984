"""Recovery on the run's own trajectory (issue 25.2), poisoned checkpoints (25.2), the guide's §5.1
loop with a plain AdamW (26.11), and recovery_protocol.sh's usage errors and inferred flags (26.9).

Tiny model on synthetic tokens, in-process through `run_cli(main, argv)`; the protocol in bash."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mm_rec.model import MMRec100M, MMRecConfig
from mm_rec.scripts.train_modular import main
from mm_rec.training.checkpoint import checkpoint_name, load_checkpoint, save_checkpoint
from mm_rec.training.metrics import read_metrics
from mm_rec.training.trainer import Trainer
from mm_rec.utils.errors import run_cli
from mm_rec.utils.monitoring import create_monitoring_hooks

REPO = Path(__file__).resolve().parents[2]
PROTOCOL = REPO / "mlops" / "recovery_protocol.sh"
MODEL = ["--vocab_size", "300", "--expert_dim", "16", "--num_layers", "1", "--num_heads", "2", "--ffn_dim", "32"]
TINY = ["--preset", "tiny", "--synthetic", "--stage", "stage1", "--batch_size", "2", "--seq_len", "16", *MODEL,
        "--eval_interval", "0", "--eval_batches", "1", "--warmup_steps", "2", "--memory_log_interval", "0"]


def train(ckpt_dir, *args) -> int:
    return run_cli(main, TINY + ["--checkpoint_dir", str(ckpt_dir), *args])


def ckpt(directory, step, stage="stage1") -> Path:
    return Path(directory) / checkpoint_name(stage, step)


def poison(path: Path) -> str:
    state = load_checkpoint(path)
    name = sorted(state["model_state_dict"])[0]
    state["model_state_dict"][name].view(-1)[0] = float("nan")
    save_checkpoint(state, path)
    return name


@pytest.fixture(scope="module")
def other_trajectory(tmp_path_factory):
    """A directory where a first run went on to step 8 (completed), checkpoints every 2 steps."""
    directory = tmp_path_factory.mktemp("trajectories")
    assert train(directory, "--max_steps", "8", "--checkpoint_interval", "2") == 0
    return directory


@pytest.mark.parametrize("later", ["mid-stage", "completed"])
def test_recovery_after_a_resume_stays_on_its_own_lineage(other_trajectory, tmp_path, monkeypatch, capsys, later):
    # Resumed from step 2; a NaN at step 3, before the resumed run saved anything. The directory
    # holds the first run's steps 4 and 6 (another trajectory) and, "completed", its finished step 8.
    run = tmp_path / "run"
    shutil.copytree(other_trajectory, run)
    if later == "mid-stage":
        (run / checkpoint_name("stage1", 8)).unlink()
    first_id = load_checkpoint(ckpt(run, 2))["run_id"]
    monkeypatch.setenv("MMREC_INJECT_NAN_AT_STEP", "3")
    capsys.readouterr()
    assert train(run, "--max_steps", "8", "--checkpoint_interval", "2", "--resume_from", str(ckpt(run, 2))) == 0, \
        capsys.readouterr().err
    (rec,) = [r for r in read_metrics(run / "metrics.jsonl", type="recovery") if r["run_id"] != first_id]
    assert rec["checkpoint"] == str(ckpt(run, 2)) and rec["resume_step"] == 3  # not the other run's 6 or 8
    rows = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in rows if r["run_id"] == first_id] == [1, 2]  # its 3..8 dropped at the resume
    ours = [r["step"] for r in rows if r["run_id"] != first_id]
    assert ours == [3, 4, 5, 6, 7, 8]  # no step skipped (the NaN step is retried, not logged)
    final = load_checkpoint(ckpt(run, 8))
    assert final["lr_scale"] == 0.5 and [s["run_id"] for s in final["lineage"]][0] == first_id
    assert final["lineage"][0]["until"] == [0, 2]


def test_a_poisoned_checkpoint_is_skipped_with_one_line(tmp_path, monkeypatch, capsys):
    # Checkpoints at 2 and 4; when step 5 is NaN, step 4's file holds a NaN weight: recovery names it
    # once and rolls back to step 2.
    original = Trainer._inject_nan
    state = {}

    def nan_at_5_with_4_poisoned(self, step):
        if step == 5 and not state:
            self.checkpoints.wait()
            state["name"] = poison(ckpt(tmp_path, 4))
            return True
        return False
    monkeypatch.setattr(Trainer, "_inject_nan", nan_at_5_with_4_poisoned)
    capsys.readouterr()
    assert train(tmp_path, "--max_steps", "6", "--checkpoint_interval", "2") == 0
    out = capsys.readouterr().out
    skipped = [line for line in out.splitlines() if "skips" in line]
    assert skipped == [f"⚠️ recovery skips {ckpt(tmp_path, 4)}: non-finite values ({state['name']})"]
    (rec,) = read_metrics(tmp_path / "metrics.jsonl", type="recovery")
    assert rec["checkpoint"] == str(ckpt(tmp_path, 2)) and rec["resume_step"] == 3
    monkeypatch.setattr(Trainer, "_inject_nan", original)


# -- the guide's §5.1 loop -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trainer_run(tmp_path_factory):
    directory = tmp_path_factory.mktemp("trainer_run")
    assert train(directory, "--max_steps", "4", "--checkpoint_interval", "4") == 0
    return directory


@pytest.mark.parametrize("names_saved", [True, False], ids=["names", "older-checkpoint"])
def test_guide_loop_recovers_with_a_plain_adamw(trainer_run, tmp_path, names_saved):
    state = load_checkpoint(ckpt(trainer_run, 4))
    if not names_saved:  # a checkpoint from before the parameter names were saved
        del state["optimizer_param_names"]
    save_checkpoint(state, ckpt(tmp_path, 4))
    config = dict(state["config"])
    config.pop("use_fusion")
    torch.manual_seed(0)
    model = MMRec100M(config=MMRecConfig(**config))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)  # one group: the trainer's has two
    input_ids = torch.randint(0, 300, (2, 16))
    logits, _ = model(input_ids, return_memory=True)
    logits.float().mean().backward()
    optimizer.step()
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))

    # guide §5.1, as written
    hooks = create_monitoring_hooks(model, checkpoint_dir=str(tmp_path))
    for step in range(2):
        logits, memory_states = model(input_ids, return_memory=True)
        stable = hooks["stability_monitor"].check_outputs({"logits": logits}, step)
        if not stable:
            success, checkpoint = hooks["recovery"].recover(model, optimizer)
            if not success:
                raise RuntimeError("Recovery failed!")
            assert checkpoint == str(ckpt(tmp_path, 4))
        norms = hooks["memory_hook"](memory_states, step)
    assert step == 1 and stable and hooks["recovery"].attempts == 1

    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, state["model_state_dict"][name]), name
    # the optimizer state, matched by parameter: each parameter's moments are the checkpoint's own
    saved = state["optimizer_state_dict"]
    names = [n for n, _ in model.named_parameters()]
    order = state.get("optimizer_param_names")
    if order is None:
        from mm_rec.training.optim import param_groups
        by_id = {id(p): n for n, p in model.named_parameters()}
        order = [by_id[id(p)] for g in param_groups(model, 0.0) for p in g["params"]]
    restored = optimizer.state_dict()["state"]
    for i, name in enumerate(names):
        if order.index(name) in saved["state"]:
            assert torch.equal(restored[i]["exp_avg"], saved["state"][order.index(name)]["exp_avg"]), name
        else:  # not trained in stage 1 (the fusion layer): no moments, not the diverged run's
            assert i not in restored, name
    assert 0 < len(saved["state"]) < len(names) and len(restored) == len(saved["state"])
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.5e-3)  # halved


# -- recovery_protocol.sh -------------------------------------------------------------------------
def protocol(ckpt_dir, *args, env=None):
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", **(env or {})}
    env.pop("MMREC_INJECT_NAN_AT_STEP", None)
    return subprocess.run(["bash", str(PROTOCOL), str(ckpt_dir), *args], env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def stopped(tmp_path_factory):
    """A run stopped at step 3 of 4 (diverged for good), checkpoints at steps 1 and 2."""
    directory = tmp_path_factory.mktemp("stopped")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Trainer, "_inject_nan", lambda self, step: step >= 3)
        assert train(directory, "--max_steps", "4", "--checkpoint_interval", "1") == 1
    return directory


def test_protocol_takes_the_flags_from_the_checkpoint_and_skips_a_poisoned_one(stopped, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(stopped, run)
    poison(ckpt(run, 2))
    result = protocol(run)  # no flag repeated
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert f"skipping {ckpt(run, 2)}: non-finite values" in result.stderr
    log = (run / "recovery_protocol.log").read_text()
    assert f"attempt 1/3: resuming from {ckpt(run, 1)} with --lr_scale 0.5" in log
    assert "--preset tiny" in log and "--expert_dim 16" in log and "--synthetic" in log
    final = load_checkpoint(ckpt(run, 4))
    assert final["stage_completed"] and final["train_args"]["expert_dim"] == 16


def test_protocol_does_not_retry_a_usage_error(stopped, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(stopped, run)
    result = protocol(run, "--max_steps", "-1")
    assert result.returncode == 2
    log = (run / "recovery_protocol.log").read_text()
    assert log.count("resuming from") == 1 and "attempt 2/3" not in log
    assert "failed with exit status 2" in log and "not retrying" in log
    assert re.findall(r"^error: .*", result.stderr, re.M) == ["error: --max_steps must be positive (got -1)"]


@pytest.mark.parametrize("factor", ["abc", "0", "2", "0.5x"])
def test_protocol_refuses_a_bad_lr_factor_in_one_line(stopped, factor):
    result = protocol(stopped, env={"MMREC_LR_FACTOR": factor})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: MMREC_LR_FACTOR must be a number in (0, 1], e.g. 0.5 (got '{factor}')"]
    assert result.stdout == ""
