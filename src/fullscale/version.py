"""The version of fullscale (a leaf: the run directory and the fingerprints record it)."""

__version__ = "0.1.0"
