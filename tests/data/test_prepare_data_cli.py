"""The prepare_data command line: help, a real run with its summary, one-line errors."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from mm_rec.scripts.prepare_data import main
from mm_rec.utils.errors import run_cli

STDLIB = Path(sysconfig.get_paths()["stdlib"])
REPO = Path(__file__).resolve().parents[2]


def run_module(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mm_rec.scripts.prepare_data", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_help():
    r = run_module("--help")
    assert r.returncode == 0
    for flag in ("--text", "--code", "--out", "--tokenizer", "--vocab_size", "--val_fraction"):
        assert flag in r.stdout


def test_cli_run_prints_summary_and_writes_dir(tmp_path):
    text = tmp_path / "prose.txt"
    text.write_text("\n\n".join(f"Paragraph {i}: the whale, the sea, and the ship Pequod." for i in range(300)))
    code = tmp_path / "code"
    code.mkdir()
    shutil.copy(STDLIB / "bisect.py", code)
    shutil.copy(STDLIB / "heapq.py", code)
    (code / "empty.py").write_text("")
    out = tmp_path / "out"
    r = run_module("--text", str(text), "--code", str(code), "--out", str(out), "--vocab_size", "300",
                   "--txt_doc_chars", "500", "--val_fraction", "0.05")
    assert r.returncode == 0, r.stderr
    assert "domain split" in r.stderr and "skipped 1: 1 empty" in r.stderr
    meta = json.loads((out / "meta.json").read_text())
    assert meta["vocab_size"] == 300 and meta["documents"]["code"] == {"train": 1, "val": 1}
    assert meta["skips"]["examples"] == [{"file": f"{code}/empty.py", "reason": "empty"}]


@pytest.mark.parametrize("args,message", [
    ([], "give at least one --text or --code source"),
    (["--text", "{tmp}/missing.txt"], "does not exist"),
    (["--text", "{tmp}/empty.txt"], "is empty"),
    (["--text", "{tmp}/bin.txt"], "is a binary file"),
    (["--text", "{tmp}/empty.txt", "--tokenizer", "{tmp}/tok.json", "--vocab_size", "300"], "--vocab_size applies only"),
    (["--text", "{tmp}/ok.txt", "--tokenizer", "{tmp}/tok.json"], "does not exist"),
    (["--text", "{tmp}/ok.txt", "--vocab_size", "50"], "too small"),
])
def test_user_mistakes_are_one_line_errors(tmp_path, capsys, args, message):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "bin.txt").write_bytes(b"\x00\x01\x02")
    (tmp_path / "ok.txt").write_text("fine\n")
    argv = [a.format(tmp=tmp_path) for a in args] + ["--out", str(tmp_path / "out"), "--quiet"]
    assert run_cli(main, argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "out" / "meta.json").exists()


def test_user_mistake_in_a_subprocess_has_no_traceback(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    r = run_module("--text", str(tmp_path / "empty.txt"), "--out", str(tmp_path / "out"))
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and "is empty" in r.stderr
