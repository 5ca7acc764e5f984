"""The training guide's Python snippets (§5.1 monitoring, §9.1 evaluation, §9.2 inference, §9.3
export), run as written on a trained checkpoint, on whatever device is given: the GPU check of the
guide's API (gpu_session.sh's `guide` phase). The CPU tests hold the same snippets to references
(tests/training/test_recovery_lineage.py, test_inference_loading.py, test_monitoring.py).

    python benchmarks/guide_snippets.py --checkpoint RUN/checkpoint_stage3_step_N.pt --device cuda

Prints one line per snippet and exits 1 if any fails.
"""
from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path

import torch

from mm_rec.model import MMRec100M
from mm_rec.utils.monitoring import create_monitoring_hooks


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    failures = 0

    def check(name: str, ok: bool, detail: str) -> None:
        nonlocal failures
        failures += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {name}: {detail}", flush=True)

    checkpoint = torch.load(args.checkpoint, map_location="cpu", weights_only=False)
    model = MMRec100M.from_pretrained(args.checkpoint, device=args.device)
    vocab = model.config.vocab_size
    input_ids = torch.randint(0, vocab, (2, 256), device=args.device, generator=None)

    # §5.1: the monitoring loop, with a plain AdamW as the guide has it
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    with tempfile.TemporaryDirectory() as folder:
        hooks = create_monitoring_hooks(model, checkpoint_dir=folder)
        stable_steps = 0
        for step in range(3):
            logits, memory_states = model(input_ids, return_memory=True)
            stable = hooks["stability_monitor"].check_outputs({"logits": logits}, step)
            stable_steps += bool(stable)
            hooks["memory_hook"](memory_states, step)
        check("§5.1 monitoring hooks", stable_steps == 3, f"{stable_steps}/3 steps stable, logits {tuple(logits.shape)}")

    # §9.1: the test loss of the checkpoint's model_state_dict
    model.eval()
    with torch.no_grad():
        loss = model.loss(input_ids[:, :-1], input_ids[:, 1:]).item()
    check("§9.1 evaluation", math.isfinite(loss), f"loss {loss:.3f} on random tokens (uniform: {math.log(vocab):.3f})")

    # §9.2: each expert alone and fused
    with torch.no_grad():
        outs = {e: model(input_ids, expert_type=e) for e in ("text", "code", None)}
    shapes_ok = all(o.shape == (2, 256, vocab) and torch.isfinite(o).all() for o in outs.values())
    differ = not torch.equal(outs["text"], outs["code"])
    check("§9.2 inference", shapes_ok and differ, f"text/code/fused logits {tuple(outs[None].shape)}, experts differ: {differ}")

    # §9.3: the export line as written, loaded back with the same logits
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "mmrec_100m_final.pt"
        cfg = model.config
        torch.save({"model_state_dict": checkpoint["model_state_dict"],
                    "config": {"vocab_size": cfg.vocab_size, "expert_dim": cfg.expert_dim,
                               "num_layers": cfg.num_layers, "num_heads": cfg.num_heads, "ffn_dim": cfg.ffn_dim}}, path)
        again = MMRec100M.from_pretrained(path, device=args.device).eval()
        with torch.no_grad():
            diff = (again(input_ids) - outs[None]).abs().max().item()
        check("§9.3 export", diff == 0.0, f"reloaded logits differ by {diff:g}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
