"""--profile_step N: torch.profiler over a few training steps, to see where a step's time goes.

Steps N .. N+2 of each stage (counted as the training loop starts them) run under the profiler
(CPU ops, and CUDA kernels on a GPU); at the end the run directory gets
    profile_STAGE_stepN.json   a Chrome trace (chrome://tracing or https://ui.perfetto.dev)
    profile_STAGE_stepN.txt    the ops that took most time, device time first on a GPU.
A step's numbers are read back one step late (loop.py), so the window's edges hold a little of
the step before and after it. Only the main process profiles.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

PROFILED_STEPS = 3


class StepProfiler:
    def __init__(self, first_step: int | None, out_dir: Path, stage: str, device: torch.device,
                 enabled: bool = True):
        self.first_step = first_step if enabled else None
        self.out_dir, self.stage, self.device = Path(out_dir), stage, device
        self._prof = None
        self.done = False

    def at_step_start(self, step: int) -> None:
        """Call at the start of every step: starts the profiler at the first step, stops after the last."""
        if self.first_step is None or self.done:
            return
        if self._prof is None and step == self.first_step:
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
            self._prof = profile(activities=activities)
            self._prof.__enter__()
        elif self._prof is not None and step >= self.first_step + PROFILED_STEPS:
            self.finish()

    def finish(self) -> None:
        """Stop and write the trace and the table (also when the stage ends inside the window)."""
        if self._prof is None:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        prof, self._prof, self.done = self._prof, None, True
        prof.__exit__(None, None, None)
        name = f"profile_{self.stage}_step{self.first_step}"
        prof.export_chrome_trace(str(self.out_dir / f"{name}.json"))
        sort = "self_cuda_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
        table = prof.key_averages().table(sort_by=sort, row_limit=40, max_name_column_width=80)
        (self.out_dir / f"{name}.txt").write_text(table + "\n")
