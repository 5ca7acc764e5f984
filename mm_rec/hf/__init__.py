"""Hugging Face transformers support: MMRecHFConfig, MMRecForCausalLM, MMRecCache, `export --format hf`.

Importing this package does not import transformers (seconds to load, and optional). `import
mm_rec` calls `register_when_imported()`: the Auto classes are registered as soon as transformers
is imported (at once if it already is), so `AutoModelForCausalLM.from_pretrained(DIR)` works with
no remote code wherever mm_rec is imported.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import warnings

MODEL_TYPE = "mmrec"


def register_auto_classes() -> None:
    """AutoConfig / AutoModelForCausalLM / AutoModel know model_type "mmrec" (imports transformers)."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    from .configuration_mmrec import MMRecHFConfig
    from .modeling_mmrec import MMRecForCausalLM
    AutoConfig.register(MODEL_TYPE, MMRecHFConfig, exist_ok=True)
    AutoModelForCausalLM.register(MMRecHFConfig, MMRecForCausalLM, exist_ok=True)
    AutoModel.register(MMRecHFConfig, MMRecForCausalLM, exist_ok=True)


def _register_quietly() -> None:
    try:
        register_auto_classes()
    except Exception as e:  # an unsupported transformers must not break `import transformers`
        warnings.warn(f"mm_rec could not register its Hugging Face Auto classes ({type(e).__name__}: {e}); "
                      "load exported models with trust_remote_code=True", stacklevel=2)


class _RegisterOnImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: when `transformers` is first imported, wraps its loader so that the Auto
    classes are registered right after the package has run."""

    def find_spec(self, name, path=None, target=None):
        if name != "transformers":
            return None
        sys.meta_path.remove(self)  # once; and find the real spec without us
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run_package = spec.loader.exec_module

        def exec_module(module):
            run_package(module)
            _register_quietly()

        spec.loader.exec_module = exec_module
        return spec


def register_when_imported() -> None:
    if sys.modules.get("transformers") is not None:
        _register_quietly()
    elif importlib.util.find_spec("transformers") is not None and \
            not any(isinstance(f, _RegisterOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterOnImport())
