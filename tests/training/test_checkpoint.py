"""CheckpointWriter: a checkpoint is written in the background from a snapshot taken at save time,
so training may go on changing the weights; a failed write is reported as one line."""
from __future__ import annotations

import threading

import pytest
import torch

from mm_rec.training import checkpoint as ckpt_module
from mm_rec.training.checkpoint import CheckpointWriter, load_checkpoint, snapshot_to_cpu
from mm_rec.utils.errors import UserError

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]


@pytest.mark.parametrize("device", DEVICES)
def test_the_file_holds_the_state_at_save_time_while_training_goes_on(tmp_path, monkeypatch, device):
    model = torch.nn.Linear(3, 2).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(1, 3, device=device)).sum().backward()
    opt.step()
    expected = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    # the write waits until the training thread has changed the weights again
    changed, real_save = threading.Event(), torch.save
    monkeypatch.setattr(ckpt_module.torch, "save",
                        lambda obj, f: (changed.wait(timeout=30), real_save(obj, f))[1])
    written = []
    writer = CheckpointWriter()
    writer.save({"model_state_dict": model.state_dict(), "optimizer_state_dict": opt.state_dict(), "step": 1},
                tmp_path / "c.pt", written.append)
    assert writer.busy and written == [] and not (tmp_path / "c.pt").exists()  # save() did not wait
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    changed.set()
    writer.wait()
    assert written == [tmp_path / "c.pt"]
    state = load_checkpoint(tmp_path / "c.pt")
    for k, v in expected.items():
        assert torch.equal(state["model_state_dict"][k], v)
    assert state["model_state_dict"]["weight"].device.type == "cpu"
    assert state["optimizer_state_dict"]["state"][0]["exp_avg"].shape == (2, 3)


def test_a_failed_background_write_is_one_line_and_leaves_no_partial_file(tmp_path, monkeypatch):
    def full_disk(obj, f):
        f.write(b"PK partial")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(ckpt_module.torch, "save", full_disk)
    writer = CheckpointWriter()
    writer.save({"model_state_dict": {"w": torch.ones(2)}}, tmp_path / "c.pt")
    with pytest.raises(UserError, match=r"^no space left on device to write checkpoint .*c\.pt; free some space "
                                        r"or choose another directory; earlier checkpoints are intact$"):
        writer.wait()
    assert list(tmp_path.iterdir()) == []
    writer.check()  # reported once


def test_snapshot_copies_tensors_and_keeps_the_structure():
    t = torch.arange(4.0)
    state = {"a": [t, (t, 3)], "b": {"c": t}, "d": "text", "e": None}
    snap = snapshot_to_cpu(state)
    t.add_(10)
    assert torch.equal(snap["a"][0], torch.arange(4.0)) and snap["a"][0].data_ptr() != t.data_ptr()
    assert isinstance(snap["a"][1], tuple) and snap["a"][1][1] == 3
    assert snap["d"] == "text" and snap["e"] is None


def test_prune_never_takes_a_resumed_runs_new_checkpoint_for_higher_numbered_ones(tmp_path):
    """A run resumed from step 2 in a directory holding another trajectory's steps 4..20 saves step
    3: pruning counts only steps up to the one just saved, so step 3 stays."""
    from mm_rec.training.checkpoint import prune_checkpoints
    for step in (2, 3, *range(4, 21, 2)):
        (tmp_path / f"checkpoint_stage1_step_{step}.pt").write_bytes(b"x")
    prune_checkpoints(tmp_path, "stage1", keep_last=1, upto_step=3)
    names = sorted(int(p.name.split("_")[-1][:-3]) for p in tmp_path.iterdir())
    assert names == [3, *range(4, 21, 2)]  # step 2 pruned, step 3 and the other trajectory's files kept
    prune_checkpoints(tmp_path, "stage1", keep_last=2)  # without upto_step: the newest two overall
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_stage1_step_18.pt", "checkpoint_stage1_step_20.pt"]
