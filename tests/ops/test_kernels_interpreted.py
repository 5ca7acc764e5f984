"""The GPU path's Triton kernels on the CPU, through Triton's interpreter (TRITON_INTERPRET=1).

tests/ops/test_gpu_ops.py holds the kernels to the PyTorch reference on a GPU; CI has none. Here the
same ops (long_term_kernel, short_term_kernel in mm_rec/ops/*/kernel.py, with their autograd) run on
CPU tensors in the interpreter, which executes each kernel program with NumPy, and are checked
against the float64 chunked reference: outputs, final states, the gradient of every input. The
interpreter computes in fp32 (no tf32, no bf16), so the bounds are tight. Small shapes: it runs
each program in Python.

The interpreter is chosen when a kernel is defined, so the cases run in one subprocess that
imports the kernels with TRITON_INTERPRET=1 (this file, run as a script), and each test checks
its case's errors.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# name: (B, T, H, head_dim, decay scale, initial state). Decay scales: 1/16 is the model's (every
# chunk takes the fast, factorised path), 20 sends every chunk down the exact path, 1.5 mixes them.
LONG_CASES = {
    "partial chunk, no state": (1, 63, 2, 32, 1 / 16, False),
    "four chunks, state": (1, 100, 2, 32, 1 / 16, True),
    "mixed paths": (1, 96, 2, 32, 1.5, True),
    "exact path only": (1, 40, 2, 32, 20.0, True),
    "head size 8": (1, 70, 2, 8, 1 / 16, True),
    "one token, state": (2, 1, 2, 32, 1 / 16, True),
    "one whole chunk": (1, 32, 2, 32, 1 / 16, False),
}
# name: (B, T, D, initial state); T = 200 at D = 64 splits the scan into 4 segments (two passes)
SHORT_CASES = {"one segment": (2, 50, 32, False), "four segments, state": (1, 200, 64, True)}
BOUND = 1e-4  # fp32 against float64; a wrong kernel is off by O(1)


def _rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def _errors(fn, ref_fn, inputs, n_out):
    """Relative errors of fn's outputs and input gradients against ref_fn's (float64)."""
    import torch
    results = []
    for f, dtype in ((fn, torch.float32), (ref_fn, torch.float64)):
        ins = [None if t is None else t.detach().to(dtype).requires_grad_() for t in inputs]
        outs = f(*ins)
        gen = torch.Generator().manual_seed(1)
        loss = sum((o.double() * torch.randn(o.shape, generator=gen, dtype=torch.float64)).sum() for o in outs[:n_out])
        loss.backward()
        results.append(([o.detach() for o in outs[:n_out]], [t.grad for t in ins if t is not None]))
    (outs, grads), (ref_outs, ref_grads) = results
    return [_rel(a, b) for a, b in zip(outs + grads, ref_outs + ref_grads)]


def _fast_fraction(log_alpha, chunk=32):
    """The share of chunks whose decays allow the factorised path (kernel_intra.py's test, in torch)."""
    import torch
    import torch.nn.functional as F
    B, T, H, K = log_alpha.shape
    g = F.pad(log_alpha, (0, 0, 0, 0, 0, -T % chunk)).view(B, -1, chunk, H, K).cumsum(2) / 0.6931471805599453
    valid = (torch.arange(g.shape[1] * chunk) < T).view(1, -1, chunk, 1, 1)
    d = ((g - g[:, :, chunk // 2:chunk // 2 + 1]) * valid).abs().amax(dim=(2, 4))
    return (d < 60).float().mean().item()


def run_cases() -> dict:
    import torch
    import torch.nn.functional as F

    from mm_rec.ops import long_term_chunked, short_term_chunked
    from mm_rec.ops.long_term.kernel import long_term_kernel
    from mm_rec.ops.short_term.kernel import short_term_kernel
    out = {}
    for name, (B, T, H, Dk, decay, with_state) in LONG_CASES.items():
        gen = torch.Generator().manual_seed(T)
        q, k, v = (torch.randn(B, T, H, Dk, generator=gen) for _ in range(3))
        log_alpha = F.logsigmoid(2 * torch.randn(B, T, H, Dk, generator=gen)) * decay
        M0 = torch.randn(B, H, Dk, Dk, generator=gen) if with_state else None
        errs = _errors(long_term_kernel, lambda *a: long_term_chunked(*a, chunk_size=16), [q, k, v, log_alpha, M0], 2)
        out["long: " + name] = dict(errors=errs, fast_fraction=_fast_fraction(log_alpha))
    for name, (B, T, D, with_state) in SHORT_CASES.items():
        gen = torch.Generator().manual_seed(T)
        x = torch.randn(B, T, D, generator=gen)
        log_a = F.logsigmoid(torch.randn(B, T, D, generator=gen) + torch.linspace(0, 7, D))
        h0 = torch.randn(B, D, generator=gen) if with_state else None
        out["short: " + name] = dict(errors=_errors(short_term_kernel, short_term_chunked, [x, log_a, h0], 2))
    return out


@pytest.fixture(scope="module")
def interpreted():
    triton = pytest.importorskip("triton")
    if tuple(int(x) for x in triton.__version__.split(".")[:2]) < (3, 7):
        pytest.skip(f"Triton {triton.__version__}'s interpreter cannot run loops over runtime bounds under "
                    "NumPy 2 (fixed in 3.7); tests/ops/test_gpu_ops.py checks the kernels on a GPU")
    env = dict(os.environ, TRITON_INTERPRET="1")
    root = Path(__file__).resolve().parents[2]
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    r = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", list(LONG_CASES))
def test_long_term_kernels_match_the_reference(interpreted, name):
    case = interpreted["long: " + name]
    # o, M_T, then dq, dk, dv, d log_alpha (and dM0 with a state)
    n_grads = 5 if LONG_CASES[name][5] else 4
    assert len(case["errors"]) == 2 + n_grads
    assert max(case["errors"]) < BOUND, case["errors"]
    decay = LONG_CASES[name][4]
    fast = case["fast_fraction"]
    # the cases cover both of kernel_intra.py's paths, and the mix
    assert fast == 1.0 if decay < 1 else (fast == 0.0 if decay > 10 else 0.0 < fast < 1.0), fast


@pytest.mark.parametrize("name", list(SHORT_CASES))
def test_short_term_kernels_match_the_reference(interpreted, name):
    case = interpreted["short: " + name]
    assert len(case["errors"]) == 2 + 2 + SHORT_CASES[name][3]  # h, h_T; dx, dlog_a (, dh0)
    assert max(case["errors"]) < BOUND, case["errors"]



def test_short_term_segments_follow_the_gpu_size():
    """The scan cuts a sequence into segments for about programs_per_sm programs per SM, counted on
    the GPU it runs on: half the SMs, half the segments (each twice as long), whole tiles each."""
    pytest.importorskip("triton")
    from mm_rec.ops.short_term import kernel
    config = kernel.SCAN_CONFIG
    per_sm = config.programs_per_sm
    B, T, D = 4, 8192, 256
    tiles = D // config.block_d
    for sms in (132, 66, 20):
        ns, seg = kernel._segments(B, T, D, sms)
        want = per_sm * sms // (B * tiles)
        assert 0.9 * want <= ns <= want and seg % config.block_t == 0 and ns * seg >= T > (ns - 1) * seg
    assert kernel._segments(B, T, D, 66)[1] == 2 * kernel._segments(B, T, D, 132)[1]
    assert kernel._segments(1, 40, D, 132) == (2, 32)  # never more segments than tiles
    import torch
    assert kernel._num_sms(torch.device("cpu")) == 132

if __name__ == "__main__":
    print(json.dumps(run_cases()))
