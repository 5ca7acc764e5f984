"""Sessions under concurrency and hostile files: no lost turn, no mixed state/metadata, no leaks,
every field checked; sessions of the earlier two-file layout still load."""
import json
import multiprocessing as mp
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save, save_file

from mm_rec.inference.sessions import HEADER_KEY, SESSION_NAME, SessionMemoryManager
from mm_rec.model import MMRec100M, MMRecConfig
from mm_rec.utils.errors import UserError

CONFIG = MMRecConfig(vocab_size=300, expert_dim=16, num_layers=2, num_heads=2, ffn_dim=32, init_std=0.1)
REPO = Path(__file__).resolve().parents[2]


def states_filled(value: float, batch: int = 1) -> dict:
    """Memory states whose every number is `value`: a reader can tell which write it sees."""
    d, H, Dh = CONFIG.expert_dim, CONFIG.num_heads, CONFIG.head_dim
    return {e: [{"h": torch.full((batch, d), value), "M": torch.full((batch, H, Dh, Dh), value)}
                for _ in range(CONFIG.num_layers)] for e in CONFIG.expert_names}


# -- concurrent writers ------------------------------------------------------------------------------


def _writer(base, rounds, seed, done):
    """Each turn: lock, load, add `step` tokens, save a state holding the new count."""
    sessions = SessionMemoryManager(base)
    rng = torch.Generator().manual_seed(seed)
    added = 0
    for _ in range(rounds):
        step = int(torch.randint(1, 10, (), generator=rng))
        with sessions.lock("bob"):
            count = sessions.load_metadata("bob")["token_count"] if sessions.exists("bob") else 0
            sessions.serialize_state("bob", states_filled(float(count + step)), token_count=count + step,
                                     config=CONFIG)
        added += step
    done.put(added)


def _reader(base, stop, report):
    sessions = SessionMemoryManager(base)
    reads = mixed = errors = 0
    while not stop.is_set():
        try:
            states, meta = sessions.load("bob", config=CONFIG, batch_size=1)
        except UserError as e:
            if "not found" not in str(e):
                errors += 1
            continue
        reads += 1
        values = {float(t.flatten()[0]) for layers in states.values() for layer in layers for t in layer.values()}
        mixed += values != {float(meta["token_count"])}
    report.put((reads, mixed, errors))


def test_two_writers_lose_no_turn_and_readers_never_see_a_mixed_pair(tmp_path):
    ctx = mp.get_context("fork")
    base, rounds = tmp_path / "sessions", 200
    done, report, stop = ctx.Queue(), ctx.Queue(), ctx.Event()
    readers = [ctx.Process(target=_reader, args=(base, stop, report)) for _ in range(2)]
    writers = [ctx.Process(target=_writer, args=(base, rounds, seed, done)) for seed in (1, 2)]
    for p in readers + writers:
        p.start()
    added = [done.get(timeout=300) for _ in writers]
    for p in writers:
        p.join(timeout=60)
    stop.set()
    results = [report.get(timeout=60) for _ in readers]
    for p in readers:
        p.join(timeout=60)
    assert all(p.exitcode == 0 for p in readers + writers)

    sessions = SessionMemoryManager(base)
    meta = sessions.load_metadata("bob")
    assert meta["token_count"] == sum(added)  # every turn of both writers counted
    assert meta["version"] == 2 * rounds
    reads = sum(r[0] for r in results)
    assert reads > 50 and sum(r[1] for r in results) == 0 and sum(r[2] for r in results) == 0, results
    assert sorted(p.name for p in base.rglob("*")) == ["bob", "lock", SESSION_NAME]  # no .old, no temporaries


def test_a_stale_writer_is_refused_and_succeeds_on_retry(tmp_path):
    sessions = SessionMemoryManager(tmp_path)
    sessions.serialize_state("s", states_filled(1.0), token_count=1)
    stale = tmp_path / "s" / f".{SESSION_NAME}.killed-mid-save.tmp"  # what a writer killed by -9 leaves
    stale.write_bytes(b"partial")
    _, meta = sessions.load("s")
    sessions.serialize_state("s", states_filled(2.0), token_count=2, expected_version=meta["version"])
    with pytest.raises(UserError, match="another writer.*retry"):
        sessions.serialize_state("s", states_filled(3.0), token_count=3, expected_version=meta["version"])
    assert sessions.load_metadata("s")["token_count"] == 2 and not stale.exists()  # the next writer removed it
    latest = sessions.load_metadata("s")["version"]
    sessions.serialize_state("s", states_filled(3.0), token_count=3, expected_version=latest)
    assert sessions.load_metadata("s")["token_count"] == 3


def test_lock_waits_for_the_holder_and_survives_a_delete(tmp_path):
    sessions = SessionMemoryManager(tmp_path)
    sessions.serialize_state("s", states_filled(1.0), token_count=1)
    with sessions.lock("s"):
        with pytest.raises(UserError, match="in use"):
            _other_process_try_lock(tmp_path)
        sessions.serialize_state("s", states_filled(2.0), token_count=2)  # re-entrant in the holder
    sessions.delete_session("s")
    assert sessions.list_sessions() == [] and not (tmp_path / "s").exists()
    sessions.serialize_state("s", states_filled(5.0), token_count=5)
    assert sessions.load_metadata("s")["version"] == 1


def _other_process_try_lock(base):
    code = ("import sys; from mm_rec.inference.sessions import SessionMemoryManager as S\n"
            f"with S({str(base)!r}).lock('s', wait=False): pass")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    if proc.returncode != 0 and "in use" in proc.stderr:
        raise UserError("in use")


def _checkpoint(tmp_path):
    from mm_rec.data.tokenizer import train_tokenizer
    from mm_rec.training.checkpoint import save_checkpoint
    torch.manual_seed(0)
    model = MMRec100M(config=CONFIG)
    tok = train_tokenizer(["The whale surfaced near the ship. Ahab watched, silent."] * 20, vocab_size=300)
    ckpt = tmp_path / "checkpoint_stage1_step_1.pt"
    save_checkpoint({"model_state_dict": model.state_dict(), "step": 1, "stage": "stage1",
                     "config": CONFIG.to_dict(), "tokenizer": tok.to_json()}, ckpt)
    return ckpt, tok


def test_two_concurrent_generate_turns_both_land(tmp_path):
    """generate --session holds the lock from load to save: two turns started together both count."""
    ckpt, tok = _checkpoint(tmp_path)
    prompts = ["The whale", " Ahab watched"]
    procs = [subprocess.Popen([sys.executable, "-m", "mm_rec.scripts.generate", "--checkpoint", str(ckpt),
                               "--prompt", p, "--device", "cpu", "--temperature", "0", "--max_new_tokens", "4",
                               "--no_stop", "--session", "bob", "--session_dir", str(tmp_path / "sessions")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)}) for p in prompts]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    meta = SessionMemoryManager(tmp_path / "sessions").load_metadata("bob")
    # one leading end-of-text token for the turn that started the session, then every turn's tokens
    assert meta["token_count"] == 1 + sum(len(tok.encode(p)) + 4 for p in prompts)
    assert meta["version"] == 2


# -- hostile files -----------------------------------------------------------------------------------


def _write_session(base, flat, metadata):
    folder = base / "bad"
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"format_version": 2, "session_id": "bad", "version": 1, "config_hash": CONFIG.arch_hash(),
            "token_count": 5, "experts": ["text", "code"], "batch_size": 1, **metadata}
    (folder / SESSION_NAME).write_bytes(save(flat, metadata={HEADER_KEY: json.dumps(meta)}))
    return folder / SESSION_NAME


def _flat(states):
    return {f"{e}.{i}.{k}": t for e, layers in states.items() for i, layer in enumerate(layers) for k, t in layer.items()}


def _bad_cases():
    good = _flat(states_filled(1.0))
    nan = dict(good, **{"code.1.M": torch.full_like(good["code.1.M"], float("nan"))})
    ints = dict(good, **{"text.0.h": good["text.0.h"].long()})
    shape = dict(good, **{"text.0.M": torch.zeros(1, 2, 8, 4)})
    foreign = dict(good, **{"text.0.x": torch.zeros(1)})
    return [
        ("token_count", good, {"token_count": "12"}, "field 'token_count' is '12'"),
        ("negative count", good, {"token_count": -1}, "field 'token_count'"),
        ("version", good, {"version": "x"}, "field 'version'"),
        ("experts", good, {"experts": "text"}, "field 'experts'"),
        ("batch 2", _flat(states_filled(1.0, batch=2)), {"batch_size": 2}, "holds 2 sequences, 1 expected"),
        ("batch field", good, {"batch_size": 3}, "field 'batch_size' is 3"),
        ("nan", nan, {}, "code.1.M holds NaN or inf"),
        ("dtype", ints, {}, "text.0.h has dtype int64"),
        ("shape", shape, {}, "layer text.0 has shapes"),
        ("foreign key", foreign, {}, "'text.0.x' is not a memory state"),
        ("layers", {k: v for k, v in good.items() if not k.startswith("code.1.")}, {}, "does not fit this model"),
        ("format", good, {"format_version": 99}, "not an MM-Rec session"),
    ]


@pytest.mark.parametrize("name,flat,metadata,words", _bad_cases(), ids=[c[0] for c in _bad_cases()])
def test_damaged_sessions_are_one_line_naming_file_and_field(tmp_path, name, flat, metadata, words):
    path = _write_session(tmp_path, flat, metadata)
    with pytest.raises(UserError) as info:
        SessionMemoryManager(tmp_path).load("bad", config=CONFIG, batch_size=1)
    message = str(info.value)
    assert words in message and "\n" not in message
    assert str(path) in message or name == "format"


@pytest.mark.parametrize("case", ["nan", "batch 2", "token_count"])
def test_generate_refuses_a_damaged_session_with_one_line(tmp_path, case):
    import contextlib
    import io
    from mm_rec.scripts import generate as generate_cli
    from mm_rec.utils.errors import run_cli
    ckpt, _ = _checkpoint(tmp_path)
    _, flat, metadata, words = next(c for c in _bad_cases() if c[0] == case)
    _write_session(tmp_path / "sessions", flat, metadata)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = run_cli(generate_cli.main, ["--checkpoint", str(ckpt), "--prompt", "The", "--device", "cpu",
                                           "--session", "bad", "--session_dir", str(tmp_path / "sessions")])
    assert code == 2 and err.getvalue().startswith("error: ") and err.getvalue().count("\n") == 1
    assert words in err.getvalue() and out.getvalue() == ""


def test_non_finite_state_is_not_saved(tmp_path):
    states = states_filled(1.0)
    states["text"][0]["h"][0, 3] = float("inf")
    with pytest.raises(UserError, match="not finite"):
        SessionMemoryManager(tmp_path).serialize_state("s", states)
    assert not (tmp_path / "s" / SESSION_NAME).exists()


def test_sessions_of_the_earlier_layout_still_load_and_migrate(tmp_path):
    folder = tmp_path / "old"
    folder.mkdir()
    states = states_filled(7.0)
    save_file(_flat(states), str(folder / "state.safetensors"), metadata={"session_id": "old"})
    (folder / "metadata.json").write_text(json.dumps({
        "format_version": 1, "session_id": "old", "config_hash": CONFIG.arch_hash(), "token_count": 7,
        "experts": ["text", "code"], "num_layers": {"text": 2, "code": 2}, "batch_size": 1, "dtype": "float32",
        "created": "2026-01-01T00:00:00+0000", "updated": "2026-01-01T00:00:00+0000"}))
    sessions = SessionMemoryManager(tmp_path)
    assert sessions.list_sessions() == ["old"] and sessions.exists("old")
    loaded, meta = sessions.load("old", config=CONFIG, batch_size=1)
    assert meta["token_count"] == 7 and meta["version"] == 0
    assert torch.equal(loaded["code"][1]["M"], states["code"][1]["M"])
    sessions.serialize_state("old", states_filled(9.0), token_count=9, config=CONFIG, expected_version=0)
    assert sorted(p.name for p in folder.iterdir()) == ["lock", SESSION_NAME]
    assert sessions.load_metadata("old")["created"] == "2026-01-01T00:00:00+0000"
