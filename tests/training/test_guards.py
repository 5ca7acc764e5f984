"""What guards a run (training/guards.py, heldout.py): the epochs report and its warning, the best
checkpoint kept whatever --keep_last prunes, early stopping, held-out files scored at each
evaluation, and evaluation through the chunked model.loss."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from mm_rec.scripts import evaluate as evaluate_cli
from mm_rec.scripts import export as export_cli
from mm_rec.scripts import generate as generate_cli
from mm_rec.scripts import train_modular
from mm_rec.training import guards
from mm_rec.training.checkpoint import load_checkpoint
from mm_rec.training.evaluation import evaluate_loss
from mm_rec.training.metrics import read_metrics
from mm_rec.training.stages import SCHEDULES
from mm_rec.utils.errors import run_cli

MODEL = ["--vocab_size", "512", "--expert_dim", "32", "--num_layers", "1", "--num_heads", "2", "--ffn_dim", "64"]
PROSE = ("The lighthouse keeper wrote in his log every evening, noting the wind, the ships that passed "
         "and the colour of the sea. ") * 3
CODE = "def area(width, height):\n    return width * height\n\n\nprint(area(3, 4))\n"


def train(data_dir, ckpt_dir, *args, expect=0):
    argv = ["--preset", "tiny", *MODEL, "--data_dir", str(data_dir), "--checkpoint_dir", str(ckpt_dir),
            "--seq_len", "32", "--batch_size", "4", "--eval_batches", "2", "--memory_log_interval", "0", *args]
    assert run_cli(train_modular.main, argv) == expect


# -- epochs -----------------------------------------------------------------------------------------
def test_epochs_of_the_guides_schedule_on_the_bundled_corpus_and_the_warning():
    """Issue 20's figures: the bundled corpus (4.7M text, 2.9M code tokens) is shown 17 and 28 times
    in Stage 2; the warning says to bring data or train fewer steps, with a --max_steps that fits."""
    held = {"text": 4_700_000, "code": 2_900_000}
    spec = SCHEDULES["100m"]["stage2"]
    uses = guards.stage_data_use(spec, global_batch=2, grad_accum=1, held=held)
    assert [(u.domain, u.expert, u.consumed) for u in uses] == [("text", "text", 5000 * 2 * 8192),
                                                                ("code", "code", 5000 * 2 * 8192)]
    assert [round(u.epochs) for u in uses] == [17, 28]
    lines = guards.epochs_report("stage2", uses, spec.max_steps)
    assert len(lines) == 3 and "17 epochs" in lines[0] and "28 epochs" in lines[1]
    warning = lines[2]
    assert warning.startswith("⚠️ stage2") and "prepare_data" in warning and "--data_dir" in warning
    fewer = int(warning.split("--max_steps ")[1].split()[0])
    assert guards.stage_data_use(spec.with_overrides(max_steps=fewer), 2, 1, held)[1].epochs <= guards.EPOCH_WARNING
    # mixed stages: half of each batch per domain; few epochs: no warning
    s1 = SCHEDULES["100m"]["stage1"]
    uses = guards.stage_data_use(s1, global_batch=4, grad_accum=2, held=held)
    assert [u.consumed for u in uses] == [5000 * 4 * 512] * 2 and {u.expert for u in uses} == {"both"}
    assert len(guards.epochs_report("stage1", uses, s1.max_steps)) == 2


def test_the_trainer_reports_epochs_and_warns(data_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(guards, "EPOCH_WARNING", 0.001)  # this small run as if it repeated its data
    train(data_dir, tmp_path, "--stage", "stage2", "--max_steps", "2", "--eval_interval", "0")
    out = capsys.readouterr().out
    assert "data: stage2 feeds the text expert 128 text tokens" in out
    assert "⚠️ stage2 shows the text data" in out and "--max_steps" in out
    row = read_metrics(tmp_path / "metrics.jsonl", type="data")[0]
    assert row["tokens_text"] == 128 and row["epochs_text"] > 0


# -- best checkpoint, early stopping, held-out --------------------------------------------------------
@pytest.fixture(scope="module")
def stopped_run(data_dir, tmp_path_factory):
    """Stage 1 with an evaluation every 2 steps, checkpoints every 4, --keep_last 1, held-out files,
    and early stopping that must trigger (a min_delta no real step reaches)."""
    root = tmp_path_factory.mktemp("stopped")
    (root / "prose.txt").write_text(PROSE)
    (root / "code.py").write_text(CODE)
    run = root / "run"
    train(data_dir, run, "--stage", "stage1", "--max_steps", "16", "--eval_interval", "2",
          "--checkpoint_interval", "4", "--keep_last", "1", "--learning_rate", "1e-2", "--warmup_steps", "2",
          "--early_stopping_patience", "2", "--early_stopping_min_delta", "5",
          "--heldout_text", str(root / "prose.txt"), "--heldout_code", str(root / "code.py"))
    return root, run


def test_best_checkpoint_is_the_lowest_validation_loss_and_survives_keep_last(stopped_run):
    _, run = stopped_run
    evals = read_metrics(run / "metrics.jsonl", type="eval")
    scores = {r["step"]: (r["val_loss_text"] + r["val_loss_code"]) / 2 for r in evals}
    best = load_checkpoint(run / "checkpoint_stage1_best.pt")
    assert best["step"] == min(scores, key=scores.get)
    assert (best["val_losses"]["text"] + best["val_losses"]["code"]) / 2 == pytest.approx(min(scores.values()))
    assert best["best_tracker"]["best_step"] == best["step"]
    # --keep_last 1 left one numbered checkpoint; the best file is another name prune does not touch
    numbered = sorted(p.name for p in run.glob("checkpoint_stage1_step_*.pt"))
    assert len(numbered) == 1


def test_early_stopping_ends_the_stage_with_the_best_weights(stopped_run):
    _, run = stopped_run
    evals = read_metrics(run / "metrics.jsonl", type="eval")
    stop = read_metrics(run / "metrics.jsonl", type="early_stop")
    # first evaluation sets the best; two more without a 5-nat gain stop the stage at step 6 of 16
    assert [r["step"] for r in evals] == [2, 4, 6] and len(stop) == 1 and stop[0]["step"] == 6
    final = load_checkpoint(run / "checkpoint_stage1_step_6.pt")
    best = load_checkpoint(run / "checkpoint_stage1_best.pt")
    assert final["stage_completed"] is True
    for key, value in best["model_state_dict"].items():
        assert torch.equal(final["model_state_dict"][key], value), key
    assert max(r["step"] for r in read_metrics(run / "metrics.jsonl")) == 6


def test_heldout_files_are_scored_at_each_evaluation_as_evaluate_scores_them(stopped_run):
    root, run = stopped_run
    held = read_metrics(run / "metrics.jsonl", type="heldout")
    assert [r["step"] for r in held] == [2, 4, 6]
    best = load_checkpoint(run / "checkpoint_stage1_best.pt")
    row = next(r for r in held if r["step"] == best["step"])
    out = root / "eval.json"
    argv = ["--checkpoint", str(run / "checkpoint_stage1_best.pt"), "--text", str(root / "prose.txt"),
            "--code", str(root / "code.py"), "--expert", "fused", "--seq_len", "32", "--json", str(out), "--quiet"]
    assert run_cli(evaluate_cli.main, argv) == 0
    results = {r["domain"]: r for r in json.loads(out.read_text())["results"]}
    for domain in ("text", "code"):
        assert row[f"heldout_loss_{domain}"] == pytest.approx(results[domain]["loss"], rel=1e-5)
    assert (run / "loss_stage1.png").stat().st_size > 0


def test_the_best_checkpoint_feeds_generate_export_and_the_next_stage(stopped_run, data_dir, tmp_path):
    _, run = stopped_run
    best = run / "checkpoint_stage1_best.pt"
    assert run_cli(generate_cli.main, ["--checkpoint", str(best), "--prompt", "The", "--max_new_tokens", "4",
                                       "--temperature", "0"]) == 0
    assert run_cli(export_cli.main, ["--checkpoint", str(best), "--out", str(tmp_path / "export")]) == 0
    assert (tmp_path / "export" / "model.safetensors").is_file()
    nxt = tmp_path / "next"
    train(data_dir, nxt, "--stage", "stage2", "--max_steps", "2", "--eval_interval", "0", "--resume_from", str(best))
    assert load_checkpoint(nxt / "checkpoint_stage2_step_2.pt")["stage_completed"] is True


def test_best_tracker_counts_patience_against_the_best():
    t = guards.BestTracker("stage1", patience=2, min_delta=0.1)
    v = [t.update(s, {"text": x, "code": x}) for s, x in ((1, 5.0), (2, 4.95), (3, 4.99), (4, 4.0))]
    assert [x.improved for x in v] == [True, True, False, True]
    assert [x.stop for x in v] == [False, False, True, False]  # 4.95 beat 5.0 by less than 0.1
    assert t.best == 4.0 and t.best_step == 4
    again = guards.BestTracker("stage1", 2, 0.1, state=t.state_dict())  # as a resume restores it
    assert (again.best, again.best_step, again.bad_evals) == (4.0, 4, 0)
    assert guards.BestTracker("stage2", state=t.state_dict()).best == math.inf  # another stage starts afresh
    assert not t.update(5, {"text": float("nan"), "code": 1.0}).improved


# -- evaluation through model.loss --------------------------------------------------------------------
def test_evaluation_never_builds_full_logits(data_dir, monkeypatch):
    from mm_rec.data.loader import TokenData
    from mm_rec.model import MMRec100M
    torch.manual_seed(0)
    model = MMRec100M(vocab_size=512, expert_dim=32, num_layers=1, num_heads=2, ffn_dim=64)
    data = TokenData(data_dir)
    with torch.no_grad():
        nats, count = 0.0, 0
        for x, y in data.iter_eval_batches("text", 2, 16, 3):
            nats += F.cross_entropy(model(x).float().flatten(0, 1), y.flatten(), reduction="sum").item()
            count += y.numel()
    rows = []
    model.lm_head.register_forward_hook(lambda m, i, o: rows.append(i[0].reshape(-1, i[0].shape[-1]).shape[0]))
    monkeypatch.setattr(model, "forward", lambda *a, **k: pytest.fail("evaluation built the full logits"))
    loss = evaluate_loss(model, data, "text", None, batch_size=2, seq_len=16, max_batches=3, head_chunk=8)
    assert loss == pytest.approx(nats / count, rel=1e-6)
    assert rows and max(rows) <= 8


def test_a_healthy_tiny_run_prints_no_warning(data_dir, tmp_path, capsys, caplog):
    """The tiny preset's model through all three stages, memory norms measured at every step: no
    warning line (issue 26: the quick start printed several memory-norm warnings)."""
    argv = ["--preset", "tiny", "--vocab_size", "512", "--data_dir", str(data_dir), "--checkpoint_dir", str(tmp_path),
            "--stage", "all", "--max_steps", "4", "--seq_len", "64", "--batch_size", "2", "--eval_batches", "1",
            "--memory_log_interval", "1"]
    assert run_cli(train_modular.main, argv) == 0
    captured = capsys.readouterr()
    text = captured.out + captured.err
    assert "✅ Stage stage3 training completed!" in text
    assert "⚠️" not in text and "warning" not in text.lower(), text
    assert [r for r in caplog.records if r.levelno >= 30] == []
    memory = read_metrics(tmp_path / "metrics.jsonl", type="memory")
    assert len(memory) == 12 and all(math.isfinite(r["all/h_max"]) for r in memory)


def test_a_compiled_run_shows_the_first_steps_time_and_the_cpu_default_stays_eager(data_dir, tmp_path, capsys,
                                                                                  monkeypatch):
    from mm_rec.model import MMRec100M
    compiled = []
    monkeypatch.setattr(MMRec100M, "compile_blocks", lambda self, mode=None: compiled.append(mode))  # no real compile
    train(data_dir, tmp_path / "c", "--stage", "stage1", "--max_steps", "2", "--eval_interval", "0", "--compile")
    out = capsys.readouterr().out
    assert compiled == [None]
    assert len([l for l in out.splitlines() if l.startswith("first step of stage1: ")]) == 1
    assert "(compiling; later steps are faster)" in out
    train(data_dir, tmp_path / "e", "--stage", "stage1", "--max_steps", "2", "--eval_interval", "0")
    assert compiled == [None] and "first step" not in capsys.readouterr().out
    args = load_checkpoint(tmp_path / "e" / "checkpoint_stage1_step_2.pt")["train_args"]
    assert args["compile"] is False and args["cuda_graph"] is False


def test_bad_heldout_and_early_stopping_flags_are_one_line(tmp_path, capsys):
    missing = str(tmp_path / "nope.txt")
    for args, expected in ((["--heldout_text", missing], f"--heldout_text {missing} does not exist"),
                           (["--synthetic", "--heldout_code", __file__], "--synthetic has none"),
                           (["--early_stopping_patience", "-1"], "--early_stopping_patience must be zero or positive"),
                           (["--early_stopping_min_delta", "nan"], "must be zero or positive (got nan)")):
        assert run_cli(train_modular.main, ["--checkpoint_dir", str(tmp_path / "run"), *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and expected in err[0], err
    assert not (tmp_path / "run").exists()


def test_checkpoints_kept_counts_what_keep_last_leaves_plus_the_best():
    from mm_rec.training.guards import checkpoints_kept
    assert checkpoints_kept(5000, 100, 5) == 6      # the newest 5 (the final among them) + best
    assert checkpoints_kept(5000, 100, 0) == 51     # every 100th step + best
    assert checkpoints_kept(250, 100, 0) == 4       # steps 100, 200, the final 250 + best
    assert checkpoints_kept(10, 100, 5) == 2


def test_disk_warning_when_the_kept_checkpoints_exceed_the_free_space(tmp_path):
    import shutil
    from mm_rec.training.guards import disk_warning
    free = shutil.disk_usage(tmp_path).free
    assert disk_warning(tmp_path, 1000, 3) is None
    line = disk_warning(tmp_path, free // 2 + 1, 3)
    assert line is not None and "--keep_last" in line and "\n" not in line
    assert disk_warning(tmp_path / "missing", 10**15, 3) is None  # nothing to measure: no warning
