"""The corpus builder (issue 20.2): this Python's .py files (stdlib and site-packages, no tests)
and the bundled prose plus --text_dir, prepared without the `datasets` library."""
from __future__ import annotations

import json
import sys
import sysconfig

import numpy as np

from mm_rec.data.build_corpus import corpus_sources, python_code_dirs
from mm_rec.data.loader import TokenData
from mm_rec.data.sources import list_input_files
from mm_rec.scripts import build_corpus as build_cli
from mm_rec.utils.errors import run_cli


def test_build_corpus_reads_the_python_sources_and_prose_dirs_without_datasets(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "datasets", None)  # as on the GPU machine: core dependencies only
    prose = tmp_path / "prose"
    prose.mkdir()
    (prose / "essay.md").write_text("An essay about whales and ships.\n\nIt has a second paragraph.\n")
    (prose / "table.json").write_text('{"not": "prose"}')
    out = tmp_path / "corpus"
    code = run_cli(build_cli.main, ["--out", str(out), "--text_dir", str(prose), "--max_code_bytes", "300000",
                                    "--max_tokens", "150000", "--vocab_size", "400", "--quiet",
                                    "--json", str(tmp_path / "figures.json")])
    err = capsys.readouterr().err
    assert code == 0, err
    meta = json.loads((out / "meta.json").read_text())
    dirs = [str(d) for d in python_code_dirs()]
    assert sysconfig.get_paths()["stdlib"] in dirs and sysconfig.get_paths()["purelib"] in dirs
    assert meta["recipe"]["code_dirs"] == dirs
    code_files = [f["path"] for f in meta["files"] if f["domain"] == "code"]
    assert code_files and all(p.endswith(".py") for p in code_files)
    assert not any(part in ("test", "tests") for p in code_files for part in p.split("/"))
    assert not any("/site-packages/" in p for p in code_files if p.startswith(sysconfig.get_paths()["stdlib"] + "/")
                   and not p.startswith(sysconfig.get_paths()["purelib"]))
    assert meta["recipe"]["text"][-1] == str(prose)
    text, _ = corpus_sources(text_dirs=[prose])
    assert [f.label for f in list_input_files(text[-1], "text")] == [f"{prose}/essay.md"]  # not table.json
    figures = json.loads((tmp_path / "figures.json").read_text())
    for d in ("text", "code"):
        assert figures["tokens"][d] == meta["tokens"][d]["train"] + meta["tokens"][d]["val"] > 0
    assert figures["peak_rss_mb"] > 0 and figures["tokens_per_second"] > 0
    data = TokenData(out)  # a finished, loadable dataset
    assert int(np.asarray(data.tokens("code")).max()) < data.vocab_size
    assert "tokens/s" in err.strip().splitlines()[-1]
