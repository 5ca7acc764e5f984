"""Rolling back after a non-finite step, on the run's own trajectory (guide §5.1, §7).

A run directory can hold checkpoints of several trajectories: a run resumed from step 5 of an
earlier run that had gone on to step 20, or a run recovered to an older step. Recovering from the
newest file in the directory would jump onto another trajectory, so every checkpoint records its
`run_id` (one per training process) and its `lineage`: the runs it descends from, each with the
(stage, step) where the next one branched off:

    [{"run_id": "A", "until": [0, 5]}, {"run_id": "B", "until": None}]   # B resumed A's step 5

A checkpoint belongs to the trajectory of a run at position (stage, step) when it was written by
one of its runs no later than that run's branch point (its own run: no later than the current
position). `Lineage.contains` says that; `RecoveryManager(..., accept=...)` only takes such ones.

`RecoveryManager` is the guide's `hooks["recovery"]` (re-exported by mm_rec.utils.monitoring);
`roll_back` is what the trainer does with it after a non-finite step.
"""
from __future__ import annotations

import logging
import os
import secrets
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch

from ..utils.errors import UserError
from ..utils.monitoring import LOGGER_NAME
from . import hints
from .checkpoint import newest_valid_checkpoint
from .optim import param_groups, rescale_schedule
from .stages import STAGE_NAMES, next_stage


class TrainingDiverged(UserError):
    """Non-finite steps that recovery could not get past. One line like any UserError, but exit
    status 1, not 2: it is no usage error, and recovery_protocol.sh retries it (at a lower LR)."""

    exit_code = 1


def new_run_id() -> str:
    """A run id that sorts by start time and differs between processes started together."""
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


def position(stage: str, step: int) -> tuple[int, int]:
    """A point of the whole schedule, ordered across stages."""
    return (STAGE_NAMES.index(stage) if stage in STAGE_NAMES else -1, int(step))


class Lineage:
    def __init__(self, segments: list[dict]):
        self.segments = segments

    @classmethod
    def start(cls, run_id: str, parent: dict | None = None) -> "Lineage":
        """The lineage of a new run: alone, or continuing the checkpoint state `parent`."""
        if parent is None:
            return cls([{"run_id": run_id, "until": None}])
        before = [dict(s) for s in (parent.get("lineage") or [{"run_id": parent.get("run_id"), "until": None}])]
        before[-1]["until"] = list(position(parent.get("stage"), parent.get("step", 0)))
        return cls(before + [{"run_id": run_id, "until": None}])

    @property
    def run_id(self) -> str:
        return self.segments[-1]["run_id"]

    def to_list(self) -> list[dict]:
        return [dict(s) for s in self.segments]

    def contains(self, state: dict, now: tuple[int, int]) -> bool:
        """Whether checkpoint `state` lies on this trajectory, at or before position `now`."""
        where = position(state.get("stage"), state.get("step", 0))
        if where > now:
            return False
        for segment in self.segments:
            if segment["run_id"] == state.get("run_id"):
                until = tuple(segment["until"]) if segment["until"] is not None else now
                if where <= until:
                    return True
        return False


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module under DDP/DataParallel (`.module`) and torch.compile (`._orig_mod`) wrappers."""
    wrappers = (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)
    while True:
        if isinstance(model, wrappers):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):
            model = model._orig_mod
        else:
            return model


def _strip_wrapper_prefixes(state_dict: dict) -> dict:
    """Keys saved from a wrapped model ("module.", "_orig_mod.") mapped to the plain model's keys."""
    out = {}
    for key, value in state_dict.items():
        for prefix in ("module.", "_orig_mod."):
            while key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out


def optimizer_param_names(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str | None]:
    """The model's name of each parameter of `optimizer`, in the order its state_dict numbers them
    (saved with each checkpoint, so the state can be mapped onto an optimizer grouped differently)."""
    names = {id(p): n for n, p in _unwrap(model).named_parameters()}
    return [names.get(id(p)) for group in optimizer.param_groups for p in group["params"]]


def _trainer_order(model: torch.nn.Module, saved: dict) -> list[str] | None:
    """For a trainer checkpoint saved without parameter names: its order, rebuilt from the
    trainer's grouping (optim.param_groups), when the group sizes agree."""
    groups = param_groups(_unwrap(model), 0.0)
    if [len(g["params"]) for g in saved.get("param_groups", [])] != [len(g["params"]) for g in groups]:
        return None
    names = {id(p): n for n, p in _unwrap(model).named_parameters()}
    return [names[id(p)] for g in groups for p in g["params"]]


def mapped_optimizer_state(model, optimizer, saved: dict, saved_names: list | None) -> dict | None:
    """`saved` (an optimizer state_dict) as it fits `optimizer`: loaded as is when both number the
    same parameters the same way (the trainer's own optimizer: its LR and schedule state come back
    too), else the per-parameter state matched by parameter name under `optimizer`'s own groups
    and hyperparameters. None when it cannot be matched."""
    ours = optimizer_param_names(model, optimizer)
    same_groups = ([len(g["params"]) for g in saved.get("param_groups", [])] ==
                   [len(g["params"]) for g in optimizer.param_groups])
    if saved_names is None:
        if same_groups:
            return saved  # the pre-names format: numbered like ours (load_state_dict checks the sizes)
        saved_names = _trainer_order(model, saved)
        if saved_names is None:
            return None
    if same_groups and list(saved_names) == ours:
        return saved
    index = {name: i for i, name in enumerate(saved_names) if name is not None}
    state, groups, i = {}, [], 0
    for group in optimizer.param_groups:
        entry = {k: v for k, v in group.items() if k != "params"}
        entry["params"] = []
        for name in (ours[j] for j in range(i, i + len(group["params"]))):
            old = index.get(name)
            if old is not None and old in saved.get("state", {}):
                state[i] = saved["state"][old]
            entry["params"].append(i)
            i += 1
        groups.append(entry)
    if not state and saved.get("state"):
        return None  # no parameter in common: not this model's optimizer
    return {"state": state, "param_groups": groups}


class RecoveryManager:
    """Roll back to the newest usable checkpoint and continue at a lower learning rate.

    `recover(model, optimizer=None, scheduler=None, accept=None) -> (success, checkpoint_path)`:
    1. gives up with (False, None) once `max_attempts` recoveries have been tried in this run;
    2. finds the newest checkpoint in `checkpoint_dir` that loads and holds only finite values
       (corrupt and non-finite files are skipped, each named in one warning line) and, when
       `accept(path, state)` is given, that it accepts (the trainer: its own lineage);
    3. loads its model weights, its optimizer state (mapped by parameter name onto an optimizer
       grouped otherwise, e.g. `AdamW(model.parameters())` on a trainer checkpoint; started afresh,
       with a one-line note, when nothing matches) and (if given and saved) scheduler state;
    4. sets the learning rate to `lr_factor` times the one in effect before the failure: the base LR
       (param_group "initial_lr", scheduler.base_lrs) becomes lr_factor x the current base, and the
       LR at the restored step follows. Measured against the current base rather than the
       checkpoint's, so two recoveries to the same checkpoint give 0.25x, not 0.5x twice.

    After a success: `lr_scale` is the cumulative factor of this run's recoveries (0.5, 0.25, ...),
    `last_state` the loaded checkpoint dict (step, rng, data_position ... for the trainer) and
    `history` the list of (checkpoint step, path). RNG and data position are left to the caller.
    """

    def __init__(self, checkpoint_dir: str | os.PathLike = "./checkpoints", max_attempts: int = 3,
                 lr_factor: float = 0.5, logger: logging.Logger | None = None):
        self.checkpoint_dir = Path(checkpoint_dir)
        self.max_attempts = int(max_attempts)
        self.lr_factor = float(lr_factor)
        self.log = logger or logging.getLogger(LOGGER_NAME)
        self.attempts = 0
        self.lr_scale = 1.0
        self.last_state: dict | None = None
        self.history: list[tuple[int | None, str]] = []

    def recover(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
                scheduler=None, accept=None) -> tuple[bool, str | None]:
        if self.attempts >= self.max_attempts:
            self.log.error("cannot recover: all %d recovery attempts of this run are used up", self.max_attempts)
            return False, None
        self.attempts += 1
        attempt = f"attempt {self.attempts}/{self.max_attempts}"

        def skipped(path, reason):
            self.log.warning("recovery skips %s: %s", path, reason)
        path, state = newest_valid_checkpoint(self.checkpoint_dir, accept=accept, on_skip=skipped)
        if path is None:
            self.log.error("cannot recover (%s): no usable checkpoint in %s", attempt, self.checkpoint_dir)
            return False, None

        # The base LR in effect now: the target is lr_factor times this, whatever the checkpoint holds.
        if optimizer is not None:
            current_base = [g.get("initial_lr", g["lr"]) for g in optimizer.param_groups]
        optimizer_state = None
        if optimizer is not None and state.get("optimizer_state_dict") is not None:
            optimizer_state = mapped_optimizer_state(model, optimizer, state["optimizer_state_dict"],
                                                     state.get("optimizer_param_names"))
        try:
            _unwrap(model).load_state_dict(_strip_wrapper_prefixes(state["model_state_dict"]))
            if optimizer_state is not None:
                optimizer.load_state_dict(optimizer_state)
            elif optimizer is not None:
                # Nothing to match the saved moments to: keep none of the failed trajectory's either.
                optimizer.state = defaultdict(dict)
                self.log.warning("optimizer state of %s does not match this optimizer's parameters; "
                                 "the optimizer starts afresh", path)
            if scheduler is not None and state.get("scheduler_state_dict") is not None:
                scheduler.load_state_dict(state["scheduler_state_dict"])
        except (ValueError, RuntimeError, KeyError) as e:
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            self.log.error("cannot recover (%s): checkpoint %s does not fit this model/optimizer: %s",
                           attempt, path, first_line)
            return False, None

        if optimizer is not None:
            loaded_base = [g.get("initial_lr", g["lr"]) for g in optimizer.param_groups]
            target_base = [base * self.lr_factor for base in current_base]
            ratios = [target / loaded if loaded > 0 else self.lr_factor
                      for target, loaded in zip(target_base, loaded_base)]
            rescale_schedule(optimizer, scheduler, ratios, bases=target_base)

        self.lr_scale *= self.lr_factor
        self.last_state = state
        step = state.get("step")
        self.history.append((step, str(path)))
        lr_text = "" if optimizer is None else f", lr now {optimizer.param_groups[0]['lr']:.3g}"
        self.log.warning("recovered from %s (step %s, %s): learning rate x%g (cumulative x%g)%s",
                         path, step, attempt, self.lr_factor, self.lr_scale, lr_text)
        return True, str(path)


@dataclass
class Rollback:
    """Where the trainer continues after a recovery."""
    path: str
    state: dict          # the checkpoint loaded into the model, optimizer and scheduler
    next_step: int
    restart_stage: bool  # the checkpoint ends the previous stage: the stage restarts (a new optimizer)


def roll_back(recovery: RecoveryManager, model, optimizer, scheduler, lineage: Lineage, stage: str, step: int,
              what: str, on_failure=lambda reason: None) -> Rollback:
    """Recover the trainer's run from the newest loadable checkpoint of its own trajectory up to
    (stage, step), where a non-finite `what` ("loss", "gradient norm") was found. Raises
    TrainingDiverged (after on_failure(reason)) when there is none, the attempts are used up, or
    the checkpoint cannot continue `stage`."""
    used_up = recovery.attempts >= recovery.max_attempts
    now = position(stage, step)  # only this run's own trajectory (not another run's newer files)
    ok, path = recovery.recover(model, optimizer, scheduler, accept=lambda _, state: lineage.contains(state, now))
    if not ok:
        reason = (f"all {recovery.max_attempts} recovery attempts are used up" if used_up else
                  f"no checkpoint of this run to recover from in {recovery.checkpoint_dir} (corrupt and "
                  f"non-finite ones are skipped)")
        on_failure(reason)
        raise TrainingDiverged(hints.diverged(what, step, stage, reason))
    state = recovery.last_state
    if state["stage"] == stage and not state.get("stage_completed"):
        return Rollback(path, state, int(state["step"]) + 1, restart_stage=False)
    if state.get("stage_completed") and next_stage(state["stage"]) == stage:
        return Rollback(path, state, 1, restart_stage=True)
    raise TrainingDiverged(hints.diverged_elsewhere(what, step, stage, path, state))


__all__ = ["RecoveryManager", "Lineage", "Rollback", "roll_back", "TrainingDiverged", "new_run_id", "position", "optimizer_param_names",
           "mapped_optimizer_state"]
