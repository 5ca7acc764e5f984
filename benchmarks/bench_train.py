"""Training-step throughput of the 100M MM-Rec against what a user would pick instead.

One process measures, per batch shape, train_modular's training step itself
(mm_rec/training/step.py: forward, cross-entropy with the LM head in 4096-token chunks, backward,
gradient clipping, finite check, fused AdamW with its parameter groups, then zero_grad; bf16
autocast) of
  mmrec-gpu            MM-Rec, GPU path (our Triton recurrences, fused projection), eager
  mmrec-gpu-compiled   the same with its layer compiled (model.compile_blocks, what train_modular
                       --compile does; --compile-mode, CUDA graphs by default)
  mmrec-gpu-compiled-whole  the same with the whole loss under torch.compile instead (--compile_scope model)
  mmrec-gpu-graphed    the layer compiled (no CUDA graphs of its own) and the whole step, AdamW
                       included, captured as one CUDA graph and replayed (train_modular --compile
                       --cuda_graph; mm_rec/training/step_graph.py)
  mmrec-pytorch        MM-Rec on the pure-PyTorch path (use_kernel_fusion=False), eager
  transformer          the equal-parameter Transformer (benchmarks/baselines/transformer.py), eager;
                       MM-Rec's heads (8 of 32 channels) unless --transformer-heads says otherwise
                       (4: heads of 64, where FlashAttention is faster)
  transformer-compiled the same under torch.compile
  transformer-graphed  the same compiled (no CUDA graphs of its own), the whole step one CUDA graph
  ffn-only-graphed     the floor: the Transformer's blocks without their mixer (FFN only) at MM-Rec's
                       FFN width, i.e. an MM-Rec step minus its mixer, treated as transformer-graphed.
                       Transformer / floor is the highest "vs T-graph" any mixer could reach
  transformer*-hN      a Transformer variant with N attention heads (overrides --transformer-heads):
                       transformer-graphed,transformer-graphed-h4 measures both baselines in one run
  NAME-nocombo         a compiled or graphed variant compiled without Inductor's combo kernels
                       (mm_rec/utils/compile.py). Without the suffix MM-Rec's compiled layer has
                       them for calls of at most 16,384 tokens, the Transformer's (and the floor's)
                       compiled loss at every shape, MM-Rec's whole compiled loss never
  fla-gla              flash-linear-attention's GLAForCausalLM of similar size (if it imports:
                       fla.models ships in the flash-linear-attention wheel, not in fla-core)
Variants are interleaved: every repeat times each variant in turn; the table reports medians.

FLOPs (model FLOPs, no recomputation counted): per token 6 x the matmul parameters the step uses
(every nn.Linear of the active experts, the fusion layer when on, and the LM head; the embedding
excluded), plus the sequence mixers' own, forward x 3 for forward + backward:
  GLA (MM-Rec long-term memory), per layer and head: 2 Dk Dv (state update) + 2 Dk Dv (read-out)
      + 2 (C/2)(Dk + Dv) (causal half of the intra-chunk product; C = 32, kernel_intra.BT; fla's GLA 64);
  short-term diagonal recurrence: 2 d per layer;
  causal attention: 2 (T/2) 2 d per layer (QK^T and AV over the causal half).
MFU = achieved FLOP/s over 989 TFLOP/s (H100 SXM dense bf16 datasheet); the table also gives it
against the bf16 matmul ceiling measured at start (8192^3 torch.matmul).

    python benchmarks/bench_train.py --out results.json
    python benchmarks/bench_train.py --shapes stage2 --variants mmrec-gpu,transformer
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PEAK_BF16 = 989e12
VARIANTS = ("mmrec-gpu", "mmrec-gpu-compiled", "mmrec-gpu-compiled-whole", "mmrec-gpu-graphed", "mmrec-pytorch",
            "transformer", "transformer-compiled", "transformer-graphed", "ffn-only-graphed", "fla-gla")
# name -> (batch, seq_len, expert_type, fusion). Stage shapes follow the guide's stages: stage 2
# trains one expert per step (alternating), stage 3 has fusion on.
SHAPES = {
    "stage1": (4, 512, None, False),
    "stage2": (2, 8192, "alternate", False),
    "stage3": (4, 4096, None, True),
    "2x8192": (2, 8192, None, False),
    "fill512": (128, 512, None, False),
    "fill4096": (16, 4096, None, False),
    "fill8192": (8, 8192, None, False),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--shapes", default=",".join(SHAPES),
                   help=f"comma-separated from {list(SHAPES)}, BxT (both experts) or stageN:B (stage N's "
                        "shape at batch B, e.g. stage2:8), default all")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated from %(default)s")
    p.add_argument("--repeats", type=int, default=5, help="interleaved repeats (median reported)")
    p.add_argument("--steps", type=int, default=4, help="timed steps per repeat")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation, autotuning)")
    p.add_argument("--compile-mode", default="reduce-overhead",
                   help="torch.compile mode for the *-compiled variants (default: CUDA graphs)")
    p.add_argument("--pytorch-max-tokens", type=int, default=16384,
                   help="skip mmrec-pytorch above this many tokens per step (it is slow)")
    p.add_argument("--profile", default=None,
                   help="SHAPE:VARIANT[,SHAPE:VARIANT...] to profile one step of with torch.profiler")
    p.add_argument("--profile-rows", type=int, default=25, help="kernels listed per profile")
    p.add_argument("--transformer-heads", type=int, default=None,
                   help="attention heads of the Transformer baseline (default: MM-Rec's, 8 of 32 "
                        "channels; 4 gives FlashAttention heads of 64)")
    p.add_argument("--out", default="bench_train.json", help="JSON results file")
    args = p.parse_args(argv)
    for shape in args.shapes.split(","):
        if shape:
            parse_shape(shape)  # a bad name stops here, before any GPU work
    if args.transformer_heads is not None and not heads_fit(args.transformer_heads):
        p.error(f"--transformer-heads must divide the width {mmrec_config().expert_dim} (e.g. 4 or 8)")
    return args


# -- models --------------------------------------------------------------------------------------
def mmrec_config():
    from mm_rec.model import PRESETS, MMRecConfig
    return MMRecConfig(**PRESETS["100m"])


NOCOMBO = "-nocombo"
HEADS_SUFFIX = re.compile(r"-h(\d+)$")  # transformer*-hN: the baseline with N attention heads


def base_variant(variant):
    """The variant without its -hN and -nocombo suffixes: what is built and how it is stepped."""
    return HEADS_SUFFIX.sub("", variant.removesuffix(NOCOMBO))


def heads_fit(heads):
    """Whether the Transformer baseline can split MM-Rec's width into `heads` heads."""
    return heads > 0 and mmrec_config().expert_dim % heads == 0


def variant_heads(variant):
    """N of a transformer*-hN[-nocombo] variant, else None."""
    m = HEADS_SUFFIX.search(variant.removesuffix(NOCOMBO))
    return int(m.group(1)) if m else None


def check_variant(variant):
    base = base_variant(variant)
    combo_ok = not variant.endswith(NOCOMBO) or "compiled" in base or "graphed" in base
    heads = variant_heads(variant)
    heads_ok = heads is None or (base.startswith("transformer") and heads_fit(heads))
    if base not in VARIANTS or not combo_ok or not heads_ok:
        raise SystemExit(f"error: unknown variant {variant!r}; choose from {', '.join(VARIANTS)} "
                         f"(a transformer one may end in -hN, N heads dividing the width "
                         f"{mmrec_config().expert_dim}; a compiled or graphed one in {NOCOMBO})")


def build(variant, device, transformer_heads=None):
    """The model of `variant`; a Transformer gets the variant's -hN heads, else transformer_heads,
    else MM-Rec's."""
    import dataclasses
    import torch
    transformer_heads = variant_heads(variant) or transformer_heads
    variant = base_variant(variant)
    from mm_rec.model import MMRec100M
    from benchmarks.baselines.transformer import TransformerBaseline, matched_ffn_dim
    cfg = mmrec_config()
    torch.manual_seed(0)
    if variant.startswith("mmrec"):
        model = MMRec100M(config=cfg).to(device)
        model.use_kernel_fusion = variant != "mmrec-pytorch"
    elif variant.startswith("transformer"):
        with torch.device("meta"):
            target = MMRec100M(config=cfg).get_num_params()
        if transformer_heads is not None:
            cfg = dataclasses.replace(cfg, num_heads=transformer_heads)
        model = TransformerBaseline(cfg, matched_ffn_dim(cfg, target)).to(device)
    elif variant == "ffn-only-graphed":
        model = TransformerBaseline(cfg, cfg.ffn_dim, mixer=False).to(device)
    elif variant == "fla-gla":
        from fla.models import GLAConfig, GLAForCausalLM
        # A single stack of 2d = 512 channels (the width of MM-Rec's head), depth chosen for ~94M.
        model = GLAForCausalLM(GLAConfig(hidden_size=512, num_hidden_layers=20, num_heads=4,
                                         vocab_size=cfg.vocab_size, fuse_cross_entropy=True)).to(device)
    else:
        raise SystemExit(f"error: unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
    return model


def matmul_params(model, variant, expert_type, fusion):
    """Parameters that go through a matmul in this step (the embedding lookup is not one)."""
    import torch.nn as nn
    if variant == "fla-gla":
        return sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    active = list(model.config.expert_names) if expert_type in (None, "fused") else [expert_type]
    n = sum(m.weight.numel() for name in active for m in model.experts[name].modules()
            if isinstance(m, nn.Linear))
    if fusion:
        n += sum(m.weight.numel() for m in model.fusion.modules() if isinstance(m, nn.Linear))
    return n + model.lm_head.weight.numel()


def mixer_flops_per_token(variant, T, expert_type, model):
    variant = base_variant(variant)
    if variant == "fla-gla":
        c = model.config
        H, dk, dv = c.num_heads, int(c.hidden_size * c.expand_k) // c.num_heads, int(c.hidden_size * c.expand_v) // c.num_heads
        return c.num_hidden_layers * H * (4 * dk * dv + 64 * (dk + dv))
    cfg = mmrec_config()
    layers = cfg.num_layers * (2 if expert_type in (None, "fused") else 1)
    d, H, Dh = cfg.expert_dim, cfg.num_heads, cfg.head_dim
    if variant.startswith("mmrec"):
        from mm_rec.ops.long_term.kernel_intra import BT as GLA_CHUNK
        return layers * (H * (4 * Dh * Dh + GLA_CHUNK * 2 * Dh) + 2 * d)
    if variant == "ffn-only-graphed":
        return 0
    return layers * (2 * (T / 2) * 2 * d)


# -- one training step ----------------------------------------------------------------------------
def make_step(model, variant, compile_mode):
    """(step(x, y, expert_type), optimizer): train_modular's own step (mm_rec/training/step.py:
    bf16 autocast, chunked loss, backward, clipping to 1.0, finite check, fused AdamW with its
    parameter groups), with the variant's compilation and CUDA-graph capture."""
    import torch
    from mm_rec.training.optim import build_optimizer
    from mm_rec.training.step import train_step
    opt = build_optimizer(model, 1e-4, weight_decay=0.1)

    if variant == "fla-gla":
        def loss_fn(x, y, expert_type):
            return model(input_ids=x, labels=y).loss
    else:  # as train_modular computes it: the LM head and the loss in chunks (mm_rec/model/loss.py)
        def loss_fn(x, y, expert_type):
            return model.loss(x, y, expert_type=expert_type)

    from mm_rec.training.step_graph import GraphedStep, inner_compile_mode
    from mm_rec.utils import compile as compile_settings
    combo = not variant.endswith(NOCOMBO)
    variant = base_variant(variant)
    graphed = "graphed" in variant
    mode = None if compile_mode == "default" else compile_mode
    if graphed:  # the compiled parts run inside the step's graph: no CUDA graphs of their own
        mode = inner_compile_mode(mode)
    if variant in ("mmrec-gpu-compiled", "mmrec-gpu-graphed"):  # the layer, once for all layers
        model.compile_blocks(mode=mode, combo=combo)
    elif "compiled" in variant or graphed:  # the whole loss: model, LM head, cross-entropy
        # (MM-Rec's whole loss as train_modular --compile_scope model compiles it: no combo kernels)
        loss_fn = compile_settings.compile_fn(loss_fn, mode=mode, combo=combo and not variant.startswith("mmrec"))

    compiled = "compiled" in variant

    def whole_step(x, y, expert_type):  # one micro-batch, as train_modular's step with --grad_accum_steps 1
        loss, grad_norm, _ = train_step(model, opt, x[None], y[None], loss_fn, clip_norm=1.0,
                                        autocast_dtype=torch.bfloat16, autocast_cache=not graphed,
                                        mark_step_begin=compiled, expert_type=expert_type)
        return loss, grad_norm

    if graphed:
        graph = GraphedStep(opt)

        def step(x, y, expert_type):  # one graph per expert (Stage 2 alternates)
            loss, _ = graph(expert_type, lambda a, b: whole_step(a, b, expert_type), x, y)
            opt.zero_grad(set_to_none=True)
            return loss
        step.clear_graphs = graph.clear  # between shapes: a larger one gets the memory back
        return step, opt

    def step(x, y, expert_type):
        loss, _ = whole_step(x, y, expert_type)
        opt.zero_grad(set_to_none=True)
        return loss
    return step, opt


def state_bytes(model, opt):
    n = sum(p.numel() * p.element_size() for p in model.parameters())
    n += sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
             if hasattr(t, "numel"))
    return n


def measure_matmul_ceiling(torch):
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(10):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record(); a @ b; e.record(); torch.cuda.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    return 2 * 8192 ** 3 / statistics.median(times)


def parse_shape(name):
    """(batch, seq_len, expert_type, fusion) of a shape name: one of SHAPES; BxT (both experts);
    or stageN:B, stage N's shape at batch B (the guide's schedule at another batch size)."""
    if name in SHAPES:
        return SHAPES[name]
    try:
        if ":" in name:  # stageN:B
            stage, b = name.split(":")
            shape = (int(b),) + SHAPES[stage][1:] if stage.startswith("stage") else (0,)
        else:            # BxT
            b, t = name.lower().split("x")
            shape = (int(b), int(t), None, False)
    except (ValueError, KeyError):
        shape = (0,)
    if min(shape[:2]) > 0:
        return shape
    raise SystemExit(f"error: unknown shape {name!r}: use one of {', '.join(SHAPES)}, BxT like 8x8192 "
                     "or stageN:B like stage2:8 (stage N at batch B)")


def main(argv=None):
    args = parse_args(argv)
    import torch
    if not torch.cuda.is_available():
        raise SystemExit("error: bench_train.py needs a CUDA GPU (run it on the GPU machine)")
    torch.backends.cuda.matmul.allow_tf32 = True
    import torch._dynamo
    torch._dynamo.config.cache_size_limit = 64
    variants = [v for v in args.variants.split(",") if v]
    for v in variants:
        check_variant(v)
    from benchmarks.fla_compare import use_tuned_fla_configs
    use_tuned_fla_configs()  # before fla is imported: its kernels run the tuned configs, no autotuning
    if "fla-gla" in variants:
        try:
            import fla.models  # noqa: F401
        except Exception as e:  # report and go on without it
            print(f"fla-gla skipped: fla.models does not import ({type(e).__name__}: {e})")
            variants.remove("fla-gla")

    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    ceiling = measure_matmul_ceiling(torch)
    print(f"device: {props.name}, {props.total_memory / 2**30:.0f} GiB; torch {torch.__version__}; "
          f"bf16 matmul ceiling {ceiling / 1e12:.0f} TFLOP/s (8192^3)")

    models, steps, opts, info = {}, {}, {}, {}
    for v in variants:
        models[v] = build(v, dev, args.transformer_heads)
        steps[v], opts[v] = make_step(models[v], v, args.compile_mode)
        info[v] = {"params": sum(p.numel() for p in models[v].parameters())}
        print(f"{v:22s} {info[v]['params'] / 1e6:7.2f}M parameters")

    results = []
    for shape_name in [s for s in args.shapes.split(",") if s]:
        B, T, expert_mode, fusion = parse_shape(shape_name)
        gen = torch.Generator(device=dev).manual_seed(T)
        vocab = mmrec_config().vocab_size
        # Rotate among a few random batches: never time on one cached input or on zeros.
        batches = [torch.randint(0, vocab, (B, T + 1), device=dev, generator=gen) for _ in range(4)]
        experts = ["text", "code"] if expert_mode == "alternate" else [expert_mode]
        active = [v for v in variants
                  if not (v == "mmrec-pytorch" and B * T > args.pytorch_max_tokens)
                  and not (v == "fla-gla" and expert_mode == "alternate")]
        for v in variants:
            if hasattr(models[v], "use_fusion"):
                models[v].use_fusion = fusion
        times = {v: [] for v in active}
        peaks, failed, call = {}, {}, [0]

        def run(v, n):
            for _ in range(n):
                i = call[0]
                call[0] += 1
                xy = batches[i % len(batches)]
                steps[v](xy[:, :-1], xy[:, 1:], experts[i % len(experts)])

        for v in active:  # warm-up: compilation, autotuning, CUDA-graph recording
            try:
                t0 = time.time()
                torch.cuda.synchronize()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                # a graphed variant captures after 2 eager steps per expert: all before the timing
                run(v, max(args.warmup, 3 * len(experts)) if "graphed" in v else args.warmup)
                torch.cuda.synchronize()
                own = state_bytes(models[v], opts[v])
                peaks[v] = torch.cuda.max_memory_allocated() - base + own
                print(f"  warm-up {shape_name} {v}: {time.time() - t0:.1f} s, peak {peaks[v] / 2**30:.1f} GiB",
                      flush=True)
            except torch.cuda.OutOfMemoryError:
                failed[v] = "OOM"
                opts[v].zero_grad(set_to_none=True)
                torch.cuda.empty_cache()
                print(f"  {shape_name} {v}: out of memory", flush=True)
        for _ in range(args.repeats):
            for v in active:
                if v in failed:
                    continue
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record()
                run(v, args.steps)
                e.record()
                torch.cuda.synchronize()
                times[v].append(s.elapsed_time(e) / 1e3 / args.steps)
        for v in active:
            row = {"shape": shape_name, "batch": B, "seq_len": T, "experts": expert_mode or "both",
                   "fusion": fusion, "variant": v, "params": info[v]["params"]}
            if v in failed:
                row["error"] = failed[v]
            else:
                t = statistics.median(times[v])
                et = "text" if expert_mode == "alternate" else expert_mode
                flops_tok = 6 * matmul_params(models[v], v, et, fusion) + 3 * mixer_flops_per_token(v, T, et, models[v])
                row.update(step_s=t, step_s_all=times[v], tokens_per_s=B * T / t,
                           flops_per_token=flops_tok, tflops=flops_tok * B * T / t / 1e12,
                           mfu_peak=flops_tok * B * T / t / PEAK_BF16,
                           mfu_measured=flops_tok * B * T / t / ceiling,
                           peak_mem_gib=peaks[v] / 2**30)
            results.append(row)
        for v in variants:
            opts[v].zero_grad(set_to_none=True)
            getattr(steps[v], "clear_graphs", lambda: None)()  # this shape's graphs and their pool
        torch.cuda.empty_cache()
        print_table([r for r in results if r["shape"] == shape_name])
        write_json(args, props, torch, ceiling, results)  # after every shape: a timeout loses little

    for spec in filter(None, (args.profile or "").split(",")):
        try:
            profile(spec, models, steps, dev, args.profile_rows)
        except Exception as e:  # a profile is extra: keep the table
            print(f"profile {spec} failed: {type(e).__name__}: {e}")

    print_table(results)
    write_json(args, props, torch, ceiling, results)
    print(f"wrote {args.out}")
    return 0


def write_json(args, props, torch, ceiling, results):
    meta = {"device": props.name, "torch": torch.__version__, "matmul_ceiling_tflops": ceiling / 1e12,
            "peak_tflops": PEAK_BF16 / 1e12, "args": vars(args), "date": time.strftime("%Y-%m-%d %H:%M")}
    Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=1))


def print_table(results):
    def rates(variant):  # the fastest of the variant's rows (any heads, with or without combo kernels)
        best = {}
        for r in results:
            if base_variant(r["variant"]) == variant and "tokens_per_s" in r:
                best[r["shape"]] = max(best.get(r["shape"], 0), r["tokens_per_s"])
        return best
    base_e, base_c, base_g = rates("transformer"), rates("transformer-compiled"), rates("transformer-graphed")
    print(f"\n{'shape':9s} {'BxT':>8s} {'variant':24s} {'tok/s':>9s} {'ms/step':>8s} {'TFLOP/s':>8s} "
          f"{'MFU':>6s} {'MFU*':>6s} {'peak GiB':>8s} {'vs T-eager':>10s} {'vs T-comp':>9s} {'vs T-graph':>10s}")
    for r in results:
        bt = f"{r['batch']}x{r['seq_len']}"
        if "error" in r:
            print(f"{r['shape']:9s} {bt:>8s} {r['variant']:24s} {r['error']}")
            continue
        rel = lambda d: f"{r['tokens_per_s'] / d[r['shape']]:.2f}" if r["shape"] in d else "-"
        print(f"{r['shape']:9s} {bt:>8s} {r['variant']:24s} {r['tokens_per_s']:9.0f} {r['step_s'] * 1e3:8.1f} "
              f"{r['tflops']:8.1f} {r['mfu_peak'] * 100:5.1f}% {r['mfu_measured'] * 100:5.1f}% "
              f"{r['peak_mem_gib']:8.1f} {rel(base_e):>10s} {rel(base_c):>9s} {rel(base_g):>10s}")
    print("MFU: against 989 TFLOP/s; MFU*: against the measured matmul ceiling. "
          "T-eager / T-comp / T-graph: the Transformer eager, compiled, compiled with the step graphed "
          f"(the fastest of its rows where several ran: other heads, with and without combo kernels).")


def profile(spec, models, steps, dev, rows=25):
    """One profiled step: top CUDA kernels, kernel-launch count and GPU busy share of the step."""
    import torch
    shape, variant = spec.rsplit(":", 1)  # a shape may hold a colon (stage2:8)
    B, T, expert_mode, _ = parse_shape(shape)
    et = "text" if expert_mode == "alternate" else expert_mode
    x = torch.randint(0, mmrec_config().vocab_size, (B, T + 1), device=dev)
    for _ in range(2):
        steps[variant](x[:, :-1], x[:, 1:], et)
    torch.cuda.synchronize()
    from torch.profiler import ProfilerActivity, profile as prof
    with prof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
        t0 = time.perf_counter()
        steps[variant](x[:, :-1], x[:, 1:], et)
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    events = [e for e in p.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy = sum(e.self_device_time_total for e in events) / 1e6
    launches = sum(e.count for e in events)
    print(f"\nprofile {spec}: step {wall * 1e3:.1f} ms (profiled), GPU busy {busy * 1e3:.1f} ms "
          f"({100 * busy / wall:.0f}%), {launches} kernels")
    # GPU time by kind of kernel (names matched loosely: enough to see what dominates).
    kinds = {}
    for e in events:
        n = e.key.lower()
        # Inductor's kernels first: their names carry the ops they fuse ("chunk", "diag_scan", ...)
        kind = ("matmul" if any(s in n for s in ("gemm", "cutlass", "sm90", "matmul", "cublas", "nvjet"))
                else "norm" if "norm" in n
                else "triton (fused by inductor)" if n.startswith("triton_")
                else "recurrence" if any(s in n for s in ("chunk", "scan", "cumsum", "gla", "hgrn"))
                else "attention" if any(s in n for s in ("flash", "attention", "fmha"))
                else "copy/cast" if any(s in n for s in ("copy", "cat", "memcpy", "memset", "fill"))
                else "elementwise/reduce/other")
        t, c = kinds.get(kind, (0.0, 0))
        kinds[kind] = (t + e.self_device_time_total / 1e3, c + e.count)
    for kind, (t, c) in sorted(kinds.items(), key=lambda kv: -kv[1][0]):
        print(f"  {kind:28s} {t:8.2f} ms  {100 * t / (busy * 1e3):5.1f}% of GPU time  {c:6d} kernels")
    try:
        print(p.key_averages().table(sort_by="self_device_time_total", row_limit=rows, max_name_column_width=70))
    except Exception:
        print(p.key_averages().table(sort_by="self_cuda_time_total", row_limit=rows, max_name_column_width=70))


if __name__ == "__main__":
    sys.exit(main())
