"""Training monitors (guide §5.1, §5.4, §7): notice numerical trouble and recover from it.

    hooks = create_monitoring_hooks(model, checkpoint_dir="./checkpoints")
    if not hooks["stability_monitor"].check_outputs({"loss": loss, "grad_norm": gn}, step):
        success, path = hooks["recovery"].recover(model, optimizer, scheduler)
    norms = hooks["memory_hook"](memory_states, step)     # {"text/layer_0/h": ..., "all/M_max": ...}

- `StabilityMonitor` says whether every tensor or number it is given is finite and counts
  consecutive failures.
- `GradNormWatch` warns when a gradient norm spikes far beyond its recent median.
- `MemoryNormHook` measures the short-term (h) and long-term (M) memory states per expert and layer
  (RMS per element, the guide's order-one scale) and warns when a norm leaves [1e-5, 1000] or is
  not finite (an exploded or dead state).
- `RecoveryManager` (mm_rec.training.recovery) restores the newest checkpoint that loads and holds
  finite weights (corrupt and poisoned files are skipped, each named in one line), with the
  optimizer state mapped by parameter (any optimizer over the model's parameters, e.g. a plain
  `AdamW(model.parameters())`, works on the trainer's checkpoints), multiplies the learning rate by
  0.5 and gives up after 3 attempts per run.

Recovery drills: `MMREC_INJECT_NAN_AT_STEP=k` makes the trainer's loss at step k NaN once, and
`corrupt_checkpoint(path)` damages a checkpoint file so that it no longer loads (mlops/README.md).

Warnings and errors go to the `logging` logger "mm_rec.monitoring".
"""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import torch

LOGGER_NAME = "mm_rec.monitoring"

# RecoveryManager restores training checkpoints, so it lives in mm_rec.training.recovery; it is
# importable from here too (the guide's path), loaded on first use: utils imports no training
# module at import time.
_FROM_RECOVERY = ("RecoveryManager", "_strip_wrapper_prefixes", "_unwrap")


def __getattr__(name: str):
    if name in _FROM_RECOVERY:
        from ..training import recovery
        return getattr(recovery, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# -- stability -----------------------------------------------------------------------------------
class StabilityMonitor:
    """Finite-ness check of a step's outputs, with a count of consecutive failures.

    `check_outputs(outputs, step)` returns False when any value (a tensor of any shape, or a Python
    number) holds NaN or Inf, and records the offending keys in `last_bad_keys`. When
    `consecutive_failures` reaches `failure_threshold` an error is logged once for that streak; a
    finite step resets the streak. Each tensor costs one `isfinite(...).all()` and one host sync.
    """

    def __init__(self, failure_threshold: int = 3, logger: logging.Logger | None = None):
        self.failure_threshold = int(failure_threshold)
        self.log = logger or logging.getLogger(LOGGER_NAME)
        self.consecutive_failures = 0
        self.total_failures = 0
        self.last_bad_keys: list[str] = []
        self.last_bad_step: int | None = None

    @staticmethod
    def _is_finite(value) -> bool:
        if isinstance(value, torch.Tensor):
            if value.numel() == 0:
                return True
            if not (value.is_floating_point() or value.is_complex()):
                return True  # integer tensors cannot hold NaN/Inf
            return bool(torch.isfinite(value.detach()).all())
        return math.isfinite(float(value))

    def check_outputs(self, outputs: dict, step: int) -> bool:
        bad = [key for key, value in outputs.items() if value is not None and not self._is_finite(value)]
        if not bad:
            self.consecutive_failures = 0
            return True
        self.consecutive_failures += 1
        self.total_failures += 1
        self.last_bad_keys = bad
        self.last_bad_step = step
        self.log.warning("step %s: non-finite %s (consecutive failures: %d)",
                         step, ", ".join(bad), self.consecutive_failures)
        if self.consecutive_failures == self.failure_threshold:
            self.log.error("step %s: %d consecutive non-finite steps (threshold %d); training is unstable",
                           step, self.consecutive_failures, self.failure_threshold)
        return False

    def reset(self) -> None:
        self.consecutive_failures = 0


class GradNormWatch:
    """Warns when a step's gradient norm is far beyond its typical value.

    `check(grad_norm, step)` returns the warning line (also logged) or None. Gradients are clipped
    to --gradient_clip_norm anyway, so a large norm alone is no trouble: the 100M model's first
    steps measure 18-30 (seed 1337), far above the guide's fixed limit of 10, and fall as it
    trains. A warning means a spike: the norm is above the guide's `floor` (10) and more than
    `factor` (10) times the median of the last `window` (100) finite norms, once `min_history`
    (20) steps give that median meaning. At most one warning per `every` (50) steps. A non-finite
    norm is the StabilityMonitor's to report (it triggers recovery), not this watch's.
    """

    def __init__(self, floor: float = 10.0, factor: float = 10.0, window: int = 100, min_history: int = 20,
                 every: int = 50, logger: logging.Logger | None = None):
        self.floor, self.factor, self.every = float(floor), float(factor), int(every)
        self.window, self.min_history = int(window), int(min_history)
        self.log = logger or logging.getLogger(LOGGER_NAME)
        self.history: list[float] = []
        self._last_warning: int | None = None

    def typical(self) -> float | None:
        """The median of the recent finite norms (None before min_history of them)."""
        if len(self.history) < self.min_history:
            return None
        ordered = sorted(self.history)
        return ordered[len(ordered) // 2]

    def check(self, grad_norm: float, step: int) -> str | None:
        grad_norm = float(grad_norm)
        if not math.isfinite(grad_norm):
            return None
        typical = self.typical()
        self.history = (self.history + [grad_norm])[-self.window:]
        if typical is None or grad_norm <= max(self.floor, self.factor * typical):
            return None
        if self._last_warning is not None and step - self._last_warning < self.every:
            return None
        self._last_warning = step
        message = (f"step {step}: gradient norm {grad_norm:.3g} is {grad_norm / typical:.0f}x its recent median "
                   f"{typical:.3g} (clipped; if the loss jumps too, lower --learning_rate or --gradient_clip_norm)")
        self.log.warning(message)
        return message


# -- memory norms --------------------------------------------------------------------------------
def state_rms(state: torch.Tensor) -> torch.Tensor:
    """[B, ...] -> [B]: the root mean square of each sample's elements (in fp32)."""
    return state.float().flatten(1).pow(2).mean(dim=-1).sqrt()


class MemoryNormHook:
    """Norms of the memory states a forward pass returned (`model(ids, return_memory=True)`).

    `hook(memory_states, step)` takes {"text": [{"h": [B, d], "M": [B, H, dh, dh]} per layer],
    "code": [...]} (experts that did not run are simply absent) and returns a flat dict of floats:

    - "{expert}/layer_{i}/h" = mean over the batch of the RMS of each sample's h (the root of
      the mean square of its d elements), i.e. `h.float().pow(2).mean(-1).sqrt().mean()`;
    - "{expert}/layer_{i}/M" = the same over all elements of each sample's M (every head),
      i.e. `M.float().flatten(1).pow(2).mean(-1).sqrt().mean()`;
    - "{expert}/h_mean", "{expert}/h_max", "{expert}/M_mean", "{expert}/M_max": mean and max of that
      expert's per-layer values;
    - "all/h_mean", "all/h_max", "all/M_mean", "all/M_max": the same over every expert and layer.

    Why RMS: the guide (§4.1) expects norms of order one (h ~0.5-2.0, M ~0.1-1.0) for a state of any
    size, which is a per-element scale; the Frobenius norm grows with the square root of the
    element count (256 for h, 8 x 32 x 32 for M in the 100M model), so a healthy 100M model at
    initialisation measured ~130 (h) and ~180 (M), above the guide's limit of 100. On the RMS scale
    the same states measure 0.7-5 (h) and 0.4-2 (M) (100M model at initialisation, seed 1337).

    The limits mean the state exploded or died, not that it left the guide's typical range: h is a
    leaky sum (h_t = gamma h_{t-1} + x_t), so a layer that learns long memory (gamma near 1)
    legitimately grows it; the tiny model after 100 steps of Stage 1 measured RMS(h) up to 32 on
    512-token windows, the 100M model up to ~16 (Frobenius 259) in the first 300 steps of the
    benchmark runs (benchmarks/results). Above `high` (1000, 30 times the tiny model's) or below `low` (1e-5: a state that
    carries nothing), or non-finite, a norm is logged as one warning line naming the layers
    concerned, when a state leaves that range (not again on every call while it stays out: a long
    run would print the same line thousands of times; it warns anew once the state came back well
    inside, within a factor 2 of the bounds, and left again). The values are in the returned dict
    (and metrics.jsonl) either way. `last` holds the latest dict.
    """

    def __init__(self, high: float = 1e3, low: float = 1e-5, logger: logging.Logger | None = None):
        self.high = float(high)
        self.low = float(low)
        self.log = logger or logging.getLogger(LOGGER_NAME)
        self.last: dict[str, float] = {}
        self._outside: set = set()  # states outside [low, high] at the last call

    @torch.no_grad()
    def __call__(self, memory_states: dict | None, step: int) -> dict[str, float]:
        keys, norms = [], []
        for expert, layers in (memory_states or {}).items():
            for i, state in enumerate(layers or []):
                if state is None:
                    continue
                for name in ("h", "M"):
                    if state.get(name) is not None:
                        keys.append((expert, i, name))
                        norms.append(state_rms(state[name].detach()).mean())
        if not norms:
            self.last = {}
            return {}
        values = torch.stack([n.cpu() for n in norms]).tolist()  # one sync for the whole dict

        out: dict[str, float] = {}
        groups: dict[str, list[float]] = {}
        for (expert, i, name), value in zip(keys, values):
            out[f"{expert}/layer_{i}/{name}"] = value
            groups.setdefault(f"{expert}/{name}", []).append(value)
            groups.setdefault(f"all/{name}", []).append(value)
        for group, vals in groups.items():
            prefix, name = group.split("/")
            out[f"{prefix}/{name}_mean"] = sum(vals) / len(vals)
            out[f"{prefix}/{name}_max"] = max(vals)

        outside = {key for key, value in zip(keys, values) if not (self.low <= value <= self.high)}  # NaN too
        anomalies = [f"{expert}/layer_{i}/{name}={value:.3g}" for (expert, i, name), value in zip(keys, values)
                     if (expert, i, name) in outside - self._outside]
        # A state counts as back only well inside the range (a factor 2 from either bound), so one
        # hovering at the threshold is not reported again at every crossing.
        settled = {key for key, value in zip(keys, values) if 2 * self.low <= value <= self.high / 2}
        self._outside = (self._outside | outside) - settled
        if anomalies:
            shown = ", ".join(anomalies[:8]) + (f" (+{len(anomalies) - 8} more)" if len(anomalies) > 8 else "")
            self.log.warning("step %s: memory norm outside [%g, %g]: %s", step, self.low, self.high, shown)
        self.last = out
        return out


def create_monitoring_hooks(model: torch.nn.Module, checkpoint_dir: str | os.PathLike = "./checkpoints",
                            max_attempts: int = 3, lr_factor: float = 0.5, failure_threshold: int = 3,
                            logger: logging.Logger | None = None) -> dict:
    """The guide's hooks: {"stability_monitor", "memory_hook", "recovery"} (see the module docstring).

    `model` is accepted for the guide's call signature; the hooks take the model where they need it.
    """
    from ..training.recovery import RecoveryManager
    logger = logger or logging.getLogger(LOGGER_NAME)
    return {
        "stability_monitor": StabilityMonitor(failure_threshold=failure_threshold, logger=logger),
        "memory_hook": MemoryNormHook(logger=logger),
        "recovery": RecoveryManager(checkpoint_dir, max_attempts=max_attempts, lr_factor=lr_factor, logger=logger),
    }


# -- drills --------------------------------------------------------------------------------------
def corrupt_checkpoint(path: str | os.PathLike) -> Path:
    """Damage a checkpoint so that `torch.load` (and `load_checkpoint`) fails on it: the zip header is
    overwritten and the file cut to half its length, as a crash or a bad disk would leave it.
    The file keeps its name, so `list_checkpoints` still sees it and recovery must skip it.

        python -c "from mm_rec.utils.monitoring import corrupt_checkpoint; corrupt_checkpoint('ckpts/checkpoint_stage1_step_20.pt')"
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.write(b"\0CORRUPT" * 8)
        f.truncate(max(64, size // 2))
    return path
