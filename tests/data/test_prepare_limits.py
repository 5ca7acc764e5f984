"""prepare_data under stress (issue 25.4, 25.5; issue 20.1): memory bounded whatever the document
size, temporaries removed on every exit, full and read-only disks as one line with nothing
truncated left behind, exact duplicates dropped, one document still split for validation,
--max_tokens, and token files past 4 GiB."""
from __future__ import annotations

import json
import os
import random
import re
import signal
import string
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from mm_rec.data.loader import TokenData
from mm_rec.data.prepare import bin_name, prepare_data
from mm_rec.data.tokenizer import Tokenizer, train_tokenizer
from mm_rec.utils.errors import UserError

ENV = dict(os.environ, OMP_NUM_THREADS="1")
PREPARE = [sys.executable, "-m", "mm_rec.scripts.prepare_data"]
CODE = "def add(a, b):\n    return a + b\n\n\nclass Point:\n    x: int = 0\n"


def word_list(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return sorted({"".join(rng.choices(string.ascii_lowercase, k=rng.randint(3, 8))) for _ in range(n)})


def words_text(nbytes: int, words: list[str], seed: int = 0) -> tuple[str, np.ndarray]:
    """One line of space-separated words, about `nbytes` long; (text, the word indices)."""
    rng = np.random.default_rng(seed)
    avg = sum(map(len, words)) / len(words) + 1
    picks = rng.integers(0, len(words), size=int(nbytes / avg))
    return " ".join(words[i] for i in picks), picks


def small_tokenizer(words: list[str], path: Path) -> Path:
    rng = random.Random(0)
    train_tokenizer([" ".join(rng.choices(words, k=200)) for _ in range(200)], 1000).save(path)
    return path


def expected_tokens(tok: Tokenizer, words: list[str], picks: np.ndarray) -> int:
    """Tokens of the words_text line: GPT-2's pre-tokenizer makes each " word" a unit of its own."""
    per_word = np.array([len(tok.encode(" " + w)) for w in words])
    return int(per_word[picks[1:]].sum()) + len(tok.encode(words[picks[0]]))


def peak_rss_mb(cmd: list[str], timeout: float) -> tuple[subprocess.CompletedProcess, float]:
    """Run `cmd` under a fresh Python parent and return (its result, its peak RSS in MB)."""
    launcher = ("import resource, subprocess, sys, json; p = subprocess.run(sys.argv[1:], capture_output=True, "
                "text=True); print(json.dumps([p.returncode, p.stderr, "
                "resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss]))")
    proc = subprocess.run([sys.executable, "-c", launcher, *cmd], capture_output=True, text=True, env=ENV,
                          timeout=timeout)
    rc, stderr, maxrss_kb = json.loads(proc.stdout.strip().splitlines()[-1])
    return subprocess.CompletedProcess(cmd, rc, "", stderr), maxrss_kb / 1024


def one_line_error(proc, *phrases) -> str:
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert lines[-1].startswith("error: "), proc.stderr[-3000:]
    for phrase in phrases:
        assert phrase in lines[-1], (phrase, lines[-1])
    return lines[-1]


# -- pieces: the same ids as the whole text -----------------------------------------------------
def test_pieces_cut_at_whitespace_encode_exactly_as_the_whole_text():
    from mm_rec.data.tokenizer import split_for_encoding, training_pieces
    rng = random.Random(1)
    parts = ["the", "cat", " ", "\n", "\n\n", "  ", "it's", "12", "x" * 40, "!!", "é", "\t", "東京", " \n "]
    tok = train_tokenizer(["".join(rng.choices(parts, k=3000)) for _ in range(10)], 500)
    for _ in range(300):
        text = "".join(rng.choices(parts, k=rng.randint(1, 300)))
        limit = rng.randint(1, 60)
        pieces = list(split_for_encoding(text, limit))
        assert "".join(pieces) == text and all(len(p) <= limit for p in pieces)
        cut_in_a_word = any(pieces[k][-1].isspace() or not pieces[k + 1][0].isspace() for k in range(len(pieces) - 1))
        if not cut_in_a_word:  # only a stretch with no whitespace is ever cut hard
            assert [i for p in pieces for i in tok.encode(p)] == tok.encode(text)
        trained_on = "".join(training_pieces(text))
        if re.search(r"\S{257}", text) is None:  # no blob: the trainer sees all of it
            assert trained_on == text
    assert "".join(training_pieces("a b " + "y" * 1000 + " c")) == "a b " + "y" * 256 + " c"  # a blob: its start
    assert [len(p) for p in split_for_encoding("ab" * 50, 30)] == [30, 30, 30, 10]  # no whitespace: hard cuts


# -- memory bounded whatever the document size ------------------------------------------------
@pytest.mark.slow
def test_a_64mb_single_line_prepares_within_1gb(tmp_path):
    """Issue 25: a 64 MB single-line file took 14.5 GB; 128 MB aborted in the tokenizer."""
    words = word_list(300)
    text, picks = words_text(64 << 20, words)
    (tmp_path / "line.txt").write_text(text)
    del text
    (tmp_path / "mod.py").write_text(CODE)
    tok = small_tokenizer(words, tmp_path / "tokenizer.json")
    n_tokens = expected_tokens(Tokenizer.load(tok), words, picks)
    out = tmp_path / "out"
    t0 = time.time()
    proc, peak = peak_rss_mb(PREPARE + ["--text", str(tmp_path / "line.txt"), "--code", str(tmp_path / "mod.py"),
                                        "--tokenizer", str(tok), "--out", str(out), "--quiet"], timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert peak < 1024, f"peak RSS {peak:.0f} MB"
    meta = json.loads((out / "meta.json").read_text())
    # exactly the tokens of the whole line (cut into pieces at whitespace, which changes no id), and
    # the single document gets a validation range and an end-of-text in each half
    assert meta["tokens"]["text"]["train"] + meta["tokens"]["text"]["val"] == n_tokens + 2
    assert meta["val_split"]["text"] == "token_range"
    assert abs(meta["tokens"]["text"]["val"] / n_tokens - 0.01) < 0.001
    data = TokenData(out)
    whole = np.concatenate([data.tokens("text", "train")[:-1], data.tokens("text", "val")])
    check = Tokenizer.load(tok)
    assert whole[:2000].tolist() == check.encode((tmp_path / "line.txt").read_text()[:20000])[:2000]
    print(f"64 MB line: {time.time() - t0:.1f} s, peak RSS {peak:.0f} MB")


@pytest.mark.slow
def test_text_without_whitespace_finishes(tmp_path):
    """Issue 25: 16 MB without whitespace had not finished after 15 minutes (the BPE trainer on
    one 16M-character word). Here 4 MB, tokenizer trained, in well under two minutes."""
    rng = np.random.default_rng(0)
    letters = np.frombuffer(string.ascii_letters.encode(), dtype=np.uint8)
    (tmp_path / "blob.txt").write_bytes(rng.choice(letters, size=4 << 20).tobytes())
    (tmp_path / "mod.py").write_text(CODE * 50)
    t0 = time.time()
    proc = subprocess.run(PREPARE + ["--text", str(tmp_path / "blob.txt"), "--code", str(tmp_path / "mod.py"),
                                     "--vocab_size", "600", "--out", str(tmp_path / "out"), "--quiet"],
                          capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = TokenData(tmp_path / "out")
    tok = data.tokenizer()
    whole = np.concatenate([data.tokens("text", "train")[:-1], data.tokens("text", "val")[:-1]])
    assert tok.decode(whole.tolist()) == (tmp_path / "blob.txt").read_text()  # nothing lost at the hard cuts
    assert time.time() - t0 < 240


# -- temporaries removed on every exit ---------------------------------------------------------
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_mid_way_leaves_no_temporaries_and_no_finished_looking_output(tmp_path, sig):
    words = word_list(300)
    (tmp_path / "a.txt").write_text(words_text(12 << 20, words)[0])
    (tmp_path / "mod.py").write_text(CODE)
    tok = small_tokenizer(words, tmp_path / "tokenizer.json")
    out = tmp_path / "out"
    proc = subprocess.Popen(PREPARE + ["--text", str(tmp_path / "a.txt"), "--code", str(tmp_path / "mod.py"),
                                       "--tokenizer", str(tok), "--out", str(out), "--quiet"],
                            stderr=subprocess.PIPE, text=True, env=ENV)
    deadline = time.time() + 120
    while time.time() < deadline:  # wait until it is writing token files in its temporary directory
        if any(p.is_file() and p.stat().st_size > 0 for p in out.glob(".prepare-tmp-*/*.bin")):
            break
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.05)
    else:
        pytest.fail("prepare_data never started writing")
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode in (128 + sig, 130), (proc.returncode, err)
    assert "Traceback" not in err, err
    assert sorted(p.name for p in out.iterdir()) == []  # no temporary directory, no meta.json, nothing


def test_a_killed_runs_temporary_directory_is_removed_by_the_next_run(tmp_path):
    (tmp_path / "a.txt").write_text("one two three four\n\nfive six seven\n" * 20)
    (tmp_path / "mod.py").write_text(CODE)
    out = tmp_path / "out"
    (out / ".prepare-tmp-999999999").mkdir(parents=True)  # no such process
    (out / ".prepare-tmp-999999999" / "text_train.bin").write_bytes(b"\0" * 100)
    prepare_data([tmp_path / "a.txt"], [tmp_path / "mod.py"], out, vocab_size=300, verbose=False)
    assert not list(out.glob(".prepare-tmp-*"))


# -- full and read-only disks ------------------------------------------------------------------
@contextmanager
def tmpfs(path: Path, options: str):
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def files_under(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture
def sources(tmp_path) -> tuple[Path, Path]:
    rng = random.Random(0)
    words = word_list(400)
    text = tmp_path / "src" / "prose.txt"
    text.parent.mkdir()
    text.write_text("\n\n".join(" ".join(rng.choices(words, k=60)) for _ in range(400)))
    code = tmp_path / "src" / "mod.py"
    code.write_text("".join(f"def f{i}(x):\n    return x * {i}\n\n" for i in range(3000)))
    return text, code


@pytest.mark.parametrize("size", ["4k", "40k"])
def test_full_disk_is_one_line_and_leaves_nothing_truncated(tmp_path, sources, size):
    """4k: the tokenizer does not fit (issue 25: a truncated tokenizer.json and a traceback);
    40k: the tokenizer fits and the token files do not."""
    text, code = sources
    with tmpfs(tmp_path / "disk", f"size={size}") as disk:
        proc = subprocess.run(PREPARE + ["--text", str(text), "--code", str(code), "--vocab_size", "400",
                                         "--out", str(disk / "out"), "--quiet"],
                              capture_output=True, text=True, env=ENV, timeout=300)
        one_line_error(proc, "no space left")
        assert files_under(disk) == {}  # no tokenizer.json, token file, meta.json or temporary


def test_full_disk_keeps_the_previous_output(tmp_path, sources):
    text, code = sources
    small = tmp_path / "small.txt"
    small.write_text("a few words of prose\n\nand a second paragraph\n")
    tiny_code = tmp_path / "tiny.py"
    tiny_code.write_text(CODE)
    with tmpfs(tmp_path / "disk", "size=64k") as disk:
        prepare_data([small], [tiny_code], disk / "out", vocab_size=300, verbose=False)
        before = files_under(disk)
        proc = subprocess.run(PREPARE + ["--text", str(text), "--code", str(code), "--vocab_size", "400",
                                         "--out", str(disk / "out"), "--quiet"],
                              capture_output=True, text=True, env=ENV, timeout=300)
        one_line_error(proc, "no space left")
        assert files_under(disk) == before
        TokenData(disk / "out")


def test_read_only_out_is_one_line(tmp_path, sources):
    text, code = sources
    with tmpfs(tmp_path / "ro", "ro,size=64k") as ro:
        for out in (ro, ro / "new"):
            proc = subprocess.run(PREPARE + ["--text", str(text), "--code", str(code), "--out", str(out), "--quiet"],
                                  capture_output=True, text=True, env=ENV, timeout=120)
            one_line_error(proc, "read-only", str(out))


# -- duplicates, one-document validation, --max_tokens ------------------------------------------
def test_exact_duplicates_are_dropped_and_counted(tmp_path):
    docs = [f"document number {i} says something about {i * 7}. " * 8 for i in range(50)]
    short = ["Amen.", "CHAPTER I."]  # short texts repeat legitimately: kept
    assert min(map(len, docs)) >= 256 > max(map(len, short))
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n"
                                              for d in short + docs + docs[:10] + short + docs[:5]))
    (tmp_path / "b.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in short + docs + short))
    big_code = CODE * 5
    (tmp_path / "mod.py").write_text(big_code)
    (tmp_path / "copy.py").write_text(big_code)  # the same file twice in code
    meta = prepare_data([tmp_path / "a.jsonl"], [tmp_path / "mod.py", tmp_path / "copy.py"], tmp_path / "dup",
                        vocab_size=300, verbose=False)
    ref = prepare_data([tmp_path / "b.jsonl"], [tmp_path / "mod.py"], tmp_path / "ref", tokenizer_path=tmp_path / "dup",
                       verbose=False)
    assert meta["duplicates"]["text"] == {"documents": 15, "bytes": sum(len(d) for d in docs[:10] + docs[:5])}
    assert meta["duplicates"]["code"] == {"documents": 1, "bytes": len(big_code)}
    for d in ("text", "code"):
        for s in ("train", "val"):  # the same token files as the documents given once
            assert (tmp_path / "dup" / bin_name(d, s)).read_bytes() == (tmp_path / "ref" / bin_name(d, s)).read_bytes()


def test_a_single_document_gets_a_validation_range_at_its_end(tmp_path):
    """Issue 20: one big code file gave "code has a single document, so no validation split"."""
    (tmp_path / "big.py").write_text("".join(f"def f{i}(x):\n    return x + {i}\n\n" for i in range(2000)))
    (tmp_path / "a.txt").write_text("one paragraph\n\nanother paragraph\n\na third\n")
    meta = prepare_data([tmp_path / "a.txt"], [tmp_path / "big.py"], tmp_path / "out", vocab_size=400,
                        val_fraction=0.05, verbose=False)
    whole = prepare_data([tmp_path / "a.txt"], [tmp_path / "big.py"], tmp_path / "whole",
                         tokenizer_path=tmp_path / "out", val_fraction=0.0, verbose=False)
    data, ref = TokenData(tmp_path / "out"), TokenData(tmp_path / "whole")
    train, val, all_ids = data.tokens("code", "train"), data.tokens("code", "val"), ref.tokens("code", "train")
    assert meta["val_split"]["code"] == "token_range" and whole["val_split"]["code"] == "none"
    assert train[-1] == val[-1] == data.eot_id
    assert np.array_equal(np.concatenate([train[:-1], val]), all_ids)  # train then val is the whole document
    assert abs(len(val) / len(all_ids) - 0.05) < 0.002
    assert meta["documents"]["code"] == {"train": 1, "val": 1}


def test_max_tokens_caps_each_domain(tmp_path):
    words = word_list(200)
    rng = random.Random(0)
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": " ".join(rng.choices(words, k=50))}) + "\n"
                                              for _ in range(400)))
    (tmp_path / "src").mkdir()
    for i in range(30):
        (tmp_path / "src" / f"m{i}.py").write_text(f"def f{i}(x):\n    return x * {i}\n" * 20)
    full = prepare_data([tmp_path / "a.jsonl"], [tmp_path / "src"], tmp_path / "full", vocab_size=400, verbose=False)
    capped = prepare_data([tmp_path / "a.jsonl"], [tmp_path / "src"], tmp_path / "capped",
                          tokenizer_path=tmp_path / "full", max_tokens=3000, verbose=False)
    for d in ("text", "code"):
        assert full["tokens"][d]["train"] + full["tokens"][d]["val"] > 3000
        assert capped["tokens"][d]["train"] + capped["tokens"][d]["val"] == 3000
        a, b = TokenData(tmp_path / "capped").tokens(d, "train"), TokenData(tmp_path / "full").tokens(d, "train")
        assert a[-1] == TokenData(tmp_path / "capped").eot_id
        assert np.array_equal(a[:-1], b[:len(a) - 1])  # a prefix of the uncapped data


# -- sizes: uint32 tokens, files past 4 GiB -----------------------------------------------------
def test_a_vocabulary_over_65535_gives_uint32_token_files(tmp_path):
    tok = train_tokenizer(["some text to learn from"] * 5, 300)
    tok._tok.add_tokens([f"<extra_{i}>" for i in range(66000)])
    big = Tokenizer(tok._tok)
    assert big.vocab_size > 65536
    big.save(tmp_path / "tokenizer.json")
    (tmp_path / "a.txt").write_text("hello there <extra_65999> world\n\nsecond one\n")
    (tmp_path / "mod.py").write_text(CODE)
    meta = prepare_data([tmp_path / "a.txt"], [tmp_path / "mod.py"], tmp_path / "out",
                        tokenizer_path=tmp_path / "tokenizer.json", verbose=False)
    assert meta["dtype"] == "uint32"
    data = TokenData(tmp_path / "out")
    ids = np.concatenate([data.tokens("text", s) for s in ("train", "val")])
    assert int(ids.max()) == big._tok.token_to_id("<extra_65999>") > 65535


def test_token_files_past_4gib_are_read_with_64_bit_offsets(tmp_path):
    """A sparse 4.5 GiB uint16 file: windows past 2^32 bytes and 2^31 tokens read the right ids."""
    out = tmp_path / "big"
    (tmp_path / "a.txt").write_text("alpha beta\n\ngamma delta\n\nepsilon\n")
    (tmp_path / "mod.py").write_text(CODE)
    meta = prepare_data([tmp_path / "a.txt"], [tmp_path / "mod.py"], out, vocab_size=300, verbose=False)
    n = (9 << 30) // 4  # 2.25 G tokens = 4.5 GiB
    marker = np.arange(1, 41, dtype=np.uint16)
    with open(out / "text_train.bin", "wb") as f:
        f.truncate(n * 2)
        f.seek((n - 40) * 2)
        f.write(marker.tobytes())
    meta["outputs"]["text_train.bin"] = n
    (out / "meta.json").write_text(json.dumps(meta))
    data = TokenData(out)
    assert data.num_tokens("text") == n
    assert data.tokens("text")[n - 40:].tolist() == marker.tolist()
    assert data._num_starts("text", "train", 8) == n - 8
    x, y = data.get_batch("text", 0, 2, 8)
    assert x.shape == (2, 8)
