"""MM-Rec: a modular recurrent language model with a Text and a Code expert."""
from .model import ExpertModule, FusionLayer, MMRec100M, MMRecBlock, MMRecConfig

__version__ = "0.1.0"
__all__ = ["MMRec100M", "MMRecConfig", "MMRecBlock", "ExpertModule", "FusionLayer", "__version__"]
