"""Data pipeline: tokenizer round trips, prepare_data outputs, loaders, bad input, default corpus."""
from __future__ import annotations

import gzip
import json
import lzma
import shutil
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

from mm_rec.data import corpus as corpus_mod
from mm_rec.data.corpus import bundled_prose_paths, default_corpus_dir, ensure_default_corpus
from mm_rec.data.loader import TokenData, domains_for_rows
from mm_rec.data.prepare import DOMAINS, SPLITS, OUTPUT_FILES, bin_name, prepare_data, token_dtype
from mm_rec.data.sources import Source, iter_documents, split_paragraph_documents
from mm_rec.data.tokenizer import EOT_TOKEN, Tokenizer, check_vocab, train_tokenizer
from mm_rec.utils.errors import UserError

VOCAB = 500
GPT2_DIR = Path("/work/shared/data/gpt2")
STDLIB = Path(sysconfig.get_paths()["stdlib"])

ROUND_TRIP_SAMPLES = [
    "Call me Ishmael. Some years ago—never mind how long precisely—having little money…",
    "Naïve café, “smart quotes”, Œuvre, Straße, 日本語のテキスト, emoji 🐳🐋, Ελληνικά, עברית.",
    "def f(x):\n\tif x:\n\t\treturn [i for i in range(x)]  # tab-indented\n    \n        pass\n",
    "class A:\n    def m(self):\n        s = 'héllo\\tworld'\r\n        return s   \n\n\n",
    "  leading spaces, trailing spaces   \n\t\t\n",
    "literal <|endoftext|> inside a document stays text",
    "",
    "\x00\x01 control chars \x7f and a lone combining mark \u0301",
]


# --- fixtures --------------------------------------------------------------------------------
def _bundled_prefix(name: str, n_bytes: int) -> str:
    with lzma.open(bundled_prose_paths()[corpus_mod.BUNDLED_PROSE.index(name)], "rb") as f:
        data = f.read(n_bytes)
    return data[: data.rfind(b"\n") + 1].decode("utf-8")


@pytest.fixture(scope="module")
def corpus_dirs(tmp_path_factory):
    """A small prose directory and a small code directory."""
    root = tmp_path_factory.mktemp("corpus")
    text = root / "text"
    text.mkdir()
    (text / "moby.txt").write_text(_bundled_prefix("moby_dick.txt.xz", 120_000), encoding="utf-8")
    (text / "kjv.txt.xz").write_bytes(lzma.compress(_bundled_prefix("kjv.txt.xz", 60_000).encode()))
    (text / "notes.md").write_text("# Notes\n\nA short markdown note.\n\nWith two paragraphs.\n", encoding="utf-8")
    (text / "image.png").write_bytes(b"\x89PNG not text")  # other extension: ignored, not read
    code = root / "code"
    shutil.copytree(STDLIB / "json", code / "json", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("textwrap.py", "bisect.py", "heapq.py", "fnmatch.py"):
        shutil.copy(STDLIB / name, code / name)
    return text, code


@pytest.fixture(scope="module")
def prepared(corpus_dirs, tmp_path_factory):
    text, code = corpus_dirs
    out = tmp_path_factory.mktemp("prepared") / "data"
    meta = prepare_data([text], [code], out, vocab_size=VOCAB, val_fraction=0.1, verbose=False,
                        txt_doc_chars=4000)
    return out, meta


@pytest.fixture(scope="module")
def tokenizer(prepared):
    return Tokenizer.load(prepared[0])


def write_synthetic(path: Path, lengths: dict, vocab_size: int = 1000, offsets=None) -> Path:
    """A prepared directory written by hand: token i of (domain, split) is (offset + i) % vocab."""
    path.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(vocab_size)
    outputs = {}
    for d in DOMAINS:
        for s in SPLITS:
            n = lengths.get((d, s), 0)
            off = (offsets or {}).get(d, 0)
            ((off + np.arange(n)) % vocab_size).astype(dtype).tofile(path / bin_name(d, s))
            outputs[bin_name(d, s)] = n
    meta = {"format": "mm_rec.prepared_data", "version": 1, "vocab_size": vocab_size, "dtype": dtype.name,
            "eot_id": 0, "outputs": outputs}
    (path / "meta.json").write_text(json.dumps(meta))
    return path


# --- tokenizer -------------------------------------------------------------------------------
@pytest.mark.parametrize("s", ROUND_TRIP_SAMPLES)
def test_trained_tokenizer_round_trips_exactly(tokenizer, s):
    ids = tokenizer.encode(s)
    assert tokenizer.decode(ids) == s
    assert all(0 <= i < tokenizer.vocab_size for i in ids)


def test_literal_end_of_text_in_a_document_is_not_the_eot_token(tokenizer):
    assert tokenizer.eot_id not in tokenizer.encode(f"a {EOT_TOKEN} b")
    assert tokenizer.decode([tokenizer.eot_id]) == EOT_TOKEN


def test_encode_batch_equals_encode(tokenizer):
    assert tokenizer.encode_batch(ROUND_TRIP_SAMPLES) == [tokenizer.encode(s) for s in ROUND_TRIP_SAMPLES]


def test_train_tokenizer_is_deterministic_and_sized():
    texts = [_bundled_prefix("moby_dick.txt.xz", 40_000), (STDLIB / "textwrap.py").read_text()]
    a, b = train_tokenizer(texts, 400), train_tokenizer(texts, 400)
    assert a.sha256 == b.sha256 and a.to_json() == b.to_json()
    assert a.vocab_size == 400 and a.eot_id == 0
    with pytest.raises(UserError, match="too small"):
        train_tokenizer(texts, 100)


def test_tokenizer_save_load_keeps_ids_and_hash(tokenizer, tmp_path):
    path = tokenizer.save(tmp_path / "tok.json")
    again = Tokenizer.load(path)
    assert again.sha256 == tokenizer.sha256
    assert again.encode(ROUND_TRIP_SAMPLES[2]) == tokenizer.encode(ROUND_TRIP_SAMPLES[2])
    tokenizer.save(tmp_path)  # a directory: written as tokenizer.json
    assert Tokenizer.load(tmp_path).sha256 == tokenizer.sha256


@pytest.mark.skipif(not GPT2_DIR.is_dir(), reason="GPT-2 vocabulary files not present")
def test_gpt2_files_load_under_both_names(tmp_path):
    hf_names = tmp_path / "hf"
    hf_names.mkdir()
    shutil.copy(GPT2_DIR / "encoder.json", hf_names / "vocab.json")
    shutil.copy(GPT2_DIR / "vocab.bpe", hf_names / "merges.txt")
    for tok in (Tokenizer.load(GPT2_DIR), Tokenizer.load(hf_names), Tokenizer.load(GPT2_DIR / "encoder.json"),
                Tokenizer.load((hf_names / "vocab.json", hf_names / "merges.txt"))):
        assert tok.vocab_size == 50257 and tok.eot_id == 50256
        assert tok.encode("Hello world") == [15496, 995]  # GPT-2's published ids
        for s in ROUND_TRIP_SAMPLES:
            assert tok.decode(tok.encode(s)) == s
    # preparing with GPT-2's vocabulary: uint16 ids, and a model with a smaller vocabulary is refused
    (tmp_path / "a.txt").write_text(ROUND_TRIP_SAMPLES[1] + "\n\n" + ROUND_TRIP_SAMPLES[0])
    meta = prepare_data([tmp_path / "a.txt"], [], tmp_path / "out", tokenizer_path=GPT2_DIR, verbose=False)
    assert meta["vocab_size"] == 50257 and meta["dtype"] == "uint16" and meta["eot_id"] == 50256
    assert Tokenizer.load(tmp_path / "out").sha256 == Tokenizer.load(GPT2_DIR).sha256
    TokenData(tmp_path / "out", vocab_size=50304).validate_ids()
    with pytest.raises(UserError, match="has 50257 tokens but the model's vocab_size is 32000"):
        TokenData(tmp_path / "out", vocab_size=32000)


def test_tokenizer_load_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        Tokenizer.load(tmp_path / "nope.json")
    with pytest.raises(UserError, match="has no tokenizer.json"):
        Tokenizer.load(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(UserError, match="not a valid tokenizer.json"):
        Tokenizer.load(tmp_path / "tokenizer.json")


def test_check_vocab(tokenizer):
    check_vocab(tokenizer, VOCAB)        # equal: fine
    check_vocab(tokenizer, VOCAB + 100)  # model larger: unused rows, fine
    with pytest.raises(UserError, match=f"{VOCAB} tokens but the model's vocab_size is 400"):
        check_vocab(tokenizer, 400)


def test_token_dtype():
    assert token_dtype(32000) == np.uint16 and token_dtype(65535) == np.uint16
    assert token_dtype(65536) == np.uint32 and token_dtype(100_000) == np.uint32


# --- prepare_data ----------------------------------------------------------------------------
def test_prepare_outputs_and_meta_counts_match_files(prepared):
    out, meta = prepared
    assert sorted(p.name for p in out.iterdir()) == sorted(OUTPUT_FILES)
    assert json.loads((out / "meta.json").read_text()) == meta
    assert meta["vocab_size"] == VOCAB and meta["dtype"] == "uint16" and meta["eot_id"] == 0
    assert meta["tokenizer"]["sha256"] == Tokenizer.load(out).sha256
    for d in DOMAINS:
        for s in SPLITS:
            arr = np.fromfile(out / bin_name(d, s), dtype=np.uint16)
            assert len(arr) == meta["tokens"][d][s] == meta["outputs"][bin_name(d, s)] > 0
            assert int(arr[-1]) == meta["eot_id"]                       # every document ends with EOT
            assert int((arr == meta["eot_id"]).sum()) == meta["documents"][d][s]
            assert sum(f["tokens"][s] for f in meta["files"] if f["domain"] == d) == len(arr)
            assert sum(f["documents"][s] for f in meta["files"] if f["domain"] == d) == meta["documents"][d][s]
    # the .png is ignored, the .md and the compressed .txt.xz are read
    text_files = {Path(f["path"]).name for f in meta["files"] if f["domain"] == "text"}
    assert text_files == {"moby.txt", "kjv.txt.xz", "notes.md"}
    assert meta["sources"][0]["ignored_files"] == 1
    # json/__init__.py etc. are read; nothing in the code directory is empty
    assert meta["skips"]["count"] == 0


def _decoded_documents(path: Path, tokenizer: Tokenizer) -> list[str]:
    arr = np.fromfile(path, dtype=np.uint16)
    cuts = np.flatnonzero(arr == tokenizer.eot_id)
    starts = np.concatenate([[0], cuts[:-1] + 1])
    return [tokenizer.decode(arr[a:b].tolist()) for a, b in zip(starts, cuts)]


def test_memmaps_decode_to_exactly_the_source_documents(prepared, corpus_dirs, tokenizer):
    out, _ = prepared
    for domain, src in zip(DOMAINS, corpus_dirs):
        expected = sorted(doc for _, doc in iter_documents(Source(src), domain, txt_doc_chars=4000))
        train = _decoded_documents(out / bin_name(domain, "train"), tokenizer)
        val = _decoded_documents(out / bin_name(domain, "val"), tokenizer)
        assert sorted(train + val) == expected
        assert not set(train) & set(val)  # a document goes whole to one split


def test_validation_split_is_by_document_and_near_the_fraction(prepared):
    _, meta = prepared
    for d in DOMAINS:
        assert meta["documents"][d]["val"] >= 1 and meta["documents"][d]["train"] >= 1
        share = meta["bytes"][d]["val"] / (meta["bytes"][d]["val"] + meta["bytes"][d]["train"])
        assert 0 < share <= 0.15


def test_prepare_is_byte_identical_when_run_twice(corpus_dirs, prepared, tmp_path):
    text, code = corpus_dirs
    out2 = tmp_path / "again"
    prepare_data([text], [code], out2, vocab_size=VOCAB, val_fraction=0.1, verbose=False, txt_doc_chars=4000)
    for name in OUTPUT_FILES:
        assert (out2 / name).read_bytes() == (prepared[0] / name).read_bytes(), name
    # a different split seed changes which documents are held out, and nothing else about the format
    out3 = tmp_path / "seed1"
    meta3 = prepare_data([text], [code], out3, tokenizer_path=prepared[0], val_fraction=0.1, seed=1,
                         verbose=False, txt_doc_chars=4000)
    assert (out3 / "text_val.bin").read_bytes() != (prepared[0] / "text_val.bin").read_bytes()
    assert meta3["tokenizer"]["sha256"] == prepared[1]["tokenizer"]["sha256"]


def test_prepare_overwrites_its_own_output_and_refuses_foreign_dirs(corpus_dirs, tmp_path):
    text, _ = corpus_dirs
    out = tmp_path / "out"
    prepare_data([text / "notes.md"], [STDLIB / "bisect.py"], out, vocab_size=300, verbose=False)
    prepare_data([text / "notes.md"], [STDLIB / "heapq.py"], out, vocab_size=300, verbose=False)
    assert json.loads((out / "meta.json").read_text())["files"][-1]["path"].endswith("heapq.py")
    (out / "my_notes.txt").write_text("precious")
    with pytest.raises(UserError, match="already holds other files"):
        prepare_data([text / "notes.md"], [], out, vocab_size=300, verbose=False)


def test_interrupted_prepare_leaves_no_complete_looking_dir(corpus_dirs, tmp_path, monkeypatch):
    text, code = corpus_dirs
    out = tmp_path / "out"

    def boom(self, texts):
        raise KeyboardInterrupt

    monkeypatch.setattr(Tokenizer, "encode_batch", boom)
    with pytest.raises(KeyboardInterrupt):
        prepare_data([text], [code], out, vocab_size=300, verbose=False)
    assert not (out / "meta.json").exists()
    assert [p.name for p in out.iterdir()] == []  # the temporary directory is gone too
    with pytest.raises(UserError, match="not a prepared data directory"):
        TokenData(out)


def test_txt_documents_are_whole_paragraphs_of_minimum_size():
    text = "p1 line1\np1 line2\n\n  p2 indented\n\n\n\np3\n \t\np4 end\n"
    assert list(split_paragraph_documents(text, 0)) == ["p1 line1\np1 line2", "  p2 indented", "p3", "p4 end"]
    docs = list(split_paragraph_documents(text, 20))
    assert docs == ["p1 line1\np1 line2\n\n  p2 indented", "p3\n \t\np4 end"]


def test_jsonl_and_gzip_sources_and_counted_line_skips(tmp_path):
    lines = [json.dumps({"text": "first document"}), "", json.dumps({"content": "def g():\n\treturn 1\n"}),
             json.dumps({"title": "no text field"}), "{broken json", json.dumps({"text": 5}),
             json.dumps({"text": "last one"})]
    (tmp_path / "docs.jsonl").write_text("\n".join(lines) + "\n")
    with gzip.open(tmp_path / "more.txt.gz", "wt") as f:
        f.write("gzipped prose\n")
    meta = prepare_data([tmp_path / "docs.jsonl", tmp_path / "more.txt.gz"], [], tmp_path / "out",
                        vocab_size=300, val_fraction=0, verbose=False)
    assert meta["documents"]["text"]["train"] == 4
    skips = meta["skips"]
    assert skips["count"] == 3
    assert [(e["reason"], e["line"]) for e in skips["examples"]] == [
        ("no 'text' or 'content' field", 4), ("invalid JSON", 5), ("'text' is not a string", 6)]


def test_parquet_source(tmp_path):
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        (tmp_path / "t.parquet").write_bytes(b"PAR1")
        with pytest.raises(UserError, match="pip install pyarrow"):
            prepare_data([tmp_path / "t.parquet"], [], tmp_path / "out", vocab_size=300, verbose=False)
        return
    pq.write_table(pa.table({"content": ["a parquet document", None, "another one"]}), tmp_path / "t.parquet")
    meta = prepare_data([tmp_path / "t.parquet"], [], tmp_path / "out", vocab_size=300, val_fraction=0,
                        verbose=False)
    assert meta["documents"]["text"]["train"] == 2 and meta["skips"]["examples"][0]["line"] == 2


# --- bad input -------------------------------------------------------------------------------
@pytest.fixture
def bad_files(tmp_path):
    d = tmp_path / "mixed"
    d.mkdir()
    (d / "good.txt").write_text("A good document with some words in it.\n")
    (d / "empty.txt").write_text("")
    (d / "blank.txt").write_text("  \n\n \t\n")
    (d / "binary.txt").write_bytes(b"GIF89a\x00\x01\x02\x00 binary")
    (d / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    return d


def test_bad_files_inside_a_directory_are_counted_skips(bad_files, tmp_path):
    meta = prepare_data([bad_files], [], tmp_path / "out", vocab_size=300, verbose=False)
    assert meta["skips"]["by_reason"] == {"binary": 1, "empty": 2, "invalid UTF-8": 1}
    assert meta["sources"][0]["files"] == 1 and meta["sources"][0]["skipped_files"] == 4
    assert meta["documents"]["text"]["train"] == 1


@pytest.mark.parametrize("name,message", [
    ("empty.txt", "is empty"), ("blank.txt", "is empty"), ("binary.txt", "is a binary file"),
    ("latin1.txt", "is not valid UTF-8 \\(at byte 3\\)"),
])
def test_a_bad_file_named_explicitly_is_an_error(bad_files, tmp_path, name, message):
    with pytest.raises(UserError, match=message):
        prepare_data([bad_files / name], [], tmp_path / "out", vocab_size=300, verbose=False)


def test_sources_that_yield_nothing_are_errors(bad_files, tmp_path):
    (bad_files / "good.txt").unlink()
    with pytest.raises(UserError, match="has no usable documents"):
        prepare_data([bad_files], [], tmp_path / "out", vocab_size=300, verbose=False)
    empty_dir = tmp_path / "nothing"
    empty_dir.mkdir()
    (empty_dir / "readme.pdf").write_bytes(b"%PDF")
    with pytest.raises(UserError, match="has no code files"):
        prepare_data([], [empty_dir], tmp_path / "out", vocab_size=300, verbose=False)
    with pytest.raises(UserError, match="does not exist"):
        prepare_data([tmp_path / "missing"], [], tmp_path / "out", vocab_size=300, verbose=False)
    (tmp_path / "all_bad.jsonl").write_text('{"x": 1}\n{"y": 2}\n')
    with pytest.raises(UserError, match="no usable documents \\(2 no 'text' or 'content' field\\)"):
        prepare_data([tmp_path / "all_bad.jsonl"], [], tmp_path / "out", vocab_size=300, verbose=False)
    with pytest.raises(UserError, match="no sources given"):
        prepare_data([], [], tmp_path / "out", verbose=False)
    with pytest.raises(UserError, match="val_fraction"):
        prepare_data([tmp_path / "all_bad.jsonl"], [], tmp_path / "out", val_fraction=1.0, verbose=False)


def test_data_dir_errors(prepared, tmp_path):
    out, meta = prepared
    with pytest.raises(UserError, match="prepare_data"):
        TokenData(tmp_path / "missing")
    with pytest.raises(UserError, match=f"has {VOCAB} tokens but the model's vocab_size is 256"):
        TokenData(out, vocab_size=256)
    TokenData(out, vocab_size=VOCAB + 12)  # a larger model vocabulary is fine
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    with open(broken / "code_val.bin", "ab") as f:
        f.write(b"\x01\x00")
    with pytest.raises(UserError, match="damaged"):
        TokenData(broken)


def test_validate_ids_finds_an_id_outside_the_vocabulary(prepared, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(prepared[0], bad)
    TokenData(bad).validate_ids()  # the real output is clean
    arr = np.memmap(bad / "code_train.bin", dtype=np.uint16, mode="r+")
    arr[1234] = VOCAB + 7
    arr.flush()
    del arr
    with pytest.raises(UserError, match=f"code_train.bin holds token id {VOCAB + 7} >= vocab_size {VOCAB} "
                                        "\\(first at position 1234\\)"):
        TokenData(bad).validate_ids()


# --- loader ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    # text tokens are 0..19999, code tokens 20000..; each window's first token is its start.
    lengths = {("text", "train"): 20_000, ("code", "train"): 30_000, ("text", "val"): 1000, ("code", "val"): 1001}
    return write_synthetic(tmp_path_factory.mktemp("syn") / "d", lengths, vocab_size=60_000,
                           offsets={"code": 20_000})


def test_batches_are_windows_with_y_shifted(synthetic):
    data = TokenData(synthetic)
    x, y = data.get_batch("text", step=3, batch_size=4, seq_len=16, seed=1)
    assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (4, 16)
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(y - x, torch.ones_like(x))  # consecutive tokens: a real window, no padding
    for row, (domain, start) in zip(x, data.sample_windows("text", 3, 4, 16, seed=1)):
        assert domain == "text" and row[0].item() == start


def test_resumed_batches_are_the_uninterrupted_ones(synthetic):
    kind = lambda step: "mixed" if step % 3 else "code"  # noqa: E731
    first = TokenData(synthetic)
    uninterrupted = [first.get_batch(kind(s), s, 4, 32, seed=7) for s in range(111)][100:]
    rebuilt = TokenData(synthetic)  # as after a restart at step 100
    resumed = [rebuilt.get_batch(kind(s), s, 4, 32, seed=7) for s in range(100, 111)]
    for (x1, y1), (x2, y2) in zip(uninterrupted, resumed):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    # a different seed gives different batches
    assert not torch.equal(first.get_batch("text", 100, 4, 32, seed=8)[0], uninterrupted[0][0])


def test_ranks_draw_disjoint_windows(synthetic):
    data = TokenData(synthetic)
    L = 64
    for kind in ("text", "code", "mixed"):
        for step in range(300):
            w0, w1 = (data.sample_windows(kind, step, 8, L, seed=3, rank=rank, world_size=2) for rank in (0, 1))
            assert not set(w0) & set(w1)  # the ranks never share a window within a step
            # and together they are the batch one process with twice the batch size draws
            assert w0 + w1 == data.sample_windows(kind, step, 16, L, seed=3)
    # within one step, the two ranks' batches differ
    x0, _ = data.get_batch("text", 5, 8, L, rank=0, world_size=2)
    x1, _ = data.get_batch("text", 5, 8, L, rank=1, world_size=2)
    assert set(x0[:, 0].tolist()).isdisjoint(x1[:, 0].tolist())


def test_mixed_batches_alternate_domains(synthetic):
    data = TokenData(synthetic)
    x, _ = data.get_batch("mixed", step=0, batch_size=6, seq_len=8)
    is_code = (x[:, 0] >= 20_000).tolist()
    assert is_code == [False, True] * 3
    assert domains_for_rows("mixed", 0, 6) == ["text", "code"] * 3
    # batch size 1: the domain alternates with the step (and with the rank)
    assert [domains_for_rows("mixed", s, 1)[0] for s in range(4)] == ["text", "code", "text", "code"]
    assert [domains_for_rows("mixed", 0, 1, rank=r, world_size=2)[0] for r in (0, 1)] == ["text", "code"]
    # odd batch size: rows continue the alternation across steps, so the shares stay equal
    rows = [d for s in range(10) for d in domains_for_rows("mixed", s, 3)]
    assert rows.count("text") == rows.count("code") == 15
    xs, _ = data.get_batch("text", 0, 4, 8)
    xc, _ = data.get_batch("code", 0, 4, 8)
    assert (xs < 20_000).all() and (xc >= 20_000).all()


def test_eval_batches_are_contiguous_and_reproducible(synthetic):
    data = TokenData(synthetic)
    batches = list(data.iter_eval_batches("code", batch_size=4, seq_len=100))
    n_windows = (1001 - 1) // 100
    assert data.num_eval_windows("code", 100) == n_windows == 10
    assert [len(x) for x, _ in batches] == [4, 4, 2]
    xs = torch.cat([x for x, _ in batches])
    ys = torch.cat([y for _, y in batches])
    assert torch.equal(xs.flatten() - 20_000, torch.arange(1000))  # consecutive, non-overlapping
    assert torch.equal(ys, xs + 1)
    again = list(TokenData(synthetic).iter_eval_batches("code", 4, 100))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again))
    assert len(list(data.iter_eval_batches("code", 4, 100, max_batches=2))) == 2
    shards = [list(data.iter_eval_batches("code", 4, 100, rank=r, world_size=2)) for r in (0, 1)]
    assert [len(s) for s in shards] == [2, 1]


def test_loader_errors_are_one_line_user_errors(synthetic, tmp_path):
    data = TokenData(synthetic)
    with pytest.raises(UserError, match="fewer than seq_len \\+ 1 = 20001: use a smaller --seq_len"):
        data.get_batch("text", 0, 2, 20_000)
    with pytest.raises(UserError, match="fewer than seq_len \\+ 1 = 20001"):
        data.get_batch("text", 0, 2, 20_000, rank=1, world_size=2)
    data.get_batch("text", 0, 2, 15_000, rank=1, world_size=2)  # every rank draws from all the data
    with pytest.raises(UserError, match="batch kind"):
        data.get_batch("prose", 0, 2, 8)
    with pytest.raises(UserError, match="rank must be"):
        data.get_batch("text", 0, 2, 8, rank=2, world_size=2)
    with pytest.raises(UserError, match="larger --val_fraction"):
        list(data.iter_eval_batches("text", 2, 5000))
    no_code = write_synthetic(tmp_path / "nocode", {("text", "train"): 500})
    with pytest.raises(UserError, match="code train data .* has 0 tokens"):
        TokenData(no_code).get_batch("mixed", 0, 2, 8)
    TokenData(no_code).get_batch("text", 0, 2, 8)  # text alone still works


def test_real_prepared_data_batches(prepared):
    out, meta = prepared
    data = TokenData(out, vocab_size=VOCAB)
    data.validate_ids()
    x, y = data.get_batch("mixed", 0, 4, 64)
    assert int(x.max()) < VOCAB and torch.equal(x[:, 1:], y[:, :-1])
    n_val = sum(1 for _ in data.iter_eval_batches("text", 2, 64))
    assert n_val == -(-((meta["tokens"]["text"]["val"] - 1) // 64) // 2)


# --- default corpus --------------------------------------------------------------------------
def test_bundled_prose_is_present_and_small():
    paths = bundled_prose_paths()
    assert all(p.is_file() for p in paths)
    assert sum(p.stat().st_size for p in paths) < 6_000_000
    assert (corpus_mod.CORPUS_DIR / "SOURCES.md").is_file()


def test_default_corpus_is_built_once_then_reused(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MMREC_CACHE_DIR", str(tmp_path))
    assert default_corpus_dir(400) == tmp_path / "default_corpus" / "vocab400"
    small = dict(code_max_bytes=150_000, prose_max_bytes=40_000)
    out = ensure_default_corpus(400, **small)
    assert "building the default corpus" in capsys.readouterr().err
    meta = json.loads((out / "meta.json").read_text())
    assert meta["vocab_size"] == 400 and meta["recipe"]["code_max_bytes"] == 150_000
    assert all(meta["tokens"][d]["train"] > 0 for d in DOMAINS)
    code_paths = [f["path"] for f in meta["files"] if f["domain"] == "code"]
    assert code_paths and not any(f"/{x}/" in p for p in code_paths for x in ("test", "tests", "site-packages"))
    assert sum(f["bytes"]["train"] + f["bytes"]["val"] for f in meta["files"] if f["domain"] == "code") <= 150_000
    stamp = (out / "text_train.bin").stat().st_mtime_ns
    assert ensure_default_corpus(400, **small) == out
    assert "using the default corpus" in capsys.readouterr().err
    assert (out / "text_train.bin").stat().st_mtime_ns == stamp  # reused, not rebuilt
    # another recipe (here a larger code cap) rebuilds into the same place
    ensure_default_corpus(400, verbose=False, code_max_bytes=200_000, prose_max_bytes=40_000)
    assert json.loads((out / "meta.json").read_text())["recipe"]["code_max_bytes"] == 200_000
    TokenData(out, vocab_size=400).validate_ids()
