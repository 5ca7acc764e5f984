"""The staged trainer (guide §2, §4; ARCHITECTURE.md, "The three stages").

    Trainer(config).run()
    Trainer(config, build_model=lambda model_config: OtherModel(model_config)).run()

For each stage: a fresh AdamW and warmup+cosine schedule (optim.py), then steps 1..N of
    batch (step-deterministic) -> train_step (step.py: forward under autocast, chunked loss,
    backward, gradients averaged over ranks, clipping, finite check, AdamW) -> schedule step
with checkpoints every `checkpoint_interval` steps and at the stage's end, validation every
`eval_interval` steps and at the end, and metrics to metrics.jsonl / TensorBoard / wandb. A step
whose loss or gradient norm is not finite rolls the run back to its newest checkpoint at half the
learning rate (recovery.py); which stages to run and what a checkpoint continues is resume.py's.

Batches are a pure function of (stage, step, rank), and the checkpoint at step k holds the model,
optimizer, scheduler and RNG states after step k, so a run resumed from it computes exactly the
losses the uninterrupted run computes for steps k+1.. (bitwise on the CPU).

The model is built in one place, `build_model(model_config)` (default: MMRec100M), so that another
model with the same embedding / experts / fusion / head interface trains through exactly this code
(a benchmark's Transformer baseline: tests/training/test_train_step.py). What the trainer uses of it:
- `loss(x, y, expert_type=, chunk_size=, return_memory=, head_chunk=)`: the mean loss, the LM head
  run head_chunk tokens at a time; with return_memory, (loss, memory states or None);
- `use_fusion`, `use_gradient_checkpointing`: attributes it sets per stage / run;
- `get_num_params()`, `config.to_dict()` (saved in checkpoints), the state dict;
- with --compile and --compile_scope layer, `compile_blocks(mode=)`.
"""
from __future__ import annotations

from pathlib import Path

import torch
from tqdm import tqdm

from ..model.config import MMRecConfig
from ..model.mmrec import MMRec100M
from ..ops import load_gpu_backend
from ..utils.compile import compile_fn
from ..utils.device import resolve_device
from ..utils.errors import UserError
from ..utils.fileio import atomic_write_text
from ..utils.monitoring import LOGGER_NAME, GradNormWatch, create_monitoring_hooks
from . import distributed as D
from . import guards, preflight
from .checkpoint import CheckpointWriter, check_finite, load_checkpoint, remove_partial_saves
from .config import TrainConfig, resolve_speed
from .console import display, route_monitor_logs
from .data import open_training_data
from .heldout import HeldoutSet
from .interrupt import GracefulInterrupt
from .loop import StageLoop
from .metrics import METRICS_FILE, MetricsLogger, NullLogger
from .recovery import Lineage, new_run_id
from .resume import check_same_model, plan_stages
from .rundir import find_previous_run, refuse_reuse, set_aside
from .runlock import RunLock
from .stages import STAGE_NAMES, StageSpec
from .step_graph import inner_compile_mode


def build_mmrec(config: MMRecConfig) -> torch.nn.Module:
    """The trainer's default model."""
    return MMRec100M(config=config)


class Trainer(StageLoop):
    """Builds a run's components from its TrainConfig and trains its stages (loop.py: one stage)."""

    def __init__(self, cfg: TrainConfig, build_model=None):
        self.cfg = cfg
        self.build_model = build_model or build_mmrec
        self.device = resolve_device(cfg.device)
        self.precision = cfg.precision or ("bf16" if self.device.type == "cuda" else "fp32")
        self.dist = D.init_distributed(self.device.type)
        if self.dist.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
        self.is_main = self.dist.is_main
        self.ckpt_dir = Path(cfg.checkpoint_dir)
        # One process trains in a directory at a time (rank 0 holds the lock until run() ends).
        self.lock = RunLock(self.ckpt_dir)
        try:
            self._setup(cfg)
        except BaseException:
            self.lock.release()  # an in-process caller may start another run here
            raise

    def _setup(self, cfg: TrainConfig) -> None:
        # Checkpoints are written in the background (rank 0): the loop pays only the copy to host memory.
        self.checkpoints = CheckpointWriter()
        self.model_config: MMRecConfig = cfg.model_config()
        # Fast by default on CUDA (compiled, the step captured as a CUDA graph), eager on the CPU.
        speed = resolve_speed(cfg, self.device.type, self.dist.world_size, self.precision,
                              self.model_config.dropout, has_triton=preflight.has_triton())
        cfg.compile, cfg.cuda_graph = speed.compile, speed.cuda_graph
        if speed.note:
            self.print(speed.note)
        if cfg.cuda_graph:
            preflight.check_graphable(self.device, self.dist.world_size, self.precision, self.model_config.dropout,
                                      cfg.gradient_checkpointing)
        # Checked on rank 0 before anything is written; every rank stops with the same line.
        self._on_main(self._check_output_dir)

        self.resume_state = load_checkpoint(cfg.resume_from) if cfg.resume_from else None
        if self.resume_state is not None:
            check_same_model(self.resume_state, self.model_config, cfg.resume_from)
            check_finite(self.resume_state, cfg.resume_from)
        # This process's run id, in every checkpoint and metrics row, and the trajectory it
        # continues: recovery only rolls back along it (recovery.py).
        self.lineage = Lineage.start(D.broadcast_object(new_run_id()), self.resume_state)
        # A checkpoint that cannot continue the wanted stage is refused here, before anything is written.
        self.plan = plan_stages(cfg, self.resume_state, note=self.print)
        specs = [cfg.stage_spec(name) for name, _ in self.plan]

        self.data, self.tokenizer = open_training_data(cfg.data_dir, cfg.synthetic, self.model_config,
                                                       verbose=self.is_main)
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        self.model = self.build_model(self.model_config).to(self.device)
        self.model.use_gradient_checkpointing = cfg.gradient_checkpointing
        if self.resume_state is not None:
            self.model.load_state_dict(self.resume_state["model_state_dict"])
        D.broadcast_parameters(self.model)
        # Refused here, before any log is written, when a stage surely cannot fit in memory.
        half = self.precision != "fp32" and self.device.type == "cuda"  # autocast: bf16/fp16 activations
        self._memory_warnings = self._on_main(lambda: preflight.memory_warnings(
            self.device, self.model_config, self.model.get_num_params(), specs, cfg.gradient_checkpointing,
            half)) or {}
        if self.is_main:
            warning = preflight.disk_warning(self.ckpt_dir, self.model.get_num_params(), specs, cfg.keep_last)
            if warning:
                self.print(warning)
        # The step's loss: model.loss runs the LM head and cross-entropy in chunks, never holding
        # the [B, T, vocab] logits (recomputed in backward). --compile compiles by default the
        # layer, not the whole model: one graph for every layer of both experts, so compilation
        # takes seconds, not minutes, and does not grow with depth.
        self.loss_fn = self.model.loss
        if self.device.type == "cuda":  # the recurrence kernels, imported before anything is traced
            load_gpu_backend()
        mode = None if cfg.compile_mode == "default" else cfg.compile_mode
        if cfg.cuda_graph:
            mode = inner_compile_mode(mode)  # the compiled parts run inside the step's graph
        if cfg.compile and cfg.compile_scope == "layer":
            self.model.compile_blocks(mode=mode)
        elif cfg.compile:  # the whole loss: combo kernels not measured there, so left off
            self.loss_fn = compile_fn(self.model.loss, mode=mode, combo=False)

        self.autocast_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[self.precision]
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")

        self.log = self._on_main(lambda: self._open_log(cfg))
        if self.log is None:
            self.log = NullLogger()
        self._restore_monitor_logs = route_monitor_logs(LOGGER_NAME, self.is_main)
        self.hooks = create_monitoring_hooks(self.model, checkpoint_dir=self.ckpt_dir)
        self.grad_watch = GradNormWatch()
        self.lr_scale = 1.0  # set per stage in train_stage
        self._nan_injected = False
        self.best: guards.BestTracker | None = None  # per stage, set in train_stage
        heldout_budget = max((self._eval_tokens(spec) for spec in specs), default=0)
        # Read on rank 0, which alone scores them; a bad file stops every rank with the same line.
        self.heldout = self._on_main(lambda: HeldoutSet.from_files(
            self.tokenizer, {"text": cfg.heldout_text, "code": cfg.heldout_code}, heldout_budget))
        if self.is_main and self.tokenizer is not None:  # atomic: a full disk leaves no truncated copy
            atomic_write_text(self.ckpt_dir / "tokenizer.json", self.tokenizer.to_json(), "write the tokenizer to")
        self.lock.publish_pid()  # committed to train here: a second trainer is told who holds the directory

    def _eval_tokens(self, spec: StageSpec) -> int:
        """Tokens one evaluation scores per domain: eval_batches global batches of seq_len."""
        return self.cfg.eval_batches * spec.batch_size * self.dist.world_size * spec.seq_len

    def _check_output_dir(self) -> None:
        """Take the directory's lock (a second trainer there is refused before it reads, moves or
        writes anything), refuse a new run in a directory holding another (unless --overwrite),
        check that it can be written, and remove the partial saves of a killed process."""
        self.lock.acquire(self.cfg.checkpoint_dir)
        previous = None if self.cfg.resume_from else find_previous_run(self.ckpt_dir)
        if previous is not None and not self.cfg.overwrite:
            raise refuse_reuse(self.cfg.checkpoint_dir, previous)
        preflight.check_writable(self.ckpt_dir)
        for path in remove_partial_saves(self.ckpt_dir):
            self.print(f"note: removed {path.name}, a checkpoint save interrupted by an earlier process")

    def _open_log(self, cfg: TrainConfig) -> MetricsLogger:
        if cfg.overwrite:  # as late as possible: a run that fails to start leaves the old one in place
            aside = set_aside(self.ckpt_dir, include_tensorboard=cfg.log_dir is None)
            if aside is not None:
                self.print(f"--overwrite: the earlier run in {display(self.ckpt_dir)} was moved to {display(aside)}")
        # TensorBoard: one step axis, each stage after the previous stages' steps.
        offsets, total = {}, 0
        for name in STAGE_NAMES:
            offsets[name] = total
            total += cfg.stage_spec(name).max_steps
        log = MetricsLogger(self.ckpt_dir, cfg.log_dir, cfg.wandb, cfg.wandb_project,
                            run_name=f"{cfg.preset}-{cfg.stage}", config=cfg.to_dict(),
                            run_id=self.lineage.run_id, stage_offsets=offsets, warn=self.print)
        if self.resume_state is not None:  # the steps after the checkpoint are trained again
            stage, step = self.resume_state.get("stage"), int(self.resume_state.get("step", 0))
            dropped = log.drop_rows_after(stage, step)
            if dropped:
                self.print(f"note: {dropped} rows of {METRICS_FILE} after {stage} step {step} were dropped "
                           f"(those steps are trained again)")
        return log

    def _on_main(self, fn):
        """fn() on rank 0 only (None elsewhere). A UserError there is raised on every rank, so all
        processes stop with the same one line instead of the others failing in their next collective."""
        result, error = None, None
        if self.is_main:
            try:
                result = fn()
            except UserError as e:
                error = str(e)
        error = D.broadcast_object(error)
        if error is not None:
            raise UserError(error)
        return result

    def print(self, *args) -> None:
        if self.is_main:
            tqdm.write(" ".join(str(a) for a in args))

    # -- the run ---------------------------------------------------------------------------------
    def run(self) -> None:
        # Ctrl-C (one process): finish the step, save it, exit 130 with the --resume_from to use.
        self.interrupt = GracefulInterrupt(enabled=not self.dist.enabled)
        try:
            with self.interrupt:
                self._print_setup()
                for name, state in self.plan:
                    self.train_stage(self.cfg.stage_spec(name), state)
        finally:
            try:  # a checkpoint being written is finished, whatever stopped the run
                self.checkpoints.wait()
            finally:
                self.log.close()
                self.lock.release()
            self._restore_monitor_logs()
            D.shutdown_distributed()

    def _print_setup(self) -> None:
        n = self.model.get_num_params()
        data = ("synthetic random tokens" if self.cfg.synthetic else
                f"{getattr(self.data, 'data_dir', None) or self.cfg.data_dir or 'bundled corpus'}")
        world = f", {self.dist.world_size} processes" if self.dist.enabled else ""
        self.print(f"MM-Rec {self.cfg.preset}: {n / 1e6:.1f}M parameters | device {self.device}{world} | "
                   f"precision {self.precision} | data: {data}")
        if self.resume_state is not None:
            self.print(f"Resuming from {self.cfg.resume_from} ({self.resume_state.get('stage')} "
                       f"step {self.resume_state.get('step')})")


__all__ = ["Trainer", "build_mmrec"]
