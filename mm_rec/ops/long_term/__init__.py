"""The long-term matrix memory (gated linear attention), per head:

    M_t = diag(exp(log_alpha_t)) M_{t-1} + k_t^T v_t,    o_t = (scale * q_t) M_t
    q, k, log_alpha: [B, T, H, Dk],  v: [B, T, H, Dv],  M0: [B, H, Dk, Dv]

    naive.py          the token-by-token reference every other form is tested against
    chunk.py          the chunked form in PyTorch (any device, float64 included)
    kernel.py         the Triton form as a torch.library op (CUDA); imported only when first used:
    kernel_states.py    its states at chunk boundaries, parallel over the chunks
    kernel_intra.py     its work inside each chunk, one kernel forward and one backward
"""
from .chunk import long_term_chunked
from .naive import long_term_naive

__all__ = ["long_term_chunked", "long_term_naive"]
