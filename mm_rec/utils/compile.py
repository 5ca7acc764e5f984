"""torch.compile as the model's compiled layer, the trainer and the benchmarks all call it."""
from __future__ import annotations

import torch

# Inductor's combo kernels: independent kernels of one graph (the gates' pointwise work, the norms'
# reductions, the biases' gradients, ...) launched as one. A layer's step is about a hundred kernels
# of a few microseconds each at Stage 1's shape; on an H100 this took the graphed Stage 1 step of
# the 100M model from 12.6 to 11.5 ms (benchmarks/RESULTS.md, run AW). Off: COMBO_KERNELS = False
# before compiling (bench_train.py --no-combo-kernels).
COMBO_KERNELS = True


def inductor_options(mode: str | None = None) -> dict:
    """Inductor's options for `mode` (None: the default), combo kernels added. torch.compile takes
    a mode or options, not both: the mode's own options are spelled out here."""
    options = dict(torch._inductor.list_mode_options(mode or "default"))
    if COMBO_KERNELS:
        options["combo_kernels"] = True
    return options


def compile_fn(fn, mode: str | None = None, **kwargs):
    """torch.compile(fn, mode=mode, **kwargs) with inductor_options(mode)."""
    return torch.compile(fn, options=inductor_options(mode), **kwargs)
