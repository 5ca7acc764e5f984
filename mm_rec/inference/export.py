"""Export a trained model for inference.

`save_pretrained(model, DIR, tokenizer)` writes the directory layout users of the field expect:

    DIR/model.safetensors   the weights (safetensors: no pickle, memory-mappable)
    DIR/config.json         MMRecConfig.to_dict(), with use_fusion as the model runs it
    DIR/tokenizer.json      the tokenizer the model was trained with

and `MMRec100M.from_pretrained(DIR)` loads it back. `save_guide_pt` writes the guide's single-file
format (§9.3, `mmrec_100m_final.pt`): {'model_state_dict', 'config'} (+ 'tokenizer', the JSON text).
Every file is written to a temporary name and renamed, so an interrupted export leaves no half file.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

from ..utils.errors import UserError
from .loading import CONFIG_NAME, TOKENIZER_NAME, WEIGHTS_NAME, load_model

GUIDE_PT_NAME = "mmrec_100m_final.pt"


def _atomic_write(path: Path, write) -> None:
    """Call write(tmp_path), then rename tmp_path over path."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def export_config(model) -> dict:
    config = model.config.to_dict()
    config["use_fusion"] = bool(model.use_fusion)
    return config


def save_pretrained(model, out_dir, tokenizer=None) -> Path:
    """Write model.safetensors, config.json and (when given) tokenizer.json into out_dir."""
    from safetensors.torch import save_model
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir} is a file; give a directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    # save_model (not save_file) drops tensors that share storage, e.g. tie_embeddings=True,
    # and safetensors' load_model restores them.
    _atomic_write(out_dir / WEIGHTS_NAME, lambda tmp: save_model(model, tmp, metadata={"format": "pt"}))
    config_text = json.dumps(export_config(model), indent=2) + "\n"
    _atomic_write(out_dir / CONFIG_NAME, lambda tmp: Path(tmp).write_text(config_text))
    if tokenizer is not None:
        _atomic_write(out_dir / TOKENIZER_NAME, lambda tmp: Path(tmp).write_text(tokenizer.to_json(), encoding="utf-8"))
    return out_dir


def save_guide_pt(model, path, tokenizer=None) -> Path:
    """The guide's §9.3 file: torch.save({'model_state_dict', 'config'}); readable with weights_only=True."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "model_state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "config": export_config(model),
        "tokenizer": tokenizer.to_json() if tokenizer is not None else None,
    }
    _atomic_write(path, lambda tmp: torch.save(state, tmp))
    return path


def from_pretrained(path, device=None, dtype: torch.dtype | None = None):
    """An MMRec100M from an export directory (or any checkpoint load_model accepts), in eval mode."""
    return load_model(path, device=device, dtype=dtype).model
