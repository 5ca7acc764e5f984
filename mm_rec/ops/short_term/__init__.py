from .chunk import short_term_chunked
from .naive import short_term_naive

__all__ = ["short_term_chunked", "short_term_naive"]
