"""Training logs: metrics.jsonl, TensorBoard, optional wandb, and a loss-curve PNG per stage.

Only rank 0 makes a MetricsLogger; the other ranks get `NullLogger`, so the loop calls the same
methods everywhere. metrics.jsonl holds one JSON object per line, appended across resumes:
    {"type": "train", "stage", "step", "loss", "lr", "grad_norm", "tokens_per_s", ...}
    {"type": "eval", "stage", "step", "val_loss_text", "val_loss_code"}
    {"type": "memory", "stage", "step", "text/layer_0/h": ..., ...}
    {"type": "recovery", "stage", "step", "message", ...}
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..utils.errors import UserError

METRICS_FILE = "metrics.jsonl"


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


class MetricsLogger:
    def __init__(self, checkpoint_dir, log_dir=None, use_wandb=False, wandb_project="mmrec-100m",
                 run_name="mmrec", config: dict | None = None):
        self.dir = Path(checkpoint_dir)
        self.path = self.dir / METRICS_FILE
        self._file = open(self.path, "a", encoding="utf-8")
        from torch.utils.tensorboard import SummaryWriter
        self.tb = SummaryWriter(log_dir=str(log_dir or self.dir / "tensorboard"))
        self.wandb = _setup_wandb(wandb_project, run_name, config or {}, self.dir) if use_wandb else None

    def _write(self, row: dict) -> None:
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()

    def log_train(self, stage: str, step: int, **values) -> None:
        self._write({"type": "train", "stage": stage, "step": step, **values})
        tags = {"loss": "Loss/train", "lr": "LearningRate", "grad_norm": "GradNorm", "tokens_per_s": "TokensPerSec"}
        for key, tag in tags.items():
            if values.get(key) is not None:
                self.tb.add_scalar(tag, values[key], self._global(stage, step))
        if self.wandb is not None:
            self.wandb.log({"stage": stage, "step": step, "loss": values.get("loss"),
                            "learning_rate": values.get("lr"), "grad_norm": values.get("grad_norm"),
                            "tokens_per_s": values.get("tokens_per_s")})

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

    @staticmethod
    def _global(stage: str, step: int) -> int:
        # One x axis across stages in TensorBoard: stage k's steps start at k * 1e6.
        return (int(stage[-1]) - 1) * 1_000_000 + step

    def plot_stage(self, stage: str) -> Path | None:
        """loss_{stage}.png next to the checkpoints: training loss (and validation loss) against step."""
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
        for domain in ("text", "code"):
            ev = sorted((r["step"], r[f"val_loss_{domain}"]) for r in rows
                        if r["type"] == "eval" and f"val_loss_{domain}" in r)
            if ev:
                ax.plot([s for s, _ in ev], [v for _, v in ev], "o-", label=f"val loss ({domain})")
        ax.set_xlabel("step")
        ax.set_ylabel("cross-entropy (nats/token)")
        ax.set_title(f"MM-Rec {stage}")
        ax.grid(alpha=0.3)
        ax.legend()
        out = self.dir / f"loss_{stage}.png"
        fig.tight_layout()
        fig.savefig(out, dpi=100)
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
