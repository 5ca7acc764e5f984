"""The trainer's one-line messages that tell the user which flags to pass next.

Each returns the text; the caller raises or prints it. Kept together so that a flag renamed in
config.py is renamed in every hint at once.
"""
from __future__ import annotations

import shlex

from .config import MODEL_FLAGS
from .stages import next_stage


def other_model(path, saved: dict, ours: dict, diff: list[str], preset: str | None) -> str:
    """A checkpoint of another model size: the flags (--preset, --vocab_size X, ...) that resume it."""
    shown = ", ".join(f"{k}={saved[k]} (flags: {ours[k]})" for k in diff)
    flags = " ".join(f"--{k} {saved[k]}" for k in diff if k in MODEL_FLAGS)
    hint = " ".join(h for h in (f"--preset {preset}" if preset else "", flags) if h)
    return f"checkpoint {path} is of another model: {shown}; resume it with {hint or 'the model flags it was trained with'}"


def cannot_resume_stage(path, stage: str, step: int, done: bool, wanted: str) -> str:
    hint = f"--stage {next_stage(stage)}" if next_stage(stage) else "a stage3 run from scratch"
    return (f"checkpoint {path} is from {stage} (step {step}{', completed' if done else ''}); "
            f"it cannot resume {wanted}: use {hint} or --stage all")


def diverged(what: str, step: int, stage: str, reason: str) -> str:
    return (f"non-finite {what} at step {step} of {stage} and {reason}; existing checkpoints are untouched "
            f"(try a lower --learning_rate or --lr_scale)")


def diverged_elsewhere(what: str, step: int, stage: str, path, state: dict) -> str:
    """The newest checkpoint of the run is of another stage: only an explicit resume continues."""
    done = ", completed" if state.get("stage_completed") else ""
    return (f"non-finite {what} at step {step} of {stage}: the newest checkpoint of this run, {path} "
            f"({state['stage']} step {state['step']}{done}), cannot continue {stage}; "
            f"resume explicitly with --resume_from")


def interrupted(stage: str, step: int, shown_path: str) -> str:
    return (f"interrupted: {stage} step {step} is saved in {shown_path}; continue with the same "
            f"flags (less --overwrite) and --resume_from {shlex.quote(shown_path)}")


def changed_settings(stage: str, changed: list[str]) -> str:
    return f"note: resuming {stage} with changed settings: {', '.join(changed)}"


__all__ = ["other_model", "cannot_resume_stage", "diverged", "diverged_elsewhere", "interrupted", "changed_settings"]
