"""Session memory: exact round trip, continuation == uninterrupted, id validation, clear errors."""

import json

import pytest
import torch

from mm_rec.inference.generation import generate
from mm_rec.inference.sessions import SessionMemoryManager, flatten_states
from mm_rec.model import MMRec100M, MMRecConfig
from mm_rec.utils.errors import UserError

VOCAB = 300


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    config = MMRecConfig(**{**dict(vocab_size=VOCAB, expert_dim=16, num_layers=2, num_heads=2, ffn_dim=32,
                                   scan_chunk_size=8, init_std=0.1), **overrides})
    return MMRec100M(config=config).eval()


def prompt(n, seed):
    return torch.randint(0, VOCAB, (2, n), generator=torch.Generator().manual_seed(seed))


def test_saved_loaded_continued_equals_uninterrupted(tmp_path):
    model = tiny_model()
    sessions = SessionMemoryManager(tmp_path / "sessions")
    turn1, turn2 = prompt(7, 1), prompt(5, 2)

    # Uninterrupted: one process keeps the state in memory between the two turns.
    out1, memory = generate(model, turn1, 6, temperature=0, return_memory=True)
    direct = generate(model, turn2, 9, temperature=0, memory_states=memory)

    # Interrupted: the state goes to disk and comes back in a "new process".
    sessions.serialize_state("user-42", memory, token_count=out1.shape[1], config=model.config)
    restored = SessionMemoryManager(tmp_path / "sessions").load_state("user-42", device="cpu", config=model.config)
    resumed = generate(model, turn2, 9, temperature=0, memory_states=restored)
    assert torch.equal(resumed, direct)

    # Bit-exact round trip of every tensor, same keys and dtypes.
    before, after = flatten_states(memory), flatten_states(restored)
    assert sorted(before) == sorted(after) and "text.1.M" in before
    for key in before:
        assert before[key].dtype == after[key].dtype and torch.equal(before[key], after[key])

    meta = sessions.load_metadata("user-42")
    assert meta["token_count"] == 13 and meta["config_hash"] == model.config.arch_hash()
    assert meta["experts"] == ["text", "code"] and meta["dtype"] == "float32" and meta["batch_size"] == 2
    assert sessions.list_sessions() == ["user-42"]


def test_sampled_continuation_is_identical_too(tmp_path):
    model = tiny_model()
    sessions = SessionMemoryManager(tmp_path)
    _, memory = generate(model, prompt(4, 3), 3, temperature=0, return_memory=True)
    sessions.serialize_state("s", memory, token_count=7, config=model.config)
    draw = lambda states: generate(model, prompt(3, 4), 12, temperature=0.9, top_p=0.9, memory_states=states,
                                   generator=torch.Generator().manual_seed(7))
    assert torch.equal(draw(memory), draw(sessions.load_state("s", config=model.config)))


def test_overwrite_replaces_the_state_and_keeps_created(tmp_path):
    model = tiny_model()
    sessions = SessionMemoryManager(tmp_path)
    _, a = generate(model, prompt(3, 5), 2, temperature=0, return_memory=True)
    _, b = generate(model, prompt(3, 6), 2, temperature=0, return_memory=True)
    sessions.serialize_state("s", a, token_count=5, config=model.config)
    created = sessions.load_metadata("s")["created"]
    sessions.serialize_state("s", b, token_count=10, config=model.config)
    assert torch.equal(sessions.load_state("s")["code"][0]["M"], b["code"][0]["M"])
    assert sessions.load_metadata("s")["token_count"] == 10 and sessions.load_metadata("s")["created"] == created
    assert [p.name for p in tmp_path.iterdir()] == ["s"]  # no temp dirs left behind


@pytest.mark.parametrize("bad", ["..", ".", "../escape", "a/b", "/abs", "", "x" * 129, "a\n", ".hidden", "a b", "é"])
def test_bad_session_ids_are_refused(tmp_path, bad):
    sessions = SessionMemoryManager(tmp_path / "base")
    model = tiny_model()
    with pytest.raises(UserError, match="invalid session id"):
        sessions.serialize_state(bad, model.init_memory_states(1), config=model.config)
    with pytest.raises(UserError, match="invalid session id"):
        sessions.load_state(bad)
    assert not (tmp_path / "escape").exists() and not (tmp_path / "base").exists()


def test_missing_corrupt_and_mismatched_sessions_give_clear_errors(tmp_path):
    model = tiny_model()
    sessions = SessionMemoryManager(tmp_path)
    with pytest.raises(UserError, match="not found"):
        sessions.load_state("nobody")
    sessions.serialize_state("s", model.init_memory_states(1), token_count=0, config=model.config)

    other = tiny_model(expert_dim=32)
    with pytest.raises(UserError, match="different model"):
        sessions.load_state("s", config=other.config)

    state_file = tmp_path / "s" / "session.safetensors"  # state and metadata are one file
    whole = state_file.read_bytes()
    state_file.write_bytes(whole[:-40])  # truncated tensors
    with pytest.raises(UserError, match="corrupt"):
        sessions.load_state("s", config=model.config)

    state_file.write_bytes(whole[:40])  # truncated header
    with pytest.raises(UserError, match="corrupt"):
        sessions.load_state("s")

    sessions.delete_session("s")
    assert sessions.list_sessions() == []
    with pytest.raises(UserError, match="not found"):
        sessions.delete_session("s")


def test_shape_check_without_hash(tmp_path):
    """A session written with only a hash of None still cannot be loaded into a model it does not fit."""
    model = tiny_model()
    sessions = SessionMemoryManager(tmp_path)
    sessions.serialize_state("s", model.init_memory_states(1))
    meta = sessions.load_metadata("s")
    assert meta["config_hash"] is None
    with pytest.raises(UserError, match="does not fit|shapes"):
        sessions.load_state("s", config=tiny_model(num_layers=3).config)


@pytest.mark.parametrize("dtypes", [(torch.float32,), (torch.float64,), (torch.bfloat16, torch.float32)])
def test_a_saved_file_is_what_per_tensor_safetensors_writes(tmp_path, dtypes):
    """The save copies each dtype's tensors to the host at once (and fp16/32/64 through numpy): the
    file must stay byte for byte what safetensors.torch.save of the per-tensor copies writes."""
    from safetensors.torch import save

    from mm_rec.inference.sessions import HEADER_KEY, SESSION_NAME
    gen = torch.Generator().manual_seed(5)
    memory = {expert: [{"h": torch.randn(2, 16, generator=gen).to(dtypes[(i + j) % len(dtypes)]),
                        "M": torch.randn(2, 2, 8, 8, generator=gen).transpose(-1, -2)}  # not contiguous
                       for i in range(2)] for j, expert in enumerate(("text", "code"))}
    sessions = SessionMemoryManager(tmp_path)
    sessions.serialize_state("s", memory, token_count=3)
    written = (tmp_path / "s" / SESSION_NAME).read_bytes()
    header = json.dumps(sessions.load_metadata("s"))
    assert written == save(flatten_states(memory), metadata={HEADER_KEY: header})
    restored = flatten_states(sessions.load_state("s"))
    assert all(torch.equal(restored[k], t) and restored[k].dtype == t.dtype for k, t in flatten_states(memory).items())
