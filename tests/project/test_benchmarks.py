"""The benchmarks' CPU-checkable parts: bench_train's CLI and the baselines it measures against."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from benchmarks.baselines.transformer import TransformerBaseline, matched_ffn_dim
from mm_rec.model import MMRec100M, MMRecConfig, PRESETS

ROOT = Path(__file__).resolve().parents[2]


def test_bench_train_help_runs_without_a_gpu():
    r = subprocess.run([sys.executable, "benchmarks/bench_train.py", "--help"], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    for variant in ("mmrec-gpu-graphed", "transformer-graphed", "ffn-only-graphed", "fla-gla"):
        assert variant in r.stdout


def test_nocombo_variants_are_checked_and_the_ratio_takes_the_faster_transformer(capsys):
    """A compiled or graphed variant may end in -nocombo (compiled without Inductor's combo
    kernels); "vs T-graph" divides by the faster of the Transformer's two graphed rows."""
    import pytest
    from benchmarks import bench_train as bt
    bt.check_variant("transformer-graphed-nocombo")
    assert bt.base_variant("mmrec-gpu-graphed-nocombo") == "mmrec-gpu-graphed"
    for bad in ("transformer-nocombo", "mmrec-gpu-graphed-combo", "nocombo"):
        with pytest.raises(SystemExit, match="unknown variant"):
            bt.check_variant(bad)
    row = lambda v, tok: {"shape": "stage1", "batch": 4, "seq_len": 512, "variant": v, "tokens_per_s": tok,
                          "step_s": 2048 / tok, "tflops": 1.0, "mfu_peak": 0.1, "mfu_measured": 0.1,
                          "peak_mem_gib": 1.0}
    bt.print_table([row("mmrec-gpu-graphed", 150.0), row("transformer-graphed", 100.0),
                    row("transformer-graphed-nocombo", 120.0)])
    lines = {line.split()[2]: line.split() for line in capsys.readouterr().out.splitlines()
             if line.startswith("stage1")}
    assert lines["mmrec-gpu-graphed"][-1] == "1.25"       # 150 / 120, not 150 / 100
    assert lines["transformer-graphed"][-1] == "0.83"
    # a Transformer with other heads (-hN) is one more row of that treatment: the fastest divides
    bt.print_table([row("mmrec-gpu-graphed", 150.0), row("transformer-graphed", 100.0),
                    row("transformer-graphed-h4", 125.0)])
    lines = {line.split()[2]: line.split() for line in capsys.readouterr().out.splitlines()
             if line.startswith("stage1")}
    assert lines["mmrec-gpu-graphed"][-1] == "1.20"       # 150 / 125


def test_kernel_sweeps_reject_bad_lists_in_one_line():
    """Checked before any GPU is looked for: a malformed or non-power-of-two list is a usage error."""
    for script, args, fragment in (
            ("sweep_gla_chunk.py", ["--shapes", "4x"], "--shapes must be"),
            ("sweep_gla_chunk.py", ["--scan-tiles", "16x4"], "--scan-tiles must be"),
            ("sweep_gla_chunk.py", ["--warps", "3"], "powers of two"),
            ("sweep_gla_chunk.py", ["--maxnreg", "0,12"], "--maxnreg must be"),
            ("sweep_diag_scan.py", ["--tiles", "64"], "--tiles must be"),
            ("sweep_diag_scan.py", ["--tiles", "48x64"], "powers of two"),
            ("sweep_diag_scan.py", ["--programs-per-sm", "0"], "--programs-per-sm must be"),
            ("kernel_resources.py", ["--warps", "3"], "powers of two")):
        r = subprocess.run([sys.executable, f"benchmarks/{script}", *args], cwd=ROOT,
                           capture_output=True, text=True)
        assert r.returncode == 2 and "Traceback" not in r.stderr, (script, args, r.stderr)
        assert fragment in r.stderr.strip().splitlines()[-1]

def test_transformer_baseline_matches_mmrec_parameter_count():
    cfg = MMRecConfig(**PRESETS["100m"])
    with torch.device("meta"):
        target = MMRec100M(config=cfg).get_num_params()
        n = sum(p.numel() for p in TransformerBaseline(cfg, matched_ffn_dim(cfg, target)).parameters())
    assert abs(n - target) / target < 0.002


def test_transformer_heads_change_the_heads_only():
    """--transformer-heads 4 (or the variant transformer*-h4): the same parameters in
    FlashAttention heads of 64; a count that does not divide the width is a one-line usage error."""
    import pytest
    from benchmarks import bench_train as bt
    model8 = bt.build("transformer-graphed", "meta")
    model4 = bt.build("transformer-graphed", "meta", transformer_heads=4)
    attn = lambda m: m.experts["text"].blocks[0]
    assert (attn(model8).num_heads, attn(model8).head_dim) == (8, 32)
    assert (attn(model4).num_heads, attn(model4).head_dim) == (4, 64)
    assert sum(p.numel() for p in model4.parameters()) == sum(p.numel() for p in model8.parameters())
    assert bt.parse_args(["--transformer-heads", "4"]).transformer_heads == 4
    # per variant: transformer*-hN, checked like the flag
    bt.check_variant("transformer-graphed-h4-nocombo")
    assert attn(bt.build("transformer-graphed-h4", "meta", transformer_heads=8)).num_heads == 4
    for bad in ("transformer-graphed-h3", "mmrec-gpu-graphed-h4", "transformer-graphed-nocombo-h4"):
        with pytest.raises(SystemExit, match="unknown variant"):
            bt.check_variant(bad)
    r = subprocess.run([sys.executable, "benchmarks/bench_train.py", "--transformer-heads", "3"], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "--transformer-heads must divide the width 256" in r.stderr.strip().splitlines()[-1]


def test_ffn_only_floor_is_the_transformer_without_its_mixer():
    """mixer=False keeps every parameter but the attention's, and each block computes exactly
    x + FFN(RMSNorm(x))."""
    cfg = MMRecConfig(**PRESETS["tiny"])
    torch.manual_seed(0)
    full, floor = TransformerBaseline(cfg), TransformerBaseline(cfg, mixer=False)
    names_full = {k for k, _ in full.named_parameters()}
    names_floor = {k for k, _ in floor.named_parameters()}
    assert names_floor < names_full
    assert {k.split(".")[-2] for k in names_full - names_floor} == {"norm", "qkv", "out_proj"}

    block = floor.experts["text"].blocks[0]
    x = torch.randn(2, 5, cfg.expert_dim)
    expected = x + block.ffn_out(F.gelu(block.ffn_in(block.ffn_norm(x))))
    torch.testing.assert_close(block(x, None, None), expected, rtol=0, atol=0)
    # The residual output is scaled as in the full block (GPT-2 style), the input projection is not.
    std = cfg.init_std / (2 * cfg.num_layers) ** 0.5
    assert abs(block.ffn_out.weight.std().item() - std) < 0.2 * std
    assert abs(block.ffn_in.weight.std().item() - cfg.init_std) < 0.2 * cfg.init_std


def test_transformer_baseline_rope_tables_cached_equal_computed():
    """The cached RoPE tables give the same hidden states as tables computed for the input's length
    (the path taken beyond the cache)."""
    cfg = MMRecConfig(**PRESETS["tiny"])
    torch.manual_seed(0)
    model = TransformerBaseline(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 20))
    with torch.no_grad():
        cached = model.hidden(ids)
        model.rope_cos, model.rope_sin = model.rope_cos[:10], model.rope_sin[:10]  # shorter than T
        computed = model.hidden(ids)
    torch.testing.assert_close(cached, computed, rtol=0, atol=0)
    assert "rope_cos" not in model.state_dict()  # buffers, not saved


def test_gla_kernels_compiled_for_sm90_keep_their_registers(tmp_path):
    """benchmarks/kernel_resources.py compiles the GLA chunk kernels for an H100 without a GPU and
    reads ptxas's registers and spills. At the shipped warps the forward does not spill and the
    backward spills well under the 416 bytes a thread of its earlier form, which cost it
    18% of its time: a change that brings the spills back fails here, on the CPU."""
    import json
    import pytest
    pytest.importorskip("triton")
    out = tmp_path / "resources.json"
    r = subprocess.run([sys.executable, "benchmarks/kernel_resources.py", "--warps", "1,2", "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = {(row["kernel"], row["warps"]): row for row in json.loads(out.read_text())["rows"]}
    shipped = {row["kernel"]: row for row in rows.values() if row["shipped"]}
    assert set(shipped) == {"gla_chunk_fwd", "gla_chunk_bwd"}
    assert all(0 < row["registers"] <= 255 for row in rows.values())
    assert shipped["gla_chunk_fwd"]["stack_bytes"] == 0
    assert shipped["gla_chunk_bwd"]["stack_bytes"] <= 256, shipped["gla_chunk_bwd"]
    # and it is a measurement: one warp has to spill far more for the same backward
    assert rows[("gla_chunk_bwd", 1)]["stack_bytes"] > 2 * shipped["gla_chunk_bwd"]["stack_bytes"]



def test_stage_shapes_at_other_batch_sizes():
    """--shapes stageN:B: stage N's sequence length, experts and fusion at batch B (the guide's
    schedule at the best batch sizes); a bad name is a one-line error before any GPU work."""
    from benchmarks import bench_train as bt
    for stage in ("stage1", "stage2", "stage3"):
        B, T, experts, fusion = bt.SHAPES[stage]
        assert bt.parse_shape(f"{stage}:16") == (16, T, experts, fusion)
    assert bt.parse_shape("stage2:8") == (8, 8192, "alternate", False)
    assert bt.parse_shape("3x1024") == (3, 1024, None, False)
    for bad in ("stage4:8", "stage2:0", "stage2:x", "fill512:4", "0x512", "8x"):
        with pytest.raises(SystemExit, match="unknown shape"):
            bt.parse_args(["--shapes", f"stage1,{bad}"])
