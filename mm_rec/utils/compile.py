"""torch.compile as the model's compiled layer, the trainer and the benchmarks all call it."""
from __future__ import annotations

import warnings
from typing import Callable

import torch

# Inductor's combo kernels launch independent kernels of one graph (the gates' pointwise work, the
# norms' reductions, the biases' gradients, ...) as one, each part with its own block sizes. They
# pay where kernels are small and launch-bound and cost where they are large. The graphed 100M
# step on an H100 (benchmarks/bench_train.py), combo kernels against none:
#   4x512, both experts (4,096 tokens a layer call)     11.5 against 12.5 ms
#   2x8192, one expert (Stage 2, 16,384)                 33.3 against 34.1 ms
#   2x8192, both experts (32,768)                        62.1 against 60.6 ms
# so a layer call gets them up to COMBO_KERNELS_MAX_TOKENS tokens (experts x batch x time).
COMBO_KERNELS_MAX_TOKENS = 16384


def inductor_options(mode: str | None = None, combo: bool = True) -> dict:
    """Inductor's options for `mode` (None: the default), combo kernels added when `combo`.
    torch.compile takes a mode or options, not both: the mode's own are spelled out."""
    import torch._inductor.config as inductor_config
    options = dict(torch._inductor.list_mode_options(mode or "default"))
    if combo:
        # (only the settings this torch has: torch.compile rejects an unknown option, and the
        # per-sub-kernel blocks are newer than combo kernels themselves)
        options.update({name: True for name in ("combo_kernels", "combo_kernel_per_subkernel_blocks")
                        if hasattr(inductor_config, name)})
    return options


def compile_fn(fn: Callable, mode: str | None = None, combo: bool = True, **kwargs) -> Callable:
    """torch.compile(fn, mode=mode, **kwargs) with inductor_options(mode, combo)."""
    # One compiled layer serves every stage's shape, both experts alone and stacked, with and
    # without carried states, and the evaluations' and held-out files' windows: more than
    # Dynamo's default of 8 graphs per function (a fullgraph compile then fails hard).
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    # Inductor's note that it split a softmax reduction (the loss at evaluation shapes) is a
    # performance remark for PyTorch's developers, not a problem of the run: not shown to users.
    warnings.filterwarnings("ignore", message="Online softmax is disabled", category=UserWarning)
    return torch.compile(fn, options=inductor_options(mode, combo), **kwargs)


def compile_by_tokens(fn: Callable, tokens: Callable[..., int], mode: str | None = None, combo: bool = True,
                      **kwargs) -> Callable:
    """fn compiled twice: with combo kernels (if `combo`; False: none anywhere, bench_train.py's
    -nocombo variants) for calls of at most COMBO_KERNELS_MAX_TOKENS tokens (tokens(*args)),
    without them above. Each compiles on its first call; a captured CUDA graph holds whichever ran."""
    small = compile_fn(fn, mode, combo=combo, **kwargs)
    large = compile_fn(fn, mode, combo=False, **kwargs)

    def by_tokens(*args):
        return (small if tokens(*args) <= COMBO_KERNELS_MAX_TOKENS else large)(*args)
    return by_tokens
