from .block import MMRecBlock
from .config import PRESETS, MMRecConfig
from .expert import ExpertModule
from .fusion import FusionLayer
from .mmrec import MMRec100M

__all__ = ["MMRecConfig", "PRESETS", "MMRecBlock", "ExpertModule", "FusionLayer", "MMRec100M"]
