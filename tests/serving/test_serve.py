"""The OpenAI-compatible server (mm_rec.serving), started for real on 127.0.0.1 and talked to with the
official `openai` client and with httpx: greedy outputs equal `generate`, streaming equals
non-streaming, sessions continue exactly, concurrent clients get what sequential ones get, every
error status in OpenAI's error JSON, a client that leaves frees its row, and sessions survive a
kill -9 and restart."""
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from mm_rec.inference.generation import generate  # noqa: E402
from mm_rec.inference.loading import load_model  # noqa: E402
from mm_rec.scripts import serve as serve_cli  # noqa: E402
from mm_rec.utils.errors import run_cli  # noqa: E402

VOCAB = 300
ROOT = Path(__file__).resolve().parents[2]


def make_checkpoint(directory: Path) -> Path:
    from mm_rec.data.tokenizer import train_tokenizer
    from mm_rec.model import MMRec100M, MMRecConfig
    from mm_rec.training.checkpoint import save_checkpoint
    texts = ["The whale surfaced near the ship. Ahab watched, silent. def main(): return 0\n"] * 20
    tokenizer = train_tokenizer(texts, vocab_size=VOCAB)
    torch.manual_seed(0)
    config = MMRecConfig(vocab_size=VOCAB, expert_dim=16, num_layers=2, num_heads=2, ffn_dim=32, scan_chunk_size=8,
                         init_std=0.1, fusion_method="weighted")
    model = MMRec100M(config=config).eval()
    path = directory / "checkpoint_stage3_step_10.pt"
    save_checkpoint({"model_state_dict": model.state_dict(), "optimizer_state_dict": {}, "scheduler_state_dict": {},
                     "step": 10, "loss": 5.0, "stage": "stage3", "config": config.to_dict(),
                     "train_args": {"seq_len": 32}, "tokenizer": tokenizer.to_json()}, path)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerThread:
    """uvicorn in a thread of this process, on a free port of 127.0.0.1."""

    def __init__(self, checkpoint, session_dir, *flags):
        args = serve_cli.build_parser().parse_args(
            ["--checkpoint", str(checkpoint), "--session_dir", str(session_dir), "--device", "cpu",
             "--port", str(free_port()), *flags])
        serve_cli.check_args(args)
        self.app = serve_cli.build_app(args)
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=args.port, log_level="warning"))
        self.url = f"http://127.0.0.1:{args.port}"
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(30)

    @property
    def engine(self):
        return self.app.state.server.engine


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="module")
def reference(checkpoint):
    loaded = load_model(checkpoint, device="cpu")
    return loaded.model, loaded.tokenizer


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    # A small prefill chunk, so prompts are prefilled over several engine iterations.
    with ServerThread(checkpoint, tmp_path_factory.mktemp("sessions"), "--prefill_chunk", "8",
                      "--max_prompt_tokens", "200", "--max_tokens", "64") as s:
        yield s


def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)


def greedy_ids(reference, prompt_ids, n):
    model, _ = reference
    out = generate(model, torch.tensor([prompt_ids]), n, temperature=0, expert_type="fused")
    return out[0, len(prompt_ids):].tolist()


def prompt_ids(reference, text):
    _, tok = reference
    return [tok.eot_id] + tok.encode(text)


# -- the OpenAI API --------------------------------------------------------------------------------------

def test_models_and_health(server):
    models = client(server).models.list()
    assert [m.id for m in models.data] == ["mm-rec"]
    health = httpx.get(server.url + "/health", timeout=10).json()
    assert health["status"] == "ok" and health["device"] == "cpu" and health["decoding_rows"] == 0


def test_completion_equals_generate_streaming_or_not(server, reference):
    _, tok = reference
    c = client(server)
    text = "The whale surfaced"
    want = greedy_ids(reference, prompt_ids(reference, text), 20)
    # (a token the tiny model may pick as end-of-text would stop the stream; compare up to it)
    want = want[:want.index(tok.eot_id) + 1] if tok.eot_id in want else want
    out = c.completions.create(model="mm-rec", prompt=text, max_tokens=20, temperature=0,
                               extra_body={"return_token_ids": True})
    choice = out.choices[0]
    assert choice.model_extra["token_ids"] == want
    assert choice.text == tok.decode([t for t in want if t != tok.eot_id])
    assert choice.finish_reason == ("stop" if tok.eot_id in want else "length")
    assert out.usage.prompt_tokens == len(prompt_ids(reference, text)) and out.usage.completion_tokens == len(want)
    chunks = list(c.completions.create(model="mm-rec", prompt=text, max_tokens=20, temperature=0, stream=True))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == choice.text
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == choice.finish_reason
    assert chunks[-1].usage.completion_tokens == len(want) and chunks[-1].choices == []
    # Token-id prompts are taken as they are (no end-of-text added).
    ids = tok.encode("Ahab watched")
    out = c.completions.create(model="mm-rec", prompt=ids, max_tokens=6, temperature=0,
                               extra_body={"return_token_ids": True})
    got = out.choices[0].model_extra["token_ids"]
    assert got == greedy_ids(reference, ids, 6)[:len(got)]


def test_chat_completion_follows_the_documented_template(server, reference):
    _, tok = reference
    c = client(server)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who watched?"}]
    rendered = "System: Be brief.\n\nUser: Who watched?\n\nAssistant:"
    out = c.chat.completions.create(model="mm-rec", messages=messages, max_tokens=8, temperature=0)
    plain = c.completions.create(model="mm-rec", prompt=rendered, max_tokens=8, temperature=0)
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == plain.choices[0].text
    assert out.usage.prompt_tokens == plain.usage.prompt_tokens
    stream = list(c.chat.completions.create(model="mm-rec", messages=messages, max_tokens=8, temperature=0,
                                            stream=True))
    assert "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices) == plain.choices[0].text
    assert stream[-1].usage.total_tokens == out.usage.total_tokens


def test_seed_and_stop(server):
    c = client(server)
    draw = lambda seed: c.completions.create(model="mm-rec", prompt="The", max_tokens=12, temperature=1.0,
                                             top_p=0.95, seed=seed).choices[0].text
    assert draw(3) == draw(3)
    assert len({draw(s) for s in range(4)}) > 1
    full = c.completions.create(model="mm-rec", prompt="The whale", max_tokens=24, temperature=0).choices[0].text
    if len(full) > 4:
        stop = full[2:4]
        cut = c.completions.create(model="mm-rec", prompt="The whale", max_tokens=24, temperature=0, stop=[stop])
        assert cut.choices[0].text == full[:full.index(stop)] and cut.choices[0].finish_reason == "stop"


def test_prompts_are_not_logged_unless_asked(server, caplog):
    caplog.set_level("DEBUG")
    out = client(server).completions.create(model="mm-rec", prompt="Ahab whispered the secret", max_tokens=3,
                                            temperature=0)
    assert out.usage.completion_tokens == 3
    assert "prompt_tokens=" in caplog.text  # the request is logged ...
    assert "secret" not in caplog.text     # ... without its text


# -- sessions ----------------------------------------------------------------------------------------------

def test_session_turns_equal_one_long_request(server, reference):
    _, tok = reference
    turns = [prompt_ids(reference, "The whale"), tok.encode(" Ahab"), tok.encode(" watched the ship")]
    history, got = [], []
    with httpx.Client(base_url=server.url, timeout=60) as http:
        for i, turn in enumerate(turns):
            body = {"model": "mm-rec", "prompt": turn, "max_tokens": 5, "temperature": 0, "return_token_ids": True}
            # the id as a field on one turn, as the header on another
            r = (http.post("/v1/completions", json={**body, "session_id": "chat-1"}) if i != 1 else
                 http.post("/v1/completions", json=body, headers={"X-Session-Id": "chat-1"}))
            assert r.status_code == 200, r.text
            assert r.headers["x-session-id"] == "chat-1"
            new = r.json()["choices"][0]["token_ids"]
            history += turn
            # the same continuation as one request over everything so far, read from scratch
            one = http.post("/v1/completions", json={**body, "prompt": history}).json()["choices"][0]["token_ids"]
            assert new == one
            assert new == greedy_ids(reference, history, 5)[:len(new)]
            history += new
            got.append(new)
        info = http.get("/v1/sessions/chat-1").json()
        assert info["token_count"] == len(history) and info["experts"] == ["text", "code"] and info["hot"]
        assert http.delete("/v1/sessions/chat-1").json()["deleted"] is True
        assert http.get("/v1/sessions/chat-1").status_code == 404


def test_chat_session_reads_only_the_new_messages(server, reference):
    _, tok = reference
    c = client(server)
    ask = lambda text: c.chat.completions.create(
        model="mm-rec", messages=[{"role": "user", "content": text}], max_tokens=4, temperature=0,
        extra_body={"return_token_ids": True}, extra_headers={"X-Session-Id": "chat-2"})
    first, second = ask("Who watched?"), ask("And then?")
    turn1 = [tok.eot_id] + tok.encode("User: Who watched?\n\nAssistant:")
    turn2 = tok.encode("\n\nUser: And then?\n\nAssistant:")
    assert second.usage.prompt_tokens == len(turn2)
    history = turn1 + first.choices[0].model_extra["token_ids"] + turn2
    got = second.choices[0].model_extra["token_ids"]
    assert got == greedy_ids(reference, history, 4)[:len(got)]


def test_sessions_keep_the_experts_a_turn_did_not_run_and_survive_eviction(checkpoint, tmp_path, reference):
    """A session's turns with different experts: an expert that did not run keeps its state (as
    generate's memory does). With one hot state, every other turn is read back from disk."""
    model, tok = reference
    turns = [("text", prompt_ids(reference, "The whale")), ("code", tok.encode(" def main")),
             ("text", tok.encode(" Ahab")), ("fused", tok.encode(" watched"))]
    with ServerThread(checkpoint, tmp_path, "--max_hot_sessions", "1") as s, \
            httpx.Client(base_url=s.url, timeout=60) as http:
        memory = None
        for expert, ids in turns:
            for sid in ("mixed", "other"):  # "other" pushes "mixed" out of the device LRU
                r = http.post("/v1/completions", json={"model": "mm-rec", "prompt": ids, "max_tokens": 3,
                                                       "temperature": 0, "expert": expert, "session_id": sid,
                                                       "return_token_ids": True, "ignore_eos": True})
                if sid == "mixed":
                    got = r.json()["choices"][0]["token_ids"]
            assert http.get("/v1/sessions/mixed").json()["hot"] is False
            out, memory = generate(model, torch.tensor([ids]), 3, temperature=0, expert_type=expert,
                                   memory_states=memory, return_memory=True)
            assert got == out[0, len(ids):].tolist()
        assert http.get("/v1/sessions/mixed").json()["experts"] == ["text", "code"]


def test_two_requests_on_one_session_are_served_in_turn(server, reference):
    _, tok = reference
    body = {"model": "mm-rec", "temperature": 0, "return_token_ids": True, "session_id": "pair"}

    async def run():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:
            first = {**body, "prompt": prompt_ids(reference, "The"), "max_tokens": 30, "stream": True}
            async with http.stream("POST", "/v1/completions", json=first) as stream:
                lines = stream.aiter_lines()
                await anext(lines)  # the first turn is under way, holding the session
                second = asyncio.ensure_future(http.post("/v1/completions", json={
                    **body, "prompt": tok.encode(" whale"), "max_tokens": 4}))
                chunks = [json.loads(line[6:]) async for line in lines if line.startswith("data: {")]
            return chunks, (await second).json()

    chunks, b = asyncio.run(run())
    turn1 = next(c["choices"][0]["token_ids"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"])
    history = prompt_ids(reference, "The") + turn1 + tok.encode(" whale")
    got = b["choices"][0]["token_ids"]
    assert got == greedy_ids(reference, history, 4)[:len(got)]
    assert b["usage"]["prompt_tokens"] == len(tok.encode(" whale"))


# -- continuous batching ---------------------------------------------------------------------------------------

def test_sixteen_concurrent_clients_get_the_sequential_outputs(server, reference):
    _, tok = reference
    words = "The whale surfaced near the ship Ahab watched silent def main return".split()
    prompts = [" ".join(words[: 1 + (i * 7) % len(words)]) * (1 + i % 3) for i in range(16)]
    # greedy, and sampled with a seed each (a row's own generator: the same draws in any batch)
    body = lambda p, i: {"model": "mm-rec", "prompt": p, "max_tokens": 6 + i % 5, "return_token_ids": True,
                         "expert": ["fused", "text", "code"][i % 3],
                         **({"temperature": 0} if i % 2 else {"temperature": 0.9, "top_k": 50, "seed": i})}
    with httpx.Client(base_url=server.url, timeout=60) as http:
        sequential = [http.post("/v1/completions", json=body(p, i)).json()["choices"][0]["token_ids"]
                      for i, p in enumerate(prompts)]
    steps_before = server.engine.steps

    async def run():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:
            rs = await asyncio.gather(*[http.post("/v1/completions", json=body(p, i)) for i, p in enumerate(prompts)])
            return [r.json()["choices"][0]["token_ids"] for r in rs]

    assert asyncio.run(run()) == sequential
    # They were batched: far fewer steps than one request after the other would take.
    assert server.engine.steps - steps_before < sum(len(s) + 1 for s in sequential)


def test_batching_through_the_decode_graph_buffers(checkpoint, tmp_path, reference):
    """The engine on DecodeStep's graphed path (emulated on the CPU: the same static buffers, bucket
    padding and loads as CUDA graph replays): rows joining and leaving give every request the
    tokens it gets alone."""
    from mm_rec.inference.decode import DecodeStep
    _, tok = reference
    prompts = [prompt_ids(reference, "The whale " * (1 + i % 4))[: 3 + 5 * i] for i in range(10)]
    with ServerThread(checkpoint, tmp_path, "--prefill_chunk", "8") as s:
        s.engine.step = DecodeStep(s.engine.model, emulate=True)

        async def run():
            async with httpx.AsyncClient(base_url=s.url, timeout=60) as http:
                return await asyncio.gather(*[http.post("/v1/completions", json={
                    "model": "mm-rec", "prompt": p, "max_tokens": 4 + i, "temperature": 0, "ignore_eos": True,
                    "return_token_ids": True}) for i, p in enumerate(prompts)])

        outs = [r.json()["choices"][0]["token_ids"] for r in asyncio.run(run())]
        assert s.engine.step.graphs
    for i, (p, out) in enumerate(zip(prompts, outs)):
        assert out == greedy_ids(reference, p, 4 + i)


def test_sessions_ending_together_keep_their_own_exact_states(checkpoint, tmp_path, reference):
    """Rows finishing in the same step (graphed path, emulated) have their states copied out of the
    static buffers (which later steps overwrite) at once: no saved state shares their memory, and
    each session's hot state equals its file and holds only its own memory (not its whole batch's)."""
    from mm_rec.inference.decode import DecodeStep
    prompts = [prompt_ids(reference, "The whale " * (1 + i % 3))[: 2 + 3 * i] for i in range(8)]
    with ServerThread(checkpoint, tmp_path, "--prefill_chunk", "8") as s:
        s.engine.step = DecodeStep(s.engine.model, emulate=True)
        store = s.app.state.server.store
        aliased, save = [], store.save

        async def recording_save(session_id, state, token_count):  # (the buffers live as long as the graphs)
            static = {t.untyped_storage().data_ptr() for g in list(s.engine.step.graphs.values())
                      for t in g.state.tensors()}
            aliased.append(any(t.untyped_storage().data_ptr() in static for t in state.tensors()))
            await save(session_id, state, token_count)
        store.save = recording_save

        async def run():
            async with httpx.AsyncClient(base_url=s.url, timeout=60) as http:
                return await asyncio.gather(*[http.post("/v1/completions", json={
                    "model": "mm-rec", "prompt": p, "max_tokens": i % 3, "temperature": 0, "ignore_eos": True,
                    "session_id": f"s{i}"}) for i, p in enumerate(prompts)])

        assert all(r.status_code == 200 for r in asyncio.run(run()))
        assert s.engine.step.graphs and len(aliased) == len(prompts) and not any(aliased)
        for i in range(len(prompts)):
            hot, _ = store.hot[f"s{i}"]
            disk, _ = store._load_from_disk(f"s{i}")
            assert hot.equal(disk)
            buffers = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in hot.tensors()}
            assert sum(buffers.values()) == hot.nbytes


def test_incremental_detokenizers_give_the_tokenizers_decode():
    """Both incremental decoders (the byte table and the window fallback) end with exactly
    tokenizer.decode of the tokens, however characters are split over tokens (random ids)."""
    import random
    from mm_rec.data.tokenizer import train_tokenizer
    from mm_rec.serving.engine import ByteDetokenizer, IncrementalDetokenizer
    tok = train_tokenizer(["The whale surfaced. Çok güzel, naïve café. 日本語のテキスト"] * 20, vocab_size=400)
    table = ByteDetokenizer.table_for(tok)
    assert table is not None
    rng = random.Random(0)
    for _ in range(300):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 30))]
        for detok in (ByteDetokenizer(table), IncrementalDetokenizer(tok)):
            pieces = [detok.add(i) for i in ids]
            assert "".join(pieces) + detok.flush() == tok.decode(ids)
            assert not any(p.endswith("\ufffd") and isinstance(detok, IncrementalDetokenizer) for p in pieces)


def test_long_prompts_are_prefilled_in_chunks_between_decode_steps(reference):
    """The engine's loop, run by hand: a long prompt advances one chunk per iteration while a short
    one decodes a token per iteration, and both end with generate's tokens."""
    from mm_rec.serving.engine import Engine, Request, SamplingParams
    model, tok = reference
    engine = Engine(model, tok, prefill_chunk=8)
    loop = asyncio.new_event_loop()
    try:
        short = Request([tok.eot_id] + tok.encode("The whale"), "fused", SamplingParams(max_tokens=10, temperature=0,
                                                                                         ignore_eos=True), loop)
        long_ids = (prompt_ids(reference, "Ahab watched the ship, silent. " * 8))[:60]
        long = Request(long_ids, "fused", SamplingParams(max_tokens=3, temperature=0, ignore_eos=True), loop)
        engine._start(short)
        engine._start(long)
        progress = []
        with torch.inference_mode():
            for _ in range(12):
                engine._prefill_some()
                for expert in list(engine.rows):
                    engine._decode(expert)
                progress.append((long.consumed, len(short.generated)))
    finally:
        loop.close()
    # The short prompt (fewer tokens than a chunk) is read in the first iteration; the long one 8 tokens
    # an iteration (its first chunk shares no length with the other, so it waits one iteration).
    assert progress[:4] == [(0, 1), (8, 2), (16, 3), (24, 4)]
    assert short.generated == greedy_ids(reference, short.prompt_ids, 10)
    assert long.generated == greedy_ids(reference, long_ids, 3)


def test_a_client_that_disconnects_frees_its_row(server):
    with httpx.Client(base_url=server.url, timeout=60) as http:
        body = {"model": "mm-rec", "prompt": "The", "max_tokens": 64, "temperature": 1.0, "stream": True,
                "session_id": "gone"}
        with http.stream("POST", "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            next(lines)
            assert server.engine.active_rows + len(server.engine.prefilling) == 1
            steps = server.engine.steps
        deadline = time.monotonic() + 20
        while http.get("/health").json()["in_flight"] or server.engine.active_rows:
            assert time.monotonic() < deadline, "the row was not freed"
            time.sleep(0.01)
        # Freed long before its 64 tokens; the unfinished turn is not saved.
        assert server.engine.steps - steps < 40
        assert http.get("/v1/sessions/gone").status_code == 404


def test_a_client_that_disconnects_from_a_plain_request_frees_its_row(checkpoint, tmp_path):
    with ServerThread(checkpoint, tmp_path) as s:
        step = s.engine.step
        s.engine.step = lambda *args: (time.sleep(0.02), step(*args))[1]  # 200 tokens take 4 s
        body = {"model": "mm-rec", "prompt": "The", "max_tokens": 200, "ignore_eos": True, "session_id": "gone"}
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(s.url + "/v1/completions", json=body, timeout=0.5)
        deadline = time.monotonic() + 20
        while s.app.state.server.in_flight or s.engine.active_rows:
            assert time.monotonic() < deadline, "the row was not freed"
            time.sleep(0.01)
        assert s.engine.steps < 100 and httpx.get(s.url + "/v1/sessions/gone").status_code == 404


# -- errors --------------------------------------------------------------------------------------------------

def _error(r, status):
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body["error"]) == {"message", "type", "param", "code"} and body["error"]["message"]
    return body["error"]


def test_every_error_status_in_openai_json(server):
    ok = {"model": "mm-rec", "prompt": "The", "max_tokens": 2}
    with httpx.Client(base_url=server.url, timeout=60) as http:
        post = lambda **kw: http.post("/v1/completions", json={**ok, **kw})
        assert _error(post(temperature=-1), 400)["param"] == "temperature"
        r = http.post("/v1/completions", content=json.dumps({**ok, "temperature": float("nan")}),
                      headers={"content-type": "application/json"})
        assert _error(r, 400)["param"] == "temperature"
        assert _error(post(top_p=1.5), 400)["param"] == "top_p"
        assert _error(post(max_tokens=65), 400)["param"] == "max_tokens"
        assert _error(post(session_id="../../etc"), 400)["param"] == "session_id"
        assert _error(http.get("/v1/sessions/..%2Fx"), 404)  # "../x": no such route, never a path
        assert _error(http.get("/v1/sessions/.."), 404)      # normalised away by the client
        assert _error(http.delete("/v1/sessions/.hidden"), 400)["code"] == "invalid_session_id"
        assert _error(http.get("/v1/sessions/" + "a" * 200), 400)["code"] == "invalid_session_id"
        assert _error(post(prompt=[VOCAB + 5]), 400)["param"] == "prompt"
        assert _error(post(model="gpt-4"), 404)["code"] == "model_not_found"
        assert _error(http.get("/v1/sessions/nobody"), 404)["code"] == "session_not_found"
        assert _error(http.delete("/v1/sessions/nobody"), 404)["code"] == "session_not_found"
        assert _error(post(prompt="whale " * 300), 413)["code"] == "prompt_too_long"
        assert _error(http.post("/v1/completions", json={"model": "mm-rec"}), 422)["param"] == "prompt"
        assert _error(post(max_tokens="many"), 422)["param"] == "max_tokens"
        assert _error(post(expert="both"), 422)["param"] == "expert"
        assert _error(http.get("/v1/nothing"), 404)
    # The openai client raises its typed errors on them.
    with pytest.raises(openai.BadRequestError):
        client(server).completions.create(model="mm-rec", prompt="x", temperature=-2)
    with pytest.raises(openai.NotFoundError):
        client(server).completions.create(model="nope", prompt="x")


def test_429_over_the_concurrency_limit_and_503_when_shutting_down(checkpoint, tmp_path):
    with ServerThread(checkpoint, tmp_path, "--max_concurrent", "1") as s, \
            httpx.Client(base_url=s.url, timeout=60) as http:
        with http.stream("POST", "/v1/completions", json={"model": "mm-rec", "prompt": "The", "max_tokens": 64,
                                                          "stream": True}) as held:
            lines = held.iter_lines()
            next(lines)  # (kept referenced: a dropped iterator closes the response)
            assert _error(http.post("/v1/completions", json={"model": "mm-rec", "prompt": "x"}), 429)["type"] \
                == "rate_limit_error"
            with pytest.raises(openai.RateLimitError):
                openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0).completions.create(
                    model="mm-rec", prompt="x")
        s.engine.stop()
        assert _error(http.post("/v1/completions", json={"model": "mm-rec", "prompt": "x"}), 503)["code"] \
            == "engine_unavailable"
        assert http.get("/health").status_code == 503


def test_a_full_disk_fails_the_turn_in_openai_json_and_keeps_serving(checkpoint, tmp_path):
    full = tmp_path / "full"
    full.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(full)], capture_output=True).returncode:
        pytest.skip("mounting a tmpfs needs root")
    try:
        with ServerThread(checkpoint, full) as s, httpx.Client(base_url=s.url, timeout=60) as http:
            with open(full / "filler", "wb") as f:  # fill the disk after the server's start-up check
                with pytest.raises(OSError):
                    for _ in range(64):
                        f.write(b"\0" * 65536)
                        f.flush()
            body = {"model": "mm-rec", "prompt": "The", "max_tokens": 3, "session_id": "s"}
            error = _error(http.post("/v1/completions", json=body), 500)
            assert error["code"] == "session_not_saved" and "as it was" in error["message"]
            assert http.get("/v1/sessions/s").status_code == 404
            assert [p.name for p in full.iterdir()] == ["filler"]  # no half-written session left behind
            assert http.post("/v1/completions", json={**body, "session_id": None}).status_code == 200
    finally:
        subprocess.run(["umount", str(full)], capture_output=True)


def test_an_engine_fault_fails_the_requests_with_503_and_shows_in_health(checkpoint, tmp_path):
    with ServerThread(checkpoint, tmp_path) as s, httpx.Client(base_url=s.url, timeout=60) as http:
        def broken(*args):
            raise RuntimeError("device fault")
        s.engine.step = broken
        error = _error(http.post("/v1/completions", json={"model": "mm-rec", "prompt": "The"}), 503)
        assert "engine failed" in error["message"]
        health = http.get("/health")
        assert health.status_code == 503 and health.json()["status"] == "failed"
        assert _error(http.post("/v1/completions", json={"model": "mm-rec", "prompt": "x"}), 503)["code"] \
            == "engine_unavailable"


# -- restart -----------------------------------------------------------------------------------------------------

def _start_process(checkpoint, session_dir, port):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "mm_rec.scripts.serve", "--checkpoint", str(checkpoint),
                             "--session_dir", str(session_dir), "--device", "cpu", "--port", str(port),
                             "--log_level", "warning"], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "server did not start"
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.1)


def test_a_kill_9_and_restart_keeps_finished_sessions(checkpoint, tmp_path, reference):
    _, tok = reference
    port = free_port()
    body = {"model": "mm-rec", "max_tokens": 5, "temperature": 0, "return_token_ids": True, "session_id": "s1"}
    first = prompt_ids(reference, "The whale")
    proc = _start_process(checkpoint, tmp_path, port)
    try:
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json={**body, "prompt": first}, timeout=60)
        turn1 = r.json()["choices"][0]["token_ids"]
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    proc = _start_process(checkpoint, tmp_path, port)
    try:
        second = tok.encode(" Ahab")
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json={**body, "prompt": second}, timeout=60)
        turn2 = r.json()["choices"][0]["token_ids"]
        info = httpx.get(f"http://127.0.0.1:{port}/v1/sessions/s1", timeout=10).json()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    history = first + turn1 + second
    assert turn2 == greedy_ids(reference, history, 5)[:len(turn2)]
    assert info["token_count"] == len(history) + len(turn2)


def test_cli_errors_are_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default --session_dir ./sessions
    assert run_cli(serve_cli.main, ["--checkpoint", str(tmp_path / "nope.pt")]) == 2
    assert capsys.readouterr().err.startswith("error: checkpoint not found")
    assert not (tmp_path / "sessions").exists()  # a mistyped checkpoint leaves nothing behind
    assert run_cli(serve_cli.main, ["--checkpoint", "x", "--max_tokens", "0"]) == 2
    assert "--max_tokens" in capsys.readouterr().err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert run_cli(serve_cli.main, ["--checkpoint", "x", "--port", str(port)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: cannot listen on 127.0.0.1:{port}") and err.count("\n") == 1


def test_bench_serve_smoke(tmp_path):
    out = tmp_path / "serve.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_serve.py"), "--smoke", "--json", str(out)],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert [r["streams"] for r in result["streams"]] == [1, 4]
    for r in result["streams"]:  # every stream got its tokens (ignore_eos: exactly max_tokens each)
        assert r["completion_tokens"] == r["streams"] * 8 and r["tokens_per_s"] > 0
        assert 0 < r["ttft_p50_ms"] <= r["ttft_p99_ms"] and 0 < r["itl_p50_ms"] <= r["itl_p99_ms"]
    assert result["idle_sessions"]["sessions"] == 20 and result["idle_sessions"]["hot_sessions"] == 20
    assert result["idle_sessions"]["disk_bytes"] > 0
    assert [r["context"] for r in result["contexts"]] == [64, 512]
    assert all(r["completion_tokens"] == 8 for r in result["contexts"])
    assert "streams" in proc.stdout and "idle sessions" in proc.stdout
