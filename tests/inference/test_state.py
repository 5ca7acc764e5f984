"""RecurrentState (row select / concat / where / replace, conversion to the model's dicts, zeros that
equal the model's own start, unbind and compact) and DecodeStep's eager path (= model.step), bucket sizes."""
import pytest
import torch

from mm_rec.inference.decode import DecodeStep, bucket_for
from mm_rec.inference.state import RecurrentState
from mm_rec.model import MMRec100M, MMRecConfig


def tiny_model():
    torch.manual_seed(0)
    config = MMRecConfig(vocab_size=50, expert_dim=16, num_layers=2, num_heads=2, ffn_dim=32, scan_chunk_size=8,
                         init_std=0.1)
    return MMRec100M(config=config).double().eval()


def state_after(model, ids, expert="fused"):
    _, states = model(ids, expert_type=expert, return_memory=True)
    return RecurrentState.from_memory_states(states)


def test_conversion_is_lossless_and_shares_tensors():
    model = tiny_model()
    ids = torch.randint(0, 50, (3, 7), generator=torch.Generator().manual_seed(1))
    _, raw = model(ids, return_memory=True)
    state = RecurrentState.from_memory_states(raw)
    assert state.batch_size == 3 and state.expert_names == ("text", "code") and state.dtype == torch.float64
    back = state.to_memory_states()
    assert back["code"][1]["M"] is raw["code"][1]["M"] and back["text"][0]["h"] is raw["text"][0]["h"]
    assert state.nbytes == sum(t.numel() * 8 for layers in raw.values() for l in layers for t in l.values())


def test_select_concat_where_replace_act_on_rows():
    model = tiny_model()
    gen = torch.Generator().manual_seed(2)
    a = state_after(model, torch.randint(0, 50, (3, 5), generator=gen))
    b = state_after(model, torch.randint(0, 50, (2, 5), generator=gen))
    both = RecurrentState.concat([a, b])
    assert both.batch_size == 5
    assert both.select([3, 4]).equal(b) and both.select([0, 1, 2]).equal(a)
    picked = both.select([4, 0])
    assert torch.equal(picked.experts["code"][1].M[0], b.experts["code"][1].M[1])
    assert torch.equal(picked.experts["text"][0].h[1], a.experts["text"][0].h[0])
    mask = torch.tensor([True, False, True])
    mixed = a.where(mask, b.select([0, 1, 0]))
    assert torch.equal(mixed.experts["text"][1].M[1], b.experts["text"][1].M[1])
    assert torch.equal(mixed.experts["text"][1].M[2], a.experts["text"][1].M[2])
    replaced = a.replace_rows([2], b.select([1]))
    assert replaced.select([2]).equal(b.select([1])) and replaced.select([0, 1]).equal(a.select([0, 1]))
    assert not replaced.equal(a)
    with pytest.raises(ValueError, match="different experts"):
        RecurrentState.concat([a, state_after(model, torch.randint(0, 50, (1, 5), generator=gen), "text")])


def test_unbind_gives_rows_as_views_and_compact_copies_into_one_buffer():
    model = tiny_model()
    state = state_after(model, torch.randint(0, 50, (3, 5), generator=torch.Generator().manual_seed(3)))
    rows = state.unbind()
    assert len(rows) == 3 and all(row.equal(state.select([i])) for i, row in enumerate(rows))
    assert rows[1].experts["code"][1].M.data_ptr() == state.experts["code"][1].M[1].data_ptr()  # no copy
    mixed = RecurrentState({"text": state.experts["text"], "code": state.to(dtype=torch.float32).experts["code"]})
    compact = mixed.compact()
    assert compact.equal(mixed) and compact.experts["code"][0].h.dtype == torch.float32
    for original, copy in zip(mixed.tensors(), compact.tensors()):
        assert copy.shape == original.shape and copy.dtype == original.dtype and copy.is_contiguous()
    buffers = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in compact.tensors()}
    assert len(buffers) == 2 and sum(buffers.values()) == mixed.nbytes  # one buffer per dtype, nothing else


def test_zeros_and_missing_experts_equal_the_models_empty_start():
    model = tiny_model()
    ids = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(3))
    from_none = state_after(model, ids)
    _, from_zeros = model(ids, return_memory=True, memory_states=RecurrentState.zeros(
        model, 2, ("text", "code"), dtype=torch.float64).to_memory_states())
    assert from_none.equal(RecurrentState.from_memory_states(from_zeros))
    # A text-only state continued with both experts: code starts from zeros.
    text_only = state_after(model, ids, "text")
    widened = text_only.with_experts(("text", "code"), model)
    assert widened.expert_names == ("text", "code") and widened.experts["code"][0].M.abs().sum() == 0
    # merged_into keeps an expert that did not run.
    assert text_only.merged_into(from_none).experts["code"] is from_none.experts["code"]
    assert text_only.merged_into(from_none).experts["text"] is text_only.experts["text"]


def test_decode_step_on_cpu_is_model_step():
    model = tiny_model()
    ids = torch.randint(0, 50, (3, 6), generator=torch.Generator().manual_seed(4))
    state = state_after(model, ids)
    step = DecodeStep(model)
    assert not step.graphed
    tokens = torch.tensor([1, 2, 3])
    logits, new = step(tokens, state, "fused")
    want_logits, want = model.step(tokens, state.to_memory_states(), expert_type="fused")
    assert torch.equal(logits, want_logits) and new.equal(RecurrentState.from_memory_states(want))


def test_bucket_sizes():
    assert [bucket_for(n) for n in (1, 2, 3, 5, 64, 65, 256, 257, 600)] == [1, 2, 4, 8, 64, 128, 256, 512, 768]
    with pytest.raises(ValueError):
        bucket_for(0)


def test_generate_through_the_graph_buffers_equals_eager():
    """DecodeStep's graphed path (static buffers, bucket padding, decoding on from the returned
    state, loads when the batch changes), emulated on the CPU: generate gives the same tokens and
    memory as the eager step, finished rows' states included."""
    from mm_rec.inference.generation import generate
    model = tiny_model()
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 50, (n,), generator=gen) for n in (3, 7, 5)]  # batch 3 -> bucket 4
    free = generate(model, prompts, 6, temperature=0)
    eot = int(free[0][3])  # row 0's first new token plays end-of-text
    runs = []
    for emulate in (False, True):
        model.__dict__.pop("_decode_step", None)
        if emulate:
            model.__dict__["_decode_step"] = DecodeStep(model, emulate=True)
            model.__dict__["_decode_step"]._key = model.__dict__["_decode_step"]._model_key()
        out, memory = generate(model, torch.stack([p[:3] for p in prompts]), 8, temperature=0, stop_at_eot=True,
                               eot_id=eot, return_memory=True)
        ragged = generate(model, prompts, 8, temperature=0)
        runs.append((out, RecurrentState.from_memory_states(memory), ragged))
    (out_e, mem_e, rag_e), (out_g, mem_g, rag_g) = runs
    assert model.__dict__["_decode_step"].graphs  # the graphed path ran
    assert torch.equal(out_e, out_g) and all(torch.equal(a, b) for a, b in zip(rag_e, rag_g))
    # (a padded bucket changes the matmuls' shapes: float64 rounding differs in the last bits)
    torch.testing.assert_close(mem_g.to_memory_states(), mem_e.to_memory_states(), rtol=1e-10, atol=1e-12)
    model.__dict__.pop("_decode_step", None)


def test_bench_decode_runs_on_the_cpu(tmp_path):
    """bench_decode (whose CUDA-graph step is now the package's) still measures on the CPU."""
    import json
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "decode.json"
    r = subprocess.run([sys.executable, "benchmarks/bench_decode.py", "--device", "cpu", "--preset", "tiny",
                        "--contexts", "8", "32", "--batch_sizes", "1", "2", "--steps", "2", "--warmup", "1",
                        "--json", str(out)], cwd=root, capture_output=True, text=True, timeout=600,
                       env={**__import__("os").environ, "PYTHONPATH": str(root)})
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads(out.read_text())["results"]
    assert sorted((x["context"], x["batch_size"]) for x in rows) == [(8, 1), (8, 2), (32, 1), (32, 2)]
    assert all(x["mode"] == "eager" and x["median_ms"] > 0 for x in rows)
