"""The package version (read by setuptools and reported in every output)."""

__version__ = "0.1.0"
