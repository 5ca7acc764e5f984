"""The three training stages (ARCHITECTURE.md, "The three stages") and their schedules per preset.

A StageSpec says what one stage trains and on what: sequence length, learning rate, warmup, number
of steps, default batch size, which data feeds which expert at each step, and whether the fusion
layer is on. Flags given by the user (--seq_len, --learning_rate, ...) override these defaults in
`mm_rec.training.config.TrainConfig.stage_plan`.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

STAGE_NAMES = ("stage1", "stage2", "stage3")


@dataclass(frozen=True)
class StageSpec:
    name: str
    title: str
    description: str
    seq_len: int
    learning_rate: float
    warmup_steps: int
    max_steps: int
    batch_size: int
    checkpoint_interval: int
    eval_interval: int
    # "mixed": both experts see mixed text+code windows; "alternate": the guide's Stage 2, where
    # the text expert trains on text and the code expert on code, one at a time.
    data: str
    use_fusion: bool

    def batch_plan(self, step: int) -> tuple[str, str | None]:
        """(data kind, expert_type) of 1-based `step`.

        Stage 2 follows the guide's loop `for step in range(N): text if step % 2 == 0 else code`
        on the 0-based index, so the first step trains the text expert, the second the code expert.
        """
        if self.data == "alternate":
            return ("text", "text") if (step - 1) % 2 == 0 else ("code", "code")
        return "mixed", None

    def eval_plan(self) -> list[tuple[str, str | None]]:
        """(domain, expert_type) pairs evaluated by this stage: each expert on its own domain in
        Stage 2, the whole model (fusion as the stage has it) on both domains otherwise."""
        if self.data == "alternate":
            return [("text", "text"), ("code", "code")]
        return [("text", None), ("code", None)]

    def with_overrides(self, **overrides) -> "StageSpec":
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})


_TEXT = {
    "stage1": ("Local Consistency", "MDI gates learn local consistency"),
    "stage2": ("Global Specialization", "Experts specialize on long domain-specific sequences"),
    "stage3": ("Fusion Training", "The fusion layer learns to combine the experts"),
}


def _stage(name, **kw) -> StageSpec:
    title, description = _TEXT[name]
    data = "alternate" if name == "stage2" else "mixed"
    return StageSpec(name=name, title=title, description=description, data=data,
                     use_fusion=(name == "stage3"), **kw)


SCHEDULES: dict[str, dict[str, StageSpec]] = {
    # The guide's numbers (§2.1, §6.1, §6.2).
    "100m": {
        "stage1": _stage("stage1", seq_len=512, learning_rate=3e-4, warmup_steps=500, max_steps=5000,
                         batch_size=4, checkpoint_interval=100, eval_interval=500),
        "stage2": _stage("stage2", seq_len=8192, learning_rate=1e-4, warmup_steps=1000, max_steps=10000,
                         batch_size=2, checkpoint_interval=200, eval_interval=1000),
        "stage3": _stage("stage3", seq_len=4096, learning_rate=5e-5, warmup_steps=500, max_steps=5000,
                         batch_size=4, checkpoint_interval=100, eval_interval=500),
    },
    # A short schedule for the tiny model: all three stages in a few minutes on a 2-core CPU.
    # The learning rates keep the guide's 6:2:1 ratio, scaled up for a model this small.
    "tiny": {
        "stage1": _stage("stage1", seq_len=128, learning_rate=3e-3, warmup_steps=20, max_steps=300,
                         batch_size=8, checkpoint_interval=100, eval_interval=100),
        "stage2": _stage("stage2", seq_len=512, learning_rate=1e-3, warmup_steps=10, max_steps=100,
                         batch_size=4, checkpoint_interval=50, eval_interval=50),
        "stage3": _stage("stage3", seq_len=256, learning_rate=5e-4, warmup_steps=10, max_steps=100,
                         batch_size=8, checkpoint_interval=50, eval_interval=50),
    },
}


def next_stage(name: str) -> str | None:
    i = STAGE_NAMES.index(name)
    return STAGE_NAMES[i + 1] if i + 1 < len(STAGE_NAMES) else None
