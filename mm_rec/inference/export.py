"""Export a trained model for inference.

`save_pretrained(model, DIR, tokenizer)` writes the directory layout users of the field expect:

    DIR/model.safetensors   the weights (safetensors: no pickle, memory-mappable)
    DIR/config.json         MMRecConfig.to_dict(), with use_fusion as the model runs it
    DIR/tokenizer.json      the tokenizer the model was trained with

and `MMRec100M.from_pretrained(DIR)` loads it back. `save_guide_pt` writes the guide's single-file
format (§9.3, `mmrec_100m_final.pt`): {'model_state_dict', 'config'} (+ 'tokenizer', the JSON text).
Every file is written to a temporary name and renamed (utils/fileio.atomic_write), so an interrupted
export leaves no half file, a full or read-only disk is one line, and the files get the umask's mode.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..utils.errors import UserError
from ..utils.fileio import atomic_write, atomic_write_text, check_writable_dir, file_mode
from .loading import CONFIG_NAME, TOKENIZER_NAME, WEIGHTS_NAME, load_model

GUIDE_PT_NAME = "mmrec_100m_final.pt"


def export_config(model) -> dict:
    config = model.config.to_dict()
    config["use_fusion"] = bool(model.use_fusion)
    return config


def save_pretrained(model, out_dir, tokenizer=None) -> Path:
    """Write model.safetensors, config.json and (when given) tokenizer.json into out_dir."""
    from safetensors.torch import save_model
    out_dir = prepare_out_dir(out_dir)
    # save_model (not save_file) drops tensors that share storage, e.g. tie_embeddings=True,
    # and the loader restores them.
    def write_weights(tmp):
        save_model(model, str(tmp), metadata={"format": "pt"})
        os.chmod(tmp, file_mode())  # safetensors creates its file anew, 0600: give it the umask's mode again

    atomic_write(out_dir / WEIGHTS_NAME, write_weights)
    atomic_write_text(out_dir / CONFIG_NAME, json.dumps(export_config(model), indent=2) + "\n")
    if tokenizer is not None:
        atomic_write_text(out_dir / TOKENIZER_NAME, tokenizer.to_json())
    return out_dir


def prepare_out_dir(out_dir) -> Path:
    """The export directory, created and proven writable (one line if it is a file, read-only or
    not ours), before anything is written."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir} is a file; give a directory")
    return check_writable_dir(out_dir, "export directory")


def save_guide_pt(model, path, tokenizer=None) -> Path:
    """The guide's §9.3 file: torch.save({'model_state_dict', 'config'}); readable with weights_only=True."""
    path = Path(path)
    prepare_out_dir(path.parent)
    state = {
        "model_state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "config": export_config(model),
        "tokenizer": tokenizer.to_json() if tokenizer is not None else None,
    }
    atomic_write(path, lambda tmp: torch.save(state, tmp))
    return path


def from_pretrained(path, device=None, dtype: torch.dtype | None = None):
    """An MMRec100M from an export directory (or any checkpoint load_model accepts), in eval mode."""
    return load_model(path, device=device, dtype=dtype).model
