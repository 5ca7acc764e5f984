"""What a run continues from: the stages to train and the state a checkpoint brings back.

    plan = plan_stages(cfg, state)            # [(stage, checkpoint state it continues, or None)]
    restore_training_state(state, optimizer, scheduler, scaler, lr_scale)

A checkpoint continues its own stage mid-way (at step + 1) when that stage is wanted, or is where
the next stage starts from; anything else is refused before a file is written, with the flags
that would work (hints.py).
"""
from __future__ import annotations

from ..model.config import MMRecConfig
from ..utils.errors import UserError
from . import hints
from .checkpoint import set_rng_state
from .config import TrainConfig
from .optim import rescale_schedule
from .stages import STAGE_NAMES

# Settings whose change on resume is worth a note (they change the rest of the schedule).
SCHEDULE_SETTINGS = ("seq_len", "max_steps", "learning_rate", "warmup_steps", "grad_accum_steps", "seed", "preset")


def plan_stages(cfg: TrainConfig, state: dict | None, note=print) -> list[tuple[str, dict | None]]:
    """The stages to run, each with the checkpoint state it continues from (mid-stage) or None."""
    wanted = cfg.stages()
    if state is None:
        return [(name, None) for name in wanted]
    ck_stage, ck_step, done = state.get("stage"), int(state.get("step", 0)), bool(state.get("stage_completed"))
    if ck_stage not in STAGE_NAMES:
        raise UserError(f"checkpoint {cfg.resume_from} names no known stage ({ck_stage!r})")
    ck_index = STAGE_NAMES.index(ck_stage)
    if cfg.stage == "all":
        wanted = list(STAGE_NAMES[ck_index + 1 if done else ck_index:])
        if not wanted:
            note(f"All stages are complete in {cfg.resume_from}; nothing to train.")
            return []
    first = STAGE_NAMES.index(wanted[0])
    if first < ck_index or (first == ck_index and done):
        raise UserError(hints.cannot_resume_stage(cfg.resume_from, ck_stage, ck_step, done, wanted[0]))
    if first == ck_index:  # mid-stage: continue at ck_step + 1
        return [(wanted[0], state)] + [(name, None) for name in wanted[1:]]
    if not done:
        note(f"note: {ck_stage} stopped at step {ck_step} before its end; {wanted[0]} starts from those weights")
    return [(name, None) for name in wanted]


def check_same_model(state: dict, config: MMRecConfig, path) -> None:
    """Refuse a checkpoint of another model size, naming the flags that resume it."""
    saved = state.get("config")
    if not isinstance(saved, dict):
        raise UserError(f"checkpoint {path} has no model config; it is not an MM-Rec training checkpoint")
    ours = config.arch_dict()
    theirs = {k: saved.get(k) for k in ours}
    if isinstance(theirs.get("expert_names"), (list, tuple)):
        theirs["expert_names"] = list(theirs["expert_names"])
    ours["expert_names"] = list(ours["expert_names"])
    diff = [k for k in ours if theirs[k] != ours[k]]
    if "expert_dim" in diff and "mdi_dim" in diff:  # mdi_dim follows expert_dim (d / 4): no flag of its own
        diff.remove("mdi_dim")
    if diff:
        raise UserError(hints.other_model(path, theirs, ours, diff, (state.get("train_args") or {}).get("preset")))


def stage_lr_scale(cfg: TrainConfig, resume: dict | None) -> tuple[float, float]:
    """(the stage's learning-rate scale, the checkpoint's): --lr_scale if given; else a mid-stage
    resume keeps the checkpoint's scale (halved by any recovery) and a new stage starts at 1."""
    saved = float(resume.get("lr_scale", 1.0)) if resume is not None else 1.0
    return (cfg.lr_scale if cfg.lr_scale is not None else saved), saved


def restore_training_state(state: dict, optimizer, scheduler, scaler, rescale: float = 1.0) -> None:
    """Optimizer, schedule, RNG and loss-scaler states of a checkpoint; `rescale` (--lr_scale over
    the checkpoint's scale) moves the schedule's learning rate."""
    optimizer.load_state_dict(state["optimizer_state_dict"])
    scheduler.load_state_dict(state["scheduler_state_dict"])
    if rescale != 1.0:
        rescale_schedule(optimizer, scheduler, [rescale] * len(optimizer.param_groups))
    restore_rng_and_scaler(state, scaler)


def restore_rng_and_scaler(state: dict, scaler) -> None:
    if "rng" in state:
        set_rng_state(state["rng"])
    if state.get("scaler_state_dict") and scaler.is_enabled():
        scaler.load_state_dict(state["scaler_state_dict"])


def schedule_changes(cfg: TrainConfig, state: dict, world_size: int) -> list[str]:
    """The schedule settings a resume changes against the checkpoint's run ("seq_len 512 -> 256")."""
    before = state.get("train_args") or {}
    changed = [f"{k} {before[k]} -> {getattr(cfg, k)}" for k in SCHEDULE_SETTINGS
               if k in before and before[k] != getattr(cfg, k)]
    # --batch_size is per process: what matters is the global batch (a resume on another number of
    # GPUs that keeps it trains on the same batches).
    b_then, b_now = before.get("batch_size"), cfg.batch_size
    w_then = int(state.get("world_size", 1))
    if b_then is not None and b_now is not None and b_then * w_then != b_now * world_size:
        changed.insert(0, f"global batch {b_then * w_then} -> {b_now * world_size} "
                          f"(batch_size {b_then} x {w_then} -> {b_now} x {world_size} processes)")
    return changed


__all__ = ["plan_stages", "check_same_model", "stage_lr_scale", "restore_training_state", "restore_rng_and_scaler",
           "schedule_changes"]
