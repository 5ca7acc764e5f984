"""The staged training loop (guide §2, §4; ARCHITECTURE.md, "The three stages").

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
model trains through exactly this code (a benchmark's Transformer baseline). The trainer uses of it:
`loss(x, y, expert_type=, chunk_size=, return_memory=)` (the mean loss; with return_memory, also
the memory states for the norm monitor, or None), `use_fusion` and `use_gradient_checkpointing`
(attributes it sets per stage / run), `get_num_params()`, `config.to_dict()` (saved in
checkpoints), and, with --compile and --compile_scope layer, `compile_blocks(mode=)`.
"""
from __future__ import annotations

import math
import os
import time
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
from . import distributed as D
from . import guards, hints, preflight
from .checkpoint import (CheckpointWriter, check_finite, checkpoint_name, load_checkpoint, prune_checkpoints,
                         remove_partial_saves, rng_state)
from .config import TrainConfig, resolve_speed
from .console import display, route_monitor_logs
from .data import open_training_data
from .evaluation import evaluate_loss
from .heldout import HeldoutSet
from .interrupt import GracefulInterrupt, TrainingInterrupted
from .metrics import HELDOUT_TYPE, METRICS_FILE, MetricsLogger, NullLogger
from .optim import build_optimizer, build_scheduler
from .profiling import StepProfiler
from .recovery import Lineage, new_run_id, optimizer_param_names, roll_back
from .resume import (check_same_model, plan_stages, restore_rng_and_scaler, restore_training_state, schedule_changes,
                     stage_lr_scale)
from .rundir import find_previous_run, refuse_reuse, set_aside
from .runlock import RunLock
from .stages import STAGE_NAMES, StageSpec
from .step import StepRecord, skips_on_device, train_step
from .step_graph import GraphedStep, inner_compile_mode

RULE = "=" * 60
NAN_INJECTION_ENV = "MMREC_INJECT_NAN_AT_STEP"


def build_mmrec(config: MMRecConfig) -> torch.nn.Module:
    """The trainer's default model."""
    return MMRec100M(config=config)


class Trainer:
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
        from ..utils.monitoring import LOGGER_NAME, GradNormWatch, create_monitoring_hooks
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

    # -- one stage -------------------------------------------------------------------------------
    def train_stage(self, spec: StageSpec, resume: dict | None) -> None:
        self.model.use_fusion = spec.use_fusion
        self.model.train()
        self.lr_scale, saved_scale = stage_lr_scale(self.cfg, resume)
        optimizer, scheduler = self._new_optimizer(spec)
        start_step = 1
        if resume is not None:
            restore_training_state(resume, optimizer, scheduler, self.scaler, rescale=self.lr_scale / saved_scale)
            start_step = int(resume["step"]) + 1
            changed = schedule_changes(self.cfg, resume, self.dist.world_size)
            if changed:
                self.print(hints.changed_settings(spec.name, changed))
        self.print(f"\nStage: {spec.title}\nDescription: {spec.description}\n{RULE}\n")
        self._report_stage_data(spec)
        self.best = guards.BestTracker(spec.name, self.cfg.early_stopping_patience, self.cfg.early_stopping_min_delta,
                                       state=(resume or {}).get("best_tracker"))
        bar = tqdm(total=spec.max_steps, initial=start_step - 1, desc=f"Stage {spec.name}",
                   disable=not self.is_main, dynamic_ncols=True)
        losses: list[float] = []
        # A step's loss and gradient norm are read back (a host sync) one step late, once the next
        # step is queued, so the GPU never waits for the host between steps. Where the optimizer
        # cannot skip a non-finite update on the device (fp16's GradScaler, a non-fused AdamW), and
        # before a checkpoint or an evaluation, a step is read back at once.
        lagged = skips_on_device(optimizer) and not self.scaler.is_enabled()
        graphed = self._new_graphs(optimizer, lagged)
        pending = None  # the step whose numbers are not read yet
        profiler = StepProfiler(self.cfg.profile_step, self.ckpt_dir, spec.name, self.device, enabled=self.is_main)
        if self.cfg.profile_step is not None and not start_step <= self.cfg.profile_step <= spec.max_steps:
            self.print(f"note: --profile_step {self.cfg.profile_step} is outside this stage's steps "
                       f"{start_step}-{spec.max_steps}: nothing profiled")
        step = self._first_step = start_step
        try:
            while step <= spec.max_steps:
                self.checkpoints.check()  # a background write that failed stops the run here
                profiler.at_step_start(step)
                record = self._train_step(spec, step, optimizer, graphed)
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                last = step == spec.max_steps
                evaluate = last or bool(spec.eval_interval and step % spec.eval_interval == 0)
                save = last or step % spec.checkpoint_interval == 0 or self._interrupted()
                read_now = not lagged or evaluate or save
                late, pending = pending, (None if read_now else record)
                if late is not None:
                    late.seconds = record.t0 - late.t0  # its whole iteration, up to this step's start
                failed = self._settle(spec, [late, record if read_now else None], losses, bar)
                if failed is not None:  # skipped on the device (or before its update): roll back
                    pending = None
                    step, optimizer, scheduler = self._recover(spec, failed, optimizer, scheduler, bar)
                    graphed = self._new_graphs(optimizer, lagged)
                    continue
                if read_now and self._after_step(spec, step, record, optimizer, scheduler, evaluate, save, last):
                    break
                step += 1
        finally:  # closed before any error line, so that line is the last one printed
            profiler.finish()
            if pending is not None:  # interrupted with a step queued: its update happened, log it
                try:
                    self._settle(spec, [pending], losses, bar)
                except Exception:  # the device itself failing: the error on its way out says why
                    pass
            bar.close()
        self.checkpoints.wait()  # the stage's last checkpoint is on disk before it is called complete
        if self.is_main:
            self.log.plot_stage(spec.name)
        self.print(f"✅ Stage {spec.name} training completed!")

    def _new_optimizer(self, spec: StageSpec):
        """The stage's AdamW and warmup+cosine schedule, at the run's learning-rate scale."""
        optimizer = build_optimizer(self.model, spec.learning_rate * self.lr_scale, self.cfg.weight_decay)
        return optimizer, build_scheduler(optimizer, spec.warmup_steps, spec.max_steps)

    def _new_graphs(self, optimizer, lagged: bool) -> GraphedStep | None:
        """--cuda_graph: the step, update included, replayed from a graph (one per expert of the
        stage); built anew with each optimizer, whose state tensors a graph has captured."""
        return GraphedStep(optimizer, capture=self.device.type == "cuda") if self.cfg.cuda_graph and lagged else None

    def _train_step(self, spec: StageSpec, step: int, optimizer, graphed: GraphedStep | None = None) -> StepRecord:
        """One optimizer step (step.py) on this step's batches; with `graphed` (--cuda_graph)
        replayed from a CUDA graph, except the steps unlike the others (memory logging, the NaN drill)."""
        cfg, accum = self.cfg, self.cfg.grad_accum_steps
        t0 = time.perf_counter()
        kind, expert_type = spec.batch_plan(step)
        interval = cfg.resolved_memory_log_interval()
        want_memory = self.is_main and interval > 0 and step % interval == 0
        poison = self._inject_nan(step)
        loss_fn = _poisoned(self.loss_fn) if poison else self.loss_fn
        # Micro-batches get their own data key, so changing grad_accum_steps changes nothing else.
        batches = [self.data.get_batch(kind, (step - 1) * accum + micro + 1, spec.batch_size, spec.seq_len,
                                       seed=cfg.seed, rank=self.dist.rank, world_size=self.dist.world_size,
                                       split="train") for micro in range(accum)]
        xs = self._to_device(torch.stack([x for x, _ in batches]))
        ys = self._to_device(torch.stack([y for _, y in batches]))

        def step_fn(xs, ys, return_memory=False):
            return train_step(self.model, optimizer, xs, ys, loss_fn, clip_norm=cfg.gradient_clip_norm,
                              autocast_dtype=self.autocast_dtype, autocast_cache=not cfg.cuda_graph,
                              scaler=self.scaler, world_size=self.dist.world_size,
                              mark_step_begin=cfg.compile and graphed is None, expert_type=expert_type,
                              chunk_size=cfg.chunk_size, return_memory=return_memory)

        lr = optimizer.param_groups[0]["lr"]
        if graphed is not None and not (want_memory or poison):  # steps unlike the others run uncaptured
            loss, grad_norm = graphed((kind, expert_type), lambda x, y: step_fn(x, y)[:2], xs, ys)
            states = None
        else:
            loss, grad_norm, states = step_fn(xs, ys, return_memory=want_memory)
        memory = self.hooks["memory_hook"](states, step) if states is not None else None
        return StepRecord(step, loss, grad_norm, lr, memory, t0)

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

    def _settle(self, spec: StageSpec, records: list, losses: list, bar) -> StepRecord | None:
        """Check the steps `records` (None entries skipped) in order and log each finite one; the
        first that is not finite is returned, unlogged, and the rest left alone."""
        for record in records:
            if record is None:
                continue
            if not self.hooks["stability_monitor"].check_outputs(dict(zip(("loss", "grad_norm"), record.values())),
                                                                 record.step):
                return record
            self._read_back(spec, record, losses, bar)
        return None

    def _read_back(self, spec: StageSpec, record: StepRecord, losses: list, bar) -> None:
        """Log a finite step (metrics, progress bar, gradient-norm watch)."""
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

    def _recover(self, spec: StageSpec, failed: StepRecord, optimizer, scheduler, bar):
        """Roll back to this run's newest loadable checkpoint after the non-finite step `failed`
        (recovery.roll_back). Returns (the step to run next, optimizer, scheduler)."""
        recovery, step = self.hooks["recovery"], failed.step
        what = "gradient norm" if math.isfinite(failed.values()[0]) else "loss"
        self.checkpoints.wait()  # the newest checkpoint may still be being written
        D.barrier()  # rank 0 may still be writing a checkpoint
        back = roll_back(recovery, self.model, optimizer, scheduler, self.lineage, spec.name, step, what,
                         on_failure=lambda reason: self.log.log_event("recovery", spec.name, step, success=False,
                                                                      message=reason))
        self.lr_scale *= recovery.lr_factor
        if back.restart_stage:  # from the previous stage's end: this stage restarts at the lower LR
            optimizer = build_optimizer(self.model, spec.learning_rate * self.lr_scale, self.cfg.weight_decay)
            scheduler = build_scheduler(optimizer, spec.warmup_steps, spec.max_steps)
        restore_rng_and_scaler(back.state, self.scaler)
        message = (f"⚠️ Non-finite {what} at step {step}: recovered from {back.path}, learning rate "
                   f"x{recovery.lr_factor:g} (now x{self.lr_scale:g}); continuing at step {back.next_step}")
        self.print(message)
        self.log.log_event("recovery", spec.name, step, success=True, checkpoint=str(back.path),
                           resume_step=back.next_step, lr_scale=self.lr_scale, message=message)
        bar.n = back.next_step - 1
        bar.refresh()
        return back.next_step, optimizer, scheduler

    # -- after a step: evaluation, checkpoints, stopping -------------------------------------------
    def _after_step(self, spec, step, record, optimizer, scheduler, evaluate, save, last) -> bool:
        """Validation, checkpoint, Ctrl-C and early stopping after a step read back at once.
        True: the stage ends here (early stopping)."""
        val = self._evaluate(spec, step) if evaluate else None
        verdict = self.best.update(step, val) if val is not None else None
        best = verdict is not None and verdict.improved
        if save or best:  # a new best is saved at its step (and kept as checkpoint_{stage}_best.pt)
            self._save(spec, step, record.values()[0], optimizer, scheduler, completed=last, val_losses=val,
                       best=best)
        if self._interrupted():
            self.checkpoints.wait()  # the step's checkpoint is written: stop with one line
            shown = display(self.ckpt_dir / checkpoint_name(spec.name, step))
            raise TrainingInterrupted(hints.interrupted(spec.name, step, shown))
        if verdict is not None and verdict.stop and not last:
            self._stop_early(spec, step, record.values()[0], optimizer, scheduler)
            return True
        return False

    def _interrupted(self) -> bool:
        return getattr(self, "interrupt", None) is not None and self.interrupt.requested

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
                   f"best weights (step {best.best_step}, mean val loss {best.best:.4f}, {display(path)})")
        self.log.log_event("early_stop", spec.name, step, best_step=best.best_step, best_val=best.best)
        self._save(spec, step, loss, optimizer, scheduler, completed=True, val_losses=state.get("val_losses"))

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
                self.print(f"💾 Checkpoint saved: {display(path)}")
                if best:  # linked before pruning, so --keep_last cannot take it
                    guards.keep_as_best(path, spec.name)
                prune_checkpoints(self.ckpt_dir, spec.name, keep_last, upto_step=step)
            self.checkpoints.save(state, path, written)
        D.barrier()


def _poisoned(loss_fn):
    """`loss_fn` whose first call's loss is NaN (the recovery drill's step)."""
    calls = []

    def poisoned(*args, **kwargs):
        out = loss_fn(*args, **kwargs)
        if calls:
            return out
        calls.append(1)
        return (out[0] * float("nan"), *out[1:]) if isinstance(out, tuple) else out * float("nan")
    return poisoned


__all__ = ["Trainer", "build_mmrec"]
