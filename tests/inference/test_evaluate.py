"""Evaluation: the CLI's --data_dir loss is the trainer's validation loss; raw files are scored with
carried state (same numbers as one long forward) and bits per byte counts real UTF-8 bytes."""
import contextlib
import io
import json
import math

import pytest
import torch
import torch.nn.functional as F

from mm_rec.data.loader import TokenData
from mm_rec.data.prepare import prepare_data
from mm_rec.inference.evaluation import stream_loss, token_byte_lengths, tokenize_documents
from mm_rec.model import MMRec100M, MMRecConfig
from mm_rec.scripts import evaluate as evaluate_cli
from mm_rec.training.checkpoint import save_checkpoint
from mm_rec.training.evaluation import evaluate_loss
from mm_rec.utils.errors import run_cli

PROSE = ("It was the best of times, it was the worst of times. Call me Ishmael. "
         "Café, naïve, Straße, 東京 — the whale!\n\n") * 3
CODE = "def add(a, b):\n    return a + b\n\n\nclass Point:\n    x: int = 0\n"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    (root / "src").mkdir()
    for i in range(12):
        (root / "src" / f"book{i}.txt").write_text(f"Chapter {i}.\n\n" + PROSE * (1 + i % 3))
        (root / "src" / f"mod{i}.py").write_text(f"# module {i}\n" + CODE * (1 + i % 4))
    data_dir = root / "data"
    prepare_data([root / "src" / f"book{i}.txt" for i in range(12)], [root / "src" / f"mod{i}.py" for i in range(12)],
                 data_dir, vocab_size=320, val_fraction=0.3, txt_doc_chars=0, verbose=False)
    data = TokenData(data_dir)
    torch.manual_seed(0)
    model = MMRec100M(config=MMRecConfig(vocab_size=320, expert_dim=16, num_layers=2, num_heads=2, ffn_dim=32,
                                         init_std=0.1)).eval()
    ckpt = root / "ckpt" / "checkpoint_stage1_step_3.pt"
    save_checkpoint({"model_state_dict": model.state_dict(), "step": 3, "loss": 5.0, "stage": "stage1",
                     "config": model.config.to_dict(), "train_args": {"seq_len": 16},
                     "tokenizer": data.tokenizer().to_json()}, ckpt)
    return root, data_dir, data, model, ckpt


def _evaluate(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = run_cli(evaluate_cli.main, argv)
    return code, out.getvalue(), err.getvalue()


def test_data_dir_loss_equals_the_trainers_validation_loss(setup, tmp_path):
    root, data_dir, data, model, ckpt = setup
    code, out, err = _evaluate(["--checkpoint", str(ckpt), "--data_dir", str(data_dir), "--seq_len", "16",
                                "--batch_size", "2", "--max_batches", "3", "--device", "cpu",
                                "--json", str(tmp_path / "r.json")])
    assert code == 0, err
    report = json.loads((tmp_path / "r.json").read_text())
    results = {(r["domain"], r["expert"]): r for r in report["results"]}
    assert set(results) == {(d, e) for d in ("text", "code") for e in ("text", "code", "fused")}
    for (domain, expert), r in results.items():
        expected = evaluate_loss(model, data, domain, expert, batch_size=2, seq_len=16, max_batches=3)
        assert r["loss"] == expected
        assert r["perplexity"] == pytest.approx(math.exp(expected))
        assert r["tokens"] == sum(y.numel() for _, y in data.iter_eval_batches(domain, 2, 16, 3))
        assert r["bits_per_byte"] == pytest.approx(expected * r["tokens"] / math.log(2) / r["bytes"])
    assert "fused" in out and "bpb" in out  # the table


def test_files_with_carried_state_equal_one_long_forward(setup):
    root, _, data, model, _ = setup
    tokenizer = data.tokenizer()
    model64 = MMRec100M(config=model.config)
    model64.load_state_dict(model.state_dict())
    model64 = model64.double().eval()
    tokens, n_bytes = tokenize_documents(tokenizer, [PROSE, CODE])
    assert n_bytes == len(PROSE.encode()) + len(CODE.encode())
    assert tokens[0] == tokenizer.eot_id and tokens[-1] == tokenizer.eot_id
    whole = F.cross_entropy(model64(tokens[None, :-1])[0], tokens[1:], reduction="sum").item()
    for seq_len in (7, 64, 10_000):  # windows with the state carried across them
        nats, count = stream_loss(model64, tokens, "fused", seq_len)
        assert count == tokens.numel() - 1
        assert nats == pytest.approx(whole, rel=1e-10)
    # Without the carried state the windows would lose their context: a different number.
    cut = sum(F.cross_entropy(model64(tokens[None, s:s + 7])[0], tokens[s + 1:s + 8][:len(tokens[s:s + 7])],
                              reduction="sum").item()
              for s in range(0, tokens.numel() - 1, 7) if tokens[s + 1:s + 8].numel() == 7)
    assert abs(cut - whole) > 1e-3


def test_token_byte_lengths_count_utf8_bytes(setup):
    _, _, data, _, _ = setup
    tokenizer = data.tokenizer()
    lengths = token_byte_lengths(tokenizer)
    for text in (PROSE, CODE, "東京 ß ünïcödé 🐋"):
        ids = torch.tensor(tokenizer.encode(text))
        assert int(lengths[ids].sum()) == len(text.encode("utf-8"))
    assert lengths[tokenizer.eot_id] == 0


def test_files_cli_reports_bits_per_byte(setup, tmp_path):
    root, _, data, model, ckpt = setup
    code, out, err = _evaluate(["--checkpoint", str(ckpt), "--text", str(root / "src" / "book1.txt"),
                                "--code", str(root / "src" / "mod3.py"), "--expert", "code", "--seq_len", "32",
                                "--quiet", "--json", str(tmp_path / "f.json")])
    assert code == 0, err
    results = json.loads((tmp_path / "f.json").read_text())["results"]
    assert [(r["domain"], r["expert"]) for r in results] == [("text", "code"), ("code", "code")]
    code_file = (root / "src" / "mod3.py").read_text()
    tokens, n_bytes = tokenize_documents(data.tokenizer(), [code_file])
    nats, count = stream_loss(model, tokens, "code", 32)
    assert results[1]["bytes"] == n_bytes == len(code_file.encode())
    assert results[1]["loss"] == pytest.approx(nats / count, rel=1e-6)
    assert results[1]["bits_per_byte"] == pytest.approx(nats / math.log(2) / n_bytes, rel=1e-6)


def test_cli_errors(setup, tmp_path):
    root, data_dir, _, _, ckpt = setup
    code, _, err = _evaluate(["--checkpoint", str(ckpt)])
    assert code == 2 and "nothing to evaluate" in err
    code, _, err = _evaluate(["--checkpoint", str(ckpt), "--data_dir", str(data_dir), "--text", "x.txt"])
    assert code == 2 and "not both" in err
    code, _, err = _evaluate(["--checkpoint", str(ckpt), "--text", str(tmp_path / "missing.txt")])
    assert code == 2 and err.startswith("error:") and err.count("\n") == 1
    code, _, err = _evaluate(["--checkpoint", str(ckpt), "--data_dir", str(tmp_path)])
    assert code == 2 and "prepared data directory" in err


def test_without_data_flags_the_training_runs_data_and_seq_len_are_used(setup, tmp_path):
    root, data_dir, data, model, ckpt = setup
    own = root / "ckpt" / "checkpoint_stage3_step_5.pt"  # as train_modular writes it: data_dir, preset, seq_len
    save_checkpoint({**torch.load(ckpt, weights_only=True), "stage": "stage3", "step": 5,
                     "train_args": {"data_dir": str(data_dir), "seq_len": None, "preset": "tiny", "synthetic": False}}, own)
    args = ["--batch_size", "2", "--max_batches", "2", "--device", "cpu"]
    code, _, err = _evaluate(["--checkpoint", str(own), *args, "--json", str(tmp_path / "a.json")])
    assert code == 0, err
    code, _, err = _evaluate(["--checkpoint", str(own), "--data_dir", str(data_dir), "--seq_len", "256", *args,
                              "--json", str(tmp_path / "b.json")])
    assert code == 0, err
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("a.json", "b.json"))
    assert a["seq_len"] == 256  # the tiny preset's stage 3 length
    assert a["results"] and a["results"] == b["results"]
    synthetic = root / "ckpt" / "checkpoint_stage1_step_7.pt"
    save_checkpoint({**torch.load(ckpt, weights_only=True), "train_args": {"data_dir": None, "synthetic": True}}, synthetic)
    code, _, err = _evaluate(["--checkpoint", str(synthetic)])
    assert code == 2 and "synthetic" in err and err.count("\n") == 1

