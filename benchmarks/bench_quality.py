"""Is MM-Rec a better model? Quality against the equal-parameter Transformer (issue 22).

Four parts, each chosen with --parts (default: lm,report,position,mqar,passkey):

  lm        trains MM-Rec and the Transformer of benchmarks/baselines/transformer.py (same width,
            depth, experts, fusion and vocab, heads of --head_dim 64, FFN widened until the
            parameter counts agree) through the project's own Trainer (`train_model`): the same
            data order, AdamW and parameter groups, warmup+cosine schedule, precision and stages;
            only the sequence mixer differs. Each stage is a run of its own (resumed from the
            previous stage's final checkpoint, as the guide's §8.2 chains them) checkpointed at
            --points_per_stage points; each point is scored (validation and held-out loss per
            domain, bits per byte) and its checkpoint deleted (the stage's final one is kept).
            Steps per stage: the guide's schedule scaled down until no domain is read more than
            --max_epochs times over the whole run (or --stage_steps). Each (model, seed) writes
            OUT/<model>_seed<S>/run.json and is skipped when that file exists, so the runs can
            be spread over several device sessions. --equal_time adds the slower model trained
            again on the same schedule with every stage's steps scaled by the two models'
            measured GPU seconds, so that it runs as long as the faster one.
  report    reads every OUT/*/run.json: the table at equal tokens (every point), at equal GPU
            seconds (the slower model's curve interpolated at the faster one's final time, and
            the --equal_time run when present), and the seeds' spread at the final point.
  position  mean held-out loss in position buckets ([0,512), [512,1K), ..., [16K,32K)) of
            --max_len-token segments of the held-out streams: MM-Rec over the whole segment in
            one call, and again in --trained_len windows with its state carried across (as
            `evaluate` scores files); the Transformer in --trained_len windows from a fresh
            context, only up to its trained length (the buckets beyond say so).
  mqar      multi-query associative recall (Zoology; Arora et al. 2023, "Based"): small models of
            each kind trained on a mixture of --pairs key-value counts (with easier, shorter
            tasks mixed in: mqar_tasks), accuracy per count at --mqar_seq_len. --mqar_models
            adds both kinds with a short convolution on q, k, v (docs/ARCHITECTURE_NOTES.md).
  passkey   a pass key hidden at --depths of filler text of --lengths tokens; greedy continuation
            of "The pass key is"; accuracy over --trials keys per (length, depth).

position and passkey take --checkpoints KIND=PATH,... (default: the lm part's final checkpoints
of the first seed in OUT). Every part prints a table; --json FILE writes them all.

CPU smoke (CI; tiny models, a few steps, a corpus of the bundled texts built on the fly):
    python benchmarks/bench_quality.py --smoke --out /tmp/bq --json /tmp/bq.json

H200 (one command per device call; the corpus as large_corpus_run.sh builds it):
    bash benchmarks/large_corpus_run.sh corpus      # once: the corpus in /tmp/large/corpus (~80 s)
    H="--out /tmp/bq --data_dir /tmp/large/corpus --heldout_text .gpu_text/heldout_text .gpu_text/heldout_long --heldout_code mm_rec"
    python benchmarks/bench_quality.py --parts lm $H --models mmrec --seeds 1337
    python benchmarks/bench_quality.py --parts lm $H --models transformer --seeds 1337
    python benchmarks/bench_quality.py --parts lm $H --models mmrec --seeds 1338 --points_per_stage 1
    python benchmarks/bench_quality.py --parts lm $H --models transformer --seeds 1338 --points_per_stage 1
    python benchmarks/bench_quality.py --parts lm $H --models transformer --seeds 1337 --equal_time
    python benchmarks/bench_quality.py --parts report,position $H --json /tmp/bq/lm_position.json
    python benchmarks/bench_quality.py --parts mqar --out /tmp/bq --json /tmp/bq/mqar.json
    python benchmarks/bench_quality.py --parts passkey $H --json /tmp/bq/passkey.json
(.gpu_text/ is made by benchmarks/gather_prose.py; heldout_long/ holds two Debian manuals of 70K+
tokens each, in no corpus, for the position buckets to 32K. /tmp/bq lives only as long as the
machine (at most 30 min held): run position and passkey in the lease that trained the first seed,
and copy each OUT/<model>_seed<S>/run.json back under $OUT (a run with its run.json is skipped).
100M preset, bf16, compiled and CUDA-graphed as train_modular is by default; the Transformer's
--compile compiles its whole loss, as bench_train's transformer-graphed, since it has no layer
function of MM-Rec's kind. The token budget: at most 1 epoch of each domain over the 3 stages.)
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import re
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python benchmarks/bench_quality.py` from anywhere
    sys.path.insert(0, str(ROOT))

from benchmarks.baselines.transformer import TransformerBaseline, matched_ffn_dim  # noqa: E402
from mm_rec.model import MMRec100M, MMRecConfig  # noqa: E402

KINDS = ("mmrec", "transformer")
# MQAR also trains the block change measured in ARCHITECTURE.md's notes (not a model of the other parts)
MQAR_KINDS = KINDS + ("mmrec-shortconv", "transformer-shortconv")
PARTS = ("lm", "report", "position", "mqar", "passkey")
STAGES = ("stage1", "stage2", "stage3")
LN2 = math.log(2)


# -- the two models ---------------------------------------------------------------------------------
def count_params(build, config: MMRecConfig) -> int:
    with torch.device("meta"):  # shapes only, no memory
        return sum(p.numel() for p in build(config).parameters())


def transformer_config(config: MMRecConfig, head_dim: int) -> MMRecConfig:
    """MM-Rec's config with heads of `head_dim` channels (the Transformer's only other setting)."""
    if config.expert_dim % head_dim:
        raise SystemExit(f"--head_dim {head_dim} must divide the width {config.expert_dim}")
    return dataclasses.replace(config, num_heads=config.expert_dim // head_dim)


def transformer_builder(mmrec_config: MMRecConfig, short_conv: bool = False):
    """build_model(config) -> the Transformer with the FFN that matches MM-Rec's parameter count
    (config: MM-Rec's with the Transformer's heads, as the trainer passes it)."""
    target = count_params(lambda c: MMRec100M(config=c), mmrec_config)

    def build(config: MMRecConfig) -> TransformerBaseline:
        return TransformerBaseline(config, matched_ffn_dim(config, target), short_conv=short_conv)
    return build


def model_for(kind: str, mmrec_config: MMRecConfig, head_dim: int):
    """(config, build_model) of `kind`, built from MM-Rec's config."""
    if kind == "mmrec":
        return mmrec_config, lambda c: MMRec100M(config=c)
    if kind == "mmrec-shortconv":
        from benchmarks.baselines import mmrec_shortconv
        return mmrec_config, mmrec_shortconv.build
    if kind == "transformer-shortconv":
        return transformer_config(mmrec_config, head_dim), transformer_builder(mmrec_config, short_conv=True)
    return transformer_config(mmrec_config, head_dim), transformer_builder(mmrec_config)


def carries_state(model) -> bool:
    return isinstance(model, MMRec100M)


def load_trained(path, device):
    """(model in eval mode, tokenizer) of a trainer checkpoint of either kind."""
    from mm_rec.inference.loading import (fusion_from_checkpoint, load_model, model_config_from_dict,
                                          read_checkpoint, tokenizer_from_json)
    state = read_checkpoint(Path(path))
    weights = state["model_state_dict"]
    if not any(k.endswith(".qkv.weight") for k in weights):
        loaded = load_model(path, device=device)
        return loaded.model.eval(), loaded.tokenizer
    config = model_config_from_dict(state["config"], path)
    ffn = weights[next(k for k in weights if k.endswith("blocks.0.ffn_in.weight"))].shape[0]
    model = TransformerBaseline(config, ffn)
    model.load_state_dict(weights)
    model.use_fusion = fusion_from_checkpoint(state)
    tokenizer = tokenizer_from_json(state["tokenizer"], str(path)) if state.get("tokenizer") else None
    return model.to(device).eval(), tokenizer


def train_model(build_model, cfg) -> Path:
    """Train through the project's trainer exactly as train_modular does; only the model differs."""
    from mm_rec.training.trainer import Trainer
    Trainer(cfg.validate(), build_model=build_model).run()
    return Path(cfg.checkpoint_dir)


# -- scoring ------------------------------------------------------------------------------------------
def bits_per_byte(nats: float, n_bytes: int) -> float:
    """Summed cross-entropy (nats) over the UTF-8 bytes the scored tokens decode to, in bits."""
    return nats / (n_bytes * LN2) if n_bytes else float("nan")


def autocast_dtype(device) -> torch.dtype | None:
    """bf16 on CUDA (as the trainer trains and evaluates), full precision on the CPU."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else None


def autocast(device):
    dtype = autocast_dtype(device)
    return torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype is not None)


def score_validation(model, data, byte_lengths, domain, expert_type, batch_size, seq_len, max_batches, device):
    """The trainer's validation loss (evaluate_loss: the same windows), with its bits per byte."""
    from mm_rec.training.evaluation import evaluate_loss
    loss = evaluate_loss(model, data, domain, expert_type, batch_size, seq_len, max_batches=max_batches,
                         device=device, autocast_dtype=autocast_dtype(device))
    tokens = n_bytes = 0
    for _, y in data.iter_eval_batches(domain, batch_size, seq_len, max_batches):
        tokens, n_bytes = tokens + y.numel(), n_bytes + int(byte_lengths[y].sum())
    return {"loss": loss, "bpb": bits_per_byte(loss * tokens, n_bytes), "tokens": tokens}


def score_heldout(model, tokens, byte_lengths, expert_type, seq_len, device):
    """A held-out stream in `seq_len` windows: MM-Rec carries its state from window to window (as
    `evaluate --text` scores files), the Transformer starts each window afresh."""
    from mm_rec.inference.evaluation import summed_loss
    windows = [(tokens[s:s + seq_len][None], tokens[s + 1:s + 1 + seq_len][None])
               for s in range(0, tokens.numel() - 1, seq_len)]
    windows = [(x[:, :y.shape[1]], y) for x, y in windows]
    nats, count = summed_loss(model, windows, expert_type, device, autocast_dtype(device),
                              carry_memory=carries_state(model))
    nats = float(nats)
    n_bytes = int(byte_lengths[tokens[1:count + 1]].sum())
    return {"loss": nats / count, "bpb": bits_per_byte(nats, n_bytes), "tokens": count}


def heldout_streams(tokenizer, files: dict, max_tokens: int) -> dict[str, torch.Tensor]:
    """{domain: token stream} of the held-out files, as the trainer's --heldout_* reads them."""
    from mm_rec.training.heldout import HeldoutSet
    held = HeldoutSet.from_files(tokenizer, files, max_tokens)
    return held.tokens if held is not None else {}


@torch.no_grad()
def token_losses(model, x, y, expert_type=None, memory_states=None, chunk_size=None, head_chunk=4096):
    """Per-token cross-entropy [T] of one row (x, y [1, T]) and, for MM-Rec, the states after it."""
    with autocast(x.device):
        if carries_state(model):
            logits, states = model(x, expert_type=expert_type, memory_states=memory_states, chunk_size=chunk_size,
                                   return_memory=True)
        else:
            logits, states = model(x, expert_type=expert_type), None
    losses = torch.cat([F.cross_entropy(logits[0, i:i + head_chunk].float(), y[0, i:i + head_chunk], reduction="none")
                        for i in range(0, y.shape[1], head_chunk)])
    return losses, states


# -- position buckets ---------------------------------------------------------------------------------
def position_buckets(first: int, max_len: int) -> list[tuple[int, int]]:
    """[0, first), [first, 2 first), [2 first, 4 first), ... up to max_len."""
    edges, b = [0], first
    while b < max_len:
        edges.append(b)
        b *= 2
    edges.append(max_len)
    return list(zip(edges[:-1], edges[1:]))


def bucket_means(losses_by_row: list[torch.Tensor], buckets) -> list[dict]:
    """Mean of the per-position losses of every row (each from position 0) in each bucket."""
    out = []
    for lo, hi in buckets:
        parts = [row[lo:hi] for row in losses_by_row if row.numel() > lo]
        n = sum(p.numel() for p in parts)
        total = sum(float(p.double().sum()) for p in parts)
        out.append({"from": lo, "to": hi, "tokens": n, "loss": total / n if n else None})
    return out


def segment_losses(model, segment, mode: str, trained_len: int, expert_type=None):
    """Per-position losses of one held-out segment (a 1-D stream, its first token a context start).
    mode "whole": one call over the segment (MM-Rec); "carried": trained_len windows, the state
    carried from each to the next (MM-Rec); "fresh": the first trained_len tokens only (the
    Transformer, which stops at its trained length)."""
    x, y = segment[:-1][None], segment[1:][None]
    if mode == "whole":
        return token_losses(model, x, y, expert_type)[0]
    if mode == "fresh":
        return token_losses(model, x[:, :trained_len], y[:, :trained_len], expert_type)[0]
    pieces, states = [], None
    for s in range(0, y.shape[1], trained_len):
        losses, states = token_losses(model, x[:, s:s + trained_len], y[:, s:s + trained_len], expert_type, states)
        pieces.append(losses)
    return torch.cat(pieces)


def run_position(models: dict, streams: dict, max_len: int, first_bucket: int, trained_len: int, device) -> dict:
    buckets = position_buckets(first_bucket, max_len)
    out = {"max_len": max_len, "trained_len": trained_len, "buckets": [list(b) for b in buckets], "rows": []}
    for kind, model in models.items():
        modes = ("whole", "carried") if carries_state(model) else ("fresh",)
        for domain, stream in streams.items():
            segments = [stream[s:s + max_len + 1].to(device) for s in range(0, stream.numel() - 1, max_len)]
            segments = [seg for seg in segments if seg.numel() > 1]
            for mode in modes:
                rows = [segment_losses(model, seg, mode, trained_len).cpu() for seg in segments]
                means = bucket_means(rows, buckets)
                if mode == "fresh":
                    for m in means:
                        if m["from"] >= trained_len:
                            m["note"] = f"beyond the trained length {trained_len}"
                out["rows"].append({"model": kind, "domain": domain, "mode": mode, "segments": len(segments),
                                    "buckets": means})
    return out


def print_position(result: dict) -> None:
    spans = [f"{_k(lo)}-{_k(hi)}" for lo, hi in result["buckets"]]
    print(f"\nLoss by position (held-out, segments of {result['max_len']:,} tokens; trained at "
          f"{result['trained_len']:,}; '-' = beyond the Transformer's trained length or no tokens)")
    print(f"{'model':<12} {'domain':<6} {'mode':<8} " + " ".join(f"{s:>9}" for s in spans))
    for r in result["rows"]:
        cells = [f"{b['loss']:>9.3f}" if b["loss"] is not None else f"{'-':>9}" for b in r["buckets"]]
        print(f"{r['model']:<12} {r['domain']:<6} {r['mode']:<8} " + " ".join(cells))


def _k(n: int) -> str:
    return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n)


# -- MQAR ---------------------------------------------------------------------------------------------
def mqar_batch(batch: int, seq_len: int, pairs: int, vocab: int, generator: torch.Generator):
    """Multi-query associative recall (Zoology's multiquery_ar, queries placed uniformly).

    Keys come from [1, vocab/2), values from [vocab/2, vocab); each row holds `pairs` distinct keys
    with their values as k1 v1 k2 v2 ..., then every key once more, in random order at random even
    offsets of the rest (zeros elsewhere). The target at a query is its key's value; every other
    target is -100 (no loss). Returns (inputs, targets) [batch, seq_len], made on the generator's
    device with a few batched ops (a Python loop over rows would cost more than the tiny models'
    training step)."""
    if seq_len < 4 * pairs:
        raise ValueError(f"MQAR with {pairs} pairs needs a sequence of at least {4 * pairs} tokens (got {seq_len})")
    half = vocab // 2
    if half - 1 < pairs:
        raise ValueError(f"vocab {vocab} holds fewer than {pairs} distinct keys")
    device = generator.device

    def distinct(n: int, k: int) -> torch.Tensor:  # each row: k distinct draws from range(n)
        return torch.rand(batch, n, generator=generator, device=device).argsort(-1)[:, :k]

    keys, values = distinct(half - 1, pairs) + 1, distinct(vocab - half, pairs) + half
    x = torch.zeros(batch, seq_len + 1, dtype=torch.long, device=device)
    y = torch.full((batch, seq_len + 1), -100, dtype=torch.long, device=device)
    x[:, 0:2 * pairs:2], x[:, 1:2 * pairs:2] = keys, values
    order = distinct(pairs, pairs)
    where = 2 * pairs + 2 * distinct((seq_len + 1 - 2 * pairs) // 2, pairs)
    x.scatter_(1, where, keys.gather(1, order))
    y.scatter_(1, where, values.gather(1, order))  # target of input position p is the token to follow it
    return x[:, :-1], y[:, :-1]


def mqar_logits(model, x, y):
    """The LM head at the queries only (one expert: a plain 2-layer model of each kind): the other
    positions have no target, and their [B, T, vocab] logits would cost more than the model."""
    mask = y != -100
    return model.lm_head(model.hidden(x, expert_type="text")[mask]).float(), y[mask]


def mqar_loss(model, x, y):
    return F.cross_entropy(*mqar_logits(model, x, y))


@torch.no_grad()
def mqar_accuracy(model, x, y) -> float:
    logits, answers = mqar_logits(model, x, y)
    return float((logits.argmax(-1) == answers).float().mean())


def mqar_accuracies(model, args, generator, batch, device) -> dict[str, float]:
    """Accuracy at each number of pairs on `batch` fresh examples each (the model left in train mode)."""
    model.eval()
    accuracy = {}
    for pairs in args.pairs:
        x, y = mqar_batch(batch, args.mqar_seq_len, pairs, args.mqar_vocab, generator)
        with autocast(device):
            accuracy[str(pairs)] = mqar_accuracy(model, x, y)
    model.train()
    return accuracy


def mqar_tasks(seq_len: int, pairs: list[int]) -> list[tuple[int, int]]:
    """The training mixture, (sequence length, pairs): every tested count at the tested length, and
    each also at 1/2 and 1/4 of both (as Zoology trains on short sequences with few pairs beside the
    long ones). Without the easy tasks neither model finds the recall circuit: a 2-layer Transformer
    at 32 tokens and 4 pairs stayed at chance over the in-context values (1/4) for 11,000 steps,
    and learnt it in 1,800 with the halved task mixed in."""
    tasks = []
    for p in pairs:
        for shrink in (1, 2, 4):
            t = (seq_len // shrink, p // shrink)
            if t[1] >= 1 and t[0] >= 4 * t[1] and t not in tasks:
                tasks.append(t)
    return tasks


def train_mqar(kind, args, lr, device) -> dict:
    """One small model of `kind` trained on the mqar_tasks mixture with the trainer's step, optimizer
    and schedule; accuracy per count at --mqar_seq_len on fresh examples. Every --mqar_eval_every
    steps a probe (the curve; recall is learnt in a sudden jump); training stops early once the
    probe reads >= 0.99 at every count."""
    from mm_rec.training.optim import build_optimizer, build_scheduler
    from mm_rec.training.step import train_step
    base = MMRecConfig(vocab_size=args.mqar_vocab, expert_dim=args.mqar_width, num_layers=args.mqar_layers,
                       num_heads=args.mqar_width // args.mqar_mmrec_head_dim, ffn_dim=4 * args.mqar_width)
    config, build = model_for(kind, base, args.head_dim)
    torch.manual_seed(args.seeds[0])
    model = build(config).to(device)
    optimizer = build_optimizer(model, lr, 0.1)
    scheduler = build_scheduler(optimizer, max(1, args.mqar_steps // 10), args.mqar_steps)
    g = torch.Generator(device=device).manual_seed(args.seeds[0])
    probe = torch.Generator(device=device).manual_seed(20_000 + args.seeds[0])
    every = args.mqar_eval_every or max(1, args.mqar_steps // 8)
    tasks = mqar_tasks(args.mqar_seq_len, args.pairs)
    curve, t0, step = [], time.perf_counter(), 0
    while step < args.mqar_steps:
        seq_len, pairs = tasks[step % len(tasks)]
        x, y = mqar_batch(args.mqar_batch, seq_len, pairs, args.mqar_vocab, g)
        train_step(model, optimizer, x[None], y[None], lambda a, b: mqar_loss(model, a, b), clip_norm=1.0,
                   autocast_dtype=autocast_dtype(device))
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        if step % every == 0 and step < args.mqar_steps:
            curve.append({"step": step, "accuracy": mqar_accuracies(model, args, probe, 64, device)})
            print(f"  mqar {kind} lr {lr:g} step {step}: " +
                  " ".join(f"{p}:{a:.3f}" for p, a in curve[-1]["accuracy"].items()), flush=True)
            if min(curve[-1]["accuracy"].values()) >= 0.99:
                break
    test = torch.Generator(device=device).manual_seed(10_000 + args.seeds[0])
    accuracy = mqar_accuracies(model, args, test, args.mqar_eval_batch, device)
    return {"model": kind, "lr": lr, "params": sum(p.numel() for p in model.parameters()), "steps": step,
            "seconds": time.perf_counter() - t0, "curve": curve, "accuracy": accuracy}


def run_mqar(args, device) -> dict:
    runs = [train_mqar(kind, args, lr, device) for kind in args.mqar_models for lr in args.mqar_lrs]
    best = {}
    for r in runs:  # per model, the best learning rate at each count (the papers' sweep)
        for pairs, acc in r["accuracy"].items():
            b = best.setdefault(r["model"], {})
            b[pairs] = max(b.get(pairs, 0.0), acc)
    return {"seq_len": args.mqar_seq_len, "pairs": args.pairs, "tasks": mqar_tasks(args.mqar_seq_len, args.pairs),
            "runs": runs, "best": best}


def print_mqar(result: dict) -> None:
    print(f"\nMQAR accuracy (sequence {result['seq_len']}; best over learning rates)")
    print(f"{'model':<22} " + " ".join(f"{p:>7}" for p in result["pairs"]))
    for kind, acc in result["best"].items():
        print(f"{kind:<22} " + " ".join(f"{acc[str(p)]:>7.3f}" for p in result["pairs"]))


# -- passkey ------------------------------------------------------------------------------------------
PASSKEY_INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
                 "I will quiz you about the important information there.\n")
PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.\n"
PASSKEY_QUESTION = "What is the pass key? The pass key is"


def passkey_prompt(tokenizer, length: int, depth: float, key: str) -> torch.Tensor:
    """About `length` tokens: intro, filler with the key's sentence at `depth` of it, the question."""
    enc = lambda s: tokenizer.encode(s)
    intro, filler, question = enc(PASSKEY_INTRO), enc(PASSKEY_FILLER), enc(PASSKEY_QUESTION)
    needle = enc(f"The pass key is {key}. Remember it. {key} is the pass key.\n")
    repeats = max(1, (length - len(intro) - len(needle) - len(question)) // len(filler))
    before = round(repeats * depth)
    ids = intro + filler * before + needle + filler * (repeats - before) + question
    return torch.tensor(ids, dtype=torch.long)


@torch.no_grad()
def greedy(model, ids: torch.Tensor, new_tokens: int) -> list[int]:
    """Greedy continuation: MM-Rec by its generate (prefill, then one step per token), the
    Transformer by its full forward at each token (the last position's logits only)."""
    x = ids[None]
    with autocast(ids.device):
        if carries_state(model):
            return model.generate(x, new_tokens, temperature=0.0)[0, ids.numel():].tolist()
        for _ in range(new_tokens):
            nxt = model.lm_head(model.hidden(x)[:, -1]).argmax(-1, keepdim=True)
            x = torch.cat([x, nxt], 1)
    return x[0, ids.numel():].tolist()


def run_passkey(models: dict, tokenizer, lengths, depths, trials: int, digits: int, device) -> dict:
    rng = random.Random(0)
    keys = [str(rng.randrange(10 ** (digits - 1), 10 ** digits)) for _ in range(trials)]
    rows = []
    for kind, model in models.items():
        for length in lengths:
            for depth in depths:
                hits = 0
                for key in keys:
                    ids = passkey_prompt(tokenizer, length, depth, key).to(device)
                    text = tokenizer.decode(greedy(model, ids, digits + 3))
                    found = re.search(r"\d+", text)
                    hits += bool(found and found.group(0)[:digits] == key)
                rows.append({"model": kind, "length": length, "depth": depth, "accuracy": hits / trials,
                             "prompt_tokens": int(ids.numel())})
    return {"trials": trials, "digits": digits, "rows": rows}


def print_passkey(result: dict) -> None:
    print(f"\nPasskey retrieval ({result['trials']} keys of {result['digits']} digits per cell; accuracy)")
    print(f"{'model':<12} {'length':>8} {'depth':>6} {'accuracy':>9}")
    for r in result["rows"]:
        print(f"{r['model']:<12} {r['length']:>8,} {r['depth']:>6.2f} {r['accuracy']:>9.2f}")


# -- the language-model runs ----------------------------------------------------------------------------
def base_train_config(args, stage: str, seed: int, run_dir: Path, **overrides):
    from mm_rec.training.config import TrainConfig
    values = dict(stage=stage, preset=args.preset, seed=seed, data_dir=args.data_dir, checkpoint_dir=str(run_dir),
                  keep_last=0, eval_interval=0, eval_batches=args.eval_batches, memory_log_interval=0,
                  device=args.device, seq_len=args.seq_len, batch_size=args.batch_size)
    values.update(args.model_flags)
    values.update(overrides)
    return TrainConfig(**values)


def stage_steps(args, data) -> dict[str, tuple[int, int]]:
    """{stage: (steps, warmup)}: --stage_steps, or the preset's schedule scaled (warmup with it)
    until no domain is read more than --max_epochs times over the three stages."""
    from mm_rec.training.guards import stage_data_use
    specs = {s: base_train_config(args, s, 0, Path(".")).stage_spec(s) for s in STAGES}
    if args.stage_steps:
        return {s: (n, min(specs[s].warmup_steps, max(1, n // 10))) for s, n in zip(STAGES, args.stage_steps)}
    held = {d: data.num_tokens(d, "train") for d in ("text", "code")}
    consumed = {d: 0 for d in held}
    for spec in specs.values():
        for use in stage_data_use(spec, spec.batch_size, 1, held):
            consumed[use.domain] += use.consumed
    scale = min([1.0] + [args.max_epochs * held[d] / consumed[d] for d in held if consumed[d]])
    return {s: (max(args.points_per_stage, int(spec.max_steps * scale)), int(spec.warmup_steps * scale))
            for s, spec in specs.items()}


def step_seconds(run_dir: Path, stage: str) -> float:
    """Median seconds of the stage's steps (metrics.jsonl; the first, compiling, left out)."""
    from mm_rec.training.metrics import read_metrics
    rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["stage"] == stage]
    times = [r["step_time_s"] for r in rows[1:] or rows]
    return statistics.median(times)


def score_point(path, spec, data, streams, byte_lengths, args, device) -> dict:
    model, _ = load_trained(path, device)
    point = {"validation": {}, "heldout": {}}
    for domain, expert_type in spec.eval_plan():
        point["validation"][domain] = score_validation(model, data, byte_lengths, domain, expert_type,
                                                       spec.batch_size, spec.seq_len, args.eval_batches, device)
        if domain in streams:
            point["heldout"][domain] = score_heldout(model, streams[domain], byte_lengths, expert_type,
                                                     spec.seq_len, device)
    return point


def run_lm(kind: str, seed: int, args, data, tokenizer, device, steps: dict, name: str | None = None) -> dict:
    """One (model, seed): its three stages through the trainer, each point scored. Returns run.json's dict."""
    from mm_rec.inference.evaluation import token_byte_lengths
    from mm_rec.training.checkpoint import checkpoint_name
    name = name or f"{kind}_seed{seed}"
    run_dir = Path(args.out) / name
    done = run_dir / "run.json"
    if done.is_file():
        print(f"{name}: {done} exists, not trained again")
        return json.loads(done.read_text())
    if run_dir.exists():
        shutil.rmtree(run_dir)  # an interrupted run: started again
    mmrec_config = base_train_config(args, "stage1", seed, run_dir).model_config()
    config, build = model_for(kind, mmrec_config, args.head_dim)
    byte_lengths = token_byte_lengths(tokenizer)
    streams = heldout_streams(tokenizer, {"text": args.heldout_text, "code": args.heldout_code}, args.heldout_tokens)
    flags = {"num_heads": config.num_heads} if kind == "transformer" else {}
    if kind == "transformer":
        flags["compile_scope"] = "model"  # no layer function: its whole loss is compiled
    points, tokens, seconds, previous = [], 0, 0.0, None
    record = {"model": kind, "seed": seed, "name": name, "params": count_params(build, config),
              "config": config.to_dict(), "stages": {}}
    for stage in STAGES:
        n, warmup = steps[stage]
        interval = max(1, n // args.points_per_stage)
        cfg = base_train_config(args, stage, seed, run_dir, max_steps=n, warmup_steps=warmup,
                                checkpoint_interval=interval, resume_from=previous, **flags)
        spec = cfg.stage_spec(stage)
        t0 = time.perf_counter()
        train_model(build, cfg)
        wall = time.perf_counter() - t0
        per_step = step_seconds(run_dir, stage)
        record["stages"][stage] = {"steps": n, "warmup": warmup, "seq_len": spec.seq_len,
                                   "batch_size": spec.batch_size, "step_seconds": per_step, "wall_seconds": wall}
        # every point of the first seed; the stages' ends of the others (the seeds' spread)
        at = sorted({s for s in range(interval, n + 1, interval)} | {n})
        for step in at:
            path = run_dir / checkpoint_name(stage, step)
            if seed != args.seeds[0] and step != n:
                path.unlink()
                continue
            point = score_point(path, spec, data, streams, byte_lengths, args, device)
            point.update(stage=stage, step=step, tokens=tokens + step * spec.batch_size * spec.seq_len,
                         gpu_seconds=seconds + step * per_step)
            points.append(point)
            print(f"{name} {stage} step {step}: " + _point_line(point))
            if step != n:
                path.unlink()
        tokens += n * spec.batch_size * spec.seq_len
        seconds += n * per_step
        previous = str(run_dir / checkpoint_name(stage, n))
    record.update(points=points, final_checkpoint=previous, tokens=tokens, gpu_seconds=seconds)
    done.write_text(json.dumps(record, indent=1))
    return record


def _point_line(point) -> str:
    parts = [f"val {d} {v['loss']:.4f} ({v['bpb']:.3f} bpb)" for d, v in point["validation"].items()]
    parts += [f"held-out {d} {v['loss']:.4f} ({v['bpb']:.3f} bpb)" for d, v in point["heldout"].items()]
    return ", ".join(parts)


def lm_part(args, device) -> None:
    from mm_rec.training.data import open_training_data
    mmrec_config = base_train_config(args, "stage1", 0, Path(".")).model_config()
    data, tokenizer = open_training_data(args.data_dir, False, mmrec_config)
    steps = stage_steps(args, data)
    print("steps per stage: " + ", ".join(f"{s} {n} (warmup {w})" for s, (n, w) in steps.items()))
    runs = {}
    for seed in args.seeds:
        for kind in args.models:
            runs[(kind, seed)] = run_lm(kind, seed, args, data, tokenizer, device, steps)
    if args.equal_time:  # the slower model's whole schedule scaled to the faster one's GPU seconds
        seed = args.seeds[0]
        other = {k: run_lm(k, seed, args, data, tokenizer, device, steps) for k in KINDS}
        slow, fast = sorted(KINDS, key=lambda k: other[k]["gpu_seconds"], reverse=True)
        ratio = other[fast]["gpu_seconds"] / other[slow]["gpu_seconds"]
        scaled = {s: (max(args.points_per_stage, round(n * ratio)), round(w * ratio)) for s, (n, w) in steps.items()}
        shown = ", ".join(f"{s} {n}" for s, (n, _) in scaled.items())
        print(f"equal GPU time: {slow} at {ratio:.3f} of its steps: {shown}")
        run_lm(slow, seed, args, data, tokenizer, device, scaled, name=f"{slow}_seed{seed}_equal_time")


# -- the report -----------------------------------------------------------------------------------------
def read_runs(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(Path(out).glob("*/run.json"))]


def interpolate(points, seconds, key):
    """`key` of _metrics at `seconds` of GPU time, linear between the two points around it (None outside)."""
    xs = [(p["gpu_seconds"], _metrics(p).get(key)) for p in points]
    xs = [(t, v) for t, v in xs if v is not None]
    for (t0, v0), (t1, v1) in zip(xs, xs[1:]):
        if t0 <= seconds <= t1:
            return v0 + (v1 - v0) * (seconds - t0) / max(t1 - t0, 1e-12)
    return xs[-1][1] if xs and abs(xs[-1][0] - seconds) < 1e-9 else None


def build_report(runs: list[dict]) -> dict:
    main = [r for r in runs if not r["name"].endswith("_equal_time")]
    seeds = sorted({r["seed"] for r in main})
    first = {r["model"]: r for r in main if r["seed"] == seeds[0]} if seeds else {}
    report = {"params": {k: r["params"] for k, r in first.items()}, "equal_tokens": [], "equal_time": [],
              "seeds": {}}
    for kind, run in first.items():  # every point of the first seed
        for p in run["points"]:
            report["equal_tokens"].append({"model": kind, "stage": p["stage"], "step": p["step"], "tokens": p["tokens"],
                                           "gpu_seconds": p["gpu_seconds"],
                                           **_metrics(p)})
    if len(first) == 2:
        t = min(r["gpu_seconds"] for r in first.values())
        for kind, run in first.items():
            row = {"model": kind, "gpu_seconds": t, "how": "interpolated along the equal-tokens run"}
            row.update({key: interpolate(run["points"], t, key) for key in _metrics(run["points"][-1])})
            if t < run["points"][0]["gpu_seconds"]:  # nothing measured yet at that time: say so, report no loss
                row["how"] = f"not measured: its first evaluation came at {run['points'][0]['gpu_seconds']:.1f} s"
            report["equal_time"].append(row)
    for r in runs:
        if r["name"].endswith("_equal_time"):
            report["equal_time"].append({"model": r["model"], "gpu_seconds": r["gpu_seconds"],
                                         "how": "trained with its steps scaled to the other's GPU seconds",
                                         **_metrics(r["points"][-1])})
    for kind in KINDS:
        finals = [_metrics(r["points"][-1]) for r in main if r["model"] == kind]
        if finals:
            report["seeds"][kind] = {key: {"mean": statistics.fmean(f[key] for f in finals),
                                           "spread": max(f[key] for f in finals) - min(f[key] for f in finals),
                                           "n": len(finals)}
                                     for key in finals[0] if all(f.get(key) is not None for f in finals)}
    return report


def _metrics(point) -> dict:
    out = {}
    for where in ("validation", "heldout"):
        for d, v in point[where].items():
            out[f"{where}_{d}"] = v["loss"]
            out[f"{where}_{d}_bpb"] = v["bpb"]
    return out


def print_report(report: dict) -> None:
    print("\nParameters: " + ", ".join(f"{k} {n / 1e6:.2f}M" for k, n in report["params"].items()))
    cols = ("validation_text", "validation_code", "heldout_text", "heldout_code")
    head = f"{'model':<12} {'stage':<7} {'step':>6} {'tokens':>12} {'GPU s':>8} " + " ".join(f"{c:>16}" for c in cols)
    print("\nAt equal tokens (loss nats/token, bits per byte)\n" + head)
    cell = lambda r, c: (f"{r[c]:.4f}/{r[c + '_bpb']:.3f}" if r.get(c) is not None else "-").rjust(16)
    for r in sorted(report["equal_tokens"], key=lambda r: (r["tokens"], r["model"])):
        print(f"{r['model']:<12} {r['stage']:<7} {r['step']:>6} {r['tokens']:>12,} {r['gpu_seconds']:>8.1f} "
              + " ".join(cell(r, c) for c in cols))
    if report["equal_time"]:
        print("\nAt equal GPU seconds (loss)")
        for r in report["equal_time"]:
            shown = " ".join(f"{c} {r[c]:.4f}" if r.get(c) is not None else f"{c} -" for c in cols)
            print(f"{r['model']:<12} {r['gpu_seconds']:>8.1f} s  {shown}  ({r['how']})")
    if report["seeds"]:
        print("\nFinal point over seeds (mean ± spread = max - min)")
        for kind, stats in report["seeds"].items():
            shown = " ".join(f"{c} {stats[c]['mean']:.4f}±{stats[c]['spread']:.4f}" for c in cols if c in stats)
            print(f"{kind:<12} n={next(iter(stats.values()))['n'] if stats else 0} {shown}")


# -- command line ---------------------------------------------------------------------------------------
def int_list(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def float_list(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v]


def checkpoint_map(text: str) -> dict[str, str]:
    out = {}
    for item in text.split(","):
        kind, _, path = item.partition("=")
        if kind not in KINDS or not path:
            raise argparse.ArgumentTypeError(f"expected KIND=PATH with KIND in {', '.join(KINDS)}, got {item!r}")
        out[kind] = path
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 1)[1])
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated parts: {', '.join(PARTS)}")
    p.add_argument("--smoke", action="store_true", help="tiny models and a few steps of every part (CPU, CI)")
    p.add_argument("--out", default="./bench_quality", help="run directories and their run.json")
    p.add_argument("--json", help="write every part's results to this file")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--models", default=",".join(KINDS), help="which of mmrec,transformer")
    p.add_argument("--seeds", type=int_list, default=[1337], help="seeds (initialisation and data order)")
    p.add_argument("--head_dim", type=int, default=64, help="the Transformer's head size")
    g = p.add_argument_group("lm")
    g.add_argument("--preset", default="100m", choices=("100m", "tiny"))
    g.add_argument("--data_dir", default=None, help="a prepared corpus (default: the bundled one)")
    g.add_argument("--heldout_text", nargs="+", default=None)
    g.add_argument("--heldout_code", nargs="+", default=None)
    g.add_argument("--heldout_tokens", type=int, default=200_000, help="held-out tokens scored per domain")
    g.add_argument("--max_epochs", type=float, default=1.0, help="epochs of each domain over the three stages")
    g.add_argument("--stage_steps", type=int_list, default=None, help="S1,S2,S3 steps (overrides --max_epochs)")
    g.add_argument("--points_per_stage", type=int, default=2, help="scored checkpoints per stage")
    g.add_argument("--eval_batches", type=int, default=8)
    g.add_argument("--seq_len", type=int, default=None, help="every stage's length (default: the preset's)")
    g.add_argument("--batch_size", type=int, default=None)
    g.add_argument("--eager", action="store_true", help="train with --no_compile --no_cuda_graph (both models)")
    g.add_argument("--equal_time", action="store_true", help="also train the slower model for the faster one's "
                                                               "GPU seconds (first seed)")
    g = p.add_argument_group("position and passkey")
    g.add_argument("--checkpoints", type=checkpoint_map, default=None, help="KIND=PATH,... (default: OUT's runs)")
    g.add_argument("--max_len", type=int, default=32768)
    g.add_argument("--first_bucket", type=int, default=512)
    g.add_argument("--trained_len", type=int, default=None, help="default: the runs' longest stage (8192)")
    g.add_argument("--lengths", type=int_list, default=[1024, 4096, 16384, 32768])
    g.add_argument("--depths", type=float_list, default=[0.1, 0.5, 0.9])
    g.add_argument("--trials", type=int, default=20)
    g.add_argument("--digits", type=int, default=5)
    g = p.add_argument_group("mqar")
    g.add_argument("--pairs", type=int_list, default=[16, 32, 64, 128, 256])
    g.add_argument("--mqar_models", default=",".join(MQAR_KINDS), help=f"which of {','.join(MQAR_KINDS)}")
    g.add_argument("--mqar_seq_len", type=int, default=1024)
    g.add_argument("--mqar_vocab", type=int, default=8192)
    g.add_argument("--mqar_width", type=int, default=128)
    g.add_argument("--mqar_layers", type=int, default=2)
    g.add_argument("--mqar_mmrec_head_dim", type=int, default=32, help="MM-Rec's head size (the 100M model's)")
    g.add_argument("--mqar_steps", type=int, default=12000, help="at most (a run that reads 0.99 everywhere stops)")
    g.add_argument("--mqar_eval_every", type=int, default=None, help="probe interval (default: steps / 8)")
    g.add_argument("--mqar_batch", type=int, default=128)
    g.add_argument("--mqar_eval_batch", type=int, default=256)
    g.add_argument("--mqar_lrs", type=float_list, default=[1e-3, 3e-3])
    return p


SMOKE = dict(preset="tiny", seeds=[1337, 1338], equal_time=True, stage_steps=[2, 1, 1], points_per_stage=2,
             eval_batches=1, seq_len=32, batch_size=2, head_dim=16, heldout_tokens=64, max_len=64, first_bucket=16,
             lengths=[256, 384], depths=[0.5],
             trials=2, digits=3, pairs=[2, 4], mqar_seq_len=32, mqar_vocab=64, mqar_width=32, mqar_layers=2,
             mqar_mmrec_head_dim=16, mqar_steps=4, mqar_batch=4, mqar_eval_batch=8, mqar_lrs=[3e-3])
SMOKE_MODEL = dict(vocab_size=512, expert_dim=32, num_layers=1, num_heads=2, ffn_dim=64)


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.parts = [s for s in args.parts.split(",") if s]
    args.models = [s for s in args.models.split(",") if s]
    args.mqar_models = [s for s in args.mqar_models.split(",") if s]
    for name, allowed in (("parts", PARTS), ("models", KINDS), ("mqar_models", MQAR_KINDS)):
        bad = [v for v in getattr(args, name) if v not in allowed]
        if bad:
            parser.error(f"--{name}: unknown {', '.join(bad)} (choose from {', '.join(allowed)})")
    args.model_flags = dict(no_compile=True, no_cuda_graph=True) if args.eager else {}
    if args.smoke:
        torch.set_num_threads(1)  # ops this small only lose to intra-op threads (4x on a busy 2-core machine)
        defaults = {a.dest: a.default for a in parser._actions}
        for k, v in SMOKE.items():
            if getattr(args, k) == defaults[k]:  # flags given win
                setattr(args, k, v)
        args.model_flags.update(SMOKE_MODEL)
        if args.data_dir is None:
            from mm_rec.data.corpus import ensure_default_corpus
            args.data_dir = str(ensure_default_corpus(512, cache_dir=Path(args.out) / "cache", verbose=False,
                                                      prose_max_bytes=60_000, code_max_bytes=300_000))
        args.heldout_text = args.heldout_text or [str(ROOT / "README.md")]
        args.heldout_code = args.heldout_code or [str(ROOT / "mm_rec" / "model")]
    return args


def final_checkpoints(args) -> dict[str, str]:
    if args.checkpoints:
        return args.checkpoints
    runs = [r for r in read_runs(args.out) if not r["name"].endswith("_equal_time") and r["seed"] == args.seeds[0]]
    return {r["model"]: r["final_checkpoint"] for r in runs if r["model"] in args.models}


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    args.device = device.type if device.index is None else str(device)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    results = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "torch": torch.__version__, "smoke": args.smoke}
    if "lm" in args.parts:
        lm_part(args, device)
    if "report" in args.parts:
        results["lm"] = build_report(read_runs(args.out))
        print_report(results["lm"])
    if "position" in args.parts or "passkey" in args.parts:
        paths = final_checkpoints(args)
        models, tokenizer = {}, None
        for kind, path in paths.items():
            models[kind], tokenizer = load_trained(path, device)
        if "position" in args.parts and models:
            trained_len = args.trained_len or max(
                (s["seq_len"] for r in read_runs(args.out) for s in r["stages"].values()), default=8192)
            streams = heldout_streams(tokenizer, {"text": args.heldout_text, "code": args.heldout_code},
                                      args.heldout_tokens)
            results["position"] = run_position(models, streams, args.max_len, args.first_bucket, trained_len, device)
            print_position(results["position"])
        if "passkey" in args.parts and models:
            results["passkey"] = run_passkey(models, tokenizer, args.lengths, args.depths, args.trials, args.digits,
                                             device)
            print_passkey(results["passkey"])
    if "mqar" in args.parts:
        results["mqar"] = run_mqar(args, device)
        print_mqar(results["mqar"])
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
