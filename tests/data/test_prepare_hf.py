"""prepare_data reads datasets through the Hugging Face `datasets` library (issue 20.1): hf:NAME
(hub or local path), and local parquet / arrow / json / csv files, streamed. The hub cannot be
reached here, so the hub call is checked by recording it, and the reading itself on local datasets
made in the test through the same code."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mm_rec.data.prepare import OUTPUT_FILES
from mm_rec.scripts import prepare_data as prepare_cli
from mm_rec.utils.errors import run_cli

ADD = "".join(f"def add{i}(a, b):\n    return a + b + {i}\n\n" for i in range(10))
CODE = [ADD, "class Point:\n    x: int = 0\n    y: int = 0\n", "import os\n\nprint(os.getcwd())\n", ADD]  # one duplicate


def documents() -> list[str]:
    words = "the whale sea ship captain harpoon deck night storm sailor rope ocean wind".split()
    docs = [" ".join(words[(i * 7 + k * 3) % len(words)] for k in range(5 + i % 80)) + f" {i}." for i in range(300)]
    long = [d for d in docs if len(d) >= 256]
    return docs + long[:12]  # exact duplicates are dropped the same way from every format


def run(argv, capsys) -> tuple[int, str]:
    code = run_cli(prepare_cli.main, [str(a) for a in argv])
    return code, capsys.readouterr().err


def outputs(directory: Path) -> dict[str, bytes]:
    files = {name: (directory / name).read_bytes() for name in OUTPUT_FILES if name != "meta.json"}
    assert len(files) == len(OUTPUT_FILES) - 1
    return files


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The documents as jsonl (read without `datasets`) and prepared: the reference output."""
    root = tmp_path_factory.mktemp("hf")
    docs = documents()
    (root / "docs.jsonl").write_text("".join(json.dumps({"text": d, "n": i}) + "\n" for i, d in enumerate(docs)))
    (root / "code.jsonl").write_text("".join(json.dumps({"content": c}) + "\n" for c in CODE))
    code = run_cli(prepare_cli.main, ["--text", str(root / "docs.jsonl"), "--code", str(root / "code.jsonl"),
                                      "--vocab_size", "300", "--out", str(root / "ref"), "--quiet"])
    assert code == 0
    return root, docs, outputs(root / "ref")


def local_datasets(root: Path, docs: list[str], jsonl: Path) -> dict[str, str]:
    """The same documents in every local form the library reads; returns --text arguments."""
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"text": docs, "n": list(range(len(docs)))})
    ds.save_to_disk(str(root / "saved"))
    half = len(docs) // 2
    ds.select(range(half)).to_parquet(str(root / "parquet_dir" / "part-0.parquet"))
    ds.select(range(half, len(docs))).to_parquet(str(root / "parquet_dir" / "part-1.parquet"))
    ds.to_csv(str(root / "docs.csv"), index=False)
    ds.to_json(str(root / "docs.json"))
    arrow = next((root / "saved").glob("*.arrow"))
    return {"save_to_disk": f"hf:{root / 'saved'}", "parquet directory": f"hf:{root / 'parquet_dir'}",
            "hf:jsonl": f"hf:{jsonl}", "csv": str(root / "docs.csv"), "json": str(root / "docs.json"),
            "arrow": str(arrow)}


def test_hf_local_datasets_give_the_same_token_files_as_jsonl(reference, tmp_path, capsys):
    root, docs, ref = reference
    sources = local_datasets(tmp_path, docs, root / "docs.jsonl")
    for name, src in sources.items():
        out = tmp_path / f"out_{name.replace(' ', '_').replace(':', '_')}"
        code, err = run(["--text", src, "--code", root / "code.jsonl", "--vocab_size", "300", "--out", out,
                         "--quiet"], capsys)
        assert code == 0, (name, err)
        assert outputs(out) == ref, name  # tokenizer.json and all four token files, byte for byte
        meta = json.loads((out / "meta.json").read_text())
        assert meta["duplicates"]["text"]["documents"] == 12 and meta["duplicates"]["code"]["documents"] == 1


def test_text_field_is_selectable(reference, tmp_path, capsys):
    datasets = pytest.importorskip("datasets")
    root, docs, ref = reference
    datasets.Dataset.from_dict({"body": docs, "text": ["x"] * len(docs)}).to_parquet(str(tmp_path / "p" / "a.parquet"))
    code, err = run(["--text", f"hf:{tmp_path / 'p'}", "--text_field", "body", "--code", root / "code.jsonl",
                     "--vocab_size", "300", "--out", tmp_path / "out", "--quiet"], capsys)
    assert code == 0, err
    assert outputs(tmp_path / "out") == ref
    datasets.Dataset.from_dict({"body": docs}).to_parquet(str(tmp_path / "q" / "a.parquet"))
    code, err = run(["--text", f"hf:{tmp_path / 'q'}", "--code", root / "code.jsonl", "--out", tmp_path / "out2"],
                    capsys)
    assert code == 2 and err.strip().splitlines()[-1].startswith("error: ") and "'text' or 'content'" in err


def test_code_records_use_content_or_code(reference, tmp_path, capsys):
    datasets = pytest.importorskip("datasets")
    root, docs, ref = reference
    datasets.Dataset.from_dict({"code": CODE, "lang": ["py"] * len(CODE)}).to_parquet(str(tmp_path / "c" / "a.parquet"))
    code, err = run(["--text", root / "docs.jsonl", "--code", f"hf:{tmp_path / 'c'}", "--vocab_size", "300",
                     "--out", tmp_path / "out", "--quiet"], capsys)
    assert code == 0, err
    assert outputs(tmp_path / "out") == ref


def test_the_hub_is_read_with_the_librarys_streaming_call(reference, tmp_path, capsys, monkeypatch):
    datasets = pytest.importorskip("datasets")
    root, docs, ref = reference
    calls = []

    def load_dataset(*args, **kwargs):  # stands in for the hub, which these machines cannot reach
        calls.append((args, kwargs))
        return datasets.Dataset.from_dict({"text": docs}).to_iterable_dataset()

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    code, err = run(["--text", "hf:someone/prose:en:validation", "--code", root / "code.jsonl", "--vocab_size", "300",
                     "--out", tmp_path / "out", "--quiet"], capsys)
    assert code == 0, err
    assert calls[0] == (("someone/prose",), {"name": "en", "split": "validation", "streaming": True})
    assert outputs(tmp_path / "out") == ref
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["sources"][0]["kind"] == "dataset" and meta["sources"][0]["path"] == "hf:someone/prose:en:validation"


def test_an_unreachable_hub_is_one_line(tmp_path):
    pytest.importorskip("datasets")
    proc = subprocess.run([sys.executable, "-m", "mm_rec.scripts.prepare_data", "--text", "hf:no-such-owner/no-such-set",
                           "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1"))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[-1].startswith("error: cannot open hf:no-such-owner/no-such-set: "), proc.stderr


def test_without_datasets_one_line_says_how_to_install(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    (tmp_path / "a.csv").write_text("text\nhello\n")
    for src in ("hf:someone/prose", str(tmp_path / "a.csv")):
        code, err = run(["--text", src, "--out", tmp_path / "out"], capsys)
        assert code == 2 and "Traceback" not in err
        assert err.strip().splitlines()[-1].endswith('needs the Hugging Face datasets library: pip install "mm-rec[hf]"')


@pytest.mark.parametrize("spec", ["hf:", "hf:a:b:c:d"])
def test_a_malformed_spec_is_one_line(tmp_path, capsys, spec):
    code, err = run(["--text", spec, "--out", tmp_path / "out"], capsys)
    assert code == 2 and "hf:NAME, hf:NAME:CONFIG or hf:NAME:CONFIG:SPLIT" in err.strip().splitlines()[-1]
