"""The parallel recurrences against their sequential references, in float64: outputs, final states
and the gradients of every input (the initial state included)."""
import math

import pytest
import torch

from mm_rec.core.associative_scan_hybrid import associative_scan_exponential_hybrid
from mm_rec.ops import long_term_chunked, long_term_naive, short_term_chunked, short_term_naive

F64 = torch.float64


def rel_err(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def grads(fn, inputs, weights):
    outs = fn(*inputs)
    loss = sum((o * w).sum() for o, w in zip(outs, weights))
    return torch.autograd.grad(loss, inputs)


def short_term_inputs(B, T, D, dtype=F64, strong_decay=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, D, generator=g, dtype=dtype)
    scale = 8.0 if strong_decay else 1.0
    log_a = -scale * torch.rand(B, T, D, generator=g, dtype=dtype)  # decays in (e^-scale, 1)
    h0 = torch.randn(B, D, generator=g, dtype=dtype)
    return [t.requires_grad_() for t in (x, log_a, h0)]


def long_term_inputs(B, T, H, Dk, Dv, dtype=F64, strong_decay=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, Dk, generator=g, dtype=dtype)
    k = torch.randn(B, T, H, Dk, generator=g, dtype=dtype)
    v = torch.randn(B, T, H, Dv, generator=g, dtype=dtype)
    scale = 30.0 if strong_decay else 1.0
    log_alpha = -scale * torch.rand(B, T, H, Dk, generator=g, dtype=dtype)
    M0 = torch.randn(B, H, Dk, Dv, generator=g, dtype=dtype)
    return [t.requires_grad_() for t in (q, k, v, log_alpha, M0)]


@pytest.mark.parametrize("T", [1, 17, 64, 100, 257])
@pytest.mark.parametrize("chunk_size", [16, 64])
def test_short_term_chunked_matches_reference(T, chunk_size):
    inputs = short_term_inputs(2, T, 6, seed=T)
    ref_h, ref_hT = short_term_naive(*inputs)
    h, hT = short_term_chunked(*inputs, chunk_size=chunk_size)
    assert rel_err(h, ref_h) < 1e-12 and rel_err(hT, ref_hT) < 1e-12
    w = [torch.randn_like(ref_h), torch.randn_like(ref_hT)]
    g_ref = grads(short_term_naive, inputs, w)
    g = grads(lambda *a: short_term_chunked(*a, chunk_size=chunk_size), inputs, w)
    for name, a, b in zip(("x", "log_a", "h0"), g, g_ref):
        assert rel_err(a, b) < 1e-12, name


@pytest.mark.parametrize("T", [1, 15, 16, 33, 200])
@pytest.mark.parametrize("chunk_size", [8, 16])
def test_long_term_chunked_matches_reference(T, chunk_size):
    inputs = long_term_inputs(2, T, 3, 4, 5, seed=T)
    ref_o, ref_M = long_term_naive(*inputs)
    o, M = long_term_chunked(*inputs, chunk_size=chunk_size)
    assert rel_err(o, ref_o) < 1e-12 and rel_err(M, ref_M) < 1e-12
    w = [torch.randn_like(ref_o), torch.randn_like(ref_M)]
    g_ref = grads(long_term_naive, inputs, w)
    g = grads(lambda *a: long_term_chunked(*a, chunk_size=chunk_size), inputs, w)
    for name, a, b in zip(("q", "k", "v", "log_alpha", "M0"), g, g_ref):
        assert rel_err(a, b) < 1e-11, name


def test_long_sequences_T4096_both_recurrences():
    inputs = short_term_inputs(1, 4096, 8, seed=1)
    ref_h, ref_hT = short_term_naive(*inputs)
    h, hT = short_term_chunked(*inputs, chunk_size=64)
    assert rel_err(h, ref_h) < 1e-12 and rel_err(hT, ref_hT) < 1e-12
    w = [torch.randn_like(ref_h), torch.randn_like(ref_hT)]
    for a, b in zip(grads(lambda *a: short_term_chunked(*a, chunk_size=64), inputs, w),
                    grads(short_term_naive, inputs, w)):
        assert rel_err(a, b) < 1e-12

    inputs = long_term_inputs(1, 4095, 2, 4, 4, seed=2)  # not a multiple of the chunk
    ref_o, ref_M = long_term_naive(*inputs)
    o, M = long_term_chunked(*inputs, chunk_size=16)
    assert rel_err(o, ref_o) < 1e-12 and rel_err(M, ref_M) < 1e-12
    w = [torch.randn_like(ref_o), torch.randn_like(ref_M)]
    for a, b in zip(grads(lambda *a: long_term_chunked(*a, chunk_size=16), inputs, w),
                    grads(long_term_naive, inputs, w)):
        assert rel_err(a, b) < 1e-11


def test_strong_decay_stays_finite_and_exact():
    """Decays near zero (log-decay -30 per token) must not overflow the chunked forms."""
    inputs = long_term_inputs(1, 70, 2, 4, 4, strong_decay=True, seed=3)
    ref_o, ref_M = long_term_naive(*inputs)
    o, M = long_term_chunked(*inputs, chunk_size=16)
    assert torch.isfinite(o).all() and rel_err(o, ref_o) < 1e-12 and rel_err(M, ref_M) < 1e-10
    inputs = short_term_inputs(1, 300, 4, strong_decay=True, seed=4)
    assert rel_err(short_term_chunked(*inputs)[0], short_term_naive(*inputs)[0]) < 1e-12


def test_no_initial_state_means_zero_state():
    x, log_a, _ = short_term_inputs(2, 40, 3)
    h_none, _ = short_term_chunked(x, log_a, None)
    h_zero, _ = short_term_chunked(x, log_a, torch.zeros(2, 3, dtype=F64))
    assert torch.equal(h_none, h_zero)


def test_float32_close_to_float64_reference():
    inputs = [t.detach() for t in long_term_inputs(2, 300, 2, 8, 8, seed=5)]
    ref_o, _ = long_term_naive(*inputs)
    o, M = long_term_chunked(*[t.float() for t in inputs])
    assert o.dtype == torch.float32 and M.dtype == torch.float32
    assert rel_err(o.double(), ref_o) < 1e-5
    inputs = [t.detach() for t in short_term_inputs(2, 300, 8, seed=6)]
    h, hT = short_term_chunked(*[t.float() for t in inputs])
    assert rel_err(h.double(), short_term_naive(*inputs)[0]) < 1e-5


def test_bf16_inputs_are_computed_in_fp32():
    inputs = [t.detach() for t in short_term_inputs(1, 200, 8, seed=7)]
    h, hT = short_term_chunked(inputs[0].bfloat16(), inputs[1].bfloat16(), inputs[2].bfloat16())
    assert h.dtype == torch.bfloat16 and hT.dtype == torch.float32
    ref = short_term_naive(inputs[0].bfloat16().double(), inputs[1].bfloat16().double(),
                           inputs[2].bfloat16().double())[1]
    assert rel_err(hT.double(), ref) < 1e-5  # the carried state keeps fp32 accuracy


def test_hybrid_scan_matches_float64_at_T32768():
    g = torch.Generator().manual_seed(0)
    B, H, T, D = 1, 2, 32768, 8
    # decays close to 1, where products over long ranges matter most
    gamma = (1 - 1e-4 * torch.rand(B, H, T, D, generator=g, dtype=F64)).float()
    ref = torch.cumprod(gamma.double(), dim=2)  # exact product of the same float32 factors
    hybrid = associative_scan_exponential_hybrid(gamma)
    assert hybrid.dtype == torch.float32 and hybrid.shape == gamma.shape
    # A float32 running product, as a token loop or a GPU cumprod (float32 accumulator) computes it.
    # (torch's CPU cumprod accumulates float32 in double internally, so it would not show the drift.)
    plain = torch.empty_like(gamma)
    running = torch.ones(B, H, D)
    for t in range(T):
        running = running * gamma[:, :, t]
        plain[:, :, t] = running
    hybrid_err = ((hybrid.double() - ref).abs() / ref).max().item()
    plain_err = ((plain.double() - ref).abs() / ref).max().item()
    # the hybrid result is float32-rounded once; the running product drifts with every factor
    assert hybrid_err < 2.5e-7, hybrid_err
    assert plain_err > 20 * hybrid_err, (plain_err, hybrid_err)
    print(f"T=32768: hybrid max rel err {hybrid_err:.2e}, float32 running product {plain_err:.2e}")


def test_hybrid_scan_keeps_bf16_dtype_and_gradients():
    gamma = torch.rand(2, 2, 64, 4, dtype=F64).clamp_min(0.1).requires_grad_()
    out = associative_scan_exponential_hybrid(gamma)
    torch.testing.assert_close(out, torch.cumprod(gamma, 2))
    (g_h,) = torch.autograd.grad(out.sum(), gamma)
    (g_r,) = torch.autograd.grad(torch.cumprod(gamma, 2).sum(), gamma)
    torch.testing.assert_close(g_h, g_r)
    assert associative_scan_exponential_hybrid(gamma.detach().bfloat16()).dtype == torch.bfloat16
    assert math.isclose(associative_scan_exponential_hybrid(torch.zeros(1, 1, 3, 1))[0, 0, 2, 0].item(), 0.0)


def test_backend_is_chosen_by_argument_or_context(monkeypatch):
    """short/long_term_memory run the backend named by their argument, else by the innermost
    use_backend block, else "auto" (the chunked form on the CPU); a block restores the one around
    it, and an unknown name is refused."""
    import mm_rec.ops as ops
    from mm_rec.ops import long_term_memory, reference_mode, short_term_memory, use_backend

    calls = []
    for name in ("short_term_naive", "short_term_chunked", "long_term_naive", "long_term_chunked"):
        fn = getattr(ops, name)
        monkeypatch.setattr(ops, name, lambda *a, _name=name, _fn=fn, **kw: (calls.append(_name), _fn(*a, **kw))[1])
    x, log_a, h0 = short_term_inputs(2, 40, 8)
    q, k, v, log_alpha, M0 = long_term_inputs(1, 40, 2, 4, 4)

    def short(**kw):
        calls.clear()
        short_term_memory(x, log_a, h0, **kw)
        return calls[0].removeprefix("short_term_")

    def long(**kw):
        calls.clear()
        long_term_memory(q, k, v, log_alpha, M0, **kw)
        return calls[0].removeprefix("long_term_")

    assert short() == long() == "chunked"
    assert short(backend="naive") == long(backend="naive") == "naive"
    with use_backend("naive"):
        assert short() == long() == "naive"
        assert long(backend="chunk") == "chunked"  # the argument wins
        with use_backend(None):
            assert short() == "chunked"
        assert short() == "naive"
    assert short() == "chunked"
    with reference_mode():
        assert long() == "naive"
    assert long() == "chunked"
    with pytest.raises(ValueError, match="backend"):
        short(backend="cuda")
    with pytest.raises(ValueError, match="backend"):
        with use_backend("fast"):
            pass
