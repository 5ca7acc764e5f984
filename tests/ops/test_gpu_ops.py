"""GPU kernels of the recurrences against the plain PyTorch chunked reference (float64).

Outputs, final states and gradients of every input (initial state included), fp32 and bf16,
T in {63, 512, 4096, 8192}, with and without an initial state. Skipped without CUDA / Triton
(the comparisons with fla-core's kernels also without fla-core).
Error measure: ||out - ref|| / ||ref||. A wrong kernel lands near 1; fp32 through tf32 matrix units
lands near 1e-3, bf16 q/k/v near 1e-2.
"""
import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)
pytest.importorskip("triton")

from mm_rec.ops import (long_term_chunked, long_term_memory, short_term_chunked, short_term_memory,  # noqa: E402
                        use_backend)
from mm_rec.ops.long_term.kernel import long_term_kernel  # noqa: E402
from mm_rec.ops.short_term.kernel import short_term_kernel  # noqa: E402

DEV = "cuda"
TS = [63, 512, 4096, 8192]
# (forward, gradient) bounds per dtype: roughly 5-10x the errors seen on an H100.
BOUNDS = {torch.float32: (5e-3, 1e-2), torch.bfloat16: (2e-2, 5e-2)}


def rel(a, b):
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all()
    return ((a - b).norm() / b.norm()).item()


def run_and_grads(fn, inputs, weights):
    inputs = [None if t is None else t.detach().clone().requires_grad_() for t in inputs]
    outs = fn(*inputs)
    loss = sum((o.double() * w).sum() for o, w in zip(outs, weights))
    loss.backward()
    return outs, [None if t is None else t.grad for t in inputs]


def check(name, outs, grads, ref_outs, ref_grads, dtype):
    fwd_bound, grad_bound = BOUNDS[dtype]
    for i, (o, r) in enumerate(zip(outs, ref_outs)):
        e = rel(o, r)
        print(f"{name} out{i} {e:.2e}")
        assert e < fwd_bound, f"{name}: output {i} relative error {e:.3e}"
    for i, (g, r) in enumerate(zip(grads, ref_grads)):
        if r is None:
            continue
        assert g is not None, f"{name}: no gradient for input {i}"
        e = rel(g, r)
        print(f"{name} grad{i} {e:.2e}")
        assert e < grad_bound, f"{name}: gradient {i} relative error {e:.3e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T", TS)
@pytest.mark.parametrize("with_state", [False, True])
def test_short_term_kernel(T, dtype, with_state):
    torch.manual_seed(T + with_state)
    B, D = 2, 256
    x = torch.randn(B, T, D, device=DEV).to(dtype)
    # Decays spread from fast to very slow, as the model's initialisation spreads them.
    log_a = F.logsigmoid(torch.randn(B, T, D, device=DEV) + torch.linspace(0, 7, D, device=DEV))
    h0 = torch.randn(B, D, device=DEV) if with_state else None
    inputs = [x, log_a, h0]
    weights = [torch.randn(B, T, D, device=DEV, dtype=torch.float64),
               torch.randn(B, D, device=DEV, dtype=torch.float64)]
    outs, grads = run_and_grads(lambda *a: short_term_kernel(*a), inputs, weights)
    assert outs[0].dtype == dtype and outs[1].dtype == torch.float32
    ref_in = [None if t is None else t.double() for t in inputs]
    ref_outs, ref_grads = run_and_grads(lambda *a: short_term_chunked(*a, chunk_size=64), ref_in, weights)
    check(f"short T={T} {dtype} h0={with_state}", outs, grads, ref_outs, ref_grads, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T", TS)
@pytest.mark.parametrize("with_state", [False, True])
def test_long_term_kernel(T, dtype, with_state):
    torch.manual_seed(100 + T + with_state)
    # The model's decay: logsigmoid(.) / 16, in fp32 whatever the activations' dtype.
    check_long_term(f"long T={T} {dtype} h0={with_state}", 2, T, 8, 32, dtype, with_state, 1 / 16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("strength", [1.5, 20])
def test_long_term_kernel_with_decays_beyond_fp32_range(dtype, with_state, strength):
    """Decays of up to e^-200 a token: 2^(g_i - g_j) factorised as 2^(g_i) 2^(-g_j) over a chunk
    would overflow fp32. kernel_intra.py factorises a chunk only where its exponents stay under 60 and
    computes the others exactly: strength 1.5 mixes the two kinds of chunk (about half are
    factorised), 20 has only exact ones. T = 1000 ends in a partial chunk."""
    torch.manual_seed(7 + with_state + int(strength))
    check_long_term(f"long strong decay {dtype} h0={with_state}", 2, 1000, 4, 32, dtype, with_state, strength)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [8, 16, 64])
def test_long_term_kernel_at_other_head_sizes(head_dim, dtype):
    """Heads of 8 (tiles padded to 16 columns), 16 (the tiny preset's) and 64."""
    torch.manual_seed(head_dim)
    check_long_term(f"long head_dim={head_dim} {dtype}", 2, 1000, 4, head_dim, dtype, True, 1 / 16)


def check_long_term(name, B, T, H, Dk, dtype, with_state, decay_scale):
    """long_term_kernel against the float64 chunked reference: outputs, M_T, every gradient."""
    q, k, v = (torch.randn(B, T, H, Dk, device=DEV).to(dtype) for _ in range(3))
    log_alpha = F.logsigmoid(2 * torch.randn(B, T, H, Dk, device=DEV)) * decay_scale
    M0 = torch.randn(B, H, Dk, Dk, device=DEV) if with_state else None
    inputs = [q, k, v, log_alpha, M0]
    weights = [torch.randn(B, T, H, Dk, device=DEV, dtype=torch.float64),
               torch.randn(B, H, Dk, Dk, device=DEV, dtype=torch.float64)]
    scale = Dk ** -0.5
    outs, grads = run_and_grads(lambda *a: long_term_kernel(*a, scale=scale), inputs, weights)
    assert outs[0].dtype == dtype and outs[1].dtype == torch.float32
    ref_in = [None if t is None else t.double() for t in inputs]
    # chunk 64: a quarter of the default's sequential chunk steps (float64 is exact at either size)
    ref_outs, ref_grads = run_and_grads(lambda *a: long_term_chunked(*a, scale=scale, chunk_size=64), ref_in, weights)
    check(name, outs, grads, ref_outs, ref_grads, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T", [63, 512, 1000, 8192])
@pytest.mark.parametrize("with_state", [False, True])
def test_long_term_parallel_state_pass_matches_fla_sequential(T, dtype, with_state):
    """kernel_states.py's chunk-parallel states and state gradients equal fla's sequential passes
    (chunk_fwd_h / chunk_bwd_dh): every chunk's state, the final state, dM0."""
    pytest.importorskip("fla")
    from fla.ops.common.chunk_h import chunk_bwd_dh, chunk_fwd_h
    from fla.ops.utils.constant import RCP_LN2
    from fla.ops.utils.cumsum import chunk_local_cumsum

    from mm_rec.ops.long_term.kernel_intra import BT
    from mm_rec.ops.long_term.kernel_states import chunk_states_bwd, chunk_states_fwd
    torch.manual_seed(T + with_state)
    B, H, D, scale = 3, 4, 32, 32 ** -0.5  # BT: the chunk length the model runs
    q, k, v, do = (torch.randn(B, T, H, D, device=DEV).to(dtype) for _ in range(4))
    g = chunk_local_cumsum(F.logsigmoid(2 * torch.randn(B, T, H, D, device=DEV)) / 16, BT, scale=RCP_LN2)
    M0 = torch.randn(B, H, D, D, device=DEV) if with_state else None
    dM_T = torch.randn(B, H, D, D, device=DEV) if with_state else None
    h, M_T = chunk_states_fwd(k, v, g, M0, BT)
    ref_h, ref_M_T = chunk_fwd_h(k=k, v=v, gk=g, h0=M0, output_final_state=True, chunk_size=BT,
                                 states_in_fp32=True)
    dh, dM0 = chunk_states_bwd(q, do, g, dM_T, scale, BT, need_dM0=with_state)
    ref_dh, ref_dM0 = chunk_bwd_dh(q=q, k=k, v=v, do=do, h0=M0, dht=dM_T, scale=scale, gk=g, chunk_size=BT,
                                   states_in_fp32=True)
    assert h.shape == ref_h.shape and dh.shape == ref_dh.shape and h.dtype == dh.dtype == torch.float32
    pairs = [(h, ref_h), (M_T, ref_M_T), (dh, ref_dh)] + ([(dM0, ref_dM0)] if with_state else [])
    errs = [((a - b).norm() / b.norm().clamp_min(1e-6)).item() for a, b in pairs]  # h: zeros when T <= BT
    print(f"state pass T={T} {dtype} state={with_state} h, M_T, dh(, dM0):", " ".join(f"{e:.1e}" for e in errs))
    # fp32: the same products summed in another order. bf16: fla rounds q * scale to bf16 before
    # the decay and again after, we round once (both are 2.5e-3 from the fp32 reference in
    # test_long_term_kernel).
    assert max(errs) < (1e-4 if dtype == torch.float32 else 1e-2), errs  # the same maths, summed in another order (tf32 products in fp32)
    assert (dM0 is None) == (not with_state)


def test_dispatch_picks_kernels_on_cuda_only_when_allowed():
    """short/long_term_memory route CUDA fp32/bf16 to the kernels, fp64 and allow_kernels=False
    to the PyTorch path; both agree. A backend named by argument or use_backend overrides that."""
    torch.manual_seed(0)
    x = torch.randn(1, 100, 64, device=DEV)
    la = F.logsigmoid(torch.randn(1, 100, 64, device=DEV))
    h_k, _ = short_term_memory(x, la)
    h_p, _ = short_term_memory(x, la, allow_kernels=False)
    h_ref, _ = short_term_chunked(x.double(), la.double())
    assert rel(h_k, h_ref) < 1e-4 and rel(h_p, h_ref) < 1e-4
    q = torch.randn(1, 100, 2, 32, device=DEV)
    g = F.logsigmoid(torch.randn(1, 100, 2, 32, device=DEV)) / 16
    o_k, _ = long_term_memory(q, q, q, g)
    o_ref, _ = long_term_chunked(q.double(), q.double(), q.double(), g.double())
    assert rel(o_k, o_ref) < 5e-3
    o64, _ = long_term_memory(q.double(), q.double(), q.double(), g.double())
    assert o64.dtype == torch.float64 and rel(o64, o_ref) < 1e-12
    # a backend named by the argument or by use_backend runs instead of the automatic choice
    assert torch.equal(short_term_memory(x, la, backend="triton")[0], h_k)
    with use_backend("chunk"):
        assert torch.equal(short_term_memory(x, la)[0], h_p)
        assert torch.equal(long_term_memory(q, q, q, g, backend="triton")[0], o_k)


def test_model_gpu_path_matches_pytorch_path():
    """The 2-layer model with kernels (bf16 autocast) against its own PyTorch path in fp32:
    logits, final memory states and parameter gradients."""
    from mm_rec.model import MMRec100M
    torch.manual_seed(0)
    model = MMRec100M(vocab_size=512, expert_dim=64, num_layers=2, num_heads=4, ffn_dim=128).to(DEV)
    ids = torch.randint(0, 512, (2, 300), device=DEV)

    def run(kernels):
        model.zero_grad()
        model.use_kernel_fusion = kernels
        with torch.autocast("cuda", torch.bfloat16, enabled=kernels):
            logits, states = model(ids, return_memory=True)
        logits.float().logsumexp(-1).mean().backward()
        return logits.float(), states, [None if p.grad is None else p.grad.clone() for p in model.parameters()]

    ref_logits, ref_states, ref_grads = run(False)
    logits, states, grads = run(True)
    assert rel(logits, ref_logits) < 3e-2
    for name in ("text", "code"):
        for s, r in zip(states[name], ref_states[name]):
            assert s["M"].dtype == torch.float32 and rel(s["h"], r["h"]) < 3e-2 and rel(s["M"], r["M"]) < 3e-2
    assert [g is None for g in grads] == [r is None for r in ref_grads]  # the same parameters used
    errs = [rel(g, r) for g, r in zip(grads, ref_grads) if r is not None and r.norm() > 0]
    assert max(errs) < 0.1, max(errs)


@pytest.mark.parametrize("scope", ["blocks", "whole"])
@pytest.mark.parametrize("expert_type", [None, "text"])
def test_compiled_loss_on_gpu_matches_eager(expert_type, scope):
    """torch.compile with the kernels as custom ops and CUDA graphs (mode reduce-overhead), bf16
    autocast, one expert and both, of the layer (compile_blocks, what --compile does) and of the
    whole loss (--compile_scope model): as close to the fp32 step's loss and gradients as the eager
    bf16 step is. (bf16 steps differ from each other by more than a fixed tolerance in a few small
    gradients, such as the decay gate's of the last layer, so each is held to fp32.)"""
    import torch._dynamo
    from mm_rec.model import MMRec100M
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = MMRec100M(vocab_size=512, expert_dim=64, num_layers=3, num_heads=2, ffn_dim=128).to(DEV)
    ids = torch.randint(0, 512, (2, 257), device=DEV)

    def run(fn, bf16=True):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", torch.bfloat16, enabled=bf16):
            loss = fn(ids[:, :-1], ids[:, 1:], expert_type=expert_type)
        loss.backward()
        return loss.detach().float().clone(), {n: p.grad.clone() for n, p in model.named_parameters()
                                               if p.grad is not None}

    ref_loss, ref_grads = run(model.loss, bf16=False)  # eager fp32, before anything is compiled
    eager_loss, eager_grads = run(model.loss)
    compiled = (torch.compile(model.loss, mode="reduce-overhead") if scope == "whole"
                else model.compile_blocks(mode="reduce-overhead").loss)
    for _ in range(3):  # warm-up, graph capture, replay
        torch.compiler.cudagraph_mark_step_begin()
        loss, grads = run(compiled)
    assert grads.keys() == ref_grads.keys() == eager_grads.keys() and len(grads) > 20
    assert abs(loss.item() - ref_loss.item()) <= 2 * abs(eager_loss.item() - ref_loss.item()) + 1e-3
    for n, g in grads.items():
        if ref_grads[n].norm() > 0:
            assert rel(g, ref_grads[n]) <= 2 * rel(eager_grads[n], ref_grads[n]) + 0.02, n
    torch._dynamo.reset()



def test_a_model_compiled_in_a_fresh_process_runs_the_kernels():
    """compile_blocks imports the kernels before tracing: in a process that never touched them
    (as train_modular --compile starts), the compiled step's GPU work includes the recurrence
    kernels, not the PyTorch chunked ops (an import inside the traced region cannot happen)."""
    import subprocess
    import sys
    code = """
import sys, torch
from mm_rec.model import MMRec100M, MMRecConfig
assert "mm_rec.ops.short_term.kernel" not in sys.modules and "mm_rec.ops.long_term.kernel" not in sys.modules
model = MMRec100M(config=MMRecConfig(vocab_size=256, expert_dim=64, num_layers=2, num_heads=2, ffn_dim=128)).cuda()
model.compile_blocks()
x = torch.randint(0, 256, (2, 128), device="cuda")
with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
    with torch.autocast("cuda", dtype=torch.bfloat16):
        model.loss(x, x).backward()
    torch.cuda.synchronize()
names = {e.key for e in prof.key_averages()}
print("kernels:", sorted(n for n in names if "gla" in n or "scan" in n))
assert any("gla" in n for n in names) and any("diag_scan" in n for n in names), sorted(names)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
