"""fla-core's GLA kernels, to compare mm_rec's long-term memory kernels with (bench_ops.py,
bench_train.py's fla-gla, sweep_fla_configs.py). Not part of the package: the model never runs them.

    gla.py     long_term_fla: the long-term op with fla-core's kernels inside the chunks and/or for
               the chunk-boundary states in place of ours
    configs/   a launch config per fla kernel at our head size (d_h = 32), tuned once on an H100
               (Triton 3.6, fla-core 0.6.0); use_tuned_fla_configs() points fla at them
"""
from __future__ import annotations

import os
from pathlib import Path

CONFIG_DIR = Path(__file__).with_name("configs")


def use_tuned_fla_configs() -> None:
    """Have fla-core launch its kernels with the configs in configs/ instead of autotuning each on
    its first call (~210 s on a fresh H100). Call before fla is imported. A FLA_CACHE_MODE already
    set (e.g. "disabled", to autotune) is left alone."""
    if "FLA_CACHE_MODE" not in os.environ:
        os.environ["FLA_CACHE_MODE"] = "default"
        os.environ.setdefault("FLA_CONFIG_DIR", str(CONFIG_DIR))
