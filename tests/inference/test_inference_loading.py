"""Loading what a user points at: the guide's §9.3 export keeps a trained fusion layer on, and every
field read from a checkpoint or export is checked before use (one line naming file and field)."""
import contextlib
import io
import json

import pytest
import torch

from mm_rec.data.tokenizer import train_tokenizer
from mm_rec.inference.export import save_pretrained
from mm_rec.inference.loading import load_model
from mm_rec.model import MMRec100M
from mm_rec.scripts import evaluate as evaluate_cli
from mm_rec.scripts import export as export_cli
from mm_rec.scripts import generate as generate_cli
from mm_rec.training.checkpoint import load_checkpoint, save_checkpoint
from mm_rec.utils.errors import UserError, run_cli

GUIDE_KEYS = dict(vocab_size=300, expert_dim=16, num_layers=2, num_heads=2, ffn_dim=32)  # §9.3's five keys


def trained_model(fusion_method="concatenate"):
    """A model as Stage 3 leaves it: the fusion layer trained away from the identity, and on."""
    torch.manual_seed(0)
    model = MMRec100M(**GUIDE_KEYS, init_std=0.1, fusion_method=fusion_method)
    with torch.no_grad():
        for p in model.fusion.parameters():
            p.add_(0.2 * torch.randn_like(p))
    model.use_fusion = True
    return model.eval()


def tokenizer():
    return train_tokenizer(["The whale surfaced near the ship. def f(x): return x"] * 20, vocab_size=300)


def run(cli, argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = run_cli(cli.main, argv)
    return code, out.getvalue(), err.getvalue()


def one_line_error(code, err):
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


# -- 26.3: the guide's export keeps the model ------------------------------------------------------


def test_guide_export_round_trip_keeps_the_logits(tmp_path):
    model = trained_model()
    x = torch.randint(0, 300, (2, 23), generator=torch.Generator().manual_seed(1))
    reference = model(x)
    # Exactly the guide's §9.3 line: the state dict and five config keys, nothing about fusion.
    path = tmp_path / "mmrec_100m_final.pt"
    torch.save({"model_state_dict": model.state_dict(), "config": dict(GUIDE_KEYS)}, path)

    loaded = MMRec100M.from_pretrained(path)
    assert loaded.use_fusion
    torch.testing.assert_close(loaded(x), reference, rtol=0, atol=1e-6)
    off = model.use_fusion
    model.use_fusion = False
    assert (model(x) - reference).abs().max() > 0.1  # what loading it with fusion off gave before
    model.use_fusion = off

    # Exported again by our CLI, the state survives as config.json's use_fusion.
    code, out, err = run(export_cli, ["--checkpoint", str(path), "--out", str(tmp_path / "e"), "--format", "both"])
    assert code == 0 and "fusion on" in out, err
    assert json.loads((tmp_path / "e" / "config.json").read_text())["use_fusion"] is True
    for again in (tmp_path / "e", tmp_path / "e" / "mmrec_100m_final.pt"):
        torch.testing.assert_close(MMRec100M.from_pretrained(again)(x), reference, rtol=0, atol=1e-6)


def test_hand_written_config_json_without_use_fusion_detects_the_trained_layer(tmp_path):
    model = trained_model("weighted")
    save_pretrained(model, tmp_path / "e")
    (tmp_path / "e" / "config.json").write_text(json.dumps({**GUIDE_KEYS, "fusion_method": "weighted"}))
    x = torch.randint(0, 300, (1, 17))
    torch.testing.assert_close(MMRec100M.from_pretrained(tmp_path / "e")(x), model(x), rtol=0, atol=1e-6)


def test_an_identity_fusion_layer_is_left_off():
    from mm_rec.inference.loading import fusion_is_trained
    model = MMRec100M(**GUIDE_KEYS, fusion_method="weighted")
    assert not fusion_is_trained(model.state_dict())
    with torch.no_grad():
        model.fusion.gate.bias[3] = 1e-3
    assert fusion_is_trained(model.state_dict())


# -- 25.3 / 25.2: every field checked --------------------------------------------------------------


@pytest.fixture
def export_dir(tmp_path):
    save_pretrained(trained_model(), tmp_path / "e", tokenizer())
    return tmp_path / "e"


@pytest.mark.parametrize("field,value,words", [
    ("vocab_size", 2 ** 40, "vocab_size (1099511627776) does not match the weights"),
    ("vocab_size", -5, "vocab_size must be a positive integer"),
    ("vocab_size", "300", "vocab_size must be a positive integer"),
    ("vocab_size", 300.5, "vocab_size must be a positive integer"),
    ("vocab_size", True, "vocab_size must be a positive integer"),
    ("expert_dim", 32, "expert_dim (32)"),
    ("ffn_dim", 64, "ffn_dim (64) does not match"),
    ("num_layers", 3, "num_layers (3) does not match the weights (2 layers)"),
    ("num_layers", 2 ** 40, "num_layers (1099511627776) does not match"),
    ("num_heads", 3, "divisible by num_heads"),
    ("norm_eps", float("nan"), "norm_eps must be a finite number"),
    ("use_fusion", "yes", "use_fusion must be true or false"),
    ("expert_names", "text", "expert_names must be a list"),
    ("expert_names", [f"e{i}" for i in range(10 ** 5)], "expert_names ['e0', 'e1'"),
])
def test_bad_export_config_is_one_line_naming_file_and_field(export_dir, field, value, words):
    config = json.loads((export_dir / "config.json").read_text())
    (export_dir / "config.json").write_text(json.dumps({**config, field: value}))
    with pytest.raises(UserError, match="config.json") as info:
        load_model(export_dir)
    assert words in str(info.value)
    err = one_line_error(*run(generate_cli, ["--checkpoint", str(export_dir), "--prompt", "x", "--device", "cpu"])[::2])
    assert words in err


def _nan_checkpoint(tmp_path, name="experts.code.blocks.1.ffn_out.weight"):
    model = trained_model()
    state = model.state_dict()
    assert name in state
    state[name] = state[name].clone()
    state[name][0, 0] = float("nan")
    path = tmp_path / "checkpoint_stage3_step_7.pt"
    save_checkpoint({"model_state_dict": state, "step": 7, "stage": "stage3", "config": model.config.to_dict(),
                     "train_args": {"seq_len": 8}, "tokenizer": tokenizer().to_json()}, path)
    return path, name


def test_non_finite_weights_are_refused_by_generate_evaluate_export(tmp_path):
    path, name = _nan_checkpoint(tmp_path)
    (tmp_path / "t.txt").write_text("The whale surfaced near the ship. " * 5)
    for cli, extra in ((generate_cli, ["--prompt", "The", "--max_new_tokens", "2"]),
                       (evaluate_cli, ["--text", str(tmp_path / "t.txt"), "--quiet"]),
                       (export_cli, ["--out", str(tmp_path / "out")])):
        code, out, err = run(cli, ["--checkpoint", str(path), *extra] + (["--device", "cpu"] if cli is not export_cli else []))
        one_line_error(code, err)
        assert str(path) in err and name in err and "non-finite" in err and out == ""
    # an export directory holding inf
    model = trained_model()
    with torch.no_grad():
        model.lm_head.weight[2, 1] = float("inf")
    save_pretrained(model, tmp_path / "inf")
    with pytest.raises(UserError, match=r"model.safetensors holds non-finite weights .*lm_head.weight"):
        load_model(tmp_path / "inf")


def test_damaged_checkpoint_fields_and_the_hint_names_no_foreign_flag(tmp_path):
    model = trained_model()
    good = {"model_state_dict": model.state_dict(), "config": model.config.to_dict(), "stage": "stage3", "step": 3}
    for field, value in (("step", "3"), ("tokenizer", 5), ("train_args", [1]), ("stage", 3)):
        path = tmp_path / f"bad_{field}.pt"
        torch.save({**good, field: value}, path)
        with pytest.raises(UserError, match=f"field '{field}'"):
            load_model(path)
    torch.save({**good, "model_state_dict": {"embedding.weight": "not a tensor"}}, tmp_path / "x.pt")
    with pytest.raises(UserError, match="not a tensor"):
        load_model(tmp_path / "x.pt")
    # A corrupt file: the inference tools do not suggest --resume_from, a flag they do not have ...
    (tmp_path / "broken.pt").write_bytes(b"PK\x03\x04 not really a zip")
    for cli, extra in ((generate_cli, ["--prompt", "x"]), (evaluate_cli, ["--text", str(tmp_path / "broken.pt")]),
                       (export_cli, ["--out", str(tmp_path / "o")])):
        err = one_line_error(*run(cli, ["--checkpoint", str(tmp_path / "broken.pt"), *extra])[::2])
        assert "corrupt" in err and "--resume_from" not in err and "--checkpoint" in err
    # ... while the trainer's loader keeps its hint.
    with pytest.raises(UserError, match="--resume_from"):
        load_checkpoint(tmp_path / "broken.pt")
