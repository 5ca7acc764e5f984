"""The training program on real data with tiny models: learning, stage semantics, resume, safe saves,
recovery, logs. Each run goes through `train_modular.main`, exactly as the CLI does."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mm_rec.data.loader import TokenData
from mm_rec.model import MMRec100M, MMRecConfig
from mm_rec.scripts import train_modular
from mm_rec.training import checkpoint as ckpt_module
from mm_rec.training.checkpoint import load_checkpoint
from mm_rec.training.evaluation import evaluate_loss
from mm_rec.training.metrics import read_metrics
from mm_rec.training.optim import lr_factor, param_groups
from mm_rec.utils.errors import run_cli

MODEL = ["--vocab_size", "512", "--expert_dim", "32", "--num_layers", "1", "--num_heads", "2", "--ffn_dim", "64"]


def train(data_dir, ckpt_dir, *args, expect=0) -> int:
    argv = ["--preset", "tiny", *MODEL, "--data_dir", str(data_dir), "--checkpoint_dir", str(ckpt_dir),
            "--seq_len", "32", "--batch_size", "4", "--eval_batches", "2", "--memory_log_interval", "0", *args]
    code = run_cli(train_modular.main, argv)
    assert code == expect
    return code


def losses(ckpt_dir, stage=None) -> dict[tuple[str, int], float]:
    rows = read_metrics(Path(ckpt_dir) / "metrics.jsonl")
    return {(r["stage"], r["step"]): r["loss"] for r in rows if stage is None or r["stage"] == stage}


def model_from(state) -> MMRec100M:
    cfg = dict(state["config"])
    use_fusion = cfg.pop("use_fusion")
    model = MMRec100M(config=MMRecConfig(**cfg))
    model.load_state_dict(state["model_state_dict"])
    model.use_fusion = use_fusion
    return model


# -- learning ------------------------------------------------------------------------------------
def test_loss_falls_well_below_its_start_on_real_data(data_dir, tmp_path):
    train(data_dir, tmp_path, "--stage", "stage1", "--max_steps", "40", "--warmup_steps", "5",
          "--learning_rate", "1e-2", "--checkpoint_interval", "40")
    curve = [v for _, v in sorted(losses(tmp_path).items())]
    assert len(curve) == 40
    start, end = curve[0], sum(curve[-5:]) / 5
    assert start > 5.5  # about ln(512) = 6.24 at initialisation
    assert end < start - 0.7, (start, end)  # measured: 6.28 -> 5.35
    # the final validation loss is logged and also fell
    ev = read_metrics(tmp_path / "metrics.jsonl", type="eval")[-1]
    assert ev["stage"] == "stage1" and ev["step"] == 40
    assert ev["val_loss_text"] < start - 0.6 and ev["val_loss_code"] < start - 0.6


@pytest.mark.compile
@pytest.mark.parametrize("scope", ["layer", "model"])
def test_compile_trains_like_eager(data_dir, tmp_path, scope):
    """--compile (the layer compiled once for every layer, or the whole loss) follows eager's loss
    curve step by step on both experts, and its checkpoint holds the plain parameter names."""
    import torch._dynamo
    torch._dynamo.reset()
    args = ("--stage", "stage1", "--max_steps", "4", "--checkpoint_interval", "4", "--eval_interval", "0",
            "--num_layers", "2")
    train(data_dir, tmp_path / "eager", *args)
    train(data_dir, tmp_path / "compiled", *args, "--compile", "--compile_scope", scope)
    eager, compiled = losses(tmp_path / "eager"), losses(tmp_path / "compiled")
    assert eager.keys() == compiled.keys() and len(eager) == 4
    for key, value in eager.items():
        assert abs(compiled[key] - value) < 1e-4, (key, compiled[key], value)
    state = load_checkpoint(tmp_path / "compiled" / "checkpoint_stage1_step_4.pt")
    reference = load_checkpoint(tmp_path / "eager" / "checkpoint_stage1_step_4.pt")
    assert state["model_state_dict"].keys() == reference["model_state_dict"].keys()
    model_from(state)
    torch._dynamo.reset()


def _count_captures(monkeypatch, on_cpu=True) -> list:
    """Records the input shape of each graph as it is made; on_cpu: lets --cuda_graph run on the CPU
    (the same step on the same buffers, uncaptured)."""
    from mm_rec.training import preflight, step_graph
    if on_cpu:
        monkeypatch.setattr(preflight, "GRAPH_DEVICES", ("cuda", "cpu"))
    keys, capture = [], step_graph.GraphedStep._capture
    monkeypatch.setattr(step_graph.GraphedStep, "_capture",
                        lambda self, entry, fn: keys.append(entry.inputs[0].shape) or capture(self, entry, fn))
    return keys


@pytest.mark.parametrize("accum", [1, 2])
def test_cuda_graph_step_trains_like_eager(data_dir, tmp_path, monkeypatch, accum):
    """--cuda_graph's step (update inside it, lr through tensors, fixed input buffers; warm-up,
    memory-logging and later steps outside the graph) follows the eager step's losses through
    Stage 1 and Stage 2's alternating experts (one graph each), with gradient accumulation."""
    keys = _count_captures(monkeypatch)
    args = ("--stage", "all", "--max_steps", "8", "--checkpoint_interval", "8", "--eval_interval", "0",
            "--grad_accum_steps", str(accum), "--memory_log_interval", "5", "--warmup_steps", "2")
    train(data_dir, tmp_path / "eager", *args)
    train(data_dir, tmp_path / "graphed", *args, "--cuda_graph")
    eager, graphed = losses(tmp_path / "eager"), losses(tmp_path / "graphed")
    assert eager.keys() == graphed.keys() and len(eager) == 24
    for key, value in eager.items():
        # relative: the same float32 maths in another order rounds differently (2 ulps at 6 nats: 1.4e-6)
        assert graphed[key] == pytest.approx(value, rel=1e-6, abs=0), (key, graphed[key], value)
    # a graph per stage and expert: stage1, stage2's text and code, stage3
    assert keys == [(accum, 4, 32)] * 4
    a = load_checkpoint(tmp_path / "eager" / "checkpoint_stage3_step_8.pt")
    b = load_checkpoint(tmp_path / "graphed" / "checkpoint_stage3_step_8.pt")
    for name, tensor in a["model_state_dict"].items():
        torch.testing.assert_close(b["model_state_dict"][name], tensor, atol=1e-4, rtol=1e-4)
    # the checkpoint keeps the schedule's float learning rates, not the graph's tensors
    assert all(isinstance(g["lr"], float) and not g["capturable"]
               for g in b["optimizer_state_dict"]["param_groups"])
    rows = read_metrics(tmp_path / "graphed" / "metrics.jsonl", type=None)
    assert [r["step"] for r in rows if r["type"] == "memory"] == [5] * 3


def test_cuda_graph_recovers_from_a_nan_and_recaptures(data_dir, tmp_path, monkeypatch, capsys):
    """A NaN step under --cuda_graph rolls back like the eager run (skipped on the device, recovered
    from step 4's checkpoint at half the lr), and the graph is captured again for the restored
    optimizer."""
    keys = _count_captures(monkeypatch)
    monkeypatch.setenv("MMREC_INJECT_NAN_AT_STEP", "5")
    args = ("--stage", "stage1", "--max_steps", "8", "--checkpoint_interval", "4", "--eval_interval", "0",
            "--warmup_steps", "0", "--cuda_graph")
    train(data_dir, tmp_path, *args)
    assert "recovered from" in capsys.readouterr().out
    assert len(keys) == 2
    train_rows = [r for r in read_metrics(tmp_path / "metrics.jsonl") if r["type"] == "train"]
    assert [r["step"] for r in train_rows] == list(range(1, 9))
    assert all(r["lr_scale"] == (0.5 if r["step"] >= 5 else 1.0) for r in train_rows)


def test_cuda_graph_refuses_the_cpu(data_dir, tmp_path, capsys):
    train(data_dir, tmp_path / "run", "--stage", "stage1", "--max_steps", "2", "--cuda_graph", "--device", "cpu", expect=2)
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "error: --cuda_graph needs a CUDA device (training runs on cpu); drop the flag"
    assert "Traceback" not in "\n".join(err) and not (tmp_path / "run").exists()  # nothing written


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("extra", [(), ("--gradient_checkpointing", "--compile")])
def test_cuda_graph_captured_on_the_gpu_trains_like_the_uncaptured_step(data_dir, tmp_path, monkeypatch, extra):
    """On CUDA the step is really captured and replayed: Stage 1 and Stage 2's two experts follow
    the uncaptured run's losses (fp32) and end at the same weights; also with activation
    checkpointing (recomputation inside the graph) and the compiled layer."""
    keys = _count_captures(monkeypatch, on_cpu=False)
    args = ("--stage", "stage1", "--max_steps", "8", "--checkpoint_interval", "8", "--eval_interval", "0",
            "--device", "cuda", "--precision", "fp32", *(extra or ("--no_compile",)))  # CUDA compiles by default
    for stage_args in (args, ("--stage", "stage2", *args[2:])):
        name = stage_args[1]
        train(data_dir, tmp_path / f"plain_{name}", *stage_args, "--no_cuda_graph")  # CUDA's default captures
        train(data_dir, tmp_path / f"graphed_{name}", *stage_args, "--cuda_graph")
        plain, graphed = losses(tmp_path / f"plain_{name}"), losses(tmp_path / f"graphed_{name}")
        assert plain.keys() == graphed.keys() and len(plain) == 8
        for key, value in plain.items():
            assert abs(graphed[key] - value) < 1e-4, (key, graphed[key], value)
        a = load_checkpoint(tmp_path / f"plain_{name}" / f"checkpoint_{name}_step_8.pt")["model_state_dict"]
        b = load_checkpoint(tmp_path / f"graphed_{name}" / f"checkpoint_{name}_step_8.pt")["model_state_dict"]
        for key, tensor in a.items():
            torch.testing.assert_close(b[key], tensor, atol=1e-3, rtol=1e-3)
    assert len(keys) == 3  # stage1, stage2's text and code


def test_cuda_graph_refuses_fp16(data_dir, tmp_path, monkeypatch, capsys):
    _count_captures(monkeypatch)
    train(data_dir, tmp_path, "--stage", "stage1", "--max_steps", "2", "--cuda_graph", "--precision", "fp16",
          expect=2)
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(
        "error: --cuda_graph cannot capture fp16's loss scaling")


def test_profile_step_writes_a_trace_and_a_table_of_three_steps(data_dir, tmp_path):
    """--profile_step 3 profiles steps 3-5: a Chrome trace of exactly three steps' ops and a table
    of the top ops; training itself is unchanged (same losses)."""
    args = ("--stage", "stage1", "--max_steps", "6", "--checkpoint_interval", "6", "--eval_interval", "0")
    train(data_dir, tmp_path / "plain", *args)
    train(data_dir, tmp_path / "profiled", *args, "--profile_step", "3")
    assert losses(tmp_path / "profiled") == losses(tmp_path / "plain")
    trace = json.loads((tmp_path / "profiled" / "profile_stage1_step3.json").read_text())
    names = [e.get("name", "") for e in trace["traceEvents"]]
    # the LM head's matmul is the step's one MmBackward0 (the layers' are batched): three steps
    assert sum(n == "autograd::engine::evaluate_function: MmBackward0" for n in names) == 3
    table = (tmp_path / "profiled" / "profile_stage1_step3.txt").read_text()
    assert "Self CPU" in table and "aten::mm" in table
    assert sorted(p.name for p in (tmp_path / "profiled").glob("profile_*")) == [
        "profile_stage1_step3.json", "profile_stage1_step3.txt"]


# -- the three stages ----------------------------------------------------------------------------
def _code_expert_entries(state):
    """(parameter tensors, AdamW state tensors) of the code expert in a checkpoint."""
    model = model_from(state)
    index = {id(p): i for i, p in enumerate(p for g in param_groups(model, 0.1) for p in g["params"])}
    names = {id(p): n for n, p in model.named_parameters()}
    params, opt = {}, {}
    for p in model.code_expert.parameters():
        params[names[id(p)]] = state["model_state_dict"][names[id(p)]]
        opt[names[id(p)]] = state["optimizer_state_dict"]["state"].get(index[id(p)])
    return params, opt


def test_stage2_leaves_the_idle_expert_bit_identical(data_dir, tmp_path):
    train(data_dir, tmp_path, "--stage", "stage2", "--max_steps", "3", "--checkpoint_interval", "1",
          "--eval_interval", "0")
    s2, s3 = (load_checkpoint(tmp_path / f"checkpoint_stage2_step_{n}.pt") for n in (2, 3))
    # step 3 is a text step (steps 1, 3, ... text; 2, 4, ... code): the code expert, trained at step 2,
    # must come out of step 3 with the same weights and the same AdamW moments, bit for bit.
    p2, o2 = _code_expert_entries(s2)
    p3, o3 = _code_expert_entries(s3)
    for name in p2:
        assert torch.equal(p2[name], p3[name]), name
        assert o2[name] is not None  # it did train at step 2
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(o2[name][key], o3[name][key]), (name, key)
    # while the text expert did move, and the fusion layer never trains before stage 3
    text_moved = [k for k in s2["model_state_dict"] if k.startswith("experts.text.")
                  and not torch.equal(s2["model_state_dict"][k], s3["model_state_dict"][k])]
    assert text_moved
    fusion_w = s3["model_state_dict"]["fusion.linear.weight"] if "fusion.linear.weight" in s3["model_state_dict"] \
        else next(v for k, v in s3["model_state_dict"].items() if k.startswith("fusion.") and v.dim() == 2)
    assert torch.equal(fusion_w, torch.eye(fusion_w.shape[0]))


def test_guide_workflow_stage_by_stage_and_fusion_starts_at_identity(data_dir, tmp_path):
    steps = ["--max_steps", "4", "--checkpoint_interval", "2", "--eval_interval", "0"]
    train(data_dir, tmp_path, "--stage", "stage1", *steps)
    s1 = load_checkpoint(tmp_path / "checkpoint_stage1_step_4.pt")
    assert s1["stage_completed"] and s1["stage"] == "stage1" and s1["step"] == 4
    # the guide's keys, and weights_only loading
    raw = torch.load(tmp_path / "checkpoint_stage1_step_4.pt", weights_only=True)
    for key in ("model_state_dict", "optimizer_state_dict", "scheduler_state_dict", "step", "loss", "stage",
                "config", "rng", "data_position", "train_args", "lr_scale", "tokenizer"):
        assert key in raw, key
    assert raw["data_position"] == {"stage": "stage1", "next_step": 5, "seed": 1337}
    assert json.loads(raw["tokenizer"])["model"]["type"] == "BPE"
    assert (tmp_path / "tokenizer.json").is_file() and (tmp_path / "loss_stage1.png").stat().st_size > 1000

    # Stage 2 from the finished Stage 1 (guide §4.2): a fresh optimizer, steps counted from 1.
    train(data_dir, tmp_path, "--stage", "stage2", "--resume_from", str(tmp_path / "checkpoint_stage1_step_4.pt"),
          *steps)
    s2 = load_checkpoint(tmp_path / "checkpoint_stage2_step_4.pt")
    model = model_from(s2)
    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for g in param_groups(model, 0.1) for p in g["params"]]
    counts = {order[i]: float(v["step"]) for i, v in s2["optimizer_state_dict"]["state"].items()}
    # nothing carried over from stage 1's 4 steps: each expert took 2 of the 4 steps, shared parts 4
    assert {c for n, c in counts.items() if n.startswith("experts.")} == {2.0}
    assert {c for n, c in counts.items() if not n.startswith("experts.")} == {4.0}

    # --stage all from the finished Stage 2 runs Stage 3 only.
    train(data_dir, tmp_path, "--stage", "all", "--resume_from", str(tmp_path / "checkpoint_stage2_step_4.pt"),
          *steps)
    logged = losses(tmp_path)
    assert {s for s, _ in logged} == {"stage1", "stage2", "stage3"}
    assert sorted(n for s, n in logged if s == "stage3") == [1, 2, 3, 4]
    s3 = load_checkpoint(tmp_path / "checkpoint_stage3_step_4.pt")
    assert s3["stage_completed"] and s3["config"]["use_fusion"] is True

    # Fusion starts at the identity: Stage 2's final weights give Stage 3's first loss on its batch,
    # whether the fusion layer is on or off.
    model = model_from(s2)
    x, y = TokenData(data_dir).get_batch("mixed", 1, 4, 32, seed=1337)
    with torch.no_grad():
        off = F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item()
        model.use_fusion = True
        on = F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item()
    assert on == off
    assert logged[("stage3", 1)] == pytest.approx(off, rel=1e-6, abs=0)


# -- resume --------------------------------------------------------------------------------------
def test_kill_and_resume_gives_the_uninterrupted_losses_bitwise(data_dir, tmp_path, monkeypatch):
    run = ["--stage", "stage1", "--max_steps", "7", "--checkpoint_interval", "3", "--eval_interval", "0",
           "--warmup_steps", "2"]
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    train(data_dir, straight, *run)

    from mm_rec.training.trainer import Trainer
    original = Trainer._train_step

    def killed_at_step_5(self, spec, step, *args):
        if step == 5:
            raise KeyboardInterrupt  # Ctrl-C in the middle of step 5
        return original(self, spec, step, *args)

    monkeypatch.setattr(Trainer, "_train_step", killed_at_step_5)
    train(data_dir, broken, *run, expect=130)
    monkeypatch.setattr(Trainer, "_train_step", original)
    assert sorted(n for _, n in losses(broken)) == [1, 2, 3, 4]

    train(data_dir, broken, *run, "--resume_from", str(broken / "checkpoint_stage1_step_3.pt"))
    rows = read_metrics(broken / "metrics.jsonl")
    # continues at step 3 + 1; the killed run's step-4 row was dropped (each step once)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6, 7]
    assert len({r["run_id"] for r in rows[:3]} | {r["run_id"] for r in rows[3:]}) == 2
    want = losses(straight)
    for r in rows:
        assert r["loss"] == want[("stage1", r["step"])], r["step"]  # bitwise
    a = load_checkpoint(straight / "checkpoint_stage1_step_7.pt")["model_state_dict"]
    b = load_checkpoint(broken / "checkpoint_stage1_step_7.pt")["model_state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_crash_during_a_save_leaves_the_previous_checkpoint_loadable(data_dir, tmp_path, monkeypatch):
    real_save = torch.save
    calls = []

    def crashing_save(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the second checkpoint: write part of it, then the disk fills up
            f.write(b"PK\x03\x04 partial checkpoint")
            raise OSError(28, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(ckpt_module.torch, "save", crashing_save)
    train(data_dir, tmp_path, "--stage", "stage1", "--max_steps", "4", "--checkpoint_interval", "2",
          "--eval_interval", "0", expect=2)
    assert load_checkpoint(tmp_path / "checkpoint_stage1_step_2.pt")["step"] == 2
    assert not (tmp_path / "checkpoint_stage1_step_4.pt").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_keep_last_prunes_older_mid_stage_checkpoints(data_dir, tmp_path):
    train(data_dir, tmp_path, "--stage", "stage1", "--max_steps", "5", "--checkpoint_interval", "1",
          "--eval_interval", "0", "--keep_last", "2")
    names = sorted(p.name for p in tmp_path.glob("checkpoint_*.pt"))
    # the stage's best checkpoint (its only evaluation, at the end) is kept apart from the pruned ones
    assert names == ["checkpoint_stage1_best.pt", "checkpoint_stage1_step_4.pt", "checkpoint_stage1_step_5.pt"]



# -- a new run where one already is ------------------------------------------------------------------
def _files(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_overwrite_starts_a_clean_run_and_moves_the_old_one_aside(data_dir, tmp_path, capsys):
    run = ["--stage", "stage1", "--checkpoint_interval", "2", "--eval_interval", "0"]
    train(data_dir, tmp_path, *run, "--max_steps", "6")
    old = {k: v for k, v in _files(tmp_path).items() if k != ".mmrec-run.lock"}  # the lock stays in place
    assert "checkpoint_stage1_step_6.pt" in old and any(k.startswith("tensorboard/") for k in old)
    capsys.readouterr()

    # a shorter run with another seed, pruning to its newest checkpoint
    train(data_dir, tmp_path, *run, "--max_steps", "4", "--seed", "7", "--keep_last", "1", "--overwrite")
    out = capsys.readouterr().out
    (aside,) = tmp_path.glob("previous_run.bak-*")
    assert f"was moved to {aside}" in out
    # the earlier run, every file of it, byte for byte, in the folder set aside
    assert _files(aside) == old
    # the new run's directory holds the new run only: its log, each step once; its checkpoints
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4]
    assert sorted(p.name for p in tmp_path.glob("checkpoint_*.pt")) == ["checkpoint_stage1_best.pt",
                                                                         "checkpoint_stage1_step_4.pt"]
    assert load_checkpoint(tmp_path / "checkpoint_stage1_step_4.pt")["train_args"]["seed"] == 7
    assert len(list((tmp_path / "tensorboard").iterdir())) == 1  # the new run's own events


def test_overwrite_recovers_from_its_own_checkpoints_only(data_dir, tmp_path, monkeypatch, capsys):
    run = ["--stage", "stage1", "--checkpoint_interval", "2", "--eval_interval", "0", "--warmup_steps", "0"]
    train(data_dir, tmp_path, *run, "--max_steps", "8")
    capsys.readouterr()
    # NaN at step 5 of the new run: its newest checkpoint is step 4 (the old run's 6 and 8 are aside)
    monkeypatch.setenv("MMREC_INJECT_NAN_AT_STEP", "5")
    train(data_dir, tmp_path, *run, "--max_steps", "6", "--seed", "7", "--overwrite")
    out = capsys.readouterr().out
    assert f"recovered from {tmp_path / 'checkpoint_stage1_step_4.pt'}" in out
    rec = read_metrics(tmp_path / "metrics.jsonl", type="recovery")
    assert len(rec) == 1 and rec[0]["resume_step"] == 5
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    final = load_checkpoint(tmp_path / "checkpoint_stage1_step_6.pt")
    assert final["train_args"]["seed"] == 7 and final["lr_scale"] == 0.5 and final["stage_completed"]
    (aside,) = tmp_path.glob("previous_run.bak-*")
    assert load_checkpoint(aside / "checkpoint_stage1_step_8.pt")["train_args"]["seed"] == 1337  # kept


# -- recovery (issue 5 hooks in the loop) -----------------------------------------------------------
def test_nan_at_a_step_recovers_from_the_newest_checkpoint_at_half_lr(data_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MMREC_INJECT_NAN_AT_STEP", "5")
    train(data_dir, tmp_path, "--stage", "stage1", "--max_steps", "6", "--checkpoint_interval", "2",
          "--eval_interval", "0", "--warmup_steps", "0")
    out = capsys.readouterr().out
    assert "recovered from" in out and "checkpoint_stage1_step_4.pt" in out
    rows = read_metrics(tmp_path / "metrics.jsonl", type=None)
    rec = [r for r in rows if r["type"] == "recovery"]
    assert len(rec) == 1 and rec[0]["success"] and rec[0]["step"] == 5 and rec[0]["resume_step"] == 5
    train_rows = [r for r in rows if r["type"] == "train"]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4, 5, 6]  # the NaN step is retried, not logged
    assert all(r["lr_scale"] == (0.5 if r["step"] >= 5 else 1.0) for r in train_rows)
    # step 5's lr is half what the schedule gives it
    lr5 = next(r["lr"] for r in train_rows if r["step"] == 5)
    assert lr5 == pytest.approx(0.5 * 3e-3 * lr_factor(4, 0, 6))
    assert load_checkpoint(tmp_path / "checkpoint_stage1_step_6.pt")["lr_scale"] == 0.5


def test_nan_before_any_checkpoint_stops_with_one_line(data_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MMREC_INJECT_NAN_AT_STEP", "2")
    train(data_dir, tmp_path, "--stage", "stage1", "--max_steps", "4", "--checkpoint_interval", "3",
          "--eval_interval", "0", expect=1)  # a diverged run: exit 1, not a usage error
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: non-finite loss at step 2") and "no checkpoint" in err[-1]
    assert "Traceback" not in "\n".join(err)
    assert list(tmp_path.glob("checkpoint_*.pt")) == []


# -- logs ----------------------------------------------------------------------------------------
def test_metrics_tensorboard_and_memory_norms(data_dir, tmp_path):
    train(data_dir, tmp_path, "--stage", "stage1", "--max_steps", "4", "--checkpoint_interval", "4",
          "--eval_interval", "2", "--memory_log_interval", "2")
    rows = read_metrics(tmp_path / "metrics.jsonl", type=None)
    train_rows = [r for r in rows if r["type"] == "train"]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4]
    for r in train_rows:
        assert r["stage"] == "stage1" and r["tokens_per_s"] > 0 and r["grad_norm"] > 0 and r["lr"] > 0
    assert [r["step"] for r in rows if r["type"] == "eval"] == [2, 4]
    memory = [r for r in rows if r["type"] == "memory"]
    assert [r["step"] for r in memory] == [2, 4] and memory[0]["text/layer_0/h"] > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(tmp_path / "tensorboard")).Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"Loss/train", "LearningRate", "GradNorm", "TokensPerSec", "Loss/val_text", "Loss/val_code"} <= tags
    assert [e.value for e in acc.Scalars("Loss/train")] == pytest.approx([r["loss"] for r in train_rows])


def test_evaluate_loss_is_the_mean_token_cross_entropy(data_dir):
    torch.manual_seed(0)
    model = MMRec100M(config=MMRecConfig(vocab_size=512, expert_dim=32, num_layers=1, num_heads=2, ffn_dim=64))
    model.train()
    data = TokenData(data_dir)
    got = evaluate_loss(model, data, "code", "code", batch_size=3, seq_len=16, max_batches=2)
    assert model.training
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for x, y in list(data.iter_eval_batches("code", 3, 16, 2)):
            logits = model(x, expert_type="code")
            total += F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").item()
            count += y.numel()
    assert got == pytest.approx(total / count, rel=1e-6)


def test_schedule_warms_up_then_decays_to_a_tenth():
    assert lr_factor(0, 10, 100) == pytest.approx(0.1)
    assert lr_factor(9, 10, 100) == pytest.approx(1.0)
    assert lr_factor(10, 10, 100) == pytest.approx(1.0)
    assert lr_factor(55, 10, 100) == pytest.approx(0.55)
    assert lr_factor(100, 10, 100) == pytest.approx(0.1)
    model = MMRec100M(config=MMRecConfig(vocab_size=300, expert_dim=16, num_layers=1, num_heads=2, ffn_dim=32))
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"])
    assert any(p is model.embedding.weight for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_resume_with_another_global_batch_is_noted(data_dir, tmp_path, capsys):
    train(data_dir, tmp_path / "a", "--stage", "stage1", "--max_steps", "4", "--checkpoint_interval", "2",
          "--eval_interval", "0")
    capsys.readouterr()
    train(data_dir, tmp_path / "a", "--stage", "stage1", "--max_steps", "4", "--eval_interval", "0",
          "--batch_size", "8", "--resume_from", str(tmp_path / "a" / "checkpoint_stage1_step_2.pt"))
    out = capsys.readouterr().out
    assert "changed settings: global batch 4 -> 8 (batch_size 4 x 1 -> 8 x 1 processes)" in out


# -- no host sync inside a step ------------------------------------------------------------------
def test_a_step_is_read_back_after_the_next_step_is_queued(data_dir, tmp_path, monkeypatch):
    """The loss and gradient norm of step k are read (a host sync) only once step k+1's forward and
    backward are queued, except where a checkpoint or evaluation needs them at once."""
    import types

    from mm_rec.training import loop
    from mm_rec.training.trainer import Trainer
    ticks = iter(range(1, 1000))
    monkeypatch.setattr(loop, "time", types.SimpleNamespace(perf_counter=lambda: float(next(ticks))))
    events = []
    train_step, read_back = Trainer._train_step, Trainer._read_back
    monkeypatch.setattr(Trainer, "_train_step",
                        lambda self, spec, step, *a: events.append(("run", step)) or train_step(self, spec, step, *a))
    monkeypatch.setattr(Trainer, "_read_back",
                        lambda self, spec, rec, *a, **k: events.append(("read", rec.step)) or read_back(self, spec, rec, *a, **k))
    train(data_dir, tmp_path, "--stage", "stage1", "--max_steps", "6", "--checkpoint_interval", "3",
          "--eval_interval", "0")
    assert events == [("run", 1), ("run", 2), ("read", 1), ("run", 3), ("read", 2), ("read", 3),  # 3 saves
                      ("run", 4), ("run", 5), ("read", 4), ("run", 6), ("read", 5), ("read", 6)]
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    # each step timed over its own iteration, whether read back late or at once (3, 6, and 4 right
    # after a save): with a clock that ticks once a reading, every step takes one tick
    assert [r["step_time_s"] for r in rows] == [1.0] * 6


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
def test_a_non_finite_step_changes_nothing_on_the_device(device):
    """The fused AdamW step given found_inf = 1 (a NaN loss) leaves weights, moments and step counts
    as they were; with a finite loss the same call updates them."""
    from mm_rec.training.optim import build_optimizer
    from mm_rec.training.step import train_step
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1)).to(device)
    opt = build_optimizer(model, 1e-2, 0.1)
    assert opt.defaults["fused"]

    def step(loss_scale):
        x = torch.randn(1, 8, 4, device=device)  # one micro-batch
        train_step(model, opt, x, x, lambda x, _: model(x).pow(2).mean() * loss_scale, clip_norm=1.0)
        opt.zero_grad(set_to_none=True)

    step(1.0)
    before = [p.detach().clone() for p in model.parameters()]
    state = {(i, k): v.clone() for i, p in enumerate(model.parameters()) for k, v in opt.state[p].items()}
    step(float("nan"))
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    after = {(i, k): v for i, p in enumerate(model.parameters()) for k, v in opt.state[p].items()}
    assert len(state) == 12 and all(torch.equal(state[k], after[k]) for k in state)
    step(1.0)
    assert not any(torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_fp16_checks_each_step_before_its_update_and_recovers(data_dir, tmp_path, monkeypatch, capsys):
    """fp16 (GradScaler) keeps the synchronous check: a NaN loss at step 3 is caught before its
    update, and the run rolls back to step 2's checkpoint and finishes."""
    from mm_rec.training.trainer import Trainer
    events = []
    read_back = Trainer._read_back
    monkeypatch.setattr(Trainer, "_read_back",
                        lambda self, spec, rec, *a, **k: events.append(rec.step) or read_back(self, spec, rec, *a, **k))
    monkeypatch.setenv("MMREC_INJECT_NAN_AT_STEP", "3")
    train(data_dir, tmp_path, "--stage", "stage1", "--max_steps", "4", "--checkpoint_interval", "2",
          "--eval_interval", "0", "--precision", "fp16")
    assert "recovered from" in capsys.readouterr().out
    assert events == [1, 2, 3, 4]  # each step read right after its own update, the NaN one never
    rows = read_metrics(tmp_path / "metrics.jsonl", type=None)
    assert [r["step"] for r in rows if r["type"] == "train"] == [1, 2, 3, 4]
    assert [r["step"] for r in rows if r["type"] == "recovery"] == [3]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
def test_a_step_record_reads_back_its_own_values(device):
    """A step's loss and gradient norm, copied to the host behind an event, read back as queued
    even when later work overwrites the tensors they came from."""
    from mm_rec.training.step import StepRecord
    loss = torch.tensor(2.5, device=device)
    norm = torch.tensor(float("nan"), device=device)
    record = StepRecord(7, loss, norm, 1e-3, None, 0.0)
    loss.add_(1.0)  # later work on the same stream
    values = record.values()
    assert values[0] == 2.5 and values[1] != values[1]  # NaN kept as NaN


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
def test_a_batch_goes_to_the_gpu_through_pinned_memory(device, monkeypatch):
    """On CUDA a batch is copied from pinned memory (a copy from pageable memory would first wait
    for the previous step's queued work); on the CPU it is left where it is."""
    import types

    from mm_rec.training.trainer import Trainer
    pinned = []
    pin = torch.Tensor.pin_memory
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda t: pinned.append(True) or pin(t))
    batch = torch.arange(12).reshape(3, 4)
    out = Trainer._to_device(types.SimpleNamespace(device=torch.device(device)), batch)
    assert out.device.type == device and torch.equal(out.cpu(), batch)
    assert pinned == ([True] if device == "cuda" else [])
