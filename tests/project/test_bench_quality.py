"""benchmarks/bench_quality.py: its pieces against direct computations, and its CPU smoke run."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import bench_quality as bq
from mm_rec.model import PRESETS, MMRec100M, MMRecConfig

ROOT = Path(__file__).resolve().parents[2]


def test_mqar_answers_are_the_values_paired_earlier():
    g = torch.Generator().manual_seed(0)
    vocab, pairs, seq_len = 64, 8, 48
    x, y = bq.mqar_batch(5, seq_len, pairs, vocab, g)
    assert x.shape == y.shape == (5, seq_len)
    for row_x, row_y in zip(x.tolist(), y.tolist()):
        kv = dict(zip(row_x[0:2 * pairs:2], row_x[1:2 * pairs:2]))
        assert len(kv) == pairs  # distinct keys
        assert all(1 <= k < vocab // 2 <= v < vocab for k, v in kv.items())  # disjoint ranges
        assert all(t == -100 for t in row_y[:2 * pairs])  # no loss on the pairs themselves
        answers = [(p, t) for p, t in enumerate(row_y) if t != -100]
        assert len(answers) == pairs and sorted(row_x[p] for p, _ in answers) == sorted(kv)  # each key asked once
        assert all(kv[row_x[p]] == t for p, t in answers)
        asked = {p for p, _ in answers}
        assert all(tok == 0 for p, tok in enumerate(row_x) if p >= 2 * pairs and p not in asked)
    with pytest.raises(ValueError):
        bq.mqar_batch(1, 4 * pairs - 1, pairs, vocab, g)


def test_mqar_mixture_holds_each_tested_task_and_easier_ones_that_fit():
    assert bq.mqar_tasks(64, [4, 16]) == [(64, 4), (32, 2), (16, 1), (64, 16), (32, 8), (16, 4)]
    assert bq.mqar_tasks(60, [16]) == []  # 16 pairs need 64 tokens, 8 need 32, 4 need 16: none fits
    assert bq.mqar_tasks(1024, [256]) == [(1024, 256), (512, 128), (256, 64)]
    for seq_len, pairs in bq.mqar_tasks(100, [3, 25]):
        bq.mqar_batch(1, seq_len, pairs, 128, torch.Generator())  # each one makes a valid batch


def test_position_bucket_means_equal_a_direct_computation():
    torch.manual_seed(0)
    rows = [torch.rand(n) for n in (100, 37, 64, 5)]
    buckets = bq.position_buckets(8, 100)
    assert buckets == [(0, 8), (8, 16), (16, 32), (32, 64), (64, 100)]
    for (lo, hi), got in zip(buckets, bq.bucket_means(rows, buckets)):
        values = [float(r[p]) for r in rows for p in range(lo, min(hi, r.numel()))]
        assert got["tokens"] == len(values)
        assert got["loss"] == pytest.approx(sum(values) / len(values), rel=1e-12)
    assert bq.bucket_means(rows, [(200, 300)])[0] == {"from": 200, "to": 300, "tokens": 0, "loss": None}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from mm_rec.data.corpus import ensure_default_corpus
    from mm_rec.data.tokenizer import Tokenizer
    return Tokenizer.load(ensure_default_corpus(512, cache_dir=tmp_path_factory.mktemp("cache"), verbose=False,
                                                prose_max_bytes=60_000, code_max_bytes=300_000))


def test_bits_per_byte_is_the_nats_over_the_decoded_bytes(tokenizer):
    """bpb = mean nats x tokens / (UTF-8 bytes of the text the tokens decode to x ln 2)."""
    from mm_rec.inference.evaluation import stream_loss, token_byte_lengths
    assert bq.bits_per_byte(2.0 * 10, 25) == pytest.approx(20 / (25 * math.log(2)))
    text = "def f(x):\n    return x * 2  # doubled, naïvely\nThe pass key is 12345.\n"
    tokens = torch.tensor(tokenizer.encode(text))
    torch.manual_seed(0)
    model = MMRec100M(config=MMRecConfig(vocab_size=512, expert_dim=16, num_layers=1, num_heads=2, ffn_dim=32))
    got = bq.score_heldout(model, tokens, token_byte_lengths(tokenizer), None, 8, "cpu")
    nats, count = stream_loss(model, tokens, None, 8, "cpu")
    n_bytes = len(tokenizer.decode(tokens[1:].tolist()).encode("utf-8"))
    assert count == got["tokens"] == tokens.numel() - 1
    assert got["loss"] == pytest.approx(nats / count, rel=1e-6)
    assert got["bpb"] == pytest.approx(nats / (n_bytes * math.log(2)), rel=1e-6)


def test_the_transformer_has_mmrec_s_parameter_count_at_the_100m_preset():
    config = MMRecConfig(**PRESETS["100m"])
    mmrec = bq.count_params(lambda c: MMRec100M(config=c), config)
    t_config, build = bq.model_for("transformer", config, head_dim=64)
    assert t_config.num_heads == 4
    transformer = bq.count_params(build, t_config)
    assert abs(transformer - mmrec) / mmrec < 0.01, (mmrec, transformer)


def _run(model, seed, times_and_losses):
    point = lambda t, loss: {"stage": "stage1", "step": int(t), "tokens": int(t) * 100, "gpu_seconds": t,
                             "validation": {"text": {"loss": loss, "bpb": loss / 2}},
                             "heldout": {"text": {"loss": loss + 1, "bpb": (loss + 1) / 2}}}
    return {"name": f"{model}_seed{seed}", "model": model, "seed": seed, "params": 1,
            "gpu_seconds": times_and_losses[-1][0], "points": [point(t, v) for t, v in times_and_losses]}


def test_equal_time_interpolates_between_points_and_says_when_nothing_was_measured_yet():
    fast = _run("mmrec", 1, [(2.0, 5.0), (4.0, 4.0)])
    slow = _run("transformer", 1, [(1.0, 6.0), (3.0, 5.0), (8.0, 3.0)])
    rows = {r["model"]: r for r in bq.build_report([fast, slow])["equal_time"]}
    assert rows["mmrec"]["validation_text"] == 4.0 and rows["mmrec"]["gpu_seconds"] == 4.0
    assert rows["transformer"]["validation_text"] == pytest.approx(5.0 - 2.0 * (1.0 / 5.0))
    assert rows["transformer"]["heldout_text"] == pytest.approx(6.0 - 2.0 * (1.0 / 5.0))
    late = _run("transformer", 1, [(5.0, 6.0), (8.0, 3.0)])  # its first evaluation after the other's whole run
    rows = {r["model"]: r for r in bq.build_report([fast, late])["equal_time"]}
    assert rows["transformer"]["validation_text"] is None and rows["transformer"]["how"].startswith("not measured")
    assert rows["mmrec"]["validation_text"] == 4.0


def test_help_runs_without_a_gpu():
    r = subprocess.run([sys.executable, "benchmarks/bench_quality.py", "--help"], cwd=ROOT, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    assert "--smoke" in r.stdout and "H200" in r.stdout


def test_smoke_run_writes_every_part_for_both_models(tmp_path):
    out = tmp_path / "results.json"
    r = subprocess.run([sys.executable, "benchmarks/bench_quality.py", "--smoke", "--device", "cpu", "--out",
                        str(tmp_path / "runs"), "--json", str(out)], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads(out.read_text())
    lm = results["lm"]
    assert set(lm["params"]) == set(bq.KINDS)
    keys = {f"{w}_{d}{s}" for w in ("validation", "heldout") for d in ("text", "code") for s in ("", "_bpb")}
    for kind in bq.KINDS:
        rows = [row for row in lm["equal_tokens"] if row["model"] == kind]
        assert len(rows) >= 3 and len({row["tokens"] for row in rows}) == len(rows)
        assert all(keys <= set(row) and all(math.isfinite(row[k]) for k in keys) for row in rows)
        assert lm["seeds"][kind]["heldout_text"]["n"] == 2
        assert all(math.isfinite(v["mean"]) and v["spread"] >= 0 for v in lm["seeds"][kind].values())
    hows = [row["how"] for row in lm["equal_time"]]
    assert len(hows) == 3 and any("scaled" in h for h in hows)
    for row in lm["equal_time"]:  # a loss wherever one was measured by then, and the reason where none was
        measured = not row["how"].startswith("not measured")
        assert (row["heldout_code"] is not None and math.isfinite(row["heldout_code"])) == measured, row
    assert any("scaled" in row["how"] and math.isfinite(row["heldout_code"]) for row in lm["equal_time"])
    position = results["position"]
    modes = {(row["model"], row["mode"]) for row in position["rows"]}
    assert modes == {("mmrec", "whole"), ("mmrec", "carried"), ("transformer", "fresh")}
    for row in position["rows"]:
        for b in row["buckets"]:
            beyond = row["model"] == "transformer" and b["from"] >= position["trained_len"]
            assert (b["loss"] is None) == beyond and (beyond == ("note" in b))
            assert beyond or math.isfinite(b["loss"])
    whole, carried = ([row for row in position["rows"] if row["model"] == "mmrec" and row["domain"] == "text"
                       and row["mode"] == m][0] for m in ("whole", "carried"))
    for a, b in zip(whole["buckets"], carried["buckets"]):  # the state carried across windows loses nothing
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
    assert set(results["mqar"]["best"]) == set(bq.MQAR_KINDS)
    assert all(0 <= a <= 1 for accs in results["mqar"]["best"].values() for a in accs.values())
    assert {row["model"] for row in results["passkey"]["rows"]} == set(bq.KINDS)
    assert all(row["prompt_tokens"] <= 1.1 * row["length"] for row in results["passkey"]["rows"])


def test_short_conv_variant_matches_an_explicit_causal_convolution():
    from benchmarks.baselines import mmrec_shortconv as sc
    torch.manual_seed(0)
    B, T, d, K = 2, 7, 6, sc.KERNEL
    x, w = torch.randn(B * T, d, dtype=torch.float64), torch.randn(d, 1, K, dtype=torch.float64)
    seq = x.reshape(B, T, d)
    want = torch.zeros(B, T, d, dtype=torch.float64)
    for t in range(T):
        for j in range(K):  # tap j reads token t - (K - 1) + j; before the sequence, zeros
            if t - (K - 1) + j >= 0:
                want[:, t] += w[:, 0, j] * seq[:, t - (K - 1) + j]
    got = sc.causal_depthwise_conv(x, w, B, T)
    torch.testing.assert_close(got, torch.nn.functional.silu(want).reshape(B * T, d))


def test_short_conv_variant_is_causal_and_trains_its_convolutions():
    from benchmarks.baselines import mmrec_shortconv as sc
    torch.manual_seed(0)
    model = sc.build(MMRecConfig(vocab_size=64, expert_dim=32, num_layers=2, num_heads=2, ffn_dim=64))
    x = torch.randint(1, 64, (2, 12))
    y = x.clone()
    y[:, 8:] = torch.randint(1, 64, (2, 4))  # the future differs
    hx, hy = model.hidden(x, expert_type="text"), model.hidden(y, expert_type="text")
    torch.testing.assert_close(hx[:, :8], hy[:, :8])
    assert not torch.allclose(hx[:, 8:], hy[:, 8:])
    hx.square().mean().backward()
    convs = [p for b in model.experts["text"].blocks for p in b.short_conv]
    assert len(convs) == 6 and all(p.grad is not None and p.grad.abs().sum() > 0 for p in convs)
    plain = MMRec100M(config=model.config)  # the same weights without the convolutions: another output
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if "short_conv" not in k})
    assert not torch.allclose(plain.hidden(x, expert_type="text"), hx)
