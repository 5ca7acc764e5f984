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
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..model.config import MMRecConfig, upgrade_config_dict
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


# Config fields read from disk, by kind: every one is checked before it sizes anything (a vocab of
# 2**40 from a hand-edited config.json must be one line, not an attempt to allocate it).
_INT_FIELDS = ("vocab_size", "expert_dim", "num_layers", "num_heads", "ffn_dim", "mdi_dim", "alpha_rank",
               "scan_chunk_size", "chunk_size", "max_unchunked_len")  # chunk_size: scan_chunk_size's old name
_SIZE_FIELDS = ("vocab_size", "expert_dim", "num_heads", "ffn_dim", "mdi_dim", "alpha_rank")  # they shape weights
_BLOCK_KEY = re.compile(r"experts\.([^.]+)\.blocks\.(\d+)\.")
_FLOAT_FIELDS = ("alpha_temperature", "dropout", "norm_eps", "init_std")
_BOOL_FIELDS = ("use_fusion", "tie_embeddings")


def _config_problem(d: dict) -> str | None:
    for name in _INT_FIELDS:
        value = d.get(name)
        if name in d and not (name == "mdi_dim" and value is None):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                return f"{name} must be a positive integer (got {value!r})"
    for name in _FLOAT_FIELDS:
        value = d.get(name)
        if name in d and (not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value)):
            return f"{name} must be a finite number (got {value!r})"
    for name in _BOOL_FIELDS:
        if name in d and not isinstance(d[name], bool):
            return f"{name} must be true or false (got {d[name]!r})"
    if "fusion_method" in d and not isinstance(d["fusion_method"], str):
        return f"fusion_method must be a string (got {d['fusion_method']!r})"
    names = d.get("expert_names", ("text", "code"))
    if not isinstance(names, (list, tuple)) or not names or not all(isinstance(n, str) and n for n in names) \
            or len(set(names)) != len(names):
        return f"expert_names must be a list of distinct names (got {names!r})"
    return None


def model_config_from_dict(d: dict, source) -> MMRecConfig:
    """The MMRecConfig a checkpoint or config.json holds, checked (a UserError naming `source` if not)."""
    if not isinstance(d, dict):
        raise UserError(f"{source} has no model config; it was not written by MM-Rec")
    problem = _config_problem(d)
    if problem is None:
        try:
            return MMRecConfig.from_dict(d)
        except (TypeError, ValueError) as e:
            problem = str(e)
    raise UserError(f"{source} holds an invalid model config: {problem}")


def _short(names) -> str:
    names = list(names)
    return repr(names) if len(names) <= 4 else repr(names[:4])[:-1] + f", ... ({len(names)} names)]"


def _fmt_shape(shape) -> str:
    return "[" + ", ".join(str(n) for n in shape) + "]"


def meta_model(config: MMRecConfig, shapes: dict, config_source, weights_source) -> MMRec100M:
    """The model of `config` on the meta device (nothing allocated), after refusing weights whose
    names or shapes it does not have, naming the config field that disagrees."""
    # Checked first, from the names alone: the meta model builds one module per expert and layer.
    experts = {m.group(1) for m in map(_BLOCK_KEY.match, shapes) if m}
    if experts and experts != set(config.expert_names):
        raise UserError(f"{weights_source} cannot be loaded into the model of {config_source}: expert_names "
                        f"{_short(config.expert_names)} do not match the weights' experts {sorted(experts)}")
    blocks = {int(m.group(2)) for m in map(_BLOCK_KEY.match, shapes) if m}
    if blocks and config.num_layers != max(blocks) + 1:
        raise UserError(f"{weights_source} cannot be loaded into the model of {config_source}: num_layers "
                        f"({config.num_layers}) does not match the weights ({max(blocks) + 1} layers)")
    with torch.device("meta"):
        model = MMRec100M(config=config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for name, shape in shapes.items():
        want = expected.get(name)
        if want is None or tuple(shape) == want:
            continue  # unexpected and missing keys are reported by the strict load
        fields = [f for f in _SIZE_FIELDS if len(want) == len(shape) and
                  any(n != m and (getattr(config, f) == n or f == "expert_dim" and config.model_dim == n)
                      for n, m in zip(want, shape))]
        what = ", ".join(f"{f} ({getattr(config, f)})" for f in fields) or "its sizes"
        raise UserError(f"{weights_source} cannot be loaded into the model of {config_source}: {what} does not "
                        f"match the weights ({name} is {_fmt_shape(shape)}, the config makes it {_fmt_shape(want)})")
    return model


def check_finite(state_dict: dict, source) -> None:
    """Non-finite weights make every output garbage; refuse them with the first bad tensor's name."""
    for name, tensor in state_dict.items():
        if torch.is_tensor(tensor) and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise UserError(f"{source} holds non-finite weights (NaN or inf in {name}); it cannot be used: "
                            "pick an earlier checkpoint")


def fusion_is_trained(state_dict: dict) -> bool:
    """Whether the fusion layer differs from its identity initialisation. Stages 1-2 never update it
    (no gradient reaches it), so a changed one was trained with fusion on, at Stage 3. An identity
    layer computes the same logits on or off, so answering False for it changes nothing."""
    identity = {"fusion.proj.bias": torch.zeros_like, "fusion.gate.weight": torch.zeros_like,
                "fusion.gate.bias": torch.zeros_like,
                "fusion.proj.weight": lambda w: torch.eye(*w.shape, dtype=w.dtype)}
    return any(name in state_dict and not torch.equal(state_dict[name], make(state_dict[name]))
               for name, make in identity.items())


def build_model(config: MMRecConfig, state_dict: dict, source, use_fusion: bool | None = None,
                config_source=None) -> MMRec100M:
    """The model of `config` holding `state_dict`'s tensors (assigned, not copied: no random
    initialisation to overwrite), after checking they fit it and are finite."""
    shapes = {k: tuple(v.shape) for k, v in state_dict.items()}
    model = meta_model(config, shapes, config_source or source, source)
    check_finite(state_dict, source)
    # float32 as MMRec100M builds it, whatever the file stores (a bfloat16 export); load_model's dtype casts after
    state_dict = {k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()}
    try:
        model.load_state_dict(state_dict, strict=True, assign=True)
    except RuntimeError as e:
        first = str(e).splitlines()[0]
        raise UserError(f"weights in {source} do not fit the model of {config_source or source} ({first})") from None
    if use_fusion is not None:
        model.use_fusion = bool(use_fusion)
    return model.eval()


def fusion_from_checkpoint(state: dict) -> bool:
    """Stage 3 trains with the fusion layer on; before that it is the identity and stays off. A file
    that does not say (the guide's §9.3 export keeps five config keys) is asked its weights."""
    config = state.get("config") or {}
    if state.get("stage") == "stage3" or config.get("use_fusion") is True:
        return True
    if "use_fusion" in config:
        return False
    return fusion_is_trained(state.get("model_state_dict") or {})


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


def require_source(path) -> Path:
    """The checkpoint or export the user named, or a UserError if there is none (checked by the CLIs
    before they create any output directory)."""
    path = Path(path)
    if not (path.is_dir() or path.is_file()):
        raise UserError(f"checkpoint not found: {path}")
    return path


def load_model(path, device=None, dtype: torch.dtype | None = None, tokenizer_path=None) -> LoadedModel:
    """Model (eval mode, on `device`, cast to `dtype` if given) and its tokenizer from `path`."""
    path = require_source(path)
    loaded = _load_export_dir(path) if path.is_dir() else _load_checkpoint_file(path)
    if tokenizer_path is not None:
        loaded.tokenizer = load_tokenizer_file(tokenizer_path)
    if loaded.tokenizer is not None:
        from ..data.tokenizer import check_vocab
        check_vocab(loaded.tokenizer, loaded.model.config.vocab_size)
    loaded.model.to(device=device, dtype=dtype)
    return loaded


def read_checkpoint(path: Path) -> dict:
    """A training checkpoint or the guide's export file, read with weights_only=True (no code runs),
    every field the loader uses checked for its type."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, bad pickle opcode, not a torch file at all ...
        raise UserError(f"{path} is corrupt or not an MM-Rec checkpoint ({type(e).__name__}); check the path, "
                        "or point --checkpoint at another checkpoint or export") from None
    if not isinstance(state, dict) or not isinstance(state.get("model_state_dict"), dict):
        raise UserError(f"{path} has no model_state_dict; it is not an MM-Rec checkpoint or export")
    weights = state["model_state_dict"]
    bad = next((k for k, v in weights.items() if not isinstance(k, str) or not torch.is_tensor(v)), None)
    expected_types = {"stage": str, "step": int, "tokenizer": str, "train_args": dict}
    field = next((k for k, t in expected_types.items()
                  if state.get(k) is not None and (not isinstance(state[k], t) or isinstance(state[k], bool))), None)
    if bad is not None:
        raise UserError(f"{path}: model_state_dict[{bad!r}] is not a tensor; the file is not an MM-Rec checkpoint")
    if field is not None:
        raise UserError(f"{path}: field {field!r} is {type(state[field]).__name__}, expected "
                        f"{expected_types[field].__name__}; the file is damaged")
    return state


def _load_checkpoint_file(path: Path) -> LoadedModel:
    state = read_checkpoint(path)
    config = model_config_from_dict(state.get("config"), path)
    model = build_model(config, state["model_state_dict"], path, use_fusion=fusion_from_checkpoint(state))
    tokenizer = None
    if state.get("tokenizer"):
        tokenizer = tokenizer_from_json(state["tokenizer"], source=str(path))
    elif (path.parent / TOKENIZER_NAME).is_file():
        tokenizer = load_tokenizer_file(path.parent / TOKENIZER_NAME)
    return LoadedModel(model, tokenizer, path, stage=state.get("stage"), step=state.get("step"),
                       train_args=state.get("train_args"))


def _load_export_dir(path: Path) -> LoadedModel:
    from safetensors.torch import load_file
    weights, config_file = path / WEIGHTS_NAME, path / CONFIG_NAME
    if not weights.is_file() or not config_file.is_file():
        raise UserError(f"{path} is not an exported model: it needs {WEIGHTS_NAME} and {CONFIG_NAME} "
                        "(write one with python -m mm_rec.scripts.export)")
    try:
        config_dict = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{config_file} is not readable JSON ({e})") from None
    if isinstance(config_dict, dict) and config_dict.get("model_type") == "mmrec":
        # written by export --format hf: our fields among the Hugging Face ones
        config_dict = {k: v for k, v in upgrade_config_dict(config_dict).items() if k in MMRecConfig.__dataclass_fields__}
    config = model_config_from_dict(config_dict, config_file)
    try:
        state_dict = load_file(str(weights))
    except Exception as e:  # truncated, not safetensors
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{weights} is corrupt or not a safetensors file ({first})") from None
    # a hand-written config.json without use_fusion: the weights say whether fusion was trained
    use_fusion = config.use_fusion if "use_fusion" in config_dict else fusion_is_trained(state_dict)
    model = build_model(config, state_dict, weights, use_fusion, config_source=config_file)
    tokenizer = load_tokenizer_file(path / TOKENIZER_NAME) if (path / TOKENIZER_NAME).is_file() else None
    return LoadedModel(model, tokenizer, path)
