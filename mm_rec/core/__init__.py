"""Numerics the guide names by file (`associative_scan_hybrid`)."""
from .associative_scan_hybrid import associative_scan_exponential_hybrid

__all__ = ["associative_scan_exponential_hybrid"]
