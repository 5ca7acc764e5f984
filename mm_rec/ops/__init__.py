"""The two recurrences of an MM-Rec block, each as a sequential reference (`*_naive`) and a parallel
chunked PyTorch form (`*_chunked`); GPU kernels plug in through `short_term_memory` and
`long_term_memory`, which pick the fastest path available for the inputs' device.

    short-term:  h_t = exp(log_a_t) * h_{t-1} + x_t                        [B, T, D]
    long-term:   M_t = diag(exp(log_alpha_t)) M_{t-1} + k_t^T v_t,  o_t = scale * q_t M_t
"""
from __future__ import annotations

import contextlib

import torch

from .long_term import long_term_chunked, long_term_naive
from .short_term import short_term_chunked, short_term_naive

# When True, every call runs the sequential reference loops (tests, timing comparisons).
_REFERENCE_MODE = False


@contextlib.contextmanager
def reference_mode(enabled: bool = True):
    """Run the model's recurrences with the token-by-token reference loops inside this block."""
    global _REFERENCE_MODE
    previous, _REFERENCE_MODE = _REFERENCE_MODE, enabled
    try:
        yield
    finally:
        _REFERENCE_MODE = previous


# Registered by mm_rec.ops.gpu (or another GPU backend) when it imports on a CUDA machine.
_GPU_BACKENDS: dict = {}


def register_gpu_backend(name: str, short_term=None, long_term=None) -> None:
    _GPU_BACKENDS[name] = {"short_term": short_term, "long_term": long_term}


def load_gpu_backend() -> bool:
    """Import the GPU kernels now (if CUDA, Triton and fla-core are there). True if a backend is
    registered. Call it before torch.compile traces the model: an import cannot happen inside a
    compiled region, where the first recurrence call would otherwise fall back to PyTorch."""
    if not _GPU_BACKENDS:
        try:  # optional: only present with the GPU extra installed
            from . import gpu  # noqa: F401
        except Exception:
            return False
    return bool(_GPU_BACKENDS)


def _gpu_impl(kind: str, tensor: torch.Tensor, allow_kernels: bool):
    # The kernels compute in fp32 (bf16 activations); float64 stays on the exact PyTorch path.
    if not (allow_kernels and tensor.is_cuda) or tensor.dtype == torch.float64:
        return None
    if not _GPU_BACKENDS and not (torch.compiler.is_compiling() or load_gpu_backend()):
        return None
    for impls in _GPU_BACKENDS.values():
        if impls.get(kind) is not None:
            return impls[kind]
    return None


def short_term_memory(x, log_a, h0=None, chunk_size: int = 64, allow_kernels: bool = True):
    if _REFERENCE_MODE:
        return short_term_naive(x, log_a, h0)
    impl = _gpu_impl("short_term", x, allow_kernels)
    if impl is not None:
        return impl(x, log_a, h0)
    return short_term_chunked(x, log_a, h0, chunk_size=chunk_size)


def long_term_memory(q, k, v, log_alpha, M0=None, scale=None, chunk_size: int = 16,
                     allow_kernels: bool = True):
    if _REFERENCE_MODE:
        return long_term_naive(q, k, v, log_alpha, M0, scale=scale)
    impl = _gpu_impl("long_term", q, allow_kernels)
    if impl is not None:
        return impl(q, k, v, log_alpha, M0, scale)
    return long_term_chunked(q, k, v, log_alpha, M0, scale=scale, chunk_size=chunk_size)


__all__ = [
    "short_term_naive", "short_term_chunked", "long_term_naive", "long_term_chunked",
    "short_term_memory", "long_term_memory", "register_gpu_backend", "load_gpu_backend", "reference_mode",
]
