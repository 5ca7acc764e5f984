"""train_step (mm_rec/training/step.py) is the step that trains: the trainer's steps are it, bitwise;
another model trains through the same trainer (its build_model seam); a checkpoint whose scheduler
state is a plain LambdaLR's resumes at another --lr_scale; bench_train times it."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from mm_rec.data.loader import TokenData
from mm_rec.model import MMRec100M, MMRecConfig
from mm_rec.scripts import train_modular
from mm_rec.training.checkpoint import load_checkpoint
from mm_rec.training.config import parse_args
from mm_rec.training.metrics import read_metrics
from mm_rec.training.optim import build_optimizer, build_scheduler
from mm_rec.training.step import train_step
from mm_rec.training.trainer import Trainer
from mm_rec.utils.errors import run_cli

ROOT = Path(__file__).resolve().parents[2]
MODEL = ["--vocab_size", "512", "--expert_dim", "32", "--num_layers", "1", "--num_heads", "2", "--ffn_dim", "64"]


def argv(data_dir, ckpt_dir, *args) -> list[str]:
    return ["--preset", "tiny", *MODEL, "--data_dir", str(data_dir), "--checkpoint_dir", str(ckpt_dir),
            "--seq_len", "32", "--batch_size", "4", "--eval_batches", "1", "--memory_log_interval", "0",
            "--eval_interval", "0", *args]


@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_the_trainers_steps_are_train_step_bitwise(data_dir, tmp_path, stage):
    """N trainer steps (micro-batches accumulated; Stage 2 alternating experts) end at exactly the
    weights N calls of train_step with the trainer's optimizer, schedule and batches give."""
    steps = 3
    args = argv(data_dir, tmp_path, "--stage", stage, "--max_steps", str(steps), "--checkpoint_interval",
                str(steps), "--grad_accum_steps", "2", "--warmup_steps", "1")
    assert run_cli(train_modular.main, args) == 0
    trained = load_checkpoint(tmp_path / f"checkpoint_{stage}_step_{steps}.pt")["model_state_dict"]

    cfg = parse_args(args)
    spec, data = cfg.stage_spec(stage), TokenData(data_dir)
    torch.manual_seed(cfg.seed)
    model = MMRec100M(config=cfg.model_config())
    model.use_fusion = spec.use_fusion
    model.train()
    optimizer = build_optimizer(model, spec.learning_rate, cfg.weight_decay)
    scheduler = build_scheduler(optimizer, spec.warmup_steps, spec.max_steps)
    for step in range(1, steps + 1):
        kind, expert_type = spec.batch_plan(step)
        batches = [data.get_batch(kind, (step - 1) * 2 + micro + 1, spec.batch_size, spec.seq_len, seed=cfg.seed)
                   for micro in range(2)]
        xs, ys = torch.stack([x for x, _ in batches]), torch.stack([y for _, y in batches])
        train_step(model, optimizer, xs, ys, model.loss, clip_norm=cfg.gradient_clip_norm,
                   expert_type=expert_type, return_memory=False)
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    for name, value in model.state_dict().items():
        assert torch.equal(value, trained[name]), name


def test_a_plain_lambdalr_checkpoint_resumes_at_another_lr_scale(data_dir, tmp_path):
    """A checkpoint's scheduler state is a plain LambdaLR's (the format every earlier version saved):
    resumed with --lr_scale 0.5 it trains on at half the uninterrupted run's learning rate, and the
    schedule's base stays halved in the checkpoints it writes."""
    run = ["--stage", "stage1", "--max_steps", "4", "--checkpoint_interval", "2", "--warmup_steps", "1"]
    assert run_cli(train_modular.main, argv(data_dir, tmp_path, *run)) == 0
    straight = {r["step"]: r["lr"] for r in read_metrics(tmp_path / "metrics.jsonl")}
    saved = load_checkpoint(tmp_path / "checkpoint_stage1_step_2.pt")
    plain = torch.optim.lr_scheduler.LambdaLR(torch.optim.SGD([torch.zeros(1)], lr=1.0), lambda step: 1.0)
    assert saved["scheduler_state_dict"].keys() == plain.state_dict().keys()
    assert saved["scheduler_state_dict"]["lr_lambdas"] == [None, None] and saved["lr_scale"] == 1.0  # two groups

    assert run_cli(train_modular.main, argv(data_dir, tmp_path, *run, "--lr_scale", "0.5", "--resume_from",
                                            str(tmp_path / "checkpoint_stage1_step_2.pt"))) == 0
    rows = {r["step"]: r for r in read_metrics(tmp_path / "metrics.jsonl")}
    assert [rows[s]["lr_scale"] for s in (1, 2, 3, 4)] == [1.0, 1.0, 0.5, 0.5]
    assert [rows[s]["lr"] for s in (3, 4)] == [0.5 * straight[3], 0.5 * straight[4]]
    final = load_checkpoint(tmp_path / "checkpoint_stage1_step_4.pt")
    assert final["lr_scale"] == 0.5
    assert final["scheduler_state_dict"]["base_lrs"] == [0.5 * b for b in saved["scheduler_state_dict"]["base_lrs"]]


def test_another_model_trains_through_the_same_trainer(tmp_path):
    """Trainer(cfg, build_model=...) trains any model with MM-Rec's training interface (here the
    benchmark's Transformer baseline) through the same loop, step, checkpoints and logs."""
    from benchmarks.baselines.transformer import TransformerBaseline
    built = []

    def build_model(config: MMRecConfig):
        built.append(config)
        return TransformerBaseline(config)

    cfg = parse_args(["--preset", "tiny", "--synthetic", *MODEL, "--checkpoint_dir", str(tmp_path), "--stage",
                      "stage1", "--max_steps", "4", "--checkpoint_interval", "4", "--seq_len", "16",
                      "--batch_size", "2", "--eval_batches", "1", "--memory_log_interval", "2",
                      "--device", "cpu"])
    Trainer(cfg, build_model=build_model).run()
    assert len(built) == 1 and built[0].vocab_size == 512
    state = load_checkpoint(tmp_path / "checkpoint_stage1_step_4.pt")
    assert any(k.endswith(".qkv.weight") for k in state["model_state_dict"])  # the Transformer's weights
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(r["loss"] == r["loss"] for r in rows)


def test_bench_train_times_train_step(monkeypatch):
    """bench_train's step is train_step with the trainer's optimizer (parameter groups, clipping,
    finite check): one bench step moves the weights exactly as one train_step does."""
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks import bench_train as bt
    torch.manual_seed(0)
    model = MMRec100M(config=MMRecConfig(vocab_size=300, expert_dim=16, num_layers=1, num_heads=2, ffn_dim=32))
    reference = copy.deepcopy(model)
    step, _ = bt.make_step(model, "mmrec-gpu", "default")
    xy = torch.randint(0, 300, (2, 17))
    step(xy[:, :-1], xy[:, 1:], "text")

    optimizer = build_optimizer(reference, 1e-4, 0.1)
    train_step(reference, optimizer, xy[None, :, :-1], xy[None, :, 1:], reference.loss, clip_norm=1.0,
               autocast_dtype=torch.bfloat16, expert_type="text")
    for (name, a), b in zip(model.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(a, b), name
