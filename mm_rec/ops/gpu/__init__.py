"""GPU backend of the recurrences (fla-core Triton kernels), registered on import.

`mm_rec.ops.short_term_memory` / `long_term_memory` import this package the first time they see a
CUDA tensor with kernels allowed; if fla-core or Triton is missing the import fails and the plain
PyTorch chunked ops run instead (`pip install fla-core` enables the kernels).
"""
from __future__ import annotations

import torch

if not torch.cuda.is_available():
    raise ImportError("mm_rec.ops.gpu needs CUDA")

from .. import register_gpu_backend  # noqa: E402
from .recurrences import long_term_gpu, short_term_gpu  # noqa: E402

register_gpu_backend("fla", short_term=short_term_gpu, long_term=long_term_gpu)

__all__ = ["long_term_gpu", "short_term_gpu"]
