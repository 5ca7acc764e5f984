from .chunk import long_term_chunked
from .naive import long_term_naive

__all__ = ["long_term_chunked", "long_term_naive"]
