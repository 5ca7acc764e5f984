"""GPU backend of the recurrences (our Triton kernels), registered on import.

`mm_rec.ops.short_term_memory` / `long_term_memory` import this package the first time they see a
CUDA tensor with kernels allowed; if Triton is missing the import fails and the plain PyTorch
chunked ops run instead. fla-core is optional: its GLA kernels are there to compare with
(recurrences.INTRA_KERNELS = "fla", STATE_PASS = "fla", benchmarks/bench_ops.py).
"""
from __future__ import annotations

import torch

if not torch.cuda.is_available():
    raise ImportError("mm_rec.ops.gpu needs CUDA")

import os  # noqa: E402
from pathlib import Path  # noqa: E402

# fla-core (when compared with) autotunes each kernel on its first call (~210 s on a fresh H100). Its GLA kernels at our
# head size (d_h = 32) run with the configs tuned once on an H100 (Triton 3.6, fla-core 0.6.0) and
# shipped in fla_configs/. Set FLA_CACHE_MODE yourself (e.g. "disabled") to autotune instead.
if "FLA_CACHE_MODE" not in os.environ:
    os.environ["FLA_CACHE_MODE"] = "default"
    os.environ.setdefault("FLA_CONFIG_DIR", str(Path(__file__).with_name("fla_configs")))

from .. import register_gpu_backend  # noqa: E402
from .recurrences import long_term_gpu, short_term_gpu  # noqa: E402

register_gpu_backend("fla", short_term=short_term_gpu, long_term=long_term_gpu)

__all__ = ["long_term_gpu", "short_term_gpu"]
