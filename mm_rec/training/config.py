"""TrainConfig: every flag of `python -m mm_rec.scripts.train_modular` in one dataclass.

Values come from three layers, later ones winning: the dataclass defaults (None means "the stage's
or the preset's default", see stages.py), an optional `--config FILE` (YAML or JSON, keys are the
flag names), and the flags given on the command line. The argparse parser is generated from the
dataclass, so a field added here is a flag, a config-file key and a checkpoint entry at once.
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..model.config import PRESETS, MMRecConfig
from ..utils.cli import ArgumentParser
from ..utils.errors import UserError
from .stages import SCHEDULES, STAGE_NAMES, StageSpec

MODEL_FLAGS = ("vocab_size", "expert_dim", "num_layers", "num_heads", "ffn_dim")
PRECISIONS = ("fp32", "bf16", "fp16")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
COMPILE_SCOPES = ("layer", "model")


def _opt(default=None, help="", type=None, choices=None, group="training"):
    return field(default=default, metadata=dict(help=help, type=type, choices=choices, group=group))


def _flag(help="", group="training"):
    return field(default=False, metadata=dict(help=help, type=bool, choices=None, group=group))


def _files(help="", group="data"):
    """A flag taking one or more paths (`--heldout_text a.txt b/`); a list in a config file."""
    return field(default=None, metadata=dict(help=help, type=str, choices=None, group=group, nargs="+"))


@dataclass
class TrainConfig:
    # -- what to run ---------------------------------------------------------------------------
    stage: str = _opt("all", "stage to train: stage1, stage2, stage3 or all (stage1 -> stage3)",
                      str, ("stage1", "stage2", "stage3", "all"), "run")
    preset: str = _opt("100m", "model size and schedule: 100m (the guide's) or tiny (a CPU demo)",
                       str, tuple(SCHEDULES), "run")
    resume_from: str | None = _opt(None, "checkpoint to resume (mid-stage) or to start the next stage from",
                                   str, group="run")
    # -- model (override the preset) -----------------------------------------------------------
    vocab_size: int | None = _opt(None, "vocabulary size (must match the tokenizer)", int, group="model")
    expert_dim: int | None = _opt(None, "channels of each expert", int, group="model")
    num_layers: int | None = _opt(None, "blocks per expert", int, group="model")
    num_heads: int | None = _opt(None, "heads of the long-term memory", int, group="model")
    ffn_dim: int | None = _opt(None, "FFN hidden size", int, group="model")
    # -- schedule (None = the stage's default from the preset) -----------------------------------
    batch_size: int | None = _opt(None, "sequences per step and process (stage default: 4/2/4)", int)
    seq_len: int | None = _opt(None, "tokens per sequence (stage default: 512/8192/4096)", int)
    max_steps: int | None = _opt(None, "optimizer steps per stage (stage default: 5000/10000/5000)", int)
    learning_rate: float | None = _opt(None, "peak learning rate (stage default: 3e-4/1e-4/5e-5)", float)
    warmup_steps: int | None = _opt(None, "linear warmup steps (stage default: 500/1000/500)", int)
    grad_accum_steps: int = _opt(1, "micro-batches accumulated per optimizer step", int)
    gradient_clip_norm: float = _opt(1.0, "clip the global gradient norm to this value", float)
    weight_decay: float = _opt(0.1, "AdamW weight decay (matrices only)", float)
    lr_scale: float | None = _opt(None, "multiply every learning rate by this (default: 1, or on resume the "
                                        "checkpoint's scale, which recovery halves)", float)
    chunk_size: int | None = _opt(None, "process sequences this many tokens at a time (saves memory)", int)
    seed: int = _opt(1337, "seed of the initialisation and of the data order", int)
    # -- data ------------------------------------------------------------------------------------
    data_dir: str | None = _opt(None, "a prepare_data output directory (default: the bundled corpus)",
                                str, group="data")
    synthetic: bool = _flag("train on uniform random tokens (the guide's quick test)", "data")
    heldout_text: list | None = _files("text files or directories never trained on, scored at each evaluation "
                                       "beside the validation split (logged as heldout_loss_text)")
    heldout_code: list | None = _files("code files or directories never trained on, scored at each evaluation "
                                       "(logged as heldout_loss_code)")
    # -- checkpoints and logs ----------------------------------------------------------------------
    checkpoint_dir: str = _opt("./checkpoints", "where checkpoints, metrics.jsonl and plots go; a new run "
                                                "(no --resume_from) refuses a directory that already holds one "
                                                "unless --overwrite is given", str, group="output")
    overwrite: bool = _flag("start a new run in a --checkpoint_dir that already holds one. Nothing is deleted: "
                            "the earlier run's checkpoints, metrics.jsonl, plots and tensorboard/ are moved "
                            "into CHECKPOINT_DIR/previous_run.bak-TIMESTAMP/", "output")
    checkpoint_interval: int | None = _opt(None, "save every N steps (stage default: 100/200/100)", int,
                                           group="output")
    keep_last: int = _opt(5, "keep only the newest K checkpoints of a stage (0: keep all); the stage's final "
                             "and best checkpoints always stay", int,
                          group="output")
    eval_interval: int | None = _opt(None, "validate every N steps, 0 only at a stage's end "
                                           "(stage default: 500/1000/500)", int, group="output")
    eval_batches: int = _opt(8, "validation batches (of the global batch) per domain", int, group="output")
    early_stopping_patience: int = _opt(0, "end a stage after this many evaluations in a row without the "
                                           "mean validation loss improving by --early_stopping_min_delta; the "
                                           "next stage starts from the stage's best checkpoint, "
                                           "CHECKPOINT_DIR/checkpoint_STAGE_best.pt (0: off, the default)", int,
                                        group="output")
    early_stopping_min_delta: float = _opt(0.01, "improvement (nats/token) of the mean validation loss over "
                                                 "the best so far that resets --early_stopping_patience", float,
                                           group="output")
    memory_log_interval: int | None = _opt(None, "log memory-state norms every N steps "
                                                 "(default 100; tiny: 10; 0 disables)", int, group="output")
    profile_step: int | None = _opt(None, "profile steps N..N+2 of each stage with torch.profiler: a Chrome "
                                          "trace and a table of the top ops in CHECKPOINT_DIR", int, group="output")
    log_dir: str | None = _opt(None, "TensorBoard directory (default: CHECKPOINT_DIR/tensorboard)", str,
                               group="output")
    wandb: bool = _flag("log to Weights & Biases (offline unless configured)", "output")
    wandb_project: str = _opt("mmrec-100m", "wandb project name", str, group="output")
    # -- hardware ----------------------------------------------------------------------------------
    device: str | None = _opt(None, "cuda, cuda:N or cpu (default: cuda if available)", str, group="hardware")
    precision: str | None = _opt(None, "fp32, bf16 or fp16 (default: bf16 on CUDA, fp32 on CPU)", str,
                                 PRECISIONS, "hardware")
    gradient_checkpointing: bool = _flag("recompute activations in the backward pass", "hardware")
    compile: bool = _flag("torch.compile the model (the default on CUDA; --no_compile turns it off)", "hardware")
    no_compile: bool = _flag("run eagerly: no torch.compile (the default on the CPU)", "hardware")
    compile_mode: str = _opt("default", "torch.compile mode with --compile: default, reduce-overhead (CUDA graphs: "
                             "fewer launches, best for short sequences) or max-autotune", str,
                             COMPILE_MODES, "hardware")
    compile_scope: str = _opt("layer", "what --compile compiles: layer (one graph serves every layer: compiles in "
                              "seconds) or model (the whole loss: minutes to compile, less host work per step)",
                              str, COMPILE_SCOPES, "hardware")
    cuda_graph: bool = _flag("capture the whole training step (forward, backward, clipping, AdamW) as one CUDA "
                             "graph and replay it: no host work per kernel, best for short sequences "
                             "(CUDA, one process, bf16 or fp32; with --compile its parts run inside it). The default "
                             "on CUDA where the step can be captured; --no_cuda_graph turns it off", "hardware")
    no_cuda_graph: bool = _flag("do not capture the step as a CUDA graph", "hardware")

    # ---------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        """A TrainConfig from a checkpoint's train_args (ignores keys this version does not know)."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def model_config(self) -> MMRecConfig:
        values = dict(PRESETS[self.preset])
        values.update({k: getattr(self, k) for k in MODEL_FLAGS if getattr(self, k) is not None})
        try:
            return MMRecConfig(**values)
        except ValueError as e:
            raise UserError(f"invalid model size: {e}") from None

    def stage_spec(self, name: str) -> StageSpec:
        """The stage's preset defaults with the user's flags applied."""
        return SCHEDULES[self.preset][name].with_overrides(
            seq_len=self.seq_len, learning_rate=self.learning_rate, warmup_steps=self.warmup_steps,
            max_steps=self.max_steps, batch_size=self.batch_size,
            checkpoint_interval=self.checkpoint_interval, eval_interval=self.eval_interval)

    def stages(self) -> list[str]:
        return list(STAGE_NAMES) if self.stage == "all" else [self.stage]

    def resolved_memory_log_interval(self) -> int:
        if self.memory_log_interval is not None:
            return self.memory_log_interval
        return 10 if self.preset == "tiny" else 100

    def validate(self) -> "TrainConfig":
        positive = ("batch_size", "seq_len", "max_steps", "learning_rate", "grad_accum_steps",
                    "gradient_clip_norm", "lr_scale", "chunk_size", "checkpoint_interval", "eval_batches",
                    "profile_step", *MODEL_FLAGS)
        for name in positive:
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise UserError(f"--{name} must be positive (got {value})")
        for name in ("warmup_steps", "keep_last", "eval_interval", "weight_decay", "memory_log_interval",
                     "early_stopping_patience", "early_stopping_min_delta"):
            value = getattr(self, name)
            if value is not None and not value >= 0:  # NaN too
                raise UserError(f"--{name} must be zero or positive (got {value})")
        if self.overwrite and self.resume_from is not None:
            raise UserError("--overwrite starts a new run and --resume_from continues one; pick one")
        for on, off in (("compile", "no_compile"), ("cuda_graph", "no_cuda_graph")):
            if getattr(self, on) and getattr(self, off):
                raise UserError(f"--{on} and --{off} exclude each other; pick one")
        if self.synthetic and (self.heldout_text or self.heldout_code):
            raise UserError("--heldout_text/--heldout_code need a tokenizer, which --synthetic has none of; "
                            "drop them or train on real data")
        for name in ("heldout_text", "heldout_code"):
            for path in getattr(self, name) or []:
                if not Path(path).exists():
                    raise UserError(f"--{name} {path} does not exist; give existing files or directories")
        if self.data_dir is not None and self.synthetic:
            raise UserError("--data_dir and --synthetic exclude each other; pick one")
        if self.data_dir is not None and not Path(self.data_dir).is_dir():
            raise UserError(f"--data_dir {self.data_dir} is not a directory; "
                            f"create one with python -m mm_rec.scripts.prepare_data")
        self.model_config()  # raises on inconsistent sizes (e.g. expert_dim not divisible by num_heads)
        return self


@dataclass(frozen=True)
class SpeedSettings:
    """Whether the run compiles and captures its step, and why a default was left off (a note)."""
    compile: bool
    cuda_graph: bool
    note: str | None = None


def resolve_speed(cfg: TrainConfig, device_type: str, world_size: int, precision: str, dropout: float,
                  has_triton: bool = True) -> SpeedSettings:
    """--compile and --cuda_graph as the run will use them.

    Given flags win (an impossible --cuda_graph is refused later, with its reason). Without them,
    CUDA compiles and captures the step, the fast path measured in benchmarks/README.md; the CPU
    runs eagerly (compiling costs more there than it saves on a short run). A default that cannot
    apply (no Triton, torchrun, fp16's host-side loss scaling, dropout recomputed under
    --gradient_checkpointing) falls back to the slower path with a note, so that no command
    that is valid as typed fails because of a default.
    """
    cuda = device_type == "cuda"
    notes = []
    if cfg.compile or cfg.no_compile:
        compile_ = cfg.compile
    elif cuda and not has_triton:
        compile_ = False
        notes.append("no torch.compile (Triton is not installed: pip install triton)")
    else:
        compile_ = cuda
    if cfg.cuda_graph or cfg.no_cuda_graph:
        cuda_graph = cfg.cuda_graph
    elif not cuda:
        cuda_graph = False
    else:
        why = ("it runs in one process (torchrun here)" if world_size > 1 else
               "fp16's loss scaling decides on the host" if precision == "fp16" else
               "dropout recomputed by --gradient_checkpointing needs the RNG state"
               if dropout > 0 and cfg.gradient_checkpointing else None)
        cuda_graph = why is None
        if why:
            notes.append(f"the step is not captured as a CUDA graph ({why})")
    note = ("note: " + "; ".join(notes) + " - training runs slower, nothing else changes") if notes else None
    return SpeedSettings(compile_, cuda_graph, note)


def _bool_value(name, value):
    if isinstance(value, bool):
        return value
    raise UserError(f"config key {name!r} must be true or false (got {value!r})")


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="python -m mm_rec.scripts.train_modular",
                     description="Staged training of the MM-Rec modular model (see the training guide).",
                     argument_default=argparse.SUPPRESS)
    parser.add_argument("--config", help="YAML or JSON file of flag values; flags given here override it")
    groups = {}
    for f in dataclasses.fields(TrainConfig):
        meta = f.metadata
        group = groups.setdefault(meta["group"], parser.add_argument_group(meta["group"]))
        if meta["type"] is bool:
            group.add_argument(f"--{f.name}", action="store_true", help=meta["help"])
        elif meta.get("nargs"):
            group.add_argument(f"--{f.name}", nargs=meta["nargs"], metavar="PATH", help=meta["help"])
        else:
            group.add_argument(f"--{f.name}", type=meta["type"], choices=meta["choices"],
                               metavar=f.name.upper() if meta["choices"] is None else None,
                               help=meta["help"] + (f" (default: {f.default})" if f.default is not None else ""))
    return parser


def load_config_file(path: str) -> dict:
    """Flag values from a YAML/JSON mapping; unknown keys and wrong types are UserErrors."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))  # JSON is valid YAML
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise UserError(f"config file {path} is not valid YAML/JSON ({type(e).__name__})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping of flag names to values")
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    values = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in fields:
            raise UserError(f"config file {path}: unknown key {key!r}")
        meta = fields[name].metadata
        if meta["type"] is bool:
            value = _bool_value(name, value)
        elif meta.get("nargs") and value is not None:
            values_list = value if isinstance(value, list) else [value]
            if not all(isinstance(v, str) for v in values_list):
                raise UserError(f"config file {path}: {name} must be a path or a list of paths")
            value = values_list
        elif value is not None:
            try:
                value = meta["type"](value)
            except (TypeError, ValueError):
                raise UserError(f"config file {path}: {name} must be {meta['type'].__name__} (got {value!r})") from None
            if meta["choices"] and value not in meta["choices"]:
                raise UserError(f"config file {path}: {name} must be one of {', '.join(meta['choices'])}")
        values[name] = value
    return values


def parse_args(argv=None) -> TrainConfig:
    args = vars(build_parser().parse_args(argv))
    values = load_config_file(args.pop("config")) if "config" in args else {}
    values.update(args)
    return TrainConfig(**values).validate()


__all__ = ["TrainConfig", "SpeedSettings", "resolve_speed", "build_parser", "parse_args", "load_config_file"]
