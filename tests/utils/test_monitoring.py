"""Unit tests of mm_rec.utils.monitoring: the stability monitor, the memory-norm hook and recovery."""
import logging
import math

import pytest
import torch

from mm_rec.model import MMRec100M
from mm_rec.training.checkpoint import checkpoint_name, load_checkpoint, save_checkpoint
from mm_rec.utils.errors import UserError
from mm_rec.utils.monitoring import (MemoryNormHook, RecoveryManager, StabilityMonitor, corrupt_checkpoint,
                                     create_monitoring_hooks)

LOGGER = "mm_rec.monitoring"


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return MMRec100M(vocab_size=300, expert_dim=16, num_layers=2, num_heads=2, ffn_dim=32)


# -- create_monitoring_hooks ---------------------------------------------------------------------
def test_create_monitoring_hooks_returns_the_guides_three_hooks(tmp_path):
    hooks = create_monitoring_hooks(tiny_model(), checkpoint_dir=tmp_path, max_attempts=2, lr_factor=0.25,
                                    failure_threshold=5)
    assert set(hooks) == {"stability_monitor", "memory_hook", "recovery"}
    assert isinstance(hooks["stability_monitor"], StabilityMonitor)
    assert hooks["stability_monitor"].failure_threshold == 5
    assert isinstance(hooks["memory_hook"], MemoryNormHook)
    assert isinstance(hooks["recovery"], RecoveryManager)
    assert (hooks["recovery"].max_attempts, hooks["recovery"].lr_factor) == (2, 0.25)
    assert hooks["recovery"].checkpoint_dir == tmp_path


# -- StabilityMonitor ----------------------------------------------------------------------------
@pytest.mark.parametrize("value, finite", [
    (torch.randn(2, 3, 5), True),
    (torch.tensor(1.5), True),            # 0-dim, like a loss
    (2.0, True),
    (torch.tensor(float("nan")), False),
    (torch.tensor([1.0, float("inf")]), False),
    (torch.tensor([[0.0, -float("inf")]]), False),
    (float("nan"), False),
    (float("inf"), False),
    (torch.tensor([1, 2, 3]), True),      # integers cannot be non-finite
])
def test_check_outputs_detects_nan_and_inf(value, finite):
    monitor = StabilityMonitor()
    assert monitor.check_outputs({"loss": torch.tensor(0.5), "x": value}, step=3) is finite
    assert monitor.last_bad_keys == ([] if finite else ["x"])
    assert monitor.total_failures == (0 if finite else 1)


def test_check_outputs_counts_consecutive_failures_and_logs_the_threshold_once(caplog):
    monitor = StabilityMonitor(failure_threshold=3)
    nan = {"loss": float("nan"), "grad_norm": torch.tensor(1.0)}
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert not monitor.check_outputs(nan, 1)
        assert not monitor.check_outputs(nan, 2)
        assert [r for r in caplog.records if r.levelno == logging.ERROR] == []
        assert not monitor.check_outputs(nan, 3)
        assert not monitor.check_outputs(nan, 4)
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "3 consecutive" in errors[0] and "step 3" in errors[0]
    assert (monitor.consecutive_failures, monitor.total_failures) == (4, 4)
    assert monitor.last_bad_keys == ["loss"] and monitor.last_bad_step == 4

    assert monitor.check_outputs({"loss": 1.0}, 5)
    assert (monitor.consecutive_failures, monitor.total_failures) == (0, 4)
    assert not monitor.check_outputs(nan, 6)
    assert monitor.consecutive_failures == 1


# -- MemoryNormHook ------------------------------------------------------------------------------
def test_memory_hook_matches_norms_computed_by_hand():
    model = tiny_model()
    ids = torch.randint(0, 300, (3, 12))
    _, states = model(ids, return_memory=True)
    norms = MemoryNormHook()(states, step=0)

    by_hand = {}
    for expert in ("text", "code"):
        for i, layer in enumerate(states[expert]):
            h, M = layer["h"].detach().double(), layer["M"].detach().double()
            assert h.shape == (3, 16) and M.shape == (3, 2, 8, 8)
            # the RMS of each sample's elements, averaged over the batch
            by_hand[f"{expert}/layer_{i}/h"] = sum(math.sqrt((h[b] ** 2).mean().item()) for b in range(3)) / 3
            by_hand[f"{expert}/layer_{i}/M"] = sum(math.sqrt((M[b] ** 2).mean().item()) for b in range(3)) / 3
    for key, value in by_hand.items():
        assert norms[key] == pytest.approx(value, rel=1e-5), key
    for prefix, experts in (("text", ["text"]), ("code", ["code"]), ("all", ["text", "code"])):
        for name in ("h", "M"):
            vals = [by_hand[f"{e}/layer_{i}/{name}"] for e in experts for i in range(2)]
            assert norms[f"{prefix}/{name}_mean"] == pytest.approx(sum(vals) / len(vals), rel=1e-5)
            assert norms[f"{prefix}/{name}_max"] == pytest.approx(max(vals), rel=1e-5)
    assert len(norms) == 8 + 12
    assert all(isinstance(v, float) for v in norms.values())


def test_memory_hook_handles_a_single_expert_and_keeps_last():
    model = tiny_model()
    _, states = model(torch.randint(0, 300, (2, 5)), expert_type="code", return_memory=True)
    hook = MemoryNormHook()
    norms = hook(states, step=7)
    assert set(states) == {"code"}
    assert not any(k.startswith("text/") for k in norms)
    assert norms["all/h_max"] == norms["code/h_max"] > 0
    assert hook.last == norms
    assert hook(None, step=8) == {} and hook.last == {}


def test_memory_hook_warns_outside_the_thresholds(caplog):
    hook = MemoryNormHook(high=100.0, low=1e-3)  # the guide's §5.4 limits (the defaults are wider: see below)
    states = {"text": [{"h": torch.full((2, 4), 200.0), "M": torch.full((2, 1, 2, 2), 0.1)},   # rms(h) = 200
                       {"h": torch.full((2, 4), 1.0), "M": torch.zeros(2, 1, 2, 2)}]}          # rms(M) = 0
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        norms = hook(states, step=11)
    assert norms["text/layer_0/h"] == pytest.approx(200.0)
    assert norms["text/layer_1/M"] == 0.0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "step 11" in warnings[0] and "text/layer_0/h" in warnings[0] and "text/layer_1/M" in warnings[0]
    assert "text/layer_0/M" not in warnings[0] and "text/layer_1/h" not in warnings[0]

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        MemoryNormHook(high=1000.0, low=0.0)(states, step=12)
    assert caplog.records == []

    # Still outside at the next call: no repeat. Just inside (rms(h) = 90), then out: no repeat either.
    # Well inside (rms(h) = 2, rms(M) = 0.1), then out again: warned anew.
    inside = {"text": [{"h": torch.full((2, 4), 2.0), "M": torch.full((2, 1, 2, 2), 0.1)}] * 2}
    near = {"text": [{"h": torch.full((2, 4), 90.0), "M": torch.full((2, 1, 2, 2), 0.1)},
                     {"h": torch.full((2, 4), 1.0), "M": torch.zeros(2, 1, 2, 2)}]}
    for step, s, expect in [(13, states, []), (14, near, []), (15, states, []), (16, inside, []),
                            (17, states, ["text/layer_0/h", "text/layer_1/M"])]:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger=LOGGER):
            assert hook(s, step=step)["text/layer_0/h"] == pytest.approx({id(states): 200.0, id(near): 90.0,
                                                                          id(inside): 2.0}[id(s)])
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == (1 if expect else 0)
        assert all(k in warnings[0] for k in expect) if expect else True


# -- RecoveryManager -----------------------------------------------------------------------------
BASE_LR = 1e-3
WARMUP = 10


def make_training(seed=0):
    model = tiny_model(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=BASE_LR, weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / WARMUP))
    return model, optimizer, scheduler


def train_and_save(model, optimizer, scheduler, ckpt_dir, save_at=(3, 6)):
    """A few real AdamW steps; a checkpoint (the trainer's dict format) at each step in save_at."""
    torch.manual_seed(1)
    saved = {}
    for step in range(1, max(save_at) + 1):
        ids = torch.randint(0, 300, (2, 8))
        loss = torch.nn.functional.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        if step in save_at:
            path = ckpt_dir / checkpoint_name("stage1", step)
            save_checkpoint({"model_state_dict": model.state_dict(), "optimizer_state_dict": optimizer.state_dict(),
                             "scheduler_state_dict": scheduler.state_dict(), "step": step, "loss": loss.item(),
                             "stage": "stage1", "config": model.config.to_dict()}, path)
            saved[step] = (path, {k: v.clone() for k, v in model.state_dict().items()},
                           optimizer.param_groups[0]["lr"])
    return saved


def perturb(model):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p)).mul_(float("nan") if p.dim() == 2 else 1.0)


def assert_weights_equal(model, reference):
    for k, v in model.state_dict().items():
        assert torch.equal(v, reference[k]), k


def test_recover_restores_the_newest_checkpoint_and_halves_the_lr(tmp_path, caplog):
    model, optimizer, scheduler = make_training()
    saved = train_and_save(model, optimizer, scheduler, tmp_path)
    path6, weights6, lr6 = saved[6]
    assert lr6 == pytest.approx(BASE_LR * 7 / WARMUP)
    perturb(model)
    for _ in range(2):  # the run went on after the checkpoint: the schedule moved too
        scheduler.step()

    recovery = RecoveryManager(tmp_path)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        success, path = recovery.recover(model, optimizer, scheduler)
    assert (success, path) == (True, str(path6))
    assert_weights_equal(model, weights6)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.5 * lr6)
    assert scheduler.base_lrs == [pytest.approx(0.5 * BASE_LR)]
    assert scheduler.last_epoch == 6 and scheduler.get_last_lr() == [pytest.approx(0.5 * lr6)]
    assert recovery.lr_scale == 0.5 and recovery.attempts == 1
    assert recovery.last_state["step"] == 6 and recovery.history == [(6, str(path6))]
    assert any("recover" in r.getMessage() and str(path6) in r.getMessage() for r in caplog.records)

    # The halving survives the schedule: the next scheduled LR is half the un-recovered one.
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.5 * BASE_LR * 8 / WARMUP)
    # Optimizer moments are the checkpoint's: one more step from here is well defined and finite.
    ids = torch.randint(0, 300, (2, 8))
    model(ids).sum().backward()
    optimizer.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_recover_skips_a_corrupt_newest_checkpoint(tmp_path):
    model, optimizer, scheduler = make_training()
    saved = train_and_save(model, optimizer, scheduler, tmp_path)
    corrupt_checkpoint(saved[6][0])
    with pytest.raises(UserError, match="corrupt"):
        load_checkpoint(saved[6][0])
    perturb(model)

    recovery = RecoveryManager(tmp_path)
    success, path = recovery.recover(model, optimizer, scheduler)
    path3, weights3, lr3 = saved[3]
    assert (success, path) == (True, str(path3))
    assert_weights_equal(model, weights3)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.5 * lr3)
    assert saved[6][0].exists()  # recovery leaves the damaged file for the operator to inspect


def test_recover_gives_up_after_max_attempts_and_lr_keeps_falling(tmp_path, caplog):
    model, optimizer, scheduler = make_training()
    saved = train_and_save(model, optimizer, scheduler, tmp_path, save_at=(4,))
    lr4 = saved[4][2]
    recovery = RecoveryManager(tmp_path, max_attempts=3)
    for attempt in (1, 2, 3):  # the same checkpoint each time: 0.5, 0.25, 0.125 of its LR
        perturb(model)
        assert recovery.recover(model, optimizer, scheduler) == (True, str(saved[4][0]))
        assert optimizer.param_groups[0]["lr"] == pytest.approx(lr4 * 0.5 ** attempt)
        assert recovery.lr_scale == 0.5 ** attempt
    perturb(model)
    with caplog.at_level(logging.ERROR, logger=LOGGER):
        assert recovery.recover(model, optimizer, scheduler) == (False, None)
    assert recovery.attempts == 3
    assert any("3 recovery attempts" in r.getMessage() for r in caplog.records)
    assert not all(torch.isfinite(p).all() for p in model.parameters())  # nothing was loaded
    load_checkpoint(saved[4][0])  # and the checkpoint is untouched


def test_recover_without_checkpoints_or_with_only_corrupt_ones_fails(tmp_path):
    model, optimizer, _ = make_training()
    assert RecoveryManager(tmp_path / "missing").recover(model, optimizer) == (False, None)
    (tmp_path / checkpoint_name("stage1", 5)).write_bytes(b"not a checkpoint")
    lr_before = optimizer.param_groups[0]["lr"]
    recovery = RecoveryManager(tmp_path)
    assert recovery.recover(model, optimizer) == (False, None)
    assert recovery.attempts == 1 and recovery.lr_scale == 1.0
    assert optimizer.param_groups[0]["lr"] == lr_before


def test_recover_with_an_unmatchable_optimizer_restores_the_weights_and_starts_it_afresh(tmp_path, caplog):
    # A checkpoint without parameter names, whose single group cannot be matched to these two:
    # the weights come back, the optimizer's moments start afresh (one line says so), LR halved.
    model, optimizer, scheduler = make_training()
    saved = train_and_save(model, optimizer, scheduler, tmp_path, save_at=(2,))
    other = torch.optim.AdamW([{"params": list(model.parameters())[:3]},
                               {"params": list(model.parameters())[3:]}], lr=BASE_LR)
    other.state[next(model.parameters())]["exp_avg"] = torch.full((1,), float("nan"))  # the diverged run's
    perturb(model)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert RecoveryManager(tmp_path).recover(model, other) == (True, str(saved[2][0]))
    assert_weights_equal(model, saved[2][1])
    assert len(other.state) == 0
    assert [g["lr"] for g in other.param_groups] == pytest.approx([BASE_LR / 2] * 2)
    assert sum("the optimizer starts afresh" in r.getMessage() for r in caplog.records) == 1


def test_recover_unwraps_a_wrapped_model_and_works_without_scheduler(tmp_path):
    model, optimizer, scheduler = make_training()
    saved = train_and_save(model, optimizer, scheduler, tmp_path, save_at=(2,))
    plain_opt = torch.optim.SGD(model.parameters(), lr=0.1)  # no scheduler, no initial_lr
    save_checkpoint({"model_state_dict": model.state_dict(), "optimizer_state_dict": plain_opt.state_dict(),
                     "step": 2}, tmp_path / checkpoint_name("stage1", 2))
    perturb(model)
    wrapped = torch.nn.DataParallel(model)
    assert RecoveryManager(tmp_path).recover(wrapped, plain_opt) == (True, str(saved[2][0]))
    assert_weights_equal(model, saved[2][1])
    assert plain_opt.param_groups[0]["lr"] == pytest.approx(0.05)


def test_corrupt_checkpoint_breaks_loading_but_keeps_the_name(tmp_path):
    path = save_checkpoint({"model_state_dict": {"w": torch.ones(1000)}, "step": 1},
                           tmp_path / checkpoint_name("stage2", 1))
    size = path.stat().st_size
    assert load_checkpoint(path)["step"] == 1
    corrupt_checkpoint(path)
    assert path.exists() and path.stat().st_size < size
    with pytest.raises(UserError):
        load_checkpoint(path)


# -- healthy runs are quiet, real trouble is not ----------------------------------------------------
def test_memory_hook_defaults_accept_healthy_states_and_flag_exploded_dead_or_nan_ones(caplog):
    model = tiny_model()
    _, states = model(torch.randint(0, 300, (2, 64)), return_memory=True)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        MemoryNormHook()(states, step=1)
    assert caplog.records == []
    # exploded (M is ~0.05 in this toy model, ~0.4-2 in the 100M one), dead, NaN
    for name, change in (("h", lambda t: t * 1e4), ("M", lambda t: t * 1e6), ("h", lambda t: t * 0.0),
                         ("M", lambda t: t * float("nan"))):
        bad = {e: [dict(layer) for layer in layers] for e, layers in states.items()}
        bad["code"][1][name] = change(bad["code"][1][name])
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger=LOGGER):
            MemoryNormHook()(bad, step=2)
        warnings = [r.getMessage() for r in caplog.records]
        assert len(warnings) == 1 and f"code/layer_1/{name}" in warnings[0], (name, warnings)


@pytest.mark.slow
def test_the_100m_model_at_step_1_gives_no_warning(caplog):
    """Issue 26: at initialisation the 100M model's memory norms (Frobenius ~130 h, ~180 M) were
    above the limit, and every run opened with "Large gradient norm 18-25 at step 1"."""
    from mm_rec.model import MMRecConfig
    from mm_rec.utils.monitoring import GradNormWatch
    torch.manual_seed(1337)
    model = MMRec100M(config=MMRecConfig())
    ids = torch.randint(0, 32000, (1, 33))
    loss, states = model.loss(ids[:, :-1], ids[:, 1:], return_memory=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0).item()
    old_scale = max(s["h"].detach().norm(dim=-1).mean().item() for layers in states.values() for s in layers)
    assert old_scale > 10 and grad_norm > 10  # what the old checks (limits 100 and 10) warned on, or near it
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        norms = MemoryNormHook()(states, step=1)
        assert GradNormWatch().check(grad_norm, step=1) is None
        assert StabilityMonitor().check_outputs({"loss": loss, "grad_norm": grad_norm}, 1)
    assert caplog.records == []
    assert 0.1 < norms["all/h_mean"] < 20 and 0.1 < norms["all/M_mean"] < 20  # order one, as the guide says


def test_grad_norm_watch_warns_on_spikes_not_on_high_or_falling_norms(caplog):
    from mm_rec.utils.monitoring import GradNormWatch
    watch = GradNormWatch()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        # the 100M model's opening: large norms that fall as it learns
        assert all(watch.check(25.0 - 0.2 * s, s) is None for s in range(1, 80))
        assert watch.check(float("nan"), 80) is None  # the stability monitor's to report
        assert watch.check(9.0 * watch.typical(), 81) is None
        spike = watch.check(1000.0, 82)
        assert spike and "step 82" in spike and "median" in spike
        assert watch.check(1000.0, 90) is None  # one warning per 50 steps
    assert [r.getMessage() for r in caplog.records] == [spike]


def test_monitoring_imports_no_training_module_until_recovery_is_used():
    """utils sits below training: importing mm_rec.utils.monitoring loads no mm_rec.training module;
    RecoveryManager (which restores training checkpoints) is still importable from it, the guide's path."""
    import subprocess
    import sys
    code = ("import sys; import mm_rec.utils.monitoring as m; "
            "assert not [k for k in sys.modules if k.startswith('mm_rec.training')]; "
            "from mm_rec.utils.monitoring import RecoveryManager; "
            "from mm_rec.training.recovery import RecoveryManager as R; assert RecoveryManager is R; "
            "assert type(m.create_monitoring_hooks(None)['recovery']) is R")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
