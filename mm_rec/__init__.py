"""MM-Rec: a modular recurrent language model with a Text and a Code expert."""
from .model import ExpertModule, FusionLayer, MMRec100M, MMRecBlock, MMRecConfig

__version__ = "0.1.0"
__all__ = ["MMRec100M", "MMRecConfig", "MMRecBlock", "ExpertModule", "FusionLayer", "__version__"]

# Hugging Face Auto classes for model_type "mmrec", registered when (and if) transformers is imported.
from .hf import register_when_imported as _register_hf_when_imported  # noqa: E402

_register_hf_when_imported()
