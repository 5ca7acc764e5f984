"""Inference tools on real full and read-only filesystems (a tmpfs mounted as root; skipped where
mounting is not permitted), bad sampling numbers, and file modes that follow the umask."""
import contextlib
import io
import os
import subprocess

import pytest
import torch

from mm_rec.data.tokenizer import train_tokenizer
from mm_rec.inference.export import save_guide_pt, save_pretrained
from mm_rec.inference.sessions import SessionMemoryManager
from mm_rec.model import MMRec100M, MMRecConfig
from mm_rec.scripts import evaluate as evaluate_cli
from mm_rec.scripts import export as export_cli
from mm_rec.scripts import generate as generate_cli
from mm_rec.training.checkpoint import save_checkpoint
from mm_rec.utils.errors import run_cli

VOCAB = 300


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("io")
    torch.manual_seed(0)
    model = MMRec100M(config=MMRecConfig(vocab_size=VOCAB, expert_dim=16, num_layers=2, num_heads=2, ffn_dim=32,
                                         init_std=0.1)).eval()
    tok = train_tokenizer(["The whale surfaced near the ship. Ahab watched, silent."] * 20, vocab_size=VOCAB)
    path = root / "checkpoint_stage1_step_3.pt"
    save_checkpoint({"model_state_dict": model.state_dict(), "step": 3, "stage": "stage1",
                     "config": model.config.to_dict(), "train_args": {"seq_len": 8}, "tokenizer": tok.to_json()}, path)
    (root / "t.txt").write_text("The whale surfaced near the ship. " * 8)
    return path, model, tok, root / "t.txt"


def run(cli, argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = run_cli(cli.main, argv)
    return code, out.getvalue(), err.getvalue()


def one_line_error(code, out, err):
    """Exit 2, the error as one last line (evaluate prints its header line first), no traceback."""
    lines = err.splitlines()
    assert code == 2 and lines[-1].startswith("error: ") and "Traceback" not in err, err
    assert err.count("error") == 1 and len(lines) <= 2, err
    return lines[-1]


@contextlib.contextmanager
def tmpfs(path, size="1m", read_only=False):
    path.mkdir(parents=True, exist_ok=True)
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True,
                       capture_output=True)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("mounting a tmpfs is not permitted here (needs root)")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def make_read_only(path):
    subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True, capture_output=True)


def fill(path):
    """Fill the filesystem of `path` to the last byte."""
    with open(path / "filler", "wb", buffering=0) as f:
        for block in (65536, 1):
            try:
                while f.write(b"\0" * block):
                    pass
            except OSError:
                pass


def leftovers(path):
    return sorted(p.name for p in path.rglob("*") if p.name.startswith(".") or p.name.endswith(".tmp"))


# -- read-only ---------------------------------------------------------------------------------------


def test_read_only_destinations_are_one_line_before_any_work(tmp_path, checkpoint):
    ckpt, _, _, text = checkpoint
    with tmpfs(tmp_path / "ro") as ro:
        (ro / "sessions").mkdir()
        make_read_only(ro)
        code, out, err = run(evaluate_cli, ["--checkpoint", str(ckpt), "--text", str(text), "--quiet",
                                            "--device", "cpu", "--json", str(ro / "r.json")])
        assert "read-only" in one_line_error(code, out, err) and out == ""  # refused before evaluating
        code, out, err = run(generate_cli, ["--checkpoint", str(ckpt), "--prompt", "The", "--device", "cpu",
                                            "--session", "bob", "--session_dir", str(ro / "sessions")])
        assert "read-only" in one_line_error(code, out, err) and out == ""  # no text that would then be lost
        code, out, err = run(export_cli, ["--checkpoint", str(ckpt), "--out", str(ro / "export")])
        assert "read-only" in one_line_error(code, out, err)
        code, out, err = run(export_cli, ["--checkpoint", str(ckpt), "--out", str(ro / "sessions"), "--format", "pt"])
        assert "read-only" in one_line_error(code, out, err)


# -- full --------------------------------------------------------------------------------------------


def test_full_disk_keeps_the_session_and_prints_no_text(tmp_path, checkpoint):
    ckpt, _, _, _ = checkpoint
    with tmpfs(tmp_path / "full") as full:
        common = ["--checkpoint", str(ckpt), "--device", "cpu", "--temperature", "0", "--max_new_tokens", "3",
                  "--no_stop", "--session", "bob", "--session_dir", str(full / "sessions")]
        code, out, err = run(generate_cli, common + ["--prompt", "The whale"])
        assert code == 0, err
        sessions = SessionMemoryManager(full / "sessions")
        before = sessions.load_metadata("bob")
        state = sessions.load_state("bob")
        fill(full)
        code, out, err = run(generate_cli, common + ["--prompt", " Ahab"])
        assert "no space left" in one_line_error(code, out, err) and out == ""
        assert sessions.load_metadata("bob") == before  # the kept session is intact
        assert torch.equal(sessions.load_state("bob")["text"][1]["M"], state["text"][1]["M"])
        assert leftovers(full) == []


def test_full_disk_for_export_and_evaluate_json(tmp_path, checkpoint):
    ckpt, _, _, text = checkpoint
    with tmpfs(tmp_path / "full") as full:
        fill(full)
        code, out, err = run(export_cli, ["--checkpoint", str(ckpt), "--out", str(full / "e"), "--format", "both"])
        assert "no space left" in one_line_error(code, out, err)
        code, out, err = run(evaluate_cli, ["--checkpoint", str(ckpt), "--text", str(text), "--quiet",
                                            "--device", "cpu", "--json", str(full / "r.json")])
        assert "no space left" in one_line_error(code, out, err)
        assert not (full / "r.json").exists() and not (full / "e" / "model.safetensors").exists()
        assert leftovers(full) == []


# -- sampling numbers --------------------------------------------------------------------------------


@pytest.mark.parametrize("flags", [["--temperature", "nan"], ["--temperature", "inf"], ["--temperature", "-inf"],
                                   ["--top_p", "nan"], ["--session", ""]])
def test_bad_sampling_numbers_and_empty_session_are_one_line(tmp_path, checkpoint, flags):
    ckpt = checkpoint[0]
    code, out, err = run(generate_cli, ["--checkpoint", str(ckpt), "--prompt", "The", "--device", "cpu",
                                        "--session_dir", str(tmp_path / "s"), *flags])
    assert flags[0] in one_line_error(code, out, err) and out == ""
    assert not (tmp_path / "s").exists()


# -- umask -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_exports_and_sessions_follow_the_umask(tmp_path, checkpoint, umask, mode):
    _, model, tok, _ = checkpoint
    old = os.umask(umask)
    try:
        save_pretrained(model, tmp_path / "e", tok)
        save_guide_pt(model, tmp_path / "e" / "mmrec_100m_final.pt", tok)
        sessions = SessionMemoryManager(tmp_path / "sessions")
        sessions.serialize_state("s", model.init_memory_states(1), token_count=1, config=model.config)
        sessions.serialize_state("s", model.init_memory_states(1), token_count=2, config=model.config)
    finally:
        os.umask(old)
    files = [p for p in [*(tmp_path / "e").iterdir(), *(tmp_path / "sessions").rglob("*")] if p.is_file()]
    assert len(files) >= 6
    for path in files:
        assert path.stat().st_mode & 0o777 == mode, path
    assert (tmp_path / "sessions" / "s").stat().st_mode & 0o777 == 0o777 & ~umask
