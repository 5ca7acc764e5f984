"""The staged training loop (guide §2, §4; ARCHITECTURE.md, "The three stages").

    Trainer(config).run()

For each stage: a fresh AdamW and warmup+cosine schedule, then steps 1..N of
    batch (step-deterministic) -> forward under autocast -> cross-entropy -> backward
    -> average gradients over ranks -> clip -> finite check -> AdamW step -> schedule step
with checkpoints every `checkpoint_interval` steps and at the stage's end, validation every
`eval_interval` steps and at the end, and metrics to metrics.jsonl / TensorBoard / wandb.

Batches are a pure function of (stage, step, rank), and the checkpoint at step k holds the model,
optimizer, scheduler and RNG states after step k, so a run resumed from it computes exactly the
losses the uninterrupted run computes for steps k+1.. (bitwise on the CPU).
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import shlex
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from ..model.config import MMRecConfig
from ..model.mmrec import MMRec100M
from ..ops import load_gpu_backend
from ..utils.compile import compile_fn
from ..utils.errors import UserError
from ..utils.fileio import atomic_write_text
from ..utils.device import resolve_device
from . import distributed as D
from .checkpoint import (STAGE_ORDER, CheckpointWriter, check_finite, checkpoint_name, load_checkpoint,
                         prune_checkpoints, remove_partial_saves, rng_state, set_rng_state)
from .config import TrainConfig, resolve_speed
from .data import open_training_data
from .evaluation import evaluate_loss
from . import guards
from .heldout import HeldoutSet
from .memory_estimate import available_memory, estimate_step_memory, memory_verdict
from .metrics import HELDOUT_TYPE, METRICS_FILE, MetricsLogger, NullLogger
from .optim import build_optimizer, build_scheduler
from .profiling import StepProfiler
from .interrupt import GracefulInterrupt, TrainingInterrupted
from .recovery import Lineage, TrainingDiverged, new_run_id, optimizer_param_names, position
from .rundir import find_previous_run, refuse_reuse, set_aside
from .runlock import RunLock
from .stages import StageSpec, next_stage
from .step_graph import GraphedStep, inner_compile_mode

RULE = "=" * 60
NAN_INJECTION_ENV = "MMREC_INJECT_NAN_AT_STEP"
GRAPH_DEVICES = ("cuda",)  # where --cuda_graph captures (tests add "cpu": the same step, uncaptured)


@dataclass
class _StepRecord:
    """One optimizer step's loss and gradient norm, on their way to the host."""
    step: int
    loss: torch.Tensor
    grad_norm: torch.Tensor
    lr: float
    memory: dict | None
    t0: float                    # when the step began (host clock)
    seconds: float | None = None
    _host: torch.Tensor | None = None
    _ready: "torch.cuda.Event | None" = None

    def __post_init__(self):
        # Copied to (pinned) host memory as soon as the step's backward is queued, behind an event:
        # reading them waits for this step only, not for the work queued after it (as .item() would).
        values = torch.stack([self.loss.detach().float(), self.grad_norm.detach().float()])
        if values.is_cuda:
            self._host = values.to("cpu", non_blocking=True)
            self._ready = torch.cuda.Event()
            self._ready.record()
        else:
            self._host = values

    def values(self) -> tuple[float, float]:
        """(loss, grad_norm) as floats."""
        if self._ready is not None:
            self._ready.synchronize()
        loss, grad_norm = self._host.tolist()
        return loss, grad_norm


class Trainer:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
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
                              self.model_config.dropout, has_triton=_has_triton())
        cfg.compile, cfg.cuda_graph = speed.compile, speed.cuda_graph
        if speed.note:
            self.print(speed.note)
        if cfg.cuda_graph:
            self._check_graphable()
        # Checked on rank 0 before anything is written; every rank stops with the same line.
        self._on_main(self._check_output_dir)

        self.resume_state = load_checkpoint(cfg.resume_from) if cfg.resume_from else None
        if self.resume_state is not None:
            _check_same_model(self.resume_state, self.model_config, cfg.resume_from)
            check_finite(self.resume_state, cfg.resume_from)
        # This process's run id, in every checkpoint and metrics row, and the trajectory it
        # continues: recovery only rolls back along it (recovery.py).
        self.lineage = Lineage.start(D.broadcast_object(new_run_id()), self.resume_state)
        # A checkpoint that cannot continue the wanted stage is refused here, before anything is written.
        self.plan = self._plan()

        self.data, self.tokenizer = open_training_data(cfg.data_dir, cfg.synthetic, self.model_config,
                                                       verbose=self.is_main)
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        self.model = MMRec100M(config=self.model_config).to(self.device)
        self.model.use_gradient_checkpointing = cfg.gradient_checkpointing
        if self.resume_state is not None:
            self.model.load_state_dict(self.resume_state["model_state_dict"])
        D.broadcast_parameters(self.model)
        # Refused here, before any log is written, when a stage surely cannot fit in memory.
        self._memory_warnings = self._on_main(self._check_memory) or {}
        if self.is_main:
            self._check_disk()
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
        from ..utils.monitoring import LOGGER_NAME, create_monitoring_hooks
        self._restore_monitor_logs = _route_monitor_logs(LOGGER_NAME, self.is_main)
        self.hooks = create_monitoring_hooks(self.model, checkpoint_dir=self.ckpt_dir)
        self.lr_scale = 1.0  # set per stage in train_stage
        self._nan_injected = False
        from ..utils.monitoring import GradNormWatch
        self.grad_watch = GradNormWatch()
        self.best: guards.BestTracker | None = None  # per stage, set in train_stage
        heldout_budget = max(self._eval_tokens(cfg.stage_spec(name)) for name, _ in self.plan) if self.plan else 0
        # Read on rank 0, which alone scores them; a bad file stops every rank with the same line.
        self.heldout = self._on_main(lambda: HeldoutSet.from_files(
            self.tokenizer, {"text": cfg.heldout_text, "code": cfg.heldout_code}, heldout_budget))
        if self.is_main and self.tokenizer is not None:  # atomic: a full disk leaves no truncated copy
            atomic_write_text(self.ckpt_dir / "tokenizer.json", self.tokenizer.to_json(), "write the tokenizer to")
        self.lock.publish_pid()  # committed to train here: a second trainer is told who holds the directory

    def _check_graphable(self) -> None:
        """--cuda_graph's requirements, checked before anything is written."""
        cfg = self.cfg
        if self.device.type not in GRAPH_DEVICES:
            raise UserError(f"--cuda_graph needs a CUDA device (training runs on {self.device}); drop the flag")
        if self.dist.world_size > 1:
            raise UserError("--cuda_graph runs in one process; drop it under torchrun (or train on one GPU)")
        if self.precision == "fp16":
            raise UserError("--cuda_graph cannot capture fp16's loss scaling (it decides on the host); "
                            "use --precision bf16")
        if self.model_config.dropout > 0 and cfg.gradient_checkpointing:
            raise UserError("--cuda_graph with --gradient_checkpointing needs dropout 0 "
                            "(recomputing dropout would need the RNG state, which a graph cannot read)")

    def _check_disk(self) -> None:
        """Warn before the first step when the checkpoints this run keeps will not fit on its disk."""
        # fp32 weights and AdamW's two moments; the rest of a checkpoint is small
        checkpoint_bytes = 12 * sum(p.numel() for p in self.model.parameters())
        files = sum(guards.checkpoints_kept(spec.max_steps, spec.checkpoint_interval, self.cfg.keep_last)
                    for spec in (self.cfg.stage_spec(name) for name, _ in self.plan))
        warning = guards.disk_warning(self.ckpt_dir, checkpoint_bytes, files)
        if warning:
            self.print(warning)

    def _check_memory(self) -> dict[str, str]:
        """Each planned stage's memory estimate against the device's free memory: a UserError
        when one surely cannot fit, else {stage: warning line} for those that may not."""
        available, most = available_memory(self.device)
        if available is None:
            return {}
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if self.device.type == "cpu" else 1
        available //= local  # processes of one host share its RAM
        most = most // local if most is not None else None
        warnings = {}
        for name, _ in self.plan:
            spec = self.cfg.stage_spec(name)
            estimate = lambda **kw: estimate_step_memory(
                self.model_config, self.model.get_num_params(), experts=1 if spec.data == "alternate" else 2,
                half_precision=self._half_precision_activations, **kw)
            refusal, warning = memory_verdict(estimate, available, most, name, spec.batch_size, spec.seq_len,
                                              self.cfg.gradient_checkpointing)
            if refusal:
                raise UserError(refusal)
            if warning:
                warnings[name] = warning
        return warnings

    @property
    def _half_precision_activations(self) -> bool:  # autocast on CUDA: the memory estimate's bf16/fp16 case
        return self.precision != "fp32" and self.device.type == "cuda"

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
        _check_writable(self.ckpt_dir)
        for path in remove_partial_saves(self.ckpt_dir):
            self.print(f"note: removed {path.name}, a checkpoint save interrupted by an earlier process")

    def _open_log(self, cfg: TrainConfig) -> MetricsLogger:
        if cfg.overwrite:  # as late as possible: a run that fails to start leaves the old one in place
            aside = set_aside(self.ckpt_dir, include_tensorboard=cfg.log_dir is None)
            if aside is not None:
                self.print(f"--overwrite: the earlier run in {_display(self.ckpt_dir)} was moved to {_display(aside)}")
        # TensorBoard: one step axis, each stage after the previous stages' steps.
        offsets, total = {}, 0
        for name in STAGE_ORDER:
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

    # -- output ----------------------------------------------------------------------------------
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

    def _plan(self) -> list[tuple[str, dict | None]]:
        """The stages to run, each with the checkpoint state it continues from (mid-stage) or None."""
        wanted = self.cfg.stages()
        state = self.resume_state
        if state is None:
            return [(name, None) for name in wanted]
        ck_stage, ck_step, done = state.get("stage"), int(state.get("step", 0)), bool(state.get("stage_completed"))
        if ck_stage not in STAGE_ORDER:
            raise UserError(f"checkpoint {self.cfg.resume_from} names no known stage ({ck_stage!r})")
        ck_index = STAGE_ORDER.index(ck_stage)
        if self.cfg.stage == "all":
            start = ck_index + 1 if done else ck_index
            wanted = list(STAGE_ORDER[start:])
            if not wanted:
                self.print(f"All stages are complete in {self.cfg.resume_from}; nothing to train.")
                return []
        first = STAGE_ORDER.index(wanted[0])
        if first < ck_index or (first == ck_index and done):
            hint = f"--stage {next_stage(ck_stage)}" if next_stage(ck_stage) else "a stage3 run from scratch"
            raise UserError(f"checkpoint {self.cfg.resume_from} is from {ck_stage} (step {ck_step}"
                            f"{', completed' if done else ''}); it cannot resume {wanted[0]}: use {hint} or --stage all")
        if first == ck_index:  # mid-stage: continue at ck_step + 1
            return [(wanted[0], state)] + [(name, None) for name in wanted[1:]]
        if not done:
            self.print(f"note: {ck_stage} stopped at step {ck_step} before its end; "
                       f"{wanted[0]} starts from those weights")
        return [(name, None) for name in wanted]

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

    # -- one stage -------------------------------------------------------------------------------
    def train_stage(self, spec: StageSpec, resume: dict | None) -> None:
        cfg, model = self.cfg, self.model
        model.use_fusion = spec.use_fusion
        model.train()
        start_step = 1
        # --lr_scale if given; else a mid-stage resume keeps the checkpoint's scale (halved by any
        # recovery) and a new stage starts at 1.
        saved_scale = float(resume.get("lr_scale", 1.0)) if resume is not None else 1.0
        self.lr_scale = cfg.lr_scale if cfg.lr_scale is not None else saved_scale
        optimizer = build_optimizer(model, spec.learning_rate * self.lr_scale, cfg.weight_decay)
        scheduler = build_scheduler(optimizer, spec.warmup_steps, spec.max_steps)
        if resume is not None:
            self._restore_training_state(resume, optimizer, scheduler, rescale=self.lr_scale / saved_scale)
            start_step = int(resume["step"]) + 1
            _warn_schedule_change(self, resume, spec)

        self.print(f"\nStage: {spec.title}\nDescription: {spec.description}\n{RULE}\n")
        self._report_stage_data(spec)
        self.best = guards.BestTracker(spec.name, cfg.early_stopping_patience, cfg.early_stopping_min_delta,
                                       state=(resume or {}).get("best_tracker"))
        bar = tqdm(total=spec.max_steps, initial=start_step - 1, desc=f"Stage {spec.name}",
                   disable=not self.is_main, dynamic_ncols=True)
        losses: list[float] = []
        # A step's loss and gradient norm are read back (a host sync) one step late, once the next
        # step's forward and backward are queued, so the GPU never waits for the host between
        # steps. Where the optimizer cannot skip a non-finite update on the device (fp16's
        # GradScaler, a non-fused AdamW), each step is checked before its update instead.
        lagged = bool(optimizer.defaults.get("fused")) and not self.scaler.is_enabled()
        # --cuda_graph: the step, update included, replayed from a graph (one per expert of the
        # stage); built anew with each optimizer, whose state tensors a graph has captured.
        new_graphs = lambda opt: (GraphedStep(opt, capture=self.device.type == "cuda")
                                  if cfg.cuda_graph and lagged else None)
        graphed = new_graphs(optimizer)
        pending = None  # the step whose numbers are not read yet
        profiler = StepProfiler(cfg.profile_step, self.ckpt_dir, spec.name, self.device, enabled=self.is_main)
        if cfg.profile_step is not None and not start_step <= cfg.profile_step <= spec.max_steps:
            self.print(f"note: --profile_step {cfg.profile_step} is outside this stage's steps "
                       f"{start_step}-{spec.max_steps}: nothing profiled")
        step = self._first_step = start_step
        try:
            while step <= spec.max_steps:
                self.checkpoints.check()  # a background write that failed stops the run here
                profiler.at_step_start(step)
                t0 = time.perf_counter()
                loss, grad_norm, lr, memory, updated = self._train_step(spec, step, optimizer, graphed)
                record = _StepRecord(step, loss, grad_norm, lr, memory, t0)
                late, pending = pending, None
                if late is not None:
                    late.seconds = t0 - late.t0  # its whole iteration, up to this step's start
                    if not self._read_back(spec, late, losses, bar):
                        # This step's gradients came from the weights the bad step left (it was
                        # skipped on the device): drop them and roll back.
                        optimizer.zero_grad(set_to_none=True)
                        step, optimizer, scheduler = self._recover(spec, late.step, late.values()[0], optimizer,
                                                                   scheduler, bar)
                        graphed = new_graphs(optimizer)
                        continue
                if not lagged and not self._check(record):
                    optimizer.zero_grad(set_to_none=True)
                    step, optimizer, scheduler = self._recover(spec, step, record.values()[0], optimizer,
                                                               scheduler, bar)
                    continue
                if not updated:
                    self._optimizer_step(optimizer, loss, grad_norm, skip_on_device=lagged)
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)

                last = step == spec.max_steps
                evaluate = last or (spec.eval_interval and step % spec.eval_interval == 0)
                save = last or step % spec.checkpoint_interval == 0 or self._interrupted()
                if lagged and not (evaluate or save):
                    pending = record
                    step += 1
                    continue
                if not self._read_back(spec, record, losses, bar, checked=not lagged):
                    step, optimizer, scheduler = self._recover(spec, step, record.values()[0], optimizer,
                                                               scheduler, bar)
                    graphed = new_graphs(optimizer)
                    continue
                val = self._evaluate(spec, step) if evaluate else None
                verdict = self.best.update(step, val) if val is not None else None
                best = verdict is not None and verdict.improved
                if save or best:  # a new best is saved at its step (and kept as checkpoint_{stage}_best.pt)
                    self._save(spec, step, record.values()[0], optimizer, scheduler, completed=last, val_losses=val,
                               best=best)
                if self._interrupted():
                    self._stop_interrupted(spec, step)
                if verdict is not None and verdict.stop and not last:
                    self._stop_early(spec, step, record.values()[0], optimizer, scheduler)
                    break
                step += 1
        finally:  # closed before any error line, so that line is the last one printed
            profiler.finish()
            if pending is not None:  # interrupted with a step queued: its update happened, log it
                try:
                    self._read_back(spec, pending, losses, bar)
                except Exception:  # the device itself failing: the error on its way out says why
                    pass
            bar.close()
        self.checkpoints.wait()  # the stage's last checkpoint is on disk before it is called complete
        if self.is_main:
            self.log.plot_stage(spec.name)
        self.print(f"✅ Stage {spec.name} training completed!")

    def _interrupted(self) -> bool:
        return getattr(self, "interrupt", None) is not None and self.interrupt.requested

    def _stop_interrupted(self, spec: StageSpec, step: int) -> None:
        """After Ctrl-C: the step's checkpoint is written (wait for it), then stop with one line."""
        self.checkpoints.wait()
        shown = _display(self.ckpt_dir / checkpoint_name(spec.name, step))
        raise TrainingInterrupted(f"interrupted: {spec.name} step {step} is saved in {shown}; continue with the same "
                                  f"flags (less --overwrite) and --resume_from {shlex.quote(shown)}")

    def _report_stage_data(self, spec: StageSpec) -> None:
        """The tokens the stage consumes against those the data holds (guards.py), and the
        stage's memory warning if it has one."""
        if self._memory_warnings.get(spec.name):
            self.print(self._memory_warnings[spec.name])
        num_tokens = getattr(self.data, "num_tokens", None)
        if num_tokens is None:  # synthetic tokens never repeat
            return
        held = {domain: num_tokens(domain, "train") for domain in ("text", "code")}
        uses = guards.stage_data_use(spec, spec.batch_size * self.dist.world_size, self.cfg.grad_accum_steps, held)
        for line in guards.epochs_report(spec.name, uses, spec.max_steps):
            self.print(line)
        if self.is_main:
            self.log.log_event("data", spec.name, 0, **{f"epochs_{u.domain}": u.epochs for u in uses},
                               **{f"tokens_{u.domain}": u.consumed for u in uses})

    def _stop_early(self, spec: StageSpec, step: int, loss: float, optimizer, scheduler) -> None:
        """Early stopping: the best weights back in the model, saved as the stage's final (completed)
        checkpoint at this step, from which the next stage starts."""
        best = self.best
        self.checkpoints.wait()  # the best checkpoint is on disk
        D.barrier()
        path = self.ckpt_dir / guards.best_checkpoint_name(spec.name)
        state = load_checkpoint(path)
        self.model.load_state_dict(state["model_state_dict"])
        self.print(f"⏹️ Early stopping: {self.cfg.early_stopping_patience} evaluations without the validation loss "
                   f"improving by {self.cfg.early_stopping_min_delta:g}; {spec.name} ends at step {step} with the "
                   f"best weights (step {best.best_step}, mean val loss {best.best:.4f}, {_display(path)})")
        self.log.log_event("early_stop", spec.name, step, best_step=best.best_step, best_val=best.best)
        self._save(spec, step, loss, optimizer, scheduler, completed=True, val_losses=state.get("val_losses"))

    def _check(self, record: "_StepRecord") -> bool:
        """The stability monitor's verdict on a step's loss and gradient norm (reads them back)."""
        return self.hooks["stability_monitor"].check_outputs(
            dict(zip(("loss", "grad_norm"), record.values())), record.step)

    def _read_back(self, spec: StageSpec, record: "_StepRecord", losses: list, bar, checked=False) -> bool:
        """Check (unless already checked) and log a step whose update is queued. False: non-finite."""
        if not checked and not self._check(record):
            return False
        # A step read back late was timed from its start to the next step's start; one read back at
        # once (before a checkpoint or an evaluation, or unlagged) from its start to now.
        seconds = record.seconds if record.seconds is not None else time.perf_counter() - record.t0
        step, (loss, gn) = record.step, record.values()
        losses.append(loss)
        cfg = self.cfg
        tok_s = spec.batch_size * spec.seq_len * cfg.grad_accum_steps * self.dist.world_size / max(seconds, 1e-9)
        expert = spec.batch_plan(step)[1] or "both"  # Stage 2 trains one expert per step
        self.log.log_train(spec.name, step, loss=loss, lr=record.lr, grad_norm=gn, tokens_per_s=tok_s,
                           step_time_s=seconds, lr_scale=self.lr_scale, expert=expert)
        if record.memory:
            self.log.log_memory(spec.name, step, record.memory)
        self.grad_watch.check(gn, step)  # a spike far above the recent norms: a warning line
        if step == self._first_step and (cfg.compile or cfg.cuda_graph):
            self.print(f"first step of {spec.name}: {seconds:.1f} s (compiling"
                       f"{' and capturing the CUDA graph' if cfg.cuda_graph else ''}; later steps are faster)")
        bar.set_postfix({"loss": f"{loss:.4f}", "avg_loss": f"{sum(losses) / len(losses):.4f}",
                         "lr": f"{record.lr:.2e}", "tok/s": f"{tok_s:,.0f}"}, refresh=False)
        bar.update(1)
        return True

    def _optimizer_step(self, optimizer, loss, grad_norm, skip_on_device: bool) -> None:
        if self.scaler.is_enabled():
            self.scaler.step(optimizer)  # fp16: skips a step with overflowing gradients itself
            self.scaler.update()
            return
        if skip_on_device:
            # Fused AdamW leaves parameters, moments and step counts untouched where found_inf is 1
            # (the protocol GradScaler uses): a non-finite step changes nothing, with no host sync.
            optimizer.found_inf = (~(torch.isfinite(loss) & torch.isfinite(grad_norm))).float()
        optimizer.step()

    def _train_step(self, spec: StageSpec, step: int, optimizer, graphed: GraphedStep | None = None):
        """Forward and backward of one optimizer step; with `graphed` (--cuda_graph) its AdamW
        update too, the whole step replayed from a CUDA graph. Returns (loss averaged over ranks
        and micro-batches, gradient norm before clipping, the step's lr, memory norms or None,
        whether the update is done)."""
        cfg, accum = self.cfg, self.cfg.grad_accum_steps
        kind, expert_type = spec.batch_plan(step)
        interval = cfg.resolved_memory_log_interval()
        want_memory = self.is_main and interval > 0 and step % interval == 0
        inject_nan = self._inject_nan(step)
        # Micro-batches get their own data key, so changing grad_accum_steps changes nothing else.
        batches = [self.data.get_batch(kind, (step - 1) * accum + micro + 1, spec.batch_size, spec.seq_len,
                                       seed=cfg.seed, rank=self.dist.rank, world_size=self.dist.world_size,
                                       split="train") for micro in range(accum)]
        xs = self._to_device(torch.stack([x for x, _ in batches]))
        ys = self._to_device(torch.stack([y for _, y in batches]))

        def forward_backward(xs, ys):
            total, states = torch.zeros((), device=self.device), None
            for micro in range(accum):
                return_memory = want_memory and micro == 0
                if cfg.compile and graphed is None:  # CUDA graphs (reduce-overhead): the last step's outputs are free
                    torch.compiler.cudagraph_mark_step_begin()
                with self._autocast():
                    out = self.loss_fn(xs[micro], ys[micro], expert_type=expert_type, chunk_size=cfg.chunk_size,
                                       return_memory=return_memory)
                loss, micro_states = out if return_memory else (out, None)
                loss = loss / accum
                if inject_nan and micro == 0:
                    loss = loss * float("nan")
                self.scaler.scale(loss).backward()
                total += loss.detach()
                states = micro_states if micro_states is not None else states
            D.all_reduce_gradients(self.model, self.dist.world_size)
            loss = D.all_reduce_mean(total, self.dist.world_size)
            self.scaler.unscale_(optimizer)
            params = [p for p in self.model.parameters() if p.grad is not None]
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.gradient_clip_norm)
            if self.scaler.is_enabled() and torch.isfinite(loss):
                # fp16: an overflowing gradient is routine; GradScaler skips the step and lowers the scale.
                grad_norm = torch.nan_to_num(grad_norm, nan=0.0, posinf=0.0)
            return loss, grad_norm, states

        def whole_step(xs, ys):  # --cuda_graph: the update belongs to the captured step
            loss, grad_norm, states = forward_backward(xs, ys)
            self._optimizer_step(optimizer, loss, grad_norm, skip_on_device=True)
            return loss, grad_norm, states

        lr, states = optimizer.param_groups[0]["lr"], None
        if graphed is None:
            loss, grad_norm, states = forward_backward(xs, ys)
        elif want_memory or inject_nan:  # steps unlike the others run uncaptured
            loss, grad_norm, states = whole_step(xs, ys)
        else:
            loss, grad_norm = graphed((kind, expert_type), lambda x, y: whole_step(x, y)[:2], xs, ys)
        memory = self.hooks["memory_hook"](states, step) if states is not None else None
        return loss, grad_norm, lr, memory, graphed is not None

    def _to_device(self, batch: torch.Tensor) -> torch.Tensor:
        """A CPU batch onto the device without waiting: a copy from pageable memory to a GPU
        first waits for all work queued on the stream (the previous step), so the batch goes
        through pinned memory (PyTorch's caching host allocator, reused once a copy is done)."""
        if self.device.type == "cuda":
            batch = batch.pin_memory()
        return batch.to(self.device, non_blocking=True)

    def _inject_nan(self, step: int) -> bool:
        """The recovery drill: MMREC_INJECT_NAN_AT_STEP=k makes step k's loss NaN, once per process."""
        target = os.environ.get(NAN_INJECTION_ENV)
        if self._nan_injected or not target or int(target) != step:
            return False
        self._nan_injected = True
        return True

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        # No weight-cast cache under --cuda_graph: a captured step would keep stale casts.
        return torch.autocast(self.device.type, dtype=self.autocast_dtype, cache_enabled=not self.cfg.cuda_graph)

    # -- recovery --------------------------------------------------------------------------------
    def _recover(self, spec, step, loss, optimizer, scheduler, bar):
        """Roll back to the newest loadable checkpoint after a non-finite step.
        Returns (the step to run next, optimizer, scheduler)."""
        if self.scaler.is_enabled():
            self.scaler.update()  # closes the skipped step's unscale_ (the next step's would raise)
        recovery = self.hooks["recovery"]
        what = "loss" if not math.isfinite(float(loss)) else "gradient norm"
        used_up = recovery.attempts >= recovery.max_attempts
        self.checkpoints.wait()  # the newest checkpoint may still be being written
        D.barrier()  # rank 0 may still be writing a checkpoint
        # Only this run's own trajectory, up to the failed step (not another run's newer files).
        now = position(spec.name, step)
        ok, path = recovery.recover(self.model, optimizer, scheduler,
                                    accept=lambda _, state: self.lineage.contains(state, now))
        if not ok:
            reason = (f"all {recovery.max_attempts} recovery attempts are used up" if used_up else
                      f"no checkpoint of this run to recover from in {self.ckpt_dir} (corrupt and non-finite "
                      f"ones are skipped)")
            self.log.log_event("recovery", spec.name, step, success=False, message=reason)
            raise TrainingDiverged(f"non-finite {what} at step {step} of {spec.name} and {reason}; "
                                   f"existing checkpoints are untouched (try a lower --learning_rate or --lr_scale)")
        state = recovery.last_state
        self.lr_scale *= recovery.lr_factor
        if state["stage"] == spec.name and not state.get("stage_completed"):
            next_step = int(state["step"]) + 1
        elif state.get("stage_completed") and next_stage(state["stage"]) == spec.name:
            # The newest checkpoint is the previous stage's end: restart this stage at the lower LR.
            optimizer = build_optimizer(self.model, spec.learning_rate * self.lr_scale, self.cfg.weight_decay)
            scheduler = build_scheduler(optimizer, spec.warmup_steps, spec.max_steps)
            next_step = 1
        else:
            done = ", completed" if state.get("stage_completed") else ""
            raise TrainingDiverged(f"non-finite {what} at step {step} of {spec.name}: the newest checkpoint of this "
                                   f"run, {path} ({state['stage']} step {state['step']}{done}), cannot continue "
                                   f"{spec.name}; resume explicitly with --resume_from")
        if "rng" in state:
            set_rng_state(state["rng"])
        if state.get("scaler_state_dict") and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler_state_dict"])
        message = (f"⚠️ Non-finite {what} at step {step}: recovered from {path}, learning rate "
                   f"x{recovery.lr_factor:g} (now x{self.lr_scale:g}); continuing at step {next_step}")
        self.print(message)
        self.log.log_event("recovery", spec.name, step, success=True, checkpoint=str(path),
                           resume_step=next_step, lr_scale=self.lr_scale, message=message)
        bar.n = next_step - 1
        bar.refresh()
        return next_step, optimizer, scheduler

    def _restore_training_state(self, state, optimizer, scheduler, rescale: float = 1.0) -> None:
        optimizer.load_state_dict(state["optimizer_state_dict"])
        scheduler.load_state_dict(state["scheduler_state_dict"])
        if rescale != 1.0:  # --lr_scale given on resume and different from the checkpoint's scale
            scheduler.base_lrs = [lr * rescale for lr in scheduler.base_lrs]
            for group in optimizer.param_groups:
                group["initial_lr"] *= rescale
                group["lr"] *= rescale
            scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
        if "rng" in state:
            set_rng_state(state["rng"])
        if state.get("scaler_state_dict") and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler_state_dict"])

    # -- evaluation and checkpoints --------------------------------------------------------------
    def _evaluate(self, spec: StageSpec, step: int) -> dict[str, float] | None:
        # Every rank scores its share of the windows one process with the global batch would score
        # (eval_batches x world_size batches of the per-rank batch size): the same number at any
        # world size.
        world = self.dist.world_size
        losses = {domain: evaluate_loss(self.model, self.data, domain, expert_type, spec.batch_size,
                                        spec.seq_len, max_batches=self.cfg.eval_batches * world, device=self.device,
                                        autocast_dtype=self.autocast_dtype, chunk_size=self.cfg.chunk_size,
                                        rank=self.dist.rank, world_size=world)
                  for domain, expert_type in spec.eval_plan()}
        if not self.is_main:
            return losses  # the same numbers on every rank (all-reduced): the best-checkpoint choice agrees
        self.log.log_eval(spec.name, step, losses)
        shown = ", ".join(f"val_loss_{d}={v:.4f}" for d, v in losses.items())
        if self.heldout is not None:
            held = self.heldout.score(self.model, spec.eval_plan(), spec.seq_len, self._eval_tokens(spec),
                                      self.device, self.autocast_dtype, self.cfg.chunk_size)
            if held:
                self.log.log_event(HELDOUT_TYPE, spec.name, step, **{f"heldout_loss_{d}": v for d, v in held.items()})
                shown += ", " + ", ".join(f"heldout_loss_{d}={v:.4f}" for d, v in held.items())
        self.print(f"📊 {spec.name} step {step}: {shown}")
        return losses

    def _save(self, spec, step, loss, optimizer, scheduler, completed, val_losses=None, best=False) -> None:
        D.barrier()
        path = self.ckpt_dir / checkpoint_name(spec.name, step)
        if self.is_main:
            model_config = self.model.config.to_dict()
            model_config["use_fusion"] = bool(self.model.use_fusion)
            state = {
                "model_state_dict": self.model.state_dict(),
                "optimizer_state_dict": optimizer.state_dict(),
                "scheduler_state_dict": scheduler.state_dict(),
                "step": step,
                "loss": loss,
                "stage": spec.name,
                "config": model_config,
                "train_args": self.cfg.to_dict(),
                "rng": rng_state(),
                "data_position": {"stage": spec.name, "next_step": step + 1, "seed": self.cfg.seed},
                "stage_completed": completed,
                "lr_scale": self.lr_scale,
                "world_size": self.dist.world_size,
                "run_id": self.lineage.run_id,
                "lineage": self.lineage.to_list(),
                "optimizer_param_names": optimizer_param_names(self.model, optimizer),
                "val_losses": val_losses,
                "tokenizer": None if self.tokenizer is None else self.tokenizer.to_json(),
                "best_tracker": self.best.state_dict() if self.best is not None else None,
            }
            if self.scaler.is_enabled():
                state["scaler_state_dict"] = self.scaler.state_dict()
            keep_last = self.cfg.keep_last

            def written(path):  # in the writer thread, once the file is complete
                self.print(f"💾 Checkpoint saved: {_display(path)}")
                if best:  # linked before pruning, so --keep_last cannot take it
                    guards.keep_as_best(path, spec.name)
                prune_checkpoints(self.ckpt_dir, spec.name, keep_last, upto_step=step)
            self.checkpoints.save(state, path, written)
        D.barrier()


# -- helpers -------------------------------------------------------------------------------------
def _has_triton() -> bool:
    try:
        from torch.utils._triton import has_triton
        return has_triton()
    except ImportError:
        return False


def _check_writable(directory: Path) -> None:
    """Fail before training, not at the first checkpoint, when the directory cannot be written."""
    probe = directory / f".write_test_{os.getpid()}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write to checkpoint directory {directory} ({e.strerror or e}); "
                        f"pick another --checkpoint_dir") from None


def _check_same_model(state: dict, config: MMRecConfig, path) -> None:
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
        shown = ", ".join(f"{k}={theirs[k]} (flags: {ours[k]})" for k in diff)
        flags = " ".join(f"--{k} {theirs[k]}" for k in diff if k in ("vocab_size", "expert_dim", "num_layers",
                                                                      "num_heads", "ffn_dim"))
        preset = (state.get("train_args") or {}).get("preset")
        hint = f"--preset {preset}" if preset else ""
        hint = " ".join(h for h in (hint, flags) if h) or "the model flags it was trained with"
        raise UserError(f"checkpoint {path} is of another model: {shown}; resume it with {hint}")


def _warn_schedule_change(trainer: Trainer, state: dict, spec: StageSpec) -> None:
    before = state.get("train_args") or {}
    changed = [f"{k} {before[k]} -> {getattr(trainer.cfg, k)}"
               for k in ("seq_len", "max_steps", "learning_rate", "warmup_steps", "grad_accum_steps",
                         "seed", "preset")
               if k in before and before[k] != getattr(trainer.cfg, k)]
    # --batch_size is per process: what matters is the global batch (a resume on another number of
    # GPUs that keeps it trains on the same batches).
    b_then, b_now = before.get("batch_size"), trainer.cfg.batch_size
    w_then, w_now = int(state.get("world_size", 1)), trainer.dist.world_size
    if b_then is not None and b_now is not None and b_then * w_then != b_now * w_now:
        changed.insert(0, f"global batch {b_then * w_then} -> {b_now * w_now} "
                          f"(batch_size {b_then} x {w_then} -> {b_now} x {w_now} processes)")
    if changed:
        trainer.print(f"note: resuming {spec.name} with changed settings: {', '.join(changed)}")


def _route_monitor_logs(name: str, is_main: bool):
    """Monitoring warnings appear as lines above the progress bar (rank 0 only), not on stderr.
    Returns a function that puts the logger back as it was (for callers that train in-process)."""
    logger = logging.getLogger(name)
    before = (logger.propagate, logger.level)
    logger.propagate = False
    for h in list(logger.handlers):
        if getattr(h, "_mmrec_trainer", False):
            logger.removeHandler(h)
    handler = _TqdmHandler() if is_main else logging.NullHandler()
    handler._mmrec_trainer = True
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)

    def restore() -> None:
        logger.removeHandler(handler)
        logger.propagate = before[0]
        logger.setLevel(before[1])
    return restore


class _TqdmHandler(logging.Handler):
    def emit(self, record):
        tqdm.write(f"⚠️ {record.getMessage()}")


def _display(path: Path) -> str:
    """./checkpoints/x.pt for a relative --checkpoint_dir, as in the guide."""
    s = str(path)
    return s if path.is_absolute() or s.startswith(".") else f"./{s}"


__all__ = ["Trainer"]
