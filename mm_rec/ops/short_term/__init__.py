"""The short-term (diagonal) memory, per channel:

    h_t = exp(log_a_t) * h_{t-1} + x_t          x, log_a: [B, T, D],  h0: [B, D]

    naive.py   the token-by-token reference every other form is tested against
    chunk.py   the chunked parallel scan in PyTorch (any device, float64 included)
    kernel.py  the Triton scan as a torch.library op (CUDA); imported only when first used
"""
from .chunk import short_term_chunked
from .naive import short_term_naive

__all__ = ["short_term_chunked", "short_term_naive"]
