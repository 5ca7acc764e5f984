"""The one MM-Rec block (model/block.py) against its token-by-token float64 oracle (model/block_ref.py):
forward for one expert and for two experts batched, gradients, the one-token step; and the names
checkpoints store."""
import json

import pytest
import torch

from mm_rec import MMRec100M, MMRecConfig
from mm_rec.model.batched import block_weights
from mm_rec.model.block import MMRecBlock, block_step, layer_forward
from mm_rec.model.block_ref import block_ref

F64 = torch.float64


def make_blocks(n=2, seed=0, **overrides):
    cfg = MMRecConfig(**{**dict(vocab_size=50, expert_dim=16, num_layers=2, num_heads=4, ffn_dim=24, mdi_dim=6,
                                alpha_rank=5, scan_chunk_size=8), **overrides})
    torch.manual_seed(seed)
    blocks = []
    for _ in range(n):
        block = MMRecBlock(cfg).to(F64)
        block.reset_parameters()
        with torch.no_grad():  # random biases and norm weights too, so no term is met by accident
            for p in block.parameters():
                p.add_(0.05 * torch.randn_like(p))
        blocks.append(block)
    return blocks


def random_state(block, B, seed):
    gen = torch.Generator().manual_seed(seed)
    state = block.init_state(B, dtype=F64)
    return {k: 0.3 * torch.randn(v.shape, generator=gen, dtype=F64) for k, v in state.items()}


def max_diff(a, b):
    return (a - b).abs().max().item()


def grads_of(fn, tensors):
    for t in tensors:
        t.grad = None
    y, state = fn()
    gen = torch.Generator().manual_seed(7)
    loss = (y * torch.randn(y.shape, generator=gen, dtype=F64)).sum() + state["h"].sum() + state["M"].pow(2).sum()
    loss.backward()
    return y.detach(), {k: v.detach() for k, v in state.items()}, [t.grad.clone() for t in tensors]


@pytest.mark.parametrize("fused,recompute", [(True, True), (True, False), (False, True)])
def test_block_forward_and_gradients_match_the_reference(fused, recompute):
    (block,) = make_blocks(1)
    block.use_kernel_fusion, block.recompute_gates = fused, recompute
    B, T = 2, 21  # not a multiple of the scan chunk
    x = torch.randn(B, T, block.dim, dtype=F64, requires_grad=True)
    state = {k: v.requires_grad_() for k, v in random_state(block, B, 1).items()}
    leaves = [x, state["h"], state["M"], *block.parameters()]
    y, s, g = grads_of(lambda: block(x, state), leaves)
    y_ref, s_ref, g_ref = grads_of(lambda: block_ref(block, x, state), leaves)
    assert max_diff(y, y_ref) < 1e-12
    assert all(max_diff(s[k], s_ref[k]) < 1e-12 for k in ("h", "M"))
    assert all(max_diff(a, r) < 1e-10 for a, r in zip(g, g_ref))
    assert all(r.abs().sum() > 0 for r in g_ref)


def test_two_experts_batched_match_the_reference_expert_by_expert():
    """layer_forward with E = 2 (what trains when both experts run): each expert's output, state and
    gradients are its own block's, as the oracle computes them alone."""
    blocks = make_blocks(2)
    B, T = 2, 13
    x = torch.randn(2, B, T, blocks[0].dim, dtype=F64, requires_grad=True)  # layer > 0: inputs differ
    states = [random_state(b, B, 2 + i) for i, b in enumerate(blocks)]
    params = [p for b in blocks for p in b.parameters()]

    def batched():
        y, new = layer_forward(blocks, x, states)
        return y, {k: torch.stack([s[k] for s in new]) for k in ("h", "M")}

    def reference():
        outs = [block_ref(b, x[i], states[i]) for i, b in enumerate(blocks)]
        return torch.stack([y for y, _ in outs]), {k: torch.stack([s[k] for _, s in outs]) for k in ("h", "M")}
    y, s, g = grads_of(batched, [x, *params])
    y_ref, s_ref, g_ref = grads_of(reference, [x, *params])
    assert max_diff(y, y_ref) < 1e-12
    assert all(max_diff(s[k], s_ref[k]) < 1e-12 for k in ("h", "M"))
    assert all(max_diff(a, r) < 1e-10 for a, r in zip(g, g_ref))


def steps(blocks, x, states):
    """block_step over x [E, B, T, d], token by token -> (y [E, B, T, d], per-expert states);
    one expert through MMRecBlock.step (its own [B, d] tokens)."""
    E, B = x.shape[:2]
    if states is None:
        states = [b.init_state(B, dtype=F64) for b in blocks]
    h, M = (torch.cat([st[k] for st in states]) for k in ("h", "M"))
    outs = []
    for t in range(x.shape[2]):
        if E == 1:
            y, st = blocks[0].step(x[0, :, t], {"h": h, "M": M})
            y, h, M = y[None], st["h"], st["M"]
        else:
            y, h, M = block_step(*block_weights(blocks), x[:, :, t], h, M, blocks[0].settings())
        outs.append(y)
    return torch.stack(outs, 2), [{"h": h_e, "M": M_e} for h_e, M_e in zip(h.chunk(E), M.chunk(E))]


@pytest.mark.parametrize("E", [1, 2])
def test_step_matches_the_reference_and_continues_forward(E):
    blocks = make_blocks(E)
    B, T = 3, 9
    x = torch.randn(E, B, T, blocks[0].dim, dtype=F64)
    with torch.no_grad():
        y, states = steps(blocks, x, None)
        for i, block in enumerate(blocks):
            y_ref, s_ref = block_ref(block, x[i])
            assert max_diff(y[i], y_ref) < 1e-12
            assert all(max_diff(states[i][k], s_ref[k]) < 1e-12 for k in ("h", "M"))
        # steps continue a parallel prefix, and a parallel forward continues steps
        y_fwd, prefix = layer_forward(blocks, x[:, :, :5], None)
        y_steps, after = steps(blocks, x[:, :, 5:], prefix)
        y_rest, final = layer_forward(blocks, x[:, :, 7:], steps(blocks, x[:, :, 5:7], prefix)[1])
        assert max_diff(torch.cat([y_fwd, y_steps], 2), y) < 1e-12
        assert max_diff(y_rest, y[:, :, 7:]) < 1e-12
        assert all(max_diff(a[k], b[k]) < 1e-12 for a, b in zip(after, final) for k in ("h", "M"))


def test_block_parameter_names_are_the_checkpoints():
    """Checkpoints, safetensors and Hugging Face exports store these names: a change needs a mapping
    on load."""
    (block,) = make_blocks(1)
    assert [name for name, _ in block.named_parameters()] == [
        "norm.weight", "in_proj.weight", "mdi.base_in.weight", "mdi.base_in.bias", "mdi.base_out.weight",
        "mdi.base_out.bias", "mdi.context_in.weight", "mdi.context_in.bias", "mdi.context_out.weight",
        "mdi.context_out.bias", "alpha_down.weight", "alpha_up.weight", "alpha_up.bias", "h_norm.weight",
        "o_norm.weight", "out_gate.weight", "out_proj.weight", "ffn_norm.weight", "ffn_in.weight", "ffn_in.bias",
        "ffn_out.weight", "ffn_out.bias"]


def test_configs_saved_with_the_old_chunk_size_name_load(tmp_path):
    """config.chunk_size (the recurrence's chunk) is now scan_chunk_size: checkpoints, export
    directories and Hugging Face config.json files that say chunk_size still load, with its value."""
    from safetensors.torch import save_file

    from mm_rec.inference.loading import load_model
    cfg = dict(vocab_size=50, expert_dim=16, num_layers=1, num_heads=2, ffn_dim=24, use_fusion=False)
    assert MMRecConfig.from_dict({**cfg, "chunk_size": 12}).scan_chunk_size == 12
    torch.manual_seed(0)
    model = MMRec100M(config=MMRecConfig(**cfg, scan_chunk_size=12)).eval()
    ids = torch.randint(0, 50, (2, 30))
    with torch.no_grad():
        expected = model(ids)
    old_config = {**{k: v for k, v in model.config.to_dict().items() if k != "scan_chunk_size"}, "chunk_size": 12}
    torch.save({"model_state_dict": model.state_dict(), "config": old_config}, tmp_path / "old.pt")
    (tmp_path / "export").mkdir()
    save_file(model.state_dict(), str(tmp_path / "export" / "model.safetensors"))
    (tmp_path / "export" / "config.json").write_text(json.dumps(old_config))
    for source in (tmp_path / "old.pt", tmp_path / "export"):
        loaded = load_model(source).model
        assert loaded.config.scan_chunk_size == 12
        with torch.no_grad():
            assert torch.equal(loaded(ids), expected)
    pytest.importorskip("transformers")
    from mm_rec.hf.configuration_mmrec import MMRecHFConfig
    assert MMRecHFConfig(**old_config).to_mmrec_config().scan_chunk_size == 12
