"""Export a training checkpoint for inference (guide §9.3).

    python -m mm_rec.scripts.export --checkpoint checkpoints/checkpoint_stage3_step_5000.pt --out model/
    python -m mm_rec.scripts.export --checkpoint ckpt.pt --out model/ --format both

writes model/model.safetensors, model/config.json and model/tokenizer.json, loadable with
`MMRec100M.from_pretrained("model/")`; --format pt (or both) writes the guide's
model/mmrec_100m_final.pt = {'model_state_dict', 'config'} as well (or instead); --format hf writes a
directory Hugging Face transformers loads (mm_rec/hf/export.py).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from ..inference.export import GUIDE_PT_NAME, prepare_out_dir, save_guide_pt, save_pretrained
from ..inference.loading import CONFIG_NAME, TOKENIZER_NAME, WEIGHTS_NAME, load_model, require_source
from ..utils.cli import ArgumentParser
from ..utils.errors import run_cli

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def write_safetensors(loaded, out: Path) -> list[Path]:
    save_pretrained(loaded.model, out, loaded.tokenizer)
    return [out / WEIGHTS_NAME, out / CONFIG_NAME] + ([out / TOKENIZER_NAME] if loaded.tokenizer is not None else [])


def write_guide_pt(loaded, out: Path) -> list[Path]:
    return [save_guide_pt(loaded.model, out / GUIDE_PT_NAME, loaded.tokenizer)]


def write_hf(loaded, out: Path) -> list[Path]:
    from ..hf.export import save_hf  # transformers is optional: imported only for this format
    return save_hf(loaded.model, out, loaded.tokenizer)


# --format NAME -> the writers it runs, in order
FORMATS = {
    "safetensors": (write_safetensors,),
    "pt": (write_guide_pt,),
    "both": (write_safetensors, write_guide_pt),
    "hf": (write_hf,),
}


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m mm_rec.scripts.export", description=__doc__)
    p.add_argument("--checkpoint", required=True, help="training checkpoint (.pt) or exported model directory")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--format", default="safetensors", choices=list(FORMATS),
                   help="safetensors directory (default), the guide's mmrec_100m_final.pt, both, or hf: a "
                        "directory Hugging Face transformers loads (model code included, see README)")
    p.add_argument("--pt", action="store_true", help="same as --format both")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES),
                   help="weight dtype to store (default float32, as trained)")
    p.add_argument("--tokenizer", help="tokenizer.json to ship instead of the one stored with the checkpoint")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    fmt = "both" if args.pt else args.format
    require_source(args.checkpoint)
    out = prepare_out_dir(args.out)  # a read-only or foreign --out is refused before the model is read
    loaded = load_model(args.checkpoint, device="cpu", dtype=DTYPES[args.dtype], tokenizer_path=args.tokenizer)
    if loaded.tokenizer is None:
        print(f"warning: {args.checkpoint} has no tokenizer (synthetic-data run?); exporting the weights "
              "without tokenizer.json (pass --tokenizer PATH to include one)", file=sys.stderr)
    written = [path for write in FORMATS[fmt] for path in write(loaded, out)]
    model = loaded.model
    print(f"exported {loaded.source} ({model.get_num_params() / 1e6:.1f}M params, {args.dtype}, "
          f"fusion {'on' if model.use_fusion else 'off'}):")
    for path in written:
        print(f"  {path}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
