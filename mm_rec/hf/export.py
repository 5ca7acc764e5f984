"""`export --format hf`: a directory that transformers loads with or without mm_rec installed.

    DIR/model.safetensors        the weights, tensor names as `--format safetensors` writes them
    DIR/config.json              MMRecHFConfig (our config fields + model_type, auto_map, token ids)
    DIR/generation_config.json   bos / eos / pad = end-of-text
    DIR/tokenizer.json, tokenizer_config.json   a PreTrainedTokenizerFast that starts every text
                                 with end-of-text, as every training document follows one
    DIR/*.py                     the modelling code, for trust_remote_code=True

The modelling code is not a second copy of the model written for transformers: it is mm_rec's own
source (the model, the PyTorch recurrences, the prefill and step of generation, and mm_rec/hf),
copied here with each `from ..x import y` turned into a flat `from .mmrec_x import y`, because
transformers loads remote code as sibling files of one directory. The recurrences come through
`mmrec_ops.py`, which takes mm_rec's own (with its Triton kernels on CUDA) when mm_rec is
importable and the shipped PyTorch copy otherwise. Imports of mm_rec parts not shipped (torch.compile
helpers, checkpoint loading) only run inside functions the Hugging Face model never calls; they
raise an ImportError naming mm_rec.

Everything is written to a staging directory inside DIR and moved into place file by file, so an
interrupted export leaves no half-written file.
"""
from __future__ import annotations

import ast
import json
import os
import shutil
import tempfile
from pathlib import Path

import mm_rec

from ..utils.errors import UserError
from ..utils.fileio import atomic_write_text, disk_error, file_mode

PACKAGE_ROOT = Path(mm_rec.__file__).parent

# Shipped modules, in dependency order. mm_rec.hf's keep their names (auto_map points at them).
SHIPPED = (
    "mm_rec.model.config", "mm_rec.model.norms", "mm_rec.model.fusion", "mm_rec.model.loss",
    "mm_rec.ops.short_term.chunk", "mm_rec.ops.short_term.naive", "mm_rec.ops.short_term",
    "mm_rec.ops.long_term.chunk", "mm_rec.ops.long_term.naive", "mm_rec.ops.long_term", "mm_rec.ops",
    "mm_rec.model.batched", "mm_rec.model.block", "mm_rec.model.expert", "mm_rec.model.mmrec",
    "mm_rec.inference.state", "mm_rec.inference.decode", "mm_rec.inference.generation",
    "mm_rec.hf.configuration_mmrec", "mm_rec.hf.cache_mmrec", "mm_rec.hf.modeling_mmrec",
)
OPS = "mm_rec.ops"  # shipped as the PyTorch copy mmrec_ops_torch.py behind the mmrec_ops.py switch

AUTO_MAP = {"AutoConfig": "configuration_mmrec.MMRecHFConfig",
            "AutoModel": "modeling_mmrec.MMRecForCausalLM",
            "AutoModelForCausalLM": "modeling_mmrec.MMRecForCausalLM"}


def flat_name(module: str) -> str:
    if module.startswith("mm_rec.hf."):
        return module.rpartition(".")[2]
    return "mmrec_" + module.removeprefix("mm_rec.").replace(".", "_")


def source_path(module: str) -> Path:
    rel = Path(*module.split(".")[1:])
    package_init = PACKAGE_ROOT / rel / "__init__.py"
    return package_init if package_init.is_file() else (PACKAGE_ROOT / rel).with_suffix(".py")


def _absolute(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module
    parts = module.split(".") if is_package else module.split(".")[:-1]
    base = ".".join(parts[:len(parts) - (node.level - 1)])
    return f"{base}.{node.module}" if node.module else base


def rewrite_imports(source: str, module: str, is_package: bool, flat: dict[str, str]) -> str:
    """`source` of mm_rec's `module` with every import of mm_rec made flat-relative (shipped modules)
    or absolute and guarded (the rest: they then need mm_rec installed)."""
    lines = source.splitlines(keepends=True)
    edits = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.ImportFrom):
            continue
        target = _absolute(module, is_package, node)
        if node.level == 0 and not target.startswith("mm_rec"):
            continue
        names = ", ".join(a.name + (f" as {a.asname}" if a.asname else "") for a in node.names)
        pad = " " * node.col_offset
        if node.module is None and all(f"{target}.{a.name}" in flat for a in node.names):  # from . import x
            new = "".join(f"{pad}from . import {flat[f'{target}.{a.name}']} as {a.asname or a.name}\n"
                          for a in node.names)
        elif node.module is not None and target in flat:
            new = f"{pad}from .{flat[target]} import {names}\n"
        else:
            new = (f"{pad}try:\n{pad}    from {target} import {names}\n{pad}except ImportError as e:\n"
                   f"{pad}    raise ImportError('this needs the mm_rec package (pip install mm-rec): the files "
                   f"exported for transformers carry the model only') from e\n")
        edits.append((node.lineno, node.end_lineno, new))
    for start, end, new in sorted(edits, reverse=True):
        lines[start - 1:end] = [new]
    return "".join(lines)


def _ops_switch(names: list[str]) -> str:
    imported = ", ".join(sorted(names))
    return (f'"""The recurrences: mm_rec\'s own when mm_rec is installed (with its Triton kernels on CUDA),\n'
            f'else the PyTorch copy shipped beside this file (the same maths; mm_rec\'s tests hold them equal)."""\n'
            f"try:\n    from mm_rec.ops import {imported}\n"
            f"except ImportError:\n    from .{flat_name(OPS)}_torch import {imported}\n")


def shipped_sources() -> dict[str, str]:
    """File name -> text of every modelling file the export directory carries."""
    flat = {module: flat_name(module) for module in SHIPPED}
    files, ops_names = {}, set()
    for module in SHIPPED:
        path = source_path(module)
        source = path.read_text(encoding="utf-8")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.ImportFrom) and node.module and \
                    _absolute(module, path.name == "__init__.py", node) == OPS:
                ops_names.update(a.name for a in node.names)
        text = rewrite_imports(source, module, path.name == "__init__.py", flat)
        header = (f"# Generated by `python -m mm_rec.scripts.export --format hf` from mm_rec {mm_rec.__version__}'s "
                  f"{path.relative_to(PACKAGE_ROOT.parent)}; edit that file, not this copy.\n")
        name = f"{flat[module]}_torch.py" if module == OPS else f"{flat[module]}.py"
        files[name] = header + text
    files[f"{flat_name(OPS)}.py"] = _ops_switch(sorted(ops_names))
    # transformers 4 copies into its module cache only the files that the modelling file imports
    # itself (not what those import in turn): it names every shipped file.
    others = sorted(name[:-3] for name in files if name[:-3] not in ("modeling_mmrec", "configuration_mmrec"))
    files["modeling_mmrec.py"] += (
        "\n\n# Every shipped file, so that transformers 4 copies each one beside this file (it copies the\n"
        "# files this one imports itself, not what they import in turn).\n"
        + "".join(f"from .{name} import __name__ as _  # noqa: E402,F401\n" for name in others))
    return files


def write_shipped_sources(out_dir) -> list[Path]:
    """Write the modelling files into out_dir (MMRecForCausalLM.save_pretrained calls this)."""
    written = []
    for name, text in shipped_sources().items():
        path = Path(out_dir) / name
        atomic_write_text(path, text)
        written.append(path)
    return written


def _hf_tokenizer(tokenizer):
    """Our tokenizer as a PreTrainedTokenizerFast: end-of-text is bos, eos and pad, and is put before
    every text (add_special_tokens, the default), as before every training document."""
    import tokenizers
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast
    eot, eot_id = tokenizer.eot_token, tokenizer.eot_id
    backend = tokenizers.Tokenizer.from_str(tokenizer.to_json())
    backend.post_processor = TemplateProcessing(single=f"{eot} $A", pair=f"{eot} $A {eot} $B",
                                                special_tokens=[(eot, eot_id)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=eot, eos_token=eot, pad_token=eot,
                                   model_input_names=["input_ids", "attention_mask"])


def hf_config_for(model, tokenizer=None, expert_type: str | None = None):
    from .configuration_mmrec import MMRecHFConfig
    config = model.config.to_dict()
    config["use_fusion"] = bool(model.use_fusion)
    tokens = {}
    if tokenizer is not None:
        tokens = dict(bos_token_id=tokenizer.eot_id, eos_token_id=tokenizer.eot_id, pad_token_id=tokenizer.eot_id)
    hf = MMRecHFConfig(**config, expert_type=expert_type, architectures=["MMRecForCausalLM"], **tokens)
    hf.auto_map = dict(AUTO_MAP)
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    setattr(hf, "dtype" if hasattr(hf, "dtype") else "torch_dtype", dtype)
    return hf, tokens


def save_hf(model, out_dir, tokenizer=None, expert_type: str | None = None) -> list[Path]:
    """Write the Hugging Face directory (see the module docstring); returns the files written."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise UserError("--format hf needs transformers: pip install 'mm-rec[transformers]'") from None
    from safetensors.torch import save_model
    from transformers import GenerationConfig

    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir} is a file; give a directory")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".hf-export-", dir=out_dir))
    except OSError as e:
        raise disk_error(e, out_dir, "create") or UserError(f"cannot write to {out_dir} ({e.strerror or e})") from None
    try:
        save_model(model, str(staging / "model.safetensors"), metadata={"format": "pt"})
        config, tokens = hf_config_for(model, tokenizer, expert_type)
        config.save_pretrained(staging)
        if tokens:
            GenerationConfig(**tokens).save_pretrained(staging)
        if tokenizer is not None:
            _hf_tokenizer(tokenizer).save_pretrained(staging)
            # The class name both transformers 4 and 5 know (5 writes its new name, TokenizersBackend).
            tokenizer_config = json.loads((staging / "tokenizer_config.json").read_text())
            tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast"
            tokenizer_config.pop("backend", None)
            (staging / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
        for name, text in shipped_sources().items():
            (staging / name).write_text(text, encoding="utf-8")
        written = []
        mode = file_mode()
        for path in sorted(staging.iterdir()):
            os.chmod(path, mode)
            os.replace(path, out_dir / path.name)
            written.append(out_dir / path.name)
        return written
    except (OSError, RuntimeError) as e:
        error = disk_error(e, out_dir)
        if error is not None:
            raise error from None
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)

