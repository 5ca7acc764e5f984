"""lm-evaluation-harness on the exported directory: `--model hf` with trust_remote_code, tasks
defined from local files (dataset_path: json), loglikelihood and generate_until requests, checked
against mm_rec's own scoring (evaluation.stream_loss) and generation. Skipped without lm_eval
(pip install 'mm-rec[lm-eval]')."""
import json

import pytest
import torch

pytest.importorskip("transformers")
lm_eval = pytest.importorskip("lm_eval")

from lm_eval.tasks import TaskManager  # noqa: E402

from mm_rec.hf.export import save_hf  # noqa: E402
from mm_rec.inference.evaluation import stream_loss  # noqa: E402
from mm_rec.data.tokenizer import train_tokenizer  # noqa: E402
from mm_rec.model import MMRec100M, MMRecConfig  # noqa: E402

VOCAB = 300
TEXTS = ["def f(x):\n    return x + 1\n", "Call me Ishmael. Some years ago, never mind how long.",
         "the quick brown fox jumps over the lazy dog\n"] * 10
STARTS = ["Call me", "def f(", "the quick brown", "Some years ago,", "return x", "the lazy",
          "never mind how", "jumps over", "def", "Ishmael."]
CHOICES = [" Ishmael", " fox", " x + 1", " long", " dog"]


def write_tasks(tmp_path):
    mc = [{"question": STARTS[i % 10] + ("" if i < 10 else " the"), "choices": CHOICES[i % 2:i % 2 + 3],
           "answer": i % 3} for i in range(20)]
    gen = [{"prompt": STARTS[i % 10] + ("" if i < 10 else " a"), "target": "x"} for i in range(20)]
    for name, rows in (("mc", mc), ("gen", gen)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "mmrec_local_mc.yaml").write_text(f"""task: mmrec_local_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {tmp_path / 'mc.jsonl'}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
""")
    (tmp_path / "mmrec_local_gen.yaml").write_text(f"""task: mmrec_local_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {tmp_path / 'gen.jsonl'}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{target}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 8
  do_sample: false
metric_list:
  - metric: exact_match
""")


def reference_loglikelihood(model, tok, context: str, continuation: str) -> float:
    """log p(continuation | EOT + context) from mm_rec's evaluate code: the summed cross-entropy of
    the whole stream minus that of its context part. Split as lm-eval splits (trailing spaces of
    the context go to the continuation; the continuation's tokens are the whole's after the context's)."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    ctx = [tok.eot_id] + tok.encode(context)
    whole = [tok.eot_id] + tok.encode(context + continuation)
    nats_whole, _ = stream_loss(model, torch.tensor(whole), None, seq_len=4096)
    nats_ctx, _ = stream_loss(model, torch.tensor(whole[:len(ctx)]), None, seq_len=4096)
    return -(nats_whole - nats_ctx)


@pytest.fixture
def one_thread():
    """A tiny model's ops are far faster on one thread than fought over by several (a loaded CPU)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_lm_eval_matches_mm_rec(one_thread, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets_cache"))
    torch.manual_seed(1)
    model = MMRec100M(config=MMRecConfig(vocab_size=VOCAB, expert_dim=32, num_layers=2, num_heads=2, ffn_dim=64,
                                         init_std=0.1)).eval()
    model.use_fusion = True
    with torch.no_grad():
        for p in model.fusion.parameters():
            p.add_(0.1 * torch.randn_like(p))
    tok = train_tokenizer(TEXTS, vocab_size=VOCAB)
    save_hf(model, tmp_path / "model", tok)
    write_tasks(tmp_path)

    results = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={tmp_path / 'model'},trust_remote_code=True,dtype=float32",
        tasks=["mmrec_local_mc", "mmrec_local_gen"], task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False),
        batch_size=4, device="cpu", log_samples=True)
    mc, gen = results["samples"]["mmrec_local_mc"], results["samples"]["mmrec_local_gen"]
    assert len(mc) == len(gen) == 20

    for sample in mc:  # loglikelihood requests: one per choice
        for (context, continuation), resp in zip(sample["arguments"], sample["resps"]):
            ll = resp[0][0]
            assert ll == pytest.approx(reference_loglikelihood(model, tok, context, continuation), abs=1e-4)

    for sample in gen:  # generate_until: greedy, cut at the first "\n" or end-of-text
        context = sample["arguments"][0][0]
        ids = [tok.eot_id] + tok.encode(context)
        out = model.generate(torch.tensor([ids]), 8, temperature=0, stop_at_eot=True, eot_id=tok.eot_id)[0]
        new = out[len(ids):].tolist()
        new = new[:new.index(tok.eot_id)] if tok.eot_id in new else new
        assert sample["resps"][0][0] == tok.decode(new).split("\n")[0]
