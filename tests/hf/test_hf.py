"""Hugging Face transformers: export --format hf, MMRecForCausalLM, generate() with MMRecCache.

One tiny model (random, made non-trivial: larger init, a fusion layer that is not the identity) is
exported once through the CLI; every test compares the transformers side with mm_rec's own code."""
import contextlib
import io
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

transformers = pytest.importorskip("transformers")

from safetensors import safe_open  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from mm_rec.data.tokenizer import train_tokenizer  # noqa: E402
from mm_rec.hf.cache_mmrec import MMRecCache  # noqa: E402
from mm_rec.hf.modeling_mmrec import MMRecForCausalLM  # noqa: E402
from mm_rec.model import MMRec100M, MMRecConfig  # noqa: E402
from mm_rec.scripts import export as export_cli  # noqa: E402
from mm_rec.training.checkpoint import save_checkpoint  # noqa: E402
from mm_rec.utils.errors import run_cli  # noqa: E402

VOCAB = 300
TEXTS = ["def f(x):\n    return x + 1\n", "Call me Ishmael. Some years ago, never mind how long.",
         "the quick brown fox jumps over the lazy dog\n"] * 10


def _export(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = run_cli(export_cli.main, argv)
    return code, err.getvalue()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(our model in eval mode with fusion on, our tokenizer, the hf directory, the safetensors directory)."""
    tmp = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    config = MMRecConfig(vocab_size=VOCAB, expert_dim=32, num_layers=2, num_heads=2, ffn_dim=64, init_std=0.1)
    model = MMRec100M(config=config)
    with torch.no_grad():  # a trained fusion layer is not the identity
        for p in model.fusion.parameters():
            p.add_(0.1 * torch.randn_like(p))
    tok = train_tokenizer(TEXTS, vocab_size=VOCAB)
    ckpt = tmp / "checkpoint_stage3_step_5.pt"
    save_checkpoint({"model_state_dict": model.state_dict(), "optimizer_state_dict": {}, "scheduler_state_dict": {},
                     "step": 5, "loss": 3.0, "stage": "stage3", "config": config.to_dict(),
                     "tokenizer": tok.to_json()}, ckpt)
    for fmt in ("hf", "safetensors"):
        code, err = _export(["--checkpoint", str(ckpt), "--out", str(tmp / fmt), "--format", fmt])
        assert code == 0, err
    model.use_fusion = True  # stage 3 runs with fusion on
    return model.eval(), tok, tmp / "hf", tmp / "safetensors"


@pytest.fixture(scope="module")
def hf_model(exported):
    return AutoModelForCausalLM.from_pretrained(exported[2]).eval()  # registered by `import mm_rec`


def _ids(tok, texts):
    return [[tok.eot_id] + tok.encode(t) for t in texts]


def test_export_layout_config_and_shared_weights(exported):
    model, tok, hf_dir, st_dir = exported
    config = json.loads((hf_dir / "config.json").read_text())
    assert config["model_type"] == "mmrec" and config["architectures"] == ["MMRecForCausalLM"]
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_mmrec.MMRecForCausalLM"
    assert config["use_fusion"] is True and config["eos_token_id"] == config["pad_token_id"] == tok.eot_id
    for name in ("configuration_mmrec.py", "modeling_mmrec.py", "cache_mmrec.py", "mmrec_model_mmrec.py",
                 "mmrec_ops_torch.py", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (hf_dir / name).is_file(), name
    assert not [p for p in hf_dir.iterdir() if p.name.startswith(".")]  # no staging directory left
    # the same tensors under the same names as --format safetensors: one weights file serves both
    with safe_open(hf_dir / "model.safetensors", "pt") as a, safe_open(st_dir / "model.safetensors", "pt") as b:
        assert set(a.keys()) == set(b.keys()) == set(model.state_dict())
        assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())
    # and mm_rec itself loads the Hugging Face directory
    x = torch.randint(0, VOCAB, (2, 9))
    assert torch.equal(MMRec100M.from_pretrained(hf_dir)(x), model(x))


def test_tokenizer_starts_texts_with_end_of_text(exported):
    _, tok, hf_dir, _ = exported
    hf_tok = AutoTokenizer.from_pretrained(hf_dir)
    assert isinstance(hf_tok, transformers.PreTrainedTokenizerFast)
    assert hf_tok.eos_token == hf_tok.pad_token == hf_tok.bos_token == tok.eot_token
    for text in TEXTS[:3]:
        assert hf_tok(text).input_ids == [tok.eot_id] + tok.encode(text)
        assert hf_tok.decode(hf_tok(text).input_ids, skip_special_tokens=True) == text


def test_logits_and_loss_equal_mm_rec(exported, hf_model):
    model, _, hf_dir, _ = exported
    assert isinstance(hf_model, MMRecForCausalLM)  # the class `import mm_rec` registered
    # trust_remote_code=True: transformers 5 still takes the registered class, 4 the shipped code
    remote = AutoModelForCausalLM.from_pretrained(hf_dir, trust_remote_code=True).eval()
    x = torch.randint(0, VOCAB, (2, 13))
    with torch.no_grad():
        torch.testing.assert_close(remote(x).logits, model(x), rtol=0, atol=1e-5)
    hf = hf_model
    x = torch.randint(0, VOCAB, (2, 13))
    with torch.no_grad():
        for expert in (None, "text", "code"):
            out = hf(x, expert_type=expert)
            torch.testing.assert_close(out.logits, model(x, expert_type=expert), rtol=0, atol=1e-5)
        loss = hf(x, labels=x).loss
    torch.testing.assert_close(loss, model.loss(x[:, :-1], x[:, 1:]), rtol=0, atol=1e-5)


def test_expert_type_config_field(exported):
    model, _, hf_dir, _ = exported
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, expert_type="code").eval()
    assert hf.config.expert_type == "code"
    x = torch.randint(0, VOCAB, (1, 7))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model(x, expert_type="code"), rtol=0, atol=1e-5)


def test_padded_batch_gives_each_row_its_own_logits_and_state(exported, hf_model):
    model, tok, _, _ = exported
    rows = _ids(tok, ["def f(x):", "Call me Ishmael. Some years", "the"])
    T = max(map(len, rows))
    for side in ("right", "left"):
        ids = torch.full((3, T), tok.eot_id)
        mask = torch.zeros(3, T, dtype=torch.long)
        for b, r in enumerate(rows):
            span = slice(0, len(r)) if side == "right" else slice(T - len(r), T)
            ids[b, span], mask[b, span] = torch.tensor(r), 1
        for use_cache in (False, True):
            with torch.no_grad():
                out = hf_model(ids, attention_mask=mask, use_cache=use_cache)
            for b, r in enumerate(rows):
                alone, states = model(torch.tensor([r]), return_memory=True)
                real = mask[b].bool()
                torch.testing.assert_close(out.logits[b, real], alone[0], rtol=0, atol=1e-5)
                if use_cache:  # the state after the row's own last token, not after padding
                    cache = out.past_key_values
                    for name in ("text", "code"):
                        for layer in range(2):
                            for key in ("h", "M"):
                                torch.testing.assert_close(cache.layer_state(name, layer)[key][b],
                                                           states[name][layer][key][0], rtol=0, atol=1e-5)


def test_cache_continues_the_sequence(exported, hf_model):
    model, _, _, _ = exported
    x = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        first = hf_model(x[:, :7], use_cache=True)
        cache = first.past_key_values
        assert isinstance(cache, MMRecCache) and cache.get_seq_length() == 7
        second = hf_model(x[:, 7:], past_key_values=cache, use_cache=True)
    torch.testing.assert_close(second.logits, model(x)[:, 7:], rtol=0, atol=1e-5)
    assert second.past_key_values.get_seq_length() == 12


def test_generate_equals_mm_rec_generation(exported, hf_model):
    model, tok, hf_dir, _ = exported
    hf_tok = AutoTokenizer.from_pretrained(hf_dir, padding_side="left")
    prompts = ["def f(", "Call me Ishmael. Some", "the quick"]
    batch = hf_tok(prompts, return_tensors="pt", padding=True)
    n = 12
    with torch.no_grad():
        out = hf_model.generate(**batch, max_new_tokens=n, do_sample=False)
    ours = model.generate(_ids(tok, prompts), n, temperature=0, stop_at_eot=True, eot_id=tok.eot_id)
    T = batch.input_ids.shape[1]
    for b, row in enumerate(ours):  # greedy, token for token (the batch's prompts padded on the left)
        new = row[len(_ids(tok, [prompts[b]])[0]):]
        assert out[b, T:T + len(new)].tolist() == new.tolist()
        assert (out[b, T + len(new):] == tok.eot_id).all()  # a row that stopped is padded
    # one prompt alone, and sampling with top_k=1 (only the argmax can be drawn) = greedy
    with torch.no_grad():
        single = hf_model.generate(torch.tensor(_ids(tok, prompts[:1])), max_new_tokens=n, do_sample=False)
        sampled = hf_model.generate(torch.tensor(_ids(tok, prompts[:1])), max_new_tokens=n, do_sample=True,
                                    top_k=1, temperature=0.7)
    assert single[0].tolist() == ours[0].tolist() == sampled[0].tolist()


def test_sampling_matches_mm_rec_distribution_step(exported, hf_model):
    """generate(do_sample=True) draws from the model's own next-token distribution: every token drawn
    has non-zero probability under top_k=5, and fixed seeds reproduce the draws."""
    model, tok, _, _ = exported
    prompt = torch.tensor(_ids(tok, ["Call me"]) * 2)
    runs = []
    for _ in range(2):
        torch.manual_seed(123)
        with torch.no_grad():
            runs.append(hf_model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6,
                                           do_sample=True, top_k=5, eos_token_id=None))
    assert torch.equal(runs[0], runs[1])
    seq = runs[0][0]
    with torch.no_grad():
        logits = model(seq[None, :-1])[0, prompt.shape[1] - 1:]
    top5 = logits.topk(5, dim=-1).indices
    assert all(t in top5[i] for i, t in enumerate(seq[prompt.shape[1]:].tolist()))


def test_loads_in_a_process_with_only_transformers_and_torch(exported, tmp_path):
    model, tok, hf_dir, _ = exported
    site = [p for p in sys.path if os.path.basename(p) in ("site-packages", "dist-packages")]
    script = textwrap.dedent(f"""
        import json, sys
        sys.path.extend({site!r})   # site-packages without running its .pth files (mm_rec's editable finder)
        try:
            import mm_rec
            raise SystemExit("mm_rec is importable")
        except ModuleNotFoundError:
            pass
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        model = AutoModelForCausalLM.from_pretrained({str(hf_dir)!r}, trust_remote_code=True).eval()
        tok = AutoTokenizer.from_pretrained({str(hf_dir)!r}, trust_remote_code=True)
        ids = torch.tensor([tok("Call me Ishmael.").input_ids])
        with torch.no_grad():
            logits = model(ids).logits
            out = model.generate(ids, max_new_tokens=8, do_sample=False)
        assert not any(m.startswith("mm_rec") for m in sys.modules)
        print(json.dumps({{"ids": ids.tolist(), "logits": logits.tolist(), "generated": out.tolist(),
                           "module": type(model).__module__}}))
    """)
    env = {"PATH": os.environ.get("PATH", ""), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "HF_HOME": str(tmp_path / "hf_home"),
           "HF_MODULES_CACHE": str(tmp_path / "modules")}
    done = subprocess.run([sys.executable, "-I", "-S", "-c", script], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["module"].startswith("transformers_modules")
    ids = torch.tensor(result["ids"])
    assert ids[0].tolist() == [tok.eot_id] + tok.encode("Call me Ishmael.")
    torch.testing.assert_close(torch.tensor(result["logits"]), model(ids), rtol=0, atol=1e-5)
    ours = model.generate(ids, 8, temperature=0, stop_at_eot=True, eot_id=tok.eot_id)
    assert result["generated"][0][:ours.shape[1]] == ours[0].tolist()


def test_beam_search_reorders_the_cache(exported, hf_model):
    """Beam search picks beams by score and reorders the cache between steps: the returned score of
    each sequence must be the log-probability mm_rec gives it (a state left with the wrong beam would
    not give it)."""
    model, tok, _, _ = exported
    prompt = torch.tensor(_ids(tok, ["Call me", "def f("]))
    with torch.no_grad():
        out = hf_model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=5, num_beams=3,
                                num_return_sequences=2, do_sample=False, length_penalty=0.0, eos_token_id=None,
                                output_scores=True, return_dict_in_generate=True)
        T = prompt.shape[1]
        logp = model(out.sequences[:, :-1]).log_softmax(-1)[:, T - 1:]
        ours = logp.gather(-1, out.sequences[:, T:, None]).sum((1, 2))
    assert out.sequences.shape == (4, T + 5)
    torch.testing.assert_close(out.sequences_scores, ours, rtol=0, atol=1e-4)


def _run_python(code: str, tmp_path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-W", "error::UserWarning", "-c", textwrap.dedent(code)], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=600)


def test_import_mm_rec_registers_lazily_and_needs_no_transformers(exported, tmp_path):
    hf_dir = exported[2]
    # import mm_rec does not import transformers; importing transformers later registers "mmrec"
    done = _run_python(f"""
        import sys
        import mm_rec
        assert "transformers" not in sys.modules
        from transformers import AutoConfig, AutoModelForCausalLM
        config = AutoConfig.from_pretrained({str(hf_dir)!r})
        model = AutoModelForCausalLM.from_pretrained({str(hf_dir)!r})
        assert type(model).__module__ == "mm_rec.hf.modeling_mmrec", type(model).__module__
        print(type(config).__name__)
    """, tmp_path)
    assert done.returncode == 0 and done.stdout.split()[-1] == "MMRecHFConfig", done.stderr[-2000:]
    # without transformers mm_rec imports as before, silently
    done = _run_python("""
        import sys
        sys.modules["transformers"] = None  # as if not installed
        import mm_rec
        print(mm_rec.MMRec100M.__name__)
    """, tmp_path)
    assert done.returncode == 0 and done.stdout.split() == ["MMRec100M"] and not done.stderr, done.stderr


def test_export_hf_errors_are_one_line(exported, tmp_path):
    ckpt = next(exported[2].parent.glob("*.pt"))
    (tmp_path / "taken").write_text("a file")
    code, err = _export(["--checkpoint", str(ckpt), "--out", str(tmp_path / "taken"), "--format", "hf"])
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and "is a file" in err
    assert (tmp_path / "taken").read_text() == "a file"


def test_save_pretrained_keeps_a_loadable_directory(exported, hf_model, tmp_path):
    model, _, hf_dir, _ = exported
    hf_model.save_pretrained(tmp_path / "again")
    shipped = {p.name for p in hf_dir.glob("*.py")}
    assert shipped <= {p.name for p in (tmp_path / "again").iterdir()}
    assert json.loads((tmp_path / "again" / "config.json").read_text())["auto_map"]["AutoModelForCausalLM"] == \
        "modeling_mmrec.MMRecForCausalLM"
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "again").eval()
    x = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(again(x).logits, model(x), rtol=0, atol=1e-5)
