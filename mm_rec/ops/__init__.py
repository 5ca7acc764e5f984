"""The two recurrences of an MM-Rec block, one folder each:

    short_term/  h_t = exp(log_a_t) * h_{t-1} + x_t                                  [B, T, D]
    long_term/   M_t = diag(exp(log_alpha_t)) M_{t-1} + k_t^T v_t,  o_t = scale * q_t M_t

with, side by side, its sequential reference (naive.py), its chunked PyTorch form (chunk.py) and
its Triton kernels (kernel*.py). `short_term_memory` and `long_term_memory` run one of them, the
backend:
    "naive"   the token-by-token reference (slow; the definition the others are tested against)
    "chunk"   the chunked PyTorch form (any device and dtype)
    "triton"  the Triton kernels (CUDA; fp32 compute, q/k/v in their own dtype)
    "auto"    "triton" for CUDA fp32/bf16 inputs when allow_kernels and Triton is installed,
              "chunk" otherwise (float64 stays on the exact PyTorch path)
named by the `backend` argument, else by an enclosing `use_backend(...)` block, else "auto".
"""
from __future__ import annotations

import contextlib
import contextvars

import torch

from .long_term import long_term_chunked, long_term_naive
from .short_term import short_term_chunked, short_term_naive

BACKENDS = ("auto", "naive", "chunk", "triton")

# The backend of the innermost `use_backend` block (None: "auto"). Read in eager code only: Dynamo
# cannot trace ContextVar.get, so a compiled region picks by the `backend` argument.
_backend_in_context: contextvars.ContextVar = contextvars.ContextVar("mm_rec_ops_backend", default=None)

# The Triton ops, imported by load_gpu_backend on first use (Triton is optional, and importing the
# kernels takes about a second).
_kernels: dict = {}


def _checked(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown recurrence backend {backend!r}; choose from {', '.join(BACKENDS)}")
    return backend


@contextlib.contextmanager
def use_backend(backend: str | None):
    """Run the recurrences with `backend` (None: "auto") inside this block, where a call does not
    name one itself."""
    token = _backend_in_context.set(None if backend is None else _checked(backend))
    try:
        yield
    finally:
        _backend_in_context.reset(token)


def reference_mode(enabled: bool = True):
    """Run the model's recurrences with the token-by-token reference loops inside this block."""
    return use_backend("naive" if enabled else None)


def load_gpu_backend() -> bool:
    """Import the Triton kernels now (if Triton is there); True if they are. Call it before
    torch.compile traces the model: an import cannot happen inside a compiled region, where the
    first recurrence call would otherwise fall back to PyTorch."""
    if not _kernels:
        try:  # optional: only present with the GPU extra installed
            from .long_term.kernel import long_term_kernel
            from .short_term.kernel import short_term_kernel
        except Exception:
            return False
        _kernels.update(short_term=short_term_kernel, long_term=long_term_kernel)
    return True


def _pick(backend: str | None, tensor: torch.Tensor, allow_kernels: bool) -> str:
    if backend is None and not torch.compiler.is_compiling():
        backend = _backend_in_context.get()
    if backend is None or backend == "auto":
        use_kernels = allow_kernels and tensor.is_cuda and tensor.dtype != torch.float64 and (
            bool(_kernels) or (not torch.compiler.is_compiling() and load_gpu_backend()))
        return "triton" if use_kernels else "chunk"
    if _checked(backend) == "triton" and not load_gpu_backend():
        raise RuntimeError("the 'triton' recurrence backend needs Triton (pip install -e '.[gpu]')")
    return backend


def short_term_memory(x, log_a, h0=None, chunk_size: int = 64, allow_kernels: bool = True,
                      backend: str | None = None):
    """h_t = exp(log_a_t) h_{t-1} + x_t. x, log_a: [B, T, D]; h0: [B, D] or None.
    Returns (h [B, T, D] in x's dtype, h_T [B, D] fp32, or float64 for float64 inputs)."""
    backend = _pick(backend, x, allow_kernels)
    if backend == "naive":
        return short_term_naive(x, log_a, h0)
    if backend == "triton":
        return _kernels["short_term"](x, log_a, h0)
    return short_term_chunked(x, log_a, h0, chunk_size=chunk_size)


def long_term_memory(q, k, v, log_alpha, M0=None, scale=None, chunk_size: int = 16,
                     allow_kernels: bool = True, backend: str | None = None):
    """M_t = diag(exp(log_alpha_t)) M_{t-1} + k_t^T v_t, o_t = scale q_t M_t (scale: Dk^-0.5 if None).
    q, k, log_alpha: [B, T, H, Dk]; v: [B, T, H, Dv]; M0: [B, H, Dk, Dv] or None.
    Returns (o [B, T, H, Dv] in q's dtype, M_T [B, H, Dk, Dv] fp32, or float64 for float64 inputs)."""
    backend = _pick(backend, q, allow_kernels)
    if backend == "naive":
        return long_term_naive(q, k, v, log_alpha, M0, scale=scale)
    if backend == "triton":
        return _kernels["long_term"](q, k, v, log_alpha, M0, scale)
    return long_term_chunked(q, k, v, log_alpha, M0, scale=scale, chunk_size=chunk_size)


__all__ = [
    "short_term_naive", "short_term_chunked", "long_term_naive", "long_term_chunked",
    "short_term_memory", "long_term_memory", "load_gpu_backend", "use_backend", "reference_mode", "BACKENDS",
]
