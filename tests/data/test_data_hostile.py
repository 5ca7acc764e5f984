"""A prepared directory is checked field by field before numpy reads it (issue 25.3), and data that
lacks a domain is refused before the model is built (issue 26.10): one line, exit 2, no crash."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mm_rec.data.loader import TokenData
from mm_rec.data.prepare import prepare_data
from mm_rec.model import MMRec100M, MMRecConfig
from mm_rec.scripts import train_modular
from mm_rec.training.checkpoint import save_checkpoint
from mm_rec.utils.errors import UserError, run_cli

PROSE = "It was the best of times, it was the worst of times. Call me Ishmael.\n\n"
CODE = "def add(a, b):\n    return a + b\n\n\nclass Point:\n    x: int = 0\n"
VOCAB = 320
MODEL = ["--vocab_size", str(VOCAB), "--expert_dim", "16", "--num_layers", "1", "--num_heads", "2", "--ffn_dim", "32"]
ENV = dict(os.environ, OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hostile")
    (root / "src").mkdir()
    for i in range(8):
        (root / "src" / f"book{i}.txt").write_text("".join(f"Chapter {i}, part {k}. {PROSE}" for k in range(3 + i)))
        (root / "src" / f"mod{i}.py").write_text(f"# module {i}\n" + CODE * (2 + i))
    out = root / "data"
    prepare_data(sorted((root / "src").glob("*.txt")), sorted((root / "src").glob("*.py")), out,
                 vocab_size=VOCAB, val_fraction=0.3, txt_doc_chars=0, verbose=False)
    return out


@pytest.fixture(scope="module")
def checkpoint(prepared, tmp_path_factory) -> Path:
    data = TokenData(prepared)
    torch.manual_seed(0)
    model = MMRec100M(config=MMRecConfig(vocab_size=VOCAB, expert_dim=16, num_layers=1, num_heads=2, ffn_dim=32))
    path = tmp_path_factory.mktemp("ckpt") / "checkpoint_stage1_step_1.pt"
    save_checkpoint({"model_state_dict": model.state_dict(), "step": 1, "loss": 5.0, "stage": "stage1",
                     "config": model.config.to_dict(), "train_args": {"seq_len": 8},
                     "tokenizer": data.tokenizer().to_json()}, path)
    return path


def damaged_copy(prepared: Path, tmp_path: Path, edit) -> Path:
    out = tmp_path / "data"
    shutil.copytree(prepared, out)
    meta = json.loads((out / "meta.json").read_text())
    meta = edit(meta, out)
    (out / "meta.json").write_text(json.dumps(meta))
    return out


def object_dtype(meta, out):
    """The crafted meta.json of issue 25: dtype object, counts matching 8-byte items (files padded)."""
    meta["dtype"] = "object"
    for name in meta["outputs"]:
        raw = (out / name).read_bytes()
        raw += b"\x01" * (-len(raw) % 8)
        (out / name).write_bytes(raw)
        meta["outputs"][name] = len(raw) // 8
    return meta


def setter(path: str, value):
    def edit(meta, out):
        *parents, last = ["outputs", path[len("outputs."):]] if path.startswith("outputs.") else [path]
        node = meta
        for p in parents:
            node = node[p]
        if value is KeyError:
            del node[last]
        else:
            node[last] = value
        return meta
    return edit


BAD_META = [
    ("dtype", setter("dtype", "float64")),
    ("dtype", setter("dtype", "not-a-dtype")),
    ("dtype", setter("dtype", 5)),
    ("dtype", setter("dtype", None)),
    ("dtype", setter("dtype", "int8")),
    ("vocab_size", setter("vocab_size", "320")),
    ("vocab_size", setter("vocab_size", -1)),
    ("vocab_size", setter("vocab_size", 1 << 40)),
    ("vocab_size", setter("vocab_size", True)),
    ("vocab_size", setter("vocab_size", KeyError)),
    ("eot_id", setter("eot_id", 100000)),
    ("eot_id", setter("eot_id", -1)),
    ("eot_id", setter("eot_id", 1.5)),
    ("outputs.text_train.bin", setter("outputs.text_train.bin", -5)),
    ("outputs.text_train.bin", setter("outputs.text_train.bin", "12")),
    ("outputs.code_val.bin", setter("outputs.code_val.bin", KeyError)),
    ("outputs", setter("outputs", [1, 2])),
    ("version", setter("version", 99)),
    ("outputs.text_train.bin", setter("outputs.text_train.bin", 1 << 61)),  # a size the file does not have
]


@pytest.mark.parametrize("field,edit", BAD_META, ids=[f"{f}-{i}" for i, (f, _) in enumerate(BAD_META)])
def test_every_meta_field_is_checked(prepared, tmp_path, field, edit):
    bad = damaged_copy(prepared, tmp_path, edit)
    with pytest.raises(UserError) as e:
        TokenData(bad)
    msg = str(e.value)
    assert "\n" not in msg and field in msg, msg
    assert "meta.json" in msg or field.startswith("outputs"), msg


def test_meta_that_is_not_an_object(prepared, tmp_path):
    bad = damaged_copy(prepared, tmp_path, lambda meta, out: [meta])
    with pytest.raises(UserError, match="meta.json was not written by prepare_data"):
        TokenData(bad)


def test_token_file_of_the_wrong_size(prepared, tmp_path):
    bad = damaged_copy(prepared, tmp_path, lambda meta, out: meta)
    with open(bad / "code_train.bin", "ab") as f:
        f.write(b"\0\0")
    with pytest.raises(UserError, match=r"code_train.bin has \d+ bytes but meta.json field outputs.code_train.bin"):
        TokenData(bad)


def test_token_ids_beyond_the_vocabulary_are_one_line_in_every_reader(prepared, tmp_path):
    bad = damaged_copy(prepared, tmp_path, lambda meta, out: meta)
    ids = np.fromfile(bad / "text_val.bin", dtype=np.uint16)
    ids[3] = 60000
    ids.tofile(bad / "text_val.bin")
    data = TokenData(bad)
    with pytest.raises(UserError, match="text_val.bin .* holds token id 60000 >= meta.json field vocab_size"):
        next(data.iter_eval_batches("text", 2, 4))
    with pytest.raises(UserError, match="text_val.bin holds token id 60000"):
        data.validate_ids()


def _one_line_exit_2(proc: subprocess.CompletedProcess, *phrases: str) -> str:
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr
    assert lines and lines[-1].startswith("error: "), proc.stderr
    for phrase in phrases:
        assert phrase in lines[-1], (phrase, lines[-1])
    return lines[-1]


def test_object_dtype_does_not_crash_training(prepared, tmp_path):
    """Issue 25: this meta.json segfaulted `train_modular --data_dir` (numpy memmap of objects)."""
    bad = damaged_copy(prepared, tmp_path, object_dtype)
    proc = subprocess.run([sys.executable, "-m", "mm_rec.scripts.train_modular", "--preset", "tiny", *MODEL,
                           "--data_dir", str(bad), "--checkpoint_dir", str(tmp_path / "run"), "--stage", "stage1",
                           "--max_steps", "1", "--seq_len", "8", "--batch_size", "2", "--device", "cpu"],
                          capture_output=True, text=True, env=ENV, timeout=300)
    _one_line_exit_2(proc, "field dtype", "'object'", str(bad / "meta.json"))
    assert not list((tmp_path / "run").glob("checkpoint_*")) if (tmp_path / "run").exists() else True


def test_object_dtype_does_not_crash_evaluate(prepared, checkpoint, tmp_path):
    bad = damaged_copy(prepared, tmp_path, object_dtype)
    proc = subprocess.run([sys.executable, "-m", "mm_rec.scripts.evaluate", "--checkpoint", str(checkpoint),
                           "--data_dir", str(bad), "--seq_len", "8", "--device", "cpu"],
                          capture_output=True, text=True, env=ENV, timeout=300)
    _one_line_exit_2(proc, "field dtype", "'object'")


@pytest.mark.parametrize("present", ["text", "code"])
def test_single_domain_data_is_refused_before_the_model_is_built(tmp_path, capsys, monkeypatch, present):
    """Issue 26.10: text-only data passed prepare_data and failed after the header with advice
    to use a smaller --seq_len. Now: refused at once, naming the missing domain and the fix."""
    src = tmp_path / ("prose.txt" if present == "text" else "mod.py")
    src.write_text((PROSE if present == "text" else CODE) * 40)
    data = tmp_path / "data"
    prepare_data([src] if present == "text" else [], [src] if present == "code" else [], data,
                 vocab_size=VOCAB, verbose=False)
    built = []
    monkeypatch.setattr(train_modular, "__name__", train_modular.__name__)  # run in-process, as the CLI does
    import mm_rec.training.trainer as trainer_mod
    real_model = trainer_mod.MMRec100M
    monkeypatch.setattr(trainer_mod, "MMRec100M", lambda *a, **k: built.append(1) or real_model(*a, **k))
    code = run_cli(train_modular.main, ["--preset", "tiny", *MODEL, "--data_dir", str(data), "--checkpoint_dir",
                                        str(tmp_path / "run"), "--seq_len", "16", "--batch_size", "2",
                                        "--device", "cpu"])
    err = capsys.readouterr().err
    missing = "code" if present == "text" else "text"
    assert code == 2, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and "Traceback" not in err, err
    assert f"holds no {missing} data" in last and f"--{missing} SRC" in last, last
    assert "seq_len" not in last
    assert built == []  # refused before the model was built
