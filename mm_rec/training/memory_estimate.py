"""How much memory a stage's training step needs, estimated before the first step.

The guide's Stage 2 (2 x 8192 tokens, fp32 on a CPU) takes about 24 GB within a minute; on a
smaller machine the kernel killed it without a word (issue 26). The trainer now compares this
estimate with what the device has free (CUDA: torch.cuda.mem_get_info; CPU: MemAvailable in
/proc/meminfo) and says what to do before starting.

The formula, in bytes, for one process:

    total  = BASE + 16 P + head + OVERHEAD x activations
    P      = parameters; 16 bytes each: fp32 weights, gradients and AdamW's two moments
    head   = 12 x min(4096, tokens) x vocab: one chunk of LM-head logits, in fp32, with their
             softmax and gradient (model.loss runs the head 4096 tokens at a time)
    tokens = batch_size x seq_len (one micro-batch)
    activations = tokens x experts x (layers x per_layer + per_token)        (saved for backward)
    per_layer   = 282 x expert_dim + 4 x ffn_dim       (fp32: ~70 values per channel, 1 per FFN unit)
    per_token   = 32 x expert_dim + 4000               (embedding, norms and fusion inputs)
    with --gradient_checkpointing: layers x 4 x expert_dim (each block's input) + per_token, plus
    one block's activations rebuilt at a time in backward (tokens x per_layer)

per_layer and per_token were fitted to the bytes of the tensors autograd saves (counted with
torch.autograd.graph.saved_tensors_hooks) for four small configurations (expert_dim 64/128, ffn
256-1024, 2-4 layers); the fit predicts the 100M model's measured 1.49 MB per token (one expert,
128 tokens) within 2% and its 153 KB with checkpointing. The peak resident memory of a CPU step
(forward, backward, AdamW) measured 1.24-1.46 times these bytes above the rest (allocator caching,
temporaries; four configurations, with and without checkpointing), hence OVERHEAD = 1.5 for the
estimate and FLOOR_OVERHEAD = 1.2, below every measured step, for the floor: a stage whose floor
exceeds all the memory there is (free RAM and swap) is refused, one whose estimate exceeds the
free memory gets a warning.

Under bf16/fp16 autocast on CUDA, saved tensors are 2 or 4 bytes each: the floor takes half the
fp32 activations and the estimate 0.75 of them. This is not calibrated on a GPU, so on CUDA the
trainer only warns, never refuses.
"""
from __future__ import annotations

from dataclasses import dataclass

BASE = 400 << 20          # the Python process with torch loaded (CPU RSS measured ~400 MB)
OVERHEAD = 1.5
FLOOR_OVERHEAD = 1.2
HEAD_CHUNK = 4096
GB = 1 << 30


@dataclass(frozen=True)
class MemoryEstimate:
    floor: int       # bytes the step cannot do without
    typical: int     # bytes it is expected to peak at

    def gb(self) -> str:
        return f"{self.typical / GB:.1f} GB"


def estimate_step_memory(model_config, num_params: int, batch_size: int, seq_len: int, experts: int,
                         gradient_checkpointing: bool = False, half_precision: bool = False) -> MemoryEstimate:
    """The formula of the module docstring. experts: how many run in a step (2, or 1 in Stage 2)."""
    d, layers, ffn = model_config.expert_dim, model_config.num_layers, model_config.ffn_dim
    tokens = batch_size * seq_len
    per_layer = 282 * d + 4 * ffn
    per_token = 32 * d + 4000
    if gradient_checkpointing:
        saved = tokens * experts * (layers * 4 * d + per_token) + tokens * per_layer
    else:
        saved = tokens * experts * (layers * per_layer + per_token)
    head = 12 * min(HEAD_CHUNK, tokens) * model_config.vocab_size
    fixed = BASE + 16 * num_params
    floor_factor, typical_factor = (0.5, 0.75) if half_precision else (1.0, 1.0)
    floor = fixed + head + int(FLOOR_OVERHEAD * floor_factor * saved)
    typical = fixed + head + int(OVERHEAD * typical_factor * saved)
    return MemoryEstimate(floor, typical)


def available_memory(device) -> tuple[int | None, int | None]:
    """(bytes free now, bytes that could be had at most) on `device`. CUDA: free memory plus what
    this process holds already (the model), and None for the most (the GPU estimate is not
    calibrated, so it never refuses); CPU: MemAvailable and MemAvailable + SwapFree from
    /proc/meminfo. (None, None) if unknown."""
    import torch
    if device.type == "cuda":  # what this process holds already (the model) counts as available
        free, _ = torch.cuda.mem_get_info(device)
        free += torch.cuda.memory_allocated(device)
        return free, None
    if device.type == "cpu":
        try:
            info = {}
            with open("/proc/meminfo") as f:
                for line in f:
                    key, value = line.split(":", 1)
                    info[key] = int(value.split()[0]) * 1024
            return info["MemAvailable"], info["MemAvailable"] + info.get("SwapFree", 0)
        except (OSError, KeyError, ValueError):
            return None, None
    return None, None


def memory_verdict(estimate_fn, available: int | None, most: int | None, stage: str, batch_size: int,
                   seq_len: int, gradient_checkpointing: bool) -> tuple[str | None, str | None]:
    """(refusal, warning): the one line to stop with when even the floor exceeds all the memory
    there is, or to print when the estimate exceeds what is free now; (None, None) when it fits.

    estimate_fn(batch_size=..., seq_len=..., gradient_checkpointing=...) -> MemoryEstimate gives
    the alternatives the line suggests (guide §7: --gradient_checkpointing, --batch_size 1, a
    shorter --seq_len), each with its own estimate."""
    if available is None:
        return None, None
    here = estimate_fn(batch_size=batch_size, seq_len=seq_len, gradient_checkpointing=gradient_checkpointing)
    if here.typical <= available:
        return None, None
    options = []
    if not gradient_checkpointing:
        options.append(("--gradient_checkpointing",
                        estimate_fn(batch_size=batch_size, seq_len=seq_len, gradient_checkpointing=True)))
    if batch_size > 1:
        options.append(("--batch_size 1 (with --grad_accum_steps "
                        f"{batch_size} to keep the batch)",
                        estimate_fn(batch_size=1, seq_len=seq_len, gradient_checkpointing=gradient_checkpointing)))
    if seq_len > 512:
        options.append((f"--seq_len {seq_len // 2}",
                        estimate_fn(batch_size=batch_size, seq_len=seq_len // 2,
                                    gradient_checkpointing=gradient_checkpointing)))
    fitting = [f"{flag} (~{e.gb()})" for flag, e in options if e.typical <= available]
    advice = ("; ".join(fitting) if fitting else
              "; ".join(f"{flag} (~{e.gb()})" for flag, e in options) + ", together if need be"
              if options else "a machine with more memory")
    what = (f"{stage} needs about {here.gb()} ({batch_size} x {seq_len} tokens per step), "
            f"{available / GB:.1f} GB is free")
    if most is not None and here.floor > most:
        return f"{what}: it cannot fit. Use {advice}", None
    return None, f"⚠️ {what}: it may run out of memory. To fit, use {advice}"
