"""Whole-model properties of MMRec100M, in float64 on the CPU."""
import pytest
import torch
import torch.nn.functional as F

from mm_rec import MMRec100M, MMRecConfig
from mm_rec.ops import reference_mode

F64 = torch.float64


def tiny_model(seed=0, **overrides) -> MMRec100M:
    torch.manual_seed(seed)
    cfg = dict(vocab_size=101, expert_dim=16, num_layers=2, num_heads=4, ffn_dim=32, scan_chunk_size=8)
    cfg.update(overrides)
    model = MMRec100M(config=MMRecConfig(**cfg)).to(F64)
    # Random (not zero-initialised) fusion and biases, so the properties are not met by accident.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


def ids(B=2, T=300, vocab=101, seed=1):
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def max_diff(a, b):
    return (a - b).abs().max().item()


def states_diff(s1, s2):
    return max(max_diff(l1[k], l2[k]) for e in s1 for l1, l2 in zip(s1[e], s2[e]) for k in ("h", "M"))


def test_default_config_has_90_to_100M_parameters():
    with torch.device("meta"):
        model = MMRec100M()  # vocab 32000, d 256, 16 layers, 8 heads, ffn 3072
    parts = model.get_expert_params()
    assert 90e6 <= model.get_num_params() <= 100e6
    assert parts["total"] == model.get_num_params()
    assert parts["text"] == parts["code"]
    assert parts["embedding"] == 32000 * 256 and parts["lm_head"] == 512 * 32000
    assert parts["fusion"] == 512 * 512 + 512


@pytest.mark.parametrize("expert_type", [None, "text", "code"])
def test_causal(expert_type):
    model = tiny_model()
    x = ids(T=120)
    y = x.clone()
    y[:, 70:] = (y[:, 70:] + 7) % 101
    a, b = model(x, expert_type=expert_type), model(y, expert_type=expert_type)
    assert max_diff(a[:, :70], b[:, :70]) == 0.0
    assert max_diff(a[:, 70:], b[:, 70:]) > 1e-3  # later positions do see the change


def test_parallel_forward_matches_sequential_reference():
    model = tiny_model()
    x = ids(T=90)
    logits, states = model(x, return_memory=True)
    with reference_mode():
        ref_logits, ref_states = model(x, return_memory=True)
    assert max_diff(logits, ref_logits) < 1e-10
    assert states_diff(states, ref_states) < 1e-10


@pytest.mark.parametrize("chunk_size", [7, 64, 256])
def test_chunk_size_gives_unchunked_logits_and_states(chunk_size):
    model = tiny_model(use_fusion=True)
    x = ids(T=300)
    full, full_states = model(x, return_memory=True)
    chunked, chunked_states = model(x, chunk_size=chunk_size, return_memory=True)
    assert max_diff(full, chunked) < 1e-10
    assert states_diff(full_states, chunked_states) < 1e-10


def test_long_inputs_are_chunked_automatically():
    model = tiny_model(max_unchunked_len=50)
    x = ids(T=130)
    auto = model(x)
    model.config.max_unchunked_len = 10_000
    assert max_diff(auto, model(x)) < 1e-10


@pytest.mark.parametrize("expert_type", [None, "text", "code"])
def test_memory_states_continue_a_sequence(expert_type):
    model = tiny_model()
    x = ids(T=200)
    full, full_states = model(x, expert_type=expert_type, return_memory=True)
    first, states = model(x[:, :77], expert_type=expert_type, return_memory=True)
    second, states = model(x[:, 77:], expert_type=expert_type, memory_states=states, return_memory=True)
    assert max_diff(torch.cat([first, second], 1), full) < 1e-10
    assert states_diff(states, full_states) < 1e-10


@pytest.mark.parametrize("expert_type", [None, "code"])
def test_consume_gives_the_forward_states_without_logits(expert_type):
    model = tiny_model()
    x = ids(T=130)
    _, full_states = model(x, expert_type=expert_type, return_memory=True)
    for chunk in (None, 7, 64):
        assert states_diff(model.consume(x, expert_type=expert_type, chunk_size=chunk), full_states) < 1e-10
    _, prev = model(x[:, :50], expert_type=expert_type, return_memory=True)
    assert states_diff(model.consume(x[:, 50:], expert_type=expert_type, memory_states=prev), full_states) < 1e-10


@pytest.mark.parametrize("expert_type", [None, "text"])
def test_single_token_step_reproduces_forward(expert_type):
    model = tiny_model(use_fusion=True)
    x = ids(T=40)
    full, full_states = model(x, expert_type=expert_type, return_memory=True)
    states, outs = None, []
    for t in range(x.shape[1]):
        logits, states = model.step(x[:, t], states, expert_type=expert_type)
        outs.append(logits)
    assert max_diff(torch.stack(outs, 1), full) < 1e-10
    assert states_diff(states, full_states) < 1e-10
    # and a step continues a parallel prefix
    _, prefix_states = model(x[:, :25], expert_type=expert_type, return_memory=True)
    logits, _ = model.step(x[:, 25], prefix_states, expert_type=expert_type)
    assert max_diff(logits, full[:, 25]) < 1e-10


def params_with_grad(model):
    return {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}


@pytest.mark.parametrize("active,idle", [("text", "code"), ("code", "text")])
def test_single_expert_leaves_the_other_without_gradient(active, idle):
    model = tiny_model()
    model(ids(T=50), expert_type=active).logsumexp(-1).mean().backward()
    for name, p in model.named_parameters():
        if name.startswith(f"experts.{idle}."):
            assert p.grad is None, name
        if name.startswith(f"experts.{active}."):
            assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("method", ["concatenate", "weighted"])
def test_both_experts_with_fusion_train_every_parameter(method):
    model = tiny_model(use_fusion=True, fusion_method=method)
    model(ids(T=50)).logsumexp(-1).mean().backward()
    names = {n for n, _ in model.named_parameters()}
    assert params_with_grad(model) == names


@pytest.mark.parametrize("method", ["concatenate", "weighted"])
def test_fusion_is_identity_at_initialisation(method):
    torch.manual_seed(0)
    cfg = MMRecConfig(vocab_size=101, expert_dim=16, num_layers=2, num_heads=4, ffn_dim=32, fusion_method=method)
    model = MMRec100M(config=cfg).to(F64)
    x = ids(T=60)
    model.use_fusion = False
    off = model(x)
    model.use_fusion = True
    on = model(x)
    assert max_diff(on, off) < 1e-12
    with torch.no_grad():
        model.fusion.proj.weight.add_(0.1)
    assert max_diff(model(x), off) > 1e-3  # the switch really routes through the fusion layer


def test_gradient_checkpointing_gives_the_same_gradients():
    model = tiny_model(use_fusion=True)
    x = ids(T=64)

    def grads():
        model.zero_grad(set_to_none=True)
        model(x).logsumexp(-1).mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    model.train()
    plain = grads()
    model.use_gradient_checkpointing = True
    checkpointed = grads()
    assert plain.keys() == checkpointed.keys()
    assert max(max_diff(plain[n], checkpointed[n]) for n in plain) < 1e-12


def test_kernel_fusion_switch_computes_the_same_function():
    model = tiny_model()
    x = ids(T=50)
    fused = model(x)
    model.use_kernel_fusion = False
    assert all(not b.use_kernel_fusion for e in model.experts.values() for b in e.blocks)
    assert max_diff(model(x), fused) < 1e-12


@pytest.mark.parametrize("expert_type", [None, "code"])
def test_both_experts_batched_equal_expert_by_expert_with_gradients_and_states(expert_type):
    """model/batched.py (the active experts in one batched computation; E = 1 for one expert) ==
    each expert's own blocks (MMRecBlock.forward)."""
    model = tiny_model(use_fusion=True, dropout=0.0)
    active = ("text", "code") if expert_type is None else (expert_type,)
    x = ids(T=70)
    # carried state for the text expert only: the code expert starts from zeros on both paths
    with torch.no_grad():
        _, prev = model(ids(T=20, seed=5), expert_type="text", return_memory=True)

    def run(batched):
        model.zero_grad(set_to_none=True)
        if batched:
            logits, states = model(x, expert_type=expert_type, memory_states=prev, return_memory=True)
        else:  # the same model, expert by expert (MMRecBlock.forward), fused projection kept
            feats, states = {}, {}
            emb = model.embedding(x)
            for name in active:
                feats[name], states[name] = model.experts[name](emb, prev.get(name))
            logits = model.lm_head(model._hidden(feats))
        logits.logsumexp(-1).mean().backward()
        return logits.detach(), states, {n: p.grad.clone() for n, p in model.named_parameters()
                                         if p.grad is not None}

    l1, s1, g1 = run(True)
    l2, s2, g2 = run(False)
    assert max_diff(l1, l2) < 1e-12 and states_diff(s1, s2) < 1e-12
    assert g1.keys() == g2.keys() and max(max_diff(g1[n], g2[n]) for n in g1) < 1e-12
    assert all(g.abs().sum() > 0 for g in g1.values())
    idle = [n for n, _ in model.named_parameters() if n.startswith("experts.") and n.split(".")[1] not in active]
    assert all(n not in g1 for n in idle)  # an expert that did not run gets no gradient


@pytest.mark.parametrize("expert_type,chunk_size,head_chunk", [(None, None, 37), ("code", 64, 1000), (None, 50, 64)])
def test_loss_in_head_chunks_equals_cross_entropy_of_the_logits(expert_type, chunk_size, head_chunk):
    """model.loss never builds [B, T, vocab] logits, yet gives F.cross_entropy's value and gradients."""
    model = tiny_model(use_fusion=True)
    x, y = ids(T=120), ids(T=120, seed=9)

    def grads(fn):
        model.zero_grad(set_to_none=True)
        loss = fn()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    ref, g_ref = grads(lambda: F.cross_entropy(model(x, expert_type=expert_type, chunk_size=chunk_size)
                                               .flatten(0, 1), y.flatten()))
    got, g_got = grads(lambda: model.loss(x, y, expert_type=expert_type, chunk_size=chunk_size, head_chunk=head_chunk))
    assert abs(got.item() - ref.item()) < 1e-12
    assert g_got.keys() == g_ref.keys() and max(max_diff(g_got[n], g_ref[n]) for n in g_ref) < 1e-12
    loss, states = model.loss(x, y, expert_type=expert_type, return_memory=True)
    _, ref_states = model(x, expert_type=expert_type, return_memory=True)
    assert states_diff(states, ref_states) < 1e-12


@pytest.mark.parametrize("expert_type", [None, "text"])  # both experts batched; one expert's own blocks
def test_recomputed_gates_give_the_same_gradients_and_save_activations(expert_type):
    """recompute_gates: the same gradients (float64), and under bf16 autocast the gates' fp32
    intermediates are not kept for backward (only their bf16 inputs are)."""
    model = tiny_model()
    x = ids(T=64)

    def run(recompute, autocast):
        model.recompute_gates = recompute
        model.zero_grad(set_to_none=True)
        saved = {}
        def pack(t):
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
                torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            loss = model(x, expert_type=expert_type).float().logsumexp(-1).mean()
        loss.backward()
        return sum(saved.values()), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    _, g_plain = run(False, False)
    _, g_recomputed = run(True, False)
    assert g_plain.keys() == g_recomputed.keys()
    assert max(max_diff(g_plain[n], g_recomputed[n]) for n in g_plain) < 1e-12

    model.float()
    kept_plain, g_plain = run(False, True)
    kept_recomputed, g_recomputed = run(True, True)
    assert max(max_diff(g_plain[n], g_recomputed[n]) / g_plain[n].abs().max().item() for n in g_plain) < 1e-5
    # Plain autograd keeps five fp32 [tokens, d] tensors per layer and expert (the fp32 copies of
    # a, c, g, z and the decay's input); recomputing keeps three bf16 ones (a, c, the decay's input).
    cfg = model.config
    units = x.numel() * cfg.num_layers * (2 if expert_type is None else 1) * cfg.expert_dim
    assert kept_plain - kept_recomputed >= (5 * 4 - 3 * 2) * units, (kept_plain, kept_recomputed, units)


def test_stacked_bias_inside_the_gemm_equals_the_bias_added_after():
    """batched.linear_bias_in_gemm (the bias a row of the weight, against a column of ones): the
    same output and the same gradients, the bias's included, as the product plus the bias."""
    from mm_rec.model.batched import BIAS_COLUMNS, linear as _linear, linear_bias_in_gemm as _linear_bias_in_gemm
    gen = torch.Generator().manual_seed(3)
    E, N, d_in, d_out = 2, 50, 24, 40
    x, w, b = (torch.randn(*shape, generator=gen, dtype=F64, requires_grad=True)
               for shape in ((E, N, d_in), (E, d_in, d_out), (E, 1, d_out)))
    dy = torch.randn(E, N, d_out, generator=gen, dtype=F64)

    def run(fn):
        y = fn(x, (w, b))
        grads = torch.autograd.grad(y, (x, w, b), dy)
        return y.detach(), grads
    y_ref, g_ref = run(_linear)
    y, g = run(_linear_bias_in_gemm)
    assert max_diff(y, y_ref) < 1e-12 and all(max_diff(a, r) < 1e-12 for a, r in zip(g, g_ref))
    assert max_diff(g[2], dy.sum(1, keepdim=True)) < 1e-12
    assert BIAS_COLUMNS % 8 == 0  # an inner dimension that is a multiple of 8 stays one


@pytest.mark.parametrize("expert_type", [None, "text"])  # both experts batched (E = 2); one expert
def test_the_ffn_keeps_one_wide_tensor_a_layer_for_backward(expert_type):
    """The FFN saves its hidden pre-activation once per layer and expert (stacked: without ffn_in's
    bias, which its backward adds again), never gelu's output or a second biased copy."""
    model = tiny_model(ffn_dim=48)
    x = ids(T=40)
    saved = {}

    def pack(t):
        if t.shape[-1] == model.config.ffn_dim and t.numel() >= x.numel() * model.config.ffn_dim:
            saved[t.untyped_storage().data_ptr()] = t.shape
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(x, expert_type=expert_type).logsumexp(-1).mean()
    loss.backward()
    E = 2 if expert_type is None else 1
    assert len(saved) == model.config.num_layers, saved
    assert all(shape.numel() == E * x.numel() * model.config.ffn_dim for shape in saved.values())


@pytest.mark.parametrize("expert_type", [None, "text"])  # both experts batched; one expert (E = 1)
def test_float32_and_bf16_autocast_agree_with_float64(expert_type):
    model = tiny_model()
    x = ids(T=100)
    ref = model(x, expert_type=expert_type)
    model32 = model.float()
    out32 = model32(x, expert_type=expert_type)
    assert out32.dtype == torch.float32
    assert max_diff(out32.double(), ref) < 1e-4
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out16, states = model32(x, expert_type=expert_type, return_memory=True)
    assert states["text"][0]["M"].dtype == torch.float32  # carried states stay fp32
    rel = ((out16.double() - ref).norm() / ref.norm()).item()
    assert rel < 3e-2, rel


def test_bad_arguments_raise():
    model = tiny_model()
    with pytest.raises(ValueError, match="expert_type"):
        model(ids(T=5), expert_type="music")
    with pytest.raises(ValueError, match="input_ids"):
        model(ids(T=5)[0])
    with pytest.raises(ValueError, match="divisible"):
        MMRecConfig(expert_dim=30, num_heads=4)


@pytest.mark.compile
@pytest.mark.parametrize("expert_type,checkpointing", [(None, False), ("code", False), (None, True)])
def test_compiled_blocks_match_eager_with_one_graph_for_every_layer(expert_type, checkpointing):
    """compile_blocks (torch.compile of the layer and of the LM head's loss, as --compile does it)
    gives eager's loss and gradients in float64: both experts, one expert, under gradient
    checkpointing, the loss in checkpointed chunks. The layers differ only in their weights, so
    one graph serves all three (compile time does not grow with depth) and a second step compiles
    nothing new. (One compile serves both checks: compiling is most of this suite's CPU time.)"""
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model = tiny_model(num_layers=3)
    model.use_gradient_checkpointing = checkpointing
    x = ids(B=2, T=40)
    eager_loss = model.loss(x[:, :-1], x[:, 1:], expert_type=expert_type, head_chunk=32)
    eager_loss.backward()
    eager_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    model.compile_blocks()
    loss = model.loss(x[:, :-1], x[:, 1:], expert_type=expert_type, head_chunk=32)  # 3 chunks, recomputed
    loss.backward()
    assert torch.allclose(loss, eager_loss, rtol=1e-10, atol=0)
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads.keys() == eager_grads.keys() and len(eager_grads) > 20
    for n, g in eager_grads.items():
        assert torch.allclose(grads[n], g, rtol=1e-8, atol=1e-12), n
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    model.loss(x[:, :-1], x[:, 1:], expert_type=expert_type, head_chunk=32).backward()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs  # nothing recompiled
    if not checkpointing:
        # one graph for the three layers, one or two for the LM head's loss (chunks of 32 and 7
        # tokens); a graph per layer would make at least 3 + 1
        assert graphs <= 3, graphs
    torch._dynamo.reset()


def test_hidden_is_the_lm_heads_input():
    torch.manual_seed(0)
    model = MMRec100M(config=MMRecConfig(vocab_size=64, expert_dim=16, num_layers=2, num_heads=2, ffn_dim=32)).eval()
    x = torch.randint(0, 64, (2, 24))
    for expert in ("text", "fused"):
        h = model.hidden(x, expert_type=expert)
        assert h.shape == (2, 24, 32)
        torch.testing.assert_close(model.lm_head(h), model(x, expert_type=expert), rtol=0, atol=0)
    torch.testing.assert_close(model.hidden(x, chunk_size=8), model.hidden(x), rtol=1e-5, atol=1e-5)
