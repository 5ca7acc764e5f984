"""What guards a run's quality: the data-epochs report, the best checkpoint and early stopping.

Epochs. At the start of each stage one line per domain and expert: the tokens the stage will
consume, the tokens the training split holds, and their ratio, the epochs. Above
`EPOCH_WARNING` (4) epochs a warning says what to do. Four, because repeated tokens are worth
about as much as new ones up to ~4 epochs and lose their value fast beyond (Muennighoff et al.,
"Scaling Data-Constrained Language Models", 2023); the bundled corpus under the 100M schedule is
shown its code 28 times in Stage 2, and its validation loss rises from step 3000 (issue 20).

Best checkpoint. The score of an evaluation is the mean validation loss over the domains the stage
evaluates (Stage 2: the text expert on text and the code expert on code; Stages 1 and 3: the model
on both), so the choice weighs both experts equally whatever their data sizes. A lower score than
every earlier evaluation of the stage is saved as the checkpoint of that step and hard-linked as
`checkpoint_{stage}_best.pt` (a copy where links are not supported). The name does not match the
`checkpoint_{stage}_step_{N}.pt` pattern that --keep_last prunes and recovery scans, so it stays
whatever is pruned; it is an ordinary checkpoint, so evaluate, generate, export and --resume_from
take it.

Early stopping (--early_stopping_patience N, off by default). After N evaluations in a row whose
score is not below the best by at least --early_stopping_min_delta, the stage ends: the best
weights are loaded back and saved as the stage's final, completed checkpoint (at the step where
it stopped), from which the next stage starts. Off by default because the guide's commands chain
the stages by the final checkpoint's name (checkpoint_stage1_step_5000.pt, ...), which a stopped
stage would not write; the best checkpoint and the epochs warning stand guard instead.
"""
from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..data.prepare import DOMAINS
from ..utils.fileio import disk_error

EPOCH_WARNING = 4.0


def best_checkpoint_name(stage: str) -> str:
    return f"checkpoint_{stage}_best.pt"


# -- epochs ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DataUse:
    domain: str
    expert: str          # "text", "code" or "both"
    consumed: int        # tokens the stage reads from the domain
    held: int            # tokens of the domain's training split

    @property
    def epochs(self) -> float:
        return self.consumed / self.held if self.held else math.inf


def stage_data_use(spec, global_batch: int, grad_accum: int, held: dict[str, int]) -> list[DataUse]:
    """Tokens per domain that the stage `spec` consumes over its max_steps, with `global_batch`
    sequences per micro-batch (batch_size x processes) and `grad_accum` micro-batches per step.

    Mixed stages give each domain every other row of a batch (data/loader.py, domains_for_rows),
    so half the tokens; Stage 2 alternates whole steps (text on odd steps, code on even ones)."""
    per_step = global_batch * grad_accum * spec.seq_len
    out = []
    for domain in DOMAINS:
        if spec.data == "alternate":
            steps = (spec.max_steps + 1) // 2 if domain == "text" else spec.max_steps // 2
            consumed, expert = steps * per_step, domain
        else:
            consumed, expert = spec.max_steps * per_step // 2, "both"  # an odd row alternates: half on average
        out.append(DataUse(domain, expert, consumed, held.get(domain, 0)))
    return out


def _count(n: int) -> str:
    return f"{n / 1e6:,.1f}M" if n >= 1e6 else f"{n / 1e3:,.1f}K" if n >= 1e3 else str(n)


def epochs_report(stage: str, uses: list[DataUse], max_steps: int) -> list[str]:
    """The report's lines: one per domain, then a warning if any domain is above EPOCH_WARNING epochs."""
    lines = []
    for u in uses:
        who = "both experts" if u.expert == "both" else f"the {u.expert} expert"
        lines.append(f"data: {stage} feeds {who} {_count(u.consumed)} {u.domain} tokens; the training data "
                     f"holds {_count(u.held)}: {u.epochs:.2g} epochs")
    over = [u for u in uses if u.epochs > EPOCH_WARNING]
    if over:
        worst = max(u.epochs for u in over)
        fewer = max(1, int(max_steps * EPOCH_WARNING / worst))
        shown = " and ".join(f"the {u.domain} data {u.epochs:.0f} times" for u in over)
        domains = "/".join(u.domain for u in over)
        lines.append(f"⚠️ {stage} shows {shown} (more than {EPOCH_WARNING:g} epochs): the model will memorise it "
                     f"rather than learn. Bring more {domains}: python -m mm_rec.scripts.prepare_data --text SOURCE... "
                     f"--code SOURCE... --out DIR with more sources, then --data_dir DIR; or train fewer steps "
                     f"(--max_steps {fewer} keeps {stage} within {EPOCH_WARNING:g} epochs)")
    return lines


# -- best checkpoint and early stopping -------------------------------------------------------------
@dataclass
class Verdict:
    score: float
    improved: bool     # a new best: keep this step's checkpoint as the best
    stop: bool         # early stopping: the stage ends here


class BestTracker:
    """Per stage: the best evaluation score and how many evaluations have passed without a
    significant improvement. `state_dict()` goes into every checkpoint, so a resumed stage keeps
    counting where it was."""

    def __init__(self, stage: str, patience: int = 0, min_delta: float = 0.0, state: dict | None = None):
        self.stage, self.patience, self.min_delta = stage, int(patience), float(min_delta)
        self.best, self.best_step, self.bad_evals = math.inf, None, 0
        if state and state.get("stage") == stage:
            self.best = float(state.get("best", math.inf))
            self.best_step = state.get("best_step")
            self.bad_evals = int(state.get("bad_evals", 0))

    @staticmethod
    def score(losses: dict[str, float]) -> float:
        """The mean of the stage's validation losses (NaN if any is not finite)."""
        values = list(losses.values())
        return sum(values) / len(values) if values and all(math.isfinite(v) for v in values) else math.nan

    def update(self, step: int, losses: dict[str, float]) -> Verdict:
        score = self.score(losses)
        significant = math.isfinite(score) and score < self.best - self.min_delta
        improved = math.isfinite(score) and score < self.best
        self.bad_evals = 0 if significant else self.bad_evals + 1
        if improved:
            self.best, self.best_step = score, step
        stop = self.patience > 0 and self.bad_evals >= self.patience and self.best_step is not None
        return Verdict(score, improved, stop)

    def state_dict(self) -> dict:
        return {"stage": self.stage, "best": self.best, "best_step": self.best_step, "bad_evals": self.bad_evals}


def keep_as_best(checkpoint: Path, stage: str) -> Path:
    """Make `checkpoint` the stage's best: a hard link (no copy of a 1 GB file) named
    best_checkpoint_name(stage) beside it, replaced atomically; a copy where links fail."""
    checkpoint = Path(checkpoint)
    best = checkpoint.parent / best_checkpoint_name(stage)
    tmp = checkpoint.parent / f".{best.name}.{os.getpid()}.tmp"
    tmp.unlink(missing_ok=True)
    try:
        try:
            os.link(checkpoint, tmp)
        except OSError:
            shutil.copyfile(checkpoint, tmp)
        os.replace(tmp, best)
    except OSError as e:
        raise disk_error(e, best, "keep the best checkpoint") or e
    finally:
        tmp.unlink(missing_ok=True)
    return best


def checkpoints_kept(max_steps: int, interval: int, keep_last: int) -> int:
    """How many checkpoint files a stage leaves at most: the numbered ones --keep_last keeps (the
    final one among them) and the best one."""
    saved = max(1, -(-max_steps // max(interval, 1)))
    return (saved if keep_last <= 0 else min(saved, keep_last)) + 1


def disk_warning(directory: Path, checkpoint_bytes: int, files: int) -> str | None:
    """One line when the run's checkpoints will not fit on the disk of `directory`, else None.
    The guide's schedule saves 150 times: with every file kept, 170 GB at 100M parameters."""
    try:
        free = shutil.disk_usage(directory).free
    except OSError:
        return None
    need = checkpoint_bytes * files
    if need <= free:
        return None
    gb = lambda n: f"{n / 1e9:.1f} GB"
    return (f"⚠️ this run keeps up to {files} checkpoints of {gb(checkpoint_bytes)} ({gb(need)}), but {directory} "
            f"has {gb(free)} free: pass a smaller --keep_last, a larger --checkpoint_interval, or free some space")
