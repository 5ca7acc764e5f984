"""Inference: generation with a recurrent state, session memory, evaluation and export."""
from .generation import TokenStream, generate, sample_next_token
from .loading import LoadedModel, load_model
from .sessions import SessionMemoryManager

__all__ = ["generate", "sample_next_token", "TokenStream", "SessionMemoryManager", "load_model", "LoadedModel"]
