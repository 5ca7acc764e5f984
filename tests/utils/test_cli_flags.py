"""Every CLI refuses abbreviated and unknown flags in one line (argparse would take `--lr` for
`--lr_scale` and train at a thousandth of the learning rate), and the shared file writer follows
the umask and leaves nothing behind on a full disk."""
from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest

from mm_rec.utils.errors import UserError, run_cli

PARSERS = ["mm_rec.training.config", "mm_rec.scripts.prepare_data", "mm_rec.scripts.build_corpus",
           "mm_rec.scripts.evaluate", "mm_rec.scripts.generate", "mm_rec.scripts.export", "mm_rec.scripts.serve"]


@pytest.mark.parametrize("module", PARSERS)
def test_every_parser_refuses_a_prefix_of_each_of_its_flags(module):
    parser = importlib.import_module(module).build_parser()
    flags = sorted({s for a in parser._actions for s in a.option_strings if s.startswith("--") and s != "--help"})
    assert flags
    required = [a.option_strings[0] for a in parser._actions if a.required]
    for flag in flags:
        prefix = flag[:-1]
        if any(f == prefix for f in flags):  # the prefix is itself a flag (none today)
            continue
        argv = [arg for r in required if r != flag for arg in (r, "x")] + [prefix, "1"]
        with pytest.raises(UserError) as refused:
            parser.parse_args(argv)
        # refused as unknown (or, for a required flag, as missing): never taken for the flag
        assert f"unrecognized arguments: {prefix} 1" in str(refused.value) or \
            (flag in required and "required" in str(refused.value)), (flag, str(refused.value))


def test_lr_is_not_lr_scale(capsys):
    from mm_rec.scripts import train_modular
    assert run_cli(train_modular.main, ["--lr", "1e-3", "--synthetic"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: unrecognized arguments: --lr 1e-3")
    assert "--lr_scale" in err[0]  # the hint names the flag the user probably meant


def test_atomic_write_follows_the_umask(tmp_path):
    from mm_rec.utils.fileio import atomic_write_text
    old = os.umask(0o027)
    try:
        path = atomic_write_text(tmp_path / "a.txt", "x")
    finally:
        os.umask(old)
    assert oct(path.stat().st_mode & 0o777) == oct(0o640)
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_atomic_write_on_a_full_disk_is_one_line_and_leaves_nothing(tmp_path):
    import torch
    from mm_rec.utils.fileio import atomic_write
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("mounting a tmpfs needs root")
    try:
        # torch.save to a path reports a full disk as RuntimeError("... unexpected pos ...")
        with pytest.raises(UserError, match="^no space left on device to write .*big.pt; free some space"):
            atomic_write(disk / "big.pt", lambda tmp: torch.save({"w": torch.zeros(200_000)}, tmp))
        assert list(disk.iterdir()) == []
        import shutil
        assert shutil.disk_usage(disk).free > 200_000  # the unlinked temporary's space is back
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)
