"""GPU backend of the recurrences (our Triton kernels), registered on import when CUDA is there.

`mm_rec.ops.short_term_memory` / `long_term_memory` import this package the first time they see a
CUDA tensor with kernels allowed; if Triton is missing the import fails and the plain PyTorch
chunked ops run instead. Without CUDA the package imports (with Triton) but registers nothing:
its kernels then run only in Triton's interpreter (TRITON_INTERPRET=1), as
tests/test_kernels_interpreted.py runs them on the CPU. fla-core is optional: its GLA kernels are
there to compare with (recurrences.INTRA_KERNELS = "fla", STATE_PASS = "fla", bench_ops.py).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

# fla-core (when compared with) autotunes each kernel on its first call (~210 s on a fresh H100).
# Its GLA kernels at our head size (d_h = 32) run with the configs tuned once on an H100 (Triton
# 3.6, fla-core 0.6.0) and shipped in fla_configs/. Set FLA_CACHE_MODE yourself (e.g. "disabled")
# to autotune instead.
if "FLA_CACHE_MODE" not in os.environ:
    os.environ["FLA_CACHE_MODE"] = "default"
    os.environ.setdefault("FLA_CONFIG_DIR", str(Path(__file__).with_name("fla_configs")))

import triton  # noqa: E402,F401  (no Triton: ImportError, the PyTorch ops run)

if torch.cuda.is_available():
    from .. import register_gpu_backend
    from .recurrences import long_term_gpu, short_term_gpu

    register_gpu_backend("triton", short_term=short_term_gpu, long_term=long_term_gpu)
    __all__ = ["long_term_gpu", "short_term_gpu"]
