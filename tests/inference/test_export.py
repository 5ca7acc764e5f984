"""Export: safetensors directory and the guide's .pt file load back to identical logits."""
import contextlib
import io
import json

import pytest
import torch

from mm_rec.data.tokenizer import train_tokenizer
from mm_rec.inference.loading import load_model
from mm_rec.model import MMRec100M, MMRecConfig
from mm_rec.scripts import export as export_cli
from mm_rec.training.checkpoint import save_checkpoint
from mm_rec.utils.errors import UserError, run_cli

VOCAB = 300


def make_checkpoint(tmp_path, stage="stage3", tokenizer=True, **overrides):
    torch.manual_seed(0)
    config = MMRecConfig(**{**dict(vocab_size=VOCAB, expert_dim=16, num_layers=2, num_heads=2, ffn_dim=32,
                                   init_std=0.1), **overrides})
    model = MMRec100M(config=config)
    with torch.no_grad():  # a trained fusion layer is not the identity
        for p in model.fusion.parameters():
            p.add_(0.1 * torch.randn_like(p))
    tok = train_tokenizer(["def f(x):\n    return x + 1\n", "Call me Ishmael."] * 10, vocab_size=VOCAB)
    path = tmp_path / "ckpt" / f"checkpoint_{stage}_step_5.pt"
    save_checkpoint({"model_state_dict": model.state_dict(), "optimizer_state_dict": {}, "scheduler_state_dict": {},
                     "step": 5, "loss": 3.0, "stage": stage, "config": config.to_dict(),
                     "tokenizer": tok.to_json() if tokenizer else None}, path)
    return path, model, tok


def _export(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = run_cli(export_cli.main, argv)
    return code, out.getvalue(), err.getvalue()


def test_export_then_from_pretrained_gives_identical_logits(tmp_path):
    path, model, tok = make_checkpoint(tmp_path, stage="stage3")
    code, _, err = _export(["--checkpoint", str(path), "--out", str(tmp_path / "export")])
    assert code == 0, err
    out = tmp_path / "export"
    assert {p.name for p in out.iterdir()} == {"model.safetensors", "config.json", "tokenizer.json"}
    config = json.loads((out / "config.json").read_text())
    assert config["use_fusion"] is True and config["expert_dim"] == 16  # stage 3 runs with fusion on

    loaded = MMRec100M.from_pretrained(out)
    assert loaded.use_fusion and not loaded.training
    model.use_fusion = True
    x = torch.randint(0, VOCAB, (2, 11))
    for expert in (None, "text", "code"):
        assert torch.equal(loaded(x, expert_type=expert), model.eval()(x, expert_type=expert))
    assert load_model(out).tokenizer.sha256 == tok.sha256


def test_stage1_export_keeps_fusion_off(tmp_path):
    path, model, _ = make_checkpoint(tmp_path, stage="stage1")
    _export(["--checkpoint", str(path), "--out", str(tmp_path / "e")])
    loaded = MMRec100M.from_pretrained(tmp_path / "e")
    assert not loaded.use_fusion
    x = torch.randint(0, VOCAB, (1, 7))
    assert torch.equal(loaded(x), model.eval()(x))


def test_guide_pt_format(tmp_path):
    path, model, _ = make_checkpoint(tmp_path, stage="stage3")
    code, stdout, _ = _export(["--checkpoint", str(path), "--out", str(tmp_path / "e"), "--format", "pt"])
    assert code == 0 and "mmrec_100m_final.pt" in stdout
    state = torch.load(tmp_path / "e" / "mmrec_100m_final.pt", weights_only=True)
    assert {"model_state_dict", "config"} <= set(state)
    for key in ("vocab_size", "expert_dim", "num_layers", "num_heads", "ffn_dim"):  # the guide's §9.3 keys
        assert state["config"][key] == getattr(model.config, key)
    # The guide's way to load it back.
    again = MMRec100M(**{k: state["config"][k] for k in ("vocab_size", "expert_dim", "num_layers", "num_heads",
                                                           "ffn_dim")}, init_std=0.1)
    again.load_state_dict(state["model_state_dict"])
    again.use_fusion = True
    model.use_fusion = True
    x = torch.randint(0, VOCAB, (1, 9))
    assert torch.equal(again.eval()(x), model.eval()(x))
    # ...and ours, which also finds the tokenizer stored inside.
    assert torch.equal(MMRec100M.from_pretrained(tmp_path / "e" / "mmrec_100m_final.pt")(x), model(x))


def test_save_pretrained_round_trip_in_bfloat16(tmp_path):
    _, model, tok = make_checkpoint(tmp_path)
    model.save_pretrained(tmp_path / "fp32", tokenizer=tok)
    x = torch.randint(0, VOCAB, (1, 5))
    assert torch.equal(MMRec100M.from_pretrained(tmp_path / "fp32")(x), model.eval()(x))
    # --dtype bfloat16 stores half the bytes; from_pretrained(dtype=...) casts on load.
    code, _, _ = _export(["--checkpoint", str(tmp_path / "fp32"), "--out", str(tmp_path / "bf16"), "--dtype", "bfloat16"])
    assert code == 0
    size = lambda d: (tmp_path / d / "model.safetensors").stat().st_size
    assert size("bf16") < 0.6 * size("fp32")
    loaded = MMRec100M.from_pretrained(tmp_path / "bf16", dtype=torch.float32)
    assert torch.equal(loaded.embedding.weight, model.embedding.weight.bfloat16().float())
    assert MMRec100M.from_pretrained(tmp_path / "bf16").embedding.weight.dtype == torch.float32  # as built


def test_export_errors(tmp_path):
    code, _, err = _export(["--checkpoint", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "o")])
    assert code == 2 and err.startswith("error: checkpoint not found") and not (tmp_path / "o").exists()
    (tmp_path / "broken.pt").write_bytes(b"not a checkpoint")
    code, _, err = _export(["--checkpoint", str(tmp_path / "broken.pt"), "--out", str(tmp_path / "o")])
    assert code == 2 and "corrupt" in err
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="model.safetensors"):
        MMRec100M.from_pretrained(tmp_path / "empty")
    # Weights that do not fit the config are refused with one line, not a shape dump.
    path, _, _ = make_checkpoint(tmp_path)
    _export(["--checkpoint", str(path), "--out", str(tmp_path / "e")])
    config = json.loads((tmp_path / "e" / "config.json").read_text())
    (tmp_path / "e" / "config.json").write_text(json.dumps({**config, "ffn_dim": 64}))
    with pytest.raises(UserError, match="cannot be loaded"):
        MMRec100M.from_pretrained(tmp_path / "e")
    # A checkpoint without a tokenizer exports with a warning and no tokenizer.json.
    path, _, _ = make_checkpoint(tmp_path / "nt", tokenizer=False)
    code, _, err = _export(["--checkpoint", str(path), "--out", str(tmp_path / "nt_out")])
    assert code == 0 and "warning" in err and not (tmp_path / "nt_out" / "tokenizer.json").exists()
