"""GraphedStep (mm_rec/training/step_graph.py): a whole training step replayed from a CUDA graph
must update the model exactly as the same step run eagerly, with the learning rate the schedule
sets at each step (not the one of the captured step), on inputs copied in at each call."""
from __future__ import annotations

import pytest
import torch

from mm_rec.training.optim import build_optimizer
from mm_rec.training.step import train_step
from mm_rec.training.step_graph import GraphedStep, inner_compile_mode

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]


def _model_and_optimizer(device):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(50, 16), torch.nn.Linear(16, 16), torch.nn.GELU(),
                                torch.nn.Linear(16, 50)).to(device)
    return model, build_optimizer(model, 1e-2, 0.1)


def _step(model, optimizer, x, y):  # the trainer's step (one micro-batch)
    loss_fn = lambda x, y: torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())  # noqa: E731
    loss, grad_norm, _ = train_step(model, optimizer, x[None], y[None], loss_fn, clip_norm=0.5)
    return loss, grad_norm


@pytest.mark.parametrize("device", DEVICES)
def test_replayed_steps_match_eager_steps_with_a_changing_lr(device):
    eager_model, eager_opt = _model_and_optimizer(device)
    graph_model, graph_opt = _model_and_optimizer(device)
    graphed = GraphedStep(graph_opt, warmup=2, capture=device == "cuda")
    gen = torch.Generator().manual_seed(1)
    for i in range(7):
        # a strided view, as a slice of a longer sequence is: the buffers keep its strides
        xy = torch.randint(0, 50, (4, 9), generator=gen).to(device)
        x, y = xy[:, :-1], xy[:, 1:]
        for opt in (eager_opt, graph_opt):
            for group in opt.param_groups:
                group["lr"] = 1e-2 / (i + 1)
        loss_e, norm_e = _step(eager_model, eager_opt, x, y)
        loss_g, norm_g = graphed("key", lambda a, b: _step(graph_model, graph_opt, a, b), x, y)
        eager_opt.zero_grad(set_to_none=True)
        graph_opt.zero_grad(set_to_none=True)
        torch.testing.assert_close(loss_g, loss_e, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(norm_g, norm_e, rtol=1e-5, atol=1e-6)
        assert graphed.captured == (1 if i >= 2 else 0)
    for a, b in zip(eager_model.parameters(), graph_model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    # the param groups keep the schedule's floats (checkpoints, the scheduler)
    assert all(isinstance(g["lr"], float) and not g["capturable"] for g in graph_opt.param_groups)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_replay_reads_new_inputs_and_keys_keep_their_own_graphs():
    """Two keys (Stage 2's experts) each get a graph; a replay computes on the batch given to that
    call, not on the one captured."""
    model, opt = _model_and_optimizer("cuda")
    graphed = GraphedStep(opt, warmup=1)
    step = lambda a, b: _step(model, opt, a, b)
    x = torch.randint(0, 50, (4, 8), device="cuda")
    for key in ("text", "code", "text", "code"):
        graphed(key, step, x, x)
        opt.zero_grad(set_to_none=True)
    assert graphed.captured == 2
    other = torch.randint(0, 50, (4, 8), device="cuda")
    with torch.no_grad():
        expected = torch.nn.functional.cross_entropy(model(other).flatten(0, 1), other.flatten())
    loss, _ = graphed("text", step, other, other)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


def test_inputs_of_another_shape_get_their_own_warmup_and_graph():
    model, opt = _model_and_optimizer("cpu")
    graphed = GraphedStep(opt, warmup=1, capture=False)
    step = lambda a, b: _step(model, opt, a, b)
    for T in (8, 8, 16, 16, 8):
        x = torch.randint(0, 50, (2, T))
        loss, _ = graphed("key", step, x, x)
        opt.zero_grad(set_to_none=True)
        assert torch.isfinite(loss)
    assert graphed.captured == 2


def test_compiled_parts_inside_a_graph_have_no_cuda_graphs_of_their_own():
    assert inner_compile_mode("reduce-overhead") is None
    assert inner_compile_mode("max-autotune") == "max-autotune-no-cudagraphs"
    assert inner_compile_mode(None) is None and inner_compile_mode("max-autotune-no-cudagraphs") == \
        "max-autotune-no-cudagraphs"


def test_warmup_must_leave_one_eager_step():
    _, opt = _model_and_optimizer("cpu")
    with pytest.raises(ValueError, match="warmup must be at least 1"):
        GraphedStep(opt, warmup=0)


@pytest.mark.parametrize("device", DEVICES)
def test_clear_drops_the_graphs_and_their_memory(device):
    """clear() forgets every key: the next call warms up and captures again, and (on CUDA) the
    graphs' pool goes back to the allocator. Measured as what clear releases, not against the
    memory before the first step: compared that way, 64 MiB stayed reserved on an H100,
    most likely the cuBLAS workspaces of the warm-up's and capture's own streams."""
    model, opt = _model_and_optimizer(device)
    graphed = GraphedStep(opt, warmup=1, capture=device == "cuda")
    step = lambda a, b: _step(model, opt, a, b)
    x = torch.randint(0, 50, (256, 256), device=device)  # ~13 MB of logits: a pool of tens of MB
    for _ in range(3):
        graphed("key", step, x, x)
        opt.zero_grad(set_to_none=True)
    assert graphed.captured == 1
    if device == "cuda":
        torch.cuda.synchronize()
        with_graph = torch.cuda.memory_reserved()
    graphed.clear()
    assert graphed.captured == 0
    if device == "cuda":
        torch.cuda.empty_cache()
        released = with_graph - torch.cuda.memory_reserved()
        assert released >= 10 * 2**20, released
    graphed("key", step, x, x)  # a warm-up step again: run eagerly, nothing captured
    assert graphed.captured == 0
    graphed("key", step, x, x)
    assert graphed.captured == 1
