"""The CUDA-graph decode step on a real GPU (skipped without CUDA; tests/inference/test_state.py holds
the same buffer handling to the eager step on the CPU, emulated): replayed graphs give the eager
step's logits and states, batch buckets pad without mixing rows, and `generate` / `model.generate`
take the graphed path on CUDA and produce the eager path's tokens, in float32 and in bfloat16."""
import pytest
import torch

from mm_rec.inference.decode import DecodeStep, bucket_for, decode_step_for
from mm_rec.inference.generation import generate
from mm_rec.inference.state import RecurrentState
from mm_rec.model import MMRec100M, MMRecConfig

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def cuda_model(dtype=torch.float32):
    torch.manual_seed(0)
    config = MMRecConfig(vocab_size=300, expert_dim=64, num_layers=3, num_heads=4, ffn_dim=128, init_std=0.05)
    return MMRec100M(config=config).to("cuda", dtype).eval()


@pytest.mark.parametrize("expert", ["fused", "text", "code"])
@pytest.mark.parametrize("batch", [1, 3])  # 3 runs in the bucket of 4: a padded row must not leak in
def test_graph_replays_match_the_eager_step(expert, batch):
    model = cuda_model()
    gen = torch.Generator(device="cuda").manual_seed(batch)
    prompt = torch.randint(0, 300, (batch, 17), device="cuda", generator=gen)
    expert_type = None if expert == "fused" else expert
    with torch.inference_mode():
        _, states = model(prompt, expert_type=expert_type, return_memory=True)
    start = RecurrentState.from_memory_states(states)
    graphed, eager = DecodeStep(model, use_cuda_graphs=True), DecodeStep(model, use_cuda_graphs=False)
    assert graphed.graphed and not eager.graphed
    s_graph, s_eager = start, start.clone()
    ids = prompt[:, -1]
    for _ in range(5):  # decoding on from the returned (static) state
        logits_g, s_graph = graphed(ids, s_graph, expert_type)
        logits_e, s_eager = eager(ids, s_eager, expert_type)
        scale = logits_e.abs().max().item()
        torch.testing.assert_close(logits_g, logits_e, rtol=1e-5, atol=1e-5 * scale)
        ids = logits_e.argmax(-1)
    for a, b in zip(s_graph.tensors(), s_eager.tensors()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())
    assert list(graphed.graphs) == [(expert_type, bucket_for(batch), torch.float32)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_generate_on_cuda_takes_the_graphed_step_and_matches_eager(dtype, monkeypatch):
    model = cuda_model(dtype)
    gen = torch.Generator(device="cuda").manual_seed(7)
    prompts = torch.randint(0, 300, (4, 12), device="cuda", generator=gen)
    monkeypatch.setenv("MMREC_CUDA_GRAPHS", "0")
    model.__dict__.pop("_decode_step", None)
    eager = generate(model, prompts, 24, temperature=0)
    assert not decode_step_for(model).graphed
    monkeypatch.setenv("MMREC_CUDA_GRAPHS", "1")
    model.__dict__.pop("_decode_step", None)
    graphed = model.generate(prompts, 24, temperature=0)
    step = decode_step_for(model)
    assert step.graphed and step.graphs, "generate on CUDA must replay the captured step"
    # 4 rows fill their bucket: the replay runs the eager step's kernels on the same shapes
    assert torch.equal(graphed, eager)
