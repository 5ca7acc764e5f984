"""Training logs: metrics.jsonl, TensorBoard, optional wandb, and a loss-curve PNG per stage.

Only rank 0 makes a MetricsLogger; the other ranks get `NullLogger`, so the loop calls the same
methods everywhere. metrics.jsonl holds one JSON object per line, appended across resumes, each
with the `run_id` of the process that wrote it:
    {"type": "train", "stage", "step", "run_id", "loss", "lr", "grad_norm", "tokens_per_s", "expert", ...}
    {"type": "eval", "stage", "step", "run_id", "val_loss_text", "val_loss_code"}
    {"type": "memory", "stage", "step", "run_id", "text/layer_0/h": ..., ...}
    {"type": "recovery", "stage", "step", "run_id", "message", ...}
"expert" is the expert a Stage-2 step trained ("text" or "code"), "both" in Stages 1 and 3.
A resumed run first drops the rows after its checkpoint's step (`drop_rows_after`, an atomic
rewrite): those steps are trained again, and each is in the file once. Within a run, a recovery
keeps the rows of the steps it rolls back over (they show what diverged); its "recovery" row
marks where the re-run begins, and a reader takes the last row of a step.

TensorBoard's x axis is one step count across the stages (stage 2 starts after stage 1's
max_steps). TensorBoard is a view of metrics.jsonl: when its writer fails (a full or read-only
disk) it is turned off with one warning line and training goes on; metrics.jsonl failing to be
written stops the run with one line.
"""
from __future__ import annotations

import json
import os
import threading
from pathlib import Path

from ..utils.errors import UserError
from ..utils.fileio import atomic_write, atomic_write_text, disk_error

METRICS_FILE = "metrics.jsonl"
STEP_ROWS = ("train", "eval", "memory")  # rows of a step's values (events such as "recovery" stay)


HELDOUT_TYPE = "heldout"  # rows of the --heldout_* files' losses

def read_metrics(path: str | os.PathLike, type: str | None = "train") -> list[dict]:
    """Rows of a metrics.jsonl (only those of `type` unless None)."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                if type is None or row.get("type") == type:
                    rows.append(row)
    return rows


def _setup_wandb(project: str, run_name: str, config: dict, directory: Path):
    try:
        import wandb
    except ImportError:
        raise UserError("--wandb needs the wandb package: pip install wandb") from None
    # Offline unless the user configured wandb (an API key or an explicit mode): no surprise uploads.
    configured = os.environ.get("WANDB_MODE") or os.environ.get("WANDB_API_KEY")
    return wandb.init(project=project, name=run_name, config=config, dir=str(directory),
                      mode=None if configured else "offline")


class _TensorBoard:
    """A SummaryWriter whose failure (a full or read-only disk) turns it off with one warning line
    instead of tracebacks: its writer thread's exception is kept from the thread excepthook and
    surfaces at the next call here."""

    def __init__(self, log_dir: Path, warn):
        self.log_dir = Path(log_dir)
        self._warn = warn
        self.writer = None
        self._excepthook = threading.excepthook
        threading.excepthook = self._thread_failed
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(log_dir=str(log_dir))
        except Exception as e:  # noqa: BLE001 - any failure to log leaves training alone
            self._failed(e)

    def _thread_failed(self, args) -> None:
        if type(args.thread).__name__ != "_AsyncWriterThread":
            self._excepthook(args)

    def _failed(self, exc: BaseException) -> None:
        error = disk_error(exc, self.log_dir / "events", "write TensorBoard logs to")
        reason = str(error) if error else f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        self._warn(f"warning: TensorBoard logging is off ({reason}); training goes on, metrics.jsonl keeps "
                   f"every value")
        writer, self.writer = self.writer, None
        if writer is not None:
            try:
                writer.close()
            except Exception:  # noqa: BLE001 - the same disk failing again
                pass

    def __getattr__(self, name):  # add_scalar, add_histogram, flush
        def call(*args, **kwargs):
            if self.writer is None:
                return None
            try:
                return getattr(self.writer, name)(*args, **kwargs)
            except Exception as e:  # noqa: BLE001
                self._failed(e)
        return call

    def close(self) -> None:
        try:
            if self.writer is not None:
                try:
                    self.writer.close()
                except Exception as e:  # noqa: BLE001
                    self.writer = None
                    self._failed(e)
        finally:
            threading.excepthook = self._excepthook


class MetricsLogger:
    def __init__(self, checkpoint_dir, log_dir=None, use_wandb=False, wandb_project="mmrec-100m",
                 run_name="mmrec", config: dict | None = None, run_id: str | None = None,
                 stage_offsets: dict[str, int] | None = None, warn=print):
        self.dir = Path(checkpoint_dir)
        self.path = self.dir / METRICS_FILE
        self.run_id = run_id
        # TensorBoard step of a stage's step 0 (default: stage k at (k - 1) x 1e6)
        self.stage_offsets = stage_offsets or {f"stage{k}": (k - 1) * 1_000_000 for k in (1, 2, 3)}
        self._warn = warn
        self._file = self._open()
        self.tb = _TensorBoard(log_dir or self.dir / "tensorboard", warn)
        self.wandb = _setup_wandb(wandb_project, run_name, config or {}, self.dir) if use_wandb else None

    def _open(self):
        try:
            return open(self.path, "a", encoding="utf-8")
        except OSError as e:
            raise (disk_error(e, self.path, "write") or UserError(f"cannot write {self.path}: {e}")) from None

    def _write(self, row: dict) -> None:
        if self.run_id is not None:
            row = {**row, "run_id": self.run_id}
        try:
            self._file.write(json.dumps(row) + "\n")
            self._file.flush()
        except OSError as e:
            raise (disk_error(e, self.path, "write") or UserError(f"cannot write {self.path}: {e}")) from None

    def drop_rows_after(self, stage: str, step: int) -> int:
        """Remove the step rows (train, eval, memory) after `step` of `stage` and of later stages:
        the run goes back there and writes them anew. An atomic rewrite; returns how many rows were dropped."""
        from ..training.recovery import position
        limit = position(stage, step)
        self._file.flush()
        kept, dropped = [], 0
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    after = (row.get("type") in STEP_ROWS
                             and position(row.get("stage"), row.get("step", 0)) > limit)
                except (ValueError, TypeError, AttributeError):
                    after = False  # not ours to judge: keep it
                if after:
                    dropped += 1
                else:
                    kept.append(line if line.endswith("\n") else line + "\n")
        if dropped:
            self._file.close()
            try:
                atomic_write_text(self.path, "".join(kept))
            finally:
                self._file = self._open()
        return dropped

    def log_train(self, stage: str, step: int, **values) -> None:
        self._write({"type": "train", "stage": stage, "step": step, **values})
        tags = {"loss": "Loss/train", "lr": "LearningRate", "grad_norm": "GradNorm", "tokens_per_s": "TokensPerSec"}
        for key, tag in tags.items():
            if values.get(key) is not None:
                self.tb.add_scalar(tag, values[key], self._global(stage, step))
        if values.get("expert") in ("text", "code") and values.get("loss") is not None:
            self.tb.add_scalar(f"Loss/train_{values['expert']}_expert", values["loss"], self._global(stage, step))
        if self.wandb is not None:
            self.wandb.log({"stage": stage, "step": step, "loss": values.get("loss"),
                            "learning_rate": values.get("lr"), "grad_norm": values.get("grad_norm"),
                            "tokens_per_s": values.get("tokens_per_s"), "expert": values.get("expert")})

    def log_eval(self, stage: str, step: int, losses: dict[str, float]) -> None:
        row = {"type": "eval", "stage": stage, "step": step}
        row.update({f"val_loss_{domain}": value for domain, value in losses.items()})
        self._write(row)
        for domain, value in losses.items():
            self.tb.add_scalar(f"Loss/val_{domain}", value, self._global(stage, step))
        if self.wandb is not None:
            self.wandb.log({f"val_loss_{d}": v for d, v in losses.items()} | {"stage": stage, "step": step})

    def log_memory(self, stage: str, step: int, norms: dict[str, float]) -> None:
        self._write({"type": "memory", "stage": stage, "step": step, **norms})
        for key, value in norms.items():
            self.tb.add_scalar(f"MemoryNorms/{key}", value, self._global(stage, step))
        if norms:
            import torch
            self.tb.add_histogram("MemoryNorms", torch.tensor(list(norms.values())), self._global(stage, step))
        if self.wandb is not None:
            self.wandb.log({"memory_norms": norms, "stage": stage, "step": step})

    def log_event(self, type: str, stage: str, step: int, **values) -> None:
        self._write({"type": type, "stage": stage, "step": step, **values})

    def _global(self, stage: str, step: int) -> int:
        # One x axis across stages in TensorBoard: a stage's steps follow the previous stages'.
        return self.stage_offsets.get(stage, 0) + step

    def plot_stage(self, stage: str) -> Path | None:
        """loss_{stage}.png next to the checkpoints: training, validation and held-out loss against step."""
        rows = [r for r in read_metrics(self.path, type=None) if r.get("stage") == stage]
        train = {r["step"]: r["loss"] for r in rows if r["type"] == "train"}  # last write of a step wins
        if not train:
            return None
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 4.5))
        steps = sorted(train)
        ax.plot(steps, [train[s] for s in steps], lw=0.8, alpha=0.6, label="train loss")
        if len(steps) >= 20:  # a moving average makes the trend readable on noisy curves
            k = max(5, len(steps) // 20)
            smooth = [sum(train[s] for s in steps[max(0, i - k + 1):i + 1]) / len(steps[max(0, i - k + 1):i + 1])
                      for i in range(len(steps))]
            ax.plot(steps, smooth, lw=1.5, label=f"train loss (mean of {k})")
        for kind, prefix, style in (("eval", "val_loss", "o-"), (HELDOUT_TYPE, "heldout_loss", "s--")):
            for domain in ("text", "code"):
                points = sorted((r["step"], r[f"{prefix}_{domain}"]) for r in rows
                                if r["type"] == kind and f"{prefix}_{domain}" in r)
                if points:
                    ax.plot([s for s, _ in points], [v for _, v in points], style,
                            label=f"{'val' if kind == 'eval' else 'held-out'} loss ({domain})")
        ax.set_xlabel("step")
        ax.set_ylabel("cross-entropy (nats/token)")
        ax.set_title(f"MM-Rec {stage}")
        ax.grid(alpha=0.3)
        ax.legend()
        out = self.dir / f"loss_{stage}.png"
        fig.tight_layout()
        try:
            atomic_write(out, lambda tmp: fig.savefig(tmp, dpi=100, format="png"), "write the loss plot")
        except UserError as e:  # a plot is a convenience: the run's result does not depend on it
            self._warn(f"warning: {e}")
            out = None
        finally:
            plt.close(fig)
        return out

    def close(self) -> None:
        self._file.close()
        self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


class NullLogger:
    """What ranks other than 0 log: nothing."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None
