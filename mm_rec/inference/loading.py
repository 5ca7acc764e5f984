"""Load a trained model and the tokenizer it was trained with, from whatever the user points at.

Three things can be loaded, all with `load_model(path)`:
- a training checkpoint `checkpoint_{stage}_step_{N}.pt` (the trainer's dict, guide §6.2);
- the guide's export file `mmrec_100m_final.pt` ({'model_state_dict', 'config'}, guide §9.3);
- an export directory (`model.safetensors` + `config.json` + `tokenizer.json`, see export.py).

The tokenizer travels with the weights: it is taken from the checkpoint's `tokenizer` entry, else
from `tokenizer.json` beside the file (or in the directory). `--tokenizer PATH` overrides both.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..model.config import MMRecConfig
from ..model.mmrec import MMRec100M
from ..utils.errors import UserError

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
TOKENIZER_NAME = "tokenizer.json"


@dataclass
class LoadedModel:
    model: MMRec100M
    tokenizer: object | None        # mm_rec.data.tokenizer.Tokenizer, or None for synthetic-data runs
    source: Path
    stage: str | None = None
    step: int | None = None
    train_args: dict | None = None

    def require_tokenizer(self):
        if self.tokenizer is None:
            raise UserError(f"no tokenizer found for {self.source} (none stored in the checkpoint and no "
                            f"{TOKENIZER_NAME} beside it); pass --tokenizer PATH")
        return self.tokenizer


def config_from_dict(d: dict, source) -> MMRecConfig:
    if not isinstance(d, dict):
        raise UserError(f"{source} has no model config; it was not written by MM-Rec")
    try:
        return MMRecConfig.from_dict(d)
    except (TypeError, ValueError) as e:
        raise UserError(f"{source} holds an invalid model config ({e})") from None


def build_model(config: MMRecConfig, state_dict: dict, source, use_fusion: bool | None = None) -> MMRec100M:
    model = MMRec100M(config=config)
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[0]
        raise UserError(f"weights in {source} do not fit its config ({first})") from None
    if use_fusion is not None:
        model.use_fusion = bool(use_fusion)
    return model.eval()


def fusion_from_checkpoint(state: dict) -> bool:
    """Stage 3 trains with the fusion layer on; before that it is the identity and stays off."""
    config = state.get("config") or {}
    return state.get("stage") == "stage3" or bool(config.get("use_fusion", False))


def tokenizer_from_json(text: str, source: str):
    import tokenizers

    from ..data.tokenizer import Tokenizer
    try:
        hf = tokenizers.Tokenizer.from_str(text)
    except Exception as e:
        raise UserError(f"the tokenizer stored in {source} is unreadable ({str(e).splitlines()[0]}); "
                        "pass --tokenizer PATH") from None
    return Tokenizer(hf, source=source)


def load_tokenizer_file(path):
    from ..data.tokenizer import Tokenizer
    return Tokenizer.load(path)


def load_model(path, device=None, dtype: torch.dtype | None = None, tokenizer_path=None) -> LoadedModel:
    """Model (eval mode, on `device`, cast to `dtype` if given) and its tokenizer from `path`."""
    path = Path(path)
    if path.is_dir():
        loaded = _load_export_dir(path)
    elif path.is_file():
        loaded = _load_checkpoint_file(path)
    else:
        raise UserError(f"checkpoint not found: {path}")
    if tokenizer_path is not None:
        loaded.tokenizer = load_tokenizer_file(tokenizer_path)
    if loaded.tokenizer is not None:
        from ..data.tokenizer import check_vocab
        check_vocab(loaded.tokenizer, loaded.model.config.vocab_size)
    loaded.model.to(device=device, dtype=dtype)
    return loaded


def _load_checkpoint_file(path: Path) -> LoadedModel:
    from ..training.checkpoint import load_checkpoint
    state = load_checkpoint(path)
    config = config_from_dict(state.get("config"), path)
    model = build_model(config, state["model_state_dict"], path, use_fusion=fusion_from_checkpoint(state))
    tokenizer = None
    if state.get("tokenizer"):
        tokenizer = tokenizer_from_json(state["tokenizer"], source=str(path))
    elif (path.parent / TOKENIZER_NAME).is_file():
        tokenizer = load_tokenizer_file(path.parent / TOKENIZER_NAME)
    return LoadedModel(model, tokenizer, path, stage=state.get("stage"), step=state.get("step"),
                       train_args=state.get("train_args"))


def _load_export_dir(path: Path) -> LoadedModel:
    from safetensors.torch import load_model as load_safetensors_into
    weights, config_file = path / WEIGHTS_NAME, path / CONFIG_NAME
    if not weights.is_file() or not config_file.is_file():
        raise UserError(f"{path} is not an exported model: it needs {WEIGHTS_NAME} and {CONFIG_NAME} "
                        "(write one with python -m mm_rec.scripts.export)")
    try:
        config_dict = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{config_file} is not valid JSON ({e})") from None
    if isinstance(config_dict, dict) and config_dict.get("model_type") == "mmrec":
        # written by export --format hf: our fields among the Hugging Face ones
        config_dict = {k: v for k, v in config_dict.items() if k in MMRecConfig.__dataclass_fields__}
    config = config_from_dict(config_dict, config_file)
    model = MMRec100M(config=config)
    try:
        # safetensors' load_model restores tensors it deduplicated on save (tied weights).
        load_safetensors_into(model, str(weights), strict=True)
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{weights} cannot be loaded into the model of {config_file} ({first})") from None
    model.use_fusion = config.use_fusion
    tokenizer = load_tokenizer_file(path / TOKENIZER_NAME) if (path / TOKENIZER_NAME).is_file() else None
    return LoadedModel(model.eval(), tokenizer, path)
